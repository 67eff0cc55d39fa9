"""raysage tune: spaces and objectives, and a search with ASHA on Ray Tune."""

from __future__ import annotations

import math
import os
import signal
import time

import pyarrow.parquet as pq
import pytest
import yaml

from raysage.config import build_config
from raysage.engine.orchestrator import simulate
from raysage.errors import ConfigError
from raysage.studies.tune import (Tuning, parse_objective, parse_space, run_tuning,
                                  score_trials)

TINY = {"algorithm": "fedavg", "clients": 4, "samples_per_client": 100, "test_samples": 200,
        "rounds": 3, "batch_size": 10, "backend": "serial", "cpus_per_worker": 1,
        "checkpoint_every": 1}


def test_spaces_parse_and_bad_ones_are_one_line():
    assert parse_space("client_lr=loguniform:1e-4:1e-1") == ("client_lr", "loguniform",
                                                             [1e-4, 0.1])
    assert parse_space("batch-size=grid:10,20") == ("batch_size", "grid", [10, 20])
    assert parse_space("client_optimizer=choice:sgd,adam")[2] == ["sgd", "adam"]
    for bad in ("client_lr", "client_lr=normal:0:1", "client_lr=loguniform:0:1",
                "client_lr=uniform:1:0", "client_lr=uniform:1"):
        with pytest.raises(ConfigError, match="--space"):
            parse_space(bad)


ROWS = [{"accuracy": 0.2, "cumulative_bytes": 2**29, "sim_time": 10.0},
        {"accuracy": math.nan, "cumulative_bytes": 2**30, "sim_time": 20.0},
        {"accuracy": 0.5, "cumulative_bytes": 3 * 2**29, "sim_time": 30.0},
        {"accuracy": 0.4, "cumulative_bytes": 2**31, "sim_time": 40.0}]


@pytest.mark.parametrize("text,expected", [
    ("final_accuracy", 0.4), ("best_accuracy", 0.5),
    ("accuracy@gib=1", 0.2),            # by 1 GiB only round 0 was evaluated
    ("accuracy@gib=1.5", 0.5), ("accuracy@sim_time=5", math.nan),
    ("gib_to=0.45", 1.5), ("sim_time_to=0.3", 30.0), ("gib_to=0.9", math.inf)])
def test_objectives_score_round_rows_as_defined(text, expected):
    score = parse_objective(text).score(ROWS)
    assert (math.isnan(score) and math.isnan(expected)) or score == expected


def test_bad_objectives_and_empty_spaces_are_refused(tmp_path):
    for bad in ("accuracy", "gib_to=", "gib_to=-1", "accuracy@gib=x"):
        with pytest.raises(ConfigError, match="--metric"):
            parse_objective(bad)
    with pytest.raises(ConfigError, match="nothing to tune"):
        run_tuning(Tuning(str(tmp_path), TINY, [], parse_objective("final_accuracy")))
    with pytest.raises(ConfigError, match=r"--space participation: .*participation"):
        run_tuning(Tuning(str(tmp_path), TINY, [parse_space("participation=uniform:0.5:2")],
                          parse_objective("final_accuracy")))       # HIGH out of bounds
    with pytest.raises(ConfigError, match="unknown config field 'client_rl'"):
        run_tuning(Tuning(str(tmp_path), TINY, [parse_space("client_rl=uniform:0.1:1")],
                          parse_objective("final_accuracy")))
    assert not any(tmp_path.iterdir())


def test_six_trials_with_asha_pick_a_best_config_that_simulate_reproduces(tmp_path,
                                                                          ray_session):
    root = tmp_path / "lr"
    tuning = Tuning(str(root), TINY, [parse_space("client_lr=loguniform:1e-3:3e-1")],
                    parse_objective("final_accuracy"), samples=6, parallel=1)
    events = []
    scores = run_tuning(tuning, on_event=lambda kind, trial, info: events.append(kind))
    assert len(scores) == 6 and len({s.values["client_lr"] for s in scores}) == 6
    # parallel=1: each trial ends before the next starts (the session has room for two);
    # ASHA's early stop is an end, not an interruption
    assert events == ["start", "end"] * 6
    finished = [s for s in scores if s.finished]
    stopped = [s for s in scores if not s.finished]
    assert finished and all(s.rounds == 3 for s in finished)
    # one trial at a time, in the seeded sampling's order: ASHA stops the last one, whose
    # accuracy after round 0 is below every earlier trial's
    assert stopped and all(s.rounds < 3 for s in stopped)
    # best first among the finished, by final accuracy read from their own rows
    assert [s.score for s in finished] == sorted((s.score for s in finished), reverse=True)
    best = yaml.safe_load((root / "best.yaml").read_text())
    assert best == TINY | {"client_lr": finished[0].values["client_lr"]}
    again = simulate(build_config(best, {"out": str(tmp_path / "best")}),
                     announce=lambda line: None)
    assert again.summary["final_accuracy"] == finished[0].score
    assert (pq.read_table(f"{finished[0].folder}/rounds.parquet").column("train_loss")
            == pq.read_table(again.run_dir / "rounds.parquet").column("train_loss"))
    # raysage report reads a tuning folder like a sweep's (the stopped trials too)
    from raysage.studies.report import write_report

    assert write_report([root], tmp_path / "report")["runs"] == 6
    # the same command samples the same values, and continues rather than repeats
    before = {s.folder for s in scores}
    assert {s.folder for s in run_tuning(tuning)} == before
    assert {s.folder for s in score_trials(str(root), ["client_lr"], 3,
                                           parse_objective("best_accuracy"))} == before
    # another space in the same folder would be restored as the old one: refused
    other = Tuning(str(root), TINY, [parse_space("client_lr=loguniform:1e-2:1e-1")],
                   parse_objective("final_accuracy"), samples=6, parallel=1)
    with pytest.raises(ConfigError, match=r"holds a search with space = "
                                          r".*client_lr=loguniform:0.001:0.3"):
        run_tuning(other)


def test_a_yaml_spec_and_flags_make_one_search(tmp_path):
    from raysage.studies.tune import load_tuning

    spec = tmp_path / "search.yaml"
    spec.write_text("algorithm: fsl_sage\nrounds: 4\nmetric: best_accuracy\nsamples: 3\n"
                    "space:\n  client_lr: loguniform:1e-4:1e-1\n  server_lr: uniform:0.001:0.01\n")
    tuning = load_tuning(str(spec), ["server_lr=choice:0.001,0.002"],
                         {"rounds": 5, "out": str(tmp_path / "s")}, metric=None, samples=None)
    assert tuning.base == {"algorithm": "fsl_sage", "rounds": 5}       # flags override
    assert tuning.space == [("client_lr", "loguniform", [1e-4, 0.1]),
                            ("server_lr", "choice", [0.001, 0.002])]   # a flag replaces
    assert (tuning.objective.text, tuning.samples, tuning.root) == ("best_accuracy", 3,
                                                                    str(tmp_path / "s"))
    with pytest.raises(ConfigError, match="give --out"):
        load_tuning(str(spec), [], {}, metric=None, samples=None)
    with pytest.raises(ConfigError, match="a grid: space needs --searcher random"):
        load_tuning(None, ["seed=grid:1,2"], {"out": "x"}, metric=None, samples=None,
                    searcher="optuna")


def test_optuna_searches_when_installed_and_is_one_line_when_not(tmp_path, ray_session,
                                                                 monkeypatch):
    pytest.importorskip("optuna")
    import builtins

    tuning = Tuning(str(tmp_path / "tpe"), TINY | {"rounds": 2},
                    [parse_space("client_lr=loguniform:1e-3:3e-1")],
                    parse_objective("final_accuracy"), samples=2, asha=False,
                    searcher="optuna", parallel=1)
    events = []
    scores = run_tuning(tuning, on_event=lambda kind, trial, info: events.append(kind))
    assert len(scores) == 2 and all(s.finished for s in scores)
    assert events == ["start", "end"] * 2        # one at a time, as parallel=1 asks
    assert all(1e-3 <= s.values["client_lr"] <= 3e-1 for s in scores)

    real_import = builtins.__import__

    def without_optuna(name, *args, **kwargs):
        if name == "optuna":
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", without_optuna)
    refused = Tuning(str(tmp_path / "refused"), TINY, tuning.space, tuning.objective,
                     searcher="optuna")
    with pytest.raises(ConfigError, match="--searcher optuna needs the optuna package"):
        run_tuning(refused)
    assert not (tmp_path / "refused").exists()



def _ctrl_c_to(driver: int):
    """A run_point that sends the search's driver Ctrl-C after its first round, as a
    user would; it travels to the trial's process by value."""
    import sys

    from ray import cloudpickle

    cloudpickle.register_pickle_by_value(sys.modules[__name__])

    def run(cfg, on_round=None, **kwargs):
        def press(row):
            on_round(row)
            if row["round"] == 0:
                os.kill(driver, signal.SIGINT)
                time.sleep(10)      # Tune stops this trial before it goes on
        return simulate(cfg, on_round=press, **kwargs)
    return run


def test_ctrl_c_ends_a_search_that_the_same_command_continues(tmp_path, ray_session,
                                                               monkeypatch):
    tuning = Tuning(str(tmp_path / "t"), TINY, [parse_space("client_lr=grid:0.01,0.02")],
                    parse_objective("final_accuracy"), samples=1, parallel=1, asha=False)
    events = []
    scores = run_tuning(tuning, on_event=lambda kind, trial, info: events.append(kind),
                        run_point=_ctrl_c_to(os.getpid()))
    assert events[-1] == "interrupted" and not any(s.finished for s in scores)
    events.clear()
    scores = run_tuning(tuning, on_event=lambda kind, trial, info: events.append(kind))
    assert "interrupted" not in events
    assert sorted(s.values["client_lr"] for s in scores if s.finished) == [0.01, 0.02]

    # raysage tune's last line after Ctrl-C says so, and how to go on
    from typer.testing import CliRunner

    from raysage import cli
    from raysage.studies import tune as tuning_module

    def cut_short(tuning, on_event):
        on_event("interrupted", "", {})
        return scores[:1]
    monkeypatch.setattr(tuning_module, "run_tuning", cut_short)
    out = tmp_path / "cli"
    result = CliRunner().invoke(cli.app, ["tune", "--space", "client_lr=loguniform:1e-3:1e-1",
                                          "--out", str(out)])
    assert result.exit_code == 1
    assert result.output.strip().splitlines()[-1] == (
        f"search {out} interrupted: 1 trial(s) ran every round; re-run the same command to "
        "continue it")
