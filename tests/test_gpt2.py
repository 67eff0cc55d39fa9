"""GPT-2 split parts: composition across cuts, tying, LoRA, padding, checkpoint loading, bytes."""

from __future__ import annotations

import json
import math
import re
import struct

import pytest
import torch
from safetensors.torch import load_file, save_file

from raysage.errors import ModelError
from raysage.models import frozen_bytes, split_loss, transfer_bytes
from raysage.models.gpt2 import (
    GPT2Aux,
    GPT2Client,
    GPT2Server,
    GPT2Spec,
    LoRASpec,
    gpt2_spec,
    gpt2_split,
)

SPEC = gpt2_spec("tiny", vocab_size=50, n_positions=16)


class Split(torch.nn.Module):
    """x_s after x_c: the whole model, as a split run computes it."""

    def __init__(self, spec=SPEC, cut=1, lora=None, seed=0):
        super().__init__()
        self.client = GPT2Client(spec, cut, lora, seed)
        self.server = GPT2Server(spec, cut, lora, seed)

    def forward(self, ids, mask=None):
        return self.server(self.client(ids, mask), mask)


def _trainable(module):
    return [p for p in module.parameters() if p.requires_grad]


def _batch(seed=0, n=3, t=10, vocab=SPEC.vocab_size):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (n, t), generator=g)
    mask = torch.ones(n, t, dtype=torch.uint8)
    mask[1, 6:] = 0  # right padding
    mask[2, :3] = 0  # left padding: rows of padding queries with no real key
    return ids, mask


def test_presets_and_spec_errors():
    assert gpt2_spec("small", 50257, 1024).n_embd == 768
    medium = gpt2_spec("medium")
    assert (medium.n_layer, medium.n_embd, medium.n_head) == (24, 1024, 16)
    with pytest.raises(ModelError, match="huge"):
        gpt2_spec("huge")
    with pytest.raises(ModelError, match="n_head"):
        GPT2Spec(n_layer=2, n_embd=30, n_head=4, vocab_size=10, n_positions=8)


def test_every_cut_computes_the_same_model():
    ids, mask = _batch()
    logits, states = [], []
    for cut in (1, 2, 3):
        split = gpt2_split(SPEC, cut=cut, aux_depth=1, lora_rank=0, seed=3)
        client, server = split.make_client(), split.make_server()
        with torch.no_grad():
            logits.append(server(client(ids, mask), mask))
        states.append(client.state_dict() | server.state_dict())
        # A tensor both parts hold (the embedding and the head's copy) starts equal.
        shared = client.state_dict().keys() & server.state_dict().keys()
        assert shared == {"wte.weight"}
        assert torch.equal(client.state_dict()["wte.weight"], server.state_dict()["wte.weight"])
    assert logits[0].shape == (3, 10, SPEC.vocab_size) and torch.isfinite(logits[0]).all()
    for other in logits[1:]:
        torch.testing.assert_close(other, logits[0], rtol=0, atol=1e-6)
    # Wherever the cut, the parts together hold the same named tensors.
    for other in states[1:]:
        assert other.keys() == states[0].keys()
        assert all(torch.equal(other[k], states[0][k]) for k in other)


def test_same_seed_same_weights_different_seed_different():
    a = Split(seed=1).state_dict()
    b = Split(seed=1).state_dict()
    c = Split(seed=2).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["client.h.0.attn.c_attn.weight"], c["client.h.0.attn.c_attn.weight"])
    # Parts built directly, in any order, agree with the factory's.
    server, client = GPT2Server(SPEC, cut=2, seed=1), GPT2Client(SPEC, cut=2, seed=1)
    ids, mask = _batch()
    with torch.no_grad():
        torch.testing.assert_close(server(client(ids, mask), mask), Split(seed=1)(ids, mask),
                                   rtol=0, atol=1e-6)


def test_aux_starts_from_blocks_after_the_cut():
    split = gpt2_split(SPEC, cut=1, aux_depth=2, lora_rank=2, seed=5)
    aux = split.make_aux()
    full_state = split.make_client().state_dict() | split.make_server().state_dict()
    for name, tensor in aux.state_dict().items():
        assert torch.equal(tensor, full_state[aux.source_name(name)]), name
    assert aux.source_name("h.1.mlp.c_fc.weight") == "h.2.mlp.c_fc.weight"
    ids, mask = _batch()
    assert aux(split.make_client()(ids, mask), mask).shape == (3, 10, SPEC.vocab_size)


def test_cut_and_aux_depth_errors():
    with pytest.raises(ModelError, match="cut=0"):
        gpt2_split(SPEC, cut=0)
    with pytest.raises(ModelError, match="cut=4"):
        gpt2_split(SPEC, cut=4)
    with pytest.raises(ModelError, match="aux_depth=3"):
        gpt2_split(SPEC, cut=2, aux_depth=3)
    with pytest.raises(ModelError, match="aux_depth=0"):
        GPT2Aux(SPEC, cut=1, aux_depth=0)
    with pytest.raises(ModelError, match="lora_rank=-1"):
        gpt2_split(SPEC, lora_rank=-1)


def test_heads_are_tied_and_stay_tied():
    lora = gpt2_split(SPEC, cut=1, aux_depth=2, lora_rank=2, seed=0)
    server, aux = lora.make_server(), lora.make_aux()
    full_tune = gpt2_split(SPEC, cut=1, aux_depth=2, lora_rank=0).make_server()
    for part in (server, aux, full_tune):
        assert part.lm_head.weight is part.wte.weight
        assert part.lm_head.weight.data_ptr() == part.wte.weight.data_ptr()
    assert not server.wte.weight.requires_grad and not aux.wte.weight.requires_grad
    ids, mask = _batch()
    targets = torch.roll(ids, -1, dims=1)
    hidden = torch.randn(3, 10, SPEC.n_embd)
    for model in (server, full_tune):
        opt = torch.optim.Adam(_trainable(model), lr=1e-2)
        before = model.wte.weight.detach().clone()
        opt.zero_grad()
        split_loss(model(hidden, mask), targets).backward()
        opt.step()
        assert model.lm_head.weight is model.wte.weight
        # Without LoRA the head (the server's own wte copy) trains; with it, it stays put.
        assert torch.equal(before, model.wte.weight) == (model is server)


def test_lora_starts_at_base_model_and_trains_only_adapters():
    base = Split(lora=None, seed=7)
    lora = Split(lora=LoRASpec(rank=4, alpha=8.0), seed=7)
    ids, mask = _batch()
    with torch.no_grad():
        torch.testing.assert_close(lora(ids, mask), base(ids, mask), rtol=0, atol=0)
    names = [n for n, p in lora.named_parameters() if p.requires_grad]
    assert names and all(".lora_q." in n or ".lora_v." in n for n in names)
    assert len(names) == 4 * SPEC.n_layer  # A and B for q and v in every block
    frozen = {n: p.detach().clone() for n, p in lora.named_parameters() if not p.requires_grad}
    adapters = {n: p.detach().clone() for n, p in lora.named_parameters() if p.requires_grad}
    opt = torch.optim.Adam(_trainable(lora), lr=1e-2)
    targets = torch.roll(ids, -1, dims=1)
    for _ in range(3):
        opt.zero_grad()
        split_loss(lora(ids, mask), targets).backward()
        opt.step()
    for n, p in lora.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n]), n
            assert p.grad is None, n
        else:
            assert not torch.equal(p, adapters[n]), n
    with torch.no_grad():
        assert not torch.allclose(lora(ids, mask), base(ids, mask))


def test_padding_tokens_do_not_change_real_positions():
    model = Split(lora=LoRASpec(rank=2), seed=1)
    ids, mask = _batch()
    other = ids.clone()
    other[mask == 0] = (ids[mask == 0] + 17) % SPEC.vocab_size
    with torch.no_grad():
        a, b = model(ids, mask), model(other, mask)
        # A left-padded row equals the same tokens unpadded.
        alone = model(ids[2:3, 3:], None)
    assert torch.isfinite(a).all() and torch.isfinite(b).all()
    real = mask.bool()
    torch.testing.assert_close(a[real], b[real], rtol=0, atol=1e-6)
    torch.testing.assert_close(a[2, 3:], alone[0], rtol=0, atol=1e-5)


def test_sequence_longer_than_positions_is_refused():
    with pytest.raises(ModelError, match="n_positions=16"):
        GPT2Client(SPEC, cut=1)(torch.zeros(1, 17, dtype=torch.long))


# --------------------------------------------------------------------------
# Checkpoint loading
# --------------------------------------------------------------------------

_CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")


def _gpt2_checkpoint(folder, spec: GPT2Spec, seed=0, drop=None, dtypes=None):
    """A random checkpoint in the HF GPT-2 layout; returns the file's tensors.

    Mostly F32, with one F16 and one BF16 weight as half-precision exports
    have; ``dtypes`` stores chosen tensors in another dtype.
    """
    g = torch.Generator().manual_seed(seed)
    d, v = spec.n_embd, spec.vocab_size
    shapes = {"wte.weight": (v, d), "wpe.weight": (spec.n_positions, d),
              "ln_f.weight": (d,), "ln_f.bias": (d,)}
    for i in range(spec.n_layer):
        shapes.update({
            f"h.{i}.ln_1.weight": (d,), f"h.{i}.ln_1.bias": (d,),
            f"h.{i}.attn.c_attn.weight": (d, 3 * d), f"h.{i}.attn.c_attn.bias": (3 * d,),
            f"h.{i}.attn.c_proj.weight": (d, d), f"h.{i}.attn.c_proj.bias": (d,),
            f"h.{i}.ln_2.weight": (d,), f"h.{i}.ln_2.bias": (d,),
            f"h.{i}.mlp.c_fc.weight": (d, 4 * d), f"h.{i}.mlp.c_fc.bias": (4 * d,),
            f"h.{i}.mlp.c_proj.weight": (4 * d, d), f"h.{i}.mlp.c_proj.bias": (d,),
        })
    tensors = {name: torch.randn(shape, generator=g) * 0.05 for name, shape in shapes.items()}
    dtypes = {"h.1.mlp.c_fc.weight": torch.float16, "h.2.attn.c_attn.weight": torch.bfloat16,
              **(dtypes or {})}
    for name, dtype in dtypes.items():
        tensors[name] = tensors[name].to(dtype)
    stored = {f"transformer.{k}": t for k, t in tensors.items() if k != drop}
    # Buffers and the tied head that the loader must ignore.
    stored["transformer.h.0.attn.bias"] = torch.ones(1, 1, 4, 4)
    stored["lm_head.weight"] = torch.zeros(v, d)
    save_file(stored, str(folder / "model.safetensors"), metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps(
        {"n_layer": spec.n_layer, "n_embd": spec.n_embd, "n_head": spec.n_head,
         "vocab_size": spec.vocab_size, "n_positions": spec.n_positions, "model_type": "gpt2"}))
    return tensors


def test_load_checkpoint_matches_file_and_split(tmp_path):
    tensors = _gpt2_checkpoint(tmp_path, SPEC)
    split = gpt2_split(None, cut=2, aux_depth=2, lora_rank=2, weights_dir=tmp_path)
    assert split.spec == SPEC
    client, server, aux = split.make_client(), split.make_server(), split.make_aux()
    state = client.state_dict() | server.state_dict()
    for name, stored in tensors.items():
        expected = stored.float()  # F16 and BF16 widen exactly
        if name.endswith(_CONV1D):
            expected = expected.t()
        assert torch.equal(state[name], expected), name
    for part in (server, aux):  # the head is the checkpoint's embedding, not lm_head.weight
        assert torch.equal(part.lm_head.weight, client.wte.weight)
    # Loaded at another cut, the parts compute the same model.
    other = gpt2_split(None, cut=1, aux_depth=1, lora_rank=2, weights_dir=tmp_path)
    ids, mask = _batch()
    with torch.no_grad():
        torch.testing.assert_close(server(client(ids, mask), mask),
                                   other.make_server()(other.make_client()(ids, mask), mask),
                                   rtol=0, atol=1e-6)
    assert torch.equal(aux.h["0"].mlp.c_fc.weight, state["h.2.mlp.c_fc.weight"])


def _load_error(make) -> str:
    with pytest.raises(ModelError) as caught:
        make()
    message = str(caught.value)
    assert "\n" not in message  # every loading error is one line
    return message


def test_load_errors(tmp_path):
    _gpt2_checkpoint(tmp_path, SPEC, drop="h.3.ln_2.bias")
    split = gpt2_split(SPEC, cut=1, aux_depth=1, weights_dir=tmp_path)
    split.make_client()  # the client never needs block 3
    assert re.search(r"h\.3\.ln_2\.bias.*model\.safetensors", _load_error(split.make_server))

    path = tmp_path / "model.safetensors"
    raw = path.read_bytes()
    path.write_bytes(raw[:8] + b"{not json" + raw[17:])
    assert re.search(r"corrupt safetensors file .*model\.safetensors: .*JSON.*; re-export",
                     _load_error(split.make_client))
    path.write_bytes(struct.pack("<Q", 10**9) + b"{}")  # header longer than the file
    assert "corrupt safetensors file" in _load_error(split.make_client)
    path.write_bytes(raw[:-3])  # data cut short
    assert "corrupt safetensors file" in _load_error(split.make_client)
    path.unlink()
    assert re.search(r"model\.safetensors not found", _load_error(split.make_client))
    path.mkdir()
    assert "cannot read weights file" in _load_error(split.make_client)
    assert "nowhere" in _load_error(lambda: gpt2_split(SPEC, weights_dir=tmp_path / "nowhere"))

    wrong = tmp_path / "wrong"
    wrong.mkdir()
    _gpt2_checkpoint(wrong, GPT2Spec(n_layer=4, n_embd=32, n_head=4, vocab_size=50, n_positions=16))
    (wrong / "config.json").unlink()  # a spec is given, so the shapes must catch it
    assert re.search(r"'transformer\.h\.0\.ln_1\.weight'.*has shape \[32\], expected \[64\]",
                     _load_error(gpt2_split(SPEC, weights_dir=wrong).make_client))
    # A Conv1D weight is checked in the file's (in, out) layout.
    conv = tmp_path / "conv"
    conv.mkdir()
    _gpt2_checkpoint(conv, SPEC)
    tensors = load_file(str(conv / "model.safetensors"))
    tensors["transformer.h.0.attn.c_attn.weight"] = tensors["transformer.h.0.attn.c_attn.weight"].t()
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(conv / "model.safetensors"))
    assert re.search(r"c_attn\.weight'.*has shape \[192, 64\], expected \[64, 192\]",
                     _load_error(gpt2_split(SPEC, weights_dir=conv).make_client))

    ints = tmp_path / "ints"
    ints.mkdir()
    _gpt2_checkpoint(ints, SPEC, dtypes={"wpe.weight": torch.int64, "ln_f.bias": torch.float64})
    assert re.search(r"'transformer\.wpe\.weight' in .*model\.safetensors has dtype I64; "
                     r"only F32, F16, BF16", _load_error(gpt2_split(SPEC, weights_dir=ints).make_client))
    assert "has dtype F64" in _load_error(gpt2_split(SPEC, weights_dir=ints, cut=3, aux_depth=1).make_server)


# --------------------------------------------------------------------------
# Byte accounting
# --------------------------------------------------------------------------

def test_transfer_bytes_are_the_lora_factors():
    r, d, cut, aux_depth = 4, SPEC.n_embd, 1, 2
    split = gpt2_split(SPEC, cut=cut, aux_depth=aux_depth, lora_rank=r)
    # Per block: 2 adapters (q, v) x (A: r*d + B: d*r) fp32 values.
    per_block = 2 * (r * d + d * r)
    parts = {"client": (split.make_client(), cut),
             "server": (split.make_server(), SPEC.n_layer - cut),
             "aux": (split.make_aux(), aux_depth)}
    for name, (part, blocks) in parts.items():
        assert transfer_bytes(part) == 4 * per_block * blocks, name
        total = sum(p.numel() for p in part.parameters())  # tied head counted once
        assert transfer_bytes(part) + frozen_bytes(part) == 4 * total
    # Server frozen = its blocks + ln_f + one (tied) embedding copy.
    block = 12 * d * d + 13 * d  # c_attn 3d^2+3d, c_proj d^2+d, c_fc 4d^2+4d, mlp c_proj 4d^2+d, 2 LN 4d
    assert frozen_bytes(parts["server"][0]) == 4 * (3 * block + 2 * d + SPEC.vocab_size * d)


def test_full_fine_tune_trains_every_part_including_the_head_copies():
    # Without LoRA the server's and aux's tied heads (their own wte copies) train too.
    split = gpt2_split(SPEC, cut=1, aux_depth=1, lora_rank=0)
    for part in (split.make_client(), split.make_server(), split.make_aux()):
        assert all(p.requires_grad for p in part.parameters())
        assert frozen_bytes(part) == 0
    server = split.make_server()
    assert server.lm_head.weight is server.wte.weight
    # The tied embedding and head travel once: the bytes are the parameters', not the
    # state dict's (which names the shared tensor twice).
    for part in (split.make_client(), server, split.make_aux()):
        total = sum(p.numel() * p.element_size() for p in part.parameters())
        buffers = sum(b.numel() * b.element_size() for b in part.buffers())
        assert transfer_bytes(part) == total + buffers


def test_dropout_only_in_train_mode():
    spec = GPT2Spec(n_layer=2, n_embd=32, n_head=2, vocab_size=20, n_positions=8, dropout=0.5)
    model = Split(spec, lora=LoRASpec(rank=2, dropout=0.5))
    ids = torch.randint(0, 20, (2, 8))
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(ids), model(ids))
    model.train()
    with torch.no_grad():
        assert not torch.equal(model(ids), model(ids))
    assert math.isclose(model.client.h["0"].attn.lora_q.scaling, 32.0 / 2)
