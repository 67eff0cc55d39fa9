"""The orchestrator: runs rounds on a backend and writes the results.

Per round: sample participants (seeded by round), plan the round on the
simulated clock, put the global state in the object store once, execute
the plan's actions in causal order, average what the algorithm aggregates
in client-id order, let the server finish the round, evaluate, write.
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Callable

import numpy as np

from ..algorithms import ClientState, ModelSizes, algorithm_class
import pyarrow.fs as pafs

from ..algorithms.base import Algorithm, State, state_nbytes, stream_seed
from ..config import LANGUAGE_DATASETS, Config, build_config
from ..data import ArrayDataset, load_dataset, partition
from ..errors import ConfigError, RaysageError
from ..netsim.cost import measure_costs
from ..netsim.planner import RoundSchedule, Segment
from ..netsim.policy import available_clients, plan_with_policy, selection_size
from ..netsim.profiles import DeviceProfile, client_profiles
from ..results import RunFolder, RunWriter
from .backend import ActorFailure, make_backend
from .runtime import (ClientRuntime, ServerRuntime, Setup, architecture, batch_sizes,
                      process_memory)

# Byte kinds in a fixed order so every row has every column.
BYTE_KINDS = ("smashed_up", "labels_up", "grad_down", "client_model_up", "client_model_down",
              "aux_up", "aux_down", "server_model")
SYNTHETIC_SAMPLES_PER_CLIENT = 100
SYNTHETIC_TEST_SAMPLES = 1000
GIB = 2**30


@dataclass
class World:
    """Everything about a simulation that exists before anything runs."""

    cfg: Config
    data: ArrayDataset
    client_indices: list[np.ndarray]
    algorithm: Algorithm
    setup: Setup
    profiles: list[DeviceProfile]

    def eval_clients(self, rnd: int) -> list[int]:
        """Clients whose own models are evaluated: all, or a seeded sample when many."""
        m, sample = self.cfg.clients, self.cfg.eval_clients
        if m <= sample:
            return list(range(m))
        rng = np.random.default_rng(stream_seed(self.cfg.seed, "eval-clients", rnd))
        return sorted(int(c) for c in rng.choice(m, size=sample, replace=False))

    def target_participants(self) -> int:
        return max(1, round(self.cfg.participation * self.cfg.clients))

    def participants(self, rnd: int) -> list[int]:
        """Selected clients: a seeded sample of the reachable ones (more under over-selection)."""
        cfg = self.cfg
        available = available_clients(
            self.profiles, np.random.default_rng(stream_seed(cfg.seed, "available", rnd)))
        count = selection_size(self.target_participants(), cfg.round_policy, cfg.over_selection,
                               cfg.clients)
        if count >= len(available):
            return available
        rng = np.random.default_rng(stream_seed(cfg.seed, "participants", rnd))
        return sorted(available[i] for i in rng.choice(len(available), size=count, replace=False))

    def plan(self, rnd: int, start: float) -> RoundSchedule:
        cfg, algo = self.cfg, self.algorithm

        def make_plans(cids: list[int]):
            return algo.plan_round(rnd, {c: batch_sizes(len(self.client_indices[c]), cfg)
                                         for c in cids})

        selected = self.participants(rnd)
        schedule = plan_with_policy(
            make_plans, selected, {c: self.profiles[c] for c in selected}, cfg.server_flops,
            start, policy=cfg.round_policy, deadline=cfg.deadline,
            keep=self.target_participants(), dropout=cfg.dropout,
            rng=np.random.default_rng(stream_seed(cfg.seed, "drops", rnd)))
        algo.commit_round(rnd, sorted(schedule.clients))
        return schedule


def load_language_data(cfg: Config) -> tuple[ArrayDataset, int | None]:
    from ..data.e2e import (SYNTHETIC_TEST, SYNTHETIC_TRAIN_PER_CLIENT, load_language_dataset,
                            make_tokenizer)

    synthetic = cfg.dataset == "e2e_synthetic"
    per_client = cfg.samples_per_client or (SYNTHETIC_TRAIN_PER_CLIENT if synthetic else None)
    tokenizer = make_tokenizer(cfg.tokenizer, cfg.tokenizer_dir or cfg.weights_dir)
    data = load_language_dataset(
        cfg.dataset, cfg.data_dir, tokenizer, cfg.seq_len,
        num_train=per_client * cfg.clients if per_client else None,
        num_test=cfg.test_samples or (SYNTHETIC_TEST if synthetic else None), seed=cfg.seed,
        max_slots=cfg.e2e_max_slots)
    return data, per_client


def build_world(cfg: Config) -> World:
    """Load data, partition it and build the algorithm; every input error surfaces here."""
    if cfg.dataset in LANGUAGE_DATASETS:
        data, per_client = load_language_data(cfg)
    else:
        synthetic = cfg.dataset == "synthetic"
        per_client = cfg.samples_per_client or (SYNTHETIC_SAMPLES_PER_CLIENT if synthetic
                                                else None)
        data = load_dataset(
            cfg.dataset, cfg.data_dir,
            num_train=per_client * cfg.clients if synthetic else None,
            num_test=cfg.test_samples or (SYNTHETIC_TEST_SAMPLES if synthetic else None),
            seed=cfg.seed)
    # Sequences have no class label; they are split iid, which only needs their count.
    labels = data.y_train if data.y_train.ndim == 1 else np.zeros(len(data.y_train), np.int64)
    indices = partition(labels, cfg.clients, cfg.partition, alpha=cfg.alpha,
                        shards_per_client=cfg.shards_per_client, samples_per_client=per_client,
                        seed=cfg.seed)
    arch = architecture(cfg, data.num_classes)
    sizes, costs = ModelSizes.of(arch), measure_costs(arch)
    setup = Setup(cfg.to_dict(), data.num_classes, tuple(data.mean), tuple(data.std), sizes, costs)
    algorithm = algorithm_class(cfg.algorithm)(cfg, arch, sizes, costs)
    profiles = client_profiles(cfg.profile, cfg.clients, cfg.seed, trace=cfg.profile_trace,
                               stragglers=cfg.stragglers, straggler_param=cfg.straggler_param,
                               availability=cfg.availability)
    return World(cfg, data, indices, algorithm, setup, profiles)


# Unique memory of one Python process with torch and Ray's core worker
# imported, measured on this project's workers (USS about 0.45 GB).
PROCESS_BYTES = 450 * 2**20


def estimate_memory(world: World, n_workers: int) -> dict[str, int]:
    """Bytes the run will hold: per worker (its clients' models and optimizer state),
    the server (its models, optimizer state, per-client copies and buffers), and
    the dataset, held once in the object store."""
    algo, cfg = world.algorithm, world.cfg
    probe = ClientState(0, 0)
    algo.init_client(probe)
    per_client = sum(state_nbytes(m) * (1 + algo.optimizer_copies(
        cfg.aux_optimizer if name == "aux" else cfg.client_optimizer))
        for name, m in probe.models.items())
    clients_per_worker = math.ceil(cfg.clients / n_workers)
    data = world.data
    return {
        "worker": PROCESS_BYTES + clients_per_worker * per_client,
        "server": PROCESS_BYTES + algo.estimated_server_bytes(cfg.clients),
        "dataset": data.x_train.nbytes + data.y_train.nbytes + data.x_test.nbytes,
    }


def check_memory(world: World, n_workers: int, available: float) -> None:
    need = estimate_memory(world, n_workers)
    total = n_workers * need["worker"] + need["server"] + need["dataset"]
    if total > available:
        raise RaysageError(
            f"this run needs about {total / 2**30:.1f} GiB ({n_workers} workers x "
            f"{need['worker'] / 2**30:.2f} GiB, server {need['server'] / 2**30:.2f} GiB, data "
            f"{need['dataset'] / 2**30:.2f} GiB) but {available / 2**30:.1f} GiB is available; "
            "lower --clients or --workers, or use a smaller --model or --align-buffer")


def place_clients(sizes: list[int], workers: int) -> list[int]:
    """Sticky placement: worker of each client, balancing samples (longest first)."""
    load = [0] * workers
    owner = [0] * len(sizes)
    for cid in sorted(range(len(sizes)), key=lambda c: (-sizes[c], c)):
        w = min(range(workers), key=lambda i: (load[i], i))
        owner[cid] = w
        load[w] += sizes[cid]
    return owner


def default_run_dir(cfg: Config) -> Path:
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    return Path("runs") / f"{cfg.algorithm}-{cfg.dataset}-{cfg.clients}c-{stamp}"


@dataclass
class SimulationResult:
    run_dir: Path | str      # a local path, or the URI of a remote run folder
    rounds: list[dict[str, Any]]
    clients: list[dict[str, Any]]
    summary: dict[str, Any]
    global_state: dict[str, State] = field(repr=False, default_factory=dict)


class Orchestrator:
    def __init__(self, world: World, announce: Callable[[str], None]):
        self.world = world
        self.cfg = world.cfg
        self.backend = make_backend(self.cfg)
        try:
            self._start(announce)
        except BaseException:
            self.backend.close()
            raise

    def _start(self, announce) -> None:
        cfg, world, backend = self.cfg, self.world, self.backend
        n_workers = backend.worker_count(cfg.clients)
        check_memory(world, n_workers, backend.available_memory())
        self.owner = place_clients([len(ix) for ix in world.client_indices], n_workers)
        data = world.data
        self.train = backend.put({"x_train": data.x_train, "y_train": data.y_train})
        self.test = backend.put({"x_test": data.x_test, "y_test": data.y_test})
        self.n_workers = n_workers
        self.workers, self.server = [], None
        self._create_actors()
        get, call = backend.get, backend.call
        nodes = get([call(w, "node") for w in self.workers])
        placed = ", ".join(f"{nodes.count(n)} on {n}" for n in sorted(set(nodes)))
        announce(f"raysage: {cfg.algorithm} with {cfg.clients} virtual clients on {n_workers} "
                 f"worker(s) ({cfg.cpus_per_worker:g} CPU, {cfg.gpus_per_worker:g} GPU, "
                 f"{cfg.torch_threads} torch thread(s) each) + 1 server "
                 f"({cfg.server_cpus:g} CPU, {cfg.server_gpus:g} GPU); {backend.describe()}; "
                 f"workers placed: {placed}")

    def _create_actors(self) -> None:
        backend, world = self.backend, self.world
        self.server = backend.create(ServerRuntime, world.setup, self.test, server=True)
        self.workers = []
        for w in range(self.n_workers):
            shard = {cid: world.client_indices[cid]
                     for cid in range(self.cfg.clients) if self.owner[cid] == w}
            self.workers.append(backend.create(ClientRuntime, world.setup, self.train, shard))
        # Actor processes start (import torch, build client state) asynchronously;
        # waiting here counts that as start-up, not as round time.
        backend.get([backend.call(actor, "memory") for actor in self.workers + [self.server]])

    def restart_actors(self) -> None:
        """Replace every actor (the pool never shrinks); state comes from a checkpoint."""
        for actor in self.workers + [self.server]:
            self.backend.kill(actor)
        self._create_actors()

    def snapshot(self) -> dict[str, Any]:
        """The actors' state and the planner's memory, for a checkpoint."""
        get, call = self.backend.get, self.backend.call
        return {"server": get(call(self.server, "export_state")),
                "workers": get([call(w, "export_state") for w in self.workers]),
                "plan": self.world.algorithm.plan_state()}

    def restore(self, snapshot: dict[str, Any]) -> None:
        get, call = self.backend.get, self.backend.call
        get([call(self.server, "import_state", snapshot["server"])]
            + [call(w, "import_state", blob) for w, blob in zip(self.workers,
                                                                  snapshot["workers"])])
        self.world.algorithm.load_plan_state(snapshot["plan"])

    def close(self) -> None:
        # End our actors explicitly: a shared Ray instance outlives this run.
        for actor in self.workers + [self.server]:
            if actor is not None:
                self.backend.kill(actor)
        self.backend.close()

    def execute(self, rnd: int, schedule: RoundSchedule, global_ref) -> dict[int, Any]:
        """Submit the round's actions in causal order; returns end-of-round refs by client."""
        backend = self.backend
        uploads, replies, ends = {}, {}, {}
        for action in schedule.actions:
            if isinstance(action, Segment):
                worker = self.workers[self.owner[action.cid]]
                reply = replies[action.reply_of] if action.reply_of is not None else None
                start = None
                if action.is_first:
                    start = ends[action.after] if action.after is not None else global_ref
                sent, end = backend.call(worker, "run_segment", rnd, action, start, reply,
                                         num_returns=2)
                uploads[action.key] = sent
                if action.is_last:
                    ends[action.cid] = end
            else:
                n = len(action.uploads)
                out = backend.call(self.server, "serve", rnd, action.uploads,
                                   *[uploads[seg] for seg in action.segments], num_returns=n)
                for upload, reply in zip(action.uploads, out if n > 1 else [out]):
                    replies[upload] = reply
        return ends

    def run_round(self, rnd: int, global_state: dict[str, State], start: float):
        backend, algo = self.backend, self.world.algorithm
        schedule = self.world.plan(rnd, start)
        global_ref = backend.put(global_state)
        ends = self.execute(rnd, schedule, global_ref)
        results = {cid: backend.get(ends[cid]) for cid in sorted(ends)}
        new_global = algo.aggregate(
            rnd, [(cid, r.num_samples, r.states) for cid, r in results.items()], global_state)
        total = sum(r.num_samples for r in results.values())
        weights = {cid: r.num_samples / total for cid, r in results.items()}
        server_out = backend.get(backend.call(self.server, "end_round", rnd, new_global, weights))
        return schedule, results, server_out, new_global

    def evaluate(self, rnd: int, global_state) -> dict[str, float]:
        backend = self.backend
        if not self.world.algorithm.evaluate_on_clients:
            return backend.get(backend.call(self.server, "evaluate", global_state))
        # Unshared client models: the mean over a seeded sample of clients.
        cids = self.world.eval_clients(rnd)
        export = backend.call(self.server, "eval_export")
        by_worker: dict[int, list[int]] = {}
        for cid in cids:
            by_worker.setdefault(self.owner[cid], []).append(cid)
        scores: dict[int, dict[str, float]] = {}
        for w, mine in sorted(by_worker.items()):
            scores.update(backend.get(backend.call(self.workers[w], "evaluate_clients", mine,
                                                   export, self.test)))
        return {key: float(np.mean([scores[c][key] for c in cids]))
                for key in ("accuracy", "test_loss")}

    def memory(self) -> dict[str, int]:
        """RSS of the driver, the largest worker and the server; ``memory_total``
        is the PSS summed over all of them (the process tree's footprint)."""
        driver = process_memory()
        if self.backend.name == "serial":
            return {"memory_driver": driver["rss"], "memory_workers_max": 0, "memory_server": 0,
                    "memory_total": driver["pss"]}
        get, call = self.backend.get, self.backend.call
        workers = get([call(w, "memory") for w in self.workers])
        server = get(call(self.server, "memory"))
        return {"memory_driver": driver["rss"],
                "memory_workers_max": max(w["rss"] for w in workers),
                "memory_server": server["rss"],
                "memory_total": driver["pss"] + server["pss"] + sum(w["pss"] for w in workers)}


def _mean(values: list[float]) -> float:
    return float(np.mean(values)) if values else math.nan


def bytes_by_kind(kinds: dict[str, int]) -> dict[str, int]:
    """Every byte kind as a column, plus ``total_bytes`` and ``paper_total_bytes``
    (all but labels, as the FSL-SAGE paper counts)."""
    row = {kind: kinds.get(kind, 0) for kind in BYTE_KINDS}
    row["total_bytes"] = sum(kinds.values())
    row["paper_total_bytes"] = row["total_bytes"] - row["labels_up"]
    return row


def plan_rows(world: World, rounds: int | None = None) -> list[dict[str, Any]]:
    """The dry run: bytes by kind and simulated time of each round, without training."""
    rows, sim_time = [], 0.0
    for rnd in range(world.cfg.rounds if rounds is None else rounds):
        schedule = world.plan(rnd, sim_time)
        kinds: dict[str, int] = {}
        spent = [t.bytes for t in schedule.clients.values()]
        spent += [d.bytes for d in schedule.dropped.values()]
        for used in spent:
            for kind, n in used.items():
                kinds[kind] = kinds.get(kind, 0) + n
        sim_time = schedule.end
        rows.append({"round": rnd, "participants": len(schedule.clients),
                     "dropped": len(schedule.dropped), **bytes_by_kind(kinds),
                     "sim_round_time": schedule.duration, "sim_time": sim_time})
    return rows


def plan(cfg: Config) -> list[dict[str, Any]]:
    """Python API behind ``raysage plan``: what each round of ``cfg`` would cost."""
    return plan_rows(build_world(cfg))


def round_rows(rnd: int, schedule: RoundSchedule, results: dict[int, Any],
               server_out: dict[str, Any], owner: list[int]) -> tuple[dict, list[dict]]:
    """Turn a round's schedule and outcomes into one round row and its client rows."""
    client_rows = []
    for cid in sorted(set(schedule.clients) | set(schedule.dropped)):
        row = {"round": rnd, "client": cid, "worker": owner[cid]}
        drop = schedule.dropped.get(cid)
        if drop is not None:
            # Its work is lost; what it had sent and received by then still counts.
            row.update(num_samples=0, client_state_bytes=0, dropped=True,
                       drop_reason=drop.reason, **bytes_by_kind(drop.bytes))
            row.update({name: math.nan for name in
                        ("sim_compute", "sim_upload", "sim_download", "sim_wait", "sim_queue",
                         "sim_idle", "train_loss", "nmse_before", "nmse_after")})
            row["sim_finish"] = drop.time - schedule.start
            client_rows.append(row)
            continue
        timing, result = schedule.clients[cid], results[cid]
        metrics = result.metrics
        row.update(num_samples=result.num_samples, client_state_bytes=result.state_bytes,
                   dropped=False, drop_reason="", **bytes_by_kind(timing.bytes))
        row.update(sim_compute=timing.compute, sim_upload=timing.upload,
                   sim_download=timing.download, sim_wait=timing.wait, sim_queue=timing.queue,
                   sim_idle=schedule.end - timing.finish,
                   train_loss=metrics.get("train_loss_sum", math.nan)
                   / max(metrics.get("train_samples", 0), 1))
        aligned = metrics.get("alignments", 0)
        row["nmse_before"] = metrics["nmse_before_sum"] / aligned if aligned else math.nan
        row["nmse_after"] = metrics["nmse_after_sum"] / aligned if aligned else math.nan
        row["sim_finish"] = timing.finish - schedule.start
        client_rows.append(row)

    metrics = server_out["metrics"]
    kept = [r for r in client_rows if not r["dropped"]]
    aligned_rows = [r for r in kept if not math.isnan(r["nmse_before"])]
    train_loss = sum(r.metrics.get("train_loss_sum", 0.0) for r in results.values())
    train_samples = sum(r.metrics.get("train_samples", 0) for r in results.values())
    row = {"round": rnd, "participants": len(kept), "dropped": len(client_rows) - len(kept)}
    # Local iterations that counted: those of clients that finished the round.
    row["client_steps"] = sum(a.stop - a.first for a in schedule.actions
                              if isinstance(a, Segment) and a.cid not in schedule.dropped)
    row.update({kind: sum(r[kind] for r in client_rows) for kind in BYTE_KINDS})
    row["total_bytes"] = sum(r["total_bytes"] for r in client_rows)
    row["paper_total_bytes"] = sum(r["paper_total_bytes"] for r in client_rows)
    row.update(
        train_loss=train_loss / train_samples if train_samples else math.nan,
        server_loss=(metrics["server_loss_sum"] / metrics["server_samples"]
                     if metrics.get("server_samples") else math.nan),
        alignments=len(aligned_rows),
        nmse_before=_mean([r["nmse_before"] for r in aligned_rows]),
        nmse_after=_mean([r["nmse_after"] for r in aligned_rows]),
        sim_round_time=schedule.duration,
        sim_server_busy=schedule.server_busy,
        server_state_bytes=server_out["state_bytes"],
        client_state_bytes_max=max((r["client_state_bytes"] for r in kept), default=0),
    )
    return row, client_rows


CHECKPOINT = "checkpoint.pt"
MAX_RECOVERIES = 3


@dataclass
class Progress:
    """Where a run stands after a round: what a checkpoint restores."""

    next_round: int
    global_state: dict[str, State]
    sim_time: float
    totals: dict[str, int]
    wall_time: float


def _folder(location: RunFolder | str | Path) -> RunFolder:
    return location if isinstance(location, RunFolder) else RunFolder(location)


def write_checkpoint(folder: RunFolder, progress: Progress, snapshot: dict[str, Any]) -> None:
    import io

    import torch

    buffer = io.BytesIO()
    torch.save({"progress": progress, "snapshot": snapshot}, buffer)
    folder.write_bytes(CHECKPOINT, buffer.getvalue())


def read_checkpoint(location) -> tuple[Progress, dict[str, Any]] | None:
    import io

    import torch

    folder = _folder(location)
    if not folder.exists(CHECKPOINT):
        return None
    try:
        # raysage's own file (models and optimizers need full unpickling).
        payload = torch.load(io.BytesIO(folder.read_bytes(CHECKPOINT)), map_location="cpu",
                             weights_only=False)
        return payload["progress"], payload["snapshot"]
    except Exception as exc:  # a truncated or foreign file
        raise RaysageError(f"checkpoint {folder.path(CHECKPOINT)} cannot be read "
                           f"({type(exc).__name__}); remove it to restart the run from round 0"
                           ) from None


def resume_config(location) -> Config:
    import yaml

    folder = _folder(location)
    if not folder.exists("config.yaml"):
        raise ConfigError(f"cannot resume {folder}: no config.yaml there; "
                          "pass the folder of a run that raysage started")
    values = yaml.safe_load(folder.read_bytes("config.yaml").decode())
    return build_config(values, {"out": str(location)})


def simulate(cfg: Config, *, on_round: Callable[[dict[str, Any]], None] | None = None,
             announce: Callable[[str], None] | None = None,
             resume: str | Path | None = None) -> SimulationResult:
    """Run a whole simulation; the Python API behind ``raysage simulate``.

    With ``resume``, continue the run in that folder from its last checkpoint
    (its saved config is used; ``cfg`` is ignored).
    """
    announce = announce or (lambda line: print(line, file=sys.stderr))
    if resume is not None:
        cfg = resume_config(resume)
    world = build_world(cfg)
    run_dir = RunFolder(cfg.out or default_run_dir(cfg))
    if resume is None and run_dir.is_nonempty():
        raise ConfigError(f"run folder {run_dir} already exists and is not empty; "
                          "choose another --out, remove it, or continue it with --resume")
    t0 = time.perf_counter()
    orchestrator = Orchestrator(world, announce)
    startup = time.perf_counter() - t0
    initial = Progress(0, world.algorithm.init_global(), 0.0,
                       {"total_bytes": 0, "paper_total_bytes": 0}, 0.0)
    saved = read_checkpoint(run_dir) if resume is not None else None
    writer = RunWriter(run_dir, cfg, keep_rounds_below=saved[0].next_round if saved
                       else 0 if resume is not None else None)
    try:
        if saved:
            orchestrator.restore(saved[1])
            announce(f"raysage: resuming {run_dir} at round {saved[0].next_round}")
        progress = saved[0] if saved else initial
        initial_plan = world.algorithm.plan_state() if not saved else None
        recoveries = 0
        while progress.next_round < cfg.rounds and not over_budget(cfg, progress):
            try:
                progress = run_one_round(orchestrator, writer, progress, on_round)
            except ActorFailure as exc:
                recoveries += 1
                if recoveries > MAX_RECOVERIES:
                    raise RaysageError(f"{exc} {recoveries} times; giving up. The run folder "
                                       "is consistent: continue it with --resume") from None
                saved = read_checkpoint(run_dir)
                restart = saved[0].next_round if saved else 0
                announce(f"raysage: {exc} in round {progress.next_round}; restarted all "
                         f"actors, re-running from round {restart} (recovery {recoveries})")
                orchestrator.restart_actors()
                if saved:
                    orchestrator.restore(saved[1])
                    progress = saved[0]
                else:
                    world.algorithm.load_plan_state(initial_plan or {})
                    progress = initial
                writer.truncate(progress.next_round)
                continue
            every = cfg.checkpoint_every
            last = progress.next_round == cfg.rounds or over_budget(cfg, progress)
            if every and (progress.next_round % every == 0 or last):
                write_checkpoint(run_dir, progress, orchestrator.snapshot())
    finally:
        orchestrator.close()

    accuracies = [r["accuracy"] for r in writer.rounds if not math.isnan(r["accuracy"])]
    summary = {
        "algorithm": cfg.algorithm, "model": cfg.model, "dataset": cfg.dataset,
        "clients": cfg.clients, "rounds": progress.next_round,
        "final_accuracy": accuracies[-1], "best_accuracy": max(accuracies),
        "total_bytes": progress.totals["total_bytes"],
        "paper_total_bytes": progress.totals["paper_total_bytes"],
        "total_gib": progress.totals["total_bytes"] / GIB, "sim_time_s": progress.sim_time,
        "wall_time_s": progress.wall_time, "startup_s": startup, "run_dir": str(run_dir),
        # Frozen weights (a LoRA model's base) never travel; reported beside the traffic.
        "frozen_model_bytes": {"client": world.setup.sizes.client_frozen,
                               "server": world.setup.sizes.server_frozen,
                               "aux": world.setup.sizes.aux_frozen},
    }
    writer.finish(summary)
    local = isinstance(run_dir.fs, pafs.LocalFileSystem)
    return SimulationResult(Path(run_dir.root) if local else str(run_dir), writer.rounds,
                            writer.clients, summary, progress.global_state)


def over_budget(cfg: Config, progress: Progress) -> bool:
    """The paper compares algorithms at equal communication: a run may stop at a budget."""
    return (cfg.budget_gib is not None
            and progress.totals["total_bytes"] >= cfg.budget_gib * GIB)


def run_one_round(orchestrator: Orchestrator, writer: RunWriter, progress: Progress,
                  on_round) -> Progress:
    cfg, rnd = orchestrator.cfg, progress.next_round
    round_start = time.perf_counter()
    schedule, results, server_out, global_state = orchestrator.run_round(
        rnd, progress.global_state, progress.sim_time)
    row, client_rows = round_rows(rnd, schedule, results, server_out, orchestrator.owner)
    if (rnd + 1) % cfg.eval_every == 0 or rnd == cfg.rounds - 1:
        row.update(orchestrator.evaluate(rnd, global_state))
    else:
        row.update(accuracy=math.nan, test_loss=math.nan)
    totals = {key: progress.totals[key] + row[key] for key in progress.totals}
    wall = time.perf_counter() - round_start
    row.update(cumulative_bytes=totals["total_bytes"],
               cumulative_paper_bytes=totals["paper_total_bytes"],
               sim_time=schedule.end, wall_round_time=wall,
               wall_time=progress.wall_time + wall)
    row.update(orchestrator.memory())
    writer.add_round(row, client_rows)
    if on_round:
        on_round(row)
    return Progress(rnd + 1, global_state, schedule.end, totals, progress.wall_time + wall)
