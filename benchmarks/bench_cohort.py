"""FSL-SAGE's alignment, and whole-model client steps, one client at a time against
stacked across clients.

Alignment: for each x_a and buffer size it aligns the same 32 clients' auxiliary models
(the engine's own ``FSLSage.align``, 30 epochs) one model at a time, unstacked,
and in stacks of 2 to 32 copies, on one torch thread (a worker thread's share of
this machine), and prints the host time per client and the speed-up. The
stacking rule of ``raysage/algorithms/cohort.py`` (STACK_JOB_BYTES, STACK_BYTES)
comes from these figures.

Client steps (``--steps``): W1's local work, 5 SGD steps of the whole `cnn` on
batches of 20, for 32 clients: each client's model in turn (as a worker runs
FedAvg's clients today), against the clients' models stacked (vmap over
``functional_call``, one backward pass, SGD over the stacked tensors), per
client.

    .venv/bin/python benchmarks/bench_cohort.py
    .venv/bin/python benchmarks/bench_cohort.py --steps
    .venv/bin/python benchmarks/bench_cohort.py --epochs 100 --threads 2
"""

from __future__ import annotations

import argparse
import copy
import time

import torch

from raysage.algorithms import ALGORITHMS, cohort
from raysage.algorithms.fsl_sage import Alignment
from raysage.config import build_config

SHAPES = [("cnn", 20), ("cnn", 100), ("simple_conv", 20), ("simple_conv", 128)]
STACK_SIZES = (2, 4, 8, 16, 32)
CLIENTS = 32


def jobs_for(algo, n: int) -> list[Alignment]:
    arch = algo.arch
    torch.manual_seed(0)
    x_s, x_c = arch.make_server(), arch.make_client()
    jobs = []
    for cid in range(CLIENTS):
        x, y = arch.example_batch(n)
        with torch.no_grad():
            h = x_c(x)
        z = algo.true_gradients(x_s, h, y)
        jobs.append(Alignment(algo.initial_aux_model(cid), cid, 0,
                              {"smashed": h.numpy(), "y": y.numpy(), "z": z.numpy()}))
    return jobs


def per_client(algo, jobs, stack: int | None) -> float:
    """Seconds per client: stack None aligns one unstacked model at a time."""
    jobs = [Alignment(copy.deepcopy(j.aux), j.cid, j.rnd, j.targets) for j in jobs]
    saved = cohort.STACK_JOB_BYTES, cohort.STACK_BYTES
    cohort.STACK_JOB_BYTES = -1 if stack is None else float("inf")
    cohort.STACK_BYTES = float("inf")
    try:
        start = time.perf_counter()
        size = 1 if stack is None else stack
        for first in range(0, len(jobs), size):
            algo.align(jobs[first:first + size])
        return (time.perf_counter() - start) / len(jobs)
    finally:
        cohort.STACK_JOB_BYTES, cohort.STACK_BYTES = saved


def client_steps(steps: int = 5, batch: int = 20) -> None:
    import torch.nn.functional as F

    from raysage.algorithms.cohort import Stack
    from raysage.algorithms.optim import Optimizer
    from raysage.models import architecture

    cfg = build_config({"algorithm": "fedavg", "model": "cnn"})
    arch = architecture(cfg, 10)
    torch.manual_seed(0)
    models = [arch.make_full() for _ in range(CLIENTS)]
    x = torch.randn(CLIENTS, steps, batch, 3, 32, 32)
    y = torch.randint(0, 10, (CLIENTS, steps, batch))

    start = time.perf_counter()
    for c, model in enumerate(models):
        optimizer = Optimizer("sgd", model.parameters(), lr=0.05)
        for k in range(steps):
            loss = F.cross_entropy(model(x[c, k]), y[c, k])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    alone = (time.perf_counter() - start) / CLIENTS
    figures = [f"one at a time {alone * 1e3:.1f} ms"]
    for size in STACK_SIZES:
        start = time.perf_counter()
        for first in range(0, CLIENTS, size):
            stack = Stack(models[first:first + size])
            optimizer = Optimizer("sgd", stack.parameters, lr=0.05)
            for k in range(steps):
                logits = stack(x[first:first + size, k])
                loss = F.cross_entropy(logits.flatten(0, 1), y[first:first + size, k].flatten(),
                                       reduction="sum") / batch
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
            stack.write_back()
        t = (time.perf_counter() - start) / CLIENTS
        figures.append(f"{size}: {t * 1e3:.1f} ms ({alone / t:.2f}x)")
    print(f"W1 client round ({steps} SGD steps of the whole cnn, batch {batch}), per client: "
          + "; ".join(figures), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--steps", action="store_true", help="time client steps instead")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.steps:
        client_steps()
        return
    for model, n in SHAPES:
        cfg = build_config({"algorithm": "fsl_sage", "model": model,
                            "align_epochs": args.epochs, "align_batch_size": n})
        algo = ALGORITHMS["fsl_sage"].from_config(cfg, 10)
        jobs = jobs_for(algo, n)
        job_kib = jobs[0].targets["smashed"].nbytes / 1024
        alone = per_client(algo, jobs, None)
        figures = [f"one at a time {alone * 1e3:.1f} ms"]
        for size in STACK_SIZES:
            t = per_client(algo, jobs, size)
            figures.append(f"{size}: {t * 1e3:.1f} ms ({alone / t:.2f}x)")
        print(f"{model}, buffer {n} ({job_kib:.0f} KiB of h a client), "
              f"{args.epochs} epochs, per client: " + "; ".join(figures), flush=True)


if __name__ == "__main__":
    main()
