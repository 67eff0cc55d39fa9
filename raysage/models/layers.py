"""Layers the zoo's models share."""

from __future__ import annotations

import torch
from torch import nn


class MaxPool2d(nn.MaxPool2d):
    """``nn.MaxPool2d`` that pools small planes on the CPU in the channels-last layout.

    PyTorch's CPU kernel for contiguous (NCHW) input works plane by plane and
    pays for each: on the ``cnn``'s 16x16 and 8x8 planes it took a quarter of
    a training step, 2x the time of the channels-last kernel even counting the
    two layout copies (``benchmarks/bench_pool.py``). On larger planes the
    copies cost more than they save, so those keep the plain path. Both
    kernels visit a window in the same order and keep its first maximum (and
    a NaN over any number), so the output, and the gradient routed back
    through it, are the same bits either way.
    """

    SMALL_PLANE = 16 * 16

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (x.device.type == "cpu" and x.dim() == 4 and not self.return_indices
                and x.shape[-2] * x.shape[-1] <= self.SMALL_PLANE and x.is_contiguous()):
            pooled = super().forward(x.contiguous(memory_format=torch.channels_last))
            return pooled.contiguous()
        return super().forward(x)
