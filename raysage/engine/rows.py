"""The rows a run writes: one per round (rounds.parquet), one per client and round
(clients.parquet), and the dry run's rows of bytes and simulated time.

The columns of bytes and metrics are the algorithm's own (its ``byte_kinds``
and ``metrics``), so an algorithm added in a user's file gets its columns too.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from ..algorithms.base import Algorithm, Metric
from ..netsim.energy import client_energy
from ..observers import observer_metrics
from ..netsim.planner import RoundSchedule, Segment
from .world import World

Sums = dict[str, list[float]]      # metric name -> [weighted sum, weight]


def _mean(values: list[float]) -> float:
    return float(np.mean(values)) if values else math.nan


def bytes_by_kind(algo: Algorithm, kinds: dict[str, int]) -> dict[str, int]:
    """Every byte kind of the algorithm as a column, plus ``total_bytes`` and each of
    the algorithm's declared totals (``byte_totals``)."""
    row = {kind.name: kinds.get(kind.name, 0) for kind in algo.byte_kinds}
    row["total_bytes"] = sum(kinds.values())
    for total in algo.byte_totals:
        row[total.name] = total.of(algo.byte_kinds, kinds)
    return row


def pooled(metric: Metric, sources: list[Sums]) -> dict[str, float]:
    """The metric's weighted mean over the sources (and its count column)."""
    found = [s[metric.name] for s in sources if metric.name in s]
    weight = sum(w for _, w in found)
    out = {metric.name: sum(v for v, _ in found) / weight if weight else math.nan}
    if metric.count:
        out[metric.count] = int(weight)
    return out


def blank_metrics(metrics: tuple[Metric, ...]) -> dict[str, float]:
    """A dropped client's metric columns: nothing was measured."""
    out: dict[str, float] = {}
    for metric in metrics:
        if metric.per_client:
            out[metric.name] = math.nan
            if metric.count:
                out[metric.count] = 0
    return out


def plan_rows(world: World, rounds: int | None = None) -> list[dict[str, Any]]:
    """The dry run: bytes by kind and simulated time of each round, without training."""
    rows, sim_time = [], 0.0
    for rnd in range(world.cfg.rounds if rounds is None else rounds):
        schedule = world.plan(rnd, sim_time)
        kinds: dict[str, int] = {}
        spent = [t.bytes for t in schedule.clients.values()]
        spent += [d.bytes for d in schedule.dropped.values()]
        for used in spent:
            for kind, n in used.items():
                kinds[kind] = kinds.get(kind, 0) + n
        sim_time = schedule.end
        energy = sum(client_energy(t, world.profiles[cid])["energy_j"]
                     for cid, t in schedule.clients.items())
        energy += sum(d.energy.get("energy_j", 0.0) for d in schedule.dropped.values())
        rows.append({"round": rnd, "participants": len(schedule.clients),
                     "dropped": len(schedule.dropped),
                     **bytes_by_kind(world.algorithm, kinds),
                     "energy_j": energy,
                     "sim_round_time": schedule.duration, "sim_time": sim_time})
    return rows


def round_rows(world: World, rnd: int, schedule: RoundSchedule, results: dict[int, Any],
               server_out: dict[str, Any], owner: list[int]) -> tuple[dict, list[dict]]:
    """Turn a round's schedule and outcomes into one round row and its client rows."""
    algo = world.algorithm
    metrics = (*algo.metrics, *observer_metrics(algo))
    per_client = [m for m in metrics if m.per_client]
    at_server: dict[int, Sums] = server_out["client_metrics"]
    client_rows = []
    for cid in sorted(set(schedule.clients) | set(schedule.dropped)):
        row = {"round": rnd, "client": cid, "worker": owner[cid]}
        drop = schedule.dropped.get(cid)
        if drop is not None:
            # Its work is lost; what it had sent and received by then still counts.
            row.update(num_samples=0, client_state_bytes=0, dropped=True,
                       drop_reason=drop.reason, **bytes_by_kind(algo, drop.bytes))
            row.update({name: math.nan for name in
                        ("sim_compute", "sim_upload", "sim_download", "sim_wait", "sim_queue",
                         "sim_idle")})
            row.update(blank_metrics(metrics))
            row.update({"energy_j": 0.0, "energy_compute_j": 0.0, "energy_radio_j": 0.0}
                       | drop.energy, sim_radio=math.nan)
            row["sim_finish"] = drop.time - schedule.start
            client_rows.append(row)
            continue
        timing, result = schedule.clients[cid], results[cid]
        row.update(num_samples=result.num_samples, client_state_bytes=result.state_bytes,
                   dropped=False, drop_reason="", **bytes_by_kind(algo, timing.bytes))
        row.update(sim_compute=timing.compute, sim_upload=timing.upload,
                   sim_download=timing.download, sim_wait=timing.wait, sim_queue=timing.queue,
                   sim_idle=schedule.end - timing.finish, sim_radio=timing.radio)
        row.update(client_energy(timing, world.profiles[cid]))
        for metric in per_client:
            row.update(pooled(metric, [result.metrics, at_server.get(cid, {})]))
        row["sim_finish"] = timing.finish - schedule.start
        client_rows.append(row)

    kept = [r for r in client_rows if not r["dropped"]]
    row = {"round": rnd, "participants": len(kept), "dropped": len(client_rows) - len(kept)}
    # Local iterations that counted: those of clients that finished the round.
    row["client_steps"] = sum(a.stop - a.first for a in schedule.actions
                              if isinstance(a, Segment) and a.cid not in schedule.dropped)
    for kind in [*(k.name for k in algo.byte_kinds), "total_bytes",
                 *(t.name for t in algo.byte_totals)]:
        row[kind] = sum(r[kind] for r in client_rows)
    for part in ("energy_j", "energy_compute_j", "energy_radio_j"):
        row[part] = sum(r[part] for r in client_rows)
    # Every measurement of the round: the clients', then the server's per client,
    # then the server's own.
    sources = [r.metrics for r in results.values()] + list(at_server.values()) + \
        [server_out["metrics"]]
    for metric in metrics:
        if metric.per_round == "client_mean":
            measured = [r for r in kept if not math.isnan(r[metric.name])]
            row[metric.name] = _mean([r[metric.name] for r in measured])
            if metric.count:
                row[metric.count] = sum(r[metric.count] for r in measured)
        else:
            row.update(pooled(metric, sources))
    row.update(
        sim_round_time=schedule.duration,
        sim_server_busy=schedule.server_busy,
        server_state_bytes=server_out["state_bytes"],
        client_state_bytes_max=max((r["client_state_bytes"] for r in kept), default=0),
    )
    return row, client_rows
