"""The round planner against hand-computed timelines (no torch tensors, no Ray)."""

from __future__ import annotations

import pytest

from raysage.netsim.planner import ClientRoundPlan, Exchange, Segment, ServerOp, plan_round
from raysage.netsim.profiles import DeviceProfile, client_profiles

# 1 GFLOP/s, 1000 B/s up, 2000 B/s down, 0.1 s latency: durations in round numbers.
SLOW = DeviceProfile(compute_flops=1e9, uplink=1000.0, downlink=2000.0, latency=0.1)
SERVER = 1e10


def _plan(cid, exchanges, n=3, fwd=1e9, bwd=2e9, download=500, upload=300):
    return ClientRoundPlan(cid, download={"client_model_down": download},
                           forward_flops=[fwd] * n, backward_flops=[bwd] * n,
                           exchanges=exchanges, upload={"client_model_up": upload})


def test_blocking_exchange_timeline_by_hand():
    plan = _plan(0, {
        0: Exchange(0, up={"smashed_up": 100}, server_flops=1e10, down={"aux_down": 400},
                    blocking=True),
        2: Exchange(2, up={"smashed_up": 200}, server_flops=5e9),
    })
    s = plan_round([plan], {0: SLOW}, SERVER)
    t = s.clients[0]
    # download 0.1 + 500/2000 = 0.35; fwd 1 s -> 1.35; upload 0.1 + 0.1 -> arrives 1.55;
    # server 1 s -> 2.55; reply 0.1 + 400/2000 -> 2.85; bwd 2 s -> 4.85; iteration 1 -> 7.85;
    # fwd 2 -> 8.85, upload (0.2 s + 0.1) arrives 9.15, served by 9.65; bwd -> 10.85;
    # model upload 0.3 s + 0.1 -> 11.25.
    assert t.finish == pytest.approx(11.25)
    assert s.end == pytest.approx(11.25)
    assert t.wait == pytest.approx(2.85 - 1.35)
    assert t.compute == pytest.approx(9.0)
    assert t.upload == pytest.approx(0.2 + 0.3 + 0.4)
    assert t.download == pytest.approx(0.35 + 0.3)
    assert t.bytes == {"client_model_down": 500, "smashed_up": 300, "aux_down": 400,
                       "client_model_up": 300}
    ops = [a for a in s.actions if isinstance(a, ServerOp)]
    assert [o.uploads for o in ops] == [[(0, 0)], [(0, 2)]]
    assert [x for o in ops for x in (o.start, o.done)] == pytest.approx([1.55, 2.55, 9.15, 9.65])
    assert t.queue == 0.0 and ops[0].replies == pytest.approx({(0, 0): 2.85})
    kinds = [(type(a).__name__, a.index if isinstance(a, Segment) else a.key[1])
             for a in s.actions]
    assert kinds == [("Segment", 0), ("ServerOp", 0), ("Segment", 1), ("ServerOp", 2)]
    seg0, seg1 = [a for a in s.actions if isinstance(a, Segment)]
    assert (seg0.first, seg0.stop, seg0.blocked_at, seg0.is_first, seg0.is_last) == (0, 1, 0, True, False)
    assert (seg1.first, seg1.stop, seg1.resume, seg1.reply_of, seg1.is_last) == (1, 3, 0, (0, 0), True)


def test_halving_bandwidth_doubles_transfer_time():
    half = DeviceProfile(1e9, SLOW.uplink / 2, SLOW.downlink / 2, SLOW.latency)
    ex = {0: Exchange(0, up={"smashed_up": 1000}, server_flops=0.0)}
    full_t = plan_round([_plan(0, ex)], {0: SLOW}, SERVER).clients[0]
    half_t = plan_round([_plan(0, ex)], {0: half}, SERVER).clients[0]
    assert half_t.upload - 2 * SLOW.latency == pytest.approx(2 * (full_t.upload - 2 * SLOW.latency))
    assert half_t.download - SLOW.latency == pytest.approx(2 * (full_t.download - SLOW.latency))


def test_server_queue_when_uploads_collide_not_when_apart():
    ex = {0: Exchange(0, up={"smashed_up": 100}, server_flops=1e10)}  # 1 s of server work
    together = plan_round([_plan(0, ex), _plan(1, ex)], {0: SLOW, 1: SLOW}, SERVER)
    assert together.clients[0].queue == pytest.approx(0.0)
    assert together.clients[1].queue == pytest.approx(1.0)   # waits for client 0's op
    assert together.server_busy == pytest.approx(2.0)
    slow_device = DeviceProfile(1e8, SLOW.uplink, SLOW.downlink, SLOW.latency)  # fwd takes 10 s
    apart = plan_round([_plan(0, ex), _plan(1, ex)], {0: SLOW, 1: slow_device}, SERVER)
    assert apart.clients[0].queue == 0.0 and apart.clients[1].queue == 0.0


def test_simultaneous_arrivals_are_served_in_client_id_order():
    ex = {0: Exchange(0, up={"smashed_up": 100}, server_flops=1e9)}
    s = plan_round([_plan(c, ex) for c in (3, 1, 2)], {c: SLOW for c in (1, 2, 3)}, SERVER)
    assert [o.key[0] for o in s.actions if isinstance(o, ServerOp)] == [1, 2, 3]


def test_non_blocking_reply_enters_at_first_iteration_after_arrival():
    # The reply takes 1 s of server work; iterations take 3 s, so it arrives
    # during iteration 0 and is applied before iteration 1.
    ex = {0: Exchange(0, up={"smashed_up": 100}, server_flops=1e10, down={"aux_down": 100},
                      blocking=False)}
    s = plan_round([_plan(0, ex, n=4)], {0: SLOW}, SERVER)
    segs = [a for a in s.actions if isinstance(a, Segment)]
    assert [(g.first, g.stop, g.reply_of, g.resume) for g in segs] == [(0, 1, None, None),
                                                                       (1, 4, (0, 0), None)]
    assert s.clients[0].wait == 0.0
    # A reply later than the last iteration is applied at the end of the round.
    late = {0: Exchange(0, up={"smashed_up": 100}, server_flops=1e12, down={"aux_down": 100})}
    segs = [a for a in plan_round([_plan(0, late, n=2)], {0: SLOW}, SERVER).actions
            if isinstance(a, Segment)]
    assert [(g.first, g.stop, g.reply_of) for g in segs] == [(0, 2, None), (2, 2, (0, 0))]


def test_actions_respect_every_dependency():
    plans = []
    for cid in range(6):
        ex = {k: Exchange(k, up={"smashed_up": 100 * (cid + 1)}, server_flops=3e9 * (k + 1),
                          down={"grad_down": 100} if k % 2 == 0 else {}, blocking=k % 2 == 0)
              for k in range(0, 5, 1 + cid % 2)}
        plans.append(_plan(cid, ex, n=5))
    profiles = {c: DeviceProfile(1e9 * (c + 1), 1000.0, 2000.0, 0.05 * c) for c in range(6)}
    s = plan_round(plans, profiles, SERVER)
    done = set()
    for a in s.actions:
        if isinstance(a, Segment):
            if a.index:
                assert ("seg", a.cid, a.index - 1) in done
            if a.reply_of:
                assert ("op",) + a.reply_of in done
            done.add(("seg", a.cid, a.index))
        else:
            assert all(("seg",) + seg in done for seg in a.segments)
            done.update(("op",) + upload for upload in a.uploads)
    ops = [a for a in s.actions if isinstance(a, ServerOp)]
    assert [o.start for o in ops] == sorted(o.start for o in ops)  # one FIFO server


def test_heterogeneous_profiles_are_seeded_and_spread():
    a, b = client_profiles("heterogeneous", 50, 1), client_profiles("heterogeneous", 50, 1)
    assert a == b and a != client_profiles("heterogeneous", 50, 2)
    rates = sorted(p.compute_flops for p in a)
    assert rates[-1] / rates[0] > 5
    assert client_profiles("uniform", 3, 0)[0] == client_profiles("uniform", 3, 9)[2]


def test_barrier_group_waits_for_the_slowest_client():
    """SGLR-style: iteration k is served once every client's upload of k has arrived."""
    def plan(cid):
        return _plan(cid, {k: Exchange(k, up={"smashed_up": 100}, server_flops=1e9,
                                       down={"grad_down": 200}, blocking=True, group=("it", k))
                           for k in range(2)}, n=2, fwd=1e9, bwd=0.0, download=0, upload=0)
    fast, slow = SLOW, DeviceProfile(2.5e8, SLOW.uplink, SLOW.downlink, SLOW.latency)  # fwd 4 s
    s = plan_round([plan(0), plan(1)], {0: fast, 1: slow}, SERVER)
    ops = [a for a in s.actions if isinstance(a, ServerOp)]
    assert [sorted(o.uploads) for o in ops] == [[(0, 0), (1, 0)], [(0, 1), (1, 1)]]
    # Slow client's upload of k=0 arrives at 4 + 0.1 + 0.1 = 4.2; both served until 4.4;
    # replies (0.1 + 0.1) at 4.6; both forward again (fast 1 s, slow 4 s): slow arrives
    # at 8.8, served until 9.0, replies at 9.2, which ends the round for both.
    assert [o.start for o in ops] == pytest.approx([4.2, 8.8])
    assert s.clients[0].finish == pytest.approx(9.2) == s.clients[1].finish
    assert s.clients[0].wait > s.clients[1].wait  # the fast client idles at each barrier


def test_sequential_clients_round_time_is_the_sum():
    """Split learning: each client starts when its predecessor's hand-over reached the server."""
    ex = {0: Exchange(0, up={"smashed_up": 100}, server_flops=1e9, down={"grad_down": 100},
                      blocking=True)}
    one = plan_round([_plan(0, ex)], {0: SLOW}, SERVER)
    chain = [_plan(0, ex)] + [ClientRoundPlan(c, {"server_model": 500}, [1e9] * 3, [2e9] * 3, ex,
                                              {"server_model": 300}, after=c - 1)
                              for c in (1, 2)]
    s = plan_round(chain, {c: SLOW for c in range(3)}, SERVER)
    assert s.duration == pytest.approx(3 * one.duration)
    assert s.clients[1].start == pytest.approx(s.clients[0].finish)
    first = [a for a in s.actions if isinstance(a, Segment) and a.cid == 1][0]
    assert first.after == 0
