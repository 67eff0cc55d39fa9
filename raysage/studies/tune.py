"""Tuning: search a space of config values for the best value of a metric, on Ray Tune.

A tuning run is a folder of trials, each an ordinary run folder
(``<out>/<trial>__<field>=<value>``), so ``raysage report`` reads it like a
sweep. Trials report every round to Tune, whose ASHA scheduler stops those
whose accuracy falls behind at the same round; the best config is chosen
from the trials that ran every round, by the objective computed from their
own ``rounds.parquet``, and written as a YAML that ``raysage simulate
--config`` takes.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any, Callable

import yaml
from ray.tune import Callback

from ..config import FIELDS, Config, build_config, parameter_fields, parse_yaml, shown
from ..errors import ConfigError, RaysageError
from .sweep import (TUNE_STOP_SIGNAL, experiment_of, first_difference, point_name, quiet_tune,
                    tune_folder)

# --space FIELD=KIND:ARGS. Numbers are read as Python reads them, other values as YAML.
KINDS = {
    "loguniform": "loguniform:LOW:HIGH (floats, sampled evenly in log space)",
    "uniform": "uniform:LOW:HIGH",
    "randint": "randint:LOW:HIGH (integers, HIGH excluded)",
    "choice": "choice:A,B,C (sampled)",
    "grid": "grid:A,B,C (every value, times --samples)",
}


def parse_space(text: str) -> tuple[str, str, list[Any]]:
    """``client_lr=loguniform:1e-4:1e-1`` -> ('client_lr', 'loguniform', [1e-4, 0.1])."""
    name, sep, spec = text.partition("=")
    name = name.strip().replace("-", "_")
    kind, _, args = spec.partition(":")
    usage = "; ".join(KINDS.values())
    if not sep or not name or kind not in KINDS or not args:
        raise ConfigError(f"--space {shown(text)} is not FIELD=KIND:ARGS with KIND one of: "
                          f"{usage}; e.g. --space client_lr=loguniform:1e-4:1e-1")
    if kind in ("choice", "grid"):
        values = [_value(v, name) for v in args.split(",")]
    else:
        values = [_value(v, name) for v in args.split(":")]
        if (len(values) != 2 or not all(isinstance(v, (int, float)) for v in values)
                or not values[0] < values[1] or (kind == "loguniform" and values[0] <= 0)):
            raise ConfigError(f"--space {shown(text)}: {KINDS[kind]} needs two numbers, "
                              "LOW < HIGH" + (" and LOW > 0" if kind == "loguniform" else ""))
    return name, kind, values


def _value(text: str, name: str) -> Any:
    """A number as Python reads it (YAML would take 1e-3 for a string), else YAML."""
    text = text.strip()
    for number in (int, float):
        try:
            return number(text)
        except ValueError:
            pass
    return parse_yaml(text, f"--space {name}")


def domain(kind: str, values: list[Any]):
    from ray import tune

    if kind == "loguniform":
        return tune.loguniform(float(values[0]), float(values[1]))
    if kind == "uniform":
        return tune.uniform(float(values[0]), float(values[1]))
    if kind == "randint":
        return tune.randint(int(values[0]), int(values[1]))
    if kind == "choice":
        return tune.choice(values)
    return tune.grid_search(values)


# ------------------------------------------------------------------ objectives

@dataclass(frozen=True)
class Objective:
    """What a trial is scored by, from its round rows.

    ``final_accuracy`` / ``best_accuracy``; ``accuracy@gib=X`` (best accuracy
    once X GiB have travelled) and ``accuracy@sim_time=X`` (seconds of
    simulated time), higher is better; ``gib_to=A`` and ``sim_time_to=A``
    (GiB or simulated seconds until accuracy A, a trial that never gets there
    scores infinity), lower is better.
    """

    text: str
    kind: str
    bound: float | None = None

    @property
    def mode(self) -> str:
        return "min" if self.kind in ("gib_to", "sim_time_to") else "max"

    def score(self, rows: list[dict[str, Any]]) -> float:
        evaluated = [r for r in rows if not math.isnan(r["accuracy"])]
        if not evaluated:
            return math.nan
        if self.kind == "final_accuracy":
            return evaluated[-1]["accuracy"]
        if self.kind == "best_accuracy":
            return max(r["accuracy"] for r in evaluated)
        if self.kind in ("accuracy@gib", "accuracy@sim_time"):
            within = [r["accuracy"] for r in evaluated if _spent(r, self.kind) <= self.bound]
            return max(within) if within else math.nan
        reached = [r for r in evaluated if r["accuracy"] >= self.bound]
        return _spent(reached[0], self.kind) if reached else math.inf

    def better(self, a: float, b: float) -> bool:
        if math.isnan(b):
            return not math.isnan(a)
        return a > b if self.mode == "max" else a < b


def _spent(row: dict[str, Any], kind: str) -> float:
    return row["cumulative_bytes"] / 2**30 if "gib" in kind else row["sim_time"]


OBJECTIVES = ("final_accuracy", "best_accuracy", "accuracy@gib=X", "accuracy@sim_time=X",
              "gib_to=ACCURACY", "sim_time_to=ACCURACY")


def parse_objective(text: str) -> Objective:
    if text in ("final_accuracy", "best_accuracy"):
        return Objective(text, text)
    kind, sep, bound = text.partition("=")
    if sep and kind in ("accuracy@gib", "accuracy@sim_time", "gib_to", "sim_time_to"):
        try:
            value = float(bound)
        except ValueError:
            value = math.nan
        if math.isfinite(value) and value > 0:
            return Objective(text, kind, value)
    raise ConfigError(f"--metric {shown(text)} is not one of {', '.join(OBJECTIVES)} (X and "
                      "ACCURACY positive numbers)")


# ------------------------------------------------------------------ the search

@dataclass
class Tuning:
    root: str
    base: dict[str, Any]                    # config fields every trial shares
    space: list[tuple[str, str, list[Any]]]
    objective: Objective
    samples: int = 8
    asha: bool = True
    grace_rounds: int = 1
    parallel: int | None = None
    searcher: str = "random"


@dataclass
class TrialScore:
    folder: str
    values: dict[str, Any]
    score: float
    rounds: int
    finished: bool


def check_tuning(tuning: Tuning) -> Config:
    """Every field and value checked before anything runs; returns the base config."""
    if not tuning.space:
        raise ConfigError("nothing to tune: give --space FIELD=KIND:ARGS, e.g. --space "
                          "client_lr=loguniform:1e-4:1e-1")
    if tuning.samples < 1:
        raise ConfigError(f"--samples {tuning.samples} must be at least 1")
    check_searcher(tuning.searcher)
    params = set(parameter_fields())
    for name, kind, values in tuning.space:
        if name not in FIELDS and name not in params:
            raise ConfigError(f"--space: unknown config field '{name}'")
        if name == "out":
            raise ConfigError("--space: 'out' cannot be tuned; give --out DIR")
        # Both ends of a range: a value out of bounds would fail trials mid-search.
        ends = values if kind in ("choice", "grid") else (
            [values[0], values[1] - 1] if kind == "randint" else values)
        for value in ends:
            try:
                build_config({**tuning.base, name: value}, {"out": None})
            except ConfigError as exc:
                raise ConfigError(f"--space {name}: {exc}") from None
    return build_config(tuning.base, {"out": None})


def run_tuning(tuning: Tuning, *, on_event: Callable[[str, str, dict], None] | None = None,
               run_point: Callable[..., Any] | None = None) -> list[TrialScore]:
    """Run the search, or continue an interrupted one in the same folder (Tune's own
    restore: finished and stopped trials stay as they are); returns every trial's
    score, best first, and writes the best config to ``<root>/best.yaml``."""
    import ray
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    from ..engine.backend import RayBackend, trial_bundles

    base = check_tuning(tuning)
    names = [n for n, _, _ in tuning.space]
    claim_folder(tuning)
    was_running = ray.is_initialized()
    backend = RayBackend(base.replace(backend="ray"))
    try:
        bundles = trial_bundles(base, backend.node_resources, backend.describe())
        trainable = tune.with_resources(
            tune.with_parameters(_trial, base=tuning.base, root=tuning.root, names=names,
                                 run_point=run_point, cwd=os.getcwd(),
                                 experiment=experiment_of(tuning.root, {base.tracking})),
            tune.PlacementGroupFactory(bundles, strategy="SPREAD"))
        experiment = f"{tune_folder(tuning.root)}/tune"
        if tune.Tuner.can_restore(experiment):
            tuner = tune.Tuner.restore(experiment, trainable, resume_unfinished=True,
                                       restart_errored=True)
        else:
            # max_t past the last round: ASHA stops a trial that reaches max_t, which
            # would cut the run short of writing its summary.
            scheduler = (ASHAScheduler(time_attr="training_iteration", max_t=base.rounds + 1,
                                       grace_period=max(1, min(tuning.grace_rounds,
                                                               base.rounds)))
                         if tuning.asha else FIFOScheduler())
            tuner = tune.Tuner(
                trainable,
                param_space={n: domain(k, v) for n, k, v in tuning.space},
                tune_config=tune.TuneConfig(
                    metric=PROGRESS, mode="max", num_samples=tuning.samples,
                    # The config's seed seeds the sampling: the same command samples the
                    # same values.
                    search_alg=searcher(tuning, base.seed),
                    scheduler=scheduler),
                run_config=tune.RunConfig(name="tune", storage_path=tune_folder(tuning.root),
                                          callbacks=[_TrialEvents()], verbose=0))
        _listener[0] = on_event or (lambda kind, trial, info: None)
        with quiet_tune() as dropped:
            tuner.fit()
        if any(m.startswith(TUNE_STOP_SIGNAL) for m in dropped):
            _listener[0]("interrupted", "", {})
    finally:
        _listener[0] = lambda kind, trial, info: None
        if not was_running and backend.started_here:
            ray.shutdown()
    scores = score_trials(tuning.root, names, base.rounds, tuning.objective)
    finished = [s for s in scores if s.finished and not math.isnan(s.score)]
    if finished:
        best = {k: v for k, v in tuning.base.items() if k != "out"} | finished[0].values
        with open(best_path(tuning.root), "w") as f:
            yaml.safe_dump(best, f, sort_keys=False)
    return scores


SEARCHERS = {"random": None, "optuna": ("optuna", "ray.tune.search.optuna", "OptunaSearch")}


def searcher(tuning: Tuning, seed: int):
    """Tune's search algorithm: random (and grid) sampling, or Optuna's TPE when the
    optuna package is installed. Either is seeded by the config's seed and runs at
    most ``tuning.parallel`` trials at once (0: as many as the resources allow)."""
    from ray.tune.search import BasicVariantGenerator, ConcurrencyLimiter

    if tuning.searcher == "random":
        # Tune's max_concurrent_trials ignores a sampler handed to it: it caps its own.
        return BasicVariantGenerator(random_state=seed, max_concurrent=tuning.parallel or 0)
    import importlib

    check_searcher(tuning.searcher)
    _, module, name = SEARCHERS[tuning.searcher]
    found = getattr(importlib.import_module(module), name)(seed=seed)
    return ConcurrencyLimiter(found, tuning.parallel) if tuning.parallel else found


def check_searcher(name: str) -> None:
    if name not in SEARCHERS:
        raise ConfigError(f"--searcher {shown(name)} is not one of {', '.join(SEARCHERS)}")
    if SEARCHERS[name] is None:
        return
    package = SEARCHERS[name][0]
    try:
        __import__(package)
    except ImportError:
        raise ConfigError(f"--searcher {name} needs the {package} package; pip install "
                          f"{package}, or use --searcher random") from None


def load_tuning(spec: str | None, space: list[str], flags: dict[str, Any], *,
                metric: str | None, samples: int | None, **options: Any) -> Tuning:
    """A search from a YAML spec (config fields plus ``space:``, a mapping of field to
    ``KIND:ARGS``, and optionally ``metric:`` and ``samples:``) and/or flags; flags
    add to the spec's space and override its values."""
    from ..config import read_yaml

    values: dict[str, Any] = read_yaml(spec) if spec is not None else {}
    spec_space = values.pop("space", None) or {}
    if not isinstance(spec_space, dict):
        raise ConfigError(f"{spec}: space is a mapping of config field -> KIND:ARGS, e.g. "
                          "client_lr: loguniform:1e-4:1e-1")
    metric = metric or values.pop("metric", "final_accuracy")
    samples = samples or values.pop("samples", 8)
    texts = {str(k).replace("-", "_"): f"{k}={v}" for k, v in spec_space.items()}
    texts.update({parse_space(t)[0]: t for t in space})
    base = {k.replace("-", "_"): v for k, v in {**values, **flags}.items()}
    out = base.pop("out", None)
    if not out:
        raise ConfigError("give --out DIR for the search's trials (a re-run with the same "
                          "--out continues it)")
    tuning = Tuning(str(out), base, [parse_space(t) for t in texts.values()],
                    parse_objective(str(metric)), int(samples), **options)
    if tuning.searcher != "random" and any(k == "grid" for _, k, _ in tuning.space):
        raise ConfigError(f"--searcher {tuning.searcher} samples; a grid: space needs "
                          "--searcher random")
    return tuning


def claim_folder(tuning: Tuning) -> None:
    """Record what the folder's search is (``<root>/tuning.yaml``), or check that a
    re-run asks for the same: Tune's restore would otherwise go on with the old
    space and report it as the new one's."""
    search = {"base": tuning.base, "space": [f"{n}={k}:" + (",".join(map(str, v))
                                                             if k in ("choice", "grid")
                                                             else ":".join(map(str, v)))
                                             for n, k, v in tuning.space],
              "samples": tuning.samples, "asha": tuning.asha,
              "grace_rounds": tuning.grace_rounds, "searcher": tuning.searcher}
    path = os.path.join(tuning.root, "tuning.yaml")
    if os.path.exists(path):
        with open(path) as f:
            saved = yaml.safe_load(f)
        k = first_difference(saved, search)
        if k is not None:
            raise ConfigError(f"{tuning.root} holds a search with {k} = {shown(saved.get(k))}, "
                              f"not {shown(search[k])}; give another --out, or remove the "
                              "folder to start over")
        return
    os.makedirs(tuning.root, exist_ok=True)
    with open(path, "w") as f:
        yaml.safe_dump(search, f, sort_keys=False)


# What ASHA compares trials by at each round: the accuracy of the latest evaluation.
PROGRESS = "progress_accuracy"


def best_path(root: str) -> str:
    return os.path.join(root, "best.yaml")


def tuned_fields(root: str, algorithm: str) -> dict[str, Any]:
    """The values a finished search in ``root`` found for the fields it searched (not
    the rest of its config): what a sweep's ``per_algorithm`` takes from it."""
    from ..config import read_yaml

    search, best = os.path.join(root, "tuning.yaml"), best_path(root)
    if not os.path.isdir(root):
        raise ConfigError(f"{root} does not exist: run {algorithm}'s raysage tune search with "
                          f"--out {root} first")
    if not os.path.isfile(search):
        raise ConfigError(f"{root} is not a raysage tune folder (no tuning.yaml); give the "
                          f"--out of a search for {algorithm}")
    if not os.path.isfile(best):
        raise ConfigError(f"{root} has no best.yaml: no trial of its search ran every round; "
                          "finish it by re-running its raysage tune command")
    saved = read_yaml(search)
    searched = [str(entry).split("=", 1)[0] for entry in saved.get("space") or []]
    found = read_yaml(best)
    tuned_for = found.get("algorithm", FIELDS["algorithm"].default)
    if tuned_for != algorithm:
        raise ConfigError(f"{root} is a search for {tuned_for}, not {algorithm}; give the "
                          f"folder of {algorithm}'s search")
    return {name: found[name] for name in searched if name in found}


def _short(value: Any) -> Any:
    return f"{value:.4g}" if isinstance(value, float) else value


def _trial(config: dict[str, Any], base: dict[str, Any], root: str, names: list[str],
           run_point, cwd: str, experiment) -> None:
    """One trial, in its own process: its run folder is named after Tune's trial id
    (the same after a restore) and the values it tries."""
    from ray import tune

    from ..engine.orchestrator import simulate
    from .sweep import FAILED, SweepPoint, _layout_changes, clear_point, point_status

    if os.path.isdir(cwd):
        os.chdir(cwd)
    values = {n: config[n] for n in names}
    trial = tune.get_context().get_trial_id()
    name = f"trial_{trial}__" + point_name({n: _short(v) for n, v in values.items()})
    latest = [math.nan]

    def report(row: dict[str, Any]) -> None:
        if not math.isnan(row["accuracy"]):
            latest[0] = row["accuracy"]
        tune.report({**row, PROGRESS: latest[0]})

    try:
        cfg = build_config({**base, **values}, {"out": f"{root.rstrip('/')}/{name}"})
        point = SweepPoint(name, values, cfg)
        status = point_status(point)
        if status == "done":     # finished just before the search was interrupted
            from ..results import RunFolder

            for row in RunFolder(cfg.out).read_table("rounds.parquet"):
                report(row)
            return
        if status == "restart":
            clear_point(point)
        resume = cfg.out if status == "resume" else None
        (run_point or simulate)(cfg, resume=resume,
                                changes=_layout_changes(point) if resume else None,
                                on_round=report, announce=lambda line: None,
                                experiment=experiment)
    except RaysageError as exc:
        tune.report({FAILED: str(exc), PROGRESS: math.nan})
    except Exception as exc:  # one trial's failure must not end the search
        tune.report({FAILED: f"{type(exc).__name__}: {exc}", PROGRESS: math.nan})


# Who hears of trials in this process. Tune saves its callbacks with the search and
# a restored search brings back those it saved, so they hold no listener of their own.
_listener: list[Callable[[str, str, dict], None]] = [lambda kind, trial, info: None]


class _TrialEvents(Callback):
    """Tune's trial events as lines for the command: start, and where each ended."""

    def on_trial_start(self, iteration, trials, trial, **info):
        _listener[0]("start", trial.trial_id, dict(trial.config))

    def on_trial_complete(self, iteration, trials, trial, **info):
        _listener[0]("end", trial.trial_id, dict(trial.last_result or {}))

    def on_trial_error(self, iteration, trials, trial, **info):
        _listener[0]("end", trial.trial_id, {"raysage_error": "its trial's process failed"})


def score_trials(root: str, names: list[str], rounds: int, objective: Objective
                 ) -> list[TrialScore]:
    """Every trial folder under ``root`` scored from its rounds; trials that ran every
    round first, best first, then those stopped early."""
    from ..engine.orchestrator import resume_config
    from ..results import RunFolder

    scores = []
    for entry in sorted(os.listdir(root)) if os.path.isdir(root) else []:
        folder = RunFolder(os.path.join(root, entry))
        if not entry.startswith("trial_") or not folder.exists("rounds.parquet"):
            continue
        rows = folder.read_table("rounds.parquet")
        cfg = resume_config(folder.location)
        values = {n: getattr(cfg if n in FIELDS else cfg.params, n, None) for n in names}
        scores.append(TrialScore(folder.location, values,
                                 objective.score(rows), len(rows),
                                 len(rows) >= rounds))

    def key(s: TrialScore):
        value = s.score if objective.mode == "min" else -s.score
        return (not s.finished, math.isnan(s.score), value)

    return sorted(scores, key=key)
