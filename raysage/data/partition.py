"""Split a training set across federated clients.

Each partitioner returns, per client, an int64 array of indices into the
training set, in the order the partitioner assigned them. Every client gets
exactly ``samples_per_client`` samples; samples left over are unused. All
randomness comes from one ``np.random.default_rng(seed)``, so the same
arguments always give the same split.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from raysage.errors import DataError

Partitioner = Callable[..., list[np.ndarray]]


def _iid(labels: np.ndarray, num_clients: int, samples_per_client: int, rng: np.random.Generator, **_: object) -> list[np.ndarray]:
    order = rng.permutation(len(labels))
    return [order[i * samples_per_client : (i + 1) * samples_per_client] for i in range(num_clients)]


def _dirichlet(
    labels: np.ndarray, num_clients: int, samples_per_client: int, rng: np.random.Generator, *, alpha: float, **_: object
) -> list[np.ndarray]:
    """Label skew after Hsu et al. (2019).

    Order of work: each class's indices are shuffled once (in class order);
    then, client by client, the client draws p ~ Dir(alpha) over the classes
    present and fills its slots one at a time by drawing a class from p and
    taking that class's next unused sample. A class that runs out is removed
    from every client's p (the rest renormalised) for all later draws.

    Slots are drawn in vectorised batches; a draw that lands on a class that
    has run out is rejected and redrawn, which samples exactly the
    renormalised p. If a tiny alpha leaves a client with zero probability on
    every remaining class, that client draws uniformly over remaining classes.
    """
    classes = np.unique(labels)
    pools = [rng.permutation(np.flatnonzero(labels == c)) for c in classes]
    sizes = np.array([len(p) for p in pools])
    used = np.zeros(len(classes), dtype=np.int64)  # taken so far, per class
    clients = []
    for _client in range(num_clients):
        p = rng.dirichlet(np.full(len(classes), alpha))
        drawn = _draw_classes(p, sizes - used, samples_per_client, rng)
        chosen = np.empty(samples_per_client, dtype=np.int64)
        for c in np.unique(drawn):
            slots = np.flatnonzero(drawn == c)
            chosen[slots] = pools[c][used[c] : used[c] + len(slots)]
            used[c] += len(slots)
        clients.append(chosen)
    return clients


def _draw_classes(p: np.ndarray, remaining: np.ndarray, count: int, rng: np.random.Generator) -> np.ndarray:
    """Draw ``count`` classes in sequence from ``p``, never exceeding ``remaining``."""
    left = remaining.copy()
    out: list[np.ndarray] = []
    while count > 0:
        q = np.where(left > 0, np.nan_to_num(p), 0.0)
        if q.sum() <= 0:
            q = (left > 0).astype(float)
        draws = rng.choice(len(q), size=count, p=q / q.sum())
        # Keep draws up to the first one that takes a class past its supply;
        # that draw and everything after it are redrawn with the class gone.
        seen = _running_count(draws, len(q))
        over = np.flatnonzero(seen > left[draws])
        accepted = draws if len(over) == 0 else draws[: over[0]]
        out.append(accepted)
        left -= np.bincount(accepted, minlength=len(q))
        count -= len(accepted)
    return np.concatenate(out) if out else np.empty(0, dtype=np.int64)


def _running_count(draws: np.ndarray, n_classes: int) -> np.ndarray:
    """For each position, how many times its class has appeared so far (inclusive)."""
    onehot = np.zeros((len(draws), n_classes), dtype=np.int64)
    onehot[np.arange(len(draws)), draws] = 1
    return np.cumsum(onehot, axis=0)[np.arange(len(draws)), draws]


def _shards(
    labels: np.ndarray,
    num_clients: int,
    samples_per_client: int,
    rng: np.random.Generator,
    *,
    shards_per_client: int,
    **_: object,
) -> list[np.ndarray]:
    """Pathological non-IID split of McMahan et al. (2017).

    A random subset of num_clients * samples_per_client samples is sorted by
    label and cut into num_clients * shards_per_client contiguous shards;
    each client gets shards_per_client random shards. When samples_per_client
    is not a multiple of shards_per_client, shard sizes differ by one and
    every client gets the same number of the larger shards, so all clients
    still hold exactly samples_per_client samples.
    """
    if shards_per_client < 1:
        raise DataError(f"shards_per_client must be at least 1, got {shards_per_client}")
    small, extra = divmod(samples_per_client, shards_per_client)
    if small == 0:
        raise DataError(
            f"cannot cut {samples_per_client} samples per client into {shards_per_client} shards; "
            "lower --shards-per-client or raise --samples-per-client"
        )
    total = num_clients * samples_per_client
    subset = rng.permutation(len(labels))[:total]
    by_label = subset[np.argsort(labels[subset], kind="stable")]

    n_big, n_small = num_clients * extra, num_clients * (shards_per_client - extra)
    # Place the larger shards at random positions so no label range is favoured.
    is_big = rng.permutation(np.r_[np.ones(n_big, bool), np.zeros(n_small, bool)])
    bounds = np.cumsum(np.where(is_big, small + 1, small))[:-1]
    shards = np.split(by_label, bounds)
    big_ids, small_ids = rng.permutation(np.flatnonzero(is_big)), rng.permutation(np.flatnonzero(~is_big))
    per_big, per_small = extra, shards_per_client - extra
    return [
        np.concatenate(
            [shards[s] for s in big_ids[i * per_big : (i + 1) * per_big]]
            + [shards[s] for s in small_ids[i * per_small : (i + 1) * per_small]]
        )
        for i in range(num_clients)
    ]


PARTITIONERS: dict[str, Partitioner] = {
    "iid": _iid,
    "dirichlet": _dirichlet,
    "shards": _shards,
}


def partition(
    labels: np.ndarray,
    num_clients: int,
    scheme: str,
    *,
    alpha: float = 0.5,
    shards_per_client: int = 2,
    samples_per_client: int | None = None,
    seed: int = 0,
) -> list[np.ndarray]:
    """Per client, an int64 array of training-set indices (see module doc)."""
    partitioner = PARTITIONERS.get(scheme)
    if partitioner is None:
        raise DataError(f"unknown partition scheme {scheme!r}; choose one of {', '.join(PARTITIONERS)}")
    labels = np.asarray(labels)
    if labels.ndim != 1:
        raise DataError(f"labels must be a 1-D array, got shape {labels.shape}")
    if num_clients < 1:
        raise DataError(f"--clients must be at least 1, got {num_clients}")
    n = len(labels)
    if samples_per_client is None:
        samples_per_client = n // num_clients
        if samples_per_client == 0:
            raise DataError(f"dataset has {n} training samples, too few for {num_clients} clients; lower --clients")
    elif samples_per_client < 1:
        raise DataError(f"--samples-per-client must be at least 1, got {samples_per_client}")
    if samples_per_client * num_clients > n:
        raise DataError(
            f"dataset has {n} training samples, cannot give {num_clients} clients {samples_per_client} each; "
            "lower --samples-per-client or --clients"
        )
    if scheme == "dirichlet" and not alpha > 0:  # also rejects NaN
        raise DataError(f"--alpha must be positive, got {alpha}")
    rng = np.random.default_rng(seed)
    parts = partitioner(
        labels, num_clients, samples_per_client, rng, alpha=alpha, shards_per_client=shards_per_client
    )
    return [np.asarray(p, dtype=np.int64) for p in parts]
