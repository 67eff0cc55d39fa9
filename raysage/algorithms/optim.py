"""SGD, Adam and AdamW over a model's parameters and a state of plain tensors.

The arithmetic is torch.optim's single-tensor implementation, the one torch
itself runs on the CPU, step for step (tests check that the two agree to
the bit). Two things make torch.optim a poor fit for virtual clients:

* Its first use imports ``torch._dynamo`` and sympy, about 70 MB of memory
  in every worker and server process (measured on this project's workers),
  for compilation support a simulator never uses.
* Its state is keyed by parameter objects and moves in and out through
  ``state_dict``/``load_state_dict``, deep copies included; a client's state
  is loaded into a working set and written back every round it takes part.

Here the state is a list, one dict of tensors per parameter, read and
written as arrays named ``<parameter index>.<key>`` (``0.exp_avg``) with the
same keys torch uses.
"""

from __future__ import annotations

from typing import Iterable

import numpy as np

from ..lazy import torch

KINDS = ("adam", "adamw", "sgd")


class Optimizer:
    """``zero_grad`` and ``step`` as in torch.optim, for one group of parameters."""

    def __init__(self, kind: str, params: Iterable, lr: float, weight_decay: float = 0.0,
                 momentum: float = 0.0, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8):
        if kind not in KINDS:
            raise ValueError(f"unknown optimizer {kind!r}; choose one of {', '.join(KINDS)}")
        self.kind, self.lr, self.weight_decay = kind, lr, weight_decay
        self.momentum, self.betas, self.eps = momentum, betas, eps
        self.params = [p for p in params if p.requires_grad]
        # Per parameter; empty until its first step, as in torch.
        self.state: list[dict[str, torch.Tensor]] = [{} for _ in self.params]

    @property
    def moments(self) -> int:
        """Parameter-sized tensors kept per parameter: Adam's two moments, SGD's momentum."""
        return 2 if self.kind in ("adam", "adamw") else (1 if self.momentum else 0)

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None

    def step(self) -> None:
        with torch.no_grad():
            for p, state in zip(self.params, self.state):
                if p.grad is not None:
                    (self._sgd if self.kind == "sgd" else self._adam)(p, p.grad, state)

    def _sgd(self, p, grad, state) -> None:
        if self.weight_decay != 0:
            grad = grad.add(p, alpha=self.weight_decay)
        if self.momentum != 0:
            buf = state.get("momentum_buffer")
            if buf is None:
                buf = state["momentum_buffer"] = grad.detach().clone()
            else:
                buf.mul_(self.momentum).add_(grad)
            grad = buf
        p.add_(grad, alpha=-self.lr)

    def _adam(self, p, grad, state) -> None:
        beta1, beta2 = self.betas
        if not state:
            # torch keeps the step count as a float32 tensor on the CPU.
            state["step"] = torch.zeros((), dtype=torch.float32)
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        step_t, exp_avg, exp_avg_sq = state["step"], state["exp_avg"], state["exp_avg_sq"]
        step_t += 1
        if self.weight_decay != 0:
            if self.kind == "adamw":   # decoupled, as in Loshchilov & Hutter
                p.mul_(1 - self.lr * self.weight_decay)
            else:
                grad = grad.add(p, alpha=self.weight_decay)
        exp_avg.lerp_(grad, 1 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        step = step_t.item()
        step_size = self.lr / (1 - beta1 ** step)
        denom = (exp_avg_sq.sqrt() / (1 - beta2 ** step) ** 0.5).add_(self.eps)
        p.addcdiv_(exp_avg, denom, value=-step_size)

    # -- the state as arrays, for the client store and checkpoints
    def state_arrays(self) -> dict[str, np.ndarray]:
        return {f"{i}.{key}": value.detach().cpu().numpy().copy()
                for i, state in enumerate(self.state) for key, value in state.items()}

    def load_state_arrays(self, arrays: dict[str, np.ndarray] | None) -> None:
        """Take a client's state (None: a client that never stepped). The step count
        stays on the CPU; moments go to their parameter's device."""
        from .state import StateMismatch

        states: list[dict[str, torch.Tensor]] = [{} for _ in self.params]
        for name, array in (arrays or {}).items():
            index, _, key = name.partition(".")
            if not index.isdigit() or int(index) >= len(self.params) or not key:
                raise StateMismatch(f"optimizer state {name!r} does not fit the optimizer")
            p = self.params[int(index)]
            value = torch.from_numpy(np.array(array))
            if key != "step":
                if value.shape != p.shape:
                    raise StateMismatch(f"optimizer state {name} has shape "
                                        f"{tuple(value.shape)}, its parameter {tuple(p.shape)}")
                value = value.to(device=p.device, dtype=p.dtype)
            states[int(index)][key] = value
        self.state = states

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for s in self.state for t in s.values())
