"""The rows a run writes: one per round (rounds.parquet), one per client and round
(clients.parquet), and the dry run's rows of bytes and simulated time."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from ..netsim.planner import RoundSchedule, Segment
from .world import World

# Byte kinds in a fixed order so every row has every column.
BYTE_KINDS = ("smashed_up", "labels_up", "grad_down", "client_model_up", "client_model_down",
              "aux_up", "aux_down", "server_model")


def _mean(values: list[float]) -> float:
    return float(np.mean(values)) if values else math.nan


def bytes_by_kind(kinds: dict[str, int]) -> dict[str, int]:
    """Every byte kind as a column, plus ``total_bytes`` and ``paper_total_bytes``
    (all but labels, as the FSL-SAGE paper counts)."""
    row = {kind: kinds.get(kind, 0) for kind in BYTE_KINDS}
    row["total_bytes"] = sum(kinds.values())
    row["paper_total_bytes"] = row["total_bytes"] - row["labels_up"]
    return row


def estimate_quality(*sums: dict[str, float]) -> dict[str, float]:
    """Mean cosine and NMSE of the gradient stand-in against the true cut-layer
    gradient over the measured uploads (measured by the client or the server)."""
    measured = sum(m.get("estimate_measured", 0) for m in sums)
    if not measured:
        return {"estimate_cosine": math.nan, "estimate_nmse": math.nan, "estimate_uploads": 0}
    return {"estimate_cosine": sum(m.get("estimate_cosine_sum", 0.0) for m in sums) / measured,
            "estimate_nmse": sum(m.get("estimate_nmse_sum", 0.0) for m in sums) / measured,
            "estimate_uploads": int(measured)}


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
        rows.append({"round": rnd, "participants": len(schedule.clients),
                     "dropped": len(schedule.dropped), **bytes_by_kind(kinds),
                     "sim_round_time": schedule.duration, "sim_time": sim_time})
    return rows


def round_rows(rnd: int, schedule: RoundSchedule, results: dict[int, Any],
               server_out: dict[str, Any], owner: list[int]) -> tuple[dict, list[dict]]:
    """Turn a round's schedule and outcomes into one round row and its client rows."""
    client_rows = []
    for cid in sorted(set(schedule.clients) | set(schedule.dropped)):
        row = {"round": rnd, "client": cid, "worker": owner[cid]}
        drop = schedule.dropped.get(cid)
        if drop is not None:
            # Its work is lost; what it had sent and received by then still counts.
            row.update(num_samples=0, client_state_bytes=0, dropped=True,
                       drop_reason=drop.reason, **bytes_by_kind(drop.bytes))
            row.update({name: math.nan for name in
                        ("sim_compute", "sim_upload", "sim_download", "sim_wait", "sim_queue",
                         "sim_idle", "train_loss", "nmse_before", "nmse_after",
                         "estimate_cosine", "estimate_nmse")})
            row["estimate_uploads"] = 0
            row["sim_finish"] = drop.time - schedule.start
            client_rows.append(row)
            continue
        timing, result = schedule.clients[cid], results[cid]
        metrics = result.metrics
        row.update(num_samples=result.num_samples, client_state_bytes=result.state_bytes,
                   dropped=False, drop_reason="", **bytes_by_kind(timing.bytes))
        row.update(sim_compute=timing.compute, sim_upload=timing.upload,
                   sim_download=timing.download, sim_wait=timing.wait, sim_queue=timing.queue,
                   sim_idle=schedule.end - timing.finish,
                   train_loss=metrics.get("train_loss_sum", math.nan)
                   / max(metrics.get("train_samples", 0), 1))
        aligned = metrics.get("alignments", 0)
        row["nmse_before"] = metrics["nmse_before_sum"] / aligned if aligned else math.nan
        row["nmse_after"] = metrics["nmse_after_sum"] / aligned if aligned else math.nan
        row.update(estimate_quality(metrics, server_out["client_metrics"].get(cid, {})))
        row["sim_finish"] = timing.finish - schedule.start
        client_rows.append(row)

    metrics = server_out["metrics"]
    kept = [r for r in client_rows if not r["dropped"]]
    aligned_rows = [r for r in kept if not math.isnan(r["nmse_before"])]
    train_loss = sum(r.metrics.get("train_loss_sum", 0.0) for r in results.values())
    train_samples = sum(r.metrics.get("train_samples", 0) for r in results.values())
    row = {"round": rnd, "participants": len(kept), "dropped": len(client_rows) - len(kept)}
    # Local iterations that counted: those of clients that finished the round.
    row["client_steps"] = sum(a.stop - a.first for a in schedule.actions
                              if isinstance(a, Segment) and a.cid not in schedule.dropped)
    row.update({kind: sum(r[kind] for r in client_rows) for kind in BYTE_KINDS})
    row["total_bytes"] = sum(r["total_bytes"] for r in client_rows)
    row["paper_total_bytes"] = sum(r["paper_total_bytes"] for r in client_rows)
    row.update(
        train_loss=train_loss / train_samples if train_samples else math.nan,
        server_loss=(metrics["server_loss_sum"] / metrics["server_samples"]
                     if metrics.get("server_samples") else math.nan),
        alignments=len(aligned_rows),
        nmse_before=_mean([r["nmse_before"] for r in aligned_rows]),
        nmse_after=_mean([r["nmse_after"] for r in aligned_rows]),
        **estimate_quality(*[r.metrics for r in results.values()],
                           *server_out["client_metrics"].values()),
        sim_round_time=schedule.duration,
        sim_server_busy=schedule.server_busy,
        server_state_bytes=server_out["state_bytes"],
        client_state_bytes_max=max((r["client_state_bytes"] for r in kept), default=0),
    )
    return row, client_rows
