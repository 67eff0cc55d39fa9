"""How much memory and disk a run takes, estimated before any actor starts.

Memory grows with the participants of a round, not with the registered
clients: a worker holds one working set of models per client that is
mid-round at once, the state of the clients it hosts up to a RAM budget
(the rest spills to disk), and its share of nothing else. The server holds
its models, the per-client objects of a round's participants, and its own
per-client state under the same budget.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..errors import RaysageError
from ..data import batch_sizes
from ..algorithms.base import Participant
from .world import World

MIB, GIB = 2**20, 2**30
# Proportional memory of one actor process with torch and Ray's core worker
# imported (about 220 MiB measured on this project's workers, plus headroom).
PROCESS_BYTES = 300 * MIB
# The driver imports Ray, numpy and pyarrow but not torch.
DRIVER_BYTES = 150 * MIB


@dataclass(frozen=True)
class Estimate:
    workers: int
    worker: int            # bytes of each worker: process, working sets, state in RAM
    server: int            # 0 when the algorithm needs no server process
    driver: int
    dataset: int
    budget: int            # RAM for per-client state, per worker and for the server
    spill: int             # per-client state beyond the budgets, on disk
    checkpoints: int       # the run's checkpoints on disk: the last and the one being written

    @property
    def total(self) -> int:
        return self.workers * self.worker + self.server + self.driver + self.dataset

    @property
    def disk(self) -> int:
        return self.spill + self.checkpoints


def estimate(world: World, n_workers: int) -> Estimate:
    cfg, algo, facts = world.cfg, world.algorithm, world.facts
    budget = cfg.state_memory_mib * MIB
    selected = world.selected_per_round()
    per_worker = math.ceil(selected / n_workers)
    # Clients wait for the server mid-round only if some exchange has a reply;
    # otherwise a worker runs one client's round after another on each thread.
    plan = algo.plan_client_round(0, Participant(0, [cfg.batch_size]))
    waits = any(ex.has_reply for ex in plan.exchanges.values()) and plan.after is None
    working_sets = max(per_worker, 1) if waits else cfg.worker_threads
    # Clients that can have state by the end: never more than take part.
    touched = min(cfg.clients, selected * cfg.rounds)
    touched_per_worker = min(math.ceil(cfg.clients / n_workers), per_worker * cfg.rounds)

    client_state = touched_per_worker * facts.client_state_bytes
    worker = PROCESS_BYTES + working_sets * facts.working_set_bytes + min(budget, client_state)
    spill = n_workers * max(0, client_state - budget)
    server = 0
    largest = max(len(ix) for ix in world.client_indices)
    batches = batch_sizes(largest, cfg)
    # A client's server-side state grows by at most what one of its rounds leaves, and
    # the run has selected x rounds client-rounds in all: with 10 of 10,000 clients a
    # round, no client's buffer fills the way one that took part every round would.
    server_state = min(touched * algo.server_client_bytes(batches, cfg.rounds),
                       selected * cfg.rounds * algo.server_client_bytes(batches, 1))
    if algo.has_server:
        server = PROCESS_BYTES + algo.server_model_bytes(selected) + min(budget, server_state)
        spill += max(0, server_state - budget)
    global_bytes = sum(a.nbytes for part in facts.initial_global.values() for a in part.values())
    checkpoints = 0
    if cfg.checkpoint_every:
        # The previous checkpoint's files go only once the next one's manifest is
        # written, so at the peak two checkpoints are on disk together.
        checkpoints = 2 * (touched * facts.client_state_bytes + server_state + global_bytes
                           + algo.server_model_bytes(0))
    data = world.data
    dataset = data.x_train.nbytes + data.y_train.nbytes + data.x_test.nbytes
    # The driver averages in float64 beside the global state it broadcasts.
    driver = DRIVER_BYTES + 3 * global_bytes
    return Estimate(n_workers, worker, server, driver, dataset, budget, spill, checkpoints)


def check_memory(need: Estimate, available: float) -> None:
    if need.total > available:
        server = f", server {need.server / GIB:.2f} GiB" if need.server else ""
        raise RaysageError(
            f"this run needs about {need.total / GIB:.1f} GiB ({need.workers} workers x "
            f"{need.worker / GIB:.2f} GiB{server}, driver {need.driver / GIB:.2f} GiB, data "
            f"{need.dataset / GIB:.2f} GiB) but {available / GIB:.1f} GiB is available; "
            "lower --state-memory-mib, --workers or --participation, or use a smaller "
            "--model or --align-buffer")


def check_disk(need: Estimate, run_dir) -> None:
    """Refuse a run whose spilled state and checkpoints cannot fit where they go."""
    import shutil
    from pathlib import Path

    if not run_dir.is_local or not need.disk:
        return
    place = Path(run_dir.root)
    while not place.exists() and place != place.parent:
        place = place.parent
    free = shutil.disk_usage(place).free
    if need.disk > free:
        raise RaysageError(
            f"this run may write up to {need.disk / GIB:.1f} GiB to {place} (client state "
            f"beyond the RAM budget {need.spill / GIB:.1f} GiB, checkpoints "
            f"{need.checkpoints / GIB:.1f} GiB) but only {free / GIB:.1f} GiB is free; lower "
            "--clients or --participation, raise --state-memory-mib, or set "
            "--checkpoint-every 0")


def describe(need: Estimate) -> str:
    """The start-up line's account of memory and disk."""
    return (f"memory: about {need.total / GIB:.2f} GiB ({need.budget / MIB:.0f} MiB of "
            f"client state in RAM per process); disk: up to {need.disk / GIB:.2f} GiB "
            f"(spill {need.spill / GIB:.2f}, checkpoints {need.checkpoints / GIB:.2f})")
