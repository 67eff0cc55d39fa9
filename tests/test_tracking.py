"""Tracking: what a run sends to TensorBoard and MLflow, read back with their own readers."""

from __future__ import annotations

import math

import numpy as np
import pyarrow.parquet as pq
import pytest

from raysage.config import build_config
from raysage.engine.orchestrator import simulate
from raysage.errors import ConfigError

TINY = {"clients": 2, "samples_per_client": 20, "test_samples": 50, "rounds": 3,
        "batch_size": 10, "align_epochs": 2, "backend": "serial"}


def _rounds(folder) -> list[dict]:
    return pq.read_table(f"{folder}/rounds.parquet").to_pylist()


def test_tensorboard_holds_every_round_of_every_column(tmp_path):
    event_accumulator = pytest.importorskip(
        "tensorboard.backend.event_processing.event_accumulator")
    out = tmp_path / "run"
    simulate(build_config(TINY | {"tracking": "tensorboard", "out": str(out)}),
             announce=lambda line: None)
    events = event_accumulator.EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    scalars = set(events.Tags()["scalars"])
    rows = _rounds(out)
    assert {"accuracy", "train_loss", "total_bytes", "sim_time", "nmse_before"} <= scalars
    for name in ("train_loss", "total_bytes", "accuracy"):
        logged = [(e.step, e.value) for e in events.Scalars(name)]
        expected = [(r["round"], r[name]) for r in rows if not math.isnan(r[name])]
        assert [s for s, _ in logged] == [s for s, _ in expected]
        assert [v for _, v in logged] == pytest.approx([v for _, v in expected], rel=1e-6)
    assert "config" in events.Tags()["tensors"] or "config/text_summary" in events.Tags()["tensors"]


def test_mlflow_lists_the_run_its_parameters_metrics_and_summary(tmp_path, monkeypatch):
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    # MLflow's own default store, a SQLite file, and its artifacts (./mlruns) in the
    # test's folder
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    out = tmp_path / "run"
    simulate(build_config(TINY | {"tracking": "mlflow", "out": str(out), "client_lr": 0.02}),
             announce=lambda line: None)
    client = MlflowClient()
    experiment = client.get_experiment_by_name("raysage")
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.run_name == "run" and run.info.status == "FINISHED"
    assert run.data.params["client_lr"] == "0.02" and run.data.params["clients"] == "2"
    rows = _rounds(out)
    history = client.get_metric_history(run.info.run_id, "train_loss")
    assert [(m.step, m.value) for m in history] == [(r["round"], r["train_loss"]) for r in rows]
    assert [m.step for m in client.get_metric_history(run.info.run_id, "total_bytes")] == \
        [0, 1, 2]
    names = {f.path for f in client.list_artifacts(run.info.run_id)}
    assert {"summary.json", "config.yaml"} <= names


def test_tracking_changes_no_result_and_a_missing_library_is_one_line(tmp_path, monkeypatch):
    import builtins

    plain = simulate(build_config(TINY | {"out": str(tmp_path / "plain")}),
                     announce=lambda line: None)
    tracked = simulate(build_config(TINY | {"out": str(tmp_path / "tracked"),
                                            "tracking": "tensorboard"}),
                       announce=lambda line: None)
    keep = ("accuracy", "train_loss", "total_bytes", "sim_time", "nmse_after")
    np.testing.assert_array_equal([[r[k] for k in keep] for r in _rounds(plain.run_dir)],
                                  [[r[k] for k in keep] for r in _rounds(tracked.run_dir)])

    real_import = builtins.__import__

    def without_mlflow(name, *args, **kwargs):
        if name == "mlflow" or name.startswith("mlflow."):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", without_mlflow)
    out = tmp_path / "refused"
    with pytest.raises(ConfigError, match=r"tracking = mlflow needs the mlflow package; "
                                          r"pip install 'raysage\[mlflow\]'"):
        simulate(build_config(TINY | {"out": str(out), "tracking": "mlflow"}),
                 announce=lambda line: None)
    assert not out.exists()       # refused before the folder is made
    with pytest.raises(ConfigError, match="tracking"):
        build_config(TINY | {"tracking": "wandb"})


def test_a_sweep_is_one_mlflow_experiment_with_a_run_per_point(tmp_path, monkeypatch,
                                                               ray_session):
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    from raysage.studies.sweep import build_sweep, run_sweep

    # Set here only: the trials, in Ray's worker processes, get the store from the sweep
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.chdir(tmp_path)       # MLflow's artifacts go to ./mlruns; trials start here
    sweep = build_sweep(TINY | {"tracking": "mlflow", "rounds": 2},
                        [{"client_lr": [0.01, 0.05]}], str(tmp_path / "lr-grid"))
    assert [o.status for o in run_sweep(sweep)] == ["finished", "finished"]
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("lr-grid")
    runs = client.search_runs([experiment.experiment_id])
    assert sorted(r.info.run_name for r in runs) == ["client_lr=0.01", "client_lr=0.05"]
    for run in runs:
        rows = _rounds(tmp_path / "lr-grid" / run.info.run_name)
        assert run.data.params["client_lr"] == run.info.run_name.split("=")[1]
        assert [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, "sim_time")
                ] == [(r["round"], r["sim_time"]) for r in rows]


def test_a_search_is_one_mlflow_experiment_too(tmp_path, monkeypatch, ray_session):
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    from raysage.studies.tune import Tuning, parse_objective, parse_space, run_tuning

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.chdir(tmp_path)
    scores = run_tuning(Tuning(str(tmp_path / "search"), TINY | {"tracking": "mlflow",
                                                                 "rounds": 2},
                               [parse_space("client_lr=grid:0.01,0.02")],
                               parse_objective("final_accuracy"), samples=1, asha=False))
    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("search").experiment_id])
    assert sorted(r.info.run_name for r in runs) == sorted(
        s.folder.rsplit("/", 1)[-1] for s in scores)
    assert all(r.data.params["client_lr"] in ("0.01", "0.02") for r in runs)


def test_a_reports_figures_go_to_the_sweeps_experiment_and_to_tensorboard(tmp_path,
                                                                          monkeypatch):
    pytest.importorskip("mlflow")
    event_accumulator = pytest.importorskip(
        "tensorboard.backend.event_processing.event_accumulator")
    from mlflow.tracking import MlflowClient
    from typer.testing import CliRunner

    from raysage.cli import app

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.chdir(tmp_path)
    for seed in (1, 2):
        simulate(build_config(TINY | {"seed": seed, "out": str(tmp_path / "seeds" / f"s{seed}")}),
                 announce=lambda line: None)
    runner = CliRunner()
    result = runner.invoke(app, ["report", str(tmp_path / "seeds"), "--out",
                                 str(tmp_path / "rep"), "--tracking", "mlflow"])
    assert result.exit_code == 0, result.output
    client = MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("seeds").experiment_id])
    names = {f.path for f in client.list_artifacts(run.info.run_id)}
    assert "report.md" in names and "accuracy_vs_round.png" in names
    result = runner.invoke(app, ["report", str(tmp_path / "seeds"), "--out",
                                 str(tmp_path / "rep"), "--tracking", "tensorboard"])
    assert result.exit_code == 0, result.output
    events = event_accumulator.EventAccumulator(str(tmp_path / "rep" / "tensorboard"))
    events.Reload()
    assert "accuracy_vs_round" in events.Tags()["images"]
    result = runner.invoke(app, ["report", str(tmp_path / "seeds"), "--tracking", "wandb"])
    assert result.exit_code == 2 and "--tracking 'wandb' is not one of" in result.output


def test_a_resumed_run_goes_on_in_the_mlflow_run_it_started(tmp_path, monkeypatch):
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "run"

    class Stop(Exception):
        pass

    def stop_after_round_1(row):
        if row["round"] == 1:
            raise Stop

    cfg = build_config(TINY | {"tracking": "mlflow", "out": str(out), "checkpoint_every": 1})
    with pytest.raises(Stop):
        simulate(cfg, on_round=stop_after_round_1, announce=lambda line: None)
    client = MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("raysage").experiment_id])
    assert run.info.status == "FAILED"
    simulate(cfg, resume=str(out), changes={"rounds": 4}, announce=lambda line: None)
    (run,) = client.search_runs([client.get_experiment_by_name("raysage").experiment_id])
    assert run.info.status == "FINISHED" and run.data.params["rounds"] == "3"
    rows = _rounds(out)
    history = client.get_metric_history(run.info.run_id, "train_loss")
    # round 1 ran twice (its checkpoint came after the stop), the same both times
    assert sorted(set((m.step, m.value) for m in history)) == [
        (r["round"], r["train_loss"]) for r in rows]
    assert len(rows) == 4
