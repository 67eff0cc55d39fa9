"""Split architectures: x_c (client), x_s (server), x_a (auxiliary).

The cut layer splits a full model into x_c, which turns an image batch into
smashed activations h, and x_s, which turns h into logits. x_a is a small
stand-in for x_s that a client uses to estimate the gradient at the cut.
"""

import math
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from raysage.errors import ModelError
from raysage.models.state import num_parameters, state_bytes
from raysage.models.cnn import cnn_aux, cnn_client, cnn_server
from raysage.models.resnet import resnet18_aux, resnet18_client, resnet18_server
from raysage.models.simple_conv import (
    CUT_FEATURES,
    simple_conv_aux,
    simple_conv_client,
    simple_conv_server,
)


@dataclass(frozen=True)
class SplitArchitecture:
    name: str
    num_classes: int
    input_shape: tuple[int, int, int]
    cut_shape: tuple[int, ...]  # per-sample smashed activation shape
    build_client: Callable[[], nn.Module] = field(repr=False, compare=False)
    build_server: Callable[[int], nn.Module] = field(repr=False, compare=False)
    build_aux: Callable[[int], nn.Module] = field(repr=False, compare=False)
    # What one sample puts on the wire at the cut, and its targets; None:
    # the fp32 activations of cut_shape, and one int64 label.
    smashed_bytes: int | None = None
    label_bytes: int = 8
    # Inputs and targets of n samples, for counting FLOPs; None: images.
    build_example: Callable[[int], tuple[torch.Tensor, torch.Tensor]] | None = field(
        default=None, repr=False, compare=False)

    # Every make_* call returns a fresh, randomly initialised module; seeding
    # is left to the caller so the order of construction decides the weights.
    def make_client(self) -> nn.Module:
        return self.build_client()

    def make_server(self) -> nn.Module:
        return self.build_server(self.num_classes)

    def make_aux(self) -> nn.Module:
        return self.build_aux(self.num_classes)

    def make_full(self) -> nn.Module:
        """nn.Sequential(x_c, x_s): state-dict keys are '0.*' then '1.*'."""
        return nn.Sequential(self.make_client(), self.make_server())

    @property
    def smashed_bytes_per_sample(self) -> int:
        if self.smashed_bytes is not None:
            return self.smashed_bytes
        return math.prod(self.cut_shape) * 4  # fp32 activations

    def example_batch(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self.build_example is not None:
            return self.build_example(n)
        return torch.randn(n, *self.input_shape), torch.zeros(n, dtype=torch.long)


def cnn(num_classes: int, **_: object) -> SplitArchitecture:
    return SplitArchitecture(
        name="cnn",
        num_classes=num_classes,
        input_shape=(3, 32, 32),
        cut_shape=(32, 8, 8),
        build_client=cnn_client,
        build_server=cnn_server,
        build_aux=cnn_aux,
    )


def resnet18(num_classes: int, **_: object) -> SplitArchitecture:
    return SplitArchitecture(
        name="resnet18",
        num_classes=num_classes,
        input_shape=(3, 32, 32),
        cut_shape=(128, 4, 4),
        build_client=resnet18_client,
        build_server=resnet18_server,
        build_aux=resnet18_aux,
    )


def simple_conv(num_classes: int, **_: object) -> SplitArchitecture:
    return SplitArchitecture(
        name="simple_conv",
        num_classes=num_classes,
        input_shape=(3, 32, 32),
        cut_shape=(CUT_FEATURES,),
        build_client=simple_conv_client,
        build_server=simple_conv_server,
        build_aux=simple_conv_aux,
    )


def gpt2(vocab_size: int, *, gpt2_size: str = "tiny", seq_len: int = 256, cut_layer: int = 1,
         aux_depth: int = 3, lora_rank: int = 4, lora_alpha: float = 32.0,
         lora_dropout: float = 0.1, weights_dir: str | None = None, seed: int = 0,
         **_: object) -> SplitArchitecture:
    """GPT-2 split for causal-LM fine-tuning: x_c = embeddings + ``cut_layer`` blocks.

    A sample is a right-padded token sequence of ``seq_len``. What travels at
    the cut is its hidden states (seq_len x width, fp32) and its attention
    mask (one byte per position); the targets are seq_len int64 token ids.
    Right padding under causal attention means no real position ever attends
    to a padded one, so the parts compute the same logits with or without
    the mask; it is counted because a receiver must know which rows are real.
    """
    from raysage.models.gpt2 import gpt2_spec, gpt2_split

    spec = None
    if weights_dir is None:
        spec = gpt2_spec(gpt2_size, vocab_size=vocab_size, n_positions=max(seq_len, 1024))
    split = gpt2_split(spec, cut=cut_layer, aux_depth=aux_depth, lora_rank=lora_rank,
                       lora_alpha=lora_alpha, lora_dropout=lora_dropout,
                       weights_dir=weights_dir, seed=seed)
    spec = split.spec
    if spec.vocab_size != vocab_size:
        raise ModelError(f"the GPT-2 weights in {weights_dir} have a vocabulary of "
                         f"{spec.vocab_size} tokens but the tokenizer has {vocab_size}; use "
                         "--tokenizer gpt2 with the checkpoint's vocab.json and merges.txt")
    if seq_len > spec.n_positions:
        raise ModelError(f"seq_len = {seq_len} exceeds the model's {spec.n_positions} "
                         "positions; lower --seq-len")

    def example(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        tokens = torch.randint(0, vocab_size, (n, seq_len + 1))
        return tokens[:, :-1], tokens[:, 1:]

    name = (f"gpt2-{gpt2_size if weights_dir is None else weights_dir}-v{vocab_size}-T{seq_len}"
            f"-k{cut_layer}-a{aux_depth}-r{lora_rank}-{lora_alpha:g}-{lora_dropout:g}-s{seed}")
    return SplitArchitecture(
        name=name, num_classes=vocab_size, input_shape=(seq_len,),
        cut_shape=(seq_len, spec.n_embd),
        build_client=split.make_client,
        build_server=lambda _vocab: split.make_server(),
        build_aux=lambda _vocab: split.make_aux(),
        smashed_bytes=seq_len * spec.n_embd * 4 + seq_len,
        label_bytes=seq_len * 8,
        build_example=example,
    )


MODELS: dict[str, Callable[..., SplitArchitecture]] = {
    "cnn": cnn,
    "resnet18": resnet18,
    "simple_conv": simple_conv,
    "gpt2": gpt2,
}


def lora_rank(cfg) -> int:
    """LoRA rank of a config: as given, else the paper's 4 with pretrained weights and 0
    (train every weight) from a random initialisation."""
    if cfg.lora_rank is not None:
        return cfg.lora_rank
    return 4 if cfg.weights_dir else 0


def architecture(cfg, num_classes: int) -> SplitArchitecture:
    """The split model a config asks for (the language-model fields matter only for gpt2)."""
    return get_architecture(cfg.model, num_classes, gpt2_size=cfg.gpt2_size,
                            seq_len=cfg.seq_len, cut_layer=cfg.cut_layer,
                            aux_depth=cfg.aux_depth, lora_rank=lora_rank(cfg),
                            lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                            weights_dir=cfg.weights_dir, seed=cfg.seed)


def get_architecture(name: str, num_classes: int, **options) -> SplitArchitecture:
    if name not in MODELS:
        raise ModelError(
            f"unknown model {name!r}; known models: {', '.join(sorted(MODELS))}"
        )
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
        raise ModelError(
            f"num_classes for model {name!r} is {num_classes!r}; it must be an integer >= 2"
        )
    return MODELS[name](num_classes, **options)


def summarize(arch: SplitArchitecture) -> dict:
    parts = {
        "client": arch.make_client(),
        "server": arch.make_server(),
        "aux": arch.make_aux(),
        "full": arch.make_full(),
    }
    summary = {
        part: {"params": num_parameters(m), "state_bytes": state_bytes(m)}
        for part, m in parts.items()
    }
    summary["cut_shape"] = tuple(arch.cut_shape)
    summary["smashed_bytes_per_sample"] = arch.smashed_bytes_per_sample
    return summary
