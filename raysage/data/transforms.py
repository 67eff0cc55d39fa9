"""Batched image preprocessing in plain torch (no torchvision).

The engine calls :func:`make_batch` once per minibatch. Augmentation follows
the usual CIFAR recipe (random 32x32 crop from the image zero-padded by 4,
random horizontal flip) and, like the torchvision reference pipeline, pads
the *raw* uint8 image with 0 (black) before normalising.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Sequence

import numpy as np

from raysage.lazy import torch


def _to_chw_uint8(x: np.ndarray | torch.Tensor) -> torch.Tensor:
    """(B, 32, 32, 3) uint8 HWC -> (B, 3, 32, 32) uint8 tensor, never aliasing a read-only array."""
    if isinstance(x, np.ndarray):
        # Arrays from Ray's object store are read-only; torch.from_numpy
        # would warn and share memory we must not write.
        if not x.flags.writeable:
            x = x.copy()
        x = torch.from_numpy(x)
    if x.dtype != torch.uint8 or x.dim() != 4 or x.shape[-1] != 3:
        raise ValueError(f"expected a uint8 batch of shape (B, H, W, 3), got {x.dtype} {tuple(x.shape)}")
    return x.permute(0, 3, 1, 2)


@lru_cache(maxsize=8)
def _channel_constants(mean: tuple[float, ...], std: tuple[float, ...]):
    # Made once, not per batch: small tensors cost more to build than to use.
    return (torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1),
            torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1))


def _normalise(chw: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    m, s = _channel_constants(tuple(mean), tuple(std))
    return ((chw.to(torch.float32) / 255.0 - m) / s).contiguous()


def to_float_batch(x: np.ndarray | torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """uint8 (B, 32, 32, 3) HWC -> float32 (B, 3, 32, 32), ``(x / 255 - mean) / std``."""
    return _normalise(_to_chw_uint8(x), mean, std)


def augment(x: torch.Tensor, generator: torch.Generator | None, *, padding: int = 4, flip: bool = True) -> torch.Tensor:
    """Per-sample random crop and horizontal flip of a (B, C, H, W) batch.

    Each image is zero-padded by ``padding`` on every side (0 in whatever
    units ``x`` is in) and a window of the original size is cut at a random
    offset; with ``flip`` each image is mirrored left-right with p = 0.5.
    Random numbers are drawn from ``generator`` in a fixed order (row
    offsets, column offsets, flips), so the same generator state gives the
    same batch. ``generator=None`` uses torch's global RNG.
    """
    b, c, h, w = x.shape
    dev = x.device
    span = 2 * padding + 1
    dy = torch.randint(0, span, (b,), generator=generator, device=dev)
    dx = torch.randint(0, span, (b,), generator=generator, device=dev)
    padded = torch.nn.functional.pad(x, (padding, padding, padding, padding)) if padding else x
    rows = dy[:, None] + torch.arange(h, device=dev)[None, :]  # (B, H) into the padded image
    cols = dx[:, None] + torch.arange(w, device=dev)[None, :]  # (B, W)
    if flip:
        mirrored = torch.rand(b, generator=generator, device=dev) < 0.5
        cols = torch.where(mirrored[:, None], cols.flip(1), cols)
    # One gather for the whole batch: out[i, ch, r, q] = padded[i, ch, rows[i, r], cols[i, q]].
    # (torch.gather rather than advanced indexing: it releases the GIL, which a
    # worker training clients on several threads needs.)
    wp = padded.shape[-1]
    where = (rows[:, :, None] * wp + cols[:, None, :]).reshape(b, 1, h * w).expand(b, c, h * w)
    return padded.reshape(b, c, -1).gather(2, where).reshape(b, c, h, w)


def make_batch(
    x_uint8: np.ndarray,
    mean: Sequence[float],
    std: Sequence[float],
    *,
    train: bool,
    generator: torch.Generator | None,
) -> torch.Tensor:
    """The engine's one call: uint8 HWC batch -> normalised float32 NCHW tensor.

    With ``train`` the raw image is augmented (black padding) before
    normalising; the result is deterministic given ``generator``'s state.
    """
    if x_uint8.ndim == 2:
        # Token sequences (N, T) of a language model go in as they are.
        return torch.from_numpy(np.array(x_uint8, dtype=np.int64))  # a writable copy
    chw = _to_chw_uint8(x_uint8)
    if train:
        chw = augment(chw, generator)
    return _normalise(chw, mean, std)
