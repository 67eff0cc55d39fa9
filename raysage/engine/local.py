"""Run one client's round of an algorithm in this process, without the engine.

For unit tests of an algorithm and for notebooks: the client's uploads go
straight to a ``serve`` callable, and its reply comes back at once (a
blocking exchange) or before the client's next iteration (a non-blocking
one). The round is driven by the engine's own driver
(:class:`~raysage.engine.runtime.ClientRound`) on a world where the server
and the links take no time, so the client code meets exactly the checks it
meets in a run, observers included, and a reply the plan does not deliver
stops it; there is no Ray, and the bytes are not held against the plan
(``serve`` may be a stub that answers nothing).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any, Callable

from ..algorithms.base import Algorithm, ClientState, Participant, ServerState, Upload
from ..algorithms.state import State
from ..netsim.planner import Segment, plan_round
from ..netsim.profiles import DeviceProfile
from ..observers import serve as observed_serve
from ..observers import server_observers
from .runtime import ClientRound, unplanned_replies

# Replies arrive the moment their upload is sent; iterations take a second each.
_INSTANT = DeviceProfile(compute_flops=1.0, uplink=float("inf"), downlink=float("inf"),
                         latency=0.0)


def run_client_round(algo: Algorithm, client: ClientState, rnd: int, batches: list,
                     serve: Callable[[Upload], Any] | None = None,
                     start: dict[str, State] | None = None,
                     server: ServerState | None = None) -> dict[str, State]:
    """Run ``client``'s round ``rnd`` on ``batches`` [(x, y), ...]; returns its uploaded
    states. ``serve(upload)`` answers each upload (None: nothing is answered); or, with
    ``server``, the algorithm serves it there as in a run, observers included."""
    if server is not None:
        observers = server_observers(algo)

        def serve(upload):
            return observed_serve(algo, server, rnd, [upload], observers)[0]

    if start is not None:
        client.start = start
    plan = algo.plan_client_round(rnd, Participant(client.cid, [len(y) for _, y in batches]))
    # Every iteration takes one FLOP's second, so a reply precedes the next iteration.
    plan = replace(plan, forward_flops=[1.0] * plan.iterations,
                   backward_flops=[1.0] * plan.iterations, after=None)
    schedule = plan_round([plan], {client.cid: _INSTANT}, server_flops=float("inf"))
    driver, uploads, replies = None, {}, {}
    try:
        for action in schedule.actions:
            if isinstance(action, Segment):
                if driver is None:
                    driver = ClientRound(algo, client, rnd, action, lambda k: batches[k],
                                         check_bytes=False)
                reply = replies.pop(action.reply_of, None) if action.reply_of else None
                uploads.update(driver.run(action, reply))
            else:
                (cid, k), = action.uploads
                answer = serve(uploads.pop(k)) if serve is not None else None
                replies[(cid, k)] = answer
        unplanned_replies(algo.name, replies, replies.values())
        return driver.result
    finally:
        client.round = None
