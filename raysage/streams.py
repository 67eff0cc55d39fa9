"""Named random streams.

Every random draw in raysage comes from a stream named by what it is for,
(seed, purpose, client, round, ...), never from a generator shared in
execution order, so results do not depend on which worker runs what, in
which order, or when a client is first touched.
"""

from __future__ import annotations

import contextlib
import threading

import numpy as np

from .lazy import torch

# torch's global generator is one per process; a worker trains several clients at
# once on threads (and a sweep runs several points in one driver), so whoever
# seeds it or draws from it holds this lock.
GLOBAL_RNG = threading.RLock()


def stream_seed(seed: int, *path: int | str) -> int:
    """A 63-bit seed for the random stream named by (seed, *path)."""
    words = [seed] + [w if isinstance(w, int) else int.from_bytes(w.encode(), "little") % 2**32
                      for w in path]
    return int(np.random.SeedSequence(words).generate_state(2, dtype=np.uint32).view(np.uint64)[0]
               >> np.uint64(1))


@contextlib.contextmanager
def global_rng(seed: int | None = None):
    """Hold torch's global generator for a block: seeded with ``seed`` (or left as it
    is), and restored afterwards, so no other stream moves."""
    with GLOBAL_RNG, torch.random.fork_rng(devices=[]):
        if seed is not None:
            torch.manual_seed(seed)
        yield


def seeded(seed: int, *path: int | str):
    """Run a block (e.g. model construction) on torch's RNG seeded by a named stream."""
    return global_rng(stream_seed(seed, *path))


def unseeded():
    """Run a block that draws from torch's global RNG without moving anyone's stream
    (building a working set whose initial weights are replaced anyway)."""
    return global_rng()
