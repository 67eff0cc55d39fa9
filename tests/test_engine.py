"""The engine end to end: equivalences, run folder, determinism across backends."""

from __future__ import annotations

import json
import math

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from raysage.algorithms import ALGORITHMS
from raysage.algorithms.state import to_state
from raysage.streams import seeded
from raysage.config import build_config, load_config
from raysage.engine.orchestrator import build_world, place_clients, simulate
from raysage.data import client_batch
from raysage.errors import ConfigError, DataError

QUIET = {"announce": lambda line: None}
TIMING_COLUMNS = ("wall_round_time", "wall_time", "memory_driver", "memory_workers_max",
                  "memory_server", "memory_total")


def run(tmp_path, name="run", **fields):
    return simulate(build_config(fields | {"out": str(tmp_path / name)}), **QUIET)


def test_fedavg_with_one_client_equals_plain_training(tmp_path):
    fields = dict(algorithm="fedavg", clients=1, samples_per_client=50, batch_size=20,
                  rounds=2, local_epochs=2, backend="serial", seed=7)
    result = run(tmp_path, **fields)

    # The same arithmetic written out: one model, one Adam, the client's batches in order.
    cfg = build_config(fields)
    world = build_world(cfg)
    with seeded(cfg.seed, "init", "client"):
        lower = world.algorithm.arch.make_client()
    with seeded(cfg.seed, "init", "server"):
        upper = world.algorithm.arch.make_server()
    model = nn.Sequential(lower, upper)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.client_lr,
                                 weight_decay=cfg.client_weight_decay)
    data = {"x_train": world.data.x_train, "y_train": world.data.y_train}
    for rnd in range(cfg.rounds):
        for k in range(6):  # ceil(50 / 20) = 3 batches x 2 epochs
            x, y = client_batch(cfg, data, world.data.mean, world.data.std,
                                world.client_indices[0], 0, rnd, k)
            optimizer.zero_grad()
            F.cross_entropy(model(x), y).backward()
            optimizer.step()
    for part, module in (("client", lower), ("server", upper)):
        for key, value in to_state(module).items():
            np.testing.assert_array_equal(result.global_state[part][key], value)


def test_run_folder_and_bytes_match_the_formula(tmp_path):
    result = run(tmp_path, clients=3, samples_per_client=45, batch_size=20, rounds=2,
                 server_update_interval=2, align_epochs=2, backend="serial", test_samples=100)
    folder = result.run_dir
    assert sorted(p.name for p in folder.iterdir()) == [
        "checkpoint.json", "clients.parquet", "config.yaml", "rounds.parquet", "run.parquet",
        "state", "summary.json"]
    # run.parquet: the config as one flat row, with the algorithm's label and colour.
    assert pq.read_table(folder / "run.parquet").to_pylist() == [
        load_config(folder / "config.yaml").flat_dict()
        | {"algorithm_label": "FSL-SAGE", "algorithm_colour": "#d62728"}]
    assert load_config(folder / "config.yaml").to_dict() == load_config(
        None, clients=3, samples_per_client=45, batch_size=20, rounds=2, server_update_interval=2,
        align_epochs=2, backend="serial", test_samples=100, out=str(folder)).to_dict()
    rounds = pq.read_table(folder / "rounds.parquet").to_pylist()
    clients = pq.read_table(folder / "clients.parquet").to_pylist()
    # 45 samples in batches of 20 are 3 local iterations per client.
    assert [r["client_steps"] for r in rounds] == [9, 9]
    # Per client: x_c down and up (20,352 B each), 25 smashed samples (iterations 0 and 2:
    # 20 + 5) of 8,192 B and their int64 labels, and in round 0 the aligned x_a (28,776 B).
    per_client = 2 * 20352 + 25 * 8192 + 25 * 8
    assert [r["total_bytes"] for r in rounds] == [3 * (per_client + 28776), 3 * per_client]
    assert [r["paper_total_bytes"] for r in rounds] == [3 * (per_client + 28776 - 200),
                                                        3 * (per_client - 200)]
    assert rounds[1]["cumulative_bytes"] == sum(r["total_bytes"] for r in rounds)
    assert len(clients) == 6 and {c["smashed_up"] for c in clients} == {25 * 8192}
    assert rounds[0]["alignments"] == 3 and math.isnan(rounds[1]["nmse_before"])
    assert rounds[0]["sim_round_time"] > 0 and rounds[1]["sim_time"] > rounds[0]["sim_time"]
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["total_bytes"] == rounds[1]["cumulative_bytes"]
    assert summary["final_accuracy"] == rounds[-1]["accuracy"]


def test_bad_input_fails_before_any_folder_is_written(tmp_path):
    out = tmp_path / "never"
    with pytest.raises(DataError, match="no-such"):
        simulate(build_config({"dataset": "cifar10", "data_dir": str(tmp_path / "no-such"),
                               "out": str(out)}), **QUIET)
    with pytest.raises(DataError):
        simulate(build_config({"clients": 50, "samples_per_client": 1000, "dataset": "cifar10",
                               "data_dir": "/nonexistent.npz", "out": str(out)}), **QUIET)
    assert not out.exists()
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "rounds.parquet").write_text("x")
    with pytest.raises(ConfigError, match="already exists"):
        simulate(build_config({"out": str(busy), "backend": "serial"}), **QUIET)


def test_sticky_placement_balances_samples():
    assert place_clients([10, 10, 10, 10], 2) == [0, 1, 0, 1]
    owner = place_clients([50, 10, 10, 10, 10, 10], 2)
    assert owner[0] == 0 and owner[1:] == [1, 1, 1, 1, 1]


def _comparable(rows):
    """Rows without host timings, memory and worker ids, which differ by design."""
    return [{k: v for k, v in r.items() if k not in TIMING_COLUMNS + ("worker",)} for r in rows]


@pytest.mark.parametrize("algorithm", sorted(ALGORITHMS))
def test_same_results_serial_one_worker_two_workers(tmp_path, ray_session, algorithm):
    fields = dict(algorithm=algorithm, clients=5, samples_per_client=30, batch_size=10,
                  rounds=2, align_interval=1, align_epochs=3, server_update_interval=2,
                  participation=0.8, profile="heterogeneous", test_samples=200, seed=11)
    results = [run(tmp_path, "serial", backend="serial", **fields),
               # One worker training two clients at once on threads; two of one thread.
               run(tmp_path, "one", backend="ray", workers=1, cpus_per_worker=2, **fields),
               run(tmp_path, "two", backend="ray", workers=2, cpus_per_worker=1, **fields)]
    reference = results[0]
    assert reference.rounds[0]["participants"] == 4
    for other in results[1:]:
        a, b = _comparable(reference.rounds), _comparable(other.rounds)
        assert json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)
        assert json.dumps(_comparable(reference.clients)) == json.dumps(_comparable(other.clients))
        for part, state in reference.global_state.items():
            for key, value in state.items():
                np.testing.assert_array_equal(other.global_state[part][key], value)


def test_fsl_sage_learns_real_cifar10_on_ray(tmp_path, ray_session, cifar10_subset):
    result = run(tmp_path, clients=10, rounds=5, dataset="cifar10",
                 data_dir=str(cifar10_subset), backend="ray", workers=2, cpus_per_worker=1)
    accuracy = [r["accuracy"] for r in result.rounds]
    assert accuracy[-1] > 0.25, accuracy   # chance is 0.10; observed 0.31 at round 5
    assert result.rounds[0]["nmse_after"] < result.rounds[0]["nmse_before"]


# Test accuracy after 2 rounds observed on this machine (10 iid clients, Adam 1e-3):
# sl 0.44, splitfed_v2 0.39, sglr 0.35, splitfed_v1 = fedavg 0.27, fsl_an 0.26,
# cse_fsl 0.24 (chance is 0.10); FSL-SAGE is checked on Ray above.
@pytest.mark.parametrize("algorithm", sorted(set(ALGORITHMS) - {"fsl_sage"}))
def test_every_baseline_learns_real_cifar10(tmp_path, cifar10_subset, algorithm):
    result = run(tmp_path, algorithm=algorithm, clients=10, rounds=2, dataset="cifar10",
                 data_dir=str(cifar10_subset), backend="serial")
    accuracy = [r["accuracy"] for r in result.rounds]
    assert accuracy[-1] > 0.2 and accuracy[-1] > accuracy[0], accuracy


def test_a_communication_budget_ends_the_run_after_the_round_that_reaches_it(tmp_path):
    # 3 FedAvg clients exchange the whole model (624,296 B) down and up: 3,745,776 B a round.
    per_round = 3 * 2 * 624_296
    budget = 2.5 * per_round / 2**30
    result = run(tmp_path, algorithm="fedavg", clients=3, samples_per_client=20, rounds=10,
                 backend="serial", test_samples=50, budget_gib=budget)
    assert [r["cumulative_bytes"] for r in result.rounds] == [per_round, 2 * per_round,
                                                                3 * per_round]
    assert result.summary["rounds"] == 3
