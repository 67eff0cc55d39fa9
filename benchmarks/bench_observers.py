"""Host cost of the observers: estimate quality (on by default) and leakage (off by default).

    .venv/bin/python benchmarks/bench_observers.py               # FSL-SAGE
    .venv/bin/python benchmarks/bench_observers.py sl            # any algorithm

One process, serial backend, one torch thread: 20 clients of 100 synthetic
samples, the `cnn`, 3 rounds, the defaults otherwise. Each setting runs
``--repeats`` times after one warm-up run (which pays for imports); it prints
the fastest wall time per setting and the observers' cost over "neither".
Run it on an idle machine: it measures host time.
"""

from __future__ import annotations

import argparse
import tempfile
import time

SETTINGS = {
    "both": {"leakage_uploads": 2},
    "estimate quality only (default)": {"leakage_uploads": 0},
    "leakage only": {"estimate_quality": False, "leakage_uploads": 2},
    "neither": {"estimate_quality": False, "leakage_uploads": 0},
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("algorithm", nargs="?", default="fsl_sage")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    import torch

    from raysage.config import load_config
    from raysage.engine.orchestrator import simulate

    torch.set_num_threads(1)

    def run(**observers) -> float:
        with tempfile.TemporaryDirectory(prefix="bench-observers-") as folder:
            cfg = load_config(None, algorithm=args.algorithm, clients=20, rounds=3,
                              backend="serial", checkpoint_every=0, out=f"{folder}/run",
                              **observers)
            start = time.perf_counter()
            simulate(cfg, announce=lambda line: None)
            return time.perf_counter() - start

    run()   # warm-up: imports and first-use costs
    best = {name: min(run(**observers) for _ in range(args.repeats))
            for name, observers in SETTINGS.items()}
    base = best["neither"]
    print(f"{args.algorithm}: 20 clients x 100 samples, cnn, 3 rounds, serial, 1 thread")
    for name, seconds in best.items():
        print(f"  {name:24s} {seconds:6.2f} s  ({(seconds / base - 1) * 100:+.0f}% over neither)")


if __name__ == "__main__":
    main()
