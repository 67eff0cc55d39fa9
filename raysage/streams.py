"""Named random streams.

Every random draw in raysage comes from a stream named by what it is for,
(seed, purpose, client, round, ...), never from a generator shared in
execution order, so results do not depend on which worker runs what, in
which order, or when a client is first touched.
"""

from __future__ import annotations

import numpy as np


def stream_seed(seed: int, *path: int | str) -> int:
    """A 63-bit seed for the random stream named by (seed, *path)."""
    words = [seed] + [w if isinstance(w, int) else int.from_bytes(w.encode(), "little") % 2**32
                      for w in path]
    return int(np.random.SeedSequence(words).generate_state(2, dtype=np.uint32).view(np.uint64)[0]
               >> np.uint64(1))
