"""Memory of the whole process tree of ``raysage simulate``, by process.

W1, the workload of the memory target: 200 clients x 100 synthetic samples,
the ``cnn`` model, FedAvg, SGD lr 0.05, batch 20, 3 rounds, on Ray with the
default resources. The command runs as a user runs it, in a subprocess; a
sampler thread reads the PSS (shared pages split between the processes that
map them) of every process in its tree and keeps the peak of the sum.

    .venv/bin/python benchmarks/bench_memory.py               # W1
    .venv/bin/python benchmarks/bench_memory.py -- --algorithm fsl_sage --clients 10000 \
        --participation 0.1 --rounds 3                        # any simulate flags

It prints the peak summed PSS, the PSS of each process at that moment
(grouped by role: driver, client workers, server, Ray's own processes), the
host time per round, and the disk the run folder took.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

MIB = 2**20
W1 = ["--algorithm", "fedavg", "--model", "cnn", "--dataset", "synthetic", "--clients", "200",
      "--samples-per-client", "100", "--rounds", "3", "--batch-size", "20",
      "--client-optimizer", "sgd", "--client-lr", "0.05", "--server-optimizer", "sgd",
      "--server-lr", "0.05", "--client-weight-decay", "0", "--server-weight-decay", "0"]


def role(proc: psutil.Process, driver: int) -> str:
    """A readable role for each process of the tree."""
    if proc.pid == driver:
        return "driver"
    try:
        cmd = " ".join(proc.cmdline())
        name = proc.name()
    except psutil.Error:
        return "?"
    for marker, label in (("ClientRuntime", "client worker"), ("ServerRuntime", "server"),
                          ("gcs_server", "gcs"), ("raylet", "raylet"),
                          ("dashboard/agent", "dashboard agent"),
                          ("dashboard.py", "dashboard"), ("runtime_env", "runtime env agent"),
                          ("log_monitor", "log monitor"), ("monitor.py", "monitor"),
                          ("default_worker", "idle ray worker")):
        if marker in cmd or marker in name:
            return label
    return name


class Sampler:
    def __init__(self, pid: int, interval: float = 0.25):
        self.pid, self.interval = pid, interval
        self.peak, self.breakdown = 0, []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def sample(self) -> None:
        try:
            root = psutil.Process(self.pid)
            procs = [root] + root.children(recursive=True)
        except psutil.NoSuchProcess:
            return
        rows = []
        for proc in procs:
            try:
                rows.append((role(proc, self.pid), proc.memory_full_info().pss))
            except psutil.Error:
                pass
        total = sum(p for _, p in rows)
        if total > self.peak:
            self.peak, self.breakdown = total, rows

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.sample()

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def disk_usage(path: Path) -> int:
    """Bytes the files under path occupy on disk (sparse files count what they use)."""
    return sum(p.stat().st_blocks * 512 for p in path.rglob("*") if p.is_file())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("flags", nargs="*", help="simulate flags after --, instead of W1's")
    args = parser.parse_args()
    flags = args.flags or W1
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "run"
        cmd = [sys.executable, "-m", "raysage.cli", "simulate", *flags, "--out", str(out)]
        print("$ raysage simulate " + " ".join(flags), flush=True)
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        with Sampler(proc.pid) as sampler:
            _, err = proc.communicate()
        elapsed = time.perf_counter() - t0
        if proc.returncode != 0:
            sys.exit(f"simulate failed ({proc.returncode}):\n{err[-2000:]}")
        import pyarrow.parquet as pq

        rounds = pq.read_table(out / "rounds.parquet").to_pylist()
        summary = json.loads((out / "summary.json").read_text())
        disk = disk_usage(out)
    by_role: dict[str, list[int]] = {}
    for name, pss in sampler.breakdown:
        by_role.setdefault(name, []).append(pss)
    print(f"peak PSS of the whole tree: {sampler.peak / MIB:.0f} MiB")
    for name, values in sorted(by_role.items(), key=lambda kv: -sum(kv[1])):
        each = ", ".join(f"{v / MIB:.0f}" for v in values)
        print(f"  {name:<18} {sum(values) / MIB:7.0f} MiB  ({len(values)}: {each})")
    walls = [r["wall_round_time"] for r in rounds]
    steps = sum(r["client_steps"] for r in rounds)
    print("host time per round: " + ", ".join(f"{w:.2f}" for w in walls) + " s"
          f"; per client-step {sum(walls) / max(steps, 1) * 1e3:.2f} ms over {steps} steps")
    print(f"start-up {summary['startup_s']:.1f} s, whole command {elapsed:.1f} s; "
          f"final accuracy {summary['final_accuracy']:.4f}; run folder on disk {disk / MIB:.1f} MiB")


if __name__ == "__main__":
    main()
