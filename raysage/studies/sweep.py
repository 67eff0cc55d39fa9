"""Sweeps: a grid of config points, one run folder per point.

A sweep spec is a base config plus one or more grids (field -> list of
values); each grid expands to its Cartesian product and the sweep is the
union of them, so a study can pair, say, ``partition: iid`` with one grid
and ``partition: dirichlet`` with every alpha in another. Every point's
folder is ``<root>/<field>=<value>__...`` and the folder is the point's
whole state: a re-run skips a finished point (``summary.json`` present),
continues an interrupted one from its checkpoint, and starts the rest.

Points run as Ray Tune trials, one per point, each reserving its run's
server and workers as one placement group: trials pack on a laptop and spread
over a cluster, and Tune's folder (``<root>/.tune``) holds its logs of every
trial. What a point has done lives in its own folder, not in Tune's state,
so a sweep stopped in any way is continued by running it again.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from ray.tune import Callback

from ..algorithms import algorithm_class
from ..config import (EXECUTION_FIELDS, FIELDS, Config, build_config, parameter_fields,
                      parse_yaml, read_yaml, shown)
from ..errors import ConfigError, RaysageError

# Fields that change how a run executes, not what it computes (results are
# identical across them), so a finished point still counts when they change.
# What a run writes into its folder; only these are removed when an
# interrupted point without a checkpoint starts over.
RUN_FILES = ("config.yaml", "run.parquet", "rounds.parquet", "clients.parquet",
             "checkpoint.json", "state", "summary.json", "tensorboard", "mlflow_run.json")


@dataclass(frozen=True)
class SweepPoint:
    name: str
    values: dict[str, Any]   # this point's grid values, in grid order
    config: Config           # the full config; ``out`` is the point's folder


@dataclass
class Sweep:
    root: str
    points: list[SweepPoint]
    parallel: int | None = None   # None: as many as the cluster has room for


def parse_grid_flag(text: str) -> tuple[str, list[Any]]:
    """``alpha=0.1,1,10`` -> ('alpha', [0.1, 1, 10]); values parsed as YAML scalars."""
    name, sep, values = text.partition("=")
    name = name.strip().replace("-", "_")
    if not sep or not name or not values.strip():
        raise ConfigError(f"--grid {shown(text)} is not FIELD=V1,V2,...; e.g. --grid "
                          "alpha=0.1,1,10")
    return name, [parse_yaml(v.strip(), f"--grid {name}") for v in values.split(",")]


def _algorithms(base: dict[str, Any], grids: list[dict[str, Any]]) -> list[type]:
    """The classes of every algorithm the sweep names (built-in or a user's)."""
    from ..algorithms import ALGORITHMS

    names = {base.get("algorithm", FIELDS["algorithm"].default)}
    for grid in grids:
        if isinstance(grid, dict):
            values = grid.get("algorithm", [])
            names.update(map(str, values if isinstance(values, list) else [values]))
    return list(ALGORITHMS.values()) + [algorithm_class(n) for n in sorted(names)
                                        if n not in ALGORITHMS]


def _check_grid(grid: Any, where: str, params: set[str]) -> dict[str, list[Any]]:
    if not isinstance(grid, dict) or not grid:
        raise ConfigError(f"{where}: a grid is a mapping of config field -> list of values, "
                          f"got {shown(grid)}")
    checked = {}
    for name, values in grid.items():
        key = str(name).replace("-", "_")
        if key not in FIELDS and key not in params:
            raise ConfigError(f"{where}: unknown config field '{name}' in the grid; known "
                              "fields: " + ", ".join([*FIELDS, *sorted(params)]))
        if key == "out":
            raise ConfigError(f"{where}: 'out' cannot vary in a grid; the sweep names each "
                              "point's folder under its own out")
        values = values if isinstance(values, list) else [values]
        if not values:
            raise ConfigError(f"{where}: grid field '{name}' has no values")
        checked[key] = values
    return checked


def point_name(values: dict[str, Any]) -> str:
    """A folder name that says what the point is: ``algorithm=fsl_sage__alpha=0.1``."""
    parts = []
    for name, value in values.items():
        text = re.sub(r"[^A-Za-z0-9._+-]", "-", str(value))
        parts.append(f"{name}={text}")
    return "__".join(parts) or "base"


def _check_per_algorithm(per_algorithm: Any, where: str) -> dict[str, dict[str, Any]]:
    """Each algorithm's own fields: a mapping, or the folder of a ``raysage tune`` search
    for it, whose best values of the fields it searched apply (no copying by hand)."""
    if per_algorithm is None:
        return {}
    if not isinstance(per_algorithm, dict) or not all(
            isinstance(v, (dict, str)) for v in per_algorithm.values()):
        raise ConfigError(f"{where}: per_algorithm is a mapping of algorithm -> fields or "
                          "-> the folder of its raysage tune search, e.g. "
                          "per_algorithm: {fedavg: {client_lr: 5.2e-4}, sl: runs/tune-sl}; got "
                          f"{shown(per_algorithm)}")
    from .tune import tuned_fields

    for name in per_algorithm:
        algorithm_class(name)   # an unknown name fails here, with the known ones
    return {name: {k.replace("-", "_"): v for k, v in
                   (tuned_fields(fields, name) if isinstance(fields, str) else fields).items()}
            for name, fields in per_algorithm.items()}


def build_sweep(base: dict[str, Any], grids: list[dict[str, list[Any]]],
                root: str | None, parallel: int | None = None, where: str = "sweep",
                per_algorithm: dict[str, dict[str, Any]] | None = None) -> Sweep:
    """Expand and validate every point up front: a bad value fails before anything runs.

    ``per_algorithm`` holds fields that apply to one algorithm's points only (its
    tuned learning rates, say); a grid value of the same field wins over them.
    """
    base = {k.replace("-", "_"): v for k, v in base.items()}
    try:
        per_algorithm = _check_per_algorithm(per_algorithm, where)
    except ConfigError as exc:
        raise ConfigError(f"{where}: per_algorithm: {exc}") from None
    root = root if root is not None else base.get("out")
    if not root:
        raise ConfigError(f"{where}: no folder for the sweep; give --out DIR (a re-run with the "
                          "same --out skips finished points)")
    base.pop("out", None)
    if parallel is not None and (not isinstance(parallel, int) or parallel < 1):
        raise ConfigError(f"{where}: parallel = {shown(parallel)} must be an integer >= 1")
    try:
        algorithms = _algorithms(base, grids)
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}") from None
    params = set(parameter_fields(algorithms))
    grids = [_check_grid(g, where, params) for g in grids] or [{}]
    points: dict[str, SweepPoint] = {}
    for grid in grids:
        names = list(grid)
        for combo in itertools.product(*(grid[n] for n in names)):
            values = dict(zip(names, combo))
            name = point_name(values)
            try:
                name_of = {**base, **values}.get("algorithm", FIELDS["algorithm"].default)
                fields = {**base, **per_algorithm.get(name_of, {}), **values}
                own = algorithm_class(name_of)
                # Another algorithm's parameters do not apply to this point.
                fields = {k: v for k, v in fields.items()
                          if k in FIELDS or k in own.Params.model_fields or k not in params}
                cfg = build_config(fields, {"out": f"{str(root).rstrip('/')}/{name}"})
            except ConfigError as exc:
                raise ConfigError(f"{where}, point {name}: {exc}") from None
            known = points.get(name)
            if known is not None and known.config != cfg:
                raise ConfigError(f"{where}: two grids give different configs the same folder "
                                  f"name {name}; vary the same fields in both grids")
            points[name] = SweepPoint(name, values, cfg)
    return Sweep(str(root), list(points.values()), parallel)


def load_sweep(spec: str | Path | None, grid_flags: list[str], overrides: dict[str, Any],
               parallel: int | None = None) -> Sweep:
    """A sweep from a YAML spec (config fields + ``grid`` + ``per_algorithm`` +
    ``parallel``) and/or flags.

    ``--grid`` flags add their fields to every grid of the spec (or make the
    only grid); config flags override the spec's base values.
    """
    values: dict[str, Any] = {}
    where = "sweep"
    if spec is not None:
        where = str(spec)
        values = read_yaml(spec)
    grid_spec = values.pop("grid", None)
    spec_parallel = values.pop("parallel", None)
    per_algorithm = values.pop("per_algorithm", None)
    grids = grid_spec if isinstance(grid_spec, list) else [grid_spec] if grid_spec else []
    from_flags = dict(parse_grid_flag(flag) for flag in grid_flags)
    if from_flags:
        grids = [{**g, **from_flags} for g in grids] if grids else [from_flags]
    flags = {k: v for k, v in overrides.items() if v is not None}
    base = {**values, **flags}
    if per_algorithm is not None:
        try:
            per_algorithm = _check_per_algorithm(per_algorithm, where)
        except ConfigError as exc:
            raise ConfigError(f"{where}: per_algorithm: {exc}") from None
        # A flag on the command line wins over the spec, its per-algorithm fields too.
        per_algorithm = {name: {k: v for k, v in fields.items() if k not in flags}
                         for name, fields in per_algorithm.items()}
    root = base.get("out")
    if root is None and spec is not None:
        root = str(Path("runs") / Path(spec).stem)
    return build_sweep(base, grids, root, parallel if parallel is not None else spec_parallel,
                       where, per_algorithm)


# --- the state of a point's folder -------------------------------------------------------

def _scientific(cfg: Config) -> dict[str, Any]:
    return {k: v for k, v in cfg.to_dict().items() if k not in EXECUTION_FIELDS}


def first_difference(saved: dict[str, Any], wanted: dict[str, Any]) -> str | None:
    """The first field whose wanted value a folder's saved record does not have."""
    return next((k for k in wanted if saved.get(k) != wanted[k]), None)


def point_status(point: SweepPoint) -> str:
    """'done', 'resume' (has a checkpoint), 'restart' (interrupted before one) or 'new'.

    A folder that holds a run of a different config is an error: the sweep
    would otherwise report results that do not belong to the point.
    """
    from ..engine.orchestrator import resume_config
    from ..results import RunFolder

    folder = RunFolder(point.config.out)
    if not folder.is_nonempty():
        return "new"
    if folder.exists("config.yaml"):
        saved = resume_config(point.config.out)
        theirs, ours = _scientific(saved), _scientific(point.config)
        k = first_difference(theirs, ours)
        if k is not None:
            raise ConfigError(f"{folder} holds a run with {k} = {shown(theirs.get(k))}, but this "
                              f"sweep's point has {k} = {shown(ours[k])}; remove the folder or "
                              "give the sweep another --out")
    if folder.exists("summary.json"):
        return "done"
    if folder.exists("checkpoint.json"):
        return "resume"
    return "restart"


def clear_point(point: SweepPoint) -> None:
    """Remove an interrupted point's files so that it can start over; refuse
    if the folder holds anything raysage did not write."""
    from ..results import RunFolder

    folder = RunFolder(point.config.out)
    names = folder.names()
    foreign = [n for n in names if n not in RUN_FILES and not n.startswith(".")]
    if foreign:
        raise ConfigError(f"{folder} is not a finished run and holds files raysage did not "
                          f"write ({', '.join(sorted(foreign))}); move them away or remove it")
    folder.delete_all()


# --- running: one Ray Tune trial per point ---------------------------------------------

@dataclass
class PointOutcome:
    point: SweepPoint
    status: str               # 'skipped', 'finished', 'failed' or 'interrupted'
    summary: dict[str, Any] = field(default_factory=dict)
    error: str = ""


def run_sweep(sweep: Sweep, *,
              on_event: Callable[[str, SweepPoint, dict[str, Any]], None] | None = None,
              announce: Callable[[str], None] | None = None,
              run_point: Callable[..., Any] | None = None) -> list[PointOutcome]:
    """Run every point not yet finished; returns one outcome per point, in sweep order.

    ``on_event(kind, point, info)`` is called on this process with kind 'skip',
    'start', 'round' (info: the round row), 'finish' (info: summary) or 'fail'
    (info: {'error': line}). ``run_point`` replaces ``simulate`` in the trials
    (tests); it travels to them, so it must pickle.
    """
    on_event = on_event or (lambda kind, point, info: None)
    statuses = {p.name: point_status(p) for p in sweep.points}  # before anything starts
    outcomes: dict[str, PointOutcome] = {}
    todo = []
    for point in sweep.points:
        if statuses[point.name] == "done":
            outcomes[point.name] = PointOutcome(point, "skipped")
            on_event("skip", point, {})
        else:
            todo.append(point)
    if todo:
        outcomes.update(_run_trials(sweep, todo, statuses, on_event, run_point))
    return [outcomes.get(p.name) or PointOutcome(p, "interrupted") for p in sweep.points]


def _run_trials(sweep: Sweep, todo: list[SweepPoint], statuses: dict[str, str],
                on_event, run_point) -> dict[str, PointOutcome]:
    import ray
    from ray import tune

    from ..engine.backend import RayBackend, trial_bundles

    was_running = ray.is_initialized()
    backend = RayBackend(todo[0].config.replace(backend="ray"))
    try:
        cluster = backend.describe()
        bundles = {}
        for point in todo:
            try:
                bundles[point.name] = trial_bundles(point.config, backend.node_resources,
                                                    cluster)
            except RaysageError as exc:
                raise RaysageError(f"point {point.name}: {exc}") from None
        points = {p.name: (p, statuses[p.name]) for p in todo}
        trainable = tune.with_resources(
            tune.with_parameters(_trial, points=points, run_point=run_point,
                                 cwd=os.getcwd(),
                                 experiment=experiment_of(sweep.root, {p.config.tracking
                                                                       for p in todo})),
            # Soft SPREAD: a run's workers on as many nodes as have room, as simulate
            # places them.
            lambda config: tune.PlacementGroupFactory(bundles[config["point"]],
                                                      strategy="SPREAD"))
        events = _Events(points, on_event)
        tuner = tune.Tuner(
            trainable,
            param_space={"point": tune.grid_search([p.name for p in todo])},
            tune_config=tune.TuneConfig(max_concurrent_trials=sweep.parallel or 0,
                                        trial_name_creator=_point_of,
                                        trial_dirname_creator=_point_of),
            run_config=tune.RunConfig(name="sweep", storage_path=tune_folder(sweep.root),
                                      callbacks=[events], verbose=0))
        with quiet_tune():
            tuner.fit()
        return events.outcomes
    finally:
        if not was_running and backend.started_here:
            ray.shutdown()


def tune_folder(root: str) -> str:
    """Where Tune keeps a sweep's experiment: beside its points, under a name no point
    folder can have."""
    folder = root.rstrip("/") + "/.tune"
    return folder if "://" in folder else os.path.abspath(folder)


def _point_of(trial) -> str:
    return trial.config["point"]


def experiment_of(root: str, kinds: set[str]):
    """A sweep (or a search) is one experiment, named after its folder, in the MLflow
    store this process sees (its trials' processes may not have its environment)."""
    from ..results.tracking import Experiment, check_tracking, mlflow_uri

    for kind in kinds:
        check_tracking(kind)
    name = root.rstrip("/").rsplit("/", 1)[-1] or "raysage"
    return Experiment(name, mlflow_uri() if "mlflow" in kinds else None)


def _trial(config: dict[str, Any], points: dict[str, tuple[SweepPoint, str]],
           run_point: Callable[..., Any] | None, cwd: str, experiment) -> None:
    """One point, in its trial's process: run (or resume) it, reporting every round."""
    from ray import tune

    from ..engine.orchestrator import simulate

    # Tune starts a trial in a folder of its own; the paths of a config (its data,
    # its out, an algorithm's file) are relative to where the sweep was started.
    if os.path.isdir(cwd):
        os.chdir(cwd)
    point, status = points[config["point"]]
    try:
        if status == "restart":
            clear_point(point)
        resume = point.config.out if status == "resume" else None
        (run_point or simulate)(
            point.config, resume=resume, changes=_layout_changes(point) if resume else None,
            on_round=lambda row: tune.report(dict(row)), announce=lambda line: None,
            experiment=experiment)
    except RaysageError as exc:
        tune.report({FAILED: str(exc)})
    except Exception as exc:  # a point's failure must not take the others down
        tune.report({FAILED: f"{type(exc).__name__}: {exc}"})


# Tune's word that Ctrl-C reached it. Its trials all end as terminated either way,
# so this line is the one sign that a search was cut short.
TUNE_STOP_SIGNAL = "Stop signal received"


# What Tune says that raysage says better, by logger: after Ctrl-C its table of every
# trial's metrics (which raysage never reads) warns about each trial that had not
# started, and its interrupt messages advise Tuner.restore, where a raysage user
# re-runs the same command, as the sweep's own last line says.
_TUNE_NOISE = {
    "ray.tune.analysis.experiment_analysis": ("Failed to fetch metrics",),
    "ray.tune.tune": (TUNE_STOP_SIGNAL, "Experiment has been interrupted"),
}


class _DropTuneNoise(logging.Filter):
    def __init__(self, prefixes: tuple[str, ...], dropped: list[str]):
        super().__init__()
        self.prefixes = prefixes
        self.dropped = dropped

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if message.startswith(self.prefixes):
            self.dropped.append(message)
            return False
        return True


@contextlib.contextmanager
def quiet_tune():
    """Tune's newer console output prints its experiment's header whatever the
    verbosity; raysage's own lines say what happens. Yields the list of Tune's
    messages it dropped."""
    name = "RAY_AIR_NEW_OUTPUT"
    before = os.environ.get(name)
    os.environ[name] = "0"
    dropped: list[str] = []
    filters = [(logging.getLogger(logger), _DropTuneNoise(prefixes, dropped))
               for logger, prefixes in _TUNE_NOISE.items()]
    for logger, noise in filters:
        logger.addFilter(noise)
    try:
        yield dropped
    finally:
        for logger, noise in filters:
            logger.removeFilter(noise)
        if before is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = before


# The metric a trial reports instead of a round when its point failed.
FAILED = "raysage_error"


def _layout_changes(point: SweepPoint) -> dict[str, Any]:
    """Where the sweep's config runs a point that its saved config would run elsewhere:
    a resume takes the layout of the trial's placement group."""
    from ..engine.checkpoint import RESUMABLE_FIELDS
    from ..engine.orchestrator import resume_config

    saved = resume_config(point.config.out)
    return {k: getattr(point.config, k) for k in RESUMABLE_FIELDS
            if k in EXECUTION_FIELDS and getattr(saved, k) != getattr(point.config, k)}


class _Events(Callback):
    """Tune's trial events, on the sweep's process, as the sweep's events and outcomes."""

    def __init__(self, points: dict[str, tuple[SweepPoint, str]], on_event):
        self.points, self.on_event = points, on_event
        self.outcomes: dict[str, PointOutcome] = {}
        self.errors: dict[str, str] = {}

    def __getstate__(self):
        # Tune saves its run config, callbacks included, for a restore that a sweep
        # never asks for (a re-run reads its points' folders): the listener (a
        # progress display with its locks) stays here.
        return {**self.__dict__, "on_event": None}

    def on_trial_start(self, iteration, trials, trial, **info):
        point, status = self.points[_point_of(trial)]
        self.on_event("start", point, {"status": status})

    def on_trial_result(self, iteration, trials, trial, result, **info):
        point, _ = self.points[_point_of(trial)]
        if FAILED in result:
            self.errors[point.name] = result[FAILED]
        else:
            self.on_event("round", point, result)

    def on_trial_complete(self, iteration, trials, trial, **info):
        point, _ = self.points[_point_of(trial)]
        if point.name in self.errors:
            self._fail(point, self.errors[point.name])
            return
        from ..results import RunFolder

        summary = json.loads(RunFolder(point.config.out).read_bytes("summary.json"))
        self.outcomes[point.name] = PointOutcome(point, "finished", summary)
        self.on_event("finish", point, summary)

    def on_trial_error(self, iteration, trials, trial, **info):
        point, _ = self.points[_point_of(trial)]
        self._fail(point, f"its trial's process failed (Tune's record: {trial.local_path})")

    def _fail(self, point: SweepPoint, error: str) -> None:
        self.outcomes[point.name] = PointOutcome(point, "failed", error=error)
        self.on_event("fail", point, {"error": error})
