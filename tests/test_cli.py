"""The command line: a thin layer that runs, reports, and fails in one line."""

from __future__ import annotations

import pyarrow.parquet as pq
from typer.testing import CliRunner

from raysage.cli import app

runner = CliRunner()


def test_simulate_writes_a_run_folder_and_summary(tmp_path):
    out = tmp_path / "cli-run"
    result = runner.invoke(app, ["simulate", "--clients", "3", "--rounds", "2", "--backend",
                                 "serial", "--samples-per-client", "20", "--test-samples", "50",
                                 "--align-epochs", "2", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "final test accuracy" in result.output
    assert pq.read_table(out / "rounds.parquet").num_rows == 2


def test_flags_follow_config_names_and_yaml(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("algorithm: fedavg\nclients: 2\nrounds: 1\nbackend: serial\n"
                      "samples_per_client: 10\ntest_samples: 20\n")
    out = tmp_path / "yaml-run"
    result = runner.invoke(app, ["simulate", "--config", str(config), "--batch-size", "5",
                                 "--out", str(out)])
    assert result.exit_code == 0, result.output
    saved = (out / "config.yaml").read_text()
    assert "algorithm: fedavg" in saved and "batch_size: 5" in saved


def test_bad_value_is_one_line_without_traceback(tmp_path):
    result = runner.invoke(app, ["simulate", "--alpha", "-1", "--out", str(tmp_path / "x")])
    assert result.exit_code == 2
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert lines == ["error: config field 'alpha' = -1.0 must be greater than 0"]
    assert not (tmp_path / "x").exists()
    missing = runner.invoke(app, ["simulate", "--dataset", "cifar10", "--data-dir",
                                  str(tmp_path / "nope"), "--backend", "serial"])
    assert missing.exit_code == 2 and "Traceback" not in missing.output
    assert "nope" in missing.output


def test_algorithms_lists_each_with_a_description():
    result = runner.invoke(app, ["algorithms"])
    assert result.exit_code == 0
    names = [line.split()[0] for line in result.output.splitlines()]
    assert names == ["fsl_sage", "fedavg", "sl", "splitfed_v1", "splitfed_v2", "fsl_an",
                     "cse_fsl", "sglr"]
    assert all(len(line.split()) > 4 for line in result.output.splitlines())


def test_plan_prints_bytes_per_round_without_training(tmp_path):
    result = runner.invoke(app, ["plan", "--algorithm", "splitfed_v2", "--model", "resnet18",
                                 "--clients", "10", "--samples-per-client", "5000",
                                 "--batch-size", "256", "--rounds", "2"])
    assert result.exit_code == 0, result.output
    assert result.output.count("874,000,960") == 2          # the paper's per-round total
    assert "grad_down" in result.output
    bad = runner.invoke(app, ["plan", "--algorithm", "nope"])
    assert bad.exit_code == 2 and "'nope'" in bad.output
