"""Cohorts: work clients run together, and FSL-SAGE's alignments stacked across clients.

A job's result must not depend on which other jobs share its call (bit for
bit), and the stacked computation must agree with the plain one-model
alignment within the tolerance the README states.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from raysage.algorithms import ALGORITHMS, cohort
from raysage.algorithms.cohort import STACK_BYTES, STACK_JOB_BYTES, Stack, stacks
from raysage.algorithms.fsl_sage import Alignment
from raysage.config import build_config

MIB = 1 << 20


def make(model="cnn", **fields):
    extra = {"gpt2_size": "tiny", "seq_len": 8} if model == "gpt2" else {}
    cfg = build_config({"algorithm": "fsl_sage", "model": model, **extra, **fields})
    return ALGORITHMS["fsl_sage"].from_config(cfg, 10 if model != "gpt2" else 259)


def jobs_for(algo, clients: int, n: int, seed: int = 0) -> list[Alignment]:
    """Alignment jobs as the server sends them: buffers of client smashed data, true
    gradients z under one x_s, each client its own x_a,i."""
    arch = algo.arch
    torch.manual_seed(seed)
    x_s, x_c = arch.make_server(), arch.make_client()
    jobs = []
    for cid in range(clients):
        x, y = arch.example_batch(n)
        with torch.no_grad():
            h = x_c(x)
        z = algo.true_gradients(x_s, h, y)
        jobs.append(Alignment(algo.initial_aux_model(cid), cid, 3,
                              {"smashed": h.numpy(), "y": y.numpy(), "z": z.numpy()}))
    return jobs


def aligned(algo, jobs, groups) -> tuple[list, list]:
    """Align copies of the jobs, handed over in the given groups of indices."""
    import copy

    jobs = [Alignment(copy.deepcopy(j.aux), j.cid, j.rnd, j.targets) for j in jobs]
    nmse = [None] * len(jobs)
    for group in groups:
        for i, result in zip(group, algo.align([jobs[i] for i in group])):
            nmse[i] = result
    weights = [{k: v.detach().clone() for k, v in j.aux.state_dict().items()} for j in jobs]
    return nmse, weights


# ------------------------------------------------------------------ stacks
def test_stacks_keep_large_jobs_alone_and_bound_a_stack_by_bytes():
    small, large = STACK_JOB_BYTES // 4, STACK_JOB_BYTES + 1
    sizes = [small] * 6 + [large] + [small]
    keys = ["a"] * 5 + ["b", "a", "a"]
    got = stacks(sizes, keys, "cpu")
    assert ([6], False) in got                       # over the job limit: alone, plain
    stacked = [members for members, vmapped in got if vmapped]
    assert sorted(i for m in stacked for i in m) == [0, 1, 2, 3, 4, 5, 7]
    assert all(len(m) * small <= STACK_BYTES for m in stacked)
    assert [5] in stacked                            # another shape, another stack
    # On a GPU every job is stacked, whatever its size, one stack per shape.
    assert sorted(stacks(sizes, keys, "cuda:0")) == [([0, 1, 2, 3, 4, 6, 7], True), ([5], True)]


@pytest.mark.parametrize("model, n", [("cnn", 20), ("simple_conv", 12), ("resnet18", 6),
                                      ("gpt2", 3)])
def test_a_clients_alignment_does_not_depend_on_who_shares_its_stack(model, n):
    algo = make(model, align_epochs=4, align_batch_size=max(1, n // 2))
    jobs = jobs_for(algo, 5, n)
    assert all(j.targets["smashed"].nbytes <= STACK_JOB_BYTES for j in jobs)
    alone = aligned(algo, jobs, [[i] for i in range(5)])
    together = aligned(algo, jobs, [[0, 1, 2, 3, 4]])
    pairs = aligned(algo, jobs, [[3, 0], [4, 2, 1]])
    for other in (together, pairs):
        assert other[0] == alone[0]
        for a, b in zip(alone[1], other[1]):
            assert all(torch.equal(a[k], b[k]) for k in a)
    if model != "gpt2":        # (4 epochs move GPT-2's LoRA x_a too little to tell)
        assert all(after < before for before, after in alone[0])


def test_stacked_alignment_agrees_with_one_model_at_a_time(monkeypatch):
    """The stated tolerance: stacked and plain alignment (the reference's, one x_a,i at
    a time) differ only in float rounding, which Adam's 100 epochs carry on."""
    algo = make("cnn", align_epochs=100, align_batch_size=20)
    jobs = jobs_for(algo, 4, 20, seed=1)
    stacked = aligned(algo, jobs, [[0, 1, 2, 3]])
    monkeypatch.setattr(cohort, "STACK_JOB_BYTES", -1)       # every job alone, unstacked
    plain = aligned(algo, jobs, [[0, 1, 2, 3]])
    for (b1, a1), (b2, a2) in zip(stacked[0], plain[0]):
        assert b1 == pytest.approx(b2, rel=1e-6)              # the same x_a,i, before
        assert a1 == pytest.approx(a2, rel=1e-3)
    for s, p in zip(stacked[1], plain[1]):
        for k in s:
            assert torch.allclose(s[k], p[k], rtol=0, atol=1e-3 * p[k].abs().max()), k


def test_a_stack_of_one_trains_the_model_itself_and_stacked_copies_are_written_back():
    algo = make("cnn")
    a, b = algo.initial_aux_model(0), algo.initial_aux_model(1)
    before = [p.detach().clone() for p in b.parameters()]
    plain = Stack([a], vmapped=False)
    assert plain.parameters == list(a.parameters())
    stack = Stack([b])
    assert [p.shape[0] for p in stack.parameters] == [cohort.MIN_STACK] * len(before)
    with torch.no_grad():
        for p in stack.parameters:
            p.add_(1.0)
    assert all(torch.equal(p, q) for p, q in zip(b.parameters(), before))
    stack.write_back()
    assert all(torch.equal(p, q + 1.0) for p, q in zip(b.parameters(), before))
    with pytest.raises(ValueError):
        Stack([a, b], vmapped=False)


# ------------------------------------------------------------------ the engine
FIELDS = dict(algorithm="fsl_sage", clients=8, samples_per_client=40, batch_size=10, rounds=3,
              align_interval=1, align_epochs=5, server_update_interval=2, participation=0.75,
              test_samples=200, seed=5)


def simulate_rows(tmp_path, name, **fields):
    from raysage.engine.orchestrator import simulate

    cfg = build_config(FIELDS | {"out": str(tmp_path / name)} | fields)
    result = simulate(cfg, announce=lambda line: None)
    keep = ("accuracy", "train_loss", "nmse_before", "nmse_after", "total_bytes",
            "sim_time", "estimate_nmse")
    return [[row[c] for c in keep] for row in result.rounds], result.global_state


def test_cohorts_form_and_change_nothing_on_any_layout(tmp_path, ray_session, monkeypatch):
    from raysage.engine.runtime import ClientRuntime

    sizes = []
    original = ClientRuntime.run_cohort

    def recorded(self, rnd, segments, *inputs):
        sizes.append(len(segments))
        return original(self, rnd, segments, *inputs)

    monkeypatch.setattr(ClientRuntime, "run_cohort", recorded)
    alone, state = simulate_rows(tmp_path, "alone", backend="serial", cohort=1)
    assert sizes == []
    grouped, grouped_state = simulate_rows(tmp_path, "grouped", backend="serial")
    # 6 clients align each round; cohorts of 3 keep both of the worker's threads busy
    assert max(sizes) == 3
    assert grouped == alone
    for part, arrays in state.items():
        for key, value in arrays.items():
            np.testing.assert_array_equal(grouped_state[part][key], value)
    threes, _ = simulate_rows(tmp_path, "threes", backend="serial", cohort=3)
    assert threes == alone
    for name, layout in (("one", dict(workers=1, cpus_per_worker=2)),
                         ("two", dict(workers=2, cpus_per_worker=1))):
        on_ray, _ = simulate_rows(tmp_path, name, backend="ray", **layout)
        assert on_ray == alone, name


def test_the_default_cohort_counts_what_a_parked_client_holds():
    from raysage.engine.runtime import COHORT_MEMORY, ClientRuntime, MAX_COHORT

    runtime = ClientRuntime(make("cnn", batch_size=20).setup, {}, {})
    # x_c keeps, per sample: its input, the first ReLU's output (read by the second
    # conv too, held once), the pool's channels-last input and int64 indices, and
    # the last ReLU's output
    per_sample = 4 * (3 * 32 * 32 + 16 * 16 * 16 + 32 * 16 * 16 + 32 * 8 * 8) + 8 * 32 * 8 * 8
    assert runtime._activation_bytes() == 20 * per_sample
    assert runtime.cohort(0) == MAX_COHORT
    assert runtime.cohort(5) == 5
    # simple_conv at the reference batch of 128 keeps 134 MiB per parked client
    wide = ClientRuntime(make("simple_conv", batch_size=128).setup, {}, {})
    assert wide._activation_bytes() > COHORT_MEMORY // 2
    assert wide.cohort(0) == 1


def test_the_accuracy_curve_of_stacked_alignment_matches_one_at_a_time(tmp_path, monkeypatch):
    stacked, _ = simulate_rows(tmp_path, "stacked", backend="serial", align_epochs=30)
    monkeypatch.setattr(cohort, "STACK_JOB_BYTES", -1)
    plain, _ = simulate_rows(tmp_path, "plain", backend="serial", align_epochs=30)
    assert stacked != plain             # the stacked path did run
    for s, p in zip(stacked, plain):
        assert s[0] == pytest.approx(p[0], abs=0.02)          # accuracy
        assert s[1] == pytest.approx(p[1], rel=1e-3)          # train loss
        assert s[2] == pytest.approx(p[2], rel=1e-3)          # NMSE before alignment
        assert s[3] == pytest.approx(p[3], rel=1e-3)          # NMSE after
        assert s[4:6] == p[4:6]                               # bytes, simulated time
        assert s[6] == pytest.approx(p[6], rel=1e-2)          # estimate quality
