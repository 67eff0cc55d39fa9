"""A client's local batches: how many, which samples, and the augmented tensors.

Every batch is a pure function of (seed, client, round, iteration), so a
client's data does not depend on how its round is cut into segments, which
worker runs it, or when.
"""

from __future__ import annotations

import math
from functools import lru_cache

import numpy as np

from raysage.data.transforms import make_batch
from raysage.lazy import torch
from raysage.streams import stream_seed


def num_batches(num_samples: int, batch_size: int) -> int:
    return math.ceil(num_samples / batch_size)


def batch_sizes(num_samples: int, cfg) -> list[int]:
    """Sizes of a client's local iterations in one round (the last batch may be short)."""
    per_epoch = [min(cfg.batch_size, num_samples - j * cfg.batch_size)
                 for j in range(num_batches(num_samples, cfg.batch_size))]
    return per_epoch * cfg.local_epochs


@lru_cache(maxsize=8)
def _epoch_order(seed: int, cid: int, rnd: int, epoch: int, n: int) -> np.ndarray:
    return np.random.default_rng(stream_seed(seed, "shuffle", cid, rnd, epoch)).permutation(n)


def batch_indices(cfg, indices: np.ndarray, cid: int, rnd: int, k: int) -> np.ndarray:
    """Training-set indices of client cid's k-th local batch in round rnd."""
    per_epoch = num_batches(len(indices), cfg.batch_size)
    epoch, j = divmod(k, per_epoch)
    order = _epoch_order(cfg.seed, cid, rnd, epoch, len(indices))
    return indices[order[j * cfg.batch_size:(j + 1) * cfg.batch_size]]


def client_batch(cfg, data: dict, mean, std, indices: np.ndarray, cid: int, rnd: int, k: int,
                 images: np.ndarray | None = None):
    """The augmented, normalised k-th batch of a client, as (x, y) tensors.

    ``images``: the batch's raw images when the caller has them already (fetched
    with other batches in one go), else they are read from ``data``.
    """
    idx = batch_indices(cfg, indices, cid, rnd, k)
    augment = torch.Generator().manual_seed(stream_seed(cfg.seed, "augment", cid, rnd, k))
    raw = data["x_train"][idx] if images is None else images
    x = make_batch(raw, mean, std, train=True, generator=augment)
    return x, torch.from_numpy(np.asarray(data["y_train"][idx], dtype=np.int64))


def client_images(cfg, data: dict, indices: np.ndarray, cid: int, rnd: int,
                  ks: range) -> dict[int, np.ndarray]:
    """Raw images of several local batches, read in one go (synthetic images are made
    on demand, and one call for a whole segment costs less than one per batch)."""
    per_batch = [batch_indices(cfg, indices, cid, rnd, k) for k in ks]
    if not per_batch:
        return {}
    everything = data["x_train"][np.concatenate(per_batch)]
    bounds = np.cumsum([0] + [len(ix) for ix in per_batch])
    return {k: everything[a:b] for k, a, b in zip(ks, bounds[:-1], bounds[1:])}
