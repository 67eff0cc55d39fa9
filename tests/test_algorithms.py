"""FedAvg and FSL-SAGE policies in plain torch, against hand computations (no Ray)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from raysage.algorithms import ALGORITHMS
from raysage.algorithms.base import Participant
from raysage.algorithms.cohort import Stack
from raysage.algorithms.fsl_sage import Alignment, FSLSage
from raysage.engine.local import run_client_round
from raysage.algorithms.state import to_state, weighted_average
from raysage.config import build_config
from raysage.models import get_architecture
from raysage.netsim.planner import plan_round
from raysage.netsim.profiles import MEDIAN_DEVICE


def make(name="fsl_sage", model="cnn", **fields):
    cfg = build_config(fields | {"algorithm": name, "model": model})
    return ALGORITHMS[name].from_config(cfg, 10)


def test_cnn_sizes_by_hand():
    sizes = make().sizes
    # x_c: conv 3->16 3x3 (16*27+16) + conv 16->32 3x3 (32*144+32) = 5088 fp32 parameters.
    assert sizes.client == 5088 * 4
    # x_a: conv 32->16 3x3 stride 2 (16*288+16) + linear 256->10 (2570) = 7194 parameters.
    assert sizes.aux == 7194 * 4
    assert sizes.smashed_per_sample == 32 * 8 * 8 * 4


def test_fsl_sage_client_step_is_backprop_of_the_aux_gradient_estimate():
    algo = make(client_optimizer="sgd", client_lr=0.1, client_weight_decay=0.0)
    client = algo.new_client(3, 8)
    x_c, aux = client.models["client"], client.models["aux"]
    start = algo.init_global()
    before = {k: torch.from_numpy(v) for k, v in start["client"].items()}
    torch.manual_seed(0)
    x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))

    # Round 1 (no alignment), one iteration: it uploads and goes on without a reply.
    sent = []
    run_client_round(algo, client, 1, [(x, y)], serve=sent.append, start=start)
    assert [u.k for u in sent] == [0] and sent[0]["y"].tolist() == y.tolist()

    # By hand: g_hat = d/dh mean CE(x_a(h), y), pushed through a fresh copy of x_c.
    manual = get_architecture("cnn", 10).make_client()
    manual.load_state_dict(before)
    h = manual(x)
    leaf = h.detach().requires_grad_()
    (g_hat,) = torch.autograd.grad(F.cross_entropy(aux(leaf), y), leaf)
    h.backward(g_hat)
    for name, p in manual.named_parameters():
        assert torch.allclose(x_c.state_dict()[name], before[name] - 0.1 * p.grad, atol=1e-7)
    assert all(p.grad is None for p in aux.parameters())    # the client never trains x_a


def test_fsl_sage_uploads_every_q_and_aligns_at_k0_of_round_multiples_of_l():
    algo = make(server_update_interval=2, align_interval=3)
    client = algo.new_client(0, 4)
    x, y = torch.randn(2, 3, 32, 32), torch.tensor([1, 2])
    sent = []
    run_client_round(algo, client, 0, [(x, y)] * 5, serve=lambda u: sent.append(u.k),
                     start=algo.init_global())
    assert sent == [0, 2, 4]
    plan = algo.plan_client_round(0, Participant(0, [2] * 5))
    assert [(k, ex.blocking, bool(ex.down)) for k, ex in plan.exchanges.items()] == \
        [(0, True, True), (2, False, False), (4, False, False)]
    assert [algo.aligns_at(t, k) for t, k in [(0, 0), (3, 0), (3, 2), (4, 0)]] == \
        [True, True, False, False]


@pytest.fixture(scope="module")
def aligned_setup():
    torch.manual_seed(1)
    algo = make(align_epochs=60, align_batch_size=16)
    arch = algo.arch
    x_s, x_c = arch.make_server(), arch.make_client()
    with torch.no_grad():
        smashed = x_c(torch.randn(48, 3, 32, 32))
    y = torch.randint(0, 10, (48,))
    return algo, x_s, smashed, y


def test_true_gradients_are_per_sample_and_leave_x_s_untouched(aligned_setup):
    algo, x_s, smashed, y = aligned_setup
    state = {k: v.clone() for k, v in x_s.state_dict().items()}
    z = algo.true_gradients(x_s, smashed, y)
    assert all(torch.equal(state[k], v) for k, v in x_s.state_dict().items())
    assert all(p.grad is None for p in x_s.parameters())
    # Row j of z is the gradient of sample j's own loss (x_s has no cross-sample layers).
    leaf = smashed[5:6].clone().requires_grad_()
    (expected,) = torch.autograd.grad(F.cross_entropy(x_s(leaf), y[5:6]), leaf)
    assert torch.allclose(z[5:6], expected, atol=1e-6)


def test_true_gradients_restore_batchnorm_statistics():
    algo = make(model="resnet18", align_batch_size=3)
    x_s = algo.arch.make_server()
    before = {k: v.clone() for k, v in x_s.state_dict().items()}
    algo.true_gradients(x_s, torch.randn(6, 128, 4, 4), torch.randint(0, 10, (6,)))
    assert all(torch.equal(before[k], v) for k, v in x_s.state_dict().items())


def test_alignment_lowers_nmse_on_a_fixed_buffer(aligned_setup):
    algo, x_s, smashed, y = aligned_setup
    targets = {"smashed": smashed.numpy(), "y": y.numpy(),
               "z": algo.true_gradients(x_s, smashed, y).numpy()}
    aux = algo.initial_aux_model(0)
    [(before, after)] = algo.align([Alignment(aux, 0, 0, targets)])
    assert after < 0.5 * before
    # NMSE is the plain ratio ||g_hat - z||^2 / ||z||^2 of per-sample gradients.
    g = algo.estimates(Stack([aux], vmapped=False), smashed[None], y[None])
    z = torch.from_numpy(targets["z"])[None]
    assert FSLSage.nmse(g, z, 1) == [pytest.approx(after, rel=1e-5)]
    assert FSLSage.nmse(z, z, 1) == [0.0]


def test_tiny_plan_bytes_by_hand():
    algo = make(server_update_interval=2)
    # 45 samples, batch 20: iterations of 20, 20, 5; uploads at k = 0 (20) and k = 2 (5).
    plan = algo.plan_client_round(0, Participant(0, [20, 20, 5]))
    assert sorted(plan.exchanges) == [0, 2]
    timing = plan_round([plan], {0: MEDIAN_DEVICE}, 1e13).clients[0]
    assert timing.bytes == {"client_model_down": 20352, "client_model_up": 20352,
                            "smashed_up": 8192 * 25, "labels_up": 8 * 25, "aux_down": 28776}
    later = plan_round([algo.plan_client_round(1, Participant(0, [20, 20, 5]))], {0: MEDIAN_DEVICE},
                       1e13).clients[0]
    assert "aux_down" not in later.bytes
    fedavg = make("fedavg")
    whole = fedavg.sizes.client + fedavg.sizes.server
    assert whole == (5088 + 150986) * 4
    t = plan_round([fedavg.plan_client_round(0, Participant(0, [20, 20, 5]))], {0: MEDIAN_DEVICE},
                   1e13).clients[0]
    assert t.bytes == {"client_model_down": whole, "client_model_up": whole}


@pytest.mark.parametrize("name,expected", [
    ("fedavg", [895_302_560, 895_302_560]),
    ("fsl_sage", [138_687_040 + 84_194_080, 138_687_040]),
])
def test_paper_byte_table_resnet18(name, expected):
    """algorithms.md: 10 clients x 5,000 samples, batch 256, q = 5; rounds 0 (aligns) and 1."""
    algo = make(name, model="resnet18", batch_size=256)
    assert (algo.sizes.client, algo.sizes.server, algo.sizes.aux) == \
        (2_740_048, 42_025_080, 8_419_408)
    batches = [256] * 19 + [5000 - 19 * 256]
    for rnd, want in enumerate(expected):
        schedule = plan_round([algo.plan_client_round(rnd, Participant(c, batches)) for c in range(10)],
                              {c: MEDIAN_DEVICE for c in range(10)}, 1e13)
        paper_total = sum(n for t in schedule.clients.values()
                          for kind, n in t.bytes.items() if kind != "labels_up")
        assert paper_total == want


def test_weighted_average_by_hand():
    a = {"w": np.array([1.0, 2.0], np.float32), "n": np.array(4, np.int64)}
    b = {"w": np.array([3.0, 6.0], np.float32), "n": np.array(8, np.int64)}
    out = weighted_average([(0.25, a), (0.75, b)])
    assert out["w"].dtype == np.float32 and out["w"].tolist() == [2.5, 5.0]
    assert out["n"].dtype == np.int64 and int(out["n"]) == 7


def test_fedavg_client_trains_both_halves_from_the_broadcast():
    algo = make("fedavg", client_optimizer="sgd", client_lr=0.1, client_weight_decay=0.0)
    client = algo.new_client(0, 4)
    g = algo.init_global()
    x, y = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3])
    out = run_client_round(algo, client, 0, [(x, y)], start=g)
    full = torch.nn.Sequential(algo.arch.make_client(), algo.arch.make_server())
    full[0].load_state_dict({k: torch.from_numpy(v) for k, v in g["client"].items()})
    full[1].load_state_dict({k: torch.from_numpy(v) for k, v in g["server"].items()})
    F.cross_entropy(full(x), y).backward()
    expected = {k: (p - 0.1 * p.grad).detach().numpy() for k, p in full[1].named_parameters()}
    for k, v in expected.items():
        assert np.allclose(out["server"][k], v, atol=1e-6)
    assert to_state(full[0]).keys() == out["client"].keys()
