"""A client's energy in a round, from its simulated compute, bytes and radio time.

    energy = FLOPs * joules_per_flop                          (compute)
           + bytes_up * joules_per_byte_up
           + bytes_down * joules_per_byte_down
           + radio_seconds * wait_watts                       (radio)

where radio_seconds is the time the client sends, receives, or waits with its
radio on for a server reply it cannot go on without (the queue and service
time of the uploads it waits on). This is the linear power model of Huang et
al. (MobiSys 2012) for the radio, whose base power beta is ``wait_watts``,
and power-over-throughput for compute; the presets' values and their
sources are in :mod:`raysage.netsim.profiles`. A client idle after it
finished its round is not counted: a device can sleep then.
"""

from __future__ import annotations

from .planner import ClientTiming
from .profiles import DeviceProfile


def client_energy(timing: ClientTiming, profile: DeviceProfile) -> dict[str, float]:
    """Joules of one client's round: compute, radio and their sum."""
    compute = timing.compute * profile.compute_flops * profile.joules_per_flop
    radio = (timing.sent * profile.joules_per_byte_up
             + timing.received * profile.joules_per_byte_down
             + timing.radio * profile.wait_watts)
    return {"energy_j": compute + radio, "energy_compute_j": compute, "energy_radio_j": radio}


def energy_until(timing: ClientTiming, profile: DeviceProfile, t: float) -> dict[str, float]:
    """Joules a client had spent by time t (it dropped then): bytes exactly, compute
    and radio time in proportion to the part of its round it had run."""
    whole = client_energy(timing, profile)
    span = timing.finish - timing.start
    share = min(1.0, max(0.0, (t - timing.start) / span)) if span > 0 else 1.0
    sent, received = timing.sent_received_before(t)
    compute = whole["energy_compute_j"] * share
    radio = (sent * profile.joules_per_byte_up + received * profile.joules_per_byte_down
             + timing.radio * share * profile.wait_watts)
    return {"energy_j": compute + radio, "energy_compute_j": compute, "energy_radio_j": radio}
