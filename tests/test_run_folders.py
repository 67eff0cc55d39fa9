"""Run folders that cannot be silently corrupted: checksums, a lock, safe YAML, a config
that a resume holds to, and tables checked before anything starts."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import numpy as np
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from raysage.cli import app
from raysage.config import build_config, load_config
from raysage.engine.orchestrator import simulate
from raysage.errors import ConfigError, RaysageError
from raysage.results import RunFolder
from raysage.results.writer import LOCK
from raysage.store import StateStore

TINY = dict(algorithm="fsl_sage", clients=4, samples_per_client=20, batch_size=10, rounds=2,
            test_samples=40, backend="serial", align_epochs=1, checkpoint_every=1, seed=3)


@pytest.fixture
def finished(tmp_path):
    """A finished two-round run with checkpoints; its folder."""
    lines = []
    simulate(build_config(TINY, {"out": str(tmp_path / "run")}), announce=lines.append)
    return tmp_path / "run"


def resume(folder, **changes):
    lines = []
    result = simulate(None, resume=folder, changes=changes, announce=lines.append)
    return result, lines


def one_line(error) -> str:
    message = str(error.value)
    assert "\n" not in message
    return message


# ------------------------------------------------------------------ checksums

def test_a_checkpoint_records_a_sha256_of_every_file_and_of_its_config(finished):
    import hashlib

    manifest = json.loads((finished / "checkpoint.json").read_text())
    assert manifest["format"] == "raysage-checkpoint/3"
    files = {manifest["global"], manifest["server"],
             *(name for name, _ in manifest["clients"].values()),
             *(name for name, _ in manifest["server_clients"].values())}
    assert set(manifest["digests"]) == files and len(files) == 2 + 4 + 4
    for name, recorded in manifest["digests"].items():
        assert hashlib.sha256((finished / name).read_bytes()).hexdigest() == recorded
    assert len(manifest["config_sha256"]) == 64


@pytest.mark.parametrize("damage", ["overwrite", "truncate", "remove"])
def test_a_damaged_state_file_is_refused_in_one_line_before_anything_starts(finished, damage):
    name = next(iter(json.loads((finished / "checkpoint.json").read_text())["clients"].values()))[0]
    path = finished / name
    data = bytearray(path.read_bytes())
    if damage == "overwrite":        # 4 KB in the middle, the size unchanged
        middle = len(data) // 2
        data[middle:middle + 4096] = os.urandom(len(data[middle:middle + 4096]))
        path.write_bytes(bytes(data))
    elif damage == "truncate":
        path.write_bytes(bytes(data[:len(data) // 2]))
    else:
        path.unlink()
    begin = time.perf_counter()
    with pytest.raises(RaysageError) as error:
        resume(finished, rounds=3)
    message = one_line(error)
    assert str(path) in message
    assert ("is missing" if damage == "remove" else "is damaged") in message
    assert "checkpoint.json" in message          # the way back: restart from round 0
    assert time.perf_counter() - begin < 10
    # Nothing was written: the run stays as it was, and can still be mended.
    assert pq.read_table(finished / "rounds.parquet").num_rows == 2
    assert not (finished / LOCK).exists()


def test_a_changed_spill_file_is_refused_when_it_is_read(tmp_path):
    store = StateStore(budget=100, spill_dir=tmp_path / "spill")
    store.put(1, {"a": np.arange(40, dtype=np.float32)})       # 160 bytes: over the budget
    store.put(2, {"a": np.ones(40, dtype=np.float32)})         # spills client 1
    spilled = tmp_path / "spill" / "1.safetensors"
    assert spilled.exists()
    np.testing.assert_array_equal(store.get(1)["a"], np.arange(40, dtype=np.float32))
    store.put(2, {"a": np.ones(40, dtype=np.float32)})         # spills client 1 again
    data = bytearray(spilled.read_bytes())
    data[-4:] = b"\x00\x00\x80\x7f"                              # one value becomes inf
    spilled.write_bytes(bytes(data))
    with pytest.raises(RaysageError, match="spilled state file .*1.safetensors is damaged"):
        store.get(1)


# ------------------------------------------------------------------ the lock

def test_a_second_run_on_a_folder_in_use_is_refused_in_one_line(tmp_path):
    folder = tmp_path / "run"
    folder.mkdir()
    # This process holds it, as a run in another thread of it would.
    import socket

    (folder / LOCK).write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                           "since": time.time()}))
    with pytest.raises(ConfigError) as error:
        simulate(build_config(TINY, {"out": str(folder)}), announce=lambda line: None)
    message = one_line(error)
    assert f"run folder {folder} is in use by another run (process {os.getpid()}" in message
    assert sorted(p.name for p in folder.iterdir()) == [LOCK]    # untouched


def test_two_runs_started_together_on_one_folder_leave_one_run_and_one_refusal(tmp_path):
    import threading

    outcomes = []

    def start():
        try:
            simulate(build_config(TINY, {"out": str(tmp_path / "run")}),
                     announce=lambda line: None)
            outcomes.append("finished")
        except ConfigError as exc:
            outcomes.append(str(exc))

    threads = [threading.Thread(target=start) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(outcomes, key=len)[0] == "finished"
    refusal = sorted(outcomes, key=len)[1]
    assert "in use by another run" in refusal or "already exists and is not empty" in refusal
    assert (tmp_path / "run" / "summary.json").exists() and not (tmp_path / "run" / LOCK).exists()


def test_a_stale_lock_of_a_process_that_ended_is_taken_over_with_a_line(tmp_path):
    import socket

    ended = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                           capture_output=True, text=True, check=True)
    folder = tmp_path / "run"
    folder.mkdir()
    (folder / LOCK).write_text(json.dumps({"pid": int(ended.stdout), "host": socket.gethostname(),
                                           "since": time.time() - 60}))
    lines = []
    simulate(build_config(TINY, {"out": str(folder)}), announce=lines.append)
    assert any(f"locked by process {int(ended.stdout)} on this host, which no longer runs"
               in line for line in lines), lines
    assert (folder / "summary.json").exists() and not (folder / LOCK).exists()


def test_a_run_that_fails_before_writing_leaves_no_folder(tmp_path):
    with pytest.raises(RaysageError, match="does not exist"):
        simulate(build_config(TINY, {"out": str(tmp_path / "new"), "dataset": "cifar10",
                                     "data_dir": str(tmp_path / "nothing.npz")}),
                 announce=lambda line: None)
    assert not (tmp_path / "new").exists()


# ------------------------------------------------------------------ YAML and messages

BOMB = """clients: &a [1, 1, 1, 1, 1, 1, 1, 1, 1]
rounds: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a]
seed: &c [*b, *b, *b, *b, *b, *b, *b, *b, *b]
"""


def test_yaml_aliases_are_refused_in_a_config_and_in_a_run_folder(tmp_path):
    path = tmp_path / "bomb.yaml"
    path.write_text(BOMB)
    begin = time.perf_counter()
    with pytest.raises(ConfigError) as error:
        load_config(path)
    assert "uses a YAML alias at line 2" in one_line(error)
    assert time.perf_counter() - begin < 2
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("algorithm: fsl_sage\n" + BOMB)
    with pytest.raises(ConfigError, match="uses a YAML alias"):
        resume(run)


def test_no_message_quotes_an_unbounded_value():
    with pytest.raises(ConfigError) as error:
        build_config({"clients": "x" * 1_000_000})
    assert len(one_line(error)) < 300
    with pytest.raises(ConfigError) as error:
        build_config({"algorithm": ["y"] * 1_000_000})
    assert len(one_line(error)) < 300


# ------------------------------------------------------------------ the config on resume

def test_an_edited_config_is_refused_on_resume(finished):
    config = finished / "config.yaml"
    config.write_text(config.read_text().replace("clients: 4", "clients: 6"))
    with pytest.raises(RaysageError) as error:
        resume(finished, rounds=3)
    message = one_line(error)
    assert f"{config} was edited after the checkpoint of round 1" in message
    assert "--rounds" in message


def test_resume_extends_a_run_with_flags_that_change_nothing_it_computes(finished, tmp_path):
    runner = CliRunner()
    result = runner.invoke(app, ["simulate", "--resume", str(finished), "--rounds", "3",
                                 "--eval-every", "1"])
    assert result.exit_code == 0, result.output
    assert "rounds: 3" in (finished / "config.yaml").read_text()
    summary = json.loads((finished / "summary.json").read_text())
    assert summary["rounds"] == 3
    # The same three rounds as a run made with three from the start.
    whole = simulate(build_config(TINY, {"out": str(tmp_path / "whole"), "rounds": 3}),
                     announce=lambda line: None)
    assert summary["final_accuracy"] == whole.summary["final_accuracy"]
    # What a resume may not change is refused in one line, before anything starts.
    refused = runner.invoke(app, ["simulate", "--resume", str(finished), "--clients", "9"])
    assert refused.exit_code == 2 and "takes only --rounds, --budget-gib" in refused.output
    assert len(refused.output.strip().splitlines()) == 1
    fewer = runner.invoke(app, ["simulate", "--resume", str(finished), "--rounds", "1"])
    assert fewer.exit_code == 2 and "--rounds 1 is below the 3 rounds" in fewer.output


@pytest.mark.parametrize("table", ["rounds.parquet", "clients.parquet"])
def test_a_damaged_table_is_one_line_on_resume(finished, table):
    path = finished / table
    path.write_bytes(path.read_bytes()[:100])
    begin = time.perf_counter()
    with pytest.raises(RaysageError) as error:
        resume(finished, rounds=3)
    assert f"{path} is damaged" in one_line(error)
    assert time.perf_counter() - begin < 10


def test_a_full_disk_says_the_folder_can_be_resumed(tmp_path):
    folder = RunFolder(tmp_path / "run")
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "state").write_text("a file where a folder must go")
    with pytest.raises(RaysageError) as error:
        folder.write_bytes("state/global.r0.safetensors", b"x")
    assert f"raysage simulate --resume {folder}" in one_line(error)
