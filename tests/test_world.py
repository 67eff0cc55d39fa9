"""The simulated world against closed forms: links, stragglers, availability, policies."""

from __future__ import annotations

import math

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from raysage.config import build_config
from raysage.engine.orchestrator import build_world, plan, simulate
from raysage.errors import ConfigError, DataError
from raysage.netsim.profiles import MBIT, PRESETS, client_profiles, read_trace

QUIET = {"announce": lambda line: None}


def test_one_client_split_learning_round_time_closed_form():
    cfg = build_config({"algorithm": "sl", "clients": 1, "samples_per_client": 60,
                        "batch_size": 20, "profile": "4g-mobile", "availability": 1.0})
    world = build_world(cfg)
    c, s, d = world.algorithm.costs, world.algorithm.sizes, PRESETS["4g-mobile"]
    b = 20
    per_batch = ((c.client_forward + c.client_backward) * b / d.compute_flops
                 + 2 * d.latency
                 + (s.smashed_per_sample + 8) * b / d.uplink
                 + c.server_step * b / cfg.server_flops
                 + s.smashed_per_sample * b / d.downlink)
    # x_c comes from the server at the start and goes back at the end (the hand-over,
    # which the server holds between turns even when one client takes them all).
    hand_over = 2 * d.latency + s.client / d.downlink + s.client / d.uplink
    assert world.plan(0, 0.0).duration == pytest.approx(3 * per_batch + hand_over, rel=1e-12)


def test_presets_are_named_and_ordered_by_speed():
    assert {"datacenter", "wifi", "4g-mobile", "heterogeneous"} <= set(PRESETS)
    dc, wifi, lte = PRESETS["datacenter"], PRESETS["wifi"], PRESETS["4g-mobile"]
    assert dc.compute_flops > wifi.compute_flops > lte.compute_flops
    assert dc.uplink > wifi.uplink > lte.uplink and dc.latency < wifi.latency < lte.latency


def test_stragglers_spread_compute_deterministically():
    logn = client_profiles("uniform", 200, 3, stragglers="lognormal", straggler_param=0.5)
    assert logn == client_profiles("uniform", 200, 3, stragglers="lognormal", straggler_param=0.5)
    rates = sorted(p.compute_flops for p in logn)
    assert rates[0] < PRESETS["uniform"].compute_flops < rates[-1]
    pareto = [p.compute_flops for p in client_profiles("uniform", 200, 3, stragglers="pareto",
                                                       straggler_param=1.5)]
    # Pareto slowdowns are >= 1: nobody is faster than the profile, some are far slower.
    assert max(pareto) <= PRESETS["uniform"].compute_flops and min(pareto) < max(pareto) / 10


def write_trace(path, rows):
    header = "compute_flops,uplink_mbps,downlink_mbps,latency_ms,availability\n"
    path.write_text(header + "".join(",".join(map(str, r)) + "\n" for r in rows))
    return path


def test_trace_file_csv_and_parquet(tmp_path):
    csv = write_trace(tmp_path / "t.csv", [(1e9, 8, 16, 40, 0.5), (2e9, 80, 160, 4, 1)])
    profiles = client_profiles("uniform", 3, 0, trace=str(csv))
    assert profiles[0].uplink == 8 * MBIT and profiles[0].latency == 0.04
    assert profiles[0].availability == 0.5 and profiles[1].compute_flops == 2e9
    assert profiles[2] == profiles[0]          # client i takes row i mod rows
    table = pa.table({"compute_flops": [1e9], "uplink_mbps": [8.0], "downlink_mbps": [16.0],
                      "latency_ms": [40.0]})
    pq.write_table(table, tmp_path / "t.parquet")
    (only,) = read_trace(tmp_path / "t.parquet")
    assert only.availability == 1.0 and only.downlink == 16 * MBIT


@pytest.mark.parametrize("row,message", [
    ((1e9, "fast", 16, 40, 1), "row 2, column 'uplink_mbps': 'fast' is not a number"),
    ((1e9, 8, -1, 40, 1), "row 2, column 'downlink_mbps': '-1' must be > 0"),
    ((1e9, 8, 16, 40, 1.5), "row 2, column 'availability': '1.5' must be >= 0 and <= 1"),
])
def test_malformed_trace_names_row_and_column(tmp_path, row, message):
    path = write_trace(tmp_path / "bad.csv", [(1e9, 8, 16, 40, 1), row])
    with pytest.raises(DataError, match=message.replace("(", r"\(")):
        read_trace(path)
    (tmp_path / "cols.csv").write_text("compute_flops,uplink_mbps\n1,2\n")
    with pytest.raises(DataError, match="lacks column"):
        read_trace(tmp_path / "cols.csv")


def analytic_fedavg_finish(world, cid):
    """FedAvg: download the model, train, upload it; nothing waits on the server."""
    p, c, s = world.profiles[cid], world.algorithm.costs, world.algorithm.sizes
    whole = s.client + s.server
    samples = len(world.client_indices[cid])
    return (p.latency + whole / p.downlink + c.full_step * samples / p.compute_flops
            + whole / p.uplink + p.latency)


def test_deadline_drops_exactly_the_clients_whose_analytic_finish_exceeds_it(tmp_path):
    fields = {"algorithm": "fedavg", "clients": 12, "samples_per_client": 40,
              "profile": "heterogeneous", "rounds": 1, "test_samples": 50, "backend": "serial"}
    world = build_world(build_config(fields))
    finish = {c: analytic_fedavg_finish(world, c) for c in range(12)}
    deadline = sorted(finish.values())[7] * 1.0001   # between the 8th and 9th finisher
    late = {c for c, t in finish.items() if t > deadline}
    assert len(late) == 4
    result = simulate(build_config(fields | {"round_policy": "deadline", "deadline": deadline,
                                             "out": str(tmp_path / "d")}), **QUIET)
    rows = {r["client"]: r for r in result.clients}
    assert {c for c, r in rows.items() if r["dropped"]} == late
    assert all(rows[c]["drop_reason"] == "deadline" for c in late)
    whole = world.algorithm.sizes.client + world.algorithm.sizes.server
    # A late client's bytes count up to the deadline: the model it received, and its
    # update only if it had started sending it (a message counts once it is under way).
    for c in late:
        p = world.profiles[c]
        upload_start = finish[c] - p.latency - whole / p.uplink
        assert rows[c]["client_model_down"] == whole
        assert rows[c]["client_model_up"] == (whole if upload_start < deadline else 0)
    assert result.rounds[0]["sim_round_time"] == pytest.approx(deadline)
    assert result.rounds[0]["participants"] == 8 and result.rounds[0]["dropped"] == 4


def test_deadline_policy_needs_a_deadline():
    with pytest.raises(ConfigError, match="--deadline"):
        build_config({"round_policy": "deadline"})


def test_availability_and_over_selection():
    base = {"algorithm": "fedavg", "clients": 40, "samples_per_client": 10, "rounds": 3,
            "participation": 0.25}
    reachable = plan(build_config(base | {"availability": 0.3}))
    assert all(r["participants"] <= 12 for r in reachable)       # about 40 x 0.3 reachable
    assert plan(build_config(base | {"availability": 0.3})) == reachable
    over = plan(build_config(base | {"round_policy": "over_selection", "over_selection": 0.5,
                                     "profile": "heterogeneous"}))
    # 10 wanted, 15 sampled, the 5 slowest dropped.
    assert [(r["participants"], r["dropped"]) for r in over] == [(10, 5)] * 3


def test_dropout_loses_the_work_but_counts_the_bytes(tmp_path):
    result = simulate(build_config({
        "algorithm": "splitfed_v2", "clients": 6, "samples_per_client": 40, "rounds": 2,
        "dropout": 0.5, "test_samples": 50, "backend": "serial", "out": str(tmp_path / "x")}),
        **QUIET)
    dropped = [r for r in result.clients if r["dropped"]]
    assert dropped and all(r["drop_reason"] == "dropout" for r in dropped)
    assert all(r["num_samples"] == 0 and r["total_bytes"] > 0 for r in dropped)
    assert all(math.isnan(r["sim_compute"]) for r in dropped)
    everyone = simulate(build_config({
        "algorithm": "fedavg", "clients": 3, "samples_per_client": 20, "rounds": 1,
        "dropout": 1.0, "test_samples": 50, "backend": "serial", "out": str(tmp_path / "y")}),
        **QUIET)
    assert everyone.rounds[0]["participants"] == 0 and everyone.rounds[0]["dropped"] == 3


def test_a_world_where_no_client_could_ever_take_part_is_refused(tmp_path):
    from typer.testing import CliRunner

    from raysage.cli import app

    # Clients 0 and 1 take rows 1 and 2, both never reachable; row 3 is not used.
    trace = write_trace(tmp_path / "off.csv", [(1e9, 8, 16, 40, 0), (2e9, 8, 16, 40, 0),
                                               (1e9, 8, 16, 40, 1)])
    expected = (f"no client could ever take part: profile trace {trace} gives every one of the "
                "2 clients availability 0 (column 'availability'); raise it above 0 in some rows")
    with pytest.raises(ConfigError) as refused:
        plan(build_config({"clients": 2, "profile_trace": str(trace), "rounds": 1}))
    assert str(refused.value) == expected
    out = tmp_path / "run"
    result = CliRunner().invoke(app, ["simulate", "--clients", "2", "--profile-trace", str(trace),
                                      "--backend", "serial", "--rounds", "1", "--out", str(out)])
    assert result.exit_code == 2
    assert [line for line in result.output.splitlines() if line] == [f"error: {expected}"]
    assert not out.exists()
    with pytest.raises(ConfigError, match="'availability' = 0.0 must be greater than 0"):
        build_config({"availability": 0})
    # One client that can take part is enough.
    rows = plan(build_config({"clients": 3, "profile_trace": str(trace), "rounds": 1}))
    assert rows[0]["participants"] == 1
