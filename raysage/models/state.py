"""What of a model is state, what travels, and what never changes.

These helpers only call methods of the modules they are given, so the
driver can import them without importing torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Mapping

from raysage.lazy import nn

if TYPE_CHECKING:
    import torch


def state_bytes(module_or_state_dict: nn.Module | Mapping[str, torch.Tensor]) -> int:
    """Bytes to ship a model: every state-dict tensor, buffers included. A tensor
    that several names share (GPT-2's tied embedding and head) is sent once."""
    if isinstance(module_or_state_dict, nn.Module):
        state = module_or_state_dict.state_dict()
    else:
        state = module_or_state_dict
    distinct = {(t.data_ptr(), t.dtype, tuple(t.shape)): t for t in state.values()}
    return sum(t.numel() * t.element_size() for t in distinct.values())


def frozen_names(module: nn.Module) -> set[str]:
    """State-dict names of parameters that do not train (every alias of a tied one)."""
    return {name for name, p in module.named_parameters(remove_duplicate=False)
            if not p.requires_grad}


def transfer_state(module: nn.Module) -> dict[str, torch.Tensor]:
    """The state that must travel when a model is sent: all but frozen parameters."""
    frozen = frozen_names(module)
    return {k: v for k, v in module.state_dict().items() if k not in frozen}


def transfer_bytes(module: nn.Module) -> int:
    return state_bytes(transfer_state(module))


def frozen_bytes(module: nn.Module) -> int:
    """Bytes of frozen parameters (counted once per tensor, however many names it has)."""
    seen, total = set(), 0
    for _, p in module.named_parameters(remove_duplicate=False):
        if not p.requires_grad and id(p) not in seen:
            seen.add(id(p))
            total += p.numel() * p.element_size()
    return total


def num_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
