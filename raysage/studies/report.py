"""Report over run folders: figures and a Markdown summary.

Only the Parquet files of a run folder are read (``run.parquet`` for the
config, ``rounds.parquet`` for the curves), so folders copied off a cluster,
or still being written, can be reported on.

Runs whose configs differ only in ``seed`` and in execution settings are one
*series*, averaged round by round. The scientific fields that still vary
between series (other than the algorithm) split every figure into *facets*,
one subplot each, with one line per algorithm; the number of clients, when
swept, is a scalability axis instead and tells lines apart within a facet, as
do the fields a report is asked to draw as lines (``lines``): a sensitivity
study of one algorithm's parameters reads best as variants side by side in the
panel of the setting they share, not as a panel per run. ``panels`` turns a
scalability axis back into facets (a study over clients compares the
algorithms at each client count).

A field whose value goes with the algorithm (each baseline at its own tuned
learning rate) or with the client count (an evaluation interval that grows
with the rounds) is a setting of that line or panel, not a facet of its own;
report.md lists such settings.
"""

from __future__ import annotations

import json
import math
import os
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from ..config import EXECUTION_FIELDS, FIELDS
from ..errors import ConfigError, DataError
from ..observers import OBSERVERS, Figure, Leakage

GIB = 2 ** 30

# How or where a run executed, not what it simulated. ``rounds`` and
# ``budget_gib`` are only the horizon (an unfinished or shorter run is a prefix
# of the same experiment)
# and ``data_dir`` is where the same dataset happens to live.
NON_SCIENTIFIC_FIELDS = EXECUTION_FIELDS | {"data_dir", "rounds", "budget_gib"}
# Fields that only act under another field's value; elsewhere they are blanked,
# so e.g. iid runs made with different (unused) alpha values are one series.
CONDITIONAL_FIELDS = {
    "alpha": ("partition", "dirichlet"),
    "shards_per_client": ("partition", "shards"),
    "deadline": ("round_policy", "deadline"),
    "over_selection": ("round_policy", "over_selection"),
    **{name: ("model", "gpt2") for name in (
        "gpt2_size", "cut_layer", "aux_depth", "lora_rank", "lora_alpha", "lora_dropout",
        "e2e_max_slots", "seq_len", "tokenizer", "tokenizer_dir", "weights_dir")},
}
SCALING_AXES = ("clients", "workers")
LAYOUT_FIELDS = ("workers", "cpus_per_worker", "gpus_per_worker", "threads")
DEFAULTS = {name: f.default for name, f in FIELDS.items()}

_OTHER_COLOUR = "#17becf"
_LINESTYLES = ("-", "--", ":", "-.")
_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")
_DPI = 120


def _builtin(name: str):
    from ..algorithms import ALGORITHMS

    return ALGORITHMS.get(name)


def _rank(algorithm: str) -> int:
    """Built-in algorithms in their listed order, then anything else."""
    from ..algorithms import ALGORITHMS

    names = list(ALGORITHMS)
    return names.index(algorithm) if algorithm in names else len(names)


@dataclass(frozen=True)
class Metric:
    name: str
    title: str              # axis label, in display units
    higher_is_better: bool
    scale: float            # stored value -> display units (accuracy shown in %)

    def value(self, row: dict[str, Any]) -> float:
        if self.name == "perplexity":
            loss = _num(row.get("test_loss"))
            return math.exp(min(loss, 700.0)) if not math.isnan(loss) else loss
        return _num(row.get(self.name))

    def show(self, value: float | None) -> str:
        if value is None or math.isnan(value):
            return "-"
        if self.name == "accuracy":
            return f"{value * 100:.2f}%"
        return f"{value:.4f}" if self.name == "test_loss" else f"{value:.2f}"


METRICS = {
    "accuracy": Metric("accuracy", "test accuracy (%)", True, 100.0),
    "test_loss": Metric("test_loss", "test loss (nats/token)", False, 1.0),
    "perplexity": Metric("perplexity", "perplexity", False, 1.0),
}


def _metric(name: str) -> Metric:
    if name not in METRICS:
        raise ConfigError(f"report metric {name!r} is not known; choose one of: "
                          + ", ".join(METRICS))
    return METRICS[name]


def _num(value: Any) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def _mean(values: Iterable[float]) -> float:
    finite = [v for v in values if not math.isnan(v)]
    return sum(finite) / len(finite) if finite else math.nan


# ---------------------------------------------------------------- loading
@dataclass
class Run:
    path: Path
    config: dict[str, Any]
    rounds: list[dict[str, Any]]
    label: str = ""          # the algorithm's, as the run recorded it
    colour: str = _OTHER_COLOUR

    @property
    def algorithm(self) -> str:
        return str(self.config.get("algorithm"))


def _corrupt(folder: Path, why: str) -> DataError:
    return DataError(f"{folder} is not a raysage run folder or is corrupt: {why}; "
                     "re-run it or remove it")


def _read_rows(folder: Path, name: str) -> list[dict[str, Any]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = folder / name
    if not path.is_file():
        raise _corrupt(folder, f"{name} is missing")
    try:
        # ParquetFile reads just this file; read_table would also turn sweep
        # folder names such as "alpha=0.1" into extra hive-partition columns.
        return pq.ParquetFile(path).read().to_pylist()
    except (pa.ArrowException, OSError, ValueError) as exc:
        reason = (str(exc).splitlines() or [type(exc).__name__])[0]
        raise _corrupt(folder, f"{name} is unreadable ({reason})") from None


def _read_run(folder: Path) -> Run:
    configs = _read_rows(folder, "run.parquet")
    if len(configs) != 1 or "algorithm" not in configs[0]:
        raise _corrupt(folder, "run.parquet does not hold one config row")
    rounds = _read_rows(folder, "rounds.parquet")
    if any(not isinstance(row.get("round"), int) for row in rounds):
        raise _corrupt(folder, "rounds.parquet has rows without a round number")
    saved = dict(configs[0])
    name = str(saved["algorithm"])
    builtin = _builtin(name)
    label = saved.pop("algorithm_label", None) or (builtin.label if builtin else name)
    colour = saved.pop("algorithm_colour", None) or (builtin.colour if builtin else
                                                     _OTHER_COLOUR)
    # A field added after the run was made acted as its default then. A built-in
    # algorithm's parameters are its own (runs of older versions saved every
    # algorithm's); a user's algorithm keeps whatever its run saved.
    config = {**DEFAULTS, **{k: v for k, v in saved.items() if k in FIELDS}}
    if builtin is not None:
        params = builtin.Params().model_dump()
        config |= {k: saved.get(k, v) for k, v in params.items()}
    else:
        config |= {k: v for k, v in saved.items() if k not in FIELDS}
    return Run(folder, config, sorted(rounds, key=lambda row: row["round"]), label, colour)


def _first_rounds(run: Run, rounds: int | None) -> Run:
    """The run as if it had been planned for at most ``rounds`` rounds (a run's first
    rounds do not depend on how many follow)."""
    if rounds is None:
        return run
    planned = run.config.get("rounds")
    config = run.config | ({"rounds": min(planned, rounds)} if isinstance(planned, int) else {})
    return Run(run.path, config, [row for row in run.rounds if row["round"] < rounds],
               run.label, run.colour)


def _run_folders(path: Path) -> list[Path]:
    if not path.exists():
        raise DataError(f"run path {path} does not exist; give a run folder or a folder "
                        "that holds run folders")
    if path.is_file():
        if path.name == "run.parquet":
            return [path.parent]
        raise DataError(f"{path} is a file, not a run folder; give the folder that holds "
                        "run.parquet")
    if (path / "run.parquet").is_file():
        return [path]
    try:
        found = sorted({p.parent for p in path.rglob("run.parquet") if p.is_file()})
    except OSError as exc:
        raise DataError(f"cannot search {path} for run folders: {exc.strerror}") from None
    if not found:
        raise DataError(f"no run folder (a folder with run.parquet) found under {path}; "
                        "give the folder a run or sweep wrote its results to")
    return found


def load_runs(paths: str | os.PathLike | Iterable[str | os.PathLike]) -> list[Run]:
    """Every run folder given, or found (recursively, sorted) under a given folder."""
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    runs, seen = [], set()
    for path in paths:
        for folder in _run_folders(Path(path)):
            if folder.resolve() not in seen:
                seen.add(folder.resolve())
                runs.append(_read_run(folder))
    return runs


# ---------------------------------------------------------------- series and facets
def scientific_config(config: dict[str, Any]) -> dict[str, Any]:
    """The config fields that decide the simulated result (seed aside)."""
    cfg = {k: v for k, v in config.items() if k not in NON_SCIENTIFIC_FIELDS and k != "seed"}
    for name, (gate, value) in CONDITIONAL_FIELDS.items():
        if name in cfg and cfg.get(gate) != value:
            cfg[name] = None
    return cfg


def _key(cfg: dict[str, Any]) -> str:
    return json.dumps(cfg, sort_keys=True, default=str)


@dataclass
class Series:
    config: dict[str, Any]           # scientific_config shared by its runs
    runs: list[Run]
    rounds: list[dict[str, Any]]     # mean over runs, rounds every run has

    @property
    def algorithm(self) -> str:
        return str(self.config.get("algorithm"))

    @property
    def label(self) -> str:
        return self.runs[0].label

    @property
    def colour(self) -> str:
        return self.runs[0].colour


def _mean_curve(runs: list[Run]) -> list[dict[str, Any]]:
    """Each column's mean over the runs (seeds) at every round all of them reached. A
    value missing in one run leaves a gap (NaN), not a mean of the others."""
    import pandas as pd

    frames = [pd.DataFrame(run.rounds).set_index("round") for run in runs]
    rounds = sorted(set.intersection(*(set(f.index) for f in frames)))
    columns = sorted(set.intersection(*(set(f.columns) for f in frames)))
    values = pd.concat([f.loc[rounds, columns].apply(pd.to_numeric, errors="coerce")
                        .astype(float) for f in frames])
    by_round = values.groupby(level="round")
    mean = by_round.mean().mask(values.isna().groupby(level="round").any())
    return [{"round": int(r), **row} for r, row in zip(mean.index, mean.to_dict("records"))]


def group_series(runs: list[Run]) -> list[Series]:
    groups: dict[str, list[Run]] = defaultdict(list)
    for run in runs:
        groups[_key(scientific_config(run.config))].append(run)
    series = [Series(scientific_config(members[0].config), members, _mean_curve(members))
              for members in groups.values()]
    return sorted(series, key=lambda s: (_rank(s.algorithm), _key(s.config)))


def _varying(configs: list[dict[str, Any]]) -> list[str]:
    """Fields whose value differs between the configs that have them (an algorithm's
    parameter is not a difference from algorithms without it)."""
    names = list(dict.fromkeys(name for cfg in configs for name in cfg))
    return [n for n in names if len({_key(cfg[n]) for cfg in configs if n in cfg}) > 1]


def _show(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def _sort_value(value: Any) -> tuple:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return (0, value, "")
    return (1, 0, "" if value is None else str(value))


@dataclass
class Facet:
    label: str
    series: list[Series]


def _line_fields(series: list[Series], lines: tuple[str, ...] = (),
                 panels: tuple[str, ...] = ()) -> list[str]:
    varying = _varying([s.config for s in series])
    return [f for f in dict.fromkeys((*SCALING_AXES, *lines)) if f in varying and f not in panels]


def _follows(series: list[Series], field: str, by: str) -> bool:
    """Whether the series that have ``field`` hold one value of it per value of ``by``."""
    seen: dict[str, str] = {}
    for s in series:
        if field in s.config:
            value = _key(s.config[field])
            if seen.setdefault(_key(s.config.get(by)), value) != value:
                return False
    return True


def following_fields(series: list[Series], lines: tuple[str, ...] = (),
                     panels: tuple[str, ...] = ()) -> dict[str, str]:
    """Varying fields that go with the algorithm, a line field or a panel field
    (field -> the one it goes with): settings, not facets."""
    varying = _varying([s.config for s in series])
    leaders = [f for f in ("algorithm", *SCALING_AXES, *lines, *panels) if f in varying]
    settings = {}
    for f in varying:
        if f not in leaders:
            by = next((by for by in leaders if _follows(series, f, by)), None)
            if by is not None:
                settings[f] = by
    return settings


def _facets(series: list[Series], lines: tuple[str, ...] = (),
            exclude: tuple[str, ...] = (), panels: tuple[str, ...] = ()) -> list[Facet]:
    axes = [a for a in SCALING_AXES if a not in panels]
    settings = following_fields(series, lines, panels)
    fields = [f for f in _varying([s.config for s in series])
              if f not in ("algorithm", *axes, *lines, *exclude, *settings)]
    if "alpha" in fields and "partition" not in fields:
        fields.insert(fields.index("alpha"), "partition")   # "alpha=0.1" alone hides the partition
    groups: dict[tuple, list[Series]] = defaultdict(list)
    for s in series:
        groups[tuple(_sort_value(s.config.get(f)) for f in fields)].append(s)
    facets = []
    for key in sorted(groups):
        cfg = groups[key][0].config
        label = ", ".join(f"{f}={_show(cfg[f])}" for f in fields if cfg.get(f) is not None)
        facets.append(Facet(label or "all runs", groups[key]))
    return facets


def _line_values(s: Series, line_fields: list[str]) -> tuple:
    return tuple(s.config.get(f) for f in line_fields)


def _line_styles(series: list[Series], line_fields: list[str]):
    """A series' line style and marker: one pair per combination of the line fields'
    values, the same in every panel (the colour is the algorithm's)."""
    variants = sorted({_line_values(s, line_fields) for s in series},
                      key=lambda v: tuple(map(_sort_value, v)))

    def style(s: Series, points: int) -> dict[str, Any]:
        i = variants.index(_line_values(s, line_fields))
        return {"linestyle": _LINESTYLES[i % len(_LINESTYLES)],
                "marker": _MARKERS[i % len(_MARKERS)] if points <= 20 else None}
    return style


def _line_label(s: Series, line_fields: list[str]) -> str:
    # A scaling axis is always named; any other line field only where the series
    # departs from its default, so a sensitivity study's variants read as what
    # they change ("FSL-SAGE (align_interval=1)") and its baseline as the algorithm.
    extra = ", ".join(f"{f}={_show(s.config[f])}" for f in line_fields if f in s.config
                      and (f in SCALING_AXES or s.config[f] != _default(s.algorithm, f)))
    return s.label + (f" ({extra})" if extra else "")


def _default(algorithm: str, field: str) -> Any:
    """A field's default: the config's, or the algorithm's own parameter's."""
    if field in DEFAULTS:
        return DEFAULTS[field]
    cls = _builtin(algorithm)
    spec = cls.Params.model_fields.get(field) if cls is not None else None
    return spec.default if spec is not None else None


def _reference(s: Series, facet: Facet, line_fields: list[str],
               baseline: str | None) -> Series | None:
    """The baseline algorithm's series to compare s with: in the same facet, with s's
    values of the line fields, and the baseline's defaults for those s's algorithm does
    not have (CSE-FSL is compared with FSL-SAGE at its default alignment interval)."""
    if baseline is None:
        return None
    for r in facet.series:
        if r.algorithm == baseline and all(
                r.config.get(f) == (s.config[f] if f in s.config else _default(baseline, f))
                for f in line_fields):
            return r
    return None


def _seeds(s: Series) -> list[Any]:
    return sorted({run.config.get("seed") for run in s.runs}, key=_sort_value)


def _on_shared_seeds(members: list[Series]) -> tuple[list[Series], list[Any] | None]:
    """The series to compare with each other: each over the seeds all of them have.

    A seed draws the partition, the initial models and each client's straggler
    slowdown, so a series averaged over three seeds does not compare with one run of
    another algorithm (with stragglers, one seed's round can take three times
    another's). Returns the members and None when their seeds agree, the members cut
    down to the shared seeds and those seeds when they do not, and the members as
    they are with [] when no seed is shared."""
    sets = [set(_seeds(s)) for s in members]
    if all(seeds == sets[0] for seeds in sets):
        return members, None
    shared = set.intersection(*sets)
    if not shared:
        return members, []
    cut = []
    for s in members:
        kept = [run for run in s.runs if run.config.get("seed") in shared]
        cut.append(s if len(kept) == len(s.runs) else Series(s.config, kept, _mean_curve(kept)))
    return cut, sorted(shared, key=_sort_value)


# ---------------------------------------------------------------- targets
def time_to_target(rounds: list[dict[str, Any]], target: float,
                   metric: str = "accuracy") -> tuple[int, float, float] | None:
    """(round, cumulative GiB, simulated seconds) when the metric first reaches target."""
    m = _metric(metric)
    for row in sorted(rounds, key=lambda row: row["round"]):
        value = m.value(row)
        if math.isnan(value):
            continue
        if (value >= target) if m.higher_is_better else (value <= target):
            return int(row["round"]), _num(row.get("cumulative_bytes")) / GIB, _num(row.get("sim_time"))
    return None


def _best(rounds: list[dict[str, Any]], m: Metric) -> float:
    values = [v for v in map(m.value, rounds) if not math.isnan(v)]
    if not values:
        return math.nan
    return max(values) if m.higher_is_better else min(values)


def _final(rounds: list[dict[str, Any]], m: Metric) -> float:
    values = [v for v in map(m.value, rounds) if not math.isnan(v)]
    return values[-1] if values else math.nan


def _default_target(bests: list[float], m: Metric) -> float | None:
    """The weakest algorithm's best, rounded towards reachable, so all reach it."""
    finite = [b for b in bests if not math.isnan(b)]
    if not finite:
        return None
    if m.higher_is_better:
        worst = min(finite)
        target = math.floor(worst * 100 + 1e-9) / 100
        return target if target <= worst else math.floor(worst * 100) / 100
    worst = max(finite)
    target = math.ceil(worst * 100 - 1e-9) / 100
    return target if target >= worst else math.ceil(worst * 100) / 100


def _at_round(rounds: list[dict[str, Any]], rnd: int, column: str) -> float | None:
    value = next((_num(row.get(column)) for row in rounds if row["round"] == rnd), math.nan)
    return None if math.isnan(value) else value


def _measured_mean(rounds: list[dict[str, Any]], column: str) -> float | None:
    """Mean over the rounds that measured it; None when nothing of the kind was measured."""
    values = [v for v in (_num(row.get(column)) for row in rounds) if not math.isnan(v)]
    return sum(values) / len(values) if values else None


def _ratio(value: float | None, reference: float | None) -> float | None:
    if value is None or reference is None or not reference > 0:
        return None
    return value / reference


def target_table(series: list[Series], target: float | None = None,
                 metric: str = "accuracy", lines: tuple[str, ...] = (),
                 baseline: str | None = None,
                 panels: tuple[str, ...] = ()) -> list[dict[str, Any]]:
    """Per facet and algorithm: best/final metric and the cost of reaching the target
    (bytes, simulated time, client energy), also as a ratio to the baseline
    algorithm's cost (> 1: the baseline needed less), and the mean leakage measured
    over the run."""
    m = _metric(metric)
    line_fields = _line_fields(series, lines, panels)
    rows = []
    for whole in _facets(series, lines, panels=panels):
        members, shared = _on_shared_seeds(whole.series)
        facet = Facet(whole.label, members)
        if target is not None:
            goal, rule = target, "given"
        else:
            goal = _default_target([_best(s.rounds, m) for s in facet.series], m)
            rule = ("lowest best accuracy in the facet, floored to 2 decimals"
                    if m.higher_is_better else
                    f"highest best {m.name} in the facet, ceiled to 2 decimals")
        hits = {id(s): time_to_target(s.rounds, goal, metric) if goal is not None else None
                for s in facet.series}
        budget_bytes, budget_time = _equal_budgets(
            facet.series, lambda s: any(map(unfinished, s.runs)))
        for s, all_seeds in zip(facet.series, whole.series):
            ref = _reference(s, facet, line_fields, baseline)
            hit, ref_hit = hits[id(s)], hits[id(ref)] if ref is not None else None
            energy = _at_round(s.rounds, hit[0], "cumulative_energy_j") if hit else None
            ref_energy = (_at_round(ref.rounds, ref_hit[0], "cumulative_energy_j")
                          if ref_hit else None)
            rows.append({
                "facet": facet.label, "algorithm": s.algorithm, "label": _line_label(s, line_fields),
                "runs": len(s.runs), "best": _best(s.rounds, m), "final": _final(s.rounds, m),
                "rounds": len(s.rounds), "target": goal, "target_rule": rule,
                "seeds": _seeds(all_seeds), "shared_seeds": shared,
                "total_gib": _column_max(s.rounds, "cumulative_bytes") / GIB,
                "total_sim_time": _column_max(s.rounds, "sim_time"),
                "budget_gib": budget_bytes / GIB,
                "best_at_budget_bytes": _best_within(s.rounds, m, "cumulative_bytes",
                                                     budget_bytes),
                "budget_sim_time": budget_time,
                "best_at_budget_time": _best_within(s.rounds, m, "sim_time", budget_time),
                "round_to_target": hit[0] if hit else None,
                "gib_to_target": hit[1] if hit else None,
                "gib_ratio": _ratio(hit[1], ref_hit[1]) if hit and ref_hit else None,
                "time_to_target": hit[2] if hit else None,
                "time_ratio": _ratio(hit[2], ref_hit[2]) if hit and ref_hit else None,
                "energy_to_target": energy,
                "energy_ratio": _ratio(energy, ref_energy),
                # every seed of the series, those the comparison left out too
                "per_seed": [_seed_row(run, goal, metric) for run in all_seeds.runs],
                **{column: _measured_mean(s.rounds, column) for column in LEAKAGE_PANELS},
            })
    return rows


def _seed_row(run: Run, goal: float | None, metric: str) -> dict[str, Any]:
    """One run of a series on its own: how far apart its seeds are."""
    hit = time_to_target(run.rounds, goal, metric) if goal is not None else None
    return {"seed": run.config.get("seed"), "best": _best(run.rounds, _metric(metric)),
            "gib_to_target": hit[1] if hit else None,
            "time_to_target": hit[2] if hit else None}


# ---------------------------------------------------------------- scalability
def _run_costs(run: Run) -> dict[str, float]:
    # Round 0 also builds models, actors and datasets once; it would inflate per-round costs.
    rows = [r for r in run.rounds if r["round"] >= 1] if len(run.rounds) >= 2 else run.rounds
    wall = [_num(r.get("wall_round_time")) for r in rows]
    steps = sum(v for v in (_num(r.get("client_steps")) for r in rows) if not math.isnan(v))
    total_wall = sum(v for v in wall if not math.isnan(v))
    memory = [v for v in (_num(r.get("memory_total")) for r in run.rounds) if not math.isnan(v)]
    return {"wall_per_round": _mean(wall),
            "steps_per_s": steps / total_wall if total_wall > 0 else math.nan,
            "peak_memory_gib": max(memory) / GIB if memory else math.nan,
            "sim_round_time": _mean(_num(r.get("sim_round_time")) for r in rows),
            "rounds": float(len(run.rounds))}


@dataclass
class ScalingLine:
    algorithm: str
    label: str
    points: list[tuple[Any, int, dict[str, float]]]   # (axis value, runs, mean costs)
    colour: str = _OTHER_COLOUR


def scaling_lines(runs: list[Run], axis: str) -> list[ScalingLine]:
    """Per-run costs against ``axis`` (clients or workers), averaged over seeds;
    only lines with at least two axis values."""
    import pandas as pd

    if len({_key(run.config.get(axis)) for run in runs}) < 2:
        return []
    groups: dict[str, tuple[dict, dict[Any, list[dict]], Run]] = {}
    for run in runs:
        cfg = scientific_config(run.config)
        cfg.pop(axis, None)
        # The layout changes costs though not results: runs of different layouts
        # are different lines, never averaged.
        cfg |= {f: run.config.get(f) for f in LAYOUT_FIELDS if f != axis}
        points = groups.setdefault(_key(cfg), (cfg, defaultdict(list), run))[1]
        points[run.config.get(axis)].append(_run_costs(run))
    kept = [group for group in groups.values() if len(group[1]) >= 2]
    shown = [f for f in _varying([cfg for cfg, _, _ in kept]) if f != "algorithm"]
    lines = []
    for cfg, points, first in kept:
        extra = ", ".join(f"{f}={_show(cfg.get(f))}" for f in shown)
        label = first.label + (f" ({extra})" if extra else "")
        means = [(x, len(costs), pd.DataFrame(costs).mean().to_dict())     # NaN skipped
                 for x, costs in sorted(points.items(), key=lambda item: _sort_value(item[0]))]
        lines.append(ScalingLine(cfg["algorithm"], label, means, first.colour))
    return sorted(lines, key=lambda line: (_rank(line.algorithm), line.label))


# ---------------------------------------------------------------- study over clients
def _stopped_at_budget(run: Run) -> bool:
    budget = run.config.get("budget_gib")
    spent = _num(run.rounds[-1].get("cumulative_bytes")) / GIB if run.rounds else 0.0
    return budget is not None and spent >= budget


def unfinished(run: Run) -> bool:
    """A run with fewer rounds than planned that did not stop at its byte budget."""
    planned = run.config.get("rounds")
    return (isinstance(planned, int) and len(run.rounds) < planned
            and not _stopped_at_budget(run))


def _best_within(rounds: list[dict[str, Any]], m: Metric, column: str, budget: float) -> float:
    """The best value of the metric evaluated while ``column`` was within the budget."""
    within = [row for row in rounds if _num(row.get(column)) <= budget * (1 + 1e-9)]
    return _best(within, m)


def _column_max(rounds: list[dict[str, Any]], column: str) -> float:
    values = [v for v in (_num(row.get(column)) for row in rounds) if not math.isnan(v)]
    return max(values) if values else math.nan


def _equal_budgets(members: list[Series], still_going: Callable[[Series], bool]
                   ) -> tuple[float, float]:
    """The bytes and simulated time that every one of these series spent: the least
    of their totals. Series still going are left out (unless all are): one would set
    everyone's budget at where it happens to be."""
    complete = [s for s in members if not still_going(s)] or members
    return (min(_column_max(s.rounds, "cumulative_bytes") for s in complete),
            min(_column_max(s.rounds, "sim_time") for s in complete))


def client_study(series: list[Series], metric: str = "accuracy", target: float | None = None,
                 lines: tuple[str, ...] = (), panels: tuple[str, ...] = ()) -> list[dict[str, Any]]:
    """Per facet (partition, say), client count and algorithm: what the same training
    buys as the data is split over more clients. The budgets are per client count:
    the bytes and simulated time that every algorithm at that count spent (the least
    of their totals), so each is scored on what all of them had; the target is one
    per facet (given, or its weakest series' best), so costs compare across counts.
    Empty unless the client count varies."""
    if len({_key(s.config.get("clients")) for s in series}) < 2:
        return []
    m = _metric(metric)
    line_fields = [f for f in _line_fields(series, lines) if f != "clients"]
    rows = []
    for facet in _facets(series, lines, exclude=("clients",), panels=panels):
        goal = target if target is not None else _default_target(
            [_best(s.rounds, m) for s in facet.series], m)
        by_clients: dict[Any, list[Series]] = defaultdict(list)
        for s in facet.series:
            by_clients[s.config.get("clients")].append(s)
        for clients in sorted(by_clients, key=_sort_value):
            whole = by_clients[clients]
            members, shared = _on_shared_seeds(whole)
            all_seeds = {id(cut): _seeds(s) for cut, s in zip(members, whole)}
            still_going = {id(s): any(map(unfinished, s.runs)) for s in members}
            budget_bytes, budget_time = _equal_budgets(members, lambda s: still_going[id(s)])
            for s in sorted(members, key=lambda s: (_rank(s.algorithm), _key(s.config))):
                hit = time_to_target(s.rounds, goal, metric) if goal is not None else None
                alignments = [v for v in (_num(r.get("alignments")) for r in s.rounds)
                              if not math.isnan(v)]
                rows.append({
                    "facet": facet.label, "clients": clients, "algorithm": s.algorithm,
                    "label": _line_label(s, line_fields), "colour": s.colour,
                    "runs": len(s.runs), "rounds": len(s.rounds),
                    "seeds": all_seeds[id(s)], "shared_seeds": shared,
                    "unfinished": still_going[id(s)],
                    "best": _best(s.rounds, m),
                    "budget_gib": budget_bytes / GIB,
                    "best_at_budget_bytes": _best_within(s.rounds, m, "cumulative_bytes",
                                                         budget_bytes),
                    "budget_sim_time": budget_time,
                    "best_at_budget_time": _best_within(s.rounds, m, "sim_time", budget_time),
                    "target": goal,
                    "gib_to_target": hit[1] if hit else None,
                    "energy_to_target": (_at_round(s.rounds, hit[0], "cumulative_energy_j")
                                         if hit else None),
                    "server_state_mib": _column_max(s.rounds, "server_state_bytes") / 2 ** 20,
                    "alignments_per_client": (sum(alignments) / float(clients)
                                              if alignments else math.nan),
                    "estimate_cosine": _measured_mean(s.rounds, "estimate_cosine"),
                })
    return rows


STUDY_PANELS = (  # row key, panel title, y label, scale
    ("best_at_budget_bytes", "at equal bytes", "best test accuracy (%)", 100.0),
    ("best_at_budget_time", "at equal simulated time", "best test accuracy (%)", 100.0),
    ("gib_to_target", "bytes to target", "GiB", 1.0),
    ("energy_to_target", "client energy to target", "kJ", 1e-3),
    ("server_state_mib", "server's peak state", "MiB", 1.0),
    ("estimate_cosine", "estimate's cosine", "cosine with the true gradient", 1.0),
)


def _study_figure(rows: list[dict[str, Any]], series: list[Series], metric: Metric):
    facets = list(dict.fromkeys(row["facet"] for row in rows))
    # The budgets (each count's least total of the algorithms) are explained in report.md.
    fig, axes = _grid(len(STUDY_PANELS) * len(facets),
                      "Over the number of clients, same data and training" + _context(series))
    for i, facet in enumerate(facets):
        mine = [row for row in rows if row["facet"] == facet]
        for j, (key, title, ylabel, scale) in enumerate(STUDY_PANELS):
            if metric.name != "accuracy" and key.startswith("best"):
                ylabel = metric.title
                scale = metric.scale
            ax = axes[i * len(STUDY_PANELS) + j]
            for label in dict.fromkeys(row["label"] for row in mine):
                points = [(row["clients"], row[key]) for row in mine if row["label"] == label]
                points = [(x, y * scale) for x, y in points
                          if y is not None and not math.isnan(y)]
                if points:
                    colour = next(row["colour"] for row in mine if row["label"] == label)
                    ax.plot([p[0] for p in points], [p[1] for p in points], "-o", color=colour,
                            label=label)
            ax.set_xscale("log")
            target = mine[0]["target"]
            name = f"{title} ({metric.show(target)})" if "target" in title and target else title
            _finish(ax, f"{facet}: {name}" if len(facets) > 1 else name,
                    "clients (log scale)", ylabel)
    return fig


# ---------------------------------------------------------------- figures
CURVE_AXES = {  # x name -> (axis label, value of a round row)
    "communication": ("communication (GiB)", lambda row: _num(row.get("cumulative_bytes")) / GIB),
    "sim_time": ("simulated time (s)", lambda row: _num(row.get("sim_time"))),
    "round": ("round", lambda row: float(row["round"])),
    "energy": ("energy of all clients (kJ)", lambda row: _num(row.get("cumulative_energy_j")) / 1e3),
}
# The leakage observer's columns (raysage/leakage.py), also tabulated (their means over a
# run) under shorter heads than the leakage figure's panel titles.
LEAKAGE_PANELS = {panel.column: panel.title for panel in Leakage.figure.panels}
LEAKAGE_HEADS = dict(zip(LEAKAGE_PANELS, ("input dCor", "label attack, smashed",
                                          "label attack, gradients"), strict=True))
SCALING_PANELS = (  # cost, panel title, y label
    ("wall_per_round", "host wall time per round", "wall time / round (s, rounds >= 1)"),
    ("steps_per_s", "client throughput", "client steps / s of host time"),
    ("peak_memory_gib", "peak memory", "peak memory (GiB, PSS of process tree)"),
    ("sim_round_time", "simulated round time", "simulated time / round (s)"),
)


def _grid(panels: int, title: str, ncols: int = 3):
    from matplotlib.figure import Figure  # no pyplot: nothing global to leak or close

    ncols = min(panels, ncols)
    nrows = math.ceil(panels / ncols)
    fig = Figure(figsize=(5.2 * ncols, 4.0 * nrows), dpi=_DPI, layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    for ax in axes[panels:]:
        ax.set_visible(False)
    fig.suptitle(title)
    return fig, list(axes[:panels])


def _finish(ax, title: str, xlabel: str, ylabel: str) -> None:
    ax.set_title(title, fontsize="medium")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3)
    handles = ax.get_legend_handles_labels()[0]
    if len(handles) > 4:
        # Inside, that many would hide the curves; below, they would cover the x label.
        ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.02, 1.0))
    elif handles:
        ax.legend(fontsize="small")


def _context(series: list[Series]) -> str:
    shared = [str(series[0].config.get(f)) for f in ("dataset", "model")
              if len({_key(s.config.get(f)) for s in series}) == 1]
    return f" ({', '.join(shared)})" if shared else ""


def _curve_figure(series: list[Series], metric: Metric, x: str,
                  targets: dict[str, float | None] | None = None, lines: tuple[str, ...] = (),
                  panels: tuple[str, ...] = ()):
    xlabel, x_of = CURVE_AXES[x]
    facets, line_fields = _facets(series, lines, panels=panels), _line_fields(series, lines, panels)
    style = _line_styles(series, line_fields)
    fig, axes = _grid(len(facets), f"{metric.title.split(' (')[0]} vs {x.replace('_', ' ')}"
                      + _context(series))
    for ax, facet in zip(axes, facets):
        for s in facet.series:
            points = [(x_of(r), metric.value(r) * metric.scale) for r in s.rounds]
            points = [p for p in points if not (math.isnan(p[0]) or math.isnan(p[1]))]
            ax.plot([p[0] for p in points], [p[1] for p in points], **style(s, len(points)),
                    markersize=3, color=s.colour, label=_line_label(s, line_fields))
        wide = x != "round" and _spans_decades(ax)
        goal = (targets or {}).get(facet.label)
        if goal is not None:
            ax.axhline(goal * metric.scale, color="black", linewidth=0.8, linestyle=":",
                       label="target")
        label = xlabel
        if wide:
            # Algorithms differ in cost by 10x and more: on a linear axis the
            # cheap ones would all crowd into the first few pixels.
            ax.set_xscale("log")
            label = xlabel.replace(")", ", log scale)")
        _finish(ax, facet.label, label, metric.title)
    return fig


def _observer_figure(series: list[Series], figure: Figure, lines: tuple[str, ...] = (),
                     panels: tuple[str, ...] = ()):
    """An observer's measurements against round: one panel per column that any run
    measured, per facet (see raysage.observers)."""
    panels = [p for p in figure.panels
              if any(not math.isnan(_num(r.get(p.column))) for s in series for r in s.rounds)]
    if not panels:
        return None
    facets, line_fields = _facets(series, lines, panels=panels), _line_fields(series, lines, panels)
    style = _line_styles(series, line_fields)
    fig, axes = _grid(len(panels) * len(facets), figure.title + _context(series),
                      ncols=len(panels))
    for i, facet in enumerate(facets):
        for j, panel in enumerate(panels):
            ax = axes[i * len(panels) + j]
            for s in facet.series:
                points = [(r["round"], _num(r.get(panel.column))) for r in s.rounds]
                points = [p for p in points if not math.isnan(p[1])]
                if points:
                    ax.plot([p[0] for p in points], [p[1] for p in points],
                            **style(s, len(points)), markersize=3, color=s.colour,
                            label=_line_label(s, line_fields))
            if panel.log and _positive_decades(ax):
                ax.set_yscale("log")
            _finish(ax, f"{facet.label}: {panel.title}" if len(facets) > 1 else panel.title,
                    "round", panel.ylabel)
    return fig


def _positive_decades(ax) -> bool:
    values = [v for line in ax.get_lines() for v in line.get_ydata() if v > 0]
    return bool(values) and max(values) / min(values) > 100


def _spans_decades(ax) -> bool:
    ends = [line.get_xdata()[-1] for line in ax.get_lines() if len(line.get_xdata())
            and line.get_xdata()[-1] > 0]
    starts = [x for line in ax.get_lines() for x in line.get_xdata()[:1] if x > 0]
    return bool(ends and starts) and max(ends) / min(starts) > 100


def _alpha_figure(series: list[Series], metric: Metric, lines: tuple[str, ...] = (),
                  panels: tuple[str, ...] = ()):
    line_fields = _line_fields(series, lines, panels)
    facets = [f for f in _facets(series, lines, exclude=("partition", "alpha"), panels=panels)
              if any(s.config.get("partition") == "dirichlet" for s in f.series)]
    fig, axes = _grid(len(facets), "Best test accuracy vs Dirichlet alpha" + _context(series))
    for ax, facet in zip(axes, facets):
        lines: dict[tuple, list[Series]] = defaultdict(list)
        for s in facet.series:
            if s.config.get("partition") == "dirichlet":
                lines[(s.algorithm, _line_values(s, line_fields))].append(s)
        for members in sorted(lines.values(), key=lambda m: (_rank(m[0].algorithm), _key(m[0].config))):
            members.sort(key=lambda s: s.config["alpha"])
            ax.plot([s.config["alpha"] for s in members],
                    [_best(s.rounds, metric) * metric.scale for s in members], "-o",
                    color=members[0].colour,
                    label=_line_label(members[0], line_fields))
        for s in facet.series:   # iid is the alpha -> infinity limit: a reference level
            if s.config.get("partition") == "iid" and (s.algorithm, _line_values(s, line_fields)) in lines:
                ax.axhline(_best(s.rounds, metric) * metric.scale, color=s.colour,
                           linestyle="--", linewidth=1, label=f"{_line_label(s, line_fields)} iid")
        ax.set_xscale("log")
        alphas = sorted({s.config["alpha"] for s in facet.series if s.config.get("alpha") is not None})
        ax.set_xticks(alphas, [_show(a) for a in alphas])   # the swept values, not powers of 10
        _finish(ax, facet.label, "Dirichlet alpha (log scale)", "best test accuracy (%)")
    return fig


def _scaling_figure(lines: list[ScalingLine], axis: str):
    xlabel = "number of clients" if axis == "clients" else "number of client workers"
    xs = [float(p[0]) for line in lines for p in line.points if _num(p[0]) > 0]
    log_x = bool(xs) and max(xs) >= 100 * min(xs)   # 10 to 10,000 clients: each decade readable
    if log_x:
        xlabel += " (log scale)"
    fig, axes = _grid(4, f"Scalability vs {axis} (round 0 left out of per-round means: "
                      "it includes one-off setup)", ncols=2)
    for ax, (cost, title, ylabel) in zip(axes, SCALING_PANELS):
        for line in lines:
            ax.plot([p[0] for p in line.points], [p[2][cost] for p in line.points], "-o",
                    color=line.colour, label=line.label)
        if log_x:
            ax.set_xscale("log")
        _finish(ax, title, xlabel, ylabel)
    return fig


def _save_figure(fig, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        fig.savefig(tmp, format="png", dpi=_DPI)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _save_text(text: str, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


# ---------------------------------------------------------------- report
def _gib(value: float | None) -> str:
    if value is None:
        return "not reached"
    return f"{value:.4f}" if value >= 0.01 else f"{value:.3g}"


def _seconds(value: float | None) -> str:
    # A datacenter's round takes milliseconds: three significant digits below a second.
    if value is None or math.isnan(value):
        return "not reached"
    return f"{value:.1f}" if value >= 1 else f"{value:.3g}"


def _times(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def _kilojoules(value: float | None) -> str:
    return "not reached" if value is None else f"{value / 1e3:.3g}"


def _share(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def _settings(series: list[Series], lines: tuple[str, ...], panels: tuple[str, ...]) -> list[str]:
    """report.md's lines for the fields that go with the algorithm or an axis."""
    out = []
    for field, by in following_fields(series, lines, panels).items():
        pairs = {}
        ordered = series if by == "algorithm" else sorted(
            series, key=lambda s: _sort_value(s.config.get(by)))
        for s in ordered:
            if field in s.config:
                lead = s.label if by == "algorithm" else f"{by}={_show(s.config.get(by))}"
                pairs.setdefault(lead, _show(s.config[field]))
        out.append(f"- `{field}` goes with the {by}: " +
                   ", ".join(f"{lead} {value}" for lead, value in pairs.items()))
    return out


def _seed_note(rows: list[dict[str, Any]], where: str = "this table compares") -> list[str]:
    """report.md's warning for a comparison whose series ran on different seeds."""
    shared = rows[0]["shared_seeds"]
    if shared is None:
        return []
    each = "; ".join(f"{row['label']} {', '.join(map(_show, row['seeds']))}" for row in rows)
    why = ("A seed draws the partition, the initial models and each client's straggler "
           "slowdown")
    if shared:
        return [f"The series ran on different seeds ({each}). {why}, so {where} "
                f"every series over the seeds all of them have: "
                f"{', '.join(map(_show, shared))}; the figures average each series over all "
                "its seeds.", ""]
    return [f"The series ran on different seeds and share none ({each}). {why}, so {where} "
            "means over different seeds (with stragglers, their simulated times do "
            "not compare); run every series on a common seed.", ""]


def _study_markdown(rows: list[dict[str, Any]], metric: Metric) -> list[str]:
    out = ["", "## Over the number of clients", "",
           "At each client count the budgets are the least total bytes and simulated time of "
           "the algorithms there, so each is scored on what all of them had spent; the best "
           f"{metric.name} within them is shown. The target is one per facet, so costs compare "
           "across counts. Server state is the most the server held in any round (models, "
           "optimizer state, per-client state); alignments per client count FSL-SAGE's "
           "alignments over the run divided by the clients; the estimate cosine is the mean "
           "over rounds of the gradient a client trained on against the true one."]
    for facet in dict.fromkeys(row["facet"] for row in rows):
        mine = [row for row in rows if row["facet"] == facet]
        goal = mine[0]["target"]
        out += ["", f"### {facet}", "",
                f"Target: {metric.name} {metric.show(goal)}." if goal is not None else
                "No target.", "",
                "| clients | algorithm | runs | rounds | best | GiB budget | best within it "
                "| sim s budget | best within it | GiB to target | client kJ to target "
                "| server peak MiB | alignments / client | estimate cosine |",
                "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for row in mine:
            per_client = row["alignments_per_client"]
            out.append("| " + " | ".join([
                _show(row["clients"]), row["label"] + (" (unfinished)" if row["unfinished"] else ""),
                str(row["runs"]), str(row["rounds"]),
                metric.show(row["best"]), _gib(row["budget_gib"]),
                metric.show(row["best_at_budget_bytes"]), _seconds(row["budget_sim_time"]),
                metric.show(row["best_at_budget_time"]), _gib(row["gib_to_target"]),
                _kilojoules(row["energy_to_target"]), f"{row['server_state_mib']:.1f}",
                "-" if math.isnan(per_client) else f"{per_client:.2f}",
                _share(row["estimate_cosine"])]) + " |")
        for clients in dict.fromkeys(row["clients"] for row in mine):
            note = _seed_note([row for row in mine if row["clients"] == clients],
                              f"the rows of {_show(clients)} clients compare")
            if note:
                out += ["", note[0]]
    return out


def _markdown(runs: list[Run], series: list[Series], table: list[dict], metric: Metric,
              scaling: dict[str, list[ScalingLine]], figures: list[str],
              baseline: str | None = None, study: list[dict[str, Any]] = (),
              settings: list[str] = (), rounds: int | None = None) -> str:
    out = [f"# raysage report: {metric.title.split(' (')[0]}", "",
           (f"{len(runs)} runs in {len(series)} series; runs that differ only in seed or in "
            "execution settings are one series, averaged over the rounds all of them have."
            + (f" Each run up to round {rounds - 1} only (--rounds {rounds})."
               if rounds is not None else "")), "",
           "## Runs", ""]
    for run in runs:
        planned, budget = run.config.get("rounds"), run.config.get("budget_gib")
        done = f"{len(run.rounds)}/{planned} rounds" + (
            f" (stopped at the {budget:g} GiB budget)" if _stopped_at_budget(run) else
            " (unfinished)" if unfinished(run) else "")
        # Each run's own best and final, so per-seed numbers come from the report too.
        scores = (f", best {metric.show(_best(run.rounds, metric))}, final "
                  f"{metric.show(_final(run.rounds, metric))}")
        out.append(f"- `{run.path}`: {run.label}, seed "
                   f"{run.config.get('seed')}, {done}{scores}")
    if settings:
        out += ["", "Settings that go with a line or panel rather than making panels of their "
                "own:", "", *settings]
    named = next((run.label or run.algorithm for run in runs if run.algorithm == baseline), None)
    ratios = (f"Ratios are the algorithm's cost over {named}'s (above 1x: {named} needed "
              "less). " if named else "")
    # Leakage columns only where some run measured leakage (the observer is off by default).
    leakage = {c: head for c, head in LEAKAGE_HEADS.items()
               if any(row[c] is not None for row in table)}
    out += ["", "## Cost to reach the target", "",
            ratios + "Energy is all clients' simulated energy up to the round that reached the "
            "target." + (" Leakage columns are means over the run's rounds of the leakage "
                         "observer's measurements (`-`: nothing of that kind crosses the link, "
                         "or not measured); see the README's \"Leakage and energy\" for what "
                         "they mean and their limits." if leakage else "")]
    compare = ">=" if metric.higher_is_better else "<="
    versus = [f"vs {named}"] if named else []
    heads = ["algorithm", "runs", "best", "final", "rounds", "GiB in all", "sim time in all (s)",
             "best within the GiB budget", "best within the time budget", "GiB to target",
             *versus,
             "sim time to target (s)", *versus, "client energy to target (kJ)", *versus,
             *leakage.values()]
    for facet in dict.fromkeys(row["facet"] for row in table):
        rows = [row for row in table if row["facet"] == facet]
        goal = rows[0]["target"]
        out += ["", f"### {facet}", "",
                f"Target: {metric.name} {compare} {metric.show(goal)} ({rows[0]['target_rule']})."
                if goal is not None else "No target: no algorithm has an evaluated round.", "",
                *_seed_note(rows),
                f"Budgets: {_gib(rows[0]['budget_gib'])} GiB and "
                f"{_seconds(rows[0]['budget_sim_time'])} s of simulated time, the least that "
                "any series spent in all (leaving out series still going, unless all are).", "",
                "| " + " | ".join(heads) + " |",
                "|---|" + "---:|" * (len(heads) - 1)]
        for row in rows:
            cells = [row["label"], str(row["runs"]), metric.show(row["best"]),
                     metric.show(row["final"]), str(row["rounds"]), _gib(row["total_gib"]),
                     _seconds(row["total_sim_time"]), metric.show(row["best_at_budget_bytes"]),
                     metric.show(row["best_at_budget_time"])]
            for value, ratio, show in (("gib_to_target", "gib_ratio", _gib),
                                       ("time_to_target", "time_ratio", _seconds),
                                       ("energy_to_target", "energy_ratio", _kilojoules)):
                cells += [show(row[value])] + ([_times(row[ratio])] if named else [])
            out.append("| " + " | ".join(cells + [_share(row[c]) for c in leakage])
                       + " |")
        if any(len(row["per_seed"]) > 1 for row in rows):
            out += ["", "Each seed on its own, all that each series has (the rows above score the mean curve over the seeds they compare):", "",
                    "| algorithm | seed | best | GiB to target | sim time to target (s) |",
                    "|---|---:|---:|---:|---:|"]
            out += [f"| {row['label']} | {one['seed']} | {metric.show(one['best'])} | "
                    f"{_gib(one['gib_to_target'])} | {_seconds(one['time_to_target'])} |"
                    for row in rows for one in row["per_seed"]]
    if study:
        out += _study_markdown(list(study), metric)
    for axis, lines in scaling.items():
        out += ["", f"## Scalability: {axis}", "",
                "Per-round means leave out round 0 (one-off setup) when a run has more rounds.", "",
                (f"| {axis} | algorithm | runs | rounds | wall s/round | client steps/s "
                 "| peak memory GiB | sim round time s |"),
                "|---:|---|---:|---:|---:|---:|---:|---:|"]
        for line in lines:
            for x, n, c in line.points:
                shown = "0 (auto)" if axis == "workers" and x == 0 else _show(x)
                out.append(f"| {shown} | {line.label} | {n} | {c['rounds']:g} | "
                           f"{c['wall_per_round']:.3f} | {c['steps_per_s']:.1f} | "
                           f"{c['peak_memory_gib']:.3f} | {c['sim_round_time']:.1f} |")
    out += ["", "## Figures", ""]
    out += [f"![{name[:-4].replace('_', ' ')}]({name})\n" for name in figures]
    return "\n".join(out).rstrip() + "\n"


def write_report(paths: str | os.PathLike | Iterable[str | os.PathLike], out_dir: str | os.PathLike,
                 target: float | None = None, metric: str = "auto",
                 lines: Iterable[str] = (), baseline: str | None = None,
                 panels: Iterable[str] = (), rounds: int | None = None) -> dict[str, Any]:
    """Figures and report.md for the given runs in out_dir; returns a summary.

    ``metric="auto"`` is test loss when every run is a language model, else accuracy.
    ``lines`` are config fields that tell lines apart within a panel instead of
    splitting the figures into panels; ``panels`` are scalability axes (clients)
    drawn as panels instead of lines. ``baseline`` names the algorithm whose cost
    to the target every other one's is divided by (none: no ratios). ``rounds``
    keeps each run's first rounds only, so runs made for different horizons (20
    and 40 rounds) compare over the same one.
    """
    if rounds is not None and (isinstance(rounds, bool) or not isinstance(rounds, int)
                               or rounds < 1):
        raise ConfigError(f"--rounds {rounds}: give the number of rounds (1 or more) to keep "
                          "of each run")
    runs = [_first_rounds(run, rounds) for run in load_runs(paths)]
    lines, panels = tuple(lines), tuple(panels)
    for name in panels:
        if name not in SCALING_AXES:
            raise ConfigError(f"--panels {name}: only a scalability axis ({', '.join(SCALING_AXES)}) "
                              "is drawn as lines by default; other fields already make panels")
    if baseline is not None and not any(run.algorithm == baseline for run in runs):
        found = sorted({run.algorithm for run in runs})
        raise ConfigError(f"--baseline {baseline}: no run is of that algorithm; give one of "
                          f"{', '.join(found)}")
    for name in lines:
        if not any(name in run.config for run in runs):
            raise ConfigError(f"--lines {name}: no run has a config field {name!r}; give a field "
                              "of run.parquet's config, such as align_interval or client_lr")
    if metric == "auto":
        language = all(run.config.get("model") == "gpt2" for run in runs)
        metric = "test_loss" if language else "accuracy"
    m = _metric(metric)
    series = group_series(runs)
    table = target_table(series, target, metric, lines, baseline, panels)
    study = client_study(series, metric, target, lines, panels)
    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DataError(f"cannot create report folder {out}: {exc.strerror}; "
                        "give a writable --out folder") from None

    figures: list[str] = []
    targets = {row["facet"]: row["target"] for row in table}

    def save(fig, name: str) -> None:
        _save_figure(fig, out / name)
        figures.append(name)

    for x, (_, x_of) in CURVE_AXES.items():
        # Runs written before a column existed (energy) get no empty figure.
        if any(not math.isnan(x_of(r)) for s in series for r in s.rounds):
            save(_curve_figure(series, m, x, targets, lines, panels), f"{m.name}_vs_{x}.png")
    alphas = {s.config.get("alpha") for s in series if s.config.get("partition") == "dirichlet"}
    if m.name == "accuracy" and len(alphas) >= 2:
        save(_alpha_figure(series, m, lines, panels), "best_accuracy_vs_alpha.png")
    for observer in OBSERVERS:
        drawn = _observer_figure(series, observer.figure, lines, panels)
        if drawn is not None:
            save(drawn, observer.figure.name)
    # (The walrus would bind in this function's scope: it must not reuse ``lines``.)
    scaling = {axis: found for axis in SCALING_AXES if (found := scaling_lines(runs, axis))}
    for axis, found in scaling.items():
        save(_scaling_figure(found, axis), f"scalability_{axis}.png")
    if study:
        save(_study_figure(study, series, m), "study_vs_clients.png")

    _save_text(_markdown(runs, series, table, m, scaling, figures, baseline, study,
                         _settings(series, lines, panels), rounds),
               out / "report.md")
    return {"runs": len(runs), "series": len(series), "figures": figures, "table": table,
            "study": study,
            "scalability": {axis: [(line.label, line.points) for line in lines]
                            for axis, lines in scaling.items()},
            "report": str(out / "report.md")}
