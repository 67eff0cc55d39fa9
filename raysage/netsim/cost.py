"""Deterministic compute cost of each piece of training, in FLOPs per sample.

FLOPs are counted once per architecture with ``torch.utils.flop_counter``
(matrix multiplies and convolutions; element-wise work is ignored, as is
usual for such cost models) on a batch of two, and divided by two. Counting
instead of timing keeps simulated time identical on every host.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

from ..lazy import torch
from ..models.losses import split_loss
from ..streams import global_rng


@dataclass(frozen=True)
class ModelCosts:
    """FLOPs per sample."""

    client_forward: float
    client_backward: float     # parameter and activation gradients of x_c
    server_step: float         # x_s forward + backward, including dL/dh
    # The algorithm's own pieces of work (``Algorithm.costed_work``), by name.
    work: dict[str, float] = field(default_factory=dict)

    @property
    def full_step(self) -> float:
        return self.client_forward + self.client_backward + self.server_step

    def of(self, name: str) -> float:
        """FLOPs per sample of one of the algorithm's own pieces of work."""
        return self.work[name]


@dataclass
class Pieces:
    """What an algorithm's piece of work runs on when its FLOPs are counted: the three
    models and an example batch of smashed data with its labels."""

    client: Any
    server: Any
    aux: Any
    h: Any
    y: Any

    def smashed(self):
        """h as a non-leaf that requires grad: autograd.grad w.r.t. a leaf is not
        supported under the FLOP counter, so gradients are taken w.r.t. this copy."""
        return self.h.detach().requires_grad_() + 0.0


def _count(fn) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return float(counter.get_total_flops())


@lru_cache(maxsize=None)
def measure_costs(arch, algorithm: type | None = None) -> ModelCosts:
    """Count FLOPs of one architecture's pieces, and of the algorithm's own
    (``algorithm.costed_work()``), cached per architecture and algorithm."""
    n = 2
    with global_rng(0):
        client, server, aux = arch.make_client(), arch.make_server(), arch.make_aux()
        x, y = arch.example_batch(n)

    client_fwd = _count(lambda: client(x))
    h = client(x)
    client_bwd = _count(lambda: h.backward(torch.ones_like(h)))

    def server_step():
        leaf = h.detach().requires_grad_()
        split_loss(server(leaf), y).backward()

    pieces = Pieces(client, server, aux, h, y)
    work = algorithm.costed_work() if algorithm is not None else {}
    return ModelCosts(
        client_forward=client_fwd / n,
        client_backward=client_bwd / n,
        server_step=_count(server_step) / n,
        work={name: _count(lambda run=run: run(pieces)) / n for name, run in work.items()},
    )
