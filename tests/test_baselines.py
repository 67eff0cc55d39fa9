"""The baselines against each other and against hand computations."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from raysage.algorithms import ALGORITHMS
from raysage.algorithms.base import Participant, Upload
from raysage.engine.local import run_client_round
from raysage.algorithms.state import to_state
from raysage.streams import seeded
from raysage.config import build_config
from raysage.engine.orchestrator import build_world, plan, simulate
from raysage.data import client_batch
from raysage.engine.runtime import evaluate
from raysage.netsim.profiles import MEDIAN_DEVICE

QUIET = {"announce": lambda line: None}


def run(tmp_path, name, **fields):
    return simulate(build_config(fields | {"out": str(tmp_path / name)}), **QUIET)


def make(name, **fields):
    cfg = build_config(fields | {"algorithm": name})
    return ALGORITHMS[name].from_config(cfg, 10)


ONE_CLIENT = dict(clients=1, samples_per_client=50, batch_size=20, rounds=2, test_samples=200,
                  backend="serial", seed=5, client_optimizer="sgd", client_lr=0.05,
                  server_optimizer="sgd", server_lr=0.02, momentum=0.5)


def plain_training(tmp_path):
    """The composed model trained on the one client's batches, x_c and x_s each with its
    own optimizer: the reference every split method must reproduce with one client."""
    cfg = build_config(ONE_CLIENT | {"algorithm": "splitfed_v2"})
    world = build_world(cfg)
    with seeded(cfg.seed, "init", "client"):
        lower = world.algorithm.arch.make_client()
    with seeded(cfg.seed, "init", "server"):
        upper = world.algorithm.arch.make_server()
    opt_c = torch.optim.SGD(lower.parameters(), lr=0.05, momentum=0.5, weight_decay=1e-4)
    opt_s = torch.optim.SGD(upper.parameters(), lr=0.02, momentum=0.5, weight_decay=1e-4)
    data = {"x_train": world.data.x_train, "y_train": world.data.y_train}
    losses = []
    for rnd in range(cfg.rounds):
        for k in range(3):
            x, y = client_batch(cfg, data, world.data.mean, world.data.std,
                                world.client_indices[0], 0, rnd, k)
            opt_c.zero_grad()
            opt_s.zero_grad()
            F.cross_entropy(nn.Sequential(lower, upper)(x), y).backward()
            opt_c.step()
            opt_s.step()
        test = {"x_test": world.data.x_test, "y_test": world.data.y_test}
        losses.append(evaluate(nn.Sequential(lower, upper), test, world.setup, "cpu")["test_loss"])
    return to_state(lower), losses


def test_one_client_splitfed_v1_v2_and_split_learning_equal_plain_training(tmp_path):
    reference_state, reference_losses = plain_training(tmp_path)
    for name in ("splitfed_v1", "splitfed_v2", "sl"):
        result = run(tmp_path, name, algorithm=name, **ONE_CLIENT)
        for key, value in reference_state.items():
            np.testing.assert_allclose(result.global_state["client"][key], value, atol=1e-6,
                                       err_msg=name)
        assert [r["test_loss"] for r in result.rounds] == pytest.approx(reference_losses,
                                                                        abs=1e-5), name


def test_one_client_sglr_without_acceleration_or_averaging_equals_splitfed_v2(tmp_path):
    v2 = run(tmp_path, "v2", algorithm="splitfed_v2", **ONE_CLIENT | {"server_lr": 0.05})
    sglr = run(tmp_path, "sglr", algorithm="sglr", sglr_alpha=0.0, sglr_phi=0.0, **ONE_CLIENT)
    for a, b in zip(v2.rounds, sglr.rounds):
        assert a["server_loss"] == pytest.approx(b["server_loss"], abs=1e-6)
        assert a["test_loss"] == pytest.approx(b["test_loss"], abs=1e-6)
        assert a["smashed_up"] == b["smashed_up"] and a["grad_down"] == b["grad_down"]
        assert "client_model_up" not in b   # SGLR: no FedAvg, no model traffic at all
        assert b["total_bytes"] == b["smashed_up"] + b["labels_up"] + b["grad_down"]


def test_fsl_sage_with_an_exact_aux_equals_splitfed_v2_update():
    """If x_a is a copy of a server that does not move, g_hat is the true gradient."""
    fields = dict(client_optimizer="sgd", client_lr=0.1, client_weight_decay=0.0)
    sage, v2 = make("fsl_sage", **fields), make("splitfed_v2", **fields)
    server = v2.init_server()
    clients = [algo.new_client(0, 8) for algo in (sage, v2)]
    clients[0].models["aux"] = copy.deepcopy(server.models["server"])
    torch.manual_seed(3)
    x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))

    # Round 1 does not align; FSL-SAGE's upload at k = 0 changes nothing on the client.
    run_client_round(sage, clients[0], 1, [(x, y)],
                     start={"client": to_state(sage.initial_client_model())})
    run_client_round(v2, clients[1], 1, [(x, y)], serve=lambda u: v2.serve(server, 1, u),
                     start={"client": to_state(v2.initial_client_model())})
    for (name, a), b in zip(clients[0].models["client"].state_dict().items(),
                            clients[1].models["client"].state_dict().values()):
        assert torch.allclose(a, b, atol=1e-6), name


@pytest.mark.parametrize("name,uploads", [("cse_fsl", [0, 2, 4]), ("fsl_an", [0, 1, 2, 3, 4, 5])])
def test_local_loss_methods_upload_when_the_paper_says(name, uploads):
    algo = make(name, server_update_interval=2)
    client = algo.new_client(0, 4)
    sent = []
    batches = [(torch.randn(2, 3, 32, 32), torch.tensor([0, 1])) for _ in range(6)]
    run_client_round(algo, client, 0, batches, serve=lambda u: sent.append(u.k),
                     start=algo.init_global())
    assert sent == uploads
    assert sorted(algo.plan_client_round(0, Participant(0, [2] * 6)).exchanges) == uploads


@pytest.mark.parametrize("name,samples", [("cse_fsl", 20 + 5 + 20), ("fsl_an", 90)])
def test_local_loss_bytes_by_hand(tmp_path, name, samples):
    # 45 samples, batch 20, 2 epochs: iterations of 20, 20, 5, 20, 20, 5; q = 2 uploads at
    # k = 0, 2, 4 (20 + 5 + 20 samples) for CSE-FSL, every one (90 samples) for FSL_AN.
    result = run(tmp_path, name, algorithm=name, clients=2, samples_per_client=45, batch_size=20,
                 local_epochs=2, server_update_interval=2, rounds=1, test_samples=50)
    row = result.rounds[0]
    x_c, x_a = 5088 * 4, 7194 * 4
    assert row["smashed_up"] == 2 * samples * 8192 and row["labels_up"] == 2 * samples * 8
    assert row["client_model_up"] == row["client_model_down"] == 2 * x_c
    assert row["aux_up"] == row["aux_down"] == 2 * x_a
    assert row["total_bytes"] == 2 * (2 * x_c + 2 * x_a + samples * (8192 + 8))
    assert "grad_down" not in row     # nothing comes down but the averaged models


def test_sglr_broadcasts_the_mean_of_the_chosen_gradients_with_split_learning_rate():
    algo = make("sglr", clients=4, client_lr=0.01, sglr_alpha=0.5, sglr_phi=0.5,
                server_optimizer="sgd", server_weight_decay=0.0)
    server = algo.init_server()
    assert server.optimizers["server"].lr == pytest.approx(0.01 * 4 ** 0.5)
    torch.manual_seed(4)
    uploads = [Upload(cid, 3, {"smashed": torch.randn(5, 32, 8, 8).numpy(),
                               "y": torch.randint(0, 10, (5,)).numpy()}) for cid in range(4)]
    before = copy.deepcopy(server.models["server"])
    own = {}
    for u in uploads:  # each client's gradient of its own batch-mean loss
        leaf = torch.from_numpy(u["smashed"]).requires_grad_()
        F.cross_entropy(before(leaf), torch.from_numpy(u["y"])).backward()
        own[u.cid] = leaf.grad
    # Uploads arrive out of client-id order (a slow client first); each reply goes
    # to the upload it answers.
    arrived = [uploads[i] for i in (2, 0, 3, 1)]
    replies = algo.serve_group(server, 7, arrived)
    chosen = algo.averaged_clients(7, 3, [0, 1, 2, 3])
    assert len(chosen) == 2
    mean = torch.stack([own[c] for c in chosen]).mean(0)
    for u, reply in zip(arrived, replies):
        expected = mean if u.cid in chosen else own[u.cid]
        assert torch.allclose(torch.from_numpy(reply), expected, atol=1e-6), u.cid
    # The server stepped once, with lr 0.02, on the mean loss over all 20 samples.
    h = torch.cat([torch.from_numpy(u["smashed"]) for u in uploads])
    y = torch.cat([torch.from_numpy(u["y"]) for u in uploads])
    before.zero_grad()
    F.cross_entropy(before(h), y).backward()
    for p, q in zip(before.parameters(), server.models["server"].parameters()):
        assert torch.allclose(p - 0.02 * p.grad, q, atol=1e-6)


def test_splitfed_v1_server_memory_grows_with_clients(tmp_path):
    small = run(tmp_path, "v1-2", algorithm="splitfed_v1", clients=2, samples_per_client=20,
                rounds=1, test_samples=50, backend="serial")
    large = run(tmp_path, "v1-6", algorithm="splitfed_v1", clients=6, samples_per_client=20,
                rounds=1, test_samples=50, backend="serial")
    v2 = run(tmp_path, "v2-6", algorithm="splitfed_v2", clients=6, samples_per_client=20,
             rounds=1, test_samples=50, backend="serial")
    per_copy = (large.rounds[0]["server_state_bytes"] - small.rounds[0]["server_state_bytes"]) / 4
    # One copy between rounds: x_s parameters + Adam's two moments (3 x 603,944 bytes)
    # + Adam's step counter, a 4-byte scalar for each of x_s's 6 parameter tensors.
    assert per_copy == 3 * 603_944 + 6 * 4
    assert v2.rounds[0]["server_state_bytes"] < small.rounds[0]["server_state_bytes"]


PAPER_TABLE = {  # algorithms.md: resnet18, 10 clients x 5,000 samples, batch 256, q = 5
    "fedavg": [895_302_560, 895_302_560],
    "splitfed_v1": [874_000_960, 874_000_960],
    "splitfed_v2": [874_000_960, 874_000_960],
    "cse_fsl": [307_075_200, 307_075_200],
    "fsl_sage": [138_687_040 + 84_194_080, 138_687_040],
}


@pytest.mark.parametrize("name", list(PAPER_TABLE))
def test_dry_run_reproduces_the_paper_byte_table(name):
    rows = plan(build_config({"algorithm": name, "model": "resnet18", "clients": 10,
                              "samples_per_client": 5000, "batch_size": 256, "rounds": 2}))
    assert [r["paper_total_bytes"] for r in rows] == PAPER_TABLE[name]
    assert all(r["sim_round_time"] > 0 for r in rows)


def test_sequential_split_learning_round_time_is_the_sum_of_clients(tmp_path):
    fields = dict(clients=3, samples_per_client=40, rounds=1, model="cnn")
    sl = plan(build_config(fields | {"algorithm": "sl"}))[0]
    v2 = plan(build_config(fields | {"algorithm": "splitfed_v2"}))[0]
    # Identical uniform clients in turn: three times one client's round, each with the
    # hand-over of x_c (down at its start, up at its end; a lone client too receives x_c
    # from the server, which holds it between turns, and returns it).
    # SplitFed v2 runs them at once; its server queue makes it longer than one client alone.
    one = plan(build_config(fields | {"algorithm": "sl", "clients": 1}))[0]
    solo = plan(build_config(fields | {"algorithm": "splitfed_v2", "clients": 1}))[0]
    x_c, d = 5088 * 4, MEDIAN_DEVICE
    hand_over = 2 * d.latency + x_c / d.downlink + x_c / d.uplink
    assert sl["server_model"] == 3 * 2 * x_c and one["server_model"] == 2 * x_c
    # SplitFed v2 alone is SL alone with x_c broadcast and uploaded instead of handed over.
    assert one["sim_round_time"] == pytest.approx(solo["sim_round_time"])
    assert sl["sim_round_time"] == pytest.approx(3 * one["sim_round_time"])
    assert one["sim_round_time"] - hand_over < v2["sim_round_time"] < sl["sim_round_time"]


def test_splitfed_v2_clients_queue_at_the_single_server():
    """Ten identical clients upload together: all but the first wait for the server."""
    cfg = build_config({"algorithm": "splitfed_v2", "clients": 10, "samples_per_client": 40,
                        "server_flops": 1e9})   # a slow server makes the queue obvious
    schedule = build_world(cfg).plan(0, 0.0)
    queues = [schedule.clients[c].queue for c in range(10)]
    assert queues[0] < queues[9] and sorted(queues) == queues and queues[9] > 0
    alone = build_world(cfg.replace(clients=1)).plan(0, 0.0)
    assert alone.clients[0].queue == 0.0
