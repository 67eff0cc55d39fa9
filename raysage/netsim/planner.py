"""Plan one round on the simulated clock.

Every simulated duration depends only on the cost model (FLOPs over compute
rate, bytes over bandwidth plus latency), never on tensor values, so a
whole round can be simulated before any tensor is touched. That gives

* the simulated timing and bytes of every client (also for a dry run),
* the order in which the server handles uploads (simulated arrival time,
  then client id), and
* a causal list of *actions* -- client segments and server operations --
  that the engine executes, serially or on Ray, with identical results.

A client's round is cut into *segments* at the points where it must wait
for the server. Segment boundaries are the only places where a server
reply enters a client's computation.
"""

from __future__ import annotations

import heapq
import math
from dataclasses import dataclass, field
from typing import Hashable, Iterator

from .profiles import DeviceProfile


@dataclass(frozen=True)
class Exchange:
    """A message a client sends to the server during local iteration ``k``."""

    k: int
    up: dict[str, int]               # bytes by kind
    server_flops: float              # work the server does on receipt
    down: dict[str, int] = field(default_factory=dict)  # reply bytes; empty = no reply
    blocking: bool = False           # the client waits for the reply before finishing k
    # Uploads sharing a group key are served together, once the last of them
    # has arrived (a barrier, e.g. SGLR's per-iteration step over all clients).
    group: Hashable | None = None
    # Samples the upload carries; the engine counts them per client over rounds
    # (Participant.uploaded), for algorithms whose plan depends on that history.
    samples: int = 0

    @property
    def has_reply(self) -> bool:
        return bool(self.down)


@dataclass(frozen=True)
class ClientRoundPlan:
    """What one client computes and sends in one round (from the algorithm)."""

    cid: int
    download: dict[str, int]         # received before local training (the broadcast)
    forward_flops: list[float]       # per local iteration, before its upload (if any)
    backward_flops: list[float]      # per local iteration, after its upload / reply
    exchanges: dict[int, Exchange]   # by local iteration
    upload: dict[str, int]           # sent after local training
    # Sequential protocols: start only when this client's end-of-round upload
    # has reached the server, and begin from that upload instead of the
    # broadcast (split learning's hand-over of x_c).
    after: int | None = None

    @property
    def iterations(self) -> int:
        return len(self.forward_flops)


@dataclass
class Segment:
    """Client work between two waits: runs iterations ``range(first, stop)``.

    It begins by applying ``reply_of`` (a server op's reply) if set, then
    finishes the backward pass of ``resume`` if set, then runs forward and
    backward of each iteration, except that the forward of ``blocked_at`` is
    its last step. ``is_first`` segments start the round (load the
    broadcast); ``is_last`` ones end it (produce the model upload).
    """

    cid: int
    index: int
    first: int
    stop: int
    resume: int | None = None
    blocked_at: int | None = None
    reply_of: tuple[int, int] | None = None
    start_time: float = 0.0
    is_first: bool = False
    is_last: bool = False
    after: int | None = None   # first segment: start from this client's end-of-round upload
    # First segment only: the client's plan, from which the worker runs the round's
    # steps and against which it holds what the round moves.
    plan: ClientRoundPlan | None = None

    @property
    def key(self) -> tuple[int, int]:
        return (self.cid, self.index)


@dataclass
class ServerOp:
    """The server handling one upload, or a barrier group of uploads at once."""

    uploads: list[tuple[int, int]]       # (cid, k) of each upload served
    start: float
    done: float
    replies: dict[tuple[int, int], float]  # reply arrival time by upload, if any
    segments: list[tuple[int, int]] = field(default_factory=list)  # producer of each upload

    @property
    def key(self) -> tuple[int, int]:
        return self.uploads[0]


@dataclass
class ClientTiming:
    start: float = 0.0
    finish: float = 0.0
    compute: float = 0.0
    upload: float = 0.0
    download: float = 0.0
    wait: float = 0.0        # blocked on server replies
    queue: float = 0.0       # the client's uploads waiting in the server's queue
    # Blocked while the server queues and serves an upload it waits on (the radio
    # stays on, neither sending nor receiving): part of ``wait``.
    served: float = 0.0
    bytes: dict[str, int] = field(default_factory=dict)
    sent: int = 0            # bytes up
    received: int = 0        # bytes down
    # (time, bytes by kind, sent?) of every message: when it was sent, or for
    # replies when it arrived; what a client that drops had already spent.
    messages: list[tuple[float, dict[str, int], bool]] = field(default_factory=list)

    def add_bytes(self, kinds: dict[str, int], at: float, up: bool) -> None:
        for kind, n in kinds.items():
            self.bytes[kind] = self.bytes.get(kind, 0) + n
        if up:
            self.sent += sum(kinds.values())
        else:
            self.received += sum(kinds.values())
        self.messages.append((at, kinds, up))

    @property
    def radio(self) -> float:
        """Seconds the client's radio is on: sending, receiving, or waiting for a reply."""
        return self.upload + self.download + self.served

    def bytes_before(self, t: float) -> dict[str, int]:
        out: dict[str, int] = {}
        for at, kinds, _ in self.messages:
            if at < t:
                for kind, n in kinds.items():
                    out[kind] = out.get(kind, 0) + n
        return out

    def sent_received_before(self, t: float) -> tuple[int, int]:
        sent = sum(sum(k.values()) for at, k, up in self.messages if at < t and up)
        received = sum(sum(k.values()) for at, k, up in self.messages if at < t and not up)
        return sent, received


@dataclass
class Drop:
    """A participant whose work is lost this round."""

    reason: str                  # "dropout", "deadline" or "over-selection"
    time: float                  # when it was dropped (absolute simulated time)
    bytes: dict[str, int]        # what it had sent or received by then
    energy: dict[str, float] = field(default_factory=dict)   # what it had spent by then


@dataclass
class RoundSchedule:
    start: float
    end: float
    actions: list[Segment | ServerOp]
    clients: dict[int, ClientTiming]
    server_busy: float
    dropped: dict[int, Drop] = field(default_factory=dict)

    @property
    def duration(self) -> float:
        return self.end - self.start


def _transfer(nbytes: int, rate: float, latency: float) -> float:
    return latency + nbytes / rate if nbytes else 0.0


class _Client:
    """A client's timeline as a generator: yields each upload it sends."""

    def __init__(self, plan: ClientRoundPlan, profile: DeviceProfile, start: float):
        self.plan, self.profile = plan, profile
        self.timing = ClientTiming(start=start, finish=math.inf)
        self.iter_start: list[float] = []
        self.uplink_free = start
        self.reply_at: float | None = None  # set by the scheduler to resume a blocked client
        self.blocked_at: list[int] = []
        self.arrivals: dict[int, float] = {}  # at the server, by iteration

    def _send(self, t: float, nbytes: int) -> float:
        """Uploads share the client's uplink one after another; returns arrival time."""
        begin = max(t, self.uplink_free)
        self.uplink_free = begin + nbytes / self.profile.uplink
        self.timing.upload += self.profile.latency + nbytes / self.profile.uplink
        return self.uplink_free + self.profile.latency

    def run(self) -> Iterator[tuple[float, Exchange]]:
        plan, prof, timing = self.plan, self.profile, self.timing
        timing.add_bytes(plan.download, timing.start, up=False)
        t = timing.start + _transfer(sum(plan.download.values()), prof.downlink, prof.latency)
        timing.download += t - timing.start
        for k in range(plan.iterations):
            self.iter_start.append(t)
            step = plan.forward_flops[k] / prof.compute_flops
            t += step
            timing.compute += step
            exchange = plan.exchanges.get(k)
            if exchange is not None:
                timing.add_bytes(exchange.up, t, up=True)
                sent_at = t
                self.arrivals[k] = self._send(t, sum(exchange.up.values()))
                yield self.arrivals[k], exchange
                if exchange.blocking:
                    self.blocked_at.append(k)
                    assert self.reply_at is not None, "scheduler must resume a blocked client"
                    t = self.reply_at
                    timing.wait += t - sent_at
                    self.reply_at = None
            step = plan.backward_flops[k] / prof.compute_flops
            t += step
            timing.compute += step
        if sum(plan.upload.values()):  # nothing to send costs no latency either
            timing.add_bytes(plan.upload, t, up=True)
            t = self._send(t, sum(plan.upload.values()))
        timing.finish = t


def plan_round(plans: list[ClientRoundPlan], profiles: dict[int, DeviceProfile],
               server_flops: float, start: float = 0.0) -> RoundSchedule:
    """Simulate one round and derive the causal order of client and server work.

    The server is a single FIFO queue: uploads are served in order of
    simulated arrival, ties broken by client id, then iteration. A barrier
    group is served when its last upload arrives.
    """
    clients = {p.cid: _Client(p, profiles[p.cid], start) for p in plans}
    successors = {p.after: p.cid for p in plans if p.after is not None}
    group_size: dict[Hashable, int] = {}
    for p in plans:
        for ex in p.exchanges.values():
            if ex.group is not None:
                group_size[ex.group] = group_size.get(ex.group, 0) + 1
    pending: list[tuple[float, int, int, Exchange]] = []
    runners = {cid: c.run() for cid, c in clients.items()}

    def advance(cid: int) -> None:
        """Run a client until it blocks or ends, queueing what it sends."""
        for arrival, exchange in runners[cid]:
            heapq.heappush(pending, (arrival, cid, exchange.k, exchange))
            if exchange.blocking:
                return
        successor = successors.get(cid)
        if successor is not None:
            nxt = clients[successor]
            nxt.timing.start = nxt.uplink_free = clients[cid].timing.finish
            advance(successor)

    for cid in sorted(clients):
        if clients[cid].plan.after is None:
            advance(cid)

    server_free, server_busy = start, 0.0
    ops: list[ServerOp] = []
    waiting: dict[Hashable, list[tuple[int, int, Exchange]]] = {}
    while pending:
        arrival, cid, k, exchange = heapq.heappop(pending)
        members = [(cid, k, exchange)]
        if exchange.group is not None:
            waiting.setdefault(exchange.group, []).append((cid, k, exchange))
            if len(waiting[exchange.group]) < group_size[exchange.group]:
                continue
            members = waiting.pop(exchange.group)
        begin = max(arrival, server_free)
        work = sum(ex.server_flops for _, _, ex in members) / server_flops
        server_free = begin + work
        server_busy += work
        replies = {}
        for member, kk, ex in members:
            client = clients[member]
            client.timing.queue += begin - client.arrivals[kk]
            if ex.blocking:
                client.timing.served += server_free - client.arrivals[kk]
            if ex.has_reply:
                replies[(member, kk)] = server_free + _transfer(
                    sum(ex.down.values()), client.profile.downlink, client.profile.latency)
                client.timing.download += replies[(member, kk)] - server_free
                client.timing.add_bytes(ex.down, replies[(member, kk)], up=False)
        ops.append(ServerOp([(m, kk) for m, kk, _ in members], begin, server_free, replies))
        for member, kk, ex in members:
            if ex.blocking:
                clients[member].reply_at = replies[(member, kk)]
                advance(member)

    unfinished = [cid for cid, c in clients.items() if math.isinf(c.timing.finish)]
    assert not unfinished, f"clients {unfinished} never finished: a barrier group is incomplete"
    timings = {cid: c.timing for cid, c in clients.items()}
    replies = {key: t for op in ops for key, t in op.replies.items()}
    segments = {cid: _segments(c, replies) for cid, c in clients.items()}
    for succ_of, cid in successors.items():
        segments[cid][0].after = succ_of
    for op in ops:
        op.segments = [next(s.key for s in segments[c] if s.first <= k < s.stop)
                       for c, k in op.uploads]
    end = max([server_free] + [t.finish for t in timings.values()])
    actions = _causal_order([s for segs in segments.values() for s in segs], ops)
    return RoundSchedule(start, end, actions, timings, server_busy)


def _segments(client: _Client, replies: dict[tuple[int, int], float]) -> list[Segment]:
    """Cut a client's round where a server reply enters its computation.

    A blocking exchange at k cuts after the forward of k. A non-blocking
    reply is applied before the first iteration that starts after it
    arrives (or at the end of the round if none does).
    """
    plan = client.plan
    n = plan.iterations
    cuts: list[tuple[int, str, int]] = []  # (boundary iteration, kind, exchange k)
    for k in client.blocked_at:
        cuts.append((k + 1, "blocking", k))
    for k, exchange in plan.exchanges.items():
        if exchange.has_reply and not exchange.blocking:
            arrival = replies[(plan.cid, k)]
            j = next((i for i in range(k + 1, n) if client.iter_start[i] >= arrival), n)
            cuts.append((j, "reply", k))
    cuts.sort()

    segments: list[Segment] = []
    first, resume, reply_of, t = 0, None, None, client.timing.start
    for boundary, kind, k in cuts:
        blocked = k if kind == "blocking" else None
        segments.append(Segment(plan.cid, len(segments), first, boundary, resume=resume,
                                blocked_at=blocked, reply_of=reply_of, start_time=t))
        first = boundary
        resume = k if kind == "blocking" else None
        reply_of = (plan.cid, k)
        t = replies[(plan.cid, k)]
    segments.append(Segment(plan.cid, len(segments), first, n, resume=resume,
                            reply_of=reply_of, start_time=t))
    segments[0].is_first = True
    segments[0].plan = plan
    segments[-1].is_last = True
    return segments


def _causal_order(segments: list[Segment], ops: list[ServerOp]) -> list[Segment | ServerOp]:
    """Order actions by simulated start time, never before what they depend on,
    finishing started clients before starting new ones.

    A segment depends on the client's previous segment and on the server op
    whose reply it applies; a server op depends on the segment that produced
    its upload and on the previous server op (the server is sequential).
    Kahn's algorithm with a time-keyed heap keeps the order deterministic.
    """
    deps: dict[tuple, set[tuple]] = {}
    nodes: dict[tuple, Segment | ServerOp] = {}
    op_of = {upload: op.key for op in ops for upload in op.uploads}
    last_index = {}
    for s in segments:
        last_index[s.cid] = max(last_index.get(s.cid, 0), s.index)
    for s in segments:
        node = ("seg",) + s.key
        nodes[node] = s
        deps[node] = set()
        if s.index > 0:
            deps[node].add(("seg", s.cid, s.index - 1))
        if s.reply_of is not None:
            deps[node].add(("op",) + op_of[s.reply_of])
        if s.after is not None:
            deps[node].add(("seg", s.after, last_index[s.after]))
    previous = None
    for op in ops:
        node = ("op",) + op.key
        nodes[node] = op
        deps[node] = {("seg",) + seg for seg in op.segments}
        if previous is not None:
            deps[node].add(previous)
        previous = node

    def priority(node: tuple) -> tuple:
        # Work that lets a started client go on comes before starting another
        # client, so a worker holds few clients mid-round at once (each holds
        # a working set of models and its activations). The order changes
        # nothing computed: any order that respects the dependencies gives the
        # same results.
        item = nodes[node]
        opens = isinstance(item, Segment) and item.is_first
        when = item.start_time if isinstance(item, Segment) else item.start
        return (opens, when, node[0] == "op", node[1], node[2])

    users: dict[tuple, list[tuple]] = {n: [] for n in nodes}
    for node, needed in deps.items():
        for d in needed:
            users[d].append(node)
    missing = {n: len(d) for n, d in deps.items()}
    ready = [(priority(n), n) for n, m in missing.items() if m == 0]
    heapq.heapify(ready)
    order: list[Segment | ServerOp] = []
    while ready:
        _, node = heapq.heappop(ready)
        order.append(nodes[node])
        for user in users[node]:
            missing[user] -= 1
            if missing[user] == 0:
                heapq.heappush(ready, (priority(user), user))
    assert len(order) == len(nodes), "cyclic dependency between client and server work"
    return order
