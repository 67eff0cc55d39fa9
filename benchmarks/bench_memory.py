"""Memory of the whole process tree of ``raysage simulate``, by process.

W1, the workload of the memory target: 200 clients x 100 synthetic samples,
the ``cnn`` model, FedAvg, SGD lr 0.05, batch 20, 3 rounds, on Ray with the
default resources. The command runs as a user runs it, in a subprocess; a
sampler thread reads the PSS (shared pages split between the processes that
map them) of every process in its tree, keeps the peak of the sum, and the
peak disk use of the run folder (spilled client state and checkpoints).

    .venv/bin/python benchmarks/bench_memory.py               # W1
    .venv/bin/python benchmarks/bench_memory.py -- --algorithm fsl_sage --clients 10000 \\
        --participation 0.1 --rounds 3                        # any simulate flags

It prints the peak summed PSS, the PSS of each process at that moment
(grouped by role: driver, client workers, server, Ray's own processes), the
host time per round and per client-step, and the disk the run folder took.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

MIB, GIB = 2**20, 2**30
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
                          ("raysage.engine.world", "model facts (start-up)"),
                          ("default_worker", "idle ray worker")):
        if marker in cmd or marker in name:
            return label
    return name


def disk_usage(path: Path) -> int:
    """Bytes the files under path occupy on disk (sparse files count what they use)."""
    total = 0
    for p in path.rglob("*"):
        try:
            if p.is_file():
                total += p.stat().st_blocks * 512
        except OSError:    # a file moved or removed while we looked
            pass
    return total


class Sampler:
    def __init__(self, pid: int, folder: Path, interval: float = 0.25):
        self.pid, self.folder, self.interval = pid, folder, interval
        self.peak, self.breakdown, self.peak_disk = 0, [], 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._ticks = 0

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
        self._ticks += 1
        if self._ticks % 8 == 0 and self.folder.exists():    # disk: every 2 s
            self.peak_disk = max(self.peak_disk, disk_usage(self.folder))

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.sample()

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def _absolute_paths(cmd: list[str]) -> list[str]:
    """Path flags made absolute: a run started elsewhere must find the same files."""
    out = list(cmd)
    for i, arg in enumerate(out):
        for flag in ("--data-dir", "--config"):
            if arg == flag and i + 1 < len(out):
                out[i + 1] = str(Path(out[i + 1]).resolve())
            elif arg.startswith(flag + "="):
                out[i] = f"{flag}={Path(arg[len(flag) + 1:]).resolve()}"
    return out


def measure(flags: list[str], python: str = sys.executable, tree: str | None = None) -> dict:
    """Run ``raysage simulate FLAGS`` and measure it; returns the figures.

    ``tree``: a checkout of another commit to run instead of this one (its
    ``raysage`` is imported first, by the driver and by every Ray worker).
    """
    # Beside the repository, not in /tmp: spilled state and checkpoints should land
    # on the disk a user's run folder would (and stay out of git: .gitignore).
    with tempfile.TemporaryDirectory(dir=".", prefix=".bench-") as tmp:
        out = Path(tmp).resolve() / "run"
        cmd = [python, "-m", "raysage.cli", "simulate", *flags, "--out", str(out)]
        env = cwd = None
        if tree is not None:
            # Ray's workers inherit PYTHONPATH; the working directory must not hold
            # this checkout's package, which `-m` would import first.
            env = {**os.environ, "PYTHONPATH": str(Path(tree).resolve())}
            cwd = tmp
            cmd = _absolute_paths(cmd)
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                                env=env, cwd=cwd)
        with Sampler(proc.pid, out) as sampler:
            _, err = proc.communicate()
        elapsed = time.perf_counter() - t0
        if proc.returncode != 0:
            raise SystemExit(f"simulate failed ({proc.returncode}):\n{err[-2000:]}")
        import pyarrow.parquet as pq

        rounds = pq.read_table(out / "rounds.parquet").to_pylist()
        summary = json.loads((out / "summary.json").read_text())
        final_disk = disk_usage(out)
    by_role: dict[str, list[int]] = {}
    for name, pss in sampler.breakdown:
        by_role.setdefault(name, []).append(pss)
    walls = [r["wall_round_time"] for r in rounds]
    steps = [r["client_steps"] for r in rounds]
    later = sum(walls[1:]) / max(sum(steps[1:]), 1) if len(rounds) > 1 else None
    return {"peak_pss": sampler.peak, "by_role": by_role, "walls": walls, "steps": steps,
            "per_step": sum(walls) / max(sum(steps), 1), "per_step_later": later,
            "startup": summary["startup_s"], "elapsed": elapsed,
            "accuracy": summary["final_accuracy"], "peak_disk": sampler.peak_disk,
            "final_disk": final_disk}


def report(m: dict) -> None:
    print(f"peak PSS of the whole tree: {m['peak_pss'] / MIB:.0f} MiB")
    for name, values in sorted(m["by_role"].items(), key=lambda kv: -sum(kv[1])):
        each = ", ".join(f"{v / MIB:.0f}" for v in values)
        print(f"  {name:<22} {sum(values) / MIB:7.0f} MiB  ({len(values)}: {each})")
    later = (f"; rounds 1+: {m['per_step_later'] * 1e3:.2f} ms" if m["per_step_later"] else "")
    print("host time per round: " + ", ".join(f"{w:.2f}" for w in m["walls"]) + " s"
          f"; per client-step {m['per_step'] * 1e3:.2f} ms over {sum(m['steps'])} steps{later}")
    print(f"start-up {m['startup']:.1f} s, whole command {m['elapsed']:.1f} s; final accuracy "
          f"{m['accuracy']:.4f}; disk: peak {m['peak_disk'] / MIB:.1f} MiB during the run "
          f"(spill and checkpoints), {m['final_disk'] / MIB:.1f} MiB left in the run folder")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("flags", nargs="*", help="simulate flags after --, instead of W1's")
    args = parser.parse_args()
    flags = args.flags or W1
    print("$ raysage simulate " + " ".join(flags), flush=True)
    report(measure(flags))


if __name__ == "__main__":
    main()
