"""Report: run folders built by hand -> series, targets, figures, report.md, errors."""

from __future__ import annotations

import math

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from raysage.algorithms import ALGORITHMS
from raysage.config import build_config
from raysage.errors import ConfigError, DataError
from raysage.studies import report
from raysage.studies.report import (
    GIB,
    group_series,
    load_runs,
    scaling_lines,
    target_table,
    time_to_target,
    write_report,
)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
NAN = float("nan")


def curve(accuracy, gib_per_round=0.5, sim_per_round=10.0, loss=None, wall=(3.0, 1.0)):
    """Round rows: cumulative bytes and simulated time grow by a fixed step per round."""
    rows = []
    for r, acc in enumerate(accuracy):
        rows.append({
            "round": r, "accuracy": acc,
            "test_loss": loss[r] if loss is not None else (NAN if math.isnan(acc) else 1 - acc),
            "total_bytes": int(gib_per_round * GIB),
            "cumulative_bytes": int((r + 1) * gib_per_round * GIB),
            "sim_round_time": sim_per_round, "sim_time": (r + 1) * sim_per_round,
            "wall_round_time": wall[0] if r == 0 else wall[1], "client_steps": 50,
            "memory_total": 2 * GIB, "participants": 10})
    return rows


def make_run(root, name, rows, **overrides):
    folder = root / name
    folder.mkdir(parents=True)
    cfg = build_config({"algorithm": overrides.get("algorithm", "fsl_sage")}).flat_dict()
    cfg.update(overrides, out=str(folder))
    pq.write_table(pa.Table.from_pylist([cfg]), folder / "run.parquet")
    pq.write_table(pa.Table.from_pylist(rows), folder / "rounds.parquet")
    return folder


FSL = [0.2, 0.5, 0.6]                      # 0.5 reached in round 1: 1.0 GiB, 20 s
CSE = [0.1, 0.2, 0.3, 0.4, 0.5, 0.55]      # 0.5 reached in round 4: 2.5 GiB, 50 s


# ---------------------------------------------------------------- time to target
def test_time_to_target_gives_round_gib_and_sim_time():
    rows = curve([0.1, NAN, 0.6, 0.7])
    assert time_to_target(rows, 0.5) == (2, 1.5, 30.0)
    assert time_to_target(rows, 0.6) == (2, 1.5, 30.0)     # reaching counts (>=)
    assert time_to_target(rows, 0.9) is None


def test_time_to_target_skips_unevaluated_rounds():
    rows = curve([0.1, NAN, NAN, 0.7])
    assert time_to_target(rows, 0.05) == (0, 0.5, 10.0)
    assert time_to_target(rows, 0.2) == (3, 2.0, 40.0)


def test_time_to_target_for_losses_goes_down():
    rows = curve([NAN] * 4, loss=[2.0, 1.5, NAN, 1.0])
    assert time_to_target(rows, 1.5, metric="test_loss") == (1, 1.0, 20.0)
    assert time_to_target(rows, 1.2, metric="test_loss") == (3, 2.0, 40.0)
    assert time_to_target(rows, 0.5, metric="test_loss") is None
    # perplexity = exp(loss): exp(1.5) = 4.48 > 3.5, exp(1.0) = 2.72 <= 3.5
    assert time_to_target(rows, 3.5, metric="perplexity") == (3, 2.0, 40.0)


# ---------------------------------------------------------------- series and target table
def test_target_table_ratios_to_the_baseline(tmp_path):
    make_run(tmp_path, "a", curve(FSL), algorithm="fsl_sage")
    make_run(tmp_path, "b", curve(CSE), algorithm="cse_fsl")
    series = group_series(load_runs(tmp_path))
    # No baseline named: costs, but no ratios.
    assert all(row["gib_ratio"] is None for row in target_table(series, target=0.5))
    rows = target_table(series, target=0.5, baseline="fsl_sage")
    by_alg = {row["algorithm"]: row for row in rows}
    assert by_alg["fsl_sage"]["gib_to_target"] == pytest.approx(1.0)
    assert by_alg["cse_fsl"]["gib_to_target"] == pytest.approx(2.5)
    assert by_alg["cse_fsl"]["gib_ratio"] == pytest.approx(2.5)
    assert by_alg["cse_fsl"]["time_ratio"] == pytest.approx(50 / 20)
    assert by_alg["fsl_sage"]["gib_ratio"] == pytest.approx(1.0)
    assert (by_alg["cse_fsl"]["rounds"], by_alg["cse_fsl"]["best"]) == (6, 0.55)


def test_simulated_seconds_keep_three_digits_below_a_second():
    from raysage.studies.report import _seconds

    assert [_seconds(v) for v in (0.0213449, 0.37, 8.84, 108.46, None, NAN)] == [
        "0.0213", "0.37", "8.8", "108.5", "not reached", "not reached"]


def test_default_target_is_the_weakest_best_floored(tmp_path):
    make_run(tmp_path, "a", curve([0.3, 0.7]), algorithm="fsl_sage")
    make_run(tmp_path, "b", curve([0.2, 0.5678, 0.4]), algorithm="fedavg")
    rows = target_table(group_series(load_runs(tmp_path)))
    assert {row["target"] for row in rows} == {0.56}
    assert all(row["round_to_target"] == 1 for row in rows)


def test_default_target_for_losses_is_the_weakest_best_ceiled(tmp_path):
    make_run(tmp_path, "a", curve([NAN] * 2, loss=[2.0, 1.0]), algorithm="fsl_sage")
    make_run(tmp_path, "b", curve([NAN] * 2, loss=[2.0, 1.2345]), algorithm="fedavg")
    rows = target_table(group_series(load_runs(tmp_path)), metric="test_loss",
                        baseline="fsl_sage")
    assert {row["target"] for row in rows} == {1.24}
    by_alg = {row["algorithm"]: row for row in rows}
    assert by_alg["fedavg"]["gib_ratio"] == pytest.approx(1.0)


def test_missing_baseline_or_unreached_target_gives_no_ratio(tmp_path):
    make_run(tmp_path, "a", curve([0.2, 0.3]), algorithm="fedavg")
    make_run(tmp_path, "b", curve([0.2, 0.6]), algorithm="sl")
    rows = target_table(group_series(load_runs(tmp_path)), target=0.5, baseline="fedavg")
    assert all(row["gib_ratio"] is None and row["time_ratio"] is None for row in rows)
    assert {row["algorithm"]: row["gib_to_target"] for row in rows}["fedavg"] is None


def test_seeds_and_execution_settings_are_averaged(tmp_path):
    make_run(tmp_path, "s1", curve([0.2, 0.4]), seed=1, workers=1)
    make_run(tmp_path, "s2", curve([0.4, 0.6, 0.9], gib_per_round=1.5), seed=2, workers=4)
    series = group_series(load_runs(tmp_path))
    assert len(series) == 1
    mean = series[0].rounds
    assert [row["round"] for row in mean] == [0, 1]            # rounds both seeds have
    assert [row["accuracy"] for row in mean] == pytest.approx([0.3, 0.5])
    assert mean[1]["cumulative_bytes"] / GIB == pytest.approx((1.0 + 3.0) / 2)
    assert time_to_target(mean, 0.5) == (1, pytest.approx(2.0), 20.0)


def test_alpha_only_matters_for_dirichlet(tmp_path):
    make_run(tmp_path, "a", curve(FSL), partition="iid", alpha=0.1, seed=1)
    make_run(tmp_path, "b", curve(FSL), partition="iid", alpha=5.0, seed=2)
    make_run(tmp_path, "c", curve(FSL), partition="dirichlet", alpha=0.1)
    make_run(tmp_path, "d", curve(FSL), partition="dirichlet", alpha=5.0)
    series = group_series(load_runs(tmp_path))
    assert len(series) == 3
    facets = {row["facet"] for row in target_table(series)}
    assert facets == {"partition=iid", "partition=dirichlet, alpha=0.1",
                      "partition=dirichlet, alpha=5"}


# ---------------------------------------------------------------- write_report
def _study(root):
    for alg, acc in (("fsl_sage", FSL), ("cse_fsl", CSE)):
        make_run(root, f"{alg}-iid", curve(acc), algorithm=alg, partition="iid")
        for alpha in (0.1, 1.0):
            make_run(root, f"{alg}-dir{alpha}", curve(acc), algorithm=alg,
                     partition="dirichlet", alpha=alpha)
        make_run(root, f"{alg}-c20", curve(acc, wall=(6.0, 2.0)), algorithm=alg, clients=20)
    for workers in (1, 2):   # same science as fsl_sage-iid; only the host cost differs
        make_run(root, f"fsl_sage-w{workers}", curve(FSL, wall=(3.0, 1.0 / workers)),
                 workers=workers)


def test_write_report_writes_figures_and_markdown(tmp_path):
    _study(tmp_path / "runs")
    summary = write_report(tmp_path / "runs", tmp_path / "report", target=0.5,
                           baseline="fsl_sage")

    assert summary["runs"] == 10
    expected = {"accuracy_vs_communication.png", "accuracy_vs_sim_time.png",
                "accuracy_vs_round.png", "best_accuracy_vs_alpha.png",
                "scalability_clients.png", "scalability_workers.png", "study_vs_clients.png"}
    assert set(summary["figures"]) == expected
    written = {p.name for p in (tmp_path / "report").iterdir()}
    assert written == expected | {"report.md"}     # no temporary files left behind
    for name in expected:
        assert (tmp_path / "report" / name).read_bytes()[:8] == PNG_SIGNATURE

    text = (tmp_path / "report" / "report.md").read_text()
    assert "10 runs" in text
    # no energy or leakage columns in these runs: shown as not measured
    # six rounds of 0.5 GiB and 10 s: 3 GiB and 60 s in all, 2.5 GiB and 50 s to 50%;
    # within FSL-SAGE's 1.5 GiB and 30 s (three rounds) its best is round 2's 30%
    assert ("Budgets: 1.5000 GiB and 30.0 s of simulated time, the least that any series "
            "spent in all") in text
    assert ("| CSE-FSL (clients=10) | 1 | 55.00% | 55.00% | 6 | 3.0000 | 60.0 | 30.00% | 30.00% "
            "| 2.5000 | 2.50x | 50.0 | 2.50x "
            "| not reached | - |") in text
    # no run measured leakage: no leakage columns (the observer is off by default)
    assert "input dCor" not in text and "Leakage columns" not in text
    assert "### partition=dirichlet, alpha=0.1" in text and "## Scalability: workers" in text
    assert "![accuracy vs communication](accuracy_vs_communication.png)" in text
    cse = [row for row in summary["table"] if row["algorithm"] == "cse_fsl"]
    assert len(cse) == 4 and all(row["gib_ratio"] == pytest.approx(2.5) for row in cse)

    # workers 1 and 2 (and 0: auto) of the fsl_sage iid point; steps/s = 50 * 2 rounds / wall
    (workers_line,) = summary["scalability"]["workers"]
    assert [(x, costs["steps_per_s"]) for x, _, costs in workers_line[1]] == \
        [(0, pytest.approx(50.0)), (1, pytest.approx(50.0)), (2, pytest.approx(100.0))]
    clients_lines = summary["scalability"]["clients"]
    # only the iid points at workers=0 have two client counts; labels need nothing but the name
    assert [label for label, _ in clients_lines] == ["FSL-SAGE", "CSE-FSL"]


def test_scaling_lines_never_average_two_layouts(tmp_path):
    # One worker of half a CPU and one of two CPUs: the same science, different costs.
    for workers, cpus, wall in ((1, 0.5, 2.0), (2, 0.5, 1.0), (1, 2.0, 0.5), (2, 2.0, 0.25)):
        make_run(tmp_path, f"w{workers}c{cpus}", curve(FSL, wall=(3.0, wall)), workers=workers,
                 cpus_per_worker=cpus)
    lines = scaling_lines(load_runs(tmp_path), "workers")
    assert [line.label for line in lines] == ["FSL-SAGE (cpus_per_worker=0.5)",
                                              "FSL-SAGE (cpus_per_worker=2)"]
    # 50 client steps a round over the round's wall time; each point is one run
    assert [[(x, runs, costs["steps_per_s"]) for x, runs, costs in line.points]
            for line in lines] == [[(1, 1, 25.0), (2, 1, 50.0)], [(1, 1, 100.0), (2, 1, 200.0)]]


def test_write_report_default_target_and_no_optional_figures(tmp_path):
    make_run(tmp_path / "runs", "a", curve(FSL), algorithm="fsl_sage")
    make_run(tmp_path / "runs", "b", curve(CSE), algorithm="cse_fsl")
    summary = write_report(tmp_path / "runs", tmp_path / "out")
    assert summary["figures"] == ["accuracy_vs_communication.png", "accuracy_vs_sim_time.png",
                                  "accuracy_vs_round.png"]
    assert {row["target"] for row in summary["table"]} == {0.55}
    text = (tmp_path / "out" / "report.md").read_text()
    assert "accuracy >= 55.00% (lowest best accuracy in the facet" in text


def with_energy_and_leakage(rows, joules_per_round, dcor=NAN, smashed=NAN, grad=NAN):
    for r, row in enumerate(rows):
        row.update(cumulative_energy_j=(r + 1) * joules_per_round, leak_input_dcor=dcor + r / 10,
                   leak_label_smashed=smashed, leak_label_grad=grad)
    return rows


def test_energy_to_target_and_leakage_in_table_and_figures(tmp_path):
    # FSL-SAGE reaches 0.5 in round 1 (2 x 300 J), CSE-FSL in round 4 (5 x 100 J);
    # FedAvg sends no smashed data or gradients: its leakage stays unmeasured.
    make_run(tmp_path / "runs", "a", with_energy_and_leakage(curve(FSL), 300.0, 0.5, 0.4, 0.9),
             algorithm="fsl_sage")
    make_run(tmp_path / "runs", "b", with_energy_and_leakage(curve(CSE), 100.0, 0.7, 0.3),
             algorithm="cse_fsl")
    make_run(tmp_path / "runs", "c", with_energy_and_leakage(curve([0.1, 0.2]), 50.0),
             algorithm="fedavg")
    summary = write_report(tmp_path / "runs", tmp_path / "out", target=0.5,
                           baseline="fsl_sage")
    by_alg = {row["algorithm"]: row for row in summary["table"]}
    assert by_alg["fsl_sage"]["energy_to_target"] == pytest.approx(600.0)
    assert by_alg["cse_fsl"]["energy_to_target"] == pytest.approx(500.0)
    assert by_alg["cse_fsl"]["energy_ratio"] == pytest.approx(500 / 600)
    assert by_alg["fedavg"]["energy_to_target"] is None       # never reached 0.5
    # dCor means over rounds 0..n-1 of base + r/10
    assert by_alg["fsl_sage"]["leak_input_dcor"] == pytest.approx(0.5 + 0.1)
    assert by_alg["cse_fsl"]["leak_input_dcor"] == pytest.approx(0.7 + 0.25)
    assert by_alg["cse_fsl"]["leak_label_grad"] is None
    assert by_alg["fedavg"]["leak_label_smashed"] is None
    assert {"accuracy_vs_energy.png", "leakage_vs_round.png"} <= set(summary["figures"])
    text = (tmp_path / "out" / "report.md").read_text()
    # FedAvg's two rounds set the budgets (1 GiB, 20 s): FSL-SAGE's rounds 0-1, best 50%
    assert "| FSL-SAGE | 1 | 60.00% | 60.00% | 3 | 1.5000 | 30.0 | 50.00% | 50.00% | 1.0000 " \
        "| 1.00x | 20.0 | 1.00x " \
        "| 0.6 | 1.00x " \
        "| 0.600 | 0.400 | 0.900 |" in text
    assert "| 0.5 | 0.83x | 0.950 | 0.300 | - |" in text


def test_loss_report_names_figures_after_the_metric(tmp_path):
    make_run(tmp_path / "runs", "a", curve([NAN] * 3, loss=[3.0, 2.0, 1.5]),
             partition="dirichlet", alpha=0.1)
    make_run(tmp_path / "runs", "b", curve([NAN] * 3, loss=[3.0, 2.5, 2.0]),
             partition="dirichlet", alpha=1.0)
    summary = write_report(tmp_path / "runs", tmp_path / "out", metric="perplexity")
    assert summary["figures"] == ["perplexity_vs_communication.png", "perplexity_vs_sim_time.png",
                                  "perplexity_vs_round.png"]


def test_unfinished_runs_are_reported(tmp_path):
    make_run(tmp_path / "runs", "a", curve(FSL), rounds=10)
    write_report(tmp_path / "runs", tmp_path / "out")
    assert "3/10 rounds (unfinished)" in (tmp_path / "out" / "report.md").read_text()


def test_each_run_lists_its_own_best_and_final(tmp_path):
    make_run(tmp_path / "runs", "s1", curve([0.2, 0.6, 0.4]), seed=1, rounds=3)
    make_run(tmp_path / "runs", "s2", curve([0.3, NAN, 0.5]), seed=2, rounds=3)
    write_report(tmp_path / "runs", tmp_path / "out")
    text = (tmp_path / "out" / "report.md").read_text()
    assert "FSL-SAGE, seed 1, 3/3 rounds, best 60.00%, final 40.00%" in text
    assert "FSL-SAGE, seed 2, 3/3 rounds, best 50.00%, final 50.00%" in text


def test_an_algorithm_has_one_colour_everywhere(tmp_path):
    # Each algorithm owns its label and colour; no two built-in ones share either.
    assert len({cls.colour for cls in ALGORITHMS.values()}) == len(ALGORITHMS)
    assert len({cls.label for cls in ALGORITHMS.values()}) == len(ALGORITHMS)

    make_run(tmp_path / "x", "a", curve(FSL), algorithm="fsl_sage")
    make_run(tmp_path / "x", "b", curve(CSE), algorithm="cse_fsl")
    make_run(tmp_path / "y", "a", curve(FSL), algorithm="fsl_sage")
    make_run(tmp_path / "y", "c", curve(CSE), algorithm="sglr")
    metric = report.METRICS["accuracy"]
    for folder in ("x", "y"):
        fig = report._curve_figure(group_series(load_runs(tmp_path / folder)), metric, "round")
        colours = {line.get_label(): line.get_color() for line in fig.axes[0].get_lines()}
        assert colours["FSL-SAGE"] == ALGORITHMS["fsl_sage"].colour
        assert len(set(colours.values())) == len(colours)


# ---------------------------------------------------------------- errors
def _one_line_error(path, words):
    with pytest.raises(DataError) as info:
        load_runs(path)
    message = str(info.value)
    assert "\n" not in message and str(path) in message
    assert all(word in message for word in words), message


def test_a_missing_path_is_a_one_line_error(tmp_path):
    _one_line_error(tmp_path / "nope", ["does not exist"])


def test_a_folder_without_runs_is_a_one_line_error(tmp_path):
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    _one_line_error(tmp_path / "empty", ["no run folder"])


def test_a_corrupt_or_missing_rounds_file_is_a_one_line_error(tmp_path):
    folder = make_run(tmp_path, "bad", curve(FSL))
    (folder / "rounds.parquet").write_bytes(b"not parquet at all")
    _one_line_error(folder, ["corrupt", "rounds.parquet", "re-run it or remove it"])
    (folder / "rounds.parquet").unlink()
    _one_line_error(tmp_path, ["rounds.parquet is missing", "re-run it or remove it"])


def test_sweep_folder_names_do_not_leak_into_the_config(tmp_path):
    make_run(tmp_path, "alpha=0.1__partition=dirichlet", curve(FSL), partition="dirichlet",
             alpha=0.1)
    (run,) = load_runs(tmp_path)
    assert run.config["alpha"] == 0.1 and run.config["partition"] == "dirichlet"


def _sensitivity(root):
    """A sensitivity study: FSL-SAGE's l over two batch sizes, CSE-FSL (no l) at each."""
    for batch in (20, 128):
        for l, acc in ((10, FSL), (1, [0.3, 0.4, 0.45])):
            make_run(root, f"fsl-b{batch}-l{l}", curve(acc), algorithm="fsl_sage",
                     batch_size=batch, align_interval=l)
        make_run(root, f"cse-b{batch}", curve(CSE), algorithm="cse_fsl", batch_size=batch)


def test_fields_drawn_as_lines_leave_the_panels_to_the_rest(tmp_path):
    _sensitivity(tmp_path / "runs")
    series = group_series(load_runs(tmp_path / "runs"))
    assert len(series) == 6
    # By default every distinct config is a facet of its own, even CSE-FSL (which has
    # no l) apart from FSL-SAGE ...
    assert len({row["facet"] for row in target_table(series, target=0.5)}) == 6
    # ... with the alignment interval drawn as lines, one panel per batch size.
    rows = target_table(series, target=0.5, lines=("align_interval",), baseline="fsl_sage")
    assert [row["facet"] for row in rows] == ["batch_size=20"] * 3 + ["batch_size=128"] * 3
    # Labels name a line field only where it departs from its default (l = 10).
    assert [row["label"] for row in rows[:3]] == ["FSL-SAGE (align_interval=1)", "FSL-SAGE",
                                                  "CSE-FSL"]
    by_label = {row["label"]: row for row in rows[:3]}
    # CSE-FSL has no l: it is compared with FSL-SAGE at its default l = 10, which reaches
    # 0.5 in round 1 (1 GiB) against CSE-FSL's round 4 (2.5 GiB); l = 1 never does.
    assert by_label["CSE-FSL"]["gib_ratio"] == pytest.approx(2.5)
    assert by_label["FSL-SAGE (align_interval=1)"]["gib_to_target"] is None

    summary = write_report(tmp_path / "runs", tmp_path / "report", target=0.5,
                           lines=["align_interval"], baseline="fsl_sage")
    assert "accuracy_vs_round.png" in summary["figures"]
    text = (tmp_path / "report" / "report.md").read_text()
    assert "### batch_size=20\n" in text and "| FSL-SAGE (align_interval=1) | 1 |" in text
    assert "align_interval=10" not in text.split("## Cost to reach the target")[1]


def test_the_baseline_column_is_named_and_an_absent_baseline_is_one_line(tmp_path):
    from typer.testing import CliRunner

    from raysage.cli import app

    _sensitivity(tmp_path / "runs")
    runner = CliRunner()
    result = runner.invoke(app, ["report", str(tmp_path / "runs"), "--out",
                                 str(tmp_path / "rep"), "--baseline", "fedavg"])
    assert result.exit_code == 2 and len(result.output.strip().splitlines()) == 1
    assert "--baseline fedavg: no run is of that algorithm; give one of cse_fsl, fsl_sage" \
        in result.output
    result = runner.invoke(app, ["report", str(tmp_path / "runs"), "--out",
                                 str(tmp_path / "rep"), "--baseline", "cse_fsl"])
    assert result.exit_code == 0, result.output
    assert "| GiB to target | vs CSE-FSL |" in (tmp_path / "rep" / "report.md").read_text()
    result = runner.invoke(app, ["report", str(tmp_path / "runs"), "--out",
                                 str(tmp_path / "plain")])
    assert "vs " not in (tmp_path / "plain" / "report.md").read_text().split(
        "## Cost to reach the target")[1].split("\n\n## ")[0]


def test_an_unknown_line_field_is_refused_in_one_line(tmp_path):
    from typer.testing import CliRunner

    from raysage.cli import app

    _sensitivity(tmp_path / "runs")
    result = CliRunner().invoke(app, ["report", str(tmp_path / "runs"), "--out",
                                      str(tmp_path / "rep"), "--lines", "align_intervall"])
    assert result.exit_code == 2
    assert len(result.output.strip().splitlines()) == 1
    assert "align_intervall" in result.output and not (tmp_path / "rep").exists()


def test_report_command_writes_the_report_and_fails_in_one_line(tmp_path):
    from typer.testing import CliRunner

    from raysage.cli import app

    make_run(tmp_path / "runs", "a", curve([0.2, 0.5]), algorithm="fsl_sage")
    make_run(tmp_path / "runs", "b", curve([0.1, 0.3, 0.5], gib_per_round=1.0),
             algorithm="cse_fsl")
    runner = CliRunner()
    result = runner.invoke(app, ["report", str(tmp_path / "runs"), "--out",
                                 str(tmp_path / "rep"), "--target", "0.5",
                                 "--baseline", "fsl_sage"])
    assert result.exit_code == 0, result.output
    text = (tmp_path / "rep" / "report.md").read_text()
    # FSL-SAGE reaches 0.5 after 2 rounds (1 GiB), CSE-FSL after 3 (3 GiB): 3x.
    assert "| CSE-FSL |" in text and "3.00x" in text
    result = runner.invoke(app, ["report", str(tmp_path / "nothing")])
    assert result.exit_code == 2 and len(result.output.strip().splitlines()) == 1
    # --rounds 2: CSE-FSL's third round, where it reached 0.5, is cut off
    result = runner.invoke(app, ["report", str(tmp_path / "runs"), "--out",
                                 str(tmp_path / "rep2"), "--rounds", "2", "--target", "0.5"])
    assert result.exit_code == 0, result.output
    assert "(--rounds 2)" in (tmp_path / "rep2" / "report.md").read_text()
    result = runner.invoke(app, ["report", str(tmp_path / "runs"), "--rounds", "0"])
    assert result.exit_code == 2 and len(result.output.strip().splitlines()) == 1


def test_language_model_runs_are_reported_by_test_loss_by_default(tmp_path):
    loss = [4.0, 3.0, 2.5]
    make_run(tmp_path / "runs", "a", curve([0.1, 0.2, 0.3], loss=loss), algorithm="fsl_sage",
             model="gpt2", dataset="e2e_synthetic")
    summary = write_report(tmp_path / "runs", tmp_path / "rep")
    assert "test_loss_vs_communication.png" in summary["figures"]
    assert summary["table"][0]["best"] == 2.5


def test_runs_from_before_a_new_config_field_join_their_series(tmp_path):
    old = make_run(tmp_path / "runs", "old", curve([0.2, 0.4]), algorithm="fsl_sage", seed=1)
    table = pq.read_table(old / "run.parquet").drop_columns(["seq_len", "lora_rank"])
    pq.write_table(table, old / "run.parquet")
    make_run(tmp_path / "runs", "new", curve([0.4, 0.6]), algorithm="fsl_sage", seed=2)
    series = group_series(load_runs(tmp_path / "runs"))
    assert len(series) == 1
    assert [r["accuracy"] for r in series[0].rounds] == pytest.approx([0.3, 0.5])


# ---------------------------------------------------------------- study over clients
def test_a_field_that_goes_with_the_algorithm_is_a_setting_not_a_panel(tmp_path):
    # Each algorithm at its own tuned learning rate: one panel, the rates listed once.
    make_run(tmp_path / "runs", "fsl", curve(FSL), algorithm="fsl_sage", client_lr=1e-4,
             server_lr=5e-4)
    make_run(tmp_path / "runs", "fedavg", curve(CSE), algorithm="fedavg", client_lr=5e-4)
    make_run(tmp_path / "runs", "fedavg-lr", curve(CSE), algorithm="fedavg", client_lr=0.1)
    series = group_series(load_runs(tmp_path / "runs"))
    assert report.following_fields(series[:2]) == {"client_lr": "algorithm",
                                                   "server_lr": "algorithm"}
    assert {row["facet"] for row in target_table(series[:2], target=0.5)} == {"all runs"}
    # Two FedAvg rates: the rate is a question of the study again, so it makes panels.
    assert report.following_fields(series) == {"server_lr": "algorithm"}
    assert {row["facet"] for row in target_table(series, target=0.5)} == {
        "client_lr=0.0001", "client_lr=0.0005", "client_lr=0.1"}

    write_report([tmp_path / "runs" / "fsl", tmp_path / "runs" / "fedavg"],
                 tmp_path / "report", target=0.5)
    text = (tmp_path / "report" / "report.md").read_text()
    assert "- `client_lr` goes with the algorithm: FSL-SAGE 0.0001, FedAvg 0.0005" in text
    assert "### all runs" in text


def _clients_study(root):
    """Two algorithms over 10 and 100 clients; evaluation every round at 10 and every
    other round at 100, so eval_every goes with the client count."""
    def rows(accuracy, gib, sim, state, cosine=NAN, alignments=NAN):
        out = curve(accuracy, gib_per_round=gib, sim_per_round=sim)
        for row in out:
            row.update(server_state_bytes=state * 2 ** 20, estimate_cosine=cosine,
                       alignments=alignments, cumulative_energy_j=100.0 * (row["round"] + 1))
        return out
    make_run(root, "fsl-10", rows([0.2, 0.5, 0.6], 0.5, 10.0, 40, cosine=0.5, alignments=10),
             algorithm="fsl_sage", clients=10, client_lr=1e-4, rounds=3)
    make_run(root, "fedavg-10", rows([0.3, 0.4, 0.45, 0.55], 1.0, 5.0, 0),
             algorithm="fedavg", clients=10, client_lr=5e-4, rounds=4)
    make_run(root, "fsl-100", rows([0.1, NAN, 0.3, NAN, 0.35], 0.1, 2.0, 400, cosine=0.2,
                                   alignments=5),
             algorithm="fsl_sage", clients=100, participation=0.1, eval_every=2,
             client_lr=1e-4, rounds=5)
    make_run(root, "fedavg-100", rows([0.2, NAN, 0.4, NAN, 0.42], 0.3, 1.0, 0),
             algorithm="fedavg", clients=100, participation=0.1, eval_every=2,
             client_lr=5e-4, rounds=5)


def test_client_study_scores_every_algorithm_within_the_budget_all_spent(tmp_path):
    _clients_study(tmp_path / "runs")
    series = group_series(load_runs(tmp_path / "runs"))
    rows = report.client_study(series)
    # participation and eval_every go with the client count, the rates with the algorithm
    assert {row["facet"] for row in rows} == {"all runs"}
    got = {(row["clients"], row["algorithm"]): row for row in rows}
    # Target: the weakest best, FSL-SAGE's 0.35 at 100 clients.
    assert [row["target"] for row in rows] == [pytest.approx(0.35)] * 4
    # 10 clients: FSL-SAGE spends 1.5 GiB / 30 s, FedAvg 4 GiB / 20 s; the budgets are
    # 1.5 GiB (FedAvg's best within it: 0.3 at 1 GiB) and 20 s (FSL-SAGE's: 0.5 at 20 s).
    fsl, fedavg = got[(10, "fsl_sage")], got[(10, "fedavg")]
    assert fsl["budget_gib"] == fedavg["budget_gib"] == pytest.approx(1.5)
    assert (fsl["best_at_budget_bytes"], fedavg["best_at_budget_bytes"]) == (0.6, 0.3)
    assert fsl["budget_sim_time"] == pytest.approx(20.0)
    assert (fsl["best_at_budget_time"], fedavg["best_at_budget_time"]) == (0.5, 0.55)
    # To 0.35 both take two rounds: FSL-SAGE 1 GiB, FedAvg 2 GiB, 200 J each.
    assert (fsl["gib_to_target"], fsl["energy_to_target"]) == (pytest.approx(1.0), 200.0)
    assert (fedavg["gib_to_target"], fedavg["energy_to_target"]) == (pytest.approx(2.0), 200.0)
    # 100 clients: totals 0.5 GiB / 10 s and 1.5 GiB / 5 s. FSL-SAGE reaches 0.35 in its
    # last round (0.5 GiB, 500 J), FedAvg in round 2 (0.9 GiB, 300 J).
    fsl, fedavg = got[(100, "fsl_sage")], got[(100, "fedavg")]
    assert fsl["budget_gib"] == pytest.approx(0.5)
    assert (fsl["best_at_budget_bytes"], fedavg["best_at_budget_bytes"]) == (0.35, 0.2)
    # within 5 s FSL-SAGE evaluated only round 0 (round 1 was not evaluated)
    assert (fsl["best_at_budget_time"], fedavg["best_at_budget_time"]) == (0.1, 0.42)
    assert (fsl["gib_to_target"], fsl["energy_to_target"]) == (pytest.approx(0.5), 500.0)
    assert (fedavg["gib_to_target"], fedavg["energy_to_target"]) == (pytest.approx(0.9), 300.0)
    # Server state, alignments per client (5 a round over 5 rounds, 100 clients), cosine.
    assert (fsl["server_state_mib"], fedavg["server_state_mib"]) == (400.0, 0.0)
    assert fsl["alignments_per_client"] == pytest.approx(0.25)
    assert got[(10, "fsl_sage")]["alignments_per_client"] == pytest.approx(3.0)
    assert math.isnan(fedavg["alignments_per_client"]) and fedavg["estimate_cosine"] is None
    assert fsl["estimate_cosine"] == pytest.approx(0.2)

    summary = write_report(tmp_path / "runs", tmp_path / "report")
    assert "study_vs_clients.png" in summary["figures"]
    text = (tmp_path / "report" / "report.md").read_text()
    assert "## Over the number of clients" in text
    assert "| 100 | FSL-SAGE | 1 | 5 | 35.00% | 0.5000 | 35.00% | 5.0 | 10.00% | 0.5000 " \
        "| 0.5 | 400.0 | 0.25 | 0.200 |" in text
    assert "- `eval_every` goes with the clients: clients=10 1, clients=100 2" in text


def test_panels_draw_the_client_count_as_panels(tmp_path):
    _clients_study(tmp_path / "runs")
    series = group_series(load_runs(tmp_path / "runs"))
    assert {row["facet"] for row in target_table(series, target=0.5)} == {"all runs"}
    rows = target_table(series, target=0.4, panels=("clients",))
    assert [(row["facet"], row["label"]) for row in rows] == [
        ("clients=10", "FSL-SAGE"), ("clients=10", "FedAvg"),
        ("clients=100", "FSL-SAGE"), ("clients=100", "FedAvg")]
    # the study over clients is the same however the curves are drawn
    assert report.client_study(series, panels=("clients",)) == report.client_study(series)
    with pytest.raises(report.ConfigError, match="--panels partition: only a scalability axis"):
        write_report(tmp_path / "runs", tmp_path / "report", panels=["partition"])
    assert not (tmp_path / "report").exists()


def test_a_run_still_going_does_not_set_the_budget_of_the_others(tmp_path):
    _clients_study(tmp_path / "runs")
    # CSE-FSL at 10 clients, planned for 6 rounds, has written 2: 0.2 GiB and 2 s so far.
    make_run(tmp_path / "runs", "cse-10", curve([0.1, 0.3], gib_per_round=0.1,
                                                sim_per_round=1.0), algorithm="cse_fsl",
             clients=10, rounds=6)
    rows = {(r["clients"], r["algorithm"]): r
            for r in report.client_study(group_series(load_runs(tmp_path / "runs")))}
    assert rows[(10, "cse_fsl")]["unfinished"] and not rows[(10, "fsl_sage")]["unfinished"]
    # the budgets of the finished runs, as without it: 1.5 GiB and 20 s
    assert rows[(10, "fsl_sage")]["budget_gib"] == pytest.approx(1.5)
    assert rows[(10, "fsl_sage")]["budget_sim_time"] == pytest.approx(20.0)
    write_report(tmp_path / "runs", tmp_path / "report")
    assert "| 10 | CSE-FSL (unfinished) | 1 | 2 |" in (tmp_path / "report" / "report.md").read_text()


# ---------------------------------------------------------------- seeds
def _seeds_apart(root, fedavg_seed=200):
    """FSL-SAGE at seeds 200 (fast devices) and 201 (three times slower stragglers),
    FedAvg at one seed."""
    make_run(root, "fsl-200", curve(FSL, sim_per_round=10.0), algorithm="fsl_sage", seed=200)
    make_run(root, "fsl-201", curve([0.2, 0.4, 0.5], sim_per_round=30.0),
             algorithm="fsl_sage", seed=201)
    make_run(root, "fedavg", curve([0.3, 0.5], sim_per_round=15.0), algorithm="fedavg",
             seed=fedavg_seed)


def test_series_on_different_seeds_are_compared_over_the_seeds_they_share(tmp_path):
    _seeds_apart(tmp_path / "runs")
    rows = {row["algorithm"]: row for row in target_table(
        group_series(load_runs(tmp_path / "runs")), target=0.5, baseline="fsl_sage")}
    fsl, fedavg = rows["fsl_sage"], rows["fedavg"]
    # Over both seeds FSL-SAGE's mean reaches 0.5 in round 2 at (30 + 90) / 2 = 60 s and
    # FedAvg would look 0.5x its time; at seed 200, which both have: 20 s against 30 s.
    assert (fsl["runs"], fsl["seeds"], fsl["shared_seeds"]) == (1, [200, 201], [200])
    assert (fsl["round_to_target"], fsl["time_to_target"]) == (1, pytest.approx(20.0))
    # each seed is still listed on its own, the one left out of the comparison too
    assert [(one["seed"], one["time_to_target"]) for one in fsl["per_seed"]] == [
        (200, 20.0), (201, 90.0)]
    assert fedavg["time_ratio"] == pytest.approx(30.0 / 20.0)
    # budgets: the least that either spent at seed 200, FedAvg's 2 rounds (1 GiB, 30 s)
    assert (fsl["budget_gib"], fsl["budget_sim_time"]) == (pytest.approx(1.0), 30.0)
    assert (fsl["best_at_budget_bytes"], fsl["best_at_budget_time"]) == (0.5, 0.6)
    write_report(tmp_path / "runs", tmp_path / "report", target=0.5, baseline="fsl_sage")
    text = (tmp_path / "report" / "report.md").read_text()
    assert ("The series ran on different seeds (FSL-SAGE 200, 201; FedAvg 200)" in text
            and "over the seeds all of them have: 200;" in text)
    assert "| FSL-SAGE | 1 | 60.00% |" in text


def test_series_on_the_same_seeds_get_no_seed_note(tmp_path):
    make_run(tmp_path, "a", curve(FSL), algorithm="fsl_sage", seed=3)
    make_run(tmp_path, "b", curve(CSE), algorithm="cse_fsl", seed=3)
    rows = target_table(group_series(load_runs(tmp_path)), target=0.5)
    assert [row["shared_seeds"] for row in rows] == [None, None]
    write_report(tmp_path, tmp_path / "report")
    assert "different seeds" not in (tmp_path / "report" / "report.md").read_text()


def test_series_that_share_no_seed_are_compared_as_they_are_and_flagged(tmp_path):
    _seeds_apart(tmp_path / "runs", fedavg_seed=7)
    rows = {row["algorithm"]: row for row in target_table(
        group_series(load_runs(tmp_path / "runs")), target=0.5)}
    assert rows["fsl_sage"]["shared_seeds"] == [] and rows["fsl_sage"]["runs"] == 2
    assert rows["fsl_sage"]["time_to_target"] == pytest.approx(60.0)
    write_report(tmp_path / "runs", tmp_path / "report")
    assert ("share none (FSL-SAGE 200, 201; FedAvg 7)"
            in (tmp_path / "report" / "report.md").read_text())


def test_client_study_compares_each_count_over_its_shared_seeds(tmp_path):
    _clients_study(tmp_path / "runs")
    # a second FSL-SAGE seed at 10 clients, slower and costlier than everything else
    make_run(tmp_path / "runs", "fsl-10-s2", curve([0.1, 0.2, 0.9], gib_per_round=5.0,
                                                   sim_per_round=50.0),
             algorithm="fsl_sage", clients=10, client_lr=1e-4, rounds=3, seed=201)
    rows = {(r["clients"], r["algorithm"]): r
            for r in report.client_study(group_series(load_runs(tmp_path / "runs")))}
    fsl = rows[(10, "fsl_sage")]
    # as without the second seed (test above): budgets 1.5 GiB and 20 s, best 0.6 / 0.5
    assert (fsl["runs"], fsl["seeds"], fsl["shared_seeds"]) == (1, [200, 201], [200])
    assert fsl["budget_gib"] == pytest.approx(1.5) and fsl["budget_sim_time"] == 20.0
    assert (fsl["best_at_budget_bytes"], fsl["best_at_budget_time"]) == (0.6, 0.5)
    assert rows[(100, "fsl_sage")]["shared_seeds"] is None
    write_report(tmp_path / "runs", tmp_path / "report")
    text = (tmp_path / "report" / "report.md").read_text()
    assert "so the rows of 10 clients compare every series over the seeds" in text
    assert "so the rows of 100 clients" not in text


def test_rounds_keeps_each_runs_first_rounds_so_horizons_compare(tmp_path):
    # a 40-round run (here 6 of 6) beside a 3-round one: cut to 3 rounds, the long one
    # is no longer ahead on rounds it has and the short one had not
    make_run(tmp_path / "runs", "long", curve([0.2, 0.3, 0.4, 0.5, 0.8, 0.9]),
             algorithm="fsl_sage", rounds=6)
    make_run(tmp_path / "runs", "short", curve([0.1, 0.35, 0.45]), algorithm="fedavg",
             rounds=3)
    summary = write_report(tmp_path / "runs", tmp_path / "out", rounds=3)
    rows = {row["algorithm"]: row for row in summary["table"]}
    assert (rows["fsl_sage"]["rounds"], rows["fsl_sage"]["best"]) == (3, 0.4)
    assert rows["fsl_sage"]["total_gib"] == pytest.approx(1.5)
    text = (tmp_path / "out" / "report.md").read_text()
    assert "Each run up to round 2 only (--rounds 3)." in text
    assert "3/3 rounds, best 40.00%" in text and "unfinished" not in text
    # a run shorter than the cut stays as it is (and unfinished if it was)
    summary = write_report(tmp_path / "runs", tmp_path / "out", rounds=5)
    assert {r["algorithm"]: r["rounds"] for r in summary["table"]} == {"fsl_sage": 5,
                                                                        "fedavg": 3}
    for bad in (0, -2, 2.5, True):
        with pytest.raises(ConfigError, match=r"^--rounds .*: give the number of rounds"):
            write_report(tmp_path / "runs", tmp_path / "bad", rounds=bad)
    assert not (tmp_path / "bad").exists()


def test_each_seed_of_a_series_is_listed_under_its_facet(tmp_path):
    make_run(tmp_path / "runs", "f1", curve([0.2, 0.5, 0.6]), algorithm="fsl_sage", seed=1)
    make_run(tmp_path / "runs", "f2", curve([0.3, 0.4, 0.45], sim_per_round=20.0),
             algorithm="fsl_sage", seed=2)
    make_run(tmp_path / "runs", "c1", curve([0.1, 0.2, 0.5]), algorithm="cse_fsl", seed=1)
    make_run(tmp_path / "runs", "c2", curve([0.1, 0.5, 0.5]), algorithm="cse_fsl", seed=2)
    summary = write_report(tmp_path / "runs", tmp_path / "out", target=0.5)
    fsl = next(row for row in summary["table"] if row["algorithm"] == "fsl_sage")
    # seed 1 reaches 0.5 in round 1 (1 GiB, 20 s); seed 2 never does
    assert fsl["per_seed"] == [
        {"seed": 1, "best": 0.6, "gib_to_target": pytest.approx(1.0), "time_to_target": 20.0},
        {"seed": 2, "best": 0.45, "gib_to_target": None, "time_to_target": None}]
    text = (tmp_path / "out" / "report.md").read_text()
    assert "| FSL-SAGE | 1 | 60.00% | 1.0000 | 20.0 |" in text
    assert "| FSL-SAGE | 2 | 45.00% | not reached | not reached |" in text
    assert "| CSE-FSL | 2 | 50.00% | 1.0000 | 20.0 |" in text
    # one run per series: no such table
    write_report(tmp_path / "runs" / "f1", tmp_path / "one")
    assert "Each seed on its own" not in (tmp_path / "one" / "report.md").read_text()
