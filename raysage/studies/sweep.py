"""Sweeps: a grid of config points, one run folder per point.

A sweep spec is a base config plus one or more grids (field -> list of
values); each grid expands to its Cartesian product and the sweep is the
union of them, so a study can pair, say, ``partition: iid`` with one grid
and ``partition: dirichlet`` with every alpha in another. Every point's
folder is ``<root>/<field>=<value>__...`` and the folder is the point's
whole state: a re-run skips a finished point (``summary.json`` present),
continues an interrupted one from its checkpoint, and starts the rest.

On Ray, points run side by side when the cluster has room for more than
one point's reservations; they share one Ray instance.
"""

from __future__ import annotations

import itertools
import math
import queue
import re
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from ..algorithms import algorithm_class
from ..config import (EXECUTION_FIELDS, FIELDS, Config, build_config, parameter_fields,
                      parse_yaml, read_yaml, shown)
from ..errors import ConfigError, RaysageError

# Fields that change how a run executes, not what it computes (results are
# identical across them), so a finished point still counts when they change.
# What a run writes into its folder; only these are removed when an
# interrupted point without a checkpoint starts over.
RUN_FILES = ("config.yaml", "run.parquet", "rounds.parquet", "clients.parquet",
             "checkpoint.json", "state", "summary.json")


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


def build_sweep(base: dict[str, Any], grids: list[dict[str, list[Any]]],
                root: str | None, parallel: int | None = None, where: str = "sweep") -> Sweep:
    """Expand and validate every point up front: a bad value fails before anything runs."""
    base = {k.replace("-", "_"): v for k, v in base.items()}
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
                fields = {**base, **values}
                own = algorithm_class(fields.get("algorithm", FIELDS["algorithm"].default))
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
    """A sweep from a YAML spec (config fields + ``grid`` + ``parallel``) and/or flags.

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
    grids = grid_spec if isinstance(grid_spec, list) else [grid_spec] if grid_spec else []
    from_flags = dict(parse_grid_flag(flag) for flag in grid_flags)
    if from_flags:
        grids = [{**g, **from_flags} for g in grids] if grids else [from_flags]
    base = {**values, **{k: v for k, v in overrides.items() if v is not None}}
    root = base.get("out")
    if root is None and spec is not None:
        root = str(Path("runs") / Path(spec).stem)
    return build_sweep(base, grids, root, parallel if parallel is not None else spec_parallel,
                       where)


# --- the state of a point's folder -------------------------------------------------------

def _scientific(cfg: Config) -> dict[str, Any]:
    return {k: v for k, v in cfg.to_dict().items() if k not in EXECUTION_FIELDS}


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
        changed = [k for k in ours if theirs.get(k) != ours[k]]
        if changed:
            k = changed[0]
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


# --- running ------------------------------------------------------------------------------

@dataclass
class PointOutcome:
    point: SweepPoint
    status: str                       # 'skipped', 'finished' or 'failed'
    summary: dict[str, Any] = field(default_factory=dict)
    error: str = ""


def point_reservation(cfg: Config, cluster_cpus: float) -> tuple[float, float]:
    """CPUs and GPUs one point's actors reserve (auto workers take the whole cluster)."""
    if cfg.backend != "ray":
        return cluster_cpus, 0.0
    if not cfg.workers:
        return cluster_cpus, math.inf
    return (cfg.workers * cfg.cpus_per_worker + cfg.server_cpus,
            cfg.workers * cfg.gpus_per_worker + cfg.server_gpus)


def run_sweep(sweep: Sweep, *,
              on_event: Callable[[str, SweepPoint, dict[str, Any]], None] | None = None,
              announce: Callable[[str], None] | None = None,
              run_point: Callable[..., Any] | None = None) -> list[PointOutcome]:
    """Run every point not yet finished; returns one outcome per point, in sweep order.

    ``on_event(kind, point, info)`` is called with kind 'skip', 'start',
    'round' (info: the round row), 'finish' (info: summary) or 'fail'
    (info: {'error': line}).
    """
    from ..engine.orchestrator import simulate

    on_event = on_event or (lambda kind, point, info: None)
    announce = announce or (lambda line: None)
    run_point = run_point or simulate
    statuses = {p.name: point_status(p) for p in sweep.points}  # before anything starts
    outcomes: dict[str, PointOutcome] = {}
    todo = []
    for point in sweep.points:
        if statuses[point.name] == "done":
            outcomes[point.name] = PointOutcome(point, "skipped")
            on_event("skip", point, {})
        else:
            todo.append(point)

    capacity, started_ray = _connect(todo)
    events: queue.Queue = queue.Queue()

    def work(point: SweepPoint) -> None:
        try:
            status = statuses[point.name]
            if status == "restart":
                clear_point(point)
            result = run_point(
                point.config, resume=point.config.out if status == "resume" else None,
                on_round=lambda row: on_event("round", point, row),
                announce=lambda line: announce(f"[{point.name}] {line}"))
            events.put(PointOutcome(point, "finished", result.summary))
        except RaysageError as exc:
            events.put(PointOutcome(point, "failed", error=str(exc)))
        except BaseException as exc:  # a point's failure must not take the others down
            events.put(PointOutcome(point, "failed", error=f"{type(exc).__name__}: {exc}"))

    running: dict[str, tuple[float, float]] = {}
    limit = sweep.parallel or len(todo) or 1
    try:
        while todo or running:
            while todo and len(running) < limit:
                need = point_reservation(todo[0].config, capacity[0])
                used = tuple(sum(r[i] for r in running.values()) for i in (0, 1))
                fits = all(used[i] + need[i] <= capacity[i] + 1e-9 for i in (0, 1))
                if running and not fits:
                    break
                point = todo.pop(0)
                running[point.name] = need
                on_event("start", point, {"status": statuses[point.name]})
                threading.Thread(target=work, args=(point,), daemon=True,
                                 name=f"sweep-{point.name}").start()
            outcome = events.get()
            running.pop(outcome.point.name)
            outcomes[outcome.point.name] = outcome
            if outcome.status == "finished":
                on_event("finish", outcome.point, outcome.summary)
            else:
                on_event("fail", outcome.point, {"error": outcome.error})
    finally:
        if started_ray:
            import ray

            ray.shutdown()
    return [outcomes[p.name] for p in sweep.points]


def _connect(todo: list[SweepPoint]) -> tuple[tuple[float, float], bool]:
    """Join (or start) one Ray instance for all Ray points; returns its (CPUs, GPUs)
    and whether this sweep started it (and so must end it)."""
    ray_points = [p for p in todo if p.config.backend == "ray"]
    if not ray_points:
        return (1.0, 0.0), False
    import ray

    from ..engine.backend import RayBackend

    was_running = ray.is_initialized()
    backend = RayBackend(ray_points[0].config)
    return (backend.cpus, backend.gpus), not was_running and backend.started_here
