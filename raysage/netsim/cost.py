"""Deterministic compute cost of each piece of training, in FLOPs per sample.

FLOPs are counted once per architecture with ``torch.utils.flop_counter``
(matrix multiplies and convolutions; element-wise work is ignored, as is
usual for such cost models) on a batch of two, and divided by two. Counting
instead of timing keeps simulated time identical on every host.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

from ..lazy import torch
from ..models.losses import split_loss
from ..streams import global_rng


@dataclass(frozen=True)
class ModelCosts:
    """FLOPs per sample."""

    client_forward: float
    client_backward: float     # parameter and activation gradients of x_c
    server_step: float         # x_s forward + backward, including dL/dh
    aux_estimate: float        # x_a forward + gradient w.r.t. h only (FSL-SAGE's g_hat)
    aux_step: float            # x_a forward + full backward (local-loss training of x_a)
    align_step: float          # one alignment sample: g_hat with create_graph, then backward

    @property
    def full_step(self) -> float:
        return self.client_forward + self.client_backward + self.server_step


def _count(fn) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return float(counter.get_total_flops())


@lru_cache(maxsize=None)
def measure_costs(arch) -> ModelCosts:
    """Count FLOPs of one architecture's pieces (cached per architecture)."""
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

    # autograd.grad w.r.t. a leaf is not supported under the flop counter,
    # so gradients are taken w.r.t. a (free) non-leaf copy of h.
    def smashed_input():
        return h.detach().requires_grad_() + 0.0

    def aux_estimate():
        leaf = smashed_input()
        torch.autograd.grad(split_loss(aux(leaf), y), leaf)

    def aux_step():
        split_loss(aux(h.detach()), y).backward()

    def align_step():
        leaf = smashed_input()
        (g_hat,) = torch.autograd.grad(split_loss(aux(leaf), y), leaf, create_graph=True)
        g_hat.pow(2).sum().backward()

    return ModelCosts(
        client_forward=client_fwd / n,
        client_backward=client_bwd / n,
        server_step=_count(server_step) / n,
        aux_estimate=_count(aux_estimate) / n,
        aux_step=_count(aux_step) / n,
        align_step=_count(align_step) / n,
    )
