"""The command line: a thin layer that runs, reports, and fails in one line."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
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


def _lines(output: str) -> list[str]:
    return [line for line in output.splitlines() if line.strip()]


def _serial(out) -> list[str]:
    return ["simulate", "--clients", "2", "--rounds", "1", "--samples-per-client", "10",
            "--test-samples", "20", "--backend", "serial", "--out", str(out)]


@pytest.mark.parametrize("where,message", [
    ("a-file", "is a file, not a folder; choose another --out"),
    ("a-file/run", "a-file is a file, not a folder; choose another --out"),
    ("/proc/raysage-run", "cannot write run folder /proc/raysage-run: "),
])
def test_an_out_that_cannot_be_a_run_folder_is_refused_in_one_line(tmp_path, monkeypatch,
                                                                   where, message):
    if where.startswith("/proc") and not Path("/proc/self").exists():
        pytest.skip("needs Linux's /proc, where nothing can be created")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "a-file").write_text("not a folder")
    start = time.monotonic()
    result = runner.invoke(app, _serial(where))
    lines = _lines(result.output)
    assert result.exit_code == 2 and len(lines) == 1, result.output
    assert lines[0].startswith("error: ") and message in lines[0] and "--out" in lines[0]
    assert time.monotonic() - start < 10
    assert (tmp_path / "a-file").read_text() == "not a folder"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file"]   # nothing left behind


def test_a_binary_config_file_is_refused_in_one_line(tmp_path):
    config = tmp_path / "model.bin"
    config.write_bytes(bytes(range(256)) * 4)
    result = runner.invoke(app, ["simulate", "--config", str(config), "--backend", "serial",
                                 "--out", str(tmp_path / "run")])
    assert result.exit_code == 2 and _lines(result.output) == [
        f"error: config file {config} is not UTF-8 text (byte 128 is b'\\x80'); give a YAML "
        "file of field: value lines"]
    assert not (tmp_path / "run").exists()


@pytest.mark.skipif(sys.platform == "win32", reason="needs POSIX resource limits")
def test_a_run_too_large_for_memory_is_refused_with_the_numbers(tmp_path):
    """The issue's `--clients 100000` once built 28.6 GiB of synthetic images before the
    memory check and died with MemoryError. Images are now made on demand (the data is
    a few hundred MB), so the run meets the estimate, which refuses it with its numbers:
    SplitFed v1's server holds a copy of x_s per participant. The address-space limit
    makes a machine of any size behave like a small one."""
    import resource

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (6 * 2**30, 6 * 2**30))

    out = tmp_path / "run"
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "raysage.cli", "simulate", "--clients", "100000",
                           "--algorithm", "splitfed_v1", "--backend", "serial",
                           "--out", str(out)], preexec_fn=limit,
                          capture_output=True, text=True, timeout=300)
    lines = _lines(proc.stdout + proc.stderr)
    assert proc.returncode == 2 and len(lines) == 1, lines[-20:]
    assert lines[0].startswith("error: this run needs about "), lines
    assert "server" in lines[0] and "lower" in lines[0], lines
    assert time.monotonic() - start < 60 and not out.exists()


def test_an_empty_test_split_is_refused_before_anything_is_written(tmp_path):
    data = tmp_path / "cifar10_empty_test.npz"
    x, y = np.zeros((40, 32, 32, 3), np.uint8), np.arange(40) % 10
    np.savez(data, x_train=x, y_train=y, x_test=np.zeros((0, 32, 32, 3), np.uint8),
             y_test=np.zeros(0, np.int64))
    out = tmp_path / "run"
    start = time.monotonic()
    result = runner.invoke(app, ["simulate", "--dataset", "cifar10", "--data-dir", str(data),
                                 "--clients", "2", "--rounds", "1", "--backend", "serial",
                                 "--out", str(out)])
    assert result.exit_code == 2 and _lines(result.output) == [
        f"error: dataset cifar10 in {data} has an empty test split (0 samples); give data "
        "with at least one test sample"]
    assert time.monotonic() - start < 10 and not out.exists()


def test_version_names_the_installed_package_and_its_engines():
    from importlib.metadata import version

    import ray
    import torch

    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0
    # __version__ and the package metadata (pyproject.toml) must agree
    assert result.output.strip() == (f"raysage {version('raysage')} (ray {ray.__version__}, "
                                     f"torch {torch.__version__})")
