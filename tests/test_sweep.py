"""Sweeps: expansion and validation, skipping finished points, resuming interrupted ones."""

from __future__ import annotations

import json
import os
import re
import threading

import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from raysage.cli import app
from raysage.config import build_config
from raysage.engine.orchestrator import simulate
from raysage.errors import ConfigError
from raysage.studies.sweep import (build_sweep, load_sweep, parse_grid_flag, point_status,
                                   quiet_tune, run_sweep)

TINY = {"clients": 2, "samples_per_client": 20, "test_samples": 50, "rounds": 3,
        "batch_size": 10, "align_epochs": 2, "align_buffer": 20, "align_batch_size": 20,
        "backend": "serial", "checkpoint_every": 1}


def test_grids_expand_to_the_union_of_their_products(tmp_path):
    sweep = build_sweep(TINY, [{"algorithm": ["fsl_sage", "fedavg"], "seed": [1, 2]},
                               {"algorithm": ["sl"], "partition": ["dirichlet"],
                                "alpha": [0.1]}], str(tmp_path))
    names = [p.name for p in sweep.points]
    assert names == ["algorithm=fsl_sage__seed=1", "algorithm=fsl_sage__seed=2",
                     "algorithm=fedavg__seed=1", "algorithm=fedavg__seed=2",
                     "algorithm=sl__partition=dirichlet__alpha=0.1"]
    last = sweep.points[-1].config
    assert (last.algorithm, last.partition, last.alpha, last.clients) == ("sl", "dirichlet",
                                                                          0.1, 2)
    assert last.out == f"{tmp_path}/algorithm=sl__partition=dirichlet__alpha=0.1"


def test_bad_sweeps_fail_before_anything_runs(tmp_path):
    with pytest.raises(ConfigError, match="unknown config field 'alfa'"):
        build_sweep(TINY, [{"alfa": [1]}], str(tmp_path))
    with pytest.raises(ConfigError, match=r"point alpha=-1: .*alpha"):
        build_sweep(TINY, [{"alpha": [1, -1]}], str(tmp_path))
    with pytest.raises(ConfigError, match="give --out"):
        build_sweep(TINY, [{"seed": [1]}], None)
    with pytest.raises(ConfigError, match="'out' cannot vary"):
        build_sweep(TINY, [{"out": ["a", "b"]}], str(tmp_path))
    with pytest.raises(ConfigError, match="not FIELD=V1,V2"):
        parse_grid_flag("alpha")
    assert not any(tmp_path.iterdir())


def test_spec_file_and_flags_combine(tmp_path):
    spec = tmp_path / "study.yaml"
    spec.write_text("clients: 4\nrounds: 2\nbackend: serial\n"
                    "grid:\n  algorithm: [fsl_sage, cse_fsl]\n")
    sweep = load_sweep(spec, ["seed=1,2"], {"rounds": 5, "out": None})
    assert len(sweep.points) == 4
    assert {p.config.rounds for p in sweep.points} == {5}      # flags override the spec
    assert sweep.points[0].name == "algorithm=fsl_sage__seed=1"
    assert load_sweep(spec, [], {}).root == os.path.join("runs", "study")


def _tables(folder) -> str:
    """Both tables without host timings, as text (NaN compares equal to itself there)."""
    drop = {"wall_round_time", "wall_time", "memory_driver", "memory_workers_max",
            "memory_server", "memory_total"}
    rounds = [{k: v for k, v in r.items() if k not in drop}
              for r in pq.read_table(f"{folder}/rounds.parquet").to_pylist()]
    clients = pq.read_table(f"{folder}/clients.parquet").to_pylist()
    return json.dumps([rounds, clients], sort_keys=True)


def _started(events: list) -> list[str]:
    return [name for kind, name in events if kind == "start"]


def test_rerun_skips_finished_points(tmp_path, ray_session):
    sweep = build_sweep(TINY, [{"algorithm": ["fsl_sage", "fedavg"]}], str(tmp_path))
    events = []

    def record(kind, point, info):
        events.append((kind, point.name))

    first = run_sweep(sweep, on_event=record)
    assert [o.status for o in first] == ["finished", "finished"]
    assert sorted(_started(events)) == ["algorithm=fedavg", "algorithm=fsl_sage"]
    assert first[0].summary["rounds"] == 3
    stamps = {p: os.stat(p).st_mtime_ns for p in tmp_path.rglob("*.parquet")}
    events.clear()
    again = run_sweep(build_sweep(TINY, [{"algorithm": ["fsl_sage", "fedavg", "sl"]}],
                                  str(tmp_path)), on_event=record)
    assert [o.status for o in again] == ["skipped", "skipped", "finished"]
    assert _started(events) == ["algorithm=sl"]
    assert ("skip", "algorithm=fsl_sage") in events and ("round", "algorithm=sl") in events
    assert all(os.stat(p).st_mtime_ns == t for p, t in stamps.items())
    # Tune's record of the sweep sits beside the points, as one experiment
    assert (tmp_path / ".tune" / "sweep" / "algorithm=sl" / "progress.csv").exists()


class Interrupt(Exception):
    pass


def _interrupting(after_round: int):
    """A run_point that stops after a round; it travels to the trial's process by value."""
    import sys

    from ray import cloudpickle

    cloudpickle.register_pickle_by_value(sys.modules[__name__])

    def run(cfg, on_round=None, **kwargs):
        def stop(row):
            on_round(row)
            if row["round"] == after_round:
                raise Interrupt("stopped by the test")
        return simulate(cfg, on_round=stop, **kwargs)
    return run


def test_interrupted_point_resumes_from_its_checkpoint(tmp_path, ray_session):
    reference = simulate(build_config(TINY, {"out": str(tmp_path / "reference")}),
                         announce=lambda line: None)
    sweep = build_sweep(TINY, [{"algorithm": ["fsl_sage"]}], str(tmp_path / "sweep"))
    point = sweep.points[0]
    failed = run_sweep(sweep, run_point=_interrupting(after_round=1))
    assert failed[0].status == "failed" and "stopped by the test" in failed[0].error
    # Round 1 was written but its checkpoint was not: the point continues after round 0.
    assert point_status(point) == "resume"
    events = []
    outcome = run_sweep(sweep, on_event=lambda kind, p, info: events.append((kind, info)))[0]
    assert outcome.status == "finished"
    assert ("start", {"status": "resume"}) in events
    assert [info["round"] for kind, info in events if kind == "round"] == [1, 2]
    assert _tables(point.config.out) == _tables(reference.run_dir)


def test_point_interrupted_before_a_checkpoint_starts_over(tmp_path, ray_session):
    fields = TINY | {"checkpoint_every": 0}
    sweep = build_sweep(fields, [{"seed": [3]}], str(tmp_path))
    point = sweep.points[0]
    run_sweep(sweep, run_point=_interrupting(after_round=0))
    assert point_status(point) == "restart"
    assert run_sweep(sweep)[0].status == "finished"
    assert len(pq.read_table(f"{point.config.out}/rounds.parquet")) == 3
    # A folder holding someone else's files is not cleared.
    run_sweep(build_sweep(fields, [{"seed": [4]}], str(tmp_path)),
              run_point=_interrupting(after_round=0))
    (tmp_path / "seed=4" / "notes.txt").write_text("mine")
    outcome = run_sweep(build_sweep(fields, [{"seed": [4]}], str(tmp_path)))[0]
    assert outcome.status == "failed" and "notes.txt" in outcome.error


def test_a_folder_from_another_config_is_an_error(tmp_path, ray_session):
    run_sweep(build_sweep(TINY, [{"seed": [1]}], str(tmp_path)))
    changed = build_sweep(TINY | {"client_lr": 0.05}, [{"seed": [1]}], str(tmp_path))
    with pytest.raises(ConfigError, match="client_lr = 0.001.*client_lr = 0.05"):
        run_sweep(changed)
    # How a point executes is not part of what it computes: still finished.
    moved = build_sweep(TINY | {"threads": 2}, [{"seed": [1]}], str(tmp_path))
    assert point_status(moved.points[0]) == "done"


def test_points_share_the_cluster_when_they_fit(tmp_path, ray_session):
    # Each point reserves 1 worker x 0.5 CPU + 0.5 CPU for its server: two fit in 2 CPUs.
    fields = TINY | {"backend": "ray", "workers": 1, "cpus_per_worker": 0.5,
                     "server_cpus": 0.5, "checkpoint_every": 0}
    sweep = build_sweep(fields, [{"seed": [1, 2, 3]}], str(tmp_path))
    live, most = set(), [0]
    lock = threading.Lock()

    def on_event(kind, point, info):
        with lock:
            if kind == "start":
                live.add(point.name)
                most[0] = max(most[0], len(live))
            elif kind in ("finish", "fail"):
                live.discard(point.name)

    outcomes = run_sweep(sweep, on_event=on_event)
    assert [o.status for o in outcomes] == ["finished"] * 3
    assert most[0] == 2
    alone = simulate(build_config(TINY, {"seed": 2, "out": str(tmp_path / "alone")}),
                     announce=lambda line: None)
    assert _tables(sweep.points[1].config.out) == _tables(alone.run_dir)
    assert ray_session.is_initialized()   # a sweep leaves a Ray it did not start running


def test_cli_lists_points_and_reports_bad_grids(tmp_path):
    runner = CliRunner()
    out = tmp_path / "s"
    result = runner.invoke(app, ["sweep", "--grid", "algorithm=fsl_sage,fedavg", "--clients",
                                 "2", "--out", str(out), "--list"])
    assert result.exit_code == 0, result.output
    assert result.output.splitlines() == [f"new      {out}/algorithm=fsl_sage",
                                          f"new      {out}/algorithm=fedavg"]
    result = runner.invoke(app, ["sweep", "--grid", "algorithm=nope", "--out", str(out)])
    assert result.exit_code == 2
    assert "algorithm" in result.output and "nope" in result.output
    assert not out.exists()


def test_a_sweep_whose_driver_is_killed_completes_on_a_rerun(tmp_path):
    """kill -9 of `raysage sweep` mid-way (and of the Ray it started); the same command
    again runs only what is missing, and leaves finished points untouched."""
    import signal
    import subprocess
    import sys
    import time

    import psutil

    out = tmp_path / "grid"
    command = [sys.executable, "-m", "raysage.cli", "sweep", "--grid", "seed=1,2",
               "--grid", "client_lr=0.01,0.05", "--out", str(out), "--parallel", "1",
               *[f"--{k.replace('_', '-')}={v}" for k, v in TINY.items()], "--rounds", "4"]
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}      # a loopback-only Ray of its own
    driver = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    tree = []
    try:
        deadline = time.time() + 300
        while time.time() < deadline and not list(out.glob("*/summary.json")):
            assert driver.poll() is None, "the sweep ended before the test could stop it"
            tree = [driver.pid] + [p.pid for p in psutil.Process(driver.pid).children(True)]
            time.sleep(0.2)
        finished = {p.parent.name for p in out.glob("*/summary.json")}
        assert finished and len(finished) < 4
    finally:
        for pid in tree:      # the driver and what it started, by process id
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        driver.wait(timeout=60)
    stamps = {p: os.stat(p).st_mtime_ns for name in finished
              for p in (out / name).glob("*.parquet")}
    # a narrow terminal: each point's line stays one line
    again = subprocess.run(command, env={**env, "COLUMNS": "30"}, capture_output=True,
                           text=True, timeout=600)
    assert again.returncode == 0, again.stdout[-2000:] + again.stderr[-2000:]
    assert "4/4 points finished" in again.stdout
    lines = again.stderr.splitlines()
    for name in finished:
        assert f"skip   {name} (finished)" in lines
    for name in {p.name for p in out.iterdir() if p.is_dir()} - finished - {".tune"}:
        assert any(re.fullmatch(rf"done   {re.escape(name)}: best acc \S+, \S+ GiB, \d+ s",
                                line) for line in lines), again.stderr
    assert all(os.stat(p).st_mtime_ns == t for p, t in stamps.items())
    assert len(list(out.glob("*/summary.json"))) == 4


def test_per_algorithm_fields_apply_to_that_algorithms_points_only(tmp_path):
    spec = tmp_path / "tuned.yaml"
    spec.write_text("clients: 4\nrounds: 2\nbackend: serial\n"
                    "per_algorithm:\n  fedavg: {client_lr: 0.0005}\n"
                    "  fsl_sage: {client_lr: 0.0001, server-lr: 0.0006}\n"
                    "grid:\n  - algorithm: [fsl_sage, fedavg, cse_fsl]\n"
                    "  - algorithm: [fedavg]\n    client_lr: [0.02]\n")
    points = {p.name: p.config for p in load_sweep(spec, [], {}).points}
    assert (points["algorithm=fsl_sage"].client_lr, points["algorithm=fsl_sage"].server_lr) \
        == (0.0001, 0.0006)
    assert points["algorithm=fedavg"].client_lr == 0.0005
    default = build_config({"algorithm": "cse_fsl"})
    assert (points["algorithm=cse_fsl"].client_lr, points["algorithm=cse_fsl"].server_lr) \
        == (default.client_lr, default.server_lr)
    assert points["algorithm=fedavg__client_lr=0.02"].client_lr == 0.02   # the grid wins
    # ... and a flag wins over the spec, its per-algorithm fields included.
    flagged = {p.name: p.config for p in load_sweep(spec, [], {"client_lr": 0.3}).points}
    assert {c.client_lr for n, c in flagged.items() if "0.02" not in n} == {0.3}
    assert flagged["algorithm=fsl_sage"].server_lr == 0.0006


def _finished_search(root, algorithm, best_values):
    """A search folder as `raysage tune` leaves it: tuning.yaml says what it searched,
    best.yaml is its whole best config."""
    import yaml

    from raysage.studies.tune import Tuning, claim_folder, parse_objective, parse_space

    base = {"algorithm": algorithm, "clients": 9, "rounds": 5, "backend": "serial"}
    claim_folder(Tuning(str(root), base, [parse_space(f"{name}=loguniform:1e-4:1e-1")
                                          for name in best_values],
                        parse_objective("final_accuracy"), 6))
    (root / "best.yaml").write_text(yaml.safe_dump(base | best_values, sort_keys=False))
    return root


def test_per_algorithm_takes_a_searchs_best_values_from_its_folder(tmp_path):
    search = _finished_search(tmp_path / "tune-fedavg", "fedavg", {"client_lr": 0.00123})
    spec = tmp_path / "tuned.yaml"
    spec.write_text(f"clients: 4\nrounds: 2\nbackend: serial\n"
                    f"per_algorithm:\n  fedavg: {search}\n"
                    "grid:\n  - algorithm: [fsl_sage, fedavg]\n")
    points = {p.name: p.config for p in load_sweep(spec, [], {}).points}
    # only the searched field: the search's own clients and rounds do not come along
    assert (points["algorithm=fedavg"].client_lr, points["algorithm=fedavg"].clients,
            points["algorithm=fedavg"].rounds) == (0.00123, 4, 2)
    assert points["algorithm=fsl_sage"].client_lr == build_config({}).client_lr
    flagged = {p.name: p.config for p in load_sweep(spec, [], {"client_lr": 0.3}).points}
    assert flagged["algorithm=fedavg"].client_lr == 0.3       # a flag still wins


def test_a_search_folder_that_cannot_give_tuned_values_is_one_line(tmp_path):
    def refused(per_algorithm, words):
        with pytest.raises(ConfigError, match=words) as caught:
            build_sweep(TINY, [{"algorithm": ["fedavg"]}], str(tmp_path / "out"),
                        per_algorithm=per_algorithm)
        assert "\n" not in str(caught.value)

    refused({"fedavg": str(tmp_path / "nowhere")},
            "nowhere does not exist: run fedavg's raysage tune search with --out")
    refused({"fedavg": str(tmp_path)}, r"is not a raysage tune folder \(no tuning.yaml\)")
    search = _finished_search(tmp_path / "tune-sl", "sl", {"client_lr": 0.01})
    refused({"fedavg": str(search)}, "is a search for sl, not fedavg")
    (search / "best.yaml").unlink()
    refused({"sl": str(search)}, "has no best.yaml: no trial of its search ran every round")
    assert not (tmp_path / "out").exists()


def test_bad_per_algorithm_blocks_fail_with_one_line(tmp_path):
    with pytest.raises(ConfigError, match="per_algorithm: .*'fedavgg' is not an algorithm"):
        build_sweep(TINY, [{"algorithm": ["fedavg"]}], str(tmp_path),
                    per_algorithm={"fedavgg": {"client_lr": 0.1}})
    with pytest.raises(ConfigError, match="per_algorithm is a mapping"):
        build_sweep(TINY, [{"algorithm": ["fedavg"]}], str(tmp_path),
                    per_algorithm={"fedavg": 0.1})
    with pytest.raises(ConfigError, match="point algorithm=fedavg: .*client_lr"):
        build_sweep(TINY, [{"algorithm": ["fedavg"]}], str(tmp_path),
                    per_algorithm={"fedavg": {"client_lr": -1}})
    assert not any(tmp_path.iterdir())


def test_tunes_advice_after_ctrl_c_is_silenced_and_its_other_warnings_are_not(caplog):
    """After Ctrl-C Tune warns, one line per trial that had not started, that it
    cannot read their metrics, and advises Tuner.restore: a sweep prints its own
    one-line summary, which says to re-run the same command, instead."""
    import logging

    from ray.tune import tune as tune_module
    from ray.tune.analysis import experiment_analysis

    with caplog.at_level(logging.WARNING), quiet_tune():
        experiment_analysis.logger.warning("Failed to fetch metrics for 3 trial(s)")
        tune_module.logger.warning("Stop signal received (e.g. via SIGINT/Ctrl+C)")
        tune_module.logger.warning("Experiment has been interrupted, but ...Tuner.restore")
        tune_module.logger.warning("a trial cannot be scheduled")
    experiment_analysis.logger.warning("Failed to fetch metrics outside a sweep")
    assert [r.getMessage() for r in caplog.records] == [
        "a trial cannot be scheduled", "Failed to fetch metrics outside a sweep"]


def test_every_experiment_spec_expands_into_valid_points(tmp_path, monkeypatch):
    """The specs in experiments/ are what users run first: each one validates, and the
    points a spec names per algorithm get that algorithm's searched rates."""
    from pathlib import Path

    from raysage.algorithms import ALGORITHMS

    # (06's full.yaml needs GPT-2's pretrained weights and tokenizer files)
    specs = sorted(p for p in (Path(__file__).resolve().parents[1] / "experiments").glob(
        "*/*.yaml") if p.parts[-2:] != ("06_gpt2_e2e", "full.yaml"))
    assert len(specs) >= 10
    monkeypatch.chdir(tmp_path)       # searches named by a spec live under runs/ here
    for i, name in enumerate(sorted(ALGORITHMS)):
        _finished_search(tmp_path / "runs" / "cifar-tune" / f"tune-{name}", name,
                         {"client_lr": 1e-4 * (i + 1), "server_lr": 2e-4 * (i + 1)})
    for spec in specs:
        # (full-scale specs leave the data's place to the command line)
        sweep = load_sweep(spec, [], {"data_dir": str(tmp_path)})
        assert sweep.points, spec
    reference = {p.name: p.config for p in load_sweep(specs[1], [], {}).points}
    assert specs[1].name == "reference.yaml" and len(reference) == 24
    sl = reference["algorithm=sl__seed=201"]
    index = sorted(ALGORITHMS).index("sl")
    assert (sl.client_lr, sl.server_lr, sl.rounds) == (1e-4 * (index + 1),
                                                         2e-4 * (index + 1), 40)
