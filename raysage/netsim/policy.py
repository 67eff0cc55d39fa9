"""Who takes part in a round, and whose work is lost: availability, dropout, policies.

Everything here is decided from seeded streams and the planned timeline,
so a dropped client is dropped identically on every backend. Dropped
clients are removed and the survivors' round is planned again, as the
server would see it: a dropped client's later uploads never arrive.
"""

from __future__ import annotations

import math
from typing import Callable

import numpy as np

from .energy import energy_until
from .planner import ClientRoundPlan, Drop, RoundSchedule, plan_round
from .profiles import DeviceProfile


def available_clients(profiles: list[DeviceProfile], rng: np.random.Generator) -> list[int]:
    """Clients reachable this round: each with its profile's probability."""
    draws = rng.random(len(profiles))
    return [c for c, p in enumerate(profiles) if draws[c] < p.availability]


def selection_size(target: int, policy: str, over_selection: float, num_clients: int) -> int:
    """Clients to sample: the target, or more under over-selection (keep the first K)."""
    if policy == "over_selection":
        return min(num_clients, math.ceil(target * (1 + over_selection)))
    return target


def decide_drops(first: RoundSchedule, *, policy: str, deadline: float | None, keep: int,
                 dropout: float, rng: np.random.Generator,
                 profiles: dict[int, DeviceProfile] | None = None) -> dict[int, Drop]:
    """Drops of a round planned with every selected client.

    In order: mid-round dropout (probability ``dropout``, at a uniform point
    of the client's round); then, among the rest, the deadline (finish later
    than start + deadline) or over-selection (all but the first ``keep`` to
    finish, ties by client id).
    """
    start, clients = first.start, first.clients
    cids = sorted(clients)
    drops: dict[int, Drop] = {}
    fails, when = rng.random(len(cids)), rng.random(len(cids))
    for i, cid in enumerate(cids):
        if fails[i] < dropout:
            t = start + when[i] * (clients[cid].finish - start)
            drops[cid] = Drop("dropout", t, clients[cid].bytes_before(t))
    rest = [c for c in cids if c not in drops]
    if policy == "deadline":
        cutoff = start + deadline
        for cid in rest:
            if clients[cid].finish > cutoff:
                drops[cid] = Drop("deadline", cutoff, clients[cid].bytes_before(cutoff))
    elif policy == "over_selection":
        by_finish = sorted(rest, key=lambda c: (clients[c].finish, c))
        if len(by_finish) > keep:
            cutoff = clients[by_finish[keep - 1]].finish
            for cid in by_finish[keep:]:
                drops[cid] = Drop("over-selection", cutoff, clients[cid].bytes_before(cutoff))
    if profiles is not None:
        for cid, drop in drops.items():
            drop.energy = energy_until(clients[cid], profiles[cid], drop.time)
    return drops


def plan_with_policy(make_plans: Callable[[list[int]], list[ClientRoundPlan]],
                     selected: list[int], profiles: dict[int, DeviceProfile],
                     server_flops: float, start: float, *, policy: str,
                     deadline: float | None, keep: int, dropout: float,
                     rng: np.random.Generator) -> RoundSchedule:
    """Plan a round, drop whom the world and the policy drop, plan the survivors again."""
    first = plan_round(make_plans(selected), profiles, server_flops, start)
    drops = decide_drops(first, policy=policy, deadline=deadline, keep=keep, dropout=dropout,
                         rng=rng, profiles=profiles)
    if not drops:
        return first
    survivors = [c for c in selected if c not in drops]
    schedule = (plan_round(make_plans(survivors), profiles, server_flops, start) if survivors
                else RoundSchedule(start, start, [], {}, 0.0))
    schedule.dropped = drops
    # At a deadline the server waits until the deadline before it gives up on anyone.
    if any(d.reason == "deadline" for d in drops.values()):
        schedule.end = max(schedule.end, start + deadline)
    return schedule
