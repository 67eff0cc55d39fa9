"""simple_conv, the FSL-SAGE reference code's CIFAR split, against the numbers in
../shared/algorithms.md ("Reference configuration (CIFAR-10, simple_conv)")."""

from __future__ import annotations

from typing import get_args

from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import raysage
from raysage.config import ModelName, build_config
from raysage.engine.orchestrator import build_world
from raysage.data import batch_sizes
from raysage.models import get_architecture, num_parameters, state_bytes, summarize
from raysage.models.simple_conv import simple_conv_aux, simple_conv_client, simple_conv_server

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"

# Any drift here changes every byte count compared with the reference.
SIZES_10 = {"client": (107_328, 429_312), "server": (1_649_098, 6_596_392),
            "aux": (40_970, 163_880)}


@pytest.fixture(scope="module")
def arch10():
    return get_architecture("simple_conv", 10)


def test_sizes_match_the_reference(arch10):
    torch.manual_seed(0)
    s = summarize(arch10)
    for part, (params, nbytes) in SIZES_10.items():
        assert (s[part]["params"], s[part]["state_bytes"]) == (params, nbytes), part
    assert s["full"]["state_bytes"] == 429_312 + 6_596_392
    assert s["cut_shape"] == (4096,)
    assert s["smashed_bytes_per_sample"] == 16_384


def test_sizes_by_hand():
    # Conv 5x5: out * (in * 25) weights + out biases; Linear: out * in + out.
    assert SIZES_10["client"][0] == (64 * 3 * 25 + 64) + (64 * 64 * 25 + 64)
    assert SIZES_10["server"][0] == (384 * 4096 + 384) + (192 * 384 + 192) + (10 * 192 + 10)
    assert SIZES_10["aux"][0] == 10 * 4096 + 10
    # No buffers: every state is fp32 parameters only.
    for params, nbytes in SIZES_10.values():
        assert nbytes == 4 * params


def test_num_classes_changes_only_the_heads():
    torch.manual_seed(0)
    s10, s100 = (summarize(get_architecture("simple_conv", n)) for n in (10, 100))
    assert s100["client"] == s10["client"]
    assert s100["server"]["params"] - s10["server"]["params"] == (192 + 1) * 90
    assert s100["aux"]["params"] - s10["aux"]["params"] == (4096 + 1) * 90


def test_registered_for_users():
    assert "simple_conv" in get_args(ModelName)
    assert build_config({"model": "simple_conv", "dataset": "synthetic"}).model == "simple_conv"
    for dataset in ("cifar10", "cifar100"):
        assert build_config({"model": "simple_conv", "dataset": dataset,
                             "data_dir": "x.npz"}).model == "simple_conv"
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    assert "`simple_conv`" in readme


def test_layer_order_and_hyperparameters():
    client = simple_conv_client()
    kinds = [nn.MaxPool2d if isinstance(m, nn.MaxPool2d) else type(m) for m in client]
    assert kinds == [nn.Conv2d, nn.ReLU, nn.MaxPool2d, nn.LocalResponseNorm, nn.Conv2d,
                     nn.ReLU, nn.LocalResponseNorm, nn.MaxPool2d, nn.Flatten]
    for conv, in_channels in ((client[0], 3), (client[4], 64)):
        assert (conv.in_channels, conv.out_channels) == (in_channels, 64)
        assert conv.kernel_size == (5, 5) and conv.padding == (2, 2) and conv.stride == (1, 1)
        assert conv.bias is not None
    for pool in (client[2], client[7]):
        assert (pool.kernel_size, pool.stride, pool.padding) == (3, 2, 1)
    for lrn in (client[3], client[6]):
        assert lrn.size == 4 and lrn.alpha == 0.001 / 9 and lrn.beta == 0.75 and lrn.k == 1.0

    server = simple_conv_server(10)
    assert [type(m) for m in server] == [nn.Linear, nn.ReLU, nn.Linear, nn.ReLU, nn.Linear]
    assert [(m.in_features, m.out_features) for m in server[::2]] == \
        [(4096, 384), (384, 192), (192, 10)]
    aux = simple_conv_aux(10)
    assert isinstance(aux, nn.Linear) and (aux.in_features, aux.out_features) == (4096, 10)


def test_client_computes_the_reference_sequence():
    """The same arithmetic written out with torch.nn.functional, step by step."""
    torch.manual_seed(1)
    client = simple_conv_client()
    x = torch.randn(3, 3, 32, 32)
    c1, c2 = client[0], client[4]
    h = F.max_pool2d(F.relu(F.conv2d(x, c1.weight, c1.bias, padding=2)), 3, 2, 1)
    assert h.shape == (3, 64, 16, 16)
    h = F.local_response_norm(h, 4, alpha=0.001 / 9, beta=0.75, k=1.0)
    h = F.relu(F.conv2d(h, c2.weight, c2.bias, padding=2))
    h = F.max_pool2d(F.local_response_norm(h, 4, alpha=0.001 / 9, beta=0.75, k=1.0), 3, 2, 1)
    assert h.shape == (3, 64, 8, 8)
    with torch.no_grad():
        assert torch.allclose(client(x), h.flatten(1), atol=1e-6)


@pytest.mark.parametrize("classes", [10, 100])
def test_output_shapes(classes):
    torch.manual_seed(0)
    arch = get_architecture("simple_conv", classes)
    assert arch.input_shape == (3, 32, 32)
    x = torch.randn(5, 3, 32, 32)
    with torch.no_grad():
        h = arch.make_client()(x)
        assert h.shape == (5, 4096)
        assert arch.make_server()(h).shape == (5, classes)
        assert arch.make_aux()(h).shape == (5, classes)
        assert arch.make_full()(x).shape == (5, classes)


def test_client_keeps_pytorch_default_initialisation():
    torch.manual_seed(7)
    client = simple_conv_client()
    # Default layers built in the same order from the same seed draw the same numbers.
    torch.manual_seed(7)
    plain = [nn.Conv2d(3, 64, 5, padding=2), nn.Conv2d(64, 64, 5, padding=2)]
    for ours, default in zip((client[0], client[4]), plain):
        assert torch.equal(ours.weight, default.weight) and torch.equal(ours.bias, default.bias)
    # PyTorch's default: uniform within 1 / sqrt(fan_in) for weights and biases.
    for conv, fan_in in ((client[0], 3 * 25), (client[4], 64 * 25)):
        bound = fan_in ** -0.5
        for p in (conv.weight, conv.bias):
            assert p.abs().max() <= bound
        assert conv.weight.abs().max() > 0.99 * bound
        assert conv.weight.std().item() == pytest.approx(bound / 3 ** 0.5, rel=0.02)


def _moments(values: torch.Tensor) -> tuple[float, float, float]:
    v = values.detach().double().flatten()
    mean, std = v.mean().item(), v.std().item()
    kurtosis = (((v - mean) / std) ** 4).mean().item()
    return mean, std, kurtosis


def test_server_and_aux_weights_and_biases_are_normal_with_std_0_05():
    torch.manual_seed(11)
    server = simple_conv_server(10)
    # The 4096 x 384 weight: 1.57 M draws, so the sample std is within 0.1% of 0.05
    # and the kurtosis (3 for a normal, 1.8 for a uniform) within 0.02 of 3.
    mean, std, kurtosis = _moments(server[0].weight)
    assert abs(mean) < 5e-4
    assert std == pytest.approx(0.05, rel=0.005)
    assert kurtosis == pytest.approx(3.0, abs=0.05)
    mean, std, _ = _moments(server[2].weight)
    assert abs(mean) < 2e-3 and std == pytest.approx(0.05, rel=0.02)
    # Biases too (PyTorch's default would be uniform within 1/64, std 0.009).
    biases = torch.cat([server[i].bias for i in (0, 2, 4)])
    mean, std, _ = _moments(biases)
    assert biases.numel() == 384 + 192 + 10
    assert abs(mean) < 0.01 and std == pytest.approx(0.05, rel=0.1)
    assert server[4].weight.std().item() == pytest.approx(0.05, rel=0.1)

    auxes = [simple_conv_aux(10) for _ in range(100)]
    mean, std, kurtosis = _moments(torch.cat([a.weight.flatten() for a in auxes]))
    assert abs(mean) < 5e-4 and std == pytest.approx(0.05, rel=0.005)
    assert kurtosis == pytest.approx(3.0, abs=0.05)
    mean, std, _ = _moments(torch.cat([a.bias for a in auxes]))   # 1,000 biases
    assert abs(mean) < 0.01 and std == pytest.approx(0.05, rel=0.1)


def test_every_part_has_parameters_only(arch10):
    for part in (arch10.make_client(), arch10.make_server(), arch10.make_aux()):
        assert state_bytes(part) == 4 * num_parameters(part)
        assert not list(part.buffers())


# ../shared/algorithms.md: 10 clients x 548 samples, batches 128, 128, 128, 128, 36, q = 5,
# l = 10. x_c = 429,312 bytes, x_a = 163,880, s_h = 16,384 bytes per sample.
X_C, X_S, X_A, S_H, N = 429_312, 6_596_392, 163_880, 16_384, 548
REFERENCE = dict(model="simple_conv", dataset="cifar10", clients=10, batch_size=128,
                 server_update_interval=5, align_interval=10)


def test_subset_gives_each_client_548_samples_in_five_batches(cifar10_subset):
    world = build_world(build_config(REFERENCE | {"data_dir": str(cifar10_subset)}))
    assert len(world.data.y_train) == 5482
    assert [len(world.client_indices[c]) for c in range(10)] == [N] * 10
    assert batch_sizes(N, world.cfg) == [128, 128, 128, 128, 36]


def test_fsl_sage_bytes_match_the_reference(cifar10_subset):
    rows = raysage.plan(**REFERENCE, algorithm="fsl_sage", data_dir=str(cifar10_subset),
                        rounds=10)
    # Per client: x_c down and up, one upload of 128 samples (k = 0 only: q = 5 and five
    # iterations), and in round 0 (t % 10 == 0) the aligned x_a down.
    per_client = 2 * X_C + 128 * S_H
    assert per_client + X_A == 3_119_656
    assert [r["paper_total_bytes"] for r in rows] == [31_196_560] + [29_557_760] * 9
    assert rows[0]["paper_total_bytes"] == 10 * (per_client + X_A)
    assert rows[0]["smashed_up"] == 10 * 128 * S_H and rows[0]["aux_down"] == 10 * X_A
    assert all(r["aux_down"] == 0 for r in rows[1:])
    assert rows[0]["labels_up"] == 10 * 128 * 8
    assert rows[0]["total_bytes"] == rows[0]["paper_total_bytes"] + rows[0]["labels_up"]


def test_cse_fsl_bytes_match_the_reference(cifar10_subset):
    rows = raysage.plan(**REFERENCE, algorithm="cse_fsl", data_dir=str(cifar10_subset),
                        rounds=10)
    assert 10 * (2 * X_C + 2 * X_A + 128 * S_H) == 32_835_360
    assert [r["paper_total_bytes"] for r in rows] == [32_835_360] * 10


# Every other classification algorithm, from the formulas in algorithms.md.
OTHERS = {
    "fedavg": 10 * 2 * (X_C + X_S),                     # 140,514,080
    "splitfed_v1": 10 * (2 * N * S_H + 2 * X_C),        # 188,154,880
    "splitfed_v2": 10 * (2 * N * S_H + 2 * X_C),
    "sl": 10 * (2 * N * S_H + 2 * X_C),                 # the hand-over instead of FedAvg
    "fsl_an": 10 * (N * S_H + 2 * X_C + 2 * X_A),       # 101,648,160
    "sglr": 10 * 2 * N * S_H,                           # 179,568,640
}


@pytest.mark.parametrize("name", list(OTHERS))
def test_other_algorithms_bytes_by_formula(cifar10_subset, name):
    rows = raysage.plan(**REFERENCE, algorithm=name, data_dir=str(cifar10_subset), rounds=2)
    assert [r["paper_total_bytes"] for r in rows] == [OTHERS[name]] * 2


def test_cifar100_sizes(tmp_path):
    path = SHARED_DATA / "cifar100_subset.npz"
    if not path.exists():
        pytest.skip(f"{path} not found")
    rows = raysage.plan(model="simple_conv", dataset="cifar100", data_dir=str(path),
                        clients=4, batch_size=128, rounds=1, algorithm="cse_fsl")
    assert rows[0]["aux_down"] == 4 * (4096 + 1) * 100 * 4
    assert rows[0]["client_model_down"] == 4 * X_C


def test_fsl_sage_trains_on_the_cifar10_subset(tmp_path, cifar10_subset):
    """One reference round for real (alignment shortened), writing its rows."""
    result = raysage.simulate(**REFERENCE, algorithm="fsl_sage", data_dir=str(cifar10_subset),
                              rounds=1, backend="serial", align_epochs=2, test_samples=500,
                              client_weight_decay=0.0, server_weight_decay=0.0,
                              out=str(tmp_path / "run"))
    assert len(result.rounds) == 1 and len(result.clients) == 10
    row = result.rounds[0]
    assert row["paper_total_bytes"] == 31_196_560
    assert 0.0 <= row["accuracy"] <= 1.0 and np.isfinite(row["test_loss"])
    rounds = pq.read_table(Path(result.run_dir) / "rounds.parquet").to_pylist()
    clients = pq.read_table(Path(result.run_dir) / "clients.parquet").to_pylist()
    assert len(rounds) == 1 and rounds[0]["paper_total_bytes"] == 31_196_560
    assert sorted(c["client"] for c in clients) == list(range(10))
    assert all(c["num_samples"] == N for c in clients)
    # Round 0 aligns every client: the estimate's error before and after is measured.
    assert all(np.isfinite(c["nmse_before"]) and np.isfinite(c["nmse_after"]) for c in clients)


@pytest.mark.parametrize("name", ["fsl_sage", "fedavg", "sl", "splitfed_v1", "splitfed_v2",
                                  "fsl_an", "cse_fsl", "sglr"])
def test_every_algorithm_runs_on_synthetic_data(tmp_path, name):
    result = raysage.simulate(model="simple_conv", algorithm=name, clients=2,
                              samples_per_client=12, batch_size=8, rounds=1, test_samples=20,
                              align_epochs=1, backend="serial", out=str(tmp_path / name))
    assert np.isfinite(result.rounds[0]["test_loss"])
