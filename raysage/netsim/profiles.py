"""Device and link profiles of clients and the server.

Rates are stored in SI base units: FLOP/s for compute, bytes/s for links,
seconds for latency, so the cost model never converts units.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import ConfigError

MBIT = 1e6 / 8  # bytes per second in one Mbit/s


@dataclass(frozen=True)
class DeviceProfile:
    compute_flops: float      # sustained FLOP/s of training kernels
    uplink: float             # bytes/s client -> server
    downlink: float           # bytes/s server -> client
    latency: float            # one-way seconds
    availability: float = 1.0  # probability of being reachable in a round


# A mid-range phone or laptop on a home broadband link: the median device
# that the heterogeneous preset spreads around.
MEDIAN_DEVICE = DeviceProfile(compute_flops=5e10, uplink=20 * MBIT, downlink=100 * MBIT,
                              latency=0.02)

# Log-normal sigma of the heterogeneous preset: sigma 1 puts the 5th and
# 95th percentile devices about 5x slower / faster than the median, the
# spread reported for phones in cross-device FL measurements.
HETEROGENEOUS_SIGMA = 1.0


def client_profiles(preset: str, num_clients: int, seed: int) -> list[DeviceProfile]:
    """One profile per client, assigned deterministically from (seed, preset)."""
    if preset == "uniform":
        return [MEDIAN_DEVICE] * num_clients
    if preset == "heterogeneous":
        rng = np.random.default_rng(np.random.SeedSequence([seed, 0x9E7]))
        compute = rng.lognormal(0.0, HETEROGENEOUS_SIGMA, num_clients)
        link = rng.lognormal(0.0, HETEROGENEOUS_SIGMA, num_clients)
        base = MEDIAN_DEVICE
        return [DeviceProfile(compute_flops=base.compute_flops * float(c),
                              uplink=base.uplink * float(b), downlink=base.downlink * float(b),
                              latency=base.latency)
                for c, b in zip(compute, link)]
    raise ConfigError(f"unknown profile preset '{preset}'; choose uniform or heterogeneous")
