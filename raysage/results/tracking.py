"""Follow a run in TensorBoard or MLflow while it trains.

A tracker gets the run's config as parameters, every numeric column of every
round row as a metric whose step is the round, and at the end the run's
summary and config as artifacts. Nothing leaves the machine unless the user
points MLflow elsewhere (``MLFLOW_TRACKING_URI``): TensorBoard's event files
go into the run folder (``<out>/tensorboard``), MLflow's runs into its own
default store, in experiment ``raysage`` or the sweep's name.

Trackers observe; they never change what a run computes (``tracking`` is an
execution field).
"""

from __future__ import annotations

import math
import numbers
import os
import time
from dataclasses import dataclass
from typing import Any

from ..errors import ConfigError

TRACKERS = ("none", "tensorboard", "mlflow")
# The extra that installs each tracker's library.
EXTRAS = {"tensorboard": ("tensorboardX", "raysage[tensorboard]"),
          "mlflow": ("mlflow", "raysage[mlflow]")}


@dataclass(frozen=True)
class Experiment:
    """What a run is filed under: an experiment's name and, for MLflow, its store
    (None: MLFLOW_TRACKING_URI or MLflow's default). A sweep files its points under
    its own name, in the store its driver sees."""
    name: str = "raysage"
    uri: str | None = None


def mlflow_uri() -> str:
    import mlflow

    return mlflow.get_tracking_uri()


def metrics_of(row: dict[str, Any]) -> dict[str, float]:
    """The round row's numbers; a round that was not evaluated has no accuracy."""
    return {k: float(v) for k, v in row.items()
            if k != "round" and isinstance(v, numbers.Real) and not isinstance(v, bool)
            and math.isfinite(v)}


def parameters_of(config: dict[str, Any]) -> dict[str, str]:
    return {k: "" if v is None else str(v) for k, v in config.items()}


def _library(kind: str):
    module, extra = EXTRAS[kind]
    try:
        return __import__(module)
    except ImportError:
        raise ConfigError(f"tracking = {kind} needs the {module} package; pip install "
                          f"'{extra}' or run without --tracking") from None


def check_tracking(kind: str) -> None:
    """Fail in one line, before a run starts, when the tracker's library is missing."""
    if kind != "none":
        _library(kind)


class TensorBoardTracker:
    def __init__(self, config: dict[str, Any], folder: str):
        from tensorboardX import SummaryWriter

        self.config = config
        logdir = os.path.join(folder, "tensorboard")
        self.where = f"TensorBoard: tensorboard --logdir {logdir}"
        self.writer = SummaryWriter(logdir=logdir)
        self.writer.add_text("config", "\n".join(f"    {k}: {v}" for k, v in config.items()))

    def log_round(self, row: dict[str, Any]) -> None:
        for name, value in metrics_of(row).items():
            self.writer.add_scalar(name, value, global_step=row["round"])
        self.writer.flush()

    def finish(self, summary: dict[str, Any], files: dict[str, bytes]) -> None:
        self.writer.add_hparams(parameters_of(self.config), metrics_of(summary),
                                name="summary")
        self.writer.close()

    def fail(self) -> None:
        self.writer.close()


class MLflowTracker:
    def __init__(self, config: dict[str, Any], name: str, experiment: Experiment):
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        # The client, not mlflow's process-wide active run: a process may run
        # several simulations at once (a notebook, the tests).
        self.client = MlflowClient(experiment.uri)
        found = self.client.get_experiment_by_name(experiment.name)
        experiment_id = (found.experiment_id if found is not None
                         else self.client.create_experiment(experiment.name))
        self.run_id = self.client.create_run(experiment_id, run_name=name).info.run_id
        self.where = (f"MLflow: experiment {experiment.name}, run {name} "
                      f"({self.client.tracking_uri})")
        params = [Param(k, v) for k, v in parameters_of(config).items()]
        for i in range(0, len(params), 100):   # MLflow takes at most 100 per batch
            self.client.log_batch(self.run_id, params=params[i:i + 100])

    def log_round(self, row: dict[str, Any]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[
            Metric(k, v, now, row["round"]) for k, v in metrics_of(row).items()])

    def finish(self, summary: dict[str, Any], files: dict[str, bytes]) -> None:
        self.client.log_dict(self.run_id, summary, "summary.json")
        for name, data in files.items():
            self.client.log_text(self.run_id, data.decode(), name)
        self.client.set_terminated(self.run_id)

    def fail(self) -> None:
        self.client.set_terminated(self.run_id, status="FAILED")


def tracked(tracker, on_round):
    """``on_round`` that tells the tracker first."""
    def both(row: dict[str, Any]) -> None:
        tracker.log_round(row)
        if on_round is not None:
            on_round(row)
    return both


def open_tracker(kind: str, config: dict[str, Any], folder: str, name: str,
                 experiment: Experiment | None = None):
    """The tracker a run's ``tracking`` names, or None."""
    if kind == "none":
        return None
    _library(kind)
    if kind == "tensorboard":
        if "://" in folder:
            raise ConfigError(f"tracking = tensorboard writes into the run folder, and {folder} "
                              "is not local; give a local --out or use --tracking mlflow")
        return TensorBoardTracker(config, folder)
    return MLflowTracker(config, name, experiment or Experiment())


def track_report(kind: str, folder: str, figures: list[str], experiment: Experiment) -> str:
    """A report's figures and report.md, as artifacts of a run named ``report`` in the
    experiment (MLflow) or as images under ``<folder>/tensorboard`` (TensorBoard).
    Returns where they went."""
    _library(kind)
    if kind == "mlflow":
        from mlflow.tracking import MlflowClient

        client = MlflowClient(experiment.uri)
        found = client.get_experiment_by_name(experiment.name)
        experiment_id = (found.experiment_id if found is not None
                         else client.create_experiment(experiment.name))
        run_id = client.create_run(experiment_id, run_name="report").info.run_id
        for name in ["report.md", *figures]:
            client.log_artifact(run_id, os.path.join(folder, name))
        client.set_terminated(run_id)
        return f"MLflow: experiment {experiment.name}, run report ({client.tracking_uri})"
    from matplotlib.image import imread
    from tensorboardX import SummaryWriter

    logdir = os.path.join(folder, "tensorboard")
    with SummaryWriter(logdir=logdir) as writer:
        with open(os.path.join(folder, "report.md")) as f:
            writer.add_text("report", f.read())
        for name in figures:
            image = imread(os.path.join(folder, name))
            writer.add_image(os.path.splitext(name)[0], image, dataformats="HWC")
    return f"TensorBoard: tensorboard --logdir {logdir}"
