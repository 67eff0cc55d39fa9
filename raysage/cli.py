"""The ``raysage`` command: a thin layer over :mod:`raysage`'s Python API.

Every config field is a flag of ``raysage simulate``, ``plan`` and ``sweep``
with the field's name (``client_lr`` -> ``--client-lr``), and so is every
algorithm's parameter (``--align-interval``); the flags are generated from
the pydantic models, so the two never drift apart. ``--algorithm
my_algo.py:MyAlgo`` adds that algorithm's parameters as flags too.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import Any, Literal, Optional, get_args, get_origin

import typer

from .config import FIELDS, load_config, parameter_fields, parse_yaml, shown
from .errors import RaysageError

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Simulate federated split learning (FSL-SAGE and baselines) on Ray.")


def _version(shown_now: bool) -> None:
    if shown_now:
        import ray
        import torch

        from . import __version__

        typer.echo(f"raysage {__version__} (ray {ray.__version__}, torch {torch.__version__})")
        raise typer.Exit()


@app.callback()
def _options(version: bool = typer.Option(False, "--version", is_eager=True,
                                          callback=_version,
                                          help="print raysage's version (and Ray's and "
                                               "torch's) and exit")) -> None:
    """Simulate federated split learning (FSL-SAGE and baselines) on Ray."""


def _help(field, owners: str = "") -> str:
    text = (field.description or "").strip()
    if owners:
        text = f"({owners}) {text}"
    choices = get_args(field.annotation) if get_origin(field.annotation) is Literal else ()
    if choices:
        text += f"; one of: {', '.join(map(str, choices))}"
    if field.default is not None and not callable(field.default):
        text += f" (default: {field.default})"
    return text


def flags_help() -> str:
    """The config flags, for --help: every field, then every algorithm's parameters."""
    from .algorithms import ALGORITHMS

    lines = ["Config flags (--name VALUE, for every field of the config):", ""]
    lines += [f"--{name.replace('_', '-')}: {_help(f)}" for name, f in FIELDS.items()]
    owners: dict[str, list[str]] = {}
    for cls in ALGORITHMS.values():
        for name in cls.Params.model_fields:
            owners.setdefault(name, []).append(cls.name)
    lines += ["", "Algorithm parameters (those of another algorithm are ignored; your own "
              "algorithm's come with --algorithm file.py:Class):", ""]
    lines += [f"--{name.replace('_', '-')}: {_help(f, ', '.join(owners[name]))}"
              for name, f in parameter_fields().items()]
    return "\n\n".join(lines)


def config_flags(args: list[str], positional: int = 0) -> tuple[dict[str, str], list[str]]:
    """The config flags among a command's extra arguments (--name VALUE or --name=VALUE),
    and up to ``positional`` plain arguments. Names are checked when the config is
    built, so a wrong one is its one-line error."""
    flags: dict[str, str] = {}
    plain: list[str] = []
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--") or arg == "--":
            if len(plain) == positional:
                _fail(f"unexpected argument {shown(arg)}; config flags are --name VALUE")
            plain.append(arg)
            i += 1
            continue
        name, eq, value = arg[2:].partition("=")
        if not eq:
            if i + 1 >= len(args):
                _fail(f"flag --{name} needs a value")
            value = args[i + 1]
            i += 1
        flags[name.replace("-", "_")] = value
        i += 1
    return flags, plain


# Config flags are not declared one by one: they come from the config model.
CONFIG_COMMAND = {"context_settings": {"allow_extra_args": True,
                                       "ignore_unknown_options": True}}


def _fail(message: str) -> None:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(2)


def _fmt(value: float, digits: int = 3) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) \
        else f"{value:.{digits}f}"


def _resumable(location: Optional[str]) -> bool:
    """Whether ``--resume`` has something to continue there: a run folder with a saved config."""
    if location is None:
        return False
    from .results import RunFolder

    try:
        folder = RunFolder(location)
        return folder.exists("config.yaml")
    except Exception:  # an unusable location holds nothing to resume
        return False


def _run_simulate(config_file: Optional[Path], resume: Optional[str] = None,
                  **overrides: Any) -> None:
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
    from rich.table import Table

    console = Console(stderr=True)
    cfg = None
    try:
        from .engine.orchestrator import GIB, simulate

        changes: dict[str, Any] = {}
        if resume is not None:
            from .engine.checkpoint import RESUMABLE_FIELDS
            from .engine.orchestrator import resume_config

            given = [k for k, v in overrides.items() if v is not None]
            refused = [k for k in given if k not in RESUMABLE_FIELDS]
            if refused or config_file:
                allowed = ", ".join("--" + k.replace("_", "-") for k in RESUMABLE_FIELDS)
                _fail("--resume continues a run with its saved config and takes only "
                      f"{allowed}; drop the other flags ("
                      + ", ".join("--" + k.replace("_", "-") for k in refused or ["config"])
                      + ")")
            changes = {k: overrides[k] for k in given}
            cfg = resume_config(resume)
            cfg = cfg.replace(**changes) if changes else cfg
        else:
            from .engine.orchestrator import default_run_dir

            cfg = load_config(config_file, **overrides)
            if cfg.out is None:
                cfg = cfg.replace(out=str(default_run_dir(cfg)))
        progress = Progress(TextColumn("round {task.completed}/{task.total}"), BarColumn(),
                            TextColumn("{task.fields[status]}"), TimeElapsedColumn(),
                            console=console, transient=False)
        with progress:
            task = progress.add_task("simulate", total=cfg.rounds, status="starting")

            def on_round(row: dict) -> None:
                status = (f"acc {_fmt(row['accuracy'])}  {row['cumulative_bytes'] / GIB:.3f} GiB  "
                          f"sim {row['sim_time']:.1f} s")
                progress.update(task, completed=row["round"] + 1, status=status)

            try:
                result = simulate(cfg, on_round=on_round, resume=resume, changes=changes,
                                  announce=lambda line: progress.console.print(
                                      line, soft_wrap=True, markup=False, highlight=False))
            except BaseException:
                # The error line says what happened; a bar stuck at "starting" adds nothing.
                progress.live.transient = True
                raise
    except RaysageError as exc:
        _fail(str(exc))
    except MemoryError as exc:
        _fail(f"out of memory ({exc or 'MemoryError'}); lower --clients, --samples-per-client or "
              "--test-samples, or use a smaller --model")
    except KeyboardInterrupt:
        location = cfg.out if cfg is not None else resume
        if _resumable(location):
            _fail("interrupted; the run folder is consistent: continue it with "
                  f"raysage simulate --resume {location}")
        _fail("interrupted before the run folder was written; nothing to resume")

    from .algorithms import algorithm_class

    s = result.summary
    totals = [(f"communication (bytes, {t.label})", f"{s[t.name]:,}")
              for t in algorithm_class(cfg.algorithm).byte_totals]
    table = Table(title=f"raysage {s['algorithm']} - {s['clients']} clients, {s['rounds']} rounds")
    table.add_column("metric")
    table.add_column("value", justify="right", overflow="fold")
    for label, value in [
        ("final test accuracy", _fmt(s["final_accuracy"])),
        ("best test accuracy", _fmt(s["best_accuracy"])),
        ("communication (GiB, labels included)", f"{s['total_gib']:.4f}"),
        *totals,
        ("simulated time (s)", f"{s['sim_time_s']:.2f}"),
        ("wall time (s, after start-up)", f"{s['wall_time_s']:.2f}"),
        ("start-up (s)", f"{s['startup_s']:.2f}"),
        ("run folder", s["run_dir"]),
    ]:
        table.add_row(label, value)
    Console().print(table)


CONFIG_OPTION = typer.Option(None, "--config", "-c",
                             help="YAML file of config fields; flags override it")
RESUME_OPTION = typer.Option(None, "--resume",
                             help="continue the run in this folder from its last checkpoint")


@app.command("simulate", epilog=flags_help(), **CONFIG_COMMAND)
def simulate_command(ctx: typer.Context, config: Optional[Path] = CONFIG_OPTION,
                     resume: Optional[str] = RESUME_OPTION) -> None:
    """Run one simulation and write its run folder."""
    _run_simulate(config, resume, **config_flags(ctx.args)[0])


def _run_plan(config_file: Optional[Path], **overrides: Any) -> None:
    from rich.console import Console
    from rich.table import Table

    from .engine.orchestrator import GIB, plan

    try:
        cfg = load_config(config_file, **overrides)
        rows = plan(cfg)
    except RaysageError as exc:
        _fail(str(exc))
    from .algorithms import algorithm_class

    algorithm = algorithm_class(cfg.algorithm)
    byte_kinds = [kind.name for kind in algorithm.byte_kinds]
    totals = algorithm.byte_totals
    table = Table(title=f"raysage plan: {cfg.algorithm}, {cfg.model}, {cfg.clients} clients "
                        "(no training)")
    for column in ("round", "total bytes", *(f"{t.label} bytes" for t in totals),
                   "clients' energy (J)", "sim round (s)", "sim time (s)"):
        table.add_column(column, justify="right", no_wrap=True)
    for r in rows:
        table.add_row(str(r["round"]), f"{r['total_bytes']:,}",
                      *(f"{r[t.name]:,}" for t in totals), f"{r['energy_j']:,.2f}",
                      f"{r['sim_round_time']:.3f}", f"{r['sim_time']:.3f}")
    total = sum(r["total_bytes"] for r in rows)
    sums = "".join(f"{t.label} {sum(r[t.name] for r in rows):,} bytes; " for t in totals)
    energy = sum(r["energy_j"] for r in rows)
    table.caption = (f"all rounds: {total:,} bytes ({total / GIB:.3f} GiB); "
                     f"{sums}clients' energy {energy:,.1f} J")
    kinds = Table(title="bytes by kind in round 0")
    kinds.add_column("kind")
    kinds.add_column("bytes", justify="right", no_wrap=True)
    for kind in byte_kinds:
        if rows[0][kind]:
            kinds.add_row(kind, f"{rows[0][kind]:,}")
    console = Console()
    console.print(table)
    console.print(kinds)


@app.command("plan", epilog=flags_help(), **CONFIG_COMMAND)
def plan_command(ctx: typer.Context, config: Optional[Path] = CONFIG_OPTION) -> None:
    """Dry run: bytes by kind and simulated time of every round, without training."""
    _run_plan(config, **config_flags(ctx.args)[0])


GRID_OPTION = typer.Option(None, "--grid", help="FIELD=V1,V2,... to vary (repeatable)")
PARALLEL_OPTION = typer.Option(None, "--parallel", min=1,
                               help="most points at once (default: as many as the Ray cluster "
                                    "has room for, each point's trial reserving its server and "
                                    "workers)")
LIST_OPTION = typer.Option(False, "--list", help="list the points and their state; run nothing")


# A sweep's lines are read back from logs (grep, tail): one line each, never wrapped
# at the terminal's width, and a point's name is never read as markup.
LOG_LINE = {"markup": False, "soft_wrap": True}


def _run_sweep(spec: Optional[Path], grid: Optional[list[str]], parallel: Optional[int],
               list_only: bool, **overrides: Any) -> None:
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, \
        TimeElapsedColumn

    from .studies.sweep import load_sweep, point_status, run_sweep

    console = Console(stderr=True)
    try:
        sweep = load_sweep(spec, grid or [], overrides, parallel)
        if list_only:
            for point in sweep.points:
                typer.echo(f"{point_status(point):8s} {point.config.out}")
            return
        running: dict[str, str] = {}
        progress = Progress(TextColumn("points"), MofNCompleteColumn(), BarColumn(),
                            TextColumn("{task.fields[status]}"), TimeElapsedColumn(),
                            console=console)
        with progress:
            task = progress.add_task("sweep", total=len(sweep.points), status="")

            def show() -> None:
                status = (f"running {len(running)}: " + "; ".join(
                    f"{name} {where}" for name, where in running.items())) if running else ""
                progress.update(task, status=status)

            def on_event(kind: str, point, info: dict) -> None:
                total = point.config.rounds
                if kind == "skip":
                    progress.advance(task)
                    progress.console.print(f"skip   {point.name} (finished)", **LOG_LINE)
                elif kind == "start":
                    running[point.name] = f"round 0/{total}"
                    verb = {"resume": "resume", "restart": "restart"}.get(info["status"], "start")
                    progress.console.print(f"{verb:6s} {point.name}", **LOG_LINE)
                elif kind == "round":
                    running[point.name] = f"round {info['round'] + 1}/{total}"
                elif kind in ("finish", "fail"):
                    running.pop(point.name, None)
                    progress.advance(task)
                    line = (f"done   {point.name}: best acc {_fmt(info['best_accuracy'])}, "
                            f"{info['total_gib']:.3f} GiB, {info['wall_time_s']:.0f} s"
                            if kind == "finish" else f"FAILED {point.name}: {info['error']}")
                    progress.console.print(line, **LOG_LINE)
                show()

            outcomes = run_sweep(sweep, on_event=on_event, announce=lambda line: None)
    except RaysageError as exc:
        _fail(str(exc))
    except KeyboardInterrupt:
        _fail("interrupted; run the same command again to skip the finished points and "
              "resume the others")
    failed = [o for o in outcomes if o.status == "failed"]
    stopped = [o for o in outcomes if o.status == "interrupted"]
    done = len(outcomes) - len(failed) - len(stopped)
    typer.echo(f"sweep {sweep.root}: {done}/{len(outcomes)} points finished"
               + (f"; {len(failed)} failed" if failed else "")
               + (f"; {len(stopped)} interrupted" if stopped else "")
               + ("; re-run the same command to continue" if failed or stopped else "")
               + f". Report: raysage report {sweep.root}")
    if failed or stopped:
        raise typer.Exit(1)


@app.command("sweep", epilog=flags_help(), **CONFIG_COMMAND)
def sweep_command(ctx: typer.Context, grid: Optional[list[str]] = GRID_OPTION,
                  parallel: Optional[int] = PARALLEL_OPTION,
                  list_only: bool = LIST_OPTION) -> None:
    """Run a grid of simulations, one Ray Tune trial and one run folder per point;
    finished points are skipped, interrupted ones continue.

    SPEC (optional, first plain argument): YAML of config fields plus 'grid' (field ->
    values, or a list of such grids) and 'parallel'.
    """
    flags, spec = config_flags(ctx.args, positional=1)
    _run_sweep(Path(spec[0]) if spec else None, grid, parallel, list_only, **flags)


SPACE_OPTION = typer.Option(None, "--space", help="FIELD=KIND:ARGS to search (repeatable): "
                            "loguniform:LOW:HIGH, uniform:LOW:HIGH, randint:LOW:HIGH, "
                            "choice:A,B or grid:A,B")
METRIC_OPTION = typer.Option(None, "--metric", help="what the best config "
                             "maximises (or minimises): final_accuracy (default), best_accuracy, "
                             "accuracy@gib=X, accuracy@sim_time=X, gib_to=ACCURACY or "
                             "sim_time_to=ACCURACY")


@app.command("tune", epilog=flags_help(), **CONFIG_COMMAND)
def tune_command(ctx: typer.Context, space: Optional[list[str]] = SPACE_OPTION,
                 metric: Optional[str] = METRIC_OPTION,
                 samples: Optional[int] = typer.Option(None, "--samples", min=1,
                                                       help="trials to sample, each grid "
                                                       "value this many times (default 8)"),
                 asha: bool = typer.Option(True, "--asha/--no-asha", help="stop trials whose "
                                           "accuracy falls behind at the same round (ASHA)"),
                 grace_rounds: int = typer.Option(1, "--grace-rounds", help="rounds every "
                                                  "trial runs before ASHA may stop it"),
                 searcher: str = typer.Option("random", "--searcher", help="random (and "
                                              "grid) sampling, or optuna (TPE; needs the "
                                              "optuna package)"),
                 parallel: Optional[int] = PARALLEL_OPTION) -> None:
    """Search config values for the best value of a metric on Ray Tune; writes the best
    config to OUT/best.yaml, for raysage simulate --config. Re-running the same command
    continues an interrupted search.

    SPEC (optional, first plain argument): YAML of config fields plus 'space' (field ->
    KIND:ARGS), and optionally 'metric' and 'samples'.
    """
    from .studies.tune import load_tuning, run_tuning

    flags, spec = config_flags(ctx.args, positional=1)
    try:
        base = {k: parse_yaml(v, f"--{k}") for k, v in flags.items()}
        tuning = load_tuning(spec[0] if spec else None, space or [], base, metric=metric,
                             samples=samples, asha=asha, grace_rounds=grace_rounds,
                             parallel=parallel, searcher=searcher)
        out = tuning.root

        interrupted: list[bool] = []

        def on_event(kind: str, trial: str, info: dict) -> None:
            if kind == "interrupted":
                interrupted.append(True)
            elif kind == "start":
                shown_values = ", ".join(f"{k}={_short(v)}" for k, v in info.items())
                typer.echo(f"start  {trial}: {shown_values}", err=True)
            elif "raysage_error" in info:
                typer.echo(f"FAILED {trial}: {info['raysage_error']}", err=True)
            else:
                typer.echo(f"end    {trial}: accuracy {_fmt(info.get('progress_accuracy'))} "
                           f"after {info.get('training_iteration', 0)} round(s)", err=True)

        scores = run_tuning(tuning, on_event=on_event)
    except RaysageError as exc:
        _fail(str(exc))
    for score in scores:
        state = "all rounds" if score.finished else f"stopped at {score.rounds}"
        values = ", ".join(f"{k}={_short(v)}" for k, v in score.values.items())
        typer.echo(f"{tuning.objective.text} {_fmt(score.score, 4)}  {values}  ({state}) "
                   f"{score.folder}")
    from .studies.tune import best_path

    if interrupted:
        finished = sum(s.finished for s in scores)
        typer.echo(f"search {out} interrupted: {finished} trial(s) ran every round; re-run the "
                   "same command to continue it", err=True)
        raise typer.Exit(1)
    if not any(s.finished for s in scores):
        _fail(f"no trial of {out} ran every round; nothing to choose from")
    typer.echo(f"best: {', '.join(f'{k}={v}' for k, v in scores[0].values.items())}; "
               f"raysage simulate --config {best_path(out)}")


def _short(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


@app.command("report")
def report_command(
    run_dirs: list[Path] = typer.Argument(..., help="run folders, or folders holding them "
                                          "(a sweep's --out)"),
    out: Path = typer.Option(Path("report"), "--out", "-o", help="folder for report.md and "
                             "the PNG figures"),
    target: Optional[float] = typer.Option(None, "--target", help="target accuracy (or loss) "
                                           "for the cost-to-target table (default: the weakest "
                                           "algorithm's best, so every one reaches it)"),
    metric: str = typer.Option("auto", "--metric", help="accuracy, test_loss or perplexity "
                               "(default auto: test_loss for language models, else accuracy)"),
    lines: list[str] = typer.Option([], "--lines", help="a config field whose values are drawn "
                                    "as lines within a panel rather than as panels of their own "
                                    "(repeatable), e.g. --lines align_interval"),
    panels: list[str] = typer.Option([], "--panels", help="a scalability axis (clients, "
                                     "workers) drawn as panels, one per value, rather than as "
                                     "lines, e.g. --panels clients for a study over clients"),
    baseline: Optional[str] = typer.Option(None, "--baseline", help="the algorithm whose cost "
                                           "to the target the others' are divided by in the "
                                           "table, e.g. --baseline fsl_sage (default: no ratios)"),
    rounds: Optional[int] = typer.Option(None, "--rounds", help="only each run's first "
                                         "ROUNDS rounds, so runs made for different horizons "
                                         "(20 and 40 rounds) compare over the same one"),
    tracking: str = typer.Option("none", "--tracking", help="also send report.md and the "
                                 "figures to mlflow (as artifacts of a run 'report' in the "
                                 "experiment named after the first folder, a sweep's) or "
                                 "tensorboard (images in OUT/tensorboard)"),
) -> None:
    """Plots and a Markdown table from run folders' Parquet files."""
    from .results.tracking import TRACKERS, check_tracking, track_report
    from .studies.report import write_report
    from .studies.sweep import experiment_of

    try:
        if tracking not in TRACKERS:
            raise RaysageError(f"--tracking {shown(tracking)} is not one of "
                               f"{', '.join(TRACKERS)}")
        check_tracking(tracking)
        summary = write_report(run_dirs, out, target=target, metric=metric, lines=lines,
                               baseline=baseline, panels=panels, rounds=rounds)
        if tracking != "none":
            where = track_report(tracking, str(out), summary["figures"],
                                 experiment_of(str(run_dirs[0]), {tracking}))
            typer.echo(f"report tracked in {where}")
    except RaysageError as exc:
        _fail(str(exc))
    typer.echo(f"report of {summary['runs']} run(s): {summary['report']} and "
               f"{len(summary['figures'])} figure(s) in {out}")


@app.command("algorithms")
def algorithms_command() -> None:
    """List the simulated algorithms and their parameters."""
    from .algorithms import ALGORITHMS

    for name, cls in ALGORITHMS.items():
        params = ", ".join(cls.Params.model_fields)
        typer.echo(f"{name:12s} {cls.label}: {cls.description}"
                   + (f" [parameters: {params}]" if params else ""))


def main() -> None:
    try:
        app()
    except RaysageError as exc:  # errors raised outside a command body
        typer.secho(f"error: {exc}", fg=typer.colors.RED, err=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
