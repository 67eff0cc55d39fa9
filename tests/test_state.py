"""Virtual clients as state: the store, what each algorithm keeps, spilling, checkpoints."""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from typer.testing import CliRunner

from raysage.algorithms import ALGORITHMS
from raysage.algorithms.state import StateMismatch, load_kept, save_kept
from raysage.cli import app
from raysage.config import build_config
from raysage.engine.checkpoint import CHECKPOINT, read_manifest
from raysage.engine.memory import GIB, MIB, describe, estimate
from raysage.engine.orchestrator import build_world, simulate
from raysage.errors import RaysageError
from raysage.results import RunFolder
from raysage.store import StateStore, to_safetensors

QUIET = {"announce": lambda line: None}
TIMING = ("wall_round_time", "wall_time", "memory_driver", "memory_workers_max", "memory_server",
          "memory_total")


def entry(value: float, n: int = 256) -> dict[str, np.ndarray]:
    """A state of n float32 values (n * 4 bytes) plus a 0-d step and an int64 array."""
    return {"w": np.full(n, value, np.float32), "step": np.array(value, np.float32),
            "ids": np.arange(3, dtype=np.int64)}


ENTRY_BYTES = 256 * 4 + 4 + 3 * 8


# ------------------------------------------------------------------ the store

def test_store_keeps_every_dtype_and_shape_exactly_through_a_spill(tmp_path):
    store = StateStore(budget=0, spill_dir=tmp_path / "spill")
    state = {"zero_d": np.array(3.5, np.float32), "matrix": np.arange(6.0).reshape(2, 3),
             "empty": np.zeros((0, 4), np.float32), "flags": np.array([True, False]),
             "tokens": np.arange(12, dtype=np.int64).reshape(3, 4)}
    store.put(7, state)
    store.put(8, entry(1.0))          # over a zero budget: 7 is spilled
    assert (tmp_path / "spill/7.safetensors").exists() and store.ram_bytes == ENTRY_BYTES
    back = store.get(7)
    assert set(back) == set(state)
    for name, array in state.items():
        assert back[name].dtype == array.dtype and back[name].shape == array.shape, name
        np.testing.assert_array_equal(back[name], array)


def test_store_holds_its_budget_in_ram_and_spills_the_least_recently_used(tmp_path):
    store = StateStore(budget=2 * ENTRY_BYTES, spill_dir=tmp_path / "spill")
    for cid in range(5):
        store.put(cid, entry(cid))
        assert store.ram_bytes <= 2 * ENTRY_BYTES
    spilled = sorted(int(p.stem) for p in (tmp_path / "spill").glob("*.safetensors"))
    assert spilled == [0, 1, 2]
    assert store.total_bytes == 5 * ENTRY_BYTES and store.disk_bytes == 3 * ENTRY_BYTES
    store.get(3)                       # 3 becomes the most recent: 4 is next to go
    store.get(0)                       # read back from disk, which spills 4
    assert sorted(int(p.stem) for p in (tmp_path / "spill").glob("*.safetensors")) == \
        [0, 1, 2, 4]
    assert store.get(0)["w"][0] == 0 and store.get(4)["w"][0] == 4
    assert len(store) == 5 and 9 not in store and store.get(9) is None
    store.close()
    assert not (tmp_path / "spill").exists()


def test_store_without_a_spill_folder_keeps_everything():
    store = StateStore(budget=0)
    for cid in range(4):
        store.put(cid, entry(cid))
    assert store.ram_bytes == 4 * ENTRY_BYTES and store.disk_bytes == 0


def test_store_checkpoints_only_what_changed_and_restores_lazily(tmp_path):
    folder = RunFolder(tmp_path / "run")
    store = StateStore(budget=0, spill_dir=tmp_path / "spill")
    store.put(1, entry(1.0))
    store.put(2, entry(2.0))
    first = store.checkpoint(folder, "state/clients", "r0")

    def sha(name):
        return hashlib.sha256((tmp_path / "run" / name).read_bytes()).hexdigest()

    assert first == {1: ("state/clients/1.r0.safetensors", ENTRY_BYTES,
                         sha("state/clients/1.r0.safetensors")),
                     2: ("state/clients/2.r0.safetensors", ENTRY_BYTES,
                         sha("state/clients/2.r0.safetensors"))}
    store.put(2, entry(20.0))
    assert store.checkpoint(folder, "state/clients", "r1") == {
        2: ("state/clients/2.r1.safetensors", ENTRY_BYTES, sha("state/clients/2.r1.safetensors"))}
    fresh = StateStore(budget=0, spill_dir=tmp_path / "spill2")
    files = {1: first[1], 2: ("state/clients/2.r1.safetensors", ENTRY_BYTES, None),
             3: ("state/clients/3.r1.safetensors", ENTRY_BYTES, None)}   # 3's: no file
    fresh.restore(folder, files)       # nothing is read yet
    assert fresh.total_bytes == 3 * ENTRY_BYTES
    assert fresh.get(2)["w"][0] == 20.0 and fresh.get(1)["w"][0] == 1.0
    with pytest.raises(FileNotFoundError):
        fresh.get(3)


# ------------------------------------------------------------------ what persists

KEEPS = {  # algorithm: (kept models, kept optimizers)
    "fsl_sage": (("aux",), ("client",)), "fedavg": ((), ("full",)),
    "sl": ((), ("client",)), "splitfed_v1": ((), ("client",)),
    "splitfed_v2": ((), ("client",)), "fsl_an": ((), ("client", "aux")),
    "cse_fsl": ((), ("client", "aux")), "sglr": (("client",), ("client",)),
}


@pytest.mark.parametrize("name", sorted(ALGORITHMS))
def test_a_client_keeps_what_its_algorithm_declares_and_nothing_a_broadcast_overwrites(name):
    algo = ALGORITHMS[name].from_config(build_config({"algorithm": name}))
    models, optimizers = KEEPS[name]
    assert (algo.client_keeps.models, algo.client_keeps.optimizers) == (models, optimizers)
    client = algo.new_client(5, 4)
    torch.manual_seed(0)
    for optimizer in client.optimizers.values():   # one step of every optimizer
        loss = sum(p.square().sum() for p in optimizer.params)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    kept = save_kept(algo, client)
    assert {k.split(".")[1] for k in kept if k.startswith("model.")} == set(models)
    assert {k.split(".")[1] for k in kept if k.startswith("optimizer.")} == \
        ({o for o in optimizers} if algo.cfg.client_optimizer == "adam" else set())
    # Loaded into another working set, the client continues exactly.
    other = algo.new_client(9, 4)
    load_kept(algo, other, kept)
    assert save_kept(algo, other).keys() == kept.keys()
    for key, value in save_kept(algo, other).items():
        np.testing.assert_array_equal(value, kept[key])


def test_a_clients_first_state_does_not_depend_on_when_or_where_it_is_made():
    algo = ALGORITHMS["fsl_sage"].from_config(build_config({"aux_init": "per_client"}))
    late = algo.new_client(3, 4)
    for cid in (7, 1, 3):                      # other clients made first, in another set
        algo.new_client(cid, 4)
    again = algo.new_client(3, 4)
    for a, b in zip(save_kept(algo, late).values(), save_kept(algo, again).values()):
        np.testing.assert_array_equal(a, b)
    other = algo.new_client(4, 4)
    assert not np.array_equal(save_kept(algo, other)["model.aux.3.weight"],
                              save_kept(algo, late)["model.aux.3.weight"])


def comparable(rows):
    return json.dumps([{k: v for k, v in r.items() if k not in TIMING} for r in rows],
                      sort_keys=True)


@pytest.mark.parametrize("algorithm", ["fsl_sage", "splitfed_v1", "sglr"])
def test_spilling_every_client_to_disk_changes_nothing(tmp_path, algorithm):
    fields = dict(algorithm=algorithm, clients=6, samples_per_client=20, batch_size=10,
                  rounds=3, participation=0.5, align_interval=2, align_epochs=2,
                  test_samples=50, backend="serial", checkpoint_every=0)
    ram = simulate(build_config(fields | {"out": str(tmp_path / "ram")}), **QUIET)
    disk = simulate(build_config(fields | {"out": str(tmp_path / "disk"),
                                           "state_memory_mib": 0}), **QUIET)
    assert comparable(ram.rounds) == comparable(disk.rounds)
    assert comparable(ram.clients) == comparable(disk.clients)
    assert not (tmp_path / "disk/.spill").exists()     # scratch, removed at the end


def test_clients_cost_nothing_until_they_take_part(tmp_path):
    out = tmp_path / "run"
    result = simulate(build_config(dict(clients=40, participation=0.1, rounds=2,
                                        samples_per_client=10, align_epochs=1,
                                        test_samples=50, backend="serial", out=str(out))),
                      **QUIET)
    took_part = {r["client"] for r in result.clients}
    assert len(took_part) <= 8
    manifest = read_manifest(RunFolder(out))
    # The checkpoint holds exactly the clients that took part: their own x_a,i and
    # optimizer moments, and the server's buffer of their uploads.
    assert {int(c) for c in manifest["clients"]} == took_part
    assert {int(c) for c in manifest["server_clients"]} == took_part
    files = sorted(p.name for p in (out / "state/clients").iterdir())
    assert len(files) == len(took_part)


# ------------------------------------------------------------------ checkpoints

def run_and_cut(tmp_path, fields, cut_after: int):
    whole = simulate(build_config(fields | {"out": str(tmp_path / "whole")}), **QUIET)

    def interrupt(row):
        if row["round"] == cut_after:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        simulate(build_config(fields | {"out": str(tmp_path / "cut")}), on_round=interrupt,
                 **QUIET)
    return whole, tmp_path / "cut"


def test_a_checkpoint_resumes_on_another_number_of_workers(tmp_path):
    fields = dict(algorithm="fsl_sage", clients=6, samples_per_client=20, batch_size=10,
                  rounds=4, align_interval=2, align_epochs=2, checkpoint_every=2,
                  test_samples=50, backend="serial", workers=2, state_memory_mib=0)
    whole, cut = run_and_cut(tmp_path, fields, cut_after=2)
    config = cut / "config.yaml"
    config.write_text(config.read_text().replace("workers: 2", "workers: 3"))
    again = simulate(build_config({}), resume=cut, **QUIET)
    assert comparable(again.rounds) == comparable(whole.rounds)
    assert {r["worker"] for r in again.clients if r["round"] >= 2} == {0, 1, 2}


def test_checkpoints_hold_arrays_written_by_the_workers_not_the_driver(tmp_path, monkeypatch):
    from raysage.engine import orchestrator as orch

    returned = []
    original = orch.Orchestrator.checkpoint_actors

    def spy(self, location, tag):
        out = original(self, location, tag)
        returned.append(out)
        return out

    monkeypatch.setattr(orch.Orchestrator, "checkpoint_actors", spy)
    simulate(build_config(dict(clients=4, samples_per_client=10, rounds=2, align_epochs=1,
                               test_samples=20, backend="serial", checkpoint_every=1,
                               out=str(tmp_path / "run"))), **QUIET)
    # What reaches the driver is file names and sizes, never arrays.
    for out in returned:
        for cid, (name, size, sha256) in {**out["clients"], **out["server_clients"]}.items():
            assert isinstance(name, str) and name.endswith(".safetensors") and size > 0
            assert isinstance(sha256, str) and len(sha256) == 64
    manifest = json.loads((tmp_path / "run" / CHECKPOINT).read_text())
    assert manifest["next_round"] == 2 and len(manifest["clients"]) == 4
    # Superseded files are gone: one file per client, the latest.
    assert len(list((tmp_path / "run/state/clients").iterdir())) == 4


class _Payload:
    def __reduce__(self):
        return (os.system, (f"touch {MARKER}",))


MARKER = Path("/tmp/raysage-test-pickle-ran")


def finished_run(tmp_path) -> Path:
    out = tmp_path / "run"
    simulate(build_config(dict(clients=2, samples_per_client=10, rounds=1, align_epochs=1,
                               test_samples=20, backend="serial", out=str(out))), **QUIET)
    return out


def test_a_pickled_checkpoint_is_refused_and_nothing_in_it_runs(tmp_path):
    out = finished_run(tmp_path)
    (out / CHECKPOINT).unlink()
    MARKER.unlink(missing_ok=True)
    (out / "checkpoint.pt").write_bytes(pickle.dumps(_Payload()))
    result = CliRunner().invoke(app, ["simulate", "--resume", str(out)])
    assert result.exit_code == 2 and "pickle" in result.output and "Traceback" not in result.output
    assert [line for line in result.output.splitlines() if "pickle" in line] == [
        next(line for line in result.output.splitlines() if line.startswith("error:"))]
    assert not MARKER.exists()


@pytest.mark.parametrize("tamper, words", [
    (lambda m: m.update(clients={"0": ["../../etc/passwd", 10]}), "not a state file"),
    (lambda m: m.update(format="raysage-checkpoint/0"), "format"),
    (lambda m: m.update(next_round="1; rm -rf /"), "next_round"),
])
def test_a_tampered_manifest_is_refused_in_one_line(tmp_path, tamper, words):
    out = finished_run(tmp_path)
    manifest = json.loads((out / CHECKPOINT).read_text())
    tamper(manifest)
    (out / CHECKPOINT).write_text(json.dumps(manifest))
    result = CliRunner().invoke(app, ["simulate", "--resume", str(out)])
    assert result.exit_code == 2 and "cannot be read" in result.output and words in result.output
    assert "Traceback" not in result.output


def test_corrupt_or_misshapen_state_files_fail_in_one_line(tmp_path):
    out = finished_run(tmp_path)
    manifest = json.loads((out / CHECKPOINT).read_text())
    global_file = out / manifest["global"]
    good = global_file.read_bytes()
    global_file.write_bytes(b"\x00" * 64)
    with pytest.raises(RaysageError, match="global.r0.safetensors is damaged"):
        simulate(build_config({}), resume=out, **QUIET)
    global_file.write_bytes(good)
    # A client's file whose arrays do not fit the model, with its checksum recorded (a
    # checkpoint of another model, say): what the checksum cannot catch, the shapes do.
    name, _ = manifest["clients"]["0"]
    misfit = to_safetensors({"model.aux.0.weight": np.zeros(3, np.float32)})
    (out / name).write_bytes(misfit)
    manifest["digests"][name] = hashlib.sha256(misfit).hexdigest()
    (out / CHECKPOINT).write_text(json.dumps(manifest))
    with pytest.raises(StateMismatch, match="does not fit"):
        simulate(build_config({}), resume=out, changes={"rounds": 2}, **QUIET)
    # Without a checksum of its own, a file that is not safetensors at all.
    (out / name).write_bytes(b"\x00" * 64)
    manifest["format"], manifest["digests"] = "raysage-checkpoint/2", {}
    (out / CHECKPOINT).write_text(json.dumps(manifest))
    with pytest.raises(RaysageError, match="not a valid state file"):
        simulate(build_config({}), resume=out, changes={"rounds": 2}, **QUIET)


# ------------------------------------------------------------------ memory and the driver

def test_the_memory_estimate_counts_the_spill_and_the_disk(tmp_path):
    world = build_world(build_config(dict(algorithm="fedavg", clients=10_000, participation=0.1,
                                          rounds=3, samples_per_client=5)))
    need = estimate(world, 2)
    adam = 2 * (world.facts.sizes.client + world.facts.sizes.server)
    assert world.facts.client_state_bytes == adam
    touched = min(10_000, 1000 * 3)
    per_worker = min(5_000, 500 * 3) * adam
    assert need.spill == 2 * (per_worker - 1024 * MIB)
    # Two checkpoints: the last one stays until the next one's manifest is written.
    assert need.checkpoints == 2 * (touched * adam + sum(
        a.nbytes for part in world.facts.initial_global.values() for a in part.values()))
    assert need.worker < 1.6 * GIB          # the budget, not 1,500 clients' state
    line = describe(need)
    assert "disk: up to" in line and f"{need.disk / GIB:.2f}" in line
    # 10,000 clients of synthetic data are generated, not held: the data is a few MB.
    assert need.dataset < 10 * MIB


@pytest.mark.parametrize("clients, participation", [(10_000, 0.001), (20, 1.0)])
def test_the_server_state_estimate_counts_the_uploads_the_run_can_make(clients, participation):
    """FSL-SAGE's server keeps up to align_buffer (1,000) uploaded samples per client. A
    client of 5 samples that took part in all 500 rounds would fill it; with 10 of
    10,000 clients a round, the run's 5,000 client-rounds upload 25,000 samples in all."""
    world = build_world(build_config(dict(
        algorithm="fsl_sage", clients=clients, participation=participation, rounds=500,
        samples_per_client=5, state_memory_mib=1, checkpoint_every=0)))
    need = estimate(world, 1)
    sizes = world.algorithm.sizes
    per_sample = sizes.smashed_per_sample + sizes.labels_per_sample
    selected = round(clients * participation)
    touched = min(clients, selected * 500)
    # One batch of 5 a round (batch 20), uploaded at its first step.
    server_state = min(touched * 1000, selected * 500 * 5) * per_sample
    worker_spill = touched * world.facts.client_state_bytes - MIB
    assert need.spill == worker_spill + server_state - MIB
    if clients == 10_000:   # not 5,000 full buffers
        assert server_state == 25_000 * per_sample < touched * 1000 * per_sample / 10


def test_the_driver_plans_without_importing_torch():
    code = ("import sys; from raysage.config import build_config; "
            "from raysage.engine.orchestrator import build_world; "
            "from raysage.engine.rows import plan_rows; "
            "rows = plan_rows(build_world(build_config({'algorithm': 'fsl_sage', "
            "'clients': 20, 'backend': 'ray'})), 2); "
            "assert rows[0]['total_bytes'] > 0; "
            "print(sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.')))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def test_the_rows_of_a_run_name_clients_who_took_part_only(tmp_path):
    result = simulate(build_config(dict(algorithm="fedavg", clients=1000, participation=0.005,
                                        rounds=2, samples_per_client=10, test_samples=20,
                                        backend="serial", out=str(tmp_path / "run"))), **QUIET)
    rows = pq.read_table(tmp_path / "run/clients.parquet").to_pylist()
    assert len(rows) == 10 and all(r["num_samples"] == 10 for r in rows)
    assert result.rounds[-1]["participants"] == 5


def test_batchnorm_statistics_survive_a_checkpoint(tmp_path):
    """ResNet-18's running statistics and step counters are state like any other."""
    fields = dict(algorithm="fedavg", model="resnet18", clients=2, samples_per_client=8,
                  batch_size=4, rounds=2, checkpoint_every=1, test_samples=20,
                  backend="serial")
    whole, cut = run_and_cut(tmp_path, fields, cut_after=0)
    again = simulate(build_config({}), resume=cut, **QUIET)
    assert comparable(again.rounds) == comparable(whole.rounds)
    tracked = [k for k in whole.global_state["client"] if k.endswith("num_batches_tracked")]
    assert tracked and all(np.asarray(again.global_state["client"][k]).shape == ()
                           for k in tracked)


@pytest.mark.parametrize("kind, weight_decay, momentum", [
    ("adam", 0.0, 0.0), ("adam", 1e-4, 0.0), ("adamw", 1e-2, 0.0), ("sgd", 0.0, 0.0),
    ("sgd", 1e-4, 0.9),
])
def test_optimizers_take_torchs_steps_to_the_bit(kind, weight_decay, momentum):
    from raysage.algorithms.optim import Optimizer

    torch.manual_seed(0)
    ours = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Flatten(),
                               torch.nn.Linear(4 * 6 * 6, 5))
    theirs = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Flatten(),
                                 torch.nn.Linear(4 * 6 * 6, 5))
    theirs.load_state_dict(ours.state_dict())
    lr = 0.05 if kind == "sgd" else 1e-3
    mine = Optimizer(kind, ours.parameters(), lr=lr, weight_decay=weight_decay,
                     momentum=momentum)
    reference = {"adam": lambda p: torch.optim.Adam(p, lr=lr, weight_decay=weight_decay),
                 "adamw": lambda p: torch.optim.AdamW(p, lr=lr, weight_decay=weight_decay),
                 "sgd": lambda p: torch.optim.SGD(p, lr=lr, weight_decay=weight_decay,
                                                  momentum=momentum)}[kind](theirs.parameters())
    for step in range(5):
        x = torch.randn(6, 3, 8, 8)
        for model, optimizer in ((ours, mine), (theirs, reference)):
            optimizer.zero_grad()
            model(x).square().mean().backward()
            optimizer.step()
        if step == 2:   # a client's state leaves and comes back between rounds
            mine.load_state_arrays(pickle.loads(pickle.dumps(mine.state_arrays())))
    for a, b in zip(ours.parameters(), theirs.parameters()):
        assert torch.equal(a, b)
    theirs_state = reference.state_dict()["state"]
    for i, state in enumerate(mine.state):
        expected = {k: v for k, v in theirs_state.get(i, {}).items() if v is not None}
        assert state.keys() == expected.keys()
        for key, value in state.items():
            assert torch.equal(value, expected[key]), (i, key)


@pytest.mark.parametrize("algorithm", ["fsl_sage", "fedavg"])
def test_building_a_world_and_its_evaluation_model_draws_nothing_from_torchs_generator(
        algorithm):
    """A sweep builds worlds (and a serial one evaluates) on several threads of one
    process: any unlocked draw from torch's one global generator would move another
    point's seeded initial models."""
    torch.manual_seed(0)
    before = torch.random.get_rng_state()
    world = build_world(build_config(dict(algorithm=algorithm, backend="serial", clients=2,
                                          samples_per_client=10, test_samples=10)))
    algo = world.algorithm
    server = algo.init_server() if algo.has_server else None
    algo.eval_model(server, world.facts.initial_global)
    assert torch.equal(torch.random.get_rng_state(), before)
