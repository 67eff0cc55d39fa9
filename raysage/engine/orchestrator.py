"""The orchestrator: runs rounds on a backend and writes the results.

Per round: sample participants (seeded by round), plan the round on the
simulated clock, put the global state in the object store once, execute
the plan's actions in causal order, average what the algorithm aggregates
in client-id order, let the server finish the round, evaluate, write.

The driver never imports torch and never holds more than one client's
upload at a time: uploads are averaged as they are fetched, and client state
stays in the workers (checkpoints included).
"""

from __future__ import annotations

import math
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path, PurePosixPath
from typing import Any, Callable

import numpy as np

from ..algorithms.state import State
from ..config import Config, build_config, parse_yaml
from ..errors import ConfigError, RaysageError
from ..netsim.planner import RoundSchedule, Segment
from ..results import RunFolder, RunWriter
from ..results.tracking import Experiment, check_tracking, open_tracker, tracked
from .backend import ActorFailure, make_backend, share_cpus
from .checkpoint import (RESUMABLE_FIELDS, Manifest, Progress, check_config, read_manifest,
                         read_progress, remove_unlisted_state, verify_checkpoint,
                         write_checkpoint)
from .memory import GIB, check_disk, check_memory, describe, estimate
from .rows import plan_rows, round_rows
from .runtime import (ClientResult, ClientRuntime, ServerRuntime, process_memory,
                      unplanned_replies)
from .world import World, build_world

MAX_RECOVERIES = 3
__all__ = ["GIB", "Orchestrator", "SimulationResult", "build_world", "plan",
           "simulate"]


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
    return Path("runs") / f"{cfg.section}-{cfg.dataset}-{cfg.clients}c-{stamp}"


@dataclass
class SimulationResult:
    run_dir: Path | str      # a local path, or the URI of a remote run folder
    rounds: list[dict[str, Any]]
    clients: list[dict[str, Any]]
    summary: dict[str, Any]
    global_state: dict[str, State] = field(repr=False, default_factory=dict)


class _Submitted:
    """A segment's two outputs (its uploads, its end-of-round result), as refs: at
    once, or once the cohort holding the segment is submitted, which reading them
    forces (whoever reads them is submitted after it, so nothing waits on itself)."""

    def __init__(self, refs=None, submit: Callable[[], None] | None = None):
        self.refs, self._submit = refs, submit

    def _ready(self):
        if self.refs is None:
            self._submit()
        return self.refs

    @property
    def sent(self):
        return self._ready()[0]

    @property
    def end(self):
        return self._ready()[1]


class _Cohorts:
    """Segments that resume with a server reply, held per worker and submitted as one
    ``run_cohort`` call once its size are held, once something reads what one of
    them produces, or at the end of the round's submission.

    A held segment's inputs (its reply, and its client's earlier segments) were
    all submitted before it, so a cohort never waits on one of its members.
    """

    def __init__(self, orchestrator: "Orchestrator", rnd: int, sizes: dict[int, int]):
        self.orchestrator, self.rnd, self.sizes = orchestrator, rnd, sizes
        self.held: dict[int, list[tuple[Segment, Any, _Submitted]]] = {}

    def add(self, w: int, segment: Segment, reply) -> _Submitted:
        submitted = _Submitted(submit=lambda: self.submit(w))
        members = self.held.setdefault(w, [])
        members.append((segment, reply, submitted))
        if len(members) == self.sizes[w]:
            self.submit(w)
        return submitted

    def submit(self, w: int) -> None:
        members = self.held.pop(w, [])
        if not members:
            return
        o = self.orchestrator
        inputs = [value for segment, reply, _ in members for value in (None, reply)]
        refs = o.backend.call(o.workers[w], "run_cohort", self.rnd,
                              [segment for segment, _, _ in members], *inputs,
                              num_returns=2 * len(members))
        for i, (_, _, submitted) in enumerate(members):
            submitted.refs = (refs[2 * i], refs[2 * i + 1])

    def submit_all(self) -> None:
        for w in list(self.held):
            self.submit(w)


class Orchestrator:
    def __init__(self, world: World, announce: Callable[[str], None], run_dir: RunFolder):
        self.world = world
        self.cfg = world.cfg
        self.run_dir = run_dir
        self.backend = make_backend(self.cfg)
        self.workers, self.server = [], None
        try:
            self._start(announce)
        except BaseException:
            self.close()
            raise

    def _start(self, announce) -> None:
        cfg, world, backend = self.cfg, self.world, self.backend
        n_workers = backend.worker_count(cfg.clients)
        need = estimate(world, n_workers)
        check_memory(need, backend.available_memory())
        check_disk(need, self.run_dir)
        self.owner = place_clients([len(ix) for ix in world.client_indices], n_workers)
        data = world.data
        self.train = backend.put({"x_train": data.x_train, "y_train": data.y_train})
        self.test = backend.put({"x_test": data.x_test, "y_test": data.y_test})
        self.n_workers = n_workers
        self.spill = self._spill_root()
        self._create_actors()
        get, call = backend.get, backend.call
        self.cohort = get(call(self.workers[0], "cohort", cfg.cohort))
        nodes = get([call(w, "node") for w in self.workers])
        placed = ", ".join(f"{nodes.count(n)} on {n}" for n in sorted(set(nodes)))
        server = (f"1 server ({cfg.server_cpus:g} CPU, {cfg.server_gpus:g} GPU)"
                  if self.server is not None else "no server process (the driver averages)")
        announce(f"raysage: {cfg.algorithm} with {cfg.clients} virtual clients on {n_workers} "
                 f"worker(s) ({cfg.cpus_per_worker:g} CPU, {cfg.gpus_per_worker:g} GPU, "
                 f"{cfg.torch_threads} torch thread(s) each) + {server}; {backend.describe()}; "
                 f"workers placed: {placed}; {describe(need)}")

    def _spill_root(self) -> Path:
        """Where stores spill: the run folder when it is local, else a local temporary one."""
        if self.run_dir.is_local:
            return Path(self.run_dir.root) / ".spill"
        return Path(tempfile.mkdtemp(prefix="raysage-spill-"))

    def _create_actors(self) -> None:
        backend, world = self.backend, self.world
        if world.algorithm.has_server:
            self.server = backend.create(ServerRuntime, world.setup, self.test,
                                         str(self.spill / "server"), server=True)
        self.workers = []
        for w in range(self.n_workers):
            shard = {cid: world.client_indices[cid]
                     for cid in range(self.cfg.clients) if self.owner[cid] == w}
            self.workers.append(backend.create(ClientRuntime, world.setup, self.train, shard,
                                               str(self.spill / f"worker-{w}"), slot=w))
        # Actor processes start (import torch) asynchronously; waiting here
        # counts that as start-up, not as round time.
        backend.get([backend.call(actor, "memory") for actor in self.actors])

    @property
    def actors(self) -> list:
        return self.workers + ([self.server] if self.server is not None else [])

    def restart_actors(self) -> None:
        """Replace every actor (the pool never shrinks); state comes from a checkpoint."""
        for actor in self.actors:
            self.backend.kill(actor)
        shutil.rmtree(self.spill, ignore_errors=True)
        self.server = None
        self._create_actors()

    # ------------------------------------------------------------ checkpoints
    def checkpoint_actors(self, location: str, tag: str) -> dict[str, Any]:
        """Every actor writes the state that changed; returns what went where."""
        get, call = self.backend.get, self.backend.call
        written = get([call(w, "checkpoint", location, tag) for w in self.workers])
        clients = {cid: entry for part in written for cid, entry in part.items()}
        server = {"server": None, "server_sha256": None, "clients": {}}
        if self.server is not None:
            server = get(call(self.server, "checkpoint", location, tag))
        return {"clients": clients, "server": server["server"],
                "server_sha256": server["server_sha256"], "server_clients": server["clients"]}

    def restore(self, manifest: Manifest | None) -> None:
        """Actors start from a checkpoint's state (or, without one, from nothing)."""
        get, call = self.backend.get, self.backend.call
        location = str(self.run_dir)
        clients = manifest.client_files("clients") if manifest else {}
        shards: list[dict[int, tuple[str, int]]] = [{} for _ in self.workers]
        for cid, entry in clients.items():
            shards[self.owner[cid]][cid] = entry
        calls = [call(w, "restore", location, shard) for w, shard in zip(self.workers, shards)]
        if self.server is not None and manifest is not None:
            calls.append(call(self.server, "restore", location, manifest["server"],
                              manifest.digest(manifest["server"]),
                              manifest.client_files("server_clients")))
        get(calls)
        self.world.uploaded = ({int(cid): n for cid, n in manifest["uploaded"].items()}
                               if manifest is not None else {})

    def close(self) -> None:
        # Actors remove their spill folders (on their own nodes), then end: a shared
        # Ray instance outlives this run. An actor that is dead, or was never placed,
        # has nothing to clean, and is not waited for.
        self.backend.settle([self.backend.call(actor, "close") for actor in self.actors],
                            timeout=30)
        for actor in self.actors:
            self.backend.kill(actor)
        if getattr(self, "spill", None) is not None:
            shutil.rmtree(self.spill, ignore_errors=True)
        self.backend.close()

    # ------------------------------------------------------------ a round
    def execute(self, rnd: int, schedule: RoundSchedule, global_ref) -> dict[int, Any]:
        """Submit the round's actions in causal order; returns end-of-round refs by client.

        The driver lets go of each upload and reply once the last action that
        reads it is submitted, so the object store holds what is in flight,
        not a whole round's activations.
        """
        backend = self.backend
        uploads: dict[tuple[int, int], _Submitted] = {}
        replies, ends = {}, {}
        # A worker runs several segments at once (on threads) and would start any
        # whose inputs are ready, so every client could be mid-round at once, each
        # holding a working set and its activations. Instead a client's first
        # segment waits until the client opened ``window`` clients earlier on that
        # worker has finished its round, when that was submitted earlier (an added
        # dependency that points back in the causal order cannot deadlock). One more
        # than the worker's threads (times a cohort's clients) keeps a task queued for
        # the next free thread.
        threads = self.cfg.worker_threads
        sizes = self._cohort_sizes(schedule, threads)
        together = max(sizes.values(), default=1) > 1
        window = threads * max(sizes.values(), default=1) + 1 if backend.name == "ray" else 0
        cohorts = _Cohorts(self, rnd, sizes)
        opened: dict[int, list[int]] = {w: [] for w in range(len(self.workers))}
        finished: dict[int, _Submitted] = {}    # client -> its last segment
        readers: dict[tuple[int, int], int] = {}
        for action in schedule.actions:
            if not isinstance(action, Segment):
                for seg in action.segments:
                    readers[seg] = readers.get(seg, 0) + 1
        for action in schedule.actions:
            if isinstance(action, Segment):
                w = self.owner[action.cid]
                reply = replies.pop(action.reply_of) if action.reply_of is not None else None
                if together and action.reply_of is not None and not action.is_first:
                    submitted = cohorts.add(w, action, reply)
                else:
                    start = None
                    if action.is_first:
                        start = ends[action.after].end if action.after is not None else global_ref
                    turn = None
                    if action.is_first and window:
                        if len(opened[w]) == window:
                            waited = finished.pop(opened[w].pop(0), None)
                            turn = waited.sent if waited is not None else None
                        opened[w].append(action.cid)
                    submitted = _Submitted(backend.call(self.workers[w], "run_segment", rnd,
                                                        action, start, reply, turn,
                                                        num_returns=2))
                if action.key in readers:
                    uploads[action.key] = submitted
                if action.is_last:
                    ends[action.cid] = submitted
                    if window and action.cid in opened[w]:
                        finished[action.cid] = submitted
            else:
                n = len(action.uploads)
                out = backend.call(self.server, "serve", rnd, action.uploads,
                                   *[uploads[seg].sent for seg in action.segments],
                                   num_returns=n)
                for seg in action.segments:
                    readers[seg] -= 1
                    if not readers[seg]:
                        del uploads[seg]
                for upload, reply in zip(action.uploads, out if n > 1 else [out]):
                    replies[upload] = reply
        cohorts.submit_all()
        # What is left was served for uploads whose plan has no reply to deliver: it
        # must be nothing. Fetching it also surfaces an error raised while serving them,
        # which no segment would otherwise wait for.
        unplanned_replies(self.world.algorithm.name, replies, backend.get(list(replies.values())))
        return {cid: submitted.end for cid, submitted in ends.items()}

    def _cohort_sizes(self, schedule: RoundSchedule, threads: int) -> dict[int, int]:
        """Each worker's cohort size this round: at most ``self.cohort``, and small
        enough that the segments it runs together fill all its threads."""
        if not self.world.algorithm.replies_work_together or self.cohort <= 1:
            return {w: 1 for w in range(len(self.workers))}
        resumed = [0] * len(self.workers)
        for action in schedule.actions:
            if isinstance(action, Segment) and action.reply_of is not None:
                resumed[self.owner[action.cid]] += 1
        return {w: max(1, min(self.cohort, math.ceil(n / threads)))
                for w, n in enumerate(resumed)}

    def run_round(self, rnd: int, global_state: dict[str, State], start: float):
        backend, algo, world = self.backend, self.world.algorithm, self.world
        schedule = world.plan(rnd, start)
        global_ref = backend.put(global_state)
        ends = self.execute(rnd, schedule, global_ref)
        cids = sorted(ends)
        total = sum(world.num_samples(cid) for cid in cids)
        results: dict[int, ClientResult] = {}

        def uploads():
            """Each client's result in id order, its uploaded states dropped once averaged."""
            for cid in cids:
                result = backend.get(ends.pop(cid))
                results[cid] = ClientResult({}, result.metrics, result.num_samples,
                                            result.state_bytes)
                yield cid, result.num_samples, result.states

        new_global = algo.aggregate(rnd, uploads(), total, global_state)
        for cid in cids[len(results):]:      # an aggregate that stopped early
            results[cid] = backend.get(ends.pop(cid))
        server_out = {"metrics": {}, "client_metrics": {}, "state_bytes": 0}
        if self.server is not None:
            weights = {cid: world.num_samples(cid) / total for cid in cids}
            server_out = backend.get(backend.call(self.server, "end_round", rnd, new_global,
                                                  weights))
        return schedule, results, server_out, new_global

    def evaluate(self, rnd: int, global_state) -> dict[str, float]:
        backend = self.backend
        if not self.world.algorithm.evaluate_on_clients:
            if self.server is None:
                return backend.get(backend.call(self.workers[0], "evaluate_global",
                                                global_state, self.test))
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

    def invert(self, rnd: int, global_state) -> dict[str, float]:
        """The model-inversion attack on the final client model (see raysage.leakage)."""
        backend = self.backend
        cid = None if "client" in global_state else self.world.eval_clients(rnd)[0]
        worker = self.workers[self.owner[cid] if cid is not None else 0]
        return backend.get(backend.call(worker, "invert", cid, global_state, self.test))

    def memory(self) -> dict[str, int]:
        """RSS of the driver, the largest worker and the server; ``memory_total``
        is the PSS summed over all of them (the process tree's footprint)."""
        driver = process_memory()
        if self.backend.name == "serial":
            return {"memory_driver": driver["rss"], "memory_workers_max": 0, "memory_server": 0,
                    "memory_total": driver["pss"]}
        get, call = self.backend.get, self.backend.call
        workers = get([call(w, "memory") for w in self.workers])
        server = get(call(self.server, "memory")) if self.server is not None else \
            {"rss": 0, "pss": 0}
        return {"memory_driver": driver["rss"],
                "memory_workers_max": max(w["rss"] for w in workers),
                "memory_server": server["rss"],
                "memory_total": driver["pss"] + server["pss"] + sum(w["pss"] for w in workers)}


def plan(cfg: Config) -> list[dict[str, Any]]:
    """Python API behind ``raysage plan``: what each round of ``cfg`` would cost."""
    return plan_rows(build_world(cfg))


def resume_config(location) -> Config:
    folder = location if isinstance(location, RunFolder) else RunFolder(location)
    if not folder.exists("config.yaml"):
        raise ConfigError(f"cannot resume {folder}: no config.yaml there; "
                          "pass the folder of a run that raysage started")
    where = folder.path("config.yaml")
    try:
        values = parse_yaml(folder.read_bytes("config.yaml").decode(), where)
    except UnicodeDecodeError:
        raise ConfigError(f"{where} is not UTF-8 text; it is not a config raysage wrote") \
            from None
    if not isinstance(values, dict):
        raise ConfigError(f"{where} is not a mapping of field: value; it is not a config "
                          "raysage wrote")
    return build_config(values, {"out": str(location)})


def over_budget(cfg: Config, progress: Progress) -> bool:
    """The paper compares algorithms at equal communication: a run may stop at a budget."""
    return (cfg.budget_gib is not None
            and progress.totals["total_bytes"] >= cfg.budget_gib * GIB)


def simulate(cfg: Config, *, on_round: Callable[[dict[str, Any]], None] | None = None,
             announce: Callable[[str], None] | None = None,
             resume: str | Path | None = None,
             changes: dict[str, Any] | None = None,
             experiment: Experiment | None = None) -> SimulationResult:
    """Run a whole simulation; the Python API behind ``raysage simulate``.

    With ``resume``, continue the run in that folder from its last checkpoint
    (its saved config is used; ``cfg`` is ignored), after verifying every file
    of the checkpoint and that the config is the one it was made with.
    ``changes`` may set the fields a resume may change (``RESUMABLE_FIELDS``: the
    rounds, the byte budget, the checkpoint and evaluation cadence, and where the
    run executes). ``experiment`` is what a tracker files the run under (a
    sweep's; default ``raysage`` in MLflow's default store).
    """
    announce = announce or (lambda line: print(line, file=sys.stderr))
    if resume is None:
        cfg = share_cpus(cfg)
        check_tracking(cfg.tracking)
    # The folder is the run's before anything reads or writes it: a second run
    # on it is refused here, not after both have started.
    run_dir = RunFolder(resume if resume is not None else cfg.out or default_run_dir(cfg))
    run_dir.lock(announce)
    try:
        return _simulate(cfg, run_dir, on_round, announce, resume, changes or {}, experiment)
    finally:
        run_dir.unlock()


def _simulate(cfg: Config, run_dir: RunFolder, on_round, announce, resume,
              changes: dict[str, Any], experiment: Experiment | None) -> SimulationResult:
    manifest = None
    if resume is not None:
        # Everything a resume reads is checked here, in seconds, before Ray starts.
        cfg = resume_config(resume)
        manifest = read_manifest(run_dir)
        if manifest is not None:
            check_config(run_dir, manifest, cfg)
            if not manifest.verified:
                announce(f"raysage: {run_dir}'s checkpoint was written before raysage "
                         "recorded checksums; its files cannot be verified")
            verify_checkpoint(run_dir, manifest)
        refused = sorted(set(changes) - set(RESUMABLE_FIELDS))
        if refused:
            raise ConfigError(f"a resume cannot change {', '.join(refused)}: only "
                              f"{', '.join(RESUMABLE_FIELDS)}")
        cfg = cfg.replace(**changes) if changes else cfg
    elif changes:
        raise ConfigError("changes apply to a resumed run only; give them in the config")
    world = build_world(cfg)
    if resume is None and run_dir.is_nonempty():
        raise ConfigError(f"run folder {run_dir} already exists and is not empty; "
                          "choose another --out, remove it, or continue it with --resume")
    totals = world.algorithm.byte_totals
    initial = Progress(0, world.facts.initial_global, 0.0,
                       {"total_bytes": 0, **{t.name: 0 for t in totals}, "energy_j": 0.0}, 0.0)
    progress = read_progress(run_dir, manifest) if manifest else initial
    writer = None
    if resume is not None:
        if cfg.rounds < progress.next_round:
            raise ConfigError(f"--rounds {cfg.rounds} is below the {progress.next_round} "
                              f"rounds {run_dir} has run; give at least {progress.next_round}")
        writer = RunWriter(run_dir, cfg, keep_rounds_below=progress.next_round,
                           algorithm=world.algorithm)
        if changes:
            writer.write_config(cfg, world.algorithm)
        remove_unlisted_state(run_dir, manifest)
    t0 = time.perf_counter()
    orchestrator = Orchestrator(world, announce, run_dir)
    startup = time.perf_counter() - t0
    writer = writer or RunWriter(run_dir, cfg, algorithm=world.algorithm)
    tracker = open_tracker(cfg.tracking, cfg.to_dict(), run_dir,
                           name=PurePosixPath(run_dir.location.rstrip("/")).name,
                           experiment=experiment)
    if tracker is not None:
        announce(f"raysage: tracking in {tracker.where}")
        on_round = tracked(tracker, on_round)
    try:
        if manifest:
            orchestrator.restore(manifest)
            announce(f"raysage: resuming {run_dir} at round {progress.next_round}")
        recoveries = 0
        while progress.next_round < cfg.rounds and not over_budget(cfg, progress):
            try:
                done = run_one_round(orchestrator, writer, progress, on_round)
                every = cfg.checkpoint_every
                last = done.next_round == cfg.rounds or over_budget(cfg, done)
                if every and (done.next_round % every == 0 or last):
                    manifest = write_checkpoint(run_dir, done, orchestrator, manifest)
                progress = done
            except ActorFailure as exc:
                # Anything of the round, its checkpoint included, runs again from the
                # last checkpoint; a checkpoint cut short leaves the previous one valid.
                recoveries += 1
                if recoveries > MAX_RECOVERIES:
                    raise RaysageError(f"{exc} {recoveries} times; giving up. The run folder "
                                       "is consistent: continue it with --resume") from None
                failed = progress.next_round
                progress = read_progress(run_dir, manifest) if manifest else initial
                announce(f"raysage: {exc} in round {failed}; restarted all actors, "
                         f"re-running from round {progress.next_round} (recovery {recoveries})")
                orchestrator.restart_actors()
                remove_unlisted_state(run_dir, manifest)
                orchestrator.restore(manifest)
                writer.truncate(progress.next_round)
        inversion = (orchestrator.invert(progress.next_round - 1, progress.global_state)
                     if cfg.inversion else {})
    except BaseException:
        if tracker is not None:
            tracker.fail()
        raise
    finally:
        orchestrator.close()

    accuracies = [r["accuracy"] for r in writer.rounds if not math.isnan(r["accuracy"])]
    summary = {
        "algorithm": cfg.algorithm, "label": world.algorithm.label,
        "colour": world.algorithm.colour, "model": cfg.model, "dataset": cfg.dataset,
        "clients": cfg.clients, "rounds": progress.next_round,
        "final_accuracy": accuracies[-1], "best_accuracy": max(accuracies),
        "total_bytes": progress.totals["total_bytes"],
        **{t.name: progress.totals[t.name] for t in totals},
        "total_gib": progress.totals["total_bytes"] / GIB, "sim_time_s": progress.sim_time,
        "energy_j": progress.totals["energy_j"], **inversion,
        "wall_time_s": progress.wall_time, "startup_s": startup, "run_dir": str(run_dir),
        # Frozen weights (a LoRA model's base) never travel; reported beside the traffic.
        "frozen_model_bytes": {"client": world.setup.sizes.client_frozen,
                               "server": world.setup.sizes.server_frozen,
                               "aux": world.setup.sizes.aux_frozen},
    }
    writer.finish(summary)
    if tracker is not None:
        tracker.finish(summary, {"config.yaml": run_dir.read_bytes("config.yaml")})
    return SimulationResult(Path(run_dir.root) if run_dir.is_local else str(run_dir), writer.rounds,
                            writer.clients, summary, progress.global_state)


def run_one_round(orchestrator: Orchestrator, writer: RunWriter, progress: Progress,
                  on_round) -> Progress:
    cfg, rnd = orchestrator.cfg, progress.next_round
    round_start = time.perf_counter()
    schedule, results, server_out, global_state = orchestrator.run_round(
        rnd, progress.global_state, progress.sim_time)
    row, client_rows = round_rows(orchestrator.world, rnd, schedule, results, server_out,
                                  orchestrator.owner)
    if (rnd + 1) % cfg.eval_every == 0 or rnd == cfg.rounds - 1:
        row.update(orchestrator.evaluate(rnd, global_state))
    else:
        row.update(accuracy=math.nan, test_loss=math.nan)
    totals = {key: progress.totals[key] + row[key] for key in progress.totals}
    wall = time.perf_counter() - round_start
    row.update(cumulative_bytes=totals["total_bytes"])
    row.update({t.cumulative: totals[t.name] for t in orchestrator.world.algorithm.byte_totals})
    row.update(cumulative_energy_j=totals["energy_j"],
               sim_time=schedule.end, wall_round_time=wall,
               wall_time=progress.wall_time + wall)
    row.update(orchestrator.memory())
    writer.add_round(row, client_rows)
    if on_round:
        on_round(row)
    return Progress(rnd + 1, global_state, schedule.end, totals, progress.wall_time + wall)
