"""Nothing lost: checkpoints, --resume, a killed worker, a diverging loss."""

from __future__ import annotations

import json
import os
import signal

import psutil
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from raysage.cli import app
from raysage.config import build_config
from raysage.engine import orchestrator as orch
from raysage.engine.checkpoint import CHECKPOINT, read_manifest
from raysage.engine.memory import PROCESS_BYTES, check_memory, estimate
from raysage.engine.orchestrator import simulate
from raysage.results import RunFolder
from raysage.errors import RaysageError

TIMING = ("wall_round_time", "wall_time", "memory_driver", "memory_workers_max", "memory_server",
          "memory_total")


def comparable(path):
    rows = pq.read_table(path).to_pylist()
    return json.dumps([{k: v for k, v in r.items() if k not in TIMING} for r in rows],
                      sort_keys=True)


def test_resume_after_an_interrupt_ends_with_the_same_rounds(tmp_path):
    fields = dict(clients=4, samples_per_client=30, rounds=4, align_interval=2, align_epochs=3,
                  checkpoint_every=2, test_samples=100, backend="serial", dropout=0.2)
    simulate(build_config(fields | {"out": str(tmp_path / "whole")}), announce=lambda _: None)

    def interrupt(row):
        if row["round"] == 2:   # after round 2 is written, before its checkpoint
            raise KeyboardInterrupt

    cut = tmp_path / "cut"
    with pytest.raises(KeyboardInterrupt):
        simulate(build_config(fields | {"out": str(cut)}), on_round=interrupt,
                 announce=lambda _: None)
    assert pq.read_table(cut / "rounds.parquet").num_rows == 3 and (cut / CHECKPOINT).exists()
    assert not (cut / "summary.json").exists()
    lines = []
    result = simulate(build_config({}), resume=cut, announce=lines.append)
    assert any("resuming" in line and "round 2" in line for line in lines)
    assert comparable(cut / "rounds.parquet") == comparable(tmp_path / "whole/rounds.parquet")
    assert comparable(cut / "clients.parquet") == comparable(tmp_path / "whole/clients.parquet")
    assert result.summary["rounds"] == 4


def test_resume_cli_refuses_other_flags_and_foreign_folders(tmp_path):
    runner = CliRunner()
    out = runner.invoke(app, ["simulate", "--resume", str(tmp_path), "--clients", "3"])
    assert out.exit_code == 2 and "drop the other flags (--clients)" in out.output
    out = runner.invoke(app, ["simulate", "--resume", str(tmp_path)])
    assert out.exit_code == 2 and "no config.yaml" in out.output
    run = tmp_path / "run"
    simulate(build_config({"clients": 2, "samples_per_client": 10, "rounds": 1, "out": str(run),
                           "backend": "serial", "test_samples": 20, "align_epochs": 1}),
             announce=lambda _: None)
    (run / CHECKPOINT).write_bytes(b"not a checkpoint")
    out = runner.invoke(app, ["simulate", "--resume", str(run)])
    assert out.exit_code == 2 and "cannot be read" in out.output and "Traceback" not in out.output


def kill_actor(orchestrator, actor) -> int:
    """SIGKILL a Ray actor of this run (by its pid) and wait until it is gone."""
    pid = orchestrator.backend.get(orchestrator.backend.call(actor, "pid"))
    os.kill(pid, signal.SIGKILL)
    psutil.Process(pid).wait(timeout=10) if psutil.pid_exists(pid) else None
    return pid


def assert_recovered_like_calm(tmp_path, fields, monkeypatch, method, kill_when):
    """Run ``fields`` undisturbed ("calm"), then again with an actor killed inside
    Orchestrator.<method> when ``kill_when(orchestrator, *args)`` names one
    ("stormy"): the run must say it re-runs round 1 and its tables must equal calm's."""
    simulate(build_config(fields | {"out": str(tmp_path / "calm")}), announce=lambda _: None)
    original = getattr(orch.Orchestrator, method)
    killed = []

    def with_a_kill(self, *args):
        actor = kill_when(self, *args)
        if actor is not None and not killed:
            killed.append(kill_actor(self, actor))
        return original(self, *args)

    monkeypatch.setattr(orch.Orchestrator, method, with_a_kill)
    lines = []
    simulate(build_config(fields | {"out": str(tmp_path / "stormy")}), announce=lines.append)
    assert killed and any("re-running from round 1" in line for line in lines), lines
    for table in ("rounds.parquet", "clients.parquet"):
        assert comparable(tmp_path / "stormy" / table) == comparable(tmp_path / "calm" / table)


@pytest.mark.parametrize("victim", ["worker", "server"])
def test_a_killed_actor_is_replaced_and_the_results_do_not_change(tmp_path, ray_session,
                                                                  monkeypatch, victim):
    fields = dict(algorithm="fsl_sage", clients=6, samples_per_client=40, rounds=3,
                  workers=2, cpus_per_worker=1, checkpoint_every=1, test_samples=100,
                  backend="ray",
                  align_interval=2, align_epochs=3, profile="heterogeneous",
                  round_policy="deadline", deadline=0.15)

    def in_round_1(self, rnd, global_state, start):   # the round's work then meets a dead actor
        if rnd == 1:
            return self.workers[0] if victim == "worker" else self.server
        return None

    assert_recovered_like_calm(tmp_path, fields, monkeypatch, "run_round", in_round_1)
    dropped = [r for r in pq.read_table(tmp_path / "calm/clients.parquet").to_pylist()
               if r["dropped"]]
    assert dropped  # the deadline really dropped someone


def test_a_worker_that_dies_during_a_checkpoint_is_recovered_like_one_mid_round(
        tmp_path, ray_session, monkeypatch):
    # Round 1's rows are written when its checkpoint meets a dead worker: the round,
    # checkpoint included, runs again from round 0's checkpoint, and nothing differs.
    fields = dict(algorithm="fsl_sage", clients=4, samples_per_client=30, rounds=3,
                  workers=2, cpus_per_worker=1, checkpoint_every=1, test_samples=60,
                  backend="ray", align_interval=2, align_epochs=2)

    def at_round_1s_checkpoint(self, location, tag):
        return self.workers[0] if tag.endswith("r1") else None

    assert_recovered_like_calm(tmp_path, fields, monkeypatch, "checkpoint_actors",
                               at_round_1s_checkpoint)
    assert read_manifest(RunFolder(str(tmp_path / "stormy")))["next_round"] == 3


def test_a_diverging_loss_stops_naming_round_and_client_and_keeps_the_checkpoint(tmp_path):
    out = tmp_path / "nan"
    fields = {"algorithm": "fedavg", "clients": 3, "samples_per_client": 40, "rounds": 6,
              "checkpoint_every": 1, "client_optimizer": "sgd", "client_lr": 1e6,
              "test_samples": 50, "backend": "serial", "out": str(out)}
    with pytest.raises(RaysageError, match=r"became (nan|inf) in round \d+ at client \d") as err:
        simulate(build_config(fields), announce=lambda _: None)
    bad_round = int(str(err.value).split("in round ")[1].split()[0])
    rows = pq.read_table(out / "rounds.parquet").to_pylist()
    assert [r["round"] for r in rows] == list(range(bad_round))
    if bad_round:
        assert read_manifest(RunFolder(out))["next_round"] == bad_round
    result = CliRunner().invoke(app, ["simulate", "--resume", str(out)])
    assert result.exit_code == 2 and "became" in result.output


def test_memory_is_estimated_before_any_actor_starts(tmp_path):
    world = orch.build_world(build_config({"algorithm": "splitfed_v1", "clients": 50,
                                           "samples_per_client": 10}))
    need = estimate(world, 2)
    x_s = world.algorithm.sizes.server
    # SplitFed v1: the averaged x_s plus, per participant, a copy with gradients and Adam
    # moments during a round, and the moments of every client's copy between rounds.
    assert need.server == PROCESS_BYTES + x_s + 50 * 4 * x_s + 50 * 2 * x_s
    with pytest.raises(RaysageError, match=r"needs about .* GiB .* is available; lower"):
        check_memory(need, available=need.server)
    out = tmp_path / "huge"
    with pytest.raises(RaysageError, match="is available; lower"):
        simulate(build_config({"algorithm": "splitfed_v1", "model": "resnet18", "clients": 1000,
                               "samples_per_client": 2, "backend": "serial", "out": str(out)}),
                 announce=lambda _: None)
    assert not out.exists()


def test_sigint_leaves_a_folder_that_resume_completes(tmp_path):
    """A real Ctrl-C to the command: one-line message, consistent folder, --resume finishes."""
    import subprocess
    import sys
    import time

    # Rounds long enough (~0.3 s) that SIGINT lands mid-run even on a busy machine.
    args = ["--clients", "3", "--samples-per-client", "120", "--rounds", "40",
            "--checkpoint-every", "2", "--backend", "serial", "--test-samples", "50",
            "--align-epochs", "2"]
    out = tmp_path / "sigint"
    # A shell that runs this suite in the background starts it with SIGINT
    # ignored, which children inherit; give the command the default back.
    proc = subprocess.Popen([sys.executable, "-m", "raysage.cli", "simulate", *args,
                             "--out", str(out)], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        deadline = time.time() + 120
        while not (out / CHECKPOINT).exists() and time.time() < deadline:
            time.sleep(0.2)
        proc.send_signal(signal.SIGINT)
        output, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 2, output
    assert f"raysage simulate --resume {out}" in output and "Traceback" not in output
    done = pq.read_table(out / "rounds.parquet").num_rows
    assert 2 <= done < 40 and not (out / "summary.json").exists()
    resumed = CliRunner().invoke(app, ["simulate", "--resume", str(out)])
    assert resumed.exit_code == 0, resumed.output
    assert [r["round"] for r in pq.read_table(out / "rounds.parquet").to_pylist()] == \
        list(range(40))


def test_ctrl_c_during_start_up_suggests_no_resume(tmp_path):
    """SIGINT while the data loads, before the run folder exists: no --resume hint."""
    import subprocess
    import sys
    import time

    batches = tmp_path / "data" / "cifar-10-batches-py"
    batches.mkdir(parents=True)
    fifo = batches / "data_batch_1"
    os.mkfifo(fifo)   # raysage blocks reading it: start-up lasts until we say
    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "raysage.cli", "simulate", "--dataset",
                             "cifar10", "--data-dir", str(tmp_path / "data"), "--backend",
                             "serial", "--out", str(out)], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    writer = None
    try:
        deadline = time.time() + 120
        while writer is None:
            try:
                # Succeeds once raysage opens the batch to read it (ENXIO before).
                writer = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
            except OSError:
                assert time.time() < deadline and proc.poll() is None, proc.stdout.read()
                time.sleep(0.1)
        proc.send_signal(signal.SIGINT)   # it now waits for the batch's bytes
        output, _ = proc.communicate(timeout=60)
    finally:
        if writer is not None:
            os.close(writer)
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 2, output
    assert [line for line in output.splitlines() if line.strip()] == [
        "error: interrupted before the run folder was written; nothing to resume"]
    assert not out.exists()
