"""What measuring the bytes against the plan costs: a serial run with and without it.

    .venv/bin/python benchmarks/bench_traffic.py [--repeats 5]

Runs FSL-SAGE and SplitFed v2 (the algorithm with the most messages: an upload
and a reply every iteration) on the embedded synthetic data in-process,
alternating runs with the checks on and with them replaced by no-ops, and
prints the median wall time of each and the time the checks themselves took.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from raysage.config import build_config
from raysage.engine import traffic
from raysage.engine.orchestrator import simulate

CONFIG = dict(clients=20, samples_per_client=100, batch_size=20, rounds=3, backend="serial",
              estimate_quality=False, leakage_uploads=0, test_samples=200, seed=1)


class Timed(traffic.Traffic):
    spent = 0.0
    checks = 0

    def _compare(self, measured, planned, what):
        Timed.checks += 1
        super()._compare(measured, planned, what)

    def _by_kind(self, *args):
        begin = time.perf_counter()
        try:
            return super()._by_kind(*args)
        finally:
            Timed.spent += time.perf_counter() - begin


class Off(traffic.Traffic):
    def broadcast(self, read): pass
    def upload(self, k, arrays): pass
    def reply(self, k, reply, models): pass
    def result(self, states): pass


def run(algorithm: str, cls) -> float:
    import raysage.engine.runtime as runtime

    runtime.Traffic = cls
    with tempfile.TemporaryDirectory() as tmp:
        cfg = build_config(CONFIG | {"algorithm": algorithm, "out": str(Path(tmp) / "run")})
        begin = time.perf_counter()
        simulate(cfg, announce=lambda line: None)
        return time.perf_counter() - begin


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    for algorithm in ("fsl_sage", "splitfed_v2"):
        run(algorithm, Off)                       # warm-up: imports, FLOP counting
        on, off = [], []
        Timed.spent, Timed.checks = 0.0, 0
        for _ in range(args.repeats):
            on.append(run(algorithm, Timed))
            off.append(run(algorithm, Off))
        checks = Timed.checks / args.repeats
        spent = Timed.spent / args.repeats
        print(f"{algorithm}: measured {statistics.median(on):.3f} s, not measured "
              f"{statistics.median(off):.3f} s per run (median of {args.repeats}); "
              f"{checks:.0f} messages checked per run in {spent * 1e3:.2f} ms "
              f"({spent / statistics.median(on) * 100:.3f}% of the run)")


if __name__ == "__main__":
    main()
