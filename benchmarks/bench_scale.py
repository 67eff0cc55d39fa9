"""Scale: 10,000 and 100,000 registered clients on one laptop, and host time per
client-step as the registered clients grow at a fixed number of participants.

    .venv/bin/python benchmarks/bench_scale.py                 # all three studies
    .venv/bin/python benchmarks/bench_scale.py --only flat     # one of: 10k, 100k, flat

* ``10k``: 10,000 clients at 10% participation, 100 synthetic samples each, 3
  rounds, FedAvg and FSL-SAGE (the defaults otherwise: cnn, Adam, batch 20).
* ``100k``: 100,000 registered clients at 1% participation, FedAvg, 20 samples
  each, 2 rounds.
* ``flat``: FedAvg with 10 participants a round, 100 samples each, 4 rounds, at
  10, 100, 1,000 and 10,000 registered clients; host time per client-step of
  rounds 1-3 (round 0 also pays for starting the actors' working sets).

For each run it prints the peak PSS of the process tree, the peak disk use of
the run folder, and the host time per client-step (see bench_memory.py).
"""

from __future__ import annotations

import argparse

from bench_memory import MIB, measure, report

RUNS = {
    "10k": [["--algorithm", algorithm, "--clients", "10000", "--participation", "0.1",
             "--samples-per-client", "100", "--rounds", "3"]
            for algorithm in ("fedavg", "fsl_sage")],
    "100k": [["--algorithm", "fedavg", "--clients", "100000", "--participation", "0.01",
              "--samples-per-client", "20", "--rounds", "2"]],
}
FLAT_CLIENTS = (10, 100, 1000, 10000)
FLAT_PARTICIPANTS = 10


def flat() -> None:
    rows = []
    for clients in FLAT_CLIENTS:
        flags = ["--algorithm", "fedavg", "--clients", str(clients),
                 "--participation", str(FLAT_PARTICIPANTS / clients),
                 "--samples-per-client", "100", "--rounds", "4"]
        print("$ raysage simulate " + " ".join(flags), flush=True)
        m = measure(flags)
        rows.append((clients, m))
        print(f"  {clients:>6} clients: {m['per_step_later'] * 1e3:.2f} ms per client-step "
              f"(rounds 1-3), peak {m['peak_pss'] / MIB:.0f} MiB", flush=True)
    base = min(m["per_step_later"] for _, m in rows)
    spread = max(m["per_step_later"] for _, m in rows) / base - 1
    print(f"host time per client-step from {FLAT_CLIENTS[0]} to {FLAT_CLIENTS[-1]} registered "
          f"clients ({FLAT_PARTICIPANTS} taking part a round): within {spread:.0%} of the "
          "fastest")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=("10k", "100k", "flat"))
    args = parser.parse_args()
    for name in ("10k", "100k", "flat"):
        if args.only not in (None, name):
            continue
        if name == "flat":
            flat()
            continue
        for flags in RUNS[name]:
            print("$ raysage simulate " + " ".join(flags), flush=True)
            report(measure(flags))
            print(flush=True)


if __name__ == "__main__":
    main()
