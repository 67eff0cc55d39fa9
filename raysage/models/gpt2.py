"""GPT-2 split for federated split fine-tuning on E2E (FSL-SAGE LM task).

Parts around the cut layer k of an L-block GPT-2:

* x_c, :class:`GPT2Client`: token + position embeddings and blocks 0..k-1.
  It turns token ids into the smashed hidden states h (N, T, d).
* x_s, :class:`GPT2Server`: blocks k..L-1, final LayerNorm and the LM head.
* x_a, :class:`GPT2Aux`: ``aux_depth`` blocks, final LayerNorm and LM head,
  the client's stand-in for x_s.

Blocks live in a ``ModuleDict`` keyed by their index in the full model, so
``h.5.attn.c_attn.weight`` names the same tensor in a GPT-2 checkpoint and in
whichever part holds block 5, at any cut. Aux blocks are keyed 0..aux_depth-1 and start
as copies of blocks k..k+aux_depth-1 (see :meth:`GPT2Aux.source_name`):
they sit right after the cut, so they are the pretrained blocks whose
input distribution matches h.

The LM head is tied to the token embedding. x_s and x_a do not own the
client's embedding, so each keeps its own copy of ``wte.weight`` that is
always frozen; with LoRA on, nothing but the LoRA factors trains anyway.

Initialisation draws every tensor from a generator seeded by (seed, the
tensor's full-model name), so any part built with the same seed holds the
same numbers as the matching slice of the full model, whatever order the
parts are built in: x_c followed by x_s computes the same function at every
cut.
"""

from __future__ import annotations

import json
import math
import os
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import torch
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open
from torch import nn

from raysage.errors import ModelError

# --------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------

@dataclass(frozen=True)
class GPT2Spec:
    n_layer: int
    n_embd: int
    n_head: int
    vocab_size: int
    n_positions: int
    # Attention, residual and embedding dropout. 0.0 keeps tests
    # deterministic; GPT-2 and the paper use 0.1.
    dropout: float = 0.0
    layer_norm_eps: float = 1e-5

    def __post_init__(self):
        for field_name in ("n_layer", "n_embd", "n_head", "vocab_size", "n_positions"):
            value = getattr(self, field_name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ModelError(f"GPT2Spec.{field_name}={value!r} must be a positive integer")
        if self.n_embd % self.n_head:
            raise ModelError(f"GPT2Spec.n_embd={self.n_embd} is not divisible by "
                             f"n_head={self.n_head}; pick a head count that divides the width")
        if not 0.0 <= self.dropout < 1.0:
            raise ModelError(f"GPT2Spec.dropout={self.dropout!r} must be in [0, 1)")
        if not self.layer_norm_eps > 0:
            raise ModelError(f"GPT2Spec.layer_norm_eps={self.layer_norm_eps!r} must be > 0")


_PRESETS = {
    # Small enough that a CPU test fine-tunes it in seconds.
    "tiny": dict(n_layer=4, n_embd=64, n_head=4),
    "small": dict(n_layer=12, n_embd=768, n_head=12),
    "medium": dict(n_layer=24, n_embd=1024, n_head=16),
}


def gpt2_spec(size: str, vocab_size: int = 50257, n_positions: int = 1024,
              dropout: float = 0.0) -> GPT2Spec:
    """Preset GPT-2 shapes: 'tiny', 'small' (124M) or 'medium' (355M, the paper's)."""
    if size not in _PRESETS:
        raise ModelError(f"unknown GPT-2 size {size!r}; known sizes: {', '.join(_PRESETS)}")
    return GPT2Spec(vocab_size=vocab_size, n_positions=n_positions, dropout=dropout,
                    **_PRESETS[size])


@dataclass(frozen=True)
class LoRASpec:
    """Low-rank adapters on the query and value projections; rank 0 disables them."""

    rank: int = 4
    alpha: float = 32.0
    dropout: float = 0.0  # the paper uses 0.1

    def __post_init__(self):
        if not isinstance(self.rank, int) or isinstance(self.rank, bool) or self.rank < 0:
            raise ModelError(f"lora_rank={self.rank!r} must be an integer >= 0 (0 turns LoRA off)")
        if self.rank and not self.alpha > 0:
            raise ModelError(f"lora_alpha={self.alpha!r} must be > 0")
        if not 0.0 <= self.dropout < 1.0:
            raise ModelError(f"lora_dropout={self.dropout!r} must be in [0, 1)")

    @property
    def enabled(self) -> bool:
        return self.rank > 0

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank if self.rank else 0.0


NO_LORA = LoRASpec(rank=0)


# --------------------------------------------------------------------------
# Layers
# --------------------------------------------------------------------------

class LoRADelta(nn.Module):
    """The low-rank update B A x scaled by alpha / r, added to a frozen projection.

    B starts at zero so fine-tuning starts exactly at the base model; A gets
    nn.Linear's default fan-in init so the rank-r bottleneck has the scale of
    a fresh layer.
    """

    def __init__(self, in_features: int, out_features: int, lora: LoRASpec):
        super().__init__()
        self.A = nn.Parameter(torch.empty(lora.rank, in_features))
        self.B = nn.Parameter(torch.zeros(out_features, lora.rank))
        self.scaling = lora.scaling
        self.dropout = nn.Dropout(lora.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (self.dropout(x) @ self.A.t() @ self.B.t()) * self.scaling


class CausalSelfAttention(nn.Module):
    def __init__(self, spec: GPT2Spec, lora: LoRASpec):
        super().__init__()
        d = spec.n_embd
        self.n_head = spec.n_head
        self.c_attn = nn.Linear(d, 3 * d)
        self.c_proj = nn.Linear(d, d)
        self.attn_dropout = spec.dropout
        self.resid_dropout = nn.Dropout(spec.dropout)
        if lora.enabled:
            self.lora_q = LoRADelta(d, d, lora)
            self.lora_v = LoRADelta(d, d, lora)
        else:
            self.lora_q = self.lora_v = None

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        n, t, d = x.shape
        q, k, v = self.c_attn(x).split(d, dim=-1)
        if self.lora_q is not None:
            q = q + self.lora_q(x)
            v = v + self.lora_v(x)
        q, k, v = (z.view(n, t, self.n_head, d // self.n_head).transpose(1, 2) for z in (q, k, v))
        # Attention spelled out rather than F.scaled_dot_product_attention:
        # FSL-SAGE's alignment differentiates the auxiliary model's input
        # gradient (a double backward), which the fused kernels do not support.
        if mask is None:
            mask = torch.ones(t, t, dtype=torch.bool, device=x.device).tril()
        scores = (q @ k.transpose(-2, -1)) / math.sqrt(q.shape[-1])
        weights = scores.masked_fill(~mask, float("-inf")).softmax(dim=-1)
        if self.training and self.attn_dropout:
            weights = F.dropout(weights, self.attn_dropout)
        y = weights @ v
        return self.resid_dropout(self.c_proj(y.transpose(1, 2).reshape(n, t, d)))


class MLP(nn.Module):
    def __init__(self, spec: GPT2Spec):
        super().__init__()
        self.c_fc = nn.Linear(spec.n_embd, 4 * spec.n_embd)
        self.c_proj = nn.Linear(4 * spec.n_embd, spec.n_embd)
        self.dropout = nn.Dropout(spec.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # GPT-2 was trained with the tanh approximation; the exact erf GELU
        # would shift pretrained activations slightly.
        return self.dropout(self.c_proj(F.gelu(self.c_fc(x), approximate="tanh")))


class Block(nn.Module):
    """Pre-LN transformer block, as in GPT-2."""

    def __init__(self, spec: GPT2Spec, lora: LoRASpec):
        super().__init__()
        self.ln_1 = nn.LayerNorm(spec.n_embd, eps=spec.layer_norm_eps)
        self.attn = CausalSelfAttention(spec, lora)
        self.ln_2 = nn.LayerNorm(spec.n_embd, eps=spec.layer_norm_eps)
        self.mlp = MLP(spec)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), mask)
        return x + self.mlp(self.ln_2(x))


def attention_mask_for(attention_mask: torch.Tensor | None, t: int) -> torch.Tensor | None:
    """Boolean (N, 1, T, T) mask, True where a query may attend to a key.

    Causal and key-padding masks combined. Every query may also attend to
    itself: a padding query whose earlier keys are all padding (left
    padding) would otherwise have an empty row and turn the softmax into
    NaN. A real query's own key is real, so real positions are unaffected.
    None means no padding, where SDPA's built-in causal path is used.
    """
    if attention_mask is None:
        return None
    keep = attention_mask.to(torch.bool)
    causal = torch.ones(t, t, dtype=torch.bool, device=keep.device).tril()
    eye = torch.eye(t, dtype=torch.bool, device=keep.device)
    return causal & (keep[:, None, None, :] | eye)


def _check_mask(attention_mask: torch.Tensor | None, shape: tuple[int, int]) -> None:
    if attention_mask is not None and tuple(attention_mask.shape) != tuple(shape):
        raise ModelError(f"attention_mask has shape {tuple(attention_mask.shape)} but the "
                         f"batch is {tuple(shape)}; pass one 0/1 flag per token")


# --------------------------------------------------------------------------
# Split parts
# --------------------------------------------------------------------------

class _GPT2Part(nn.Module):
    """Shared plumbing: blocks keyed by full-model index, freezing, init."""

    def __init__(self, spec: GPT2Spec, lora: LoRASpec | None, block_ids: Iterable[int]):
        super().__init__()
        self.spec = spec
        self.lora = lora or NO_LORA
        self.h = nn.ModuleDict({str(i): Block(spec, self.lora) for i in block_ids})

    def source_name(self, name: str) -> str:
        """Full-model name of the tensor this part's ``name`` starts from."""
        return name

    def _run_blocks(self, x: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        mask = attention_mask_for(attention_mask, x.shape[1])
        for block in self.h.values():
            x = block(x, mask)
        return x

    def _finish(self, seed: int) -> None:
        init_gpt2_(self, seed)
        if self.lora.enabled:
            for name, p in self.named_parameters():
                p.requires_grad_(_is_lora_name(name))


class _HeadMixin:
    """Final LayerNorm plus an LM head sharing storage with ``wte.weight``."""

    def _add_head(self, spec: GPT2Spec) -> None:
        self.ln_f = nn.LayerNorm(spec.n_embd, eps=spec.layer_norm_eps)
        self.wte = nn.Embedding(spec.vocab_size, spec.n_embd)
        self.lm_head = nn.Linear(spec.n_embd, spec.vocab_size, bias=False)
        self.lm_head.weight = self.wte.weight


class GPT2Client(_GPT2Part):
    """x_c: embeddings and blocks 0..cut-1; (N, T) ids -> smashed (N, T, d)."""

    def __init__(self, spec: GPT2Spec, cut: int, lora: LoRASpec | None = None, seed: int = 0):
        _check_cut(spec, cut)
        super().__init__(spec, lora, range(cut))
        self.cut = cut
        self.wte = nn.Embedding(spec.vocab_size, spec.n_embd)
        self.wpe = nn.Embedding(spec.n_positions, spec.n_embd)
        self.drop = nn.Dropout(spec.dropout)
        self._finish(seed)

    def forward(self, input_ids: torch.Tensor,
                attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self._run_blocks(_embed(self, input_ids, attention_mask), attention_mask)


class GPT2Server(_HeadMixin, _GPT2Part):
    """x_s: blocks cut..L-1, ln_f and the tied LM head; (N, T, d) -> logits (N, T, V)."""

    def __init__(self, spec: GPT2Spec, cut: int, lora: LoRASpec | None = None, seed: int = 0):
        _check_cut(spec, cut)
        super().__init__(spec, lora, range(cut, spec.n_layer))
        self.cut = cut
        self._add_head(spec)
        # Without LoRA its head (its own copy of wte) trains too: a frozen random
        # head learns ~10x slower (measured), and split learning cannot keep
        # one tensor tied across the cut without shipping it every step.
        self._finish(seed)

    def forward(self, hidden: torch.Tensor,
                attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        _check_mask(attention_mask, hidden.shape[:2])
        return self.lm_head(self.ln_f(self._run_blocks(hidden, attention_mask)))


class GPT2Aux(_HeadMixin, _GPT2Part):
    """x_a: aux_depth blocks, ln_f and a tied LM head; same interface as x_s.

    Block j starts from full-model block cut + j, ln_f and wte from the full
    model's, so with pretrained weights x_a is a truncated copy of x_s.
    """

    def __init__(self, spec: GPT2Spec, cut: int, aux_depth: int,
                 lora: LoRASpec | None = None, seed: int = 0):
        _check_cut(spec, cut)
        if not isinstance(aux_depth, int) or not 1 <= aux_depth <= spec.n_layer - cut:
            raise ModelError(f"aux_depth={aux_depth!r} must be in 1..{spec.n_layer - cut} "
                             f"(blocks after cut {cut} of a {spec.n_layer}-block GPT-2)")
        super().__init__(spec, lora, range(aux_depth))
        self.cut = cut
        self.aux_depth = aux_depth
        self._add_head(spec)
        self._finish(seed)

    def source_name(self, name: str) -> str:
        if name.startswith("h."):
            _, index, rest = name.split(".", 2)
            return f"h.{int(index) + self.cut}.{rest}"
        return name

    def forward(self, hidden: torch.Tensor,
                attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        _check_mask(attention_mask, hidden.shape[:2])
        return self.lm_head(self.ln_f(self._run_blocks(hidden, attention_mask)))


def _embed(part: nn.Module, input_ids: torch.Tensor,
           attention_mask: torch.Tensor | None) -> torch.Tensor:
    if input_ids.dim() != 2:
        raise ModelError(f"input_ids has shape {tuple(input_ids.shape)}; pass (batch, seq_len) ids")
    n, t = input_ids.shape
    if t > part.spec.n_positions:
        raise ModelError(f"sequence length {t} exceeds n_positions={part.spec.n_positions}; "
                         f"truncate the batch or use a spec with more positions")
    _check_mask(attention_mask, (n, t))
    if attention_mask is None:
        positions = torch.arange(t, device=input_ids.device).expand(n, t)
    else:
        # Count only real tokens, so left- and right-padded batches give a
        # token the same position as it has unpadded.
        positions = (attention_mask.to(torch.long).cumsum(-1) - 1).clamp(min=0)
    return part.drop(part.wte(input_ids) + part.wpe(positions))


def _check_cut(spec: GPT2Spec, cut: int) -> None:
    if not isinstance(cut, int) or isinstance(cut, bool) or not 1 <= cut <= spec.n_layer - 1:
        raise ModelError(f"cut={cut!r} must be in 1..{spec.n_layer - 1} for a "
                         f"{spec.n_layer}-block GPT-2 (the client keeps blocks 0..cut-1)")


# --------------------------------------------------------------------------
# Initialisation
# --------------------------------------------------------------------------

def _is_lora_name(name: str) -> bool:
    return ".lora_q." in name or ".lora_v." in name


def _generator(seed: int, name: str) -> torch.Generator:
    return torch.Generator().manual_seed((int(seed) * 1_000_003 + zlib.crc32(name.encode())) % 2**63)


@torch.no_grad()
def init_gpt2_(part: _GPT2Part, seed: int) -> None:
    """GPT-2-style init, each tensor from its own (seed, full-model name) stream."""
    std = 0.02
    # GPT-2 shrinks the projections that write into the residual stream so
    # its variance does not grow with depth.
    resid_std = std / math.sqrt(2 * part.spec.n_layer)
    for name, p in part.named_parameters():  # tied head appears once, as wte
        source = part.source_name(name)
        g = _generator(seed, source)
        leaf = source.rsplit(".", 2)
        if source.endswith("lora_q.B") or source.endswith("lora_v.B"):
            p.zero_()
        elif source.endswith("lora_q.A") or source.endswith("lora_v.A"):
            bound = 1.0 / math.sqrt(p.shape[1])
            p.uniform_(-bound, bound, generator=g)
        elif ".ln_" in f".{source}":
            p.fill_(1.0 if leaf[-1] == "weight" else 0.0)
        elif leaf[-1] == "bias":
            p.zero_()
        elif source.endswith("c_proj.weight"):
            p.normal_(0.0, resid_std, generator=g)
        else:
            p.normal_(0.0, std, generator=g)


# --------------------------------------------------------------------------
# Pretrained weights (safetensors, GPT-2 layout)
# --------------------------------------------------------------------------

# Stored by GPT-2's Conv1D as (in_features, out_features), the transpose of nn.Linear.
_CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
# Float dtypes that widen to float32 exactly; anything else is not a GPT-2 weight.
_FLOAT_DTYPES = ("F32", "F16", "BF16")


def _corrupt(path: Path, error: Exception) -> ModelError:
    why = " ".join(str(error).split())  # the library's reason, kept on one line
    return ModelError(f"corrupt safetensors file {path}: {why}; re-export or re-download it")


def _open_safetensors(path: Path):
    try:
        return safe_open(str(path), framework="pt")
    except FileNotFoundError:
        raise ModelError(f"weights file {path} not found; put model.safetensors "
                         f"(and config.json) in the weights folder") from None
    except SafetensorError as e:
        raise _corrupt(path, e) from None
    except OSError as e:
        raise ModelError(f"cannot read weights file {path}: {e.strerror or e}") from None


def read_gpt2_config(weights_dir: str | os.PathLike, dropout: float = 0.0) -> GPT2Spec:
    """GPT2Spec from ``config.json`` (HF GPT-2 keys) in ``weights_dir``."""
    path = Path(weights_dir) / "config.json"
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ModelError(f"config file {path} not found; put config.json beside "
                         f"model.safetensors or pass a GPT2Spec") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelError(f"cannot parse config file {path}: {e}") from None
    if not isinstance(config, dict):
        raise ModelError(f"config file {path} is not a JSON object")
    keys = ("n_layer", "n_embd", "n_head", "vocab_size", "n_positions")
    missing = [k for k in keys if k not in config]
    if missing:
        raise ModelError(f"config file {path} lacks {', '.join(missing)}; it must give {', '.join(keys)}")
    return GPT2Spec(**{k: config[k] for k in keys}, dropout=dropout,
                    layer_norm_eps=float(config.get("layer_norm_epsilon", 1e-5)))


@torch.no_grad()
def load_gpt2_weights(part: _GPT2Part, weights_dir: str | os.PathLike) -> _GPT2Part:
    """Copy pretrained GPT-2 weights into any part; LoRA factors keep their init.

    Names may carry a ``transformer.`` prefix; Conv1D weights are transposed
    into nn.Linear layout; attention mask buffers and ``lm_head.weight``
    (tied to wte) in the file are ignored.
    """
    folder = Path(weights_dir)
    if not folder.is_dir():
        raise ModelError(f"weights folder {folder} not found; give a folder holding model.safetensors")
    path = folder / "model.safetensors"
    with _open_safetensors(path) as st:
        stored_names = set(st.keys())
        for name, p in part.named_parameters():
            if _is_lora_name(name):
                continue
            source = part.source_name(name)
            stored = source if source in stored_names else f"transformer.{source}"
            if stored not in stored_names:
                raise ModelError(f"tensor {source!r} not found in {path} "
                                 f"(nor as 'transformer.{source}'); is this a GPT-2 checkpoint?")
            conv1d = source.endswith(_CONV1D)
            # Dtype and shape come from the header, so a wrong file fails before any read.
            view = st.get_slice(stored)
            dtype, shape = view.get_dtype(), list(view.get_shape())
            if dtype not in _FLOAT_DTYPES:
                raise ModelError(f"tensor {stored!r} in {path} has dtype {dtype}; "
                                 f"only {', '.join(_FLOAT_DTYPES)} are supported")
            expected = list(p.shape[::-1] if conv1d else p.shape)
            if shape != expected:
                raise ModelError(f"tensor {stored!r} in {path} has shape {shape}, "
                                 f"expected {expected} for this GPT2Spec")
            try:
                tensor = st.get_tensor(stored).float()
            except SafetensorError as e:
                raise _corrupt(path, e) from None
            p.copy_(tensor.t() if conv1d else tensor)
    return part


# --------------------------------------------------------------------------
# Factory
# --------------------------------------------------------------------------

@dataclass(frozen=True)
class GPT2Split:
    """Builds fresh x_c, x_s and x_a that agree on their weights.

    Holds no tensors, so it is cheap to send to workers; each make_* call
    rebuilds from the seed (and reads its own tensors from weights_dir).
    """

    spec: GPT2Spec
    cut: int = 1
    aux_depth: int = 3
    lora: LoRASpec = LoRASpec()
    weights_dir: str | None = None
    seed: int = 0

    def __post_init__(self):
        _check_cut(self.spec, self.cut)
        if not isinstance(self.aux_depth, int) or not 1 <= self.aux_depth <= self.spec.n_layer - self.cut:
            raise ModelError(f"aux_depth={self.aux_depth!r} must be in 1..{self.spec.n_layer - self.cut} "
                             f"(blocks after cut {self.cut} of a {self.spec.n_layer}-block GPT-2)")

    def _ready(self, part: _GPT2Part) -> _GPT2Part:
        if self.weights_dir is not None:
            load_gpt2_weights(part, self.weights_dir)
        return part

    def make_client(self) -> GPT2Client:
        return self._ready(GPT2Client(self.spec, self.cut, self.lora, self.seed))

    def make_server(self) -> GPT2Server:
        return self._ready(GPT2Server(self.spec, self.cut, self.lora, self.seed))

    def make_aux(self) -> GPT2Aux:
        return self._ready(GPT2Aux(self.spec, self.cut, self.aux_depth, self.lora, self.seed))


def gpt2_split(spec: GPT2Spec | None = None, *, cut: int = 1, aux_depth: int = 3,
               lora_rank: int = 4, lora_alpha: float = 32.0, lora_dropout: float = 0.0,
               weights_dir: str | os.PathLike | None = None, seed: int = 0) -> GPT2Split:
    """The paper's defaults: cut after block 1, 3 aux blocks, LoRA r=4, alpha=32.

    With ``weights_dir`` and no spec, the spec comes from its config.json;
    with both, they must agree. ``lora_rank=0`` fine-tunes every weight
    except the frozen embedding copies of x_s and x_a.
    """
    if weights_dir is not None:
        weights_dir = str(weights_dir)
        if not Path(weights_dir).is_dir():
            raise ModelError(f"weights folder {weights_dir} not found; give a folder holding "
                             f"model.safetensors and config.json")
        config_path = Path(weights_dir) / "config.json"
        if spec is None or config_path.exists():
            stored = read_gpt2_config(weights_dir, dropout=spec.dropout if spec else 0.0)
            if spec is not None and (stored.n_layer, stored.n_embd, stored.n_head, stored.vocab_size,
                                     stored.n_positions) != (spec.n_layer, spec.n_embd, spec.n_head,
                                                             spec.vocab_size, spec.n_positions):
                raise ModelError(f"GPT2Spec {spec} does not match {config_path} ({stored}); "
                                 f"drop the spec to use the checkpoint's")
            spec = spec or stored
    if spec is None:
        raise ModelError("gpt2_split needs a GPT2Spec (e.g. gpt2_spec('tiny', vocab_size=258)) "
                         "or a weights_dir with config.json")
    return GPT2Split(spec=spec, cut=cut, aux_depth=aux_depth,
                     lora=LoRASpec(lora_rank, lora_alpha, lora_dropout),
                     weights_dir=weights_dir, seed=seed)
