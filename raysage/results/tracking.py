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

import json
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


# In the run folder: which MLflow run a resumed run goes on in.
MLFLOW_RUN_FILE = "mlflow_run.json"


class MLflowTracker:
    def __init__(self, config: dict[str, Any], name: str, experiment: Experiment, folder):
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        # The client, not mlflow's process-wide active run: a process may run
        # several simulations at once (a notebook, the tests).
        self.client = MlflowClient(experiment.uri)
        found = self.client.get_experiment_by_name(experiment.name)
        experiment_id = (found.experiment_id if found is not None
                         else self.client.create_experiment(experiment.name))
        self.run_id = self._resumed(folder, experiment_id)
        logged: dict[str, str] = {}
        if self.run_id is None:
            self.run_id = self.client.create_run(experiment_id, run_name=name).info.run_id
            folder.write_bytes(MLFLOW_RUN_FILE, json.dumps(
                {"run_id": self.run_id, "experiment_id": experiment_id,
                 "tracking_uri": self.client.tracking_uri}).encode())
        else:
            logged = self.client.get_run(self.run_id).data.params
            self.client.update_run(self.run_id, status="RUNNING")
        self.where = (f"MLflow: experiment {experiment.name}, run {name} "
                      f"({self.client.tracking_uri})")
        # A resume keeps the parameters the run started with (MLflow refuses to change
        # one); what a resume may change (rounds, layout) is in the run's config.yaml.
        params = [Param(k, v) for k, v in parameters_of(config).items() if k not in logged]
        for i in range(0, len(params), 100):   # MLflow takes at most 100 per batch
            self.client.log_batch(self.run_id, params=params[i:i + 100])

    def _resumed(self, folder, experiment_id: str) -> str | None:
        """The MLflow run this run folder's earlier part went to, if it is in this store
        and experiment."""
        if not folder.exists(MLFLOW_RUN_FILE):
            return None
        saved = json.loads(folder.read_bytes(MLFLOW_RUN_FILE))
        if (saved.get("tracking_uri") != self.client.tracking_uri
                or saved.get("experiment_id") != experiment_id):
            return None
        try:
            return self.client.get_run(saved["run_id"]).info.run_id
        except Exception:     # deleted from the store since: start a new one
            return None

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


def open_tracker(kind: str, config: dict[str, Any], folder, name: str,
                 experiment: Experiment | None = None):
    """The tracker a run's ``tracking`` names, or None; ``folder`` is the RunFolder. A
    resumed run goes on in the MLflow run (or TensorBoard folder) it started."""
    if kind == "none":
        return None
    _library(kind)
    if kind == "tensorboard":
        if not folder.is_local:
            raise ConfigError(f"tracking = tensorboard writes into the run folder, and {folder} "
                              "is not local; give a local --out or use --tracking mlflow")
        return TensorBoardTracker(config, folder.location)
    return MLflowTracker(config, name, experiment or Experiment(), folder)


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
