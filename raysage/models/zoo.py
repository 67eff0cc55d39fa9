"""Split architectures: x_c (client), x_s (server), x_a (auxiliary).

The cut layer splits a full model into x_c, which turns an image batch into
smashed activations h, and x_s, which turns h into logits. x_a is a small
stand-in for x_s that a client uses to estimate the gradient at the cut.
"""

import math
from dataclasses import dataclass, field
from typing import Callable, Mapping

import torch
from torch import nn

from raysage.errors import ModelError
from raysage.models.cnn import cnn_aux, cnn_client, cnn_server
from raysage.models.resnet import resnet18_aux, resnet18_client, resnet18_server


@dataclass(frozen=True)
class SplitArchitecture:
    name: str
    num_classes: int
    input_shape: tuple[int, int, int]
    cut_shape: tuple[int, ...]  # per-sample smashed activation shape
    build_client: Callable[[], nn.Module] = field(repr=False, compare=False)
    build_server: Callable[[int], nn.Module] = field(repr=False, compare=False)
    build_aux: Callable[[int], nn.Module] = field(repr=False, compare=False)

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


def cnn(num_classes: int) -> SplitArchitecture:
    return SplitArchitecture(
        name="cnn",
        num_classes=num_classes,
        input_shape=(3, 32, 32),
        cut_shape=(32, 8, 8),
        build_client=cnn_client,
        build_server=cnn_server,
        build_aux=cnn_aux,
    )


def resnet18(num_classes: int) -> SplitArchitecture:
    return SplitArchitecture(
        name="resnet18",
        num_classes=num_classes,
        input_shape=(3, 32, 32),
        cut_shape=(128, 4, 4),
        build_client=resnet18_client,
        build_server=resnet18_server,
        build_aux=resnet18_aux,
    )


MODELS: dict[str, Callable[[int], SplitArchitecture]] = {
    "cnn": cnn,
    "resnet18": resnet18,
}


def get_architecture(name: str, num_classes: int) -> SplitArchitecture:
    if name not in MODELS:
        raise ModelError(
            f"unknown model {name!r}; known models: {', '.join(sorted(MODELS))}"
        )
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
        raise ModelError(
            f"num_classes for model {name!r} is {num_classes!r}; it must be an integer >= 2"
        )
    return MODELS[name](num_classes)


def state_bytes(module_or_state_dict: nn.Module | Mapping[str, torch.Tensor]) -> int:
    """Bytes to ship a model: every state-dict tensor, buffers included."""
    if isinstance(module_or_state_dict, nn.Module):
        state = module_or_state_dict.state_dict()
    else:
        state = module_or_state_dict
    return sum(t.numel() * t.element_size() for t in state.values())


def num_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


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
    # Smashed activations travel as fp32.
    summary["smashed_bytes_per_sample"] = math.prod(arch.cut_shape) * 4
    return summary
