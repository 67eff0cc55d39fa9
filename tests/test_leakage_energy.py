"""Leakage (distance correlation, the label attack, inversion) and energy per client."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from raysage.config import build_config
from raysage.engine.orchestrator import simulate
from raysage.leakage import cluster_attack, distance_correlation
from raysage.netsim.energy import client_energy
from raysage.netsim.planner import ClientRoundPlan, Exchange, plan_round
from raysage.netsim.profiles import MBIT, PRESETS, DeviceProfile, read_trace

QUIET = {"announce": lambda line: None}
HOST = ("wall_round_time", "wall_time", "memory_driver", "memory_workers_max", "memory_server",
        "memory_total")
LEAKAGE = ("leak_input_dcor", "leak_label_smashed", "leak_label_grad", "leakage_uploads")


# ---------------------------------------------------------------- distance correlation

def test_distance_correlation_by_hand():
    # x = (0, 1, 2), y = (0, 1, 0): the double-centred distance matrices give
    # dCov^2 = 8/81, dVar^2(x) = 40/81, dVar^2(y) = 16/81, so dCor^2 = 1/sqrt(10).
    assert distance_correlation([[0], [1], [2]], [[0], [1], [0]]) == pytest.approx(10 ** -0.25,
                                                                                 rel=1e-12)
    # An affine function of x: 1. A 2 x 2 design (the sample is its marginals'
    # product): exactly 0.
    x = np.arange(12.0).reshape(6, 2)
    assert distance_correlation(x, 3 * x + 1) == pytest.approx(1.0, abs=1e-12)
    assert distance_correlation([[0], [0], [1], [1]], [[0], [1], [0], [1]]) == pytest.approx(
        0.0, abs=1e-12)


# ---------------------------------------------------------------- the label attack

def test_the_label_attack_reads_labels_the_rows_carry_and_not_others():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 10, 400)
    carrying = np.eye(10)[labels] * 5 + rng.normal(0, 0.1, (400, 10))
    assert cluster_attack(carrying, labels, seed=1) == 1.0
    shuffled = np.eye(10)[rng.permutation(labels)] * 5 + rng.normal(0, 0.1, (400, 10))
    chance = np.bincount(labels).max() / len(labels)
    assert cluster_attack(shuffled, labels, seed=1) < chance + 0.1
    # Identical rows tell nothing: the attack can only guess the largest class.
    assert cluster_attack(np.ones((400, 5)), labels, seed=1) == pytest.approx(chance)


def attack_on_raw_rows(rows, labels, seed):
    """The attack as its docstring says, on the rows as they are (no projection)."""
    from scipy.cluster.vq import kmeans2
    from scipy.optimize import linear_sum_assignment

    unit = rows / np.linalg.norm(rows, axis=1, keepdims=True)
    classes = np.unique(labels)
    best, assigned = np.inf, None
    for start in range(10):
        centres, found = kmeans2(unit, len(classes), minit="++", seed=seed + start, iter=30)
        inertia = ((unit - centres[found]) ** 2).sum()
        if inertia < best:
            best, assigned = inertia, found
    counts = np.zeros((len(classes), len(classes)))
    np.add.at(counts, (assigned, np.searchsorted(classes, labels)), 1)
    r, c = linear_sum_assignment(counts, maximize=True)
    return counts[r, c].sum() / len(labels)


@pytest.mark.parametrize("seed", range(6))
def test_the_label_attack_on_wide_rows_equals_the_attack_on_the_raw_rows(seed):
    # A batch of 40 smashed rows of 4,096 values (simple_conv's cut) that carry
    # their labels weakly: the attack works in the rows' span, which must not
    # change what it finds.
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 10, 40)
    rows = rng.normal(0, 1, (10, 4096))[labels] * 0.5 + rng.normal(0, 1, (40, 4096))
    expected = attack_on_raw_rows(rows, labels, seed=7)
    assert 0.2 < expected < 1.0
    assert cluster_attack(rows, labels, seed=7) == expected


# ---------------------------------------------------------------- energy

def test_energy_of_a_one_client_round_by_hand():
    profile = DeviceProfile(compute_flops=1e9, uplink=1e6, downlink=2e6, latency=0.01,
                            joules_per_flop=2e-9, joules_per_byte_up=3e-6,
                            joules_per_byte_down=1e-6, wait_watts=0.5)
    plan = ClientRoundPlan(
        0, download={"client_model_down": 4000}, forward_flops=[1e8, 2e8],
        backward_flops=[3e8, 4e8],
        exchanges={0: Exchange(0, up={"smashed_up": 10_000}, server_flops=5e8,
                               down={"grad_down": 6000}, blocking=True)},
        upload={"client_model_up": 4000})
    timing = plan_round([plan], {0: profile}, server_flops=1e10).clients[0]
    # Compute: 1e9 FLOPs. Radio: 0.01 + 4000/2e6 down; 0.01 + 10000/1e6 up; 0.05 s at
    # the server (5e8 / 1e10, no queue); 0.01 + 6000/2e6 down; 0.01 + 4000/1e6 up.
    radio = (0.01 + 0.002) + (0.01 + 0.01) + 0.05 + (0.01 + 0.003) + (0.01 + 0.004)
    expected = 1e9 * 2e-9 + 14_000 * 3e-6 + 10_000 * 1e-6 + radio * 0.5
    assert timing.radio == pytest.approx(radio, rel=1e-12)
    energy = client_energy(timing, profile)
    assert energy["energy_j"] == pytest.approx(expected, rel=1e-12)
    assert energy["energy_compute_j"] == pytest.approx(2.0, rel=1e-12)


def test_presets_have_energy_and_a_trace_may_give_its_own(tmp_path):
    assert all(p.joules_per_flop > 0 and p.wait_watts > 0 for p in PRESETS.values())
    # LTE's uplink costs more per byte than Wi-Fi's (Huang et al. 2012).
    assert PRESETS["4g-mobile"].joules_per_byte_up > PRESETS["wifi"].joules_per_byte_up
    trace = tmp_path / "t.csv"
    trace.write_text("compute_flops,uplink_mbps,downlink_mbps,latency_ms,wait_watts\n"
                     "1e9,8,16,40,2.5\n1e9,8,16,40,\n")
    first, second = read_trace(trace)
    assert first.wait_watts == 2.5 and first.uplink == 8 * MBIT
    assert second.wait_watts == PRESETS["uniform"].wait_watts


# ---------------------------------------------------------------- through the engine

def comparable(rows):
    return json.dumps([{k: v for k, v in r.items() if k not in HOST + LEAKAGE} for r in rows],
                      sort_keys=True, default=str)


@pytest.mark.parametrize("algorithm", ["splitfed_v2", "sglr", "fsl_sage"])
def test_measuring_leakage_changes_no_result(tmp_path, algorithm):
    fields = dict(algorithm=algorithm, clients=3, samples_per_client=40, batch_size=10,
                  rounds=2, test_samples=50, backend="serial", align_epochs=1,
                  server_update_interval=2, profile="heterogeneous", checkpoint_every=0)
    on = simulate(build_config(fields | {"out": str(tmp_path / "on"), "leakage_uploads": 3}),
                  **QUIET)
    # Off by default (it costs host time; the README gives the measurement).
    off = simulate(build_config(fields | {"out": str(tmp_path / "off")}), **QUIET)
    assert comparable(on.rounds) == comparable(off.rounds)
    assert comparable(on.clients) == comparable(off.clients)
    for part, state in on.global_state.items():
        for key, value in state.items():
            np.testing.assert_array_equal(off.global_state[part][key], value)
    assert all(math.isnan(r["leak_input_dcor"]) for r in off.rounds)
    # Three sampled uploads per client and round (of 4 iterations; FSL-SAGE uploads at
    # k = 0 and 2 only), measured for every one.
    measured = 2 if algorithm == "fsl_sage" else 3
    assert [r["leakage_uploads"] for r in on.clients] == [measured] * 6
    assert all(0 < r["leak_input_dcor"] <= 1 and 0 < r["leak_label_smashed"] <= 1
               for r in on.rounds)
    sends_gradients = algorithm != "fsl_sage"
    assert all(math.isnan(r["leak_label_grad"]) != sends_gradients for r in on.rounds)


def test_energy_columns_add_up_and_inversion_is_reported(tmp_path):
    result = simulate(build_config(dict(
        algorithm="fedavg", clients=3, samples_per_client=20, rounds=2, test_samples=60,
        backend="serial", dropout=0.4, seed=2, inversion=True, inversion_epochs=2,
        out=str(tmp_path / "run"))), **QUIET)
    for rnd, row in enumerate(result.rounds):
        clients = [c for c in result.clients if c["round"] == rnd]
        assert row["energy_j"] == pytest.approx(sum(c["energy_j"] for c in clients))
        for c in clients:
            assert c["energy_j"] == pytest.approx(c["energy_compute_j"] + c["energy_radio_j"])
    assert any(c["dropped"] and 0 < c["energy_j"] for c in result.clients)
    assert result.rounds[-1]["cumulative_energy_j"] == pytest.approx(
        sum(r["energy_j"] for r in result.rounds))
    assert result.summary["energy_j"] == pytest.approx(result.rounds[-1]["cumulative_energy_j"])
    assert 0 < result.summary["inversion_mse"] and 0 < result.summary["inversion_relative"]
