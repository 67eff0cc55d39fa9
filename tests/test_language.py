"""GPT-2 split fine-tuning on E2E-style data through the simulator."""

from __future__ import annotations

import json
import math

import pytest

from raysage.engine.local import run_client_round
from raysage.config import build_config
from raysage.engine.orchestrator import build_world, plan, simulate
from raysage.errors import ConfigError

QUIET = {"announce": lambda line: None}
VOCAB = 258                                  # bytes + EOS + PAD
UNIFORM_LOSS = math.log(VOCAB)               # 5.55 nats per token

# The tiny GPT-2 (4 blocks, width 64), cut after block 1, one aux block.
D, T, RANK = 64, 112, 4
BLOCK = 12 * D * D + 13 * D                  # ln_1, c_attn, c_proj, ln_2, c_fc, c_proj
LORA_BLOCK = 4 * 2 * (RANK * D + D * RANK)   # fp32 A and B on query and value
TINY_LM = {"model": "gpt2", "dataset": "e2e_synthetic", "e2e_max_slots": 3, "seq_len": T,
           "aux_depth": 1, "backend": "serial", "test_samples": 40}


def test_bytes_of_a_tiny_config_equal_the_hand_computed_numbers():
    cfg = TINY_LM | {"clients": 2, "samples_per_client": 16, "batch_size": 8, "rounds": 1,
                     "lora_rank": RANK}
    smashed = T * D * 4 + T                  # hidden states (fp32) + attention mask (bytes)
    labels, grad = T * 8, T * D * 4          # int64 next-token targets; dL/dh has no mask
    x_c, x_s, x_a = LORA_BLOCK, 3 * LORA_BLOCK, LORA_BLOCK
    assert x_c == 4096
    # FSL-SAGE: x_c down and up, one upload of 8 samples (k = 0; q = 5), x_a down (alignment).
    fsl = plan(build_config(cfg, {"algorithm": "fsl_sage"}))[0]
    assert fsl["total_bytes"] == 2 * (2 * x_c + 8 * smashed + 8 * labels + x_a) == 499_456
    assert (fsl["smashed_up"], fsl["aux_down"]) == (2 * 8 * smashed, 2 * x_a)
    assert "grad_down" not in fsl            # no cut-layer gradient ever comes down
    # SplitFed v2: both iterations exchange activations, targets and gradients.
    sfl = plan(build_config(cfg, {"algorithm": "splitfed_v2"}))[0]
    assert sfl["total_bytes"] == 2 * (2 * x_c + 2 * 8 * (smashed + labels + grad)) == 1_883_648
    # FedAvg: the whole model's adapters, down and up.
    fedavg = plan(build_config(cfg, {"algorithm": "fedavg"}))[0]
    assert fedavg["total_bytes"] == 2 * 2 * (x_c + x_s) == 65_536
    # Frozen weights never travel; they are reported separately.
    sizes = build_world(build_config(cfg, {"algorithm": "fsl_sage"})).setup.sizes
    assert sizes.client_frozen == 4 * (VOCAB * D + 1024 * D + BLOCK)
    assert sizes.server_frozen == 4 * (3 * BLOCK + 2 * D + VOCAB * D)


def test_only_adapters_travel_and_frozen_weights_stay_put(tmp_path):
    from raysage.data import client_batch

    cfg = build_config(TINY_LM, {"clients": 2, "samples_per_client": 16, "batch_size": 8,
                                 "rounds": 2, "lora_rank": RANK, "algorithm": "fedavg",
                                 "client_lr": 1e-2, "out": str(tmp_path / "run")})
    world = build_world(cfg)
    algo, initial = world.algorithm, world.algorithm.init_global()
    assert all("lora" in name for part in initial.values() for name in part)
    # A client's local steps move its adapters and nothing else.
    client = algo.new_client(0, 16)
    frozen = {n: p.detach().clone() for m in client.models.values()
              for n, p in m.named_parameters() if not p.requires_grad}
    train = {"x_train": world.data.x_train, "y_train": world.data.y_train}
    batches = [client_batch(cfg, train, world.setup.mean, world.setup.std,
                            world.client_indices[0], 0, 0, k) for k in range(2)]
    sent = run_client_round(algo, client, 0, batches, start=initial)
    for m in client.models.values():
        for n, p in m.named_parameters():
            if not p.requires_grad:
                assert p.equal(frozen[n]), n
    assert any(not (sent[part][n] == initial[part][n]).all() for part in sent for n in sent[part])
    # Through the engine: the global state holds adapters only, and the summary
    # reports the frozen bytes that never travelled.
    result = simulate(cfg, **QUIET)
    assert all("lora" in name for part in result.global_state.values() for name in part)
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["frozen_model_bytes"]["client"] == 4 * (VOCAB * D + 1024 * D + BLOCK)


@pytest.mark.parametrize("algorithm", ["fsl_sage", "splitfed_v2"])
def test_tiny_gpt2_learns_the_synthetic_e2e_task(tmp_path, algorithm):
    # Random initialisation, so every weight trains (lora_rank defaults to 0 then).
    cfg = build_config(TINY_LM, {
        "algorithm": algorithm, "clients": 2, "samples_per_client": 96, "batch_size": 8,
        "rounds": 4, "client_lr": 3e-3, "server_lr": 3e-3, "aux_lr": 3e-3, "align_epochs": 5,
        "align_buffer": 16, "align_batch_size": 8, "align_interval": 2,
        "out": str(tmp_path / algorithm)})
    rounds = simulate(cfg, **QUIET).rounds
    losses = [r["test_loss"] for r in rounds]
    assert losses[-1] < 0.65 * UNIFORM_LOSS, losses
    assert losses[-1] < losses[0]
    assert 0 < rounds[-1]["accuracy"] < 1   # token accuracy over the targets


def test_lora_dropout_is_the_same_on_any_backend(tmp_path, ray_session):
    fields = TINY_LM | {"algorithm": "fsl_sage", "clients": 3, "samples_per_client": 16,
                        "batch_size": 8, "rounds": 2, "lora_rank": RANK, "lora_dropout": 0.1,
                        "align_epochs": 2, "align_buffer": 8, "align_batch_size": 8}
    serial = simulate(build_config(fields, {"out": str(tmp_path / "serial")}), **QUIET)
    on_ray = simulate(build_config(fields, {"backend": "ray", "workers": 2, "cpus_per_worker": 1,
                                            "out": str(tmp_path / "ray")}), **QUIET)
    assert [r["test_loss"] for r in serial.rounds] == [r["test_loss"] for r in on_ray.rounds]
    assert [r["nmse_after"] for r in serial.rounds] == [r["nmse_after"] for r in on_ray.rounds]


@pytest.mark.parametrize("fields, words", [
    ({"model": "gpt2", "dataset": "cifar10", "data_dir": "x"}, "does not fit dataset"),
    ({"model": "cnn", "dataset": "e2e_synthetic"}, "does not fit dataset"),
    ({"model": "gpt2", "algorithm": "sglr"}, "does not run the language-model task"),
    ({"model": "gpt2", "partition": "dirichlet"}, "splits its records iid"),
    ({"model": "gpt2", "dataset": "e2e"}, "needs --data-dir"),
    ({"model": "gpt2", "tokenizer": "gpt2"}, "vocab.json and merges.txt"),
])
def test_language_config_errors_are_one_line(fields, words):
    with pytest.raises(ConfigError, match=words) as caught:
        build_config(fields)
    assert "\n" not in str(caught.value)


def test_model_gpt2_defaults_to_the_embedded_data_and_the_papers_alignment():
    cfg = build_config({"model": "gpt2"})
    p = cfg.params
    assert (cfg.dataset, cfg.batch_size, p.align_epochs, p.align_batch_size,
            p.align_buffer, cfg.seq_len) == ("e2e_synthetic", 8, 40, 8, 64, 256)
    assert build_config({"model": "gpt2", "align_epochs": 5}).params.align_epochs == 5
    assert build_config({}).params.align_epochs == 100           # the CIFAR paper's


def test_too_short_sequences_and_bad_cuts_fail_in_one_line():
    from raysage.errors import RaysageError

    with pytest.raises(RaysageError, match=r"raise (--)?seq.len"):
        build_world(build_config(TINY_LM, {"seq_len": 16}))
    with pytest.raises(RaysageError, match="aux_depth"):
        build_world(build_config(TINY_LM, {"aux_depth": 4}))
