"""Device and link profiles of clients and the server.

Rates are stored in SI base units: FLOP/s for compute, bytes/s for links,
seconds for latency, so the cost model never converts units. Trace files
use the units people quote: Mbit/s and milliseconds.
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from ..errors import ConfigError, DataError

MBIT = 1e6 / 8  # bytes per second in one Mbit/s


@dataclass(frozen=True)
class DeviceProfile:
    compute_flops: float      # sustained FLOP/s of training kernels
    uplink: float             # bytes/s client -> server
    downlink: float           # bytes/s server -> client
    latency: float            # one-way seconds
    availability: float = 1.0  # probability of being reachable in a round
    # Energy (see raysage.netsim.energy): joules per FLOP of training, per byte
    # sent and received on top of the radio's base power, and that base power
    # while the radio is on (sending, receiving, or waiting for the server).
    joules_per_flop: float = 0.0
    joules_per_byte_up: float = 0.0
    joules_per_byte_down: float = 0.0
    wait_watts: float = 0.0


# Energy of the presets. Compute: the device class's power while training over
# its sustained FLOP/s. Radio: the linear power model of Huang et al., "A Close
# Examination of Performance and Power Characteristics of 4G LTE Networks"
# (MobiSys 2012, Table 3), P = alpha_u * t_u + alpha_d * t_d + beta, with
# throughputs t in Mbit/s: alpha is energy per bit, beta the base power while
# the radio is active. Per byte: alpha [mW/(Mbit/s)] * 8e-9 J.
_PER_BYTE = 8e-9
WIFI_RADIO = dict(joules_per_byte_up=283.17 * _PER_BYTE, joules_per_byte_down=137.01 * _PER_BYTE,
                  wait_watts=0.13286)
LTE_RADIO = dict(joules_per_byte_up=438.39 * _PER_BYTE, joules_per_byte_down=51.97 * _PER_BYTE,
                 wait_watts=1.28804)
# A server NIC on a data-centre network: about 1 nJ per bit moved (10 GbE
# adapters draw about 10 W at 10 Gbit/s), idle GPU server about 50 W.
WIRED_RADIO = dict(joules_per_byte_up=8e-9, joules_per_byte_down=8e-9, wait_watts=50.0)

# A mid-range phone or laptop on a home broadband link: the median device
# that the heterogeneous preset spreads around. About 5 W while training.
MEDIAN_DEVICE = DeviceProfile(compute_flops=5e10, uplink=20 * MBIT, downlink=100 * MBIT,
                              latency=0.02, joules_per_flop=5.0 / 5e10, **WIFI_RADIO)

PRESETS: dict[str, DeviceProfile] = {
    "uniform": MEDIAN_DEVICE,
    # Silos in one region: GPU-class compute (a 300 W accelerator), 10 Gbit/s,
    # sub-millisecond.
    "datacenter": DeviceProfile(1e13, 10_000 * MBIT, 10_000 * MBIT, 0.0005,
                                joules_per_flop=300.0 / 1e13, **WIRED_RADIO),
    # A laptop on home Wi-Fi to a cloud region (a 28 W mobile processor).
    "wifi": DeviceProfile(1e11, 50 * MBIT, 100 * MBIT, 0.015, joules_per_flop=28.0 / 1e11,
                          **WIFI_RADIO),
    # A phone on LTE: slow, asymmetric, far, and not always reachable (3 W).
    "4g-mobile": DeviceProfile(2e10, 5 * MBIT, 20 * MBIT, 0.05, availability=0.9,
                               joules_per_flop=3.0 / 2e10, **LTE_RADIO),
}
PRESETS["heterogeneous"] = MEDIAN_DEVICE

# Log-normal sigma of the heterogeneous preset: sigma 1 puts the 5th and
# 95th percentile devices about 5x slower / faster than the median, the
# spread reported for phones in cross-device FL measurements.
HETEROGENEOUS_SIGMA = 1.0

TRACE_COLUMNS = ("compute_flops", "uplink_mbps", "downlink_mbps", "latency_ms", "availability")
# Optional; a trace without them takes the median device's.
ENERGY_COLUMNS = ("joules_per_flop", "joules_per_byte_up", "joules_per_byte_down", "wait_watts")


def straggler_factors(dist: str, param: float, num_clients: int, seed: int) -> np.ndarray:
    """Per-client multipliers of the compute rate (1 = the profile's rate).

    lognormal: exp(N(0, param^2)), a spread around the median; pareto: one
    over a Pareto(shape=param) slowdown >= 1, so a heavy tail of very slow
    devices and none faster than the profile.
    """
    rng = np.random.default_rng(np.random.SeedSequence([seed, 0x57A6]))
    if dist == "none":
        return np.ones(num_clients)
    if dist == "lognormal":
        return rng.lognormal(0.0, param, num_clients)
    if dist == "pareto":
        return 1.0 / (1.0 + rng.pareto(param, num_clients))
    raise ConfigError(f"unknown straggler distribution '{dist}'; choose none, lognormal or pareto")


def client_profiles(preset: str, num_clients: int, seed: int, *, trace: str | None = None,
                    stragglers: str = "none", straggler_param: float = 1.0,
                    availability: float | None = None) -> list[DeviceProfile]:
    """One profile per client, assigned deterministically.

    From a trace, client i takes row i mod rows; otherwise from the preset
    (the heterogeneous preset spreads compute and bandwidth log-normally).
    Stragglers then scale the compute rates, and ``availability``, when
    given, replaces every profile's own.
    """
    if trace is not None:
        rows = read_trace(trace)
        profiles = [rows[i % len(rows)] for i in range(num_clients)]
    elif preset == "heterogeneous":
        rng = np.random.default_rng(np.random.SeedSequence([seed, 0x9E7]))
        compute = rng.lognormal(0.0, HETEROGENEOUS_SIGMA, num_clients)
        link = rng.lognormal(0.0, HETEROGENEOUS_SIGMA, num_clients)
        base = MEDIAN_DEVICE
        profiles = [replace(base, compute_flops=base.compute_flops * float(c),
                            uplink=base.uplink * float(b), downlink=base.downlink * float(b))
                    for c, b in zip(compute, link)]
    elif preset in PRESETS:
        profiles = [PRESETS[preset]] * num_clients
    else:
        raise ConfigError(f"unknown profile preset '{preset}'; choose one of: "
                          + ", ".join(PRESETS))
    factors = straggler_factors(stragglers, straggler_param, num_clients, seed)
    profiles = [replace(p, compute_flops=p.compute_flops * float(f))
                for p, f in zip(profiles, factors)]
    if availability is not None:
        profiles = [replace(p, availability=availability) for p in profiles]
    if not any(p.availability > 0 for p in profiles):
        # Every round would have no participant: a run that "succeeds" with nothing.
        source = (f"profile trace {trace} gives every one of the {num_clients} clients "
                  "availability 0 (column 'availability'); raise it above 0 in some rows"
                  if availability is None and trace is not None else
                  f"availability = {availability if availability is not None else 0:g} for every "
                  "client; give --availability above 0")
        raise ConfigError(f"no client could ever take part: {source}")
    return profiles


def _number(path: Path, row: int, column: str, raw, *, low: float, high: float = math.inf,
            open_low: bool = True) -> float:
    where = f"{path} row {row}, column '{column}'"
    try:
        value = float(raw)
    except (TypeError, ValueError):
        raise DataError(f"{where}: {raw!r} is not a number; fix the trace file") from None
    if not math.isfinite(value) or (value <= low if open_low else value < low) or value > high:
        bound = f"> {low:g}" if open_low else f">= {low:g}"
        if high < math.inf:
            bound += f" and <= {high:g}"
        raise DataError(f"{where}: {raw!r} must be {bound}; fix the trace file")
    return value


def read_trace(path: str | Path) -> list[DeviceProfile]:
    """Client profiles from a CSV or Parquet trace, one row per client.

    Columns: compute_flops (FLOP/s), uplink_mbps, downlink_mbps (Mbit/s),
    latency_ms, availability (0..1, optional, default 1), and optionally the
    energy columns joules_per_flop, joules_per_byte_up, joules_per_byte_down and
    wait_watts (default: the median device's). Rows are numbered from 1 as a
    spreadsheet shows data rows (the header is not counted).
    """
    path = Path(path)
    if not path.exists():
        raise DataError(f"profile trace {path} does not exist; pass --profile-trace with a "
                        "CSV or Parquet file")
    try:
        if path.suffix.lower() == ".parquet":
            import pyarrow.parquet as pq

            records = pq.read_table(path).to_pylist()
        else:
            with path.open(newline="") as f:
                records = list(csv.DictReader(f))
    except (OSError, UnicodeDecodeError, csv.Error, ValueError) as exc:
        raise DataError(f"cannot read profile trace {path}: {exc}; "
                        "give a CSV with a header row or a Parquet file") from None
    if not records:
        raise DataError(f"profile trace {path} has no rows; give one row per client")
    missing = [c for c in TRACE_COLUMNS[:4] if c not in records[0]]
    if missing:
        raise DataError(f"profile trace {path} lacks column(s) {', '.join(missing)}; "
                        f"expected columns: {', '.join(TRACE_COLUMNS)}")
    profiles = []
    for i, rec in enumerate(records, start=1):
        profiles.append(DeviceProfile(
            compute_flops=_number(path, i, "compute_flops", rec["compute_flops"], low=0),
            uplink=_number(path, i, "uplink_mbps", rec["uplink_mbps"], low=0) * MBIT,
            downlink=_number(path, i, "downlink_mbps", rec["downlink_mbps"], low=0) * MBIT,
            latency=_number(path, i, "latency_ms", rec["latency_ms"], low=0,
                            open_low=False) / 1000,
            availability=_number(path, i, "availability",
                                 rec.get("availability") if rec.get("availability") not in
                                 (None, "") else 1.0, low=0, high=1, open_low=False),
            **{column: _number(path, i, column, rec[column], low=0, open_low=False)
               if rec.get(column) not in (None, "") else getattr(MEDIAN_DEVICE, column)
               for column in ENERGY_COLUMNS},
        ))
    return profiles
