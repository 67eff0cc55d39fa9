"""Run one client's round of an algorithm in this process, without the engine.

For unit tests of an algorithm and for notebooks: the client's uploads go
straight to a ``serve`` callable, and its reply comes back at once (a
blocking exchange) or at the client's next iteration (a non-blocking one).
There is no simulated clock, no Ray and no byte accounting here; the engine
adds those (see :mod:`raysage.engine.runtime`).
"""

from __future__ import annotations

import inspect
from typing import Any, Callable

from .base import Algorithm, ClientState, Participant, Step, Upload
from .state import State


class _LocalRound:
    def __init__(self, algo: Algorithm, client: ClientState, rnd: int, batches: list):
        plan = algo.plan_client_round(rnd, Participant(client.cid, [len(y) for _, y in batches]))
        self.cid = client.cid
        self.exchanges = {k: exchange.blocking for k, exchange in plan.exchanges.items()}
        self.batches = batches
        self.pending: dict[int, Any] = {}

    def steps(self):
        for k in range(len(self.batches)):
            yield Step(self, k)

    def batch(self, k: int):
        return self.batches[k]

    def arrivals(self, k):
        yield from ()          # the server answered at once: nothing to wait for
        replies, self.pending = self.pending, {}
        return replies


def run_client_round(algo: Algorithm, client: ClientState, rnd: int, batches: list,
                     serve: Callable[[Upload], Any] | None = None,
                     start: dict[str, State] | None = None) -> dict[str, State]:
    """Run ``client``'s round ``rnd`` on ``batches`` [(x, y), ...]; returns its uploaded
    states. ``serve(upload)`` answers each upload (None: nothing is answered)."""
    if start is not None:
        client.start = start
    local = client.round = _LocalRound(algo, client, rnd, batches)
    try:
        body = algo.client_round(client, rnd)
        if not inspect.isgenerator(body):
            return body
        value = None
        while True:
            out = body.send(value)
            value = None
            if isinstance(out, Upload):
                reply = serve(out) if serve is not None else None
                if local.exchanges[out.k]:
                    value = reply
                elif reply is not None:
                    local.pending[out.k] = reply
    except StopIteration as end:
        return end.value
    finally:
        client.round = None
