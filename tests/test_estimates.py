"""Estimate quality between alignments, the reference's choices, SGLR's split learning rate."""

from __future__ import annotations

import copy
import json
import math

import numpy as np
import pytest
import torch

from raysage.algorithms import ALGORITHMS
from raysage.algorithms.base import Upload
from raysage.engine.local import run_client_round
from raysage.algorithms.state import load_state
from raysage.observers import gradient_of
from raysage.config import build_config
from raysage.engine.orchestrator import simulate

QUIET = {"announce": lambda line: None}
MEASURES = ("estimate_cosine", "estimate_nmse", "estimate_uploads")
HOST = ("wall_round_time", "wall_time", "memory_driver", "memory_workers_max", "memory_server",
        "memory_total")


def make(name, **fields):
    return ALGORITHMS[name].from_config(build_config(fields | {"algorithm": name}))


def served_agreement(algo, client, x, y, rnd=1):
    """Upload iteration 0 of a round without alignment; what the server measured."""
    server = algo.init_server()
    run_client_round(algo, client, rnd, [(x, y)], server=server, start=algo.init_global())
    sums = server.client_metrics[client.cid]
    (cosine, measured), (nmse, _) = sums["estimate_cosine"], sums["estimate_nmse"]
    return cosine, nmse, measured


def test_an_exact_estimate_has_cosine_one_and_nmse_zero():
    algo = make("fsl_sage")
    torch.manual_seed(0)
    x, y = torch.randn(6, 3, 32, 32), torch.tensor([0, 1, 2, 3, 4, 5])
    client = algo.new_client(2, 6)
    # An auxiliary model that is the server's own x_s estimates exactly.
    client.models["aux"] = copy.deepcopy(algo.init_server().models["server"])
    cosine, nmse, measured = served_agreement(algo, client, x, y)
    assert measured == 1 and cosine == pytest.approx(1.0, abs=1e-6) and nmse < 1e-10
    # The initial x_a is a different, small model: far from the server's gradient.
    cosine, nmse, _ = served_agreement(algo, algo.new_client(2, 6), x, y)
    assert -0.5 < cosine < 0.5 and nmse > 0.5


def test_agreement_is_the_cosine_and_nmse_of_the_two_gradients_by_hand():
    algo = make("cse_fsl")
    torch.manual_seed(1)
    x, y = torch.randn(4, 3, 32, 32), torch.tensor([3, 1, 4, 1])
    client = algo.new_client(0, 4)
    server = algo.init_server()
    for part, state in algo.init_global().items():     # as the round starts: the broadcast
        load_state(client.models[part], state)
    h = client.models["client"](x).detach()
    used = gradient_of(client.models["aux"], h, y).flatten().double()
    true = gradient_of(server.models["server"], h, y).flatten().double()
    cosine, nmse, _ = served_agreement(algo, client, x, y)
    assert cosine == pytest.approx(float(used @ true / (used.norm() * true.norm())), rel=1e-9)
    assert nmse == pytest.approx(float((used - true).pow(2).sum() / true.pow(2).sum()), rel=1e-9)


def comparable(rows):
    return json.dumps([{k: v for k, v in r.items() if k not in HOST + MEASURES} for r in rows],
                      sort_keys=True)


@pytest.mark.parametrize("algorithm, blocking", [("fsl_sage", True), ("fsl_sage", False),
                                                 ("cse_fsl", True), ("fsl_an", True)])
def test_measuring_changes_no_result_and_counts_every_upload(tmp_path, algorithm, blocking):
    fields = dict(algorithm=algorithm, clients=3, samples_per_client=50, batch_size=10,
                  rounds=2, align_interval=1, align_epochs=2, server_update_interval=2,
                  align_blocking=blocking, test_samples=50, backend="serial",
                  checkpoint_every=0)
    on = simulate(build_config(fields | {"out": str(tmp_path / "on")}), **QUIET)
    off = simulate(build_config(fields | {"out": str(tmp_path / "off"),
                                          "estimate_quality": False}), **QUIET)
    assert comparable(on.rounds) == comparable(off.rounds)
    assert comparable(on.clients) == comparable(off.clients)
    for part, state in on.global_state.items():
        for key, value in state.items():
            np.testing.assert_array_equal(off.global_state[part][key], value)
    # 5 iterations a round; uploads at k = 0, 2, 4 (q = 2), or every k for FSL_AN. Each is
    # measured once, by the server or (the upload FSL-SAGE waits for alignment on) the client.
    uploads = 5 if algorithm == "fsl_an" else 3
    assert [r["estimate_uploads"] for r in on.clients] == [uploads] * 6
    assert [r["estimate_uploads"] for r in on.rounds] == [3 * uploads] * 2
    assert all(-1 <= r["estimate_cosine"] <= 1 and r["estimate_nmse"] >= 0 for r in on.rounds)
    assert all(math.isnan(r["estimate_cosine"]) for r in off.rounds)


def test_methods_trained_on_the_true_gradient_measure_nothing(tmp_path):
    result = simulate(build_config(dict(algorithm="splitfed_v2", clients=2, samples_per_client=20,
                                        rounds=1, test_samples=20, backend="serial",
                                        out=str(tmp_path / "run"))), **QUIET)
    # Not an algorithm's metric, so not a column of its results.
    assert "estimate_uploads" not in result.rounds[0]
    assert "estimate_cosine" not in result.clients[0]


def test_the_reference_starts_every_client_from_one_auxiliary_model():
    shared = make("fsl_sage")
    assert shared.params.aux_init == "shared"
    a, b = shared.new_client(0, 4), shared.new_client(7, 4)
    for (name, p), q in zip(a.models["aux"].state_dict().items(),
                            b.models["aux"].state_dict().values()):
        assert torch.equal(p, q), name
    own = make("fsl_sage", aux_init="per_client")
    c, d = own.new_client(0, 4), own.new_client(7, 4)
    assert not torch.equal(c.models["aux"][-1].weight, d.models["aux"][-1].weight)


def test_simple_conv_defaults_are_the_reference_codes_training():
    cfg = build_config({"model": "simple_conv"})
    assert (cfg.batch_size, cfg.client_weight_decay, cfg.server_weight_decay) == (128, 0.0, 0.0)
    assert (cfg.client_optimizer, cfg.client_lr, cfg.params.aux_weight_decay) == ("adam", 1e-3, 0.0)
    given = build_config({"model": "simple_conv", "batch_size": 20})
    assert given.batch_size == 20
    assert build_config({}).batch_size == 20      # other models keep theirs


def test_sglr_server_rate_counts_the_clients_that_take_part_in_each_iteration():
    algo = make("sglr", clients=4, client_lr=0.01, sglr_alpha=0.5, server_optimizer="sgd",
                server_weight_decay=0.0)
    server = algo.init_server()
    assert server.optimizers["server"].lr == pytest.approx(0.01 * 4 ** 0.5)
    torch.manual_seed(2)
    uploads = [Upload(cid, 0, {"smashed": torch.randn(3, 32, 8, 8).numpy(),
                               "y": torch.randint(0, 10, (3,)).numpy()}) for cid in range(3)]
    algo.serve_group(server, 0, uploads)     # one of the four dropped: m = 3
    assert server.optimizers["server"].lr == pytest.approx(0.01 * 3 ** 0.5)
