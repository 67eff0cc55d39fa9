"""What runs inside a client worker and inside the server.

These are plain classes: the serial backend calls them in-process and the
Ray backend wraps them with ``ray.remote``, so both backends execute the
same code on the same inputs.

A worker hosts a shard of virtual clients as state, not objects: it builds
working sets of models (one per client that is mid-round at once) and keeps
each client's persistent state as arrays in a :class:`~raysage.store.StateStore`.
Running a client is: take a working set, load the client's state into it,
run the segment, write the state back when the client's round ends.
"""

from __future__ import annotations

import inspect
import math
import os
import threading
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..algorithms.base import Algorithm, ClientState, ServerState, Setup, Step, Upload, Wait
from ..algorithms.cohort import Together, run_alone
from ..algorithms.state import (State, as_tensor, load_kept, load_state, release_gradients,
                                save_kept, state_nbytes, to_state)
from ..data import client_batch, make_batch
from ..data.batches import client_images
from ..errors import ContractError, RaysageError
from ..observers import Observed, round_observers, server_observers
from ..observers import serve as observed_serve
from ..lazy import nn, torch
from ..models import correct_predictions, count_targets, split_loss
from ..netsim.planner import Segment
from .traffic import Reads, Traffic
from ..results import RunFolder
from ..store import StateStore, digest, from_safetensors, read_verified, to_safetensors
from ..streams import seeded, stream_seed, unseeded

MIB = 2**20


# A cohort's clients are mid-round at once, each in a working set of its own.
MAX_COHORT = 16
COHORT_MEMORY = 256 << 20


class NonFiniteLoss(RaysageError):
    pass


@dataclass
class ClientResult:
    """What a client's round ends with: its uploads by name, its metrics, its size."""

    states: dict[str, State]
    metrics: dict[str, list[float]]     # name -> [weighted sum, weight]
    num_samples: int
    state_bytes: int          # the client's persistent state (models, optimizer, buffers)


def pick_device(gpus: float) -> torch.device:
    """The GPU Ray assigned to this actor (fractions share one), else the CPU."""
    if gpus > 0 and torch.cuda.is_available():
        return torch.device("cuda")
    return torch.device("cpu")


def _check_finite(metrics: dict[str, list[float]], rnd: int, who: str) -> None:
    for name, (value, _) in metrics.items():
        if not math.isfinite(value):
            raise NonFiniteLoss(f"{name} became {value} in round {rnd} "
                                f"at {who}; lower the learning rate or check the data")


class ClientRound:
    """One client's round on a worker: the algorithm's client_round generator, cut
    into the plan's segments, and checked against the plan as it runs.

    A segment runs the generator until it reaches the segment's end: the upload
    the client then waits for (``blocked_at``), a reply it must take before the
    next iteration (a ``Wait`` at ``stop``), or the round's end. The next segment
    resumes it with the server's reply.
    """

    def __init__(self, algo: Algorithm, client: ClientState, rnd: int, first: Segment,
                 batch, check_bytes: bool = True):
        self.algo, self.client, self.rnd = algo, client, rnd
        self.cid = client.cid
        self.iterations = first.plan.iterations
        self.exchanges = {k: ex.blocking for k, ex in first.plan.exchanges.items()}
        self.batch_of = batch                 # k -> (x, y) on the algorithm's device
        self.segment = first
        self.sent: set[int] = set()
        self.uploads: dict[int, Upload] = {}
        self.step: Step | None = None
        self.observers = round_observers(algo, client, rnd, self.exchanges)
        self.traffic = Traffic(algo, self.cid, rnd, first.plan) if check_bytes else None
        client.start = Reads(client.start)
        client.round = self
        body = algo.client_round(client, rnd)
        self.gen = body if inspect.isgenerator(body) else None
        self.result = None if self.gen is not None else body
        self.primed = False

    # -------------------------------------------------- the algorithm's side
    def steps(self):
        for k in range(self.iterations):
            self._check_before(k)
            self.step = Step(self, k)
            yield self.step
        self._check_before(self.iterations)

    def arrivals(self, k: int | None):
        """Wait (as the plan says) for replies that arrive before iteration k starts."""
        k = self.iterations if k is None else k
        replies: dict[int, Any] = {}
        while self.segment.stop == k and self._ends_with_wait():
            replies.update((yield Wait(k)))
        return replies

    def batch(self, k: int):
        self._check_waited(k)
        return self.batch_of(k)

    # -------------------------------------------------- checks against the plan
    def _fail(self, what: str) -> None:
        raise ContractError(f"{self.algo.name}: client {self.cid} in round {self.rnd}: {what}")

    def _ends_with_wait(self) -> bool:
        return not self.segment.is_last and self.segment.blocked_at is None

    def _check_waited(self, k: int) -> None:
        if k >= self.segment.stop and self._ends_with_wait():
            self._fail(f"iteration {k} starts after a server reply arrives, but client_round "
                       "went on without it; take it with `yield from step.arrivals()` first")

    def _check_before(self, k: int) -> None:
        """Iterations before k went as planned: every upload sent, every reply taken."""
        missing = [j for j in self.exchanges if j < k and j not in self.sent]
        if missing:
            self._fail(f"plan_client_round has an upload at iteration {missing[0]} that "
                       "client_round never sent (yield step.upload(...) where step.uploads)")
        if k:
            self._check_waited(k - 1)

    def _take(self, out) -> bool:
        """Take what the generator yielded; True if this segment ends here."""
        if isinstance(out, Upload):
            k = out.k
            if k not in self.exchanges:
                self._fail(f"client_round uploaded at iteration {k}, where "
                           "plan_client_round has no exchange")
            if k in self.sent:
                self._fail(f"client_round uploaded twice at iteration {k}")
            self._check_waited(k)
            if self.traffic is not None:
                self.traffic.upload(k, out.arrays)
            self.sent.add(k)
            self.uploads[k] = out
            for observer in self.observers:
                observer.upload(k, out, self.step)
            return k == self.segment.blocked_at
        if isinstance(out, Wait):
            return True
        self._fail(f"client_round yielded {type(out).__name__}; yield step.upload(...), "
                   "`yield from step.arrivals()` or a Together")

    def _check_result(self) -> None:
        if not isinstance(self.result, dict):
            self._fail(f"client_round returned {type(self.result).__name__}; return a "
                       "dict of uploaded states by name ({} when none)")
        if self.traffic is not None:
            self.traffic.broadcast(self.client.start.read)
            self.traffic.result(self.result)

    # -------------------------------------------------- the engine's side
    def run(self, segment: Segment, reply: Any) -> dict[int, Upload]:
        """Run one segment alone; returns the uploads it made, by iteration."""
        advance = self.advance(segment, reply)
        result = None
        try:
            while True:
                result = run_alone(advance.send(result))
        except StopIteration as end:
            return end.value

    def advance(self, segment: Segment, reply: Any):
        """Run one segment, yielding each Together request to whoever runs it (and
        resuming with its result); returns the uploads it made, by iteration."""
        self.segment, self.uploads = segment, {}
        if self.gen is None:                  # a plain function: ran whole already
            self._check_before(self.iterations)
            self._check_result()
            return {}
        observed = {}
        if isinstance(reply, Observed):       # what observers at the server sent along
            reply, observed = reply.reply, reply.data
        if not self.primed:
            self.primed, value = True, None
        elif segment.resume is not None:
            value = reply                     # the reply to the upload it waits on
        else:
            value = {segment.reply_of[1]: reply}   # a reply it takes before iteration `first`
        if segment.reply_of is not None:
            if self.traffic is not None:
                self.traffic.reply(segment.reply_of[1], reply, self.client.models)
            for observer in self.observers:
                observer.reply(segment.reply_of[1], reply, observed)
        try:
            while True:
                out = self.gen.send(value)
                if isinstance(out, Together):
                    value = yield out
                    continue
                for observer in self.observers:
                    observer.resumed()
                if self._take(out):
                    break
                value = None
        except StopIteration as end:
            self.result = end.value
            for observer in self.observers:
                observer.resumed()
                self.client.metrics.update(observer.metrics())
            if not segment.is_last:
                self._fail("client_round returned before the plan's last iteration "
                           f"({self.iterations}) or before a reply it should take")
            self._check_before(self.iterations)
            self._check_result()
            return self.uploads
        if segment.is_last:
            self._fail("client_round waits for a server reply after the plan's last one")
        return self.uploads


def unplanned_replies(algorithm: str, uploads, replies) -> None:
    """Stop the run when the server answered an upload whose exchange plans no reply:
    the client would never get it, and its bytes would be counted nowhere."""
    for (cid, k), reply in zip(uploads, replies):
        if isinstance(reply, Observed):
            reply = reply.reply
        if reply is not None:
            raise ContractError(f"{algorithm}: serve answered client {cid}'s upload at "
                                f"iteration {k}, but plan_client_round plans no reply there; "
                                "give that exchange its reply bytes (Exchange.down) or return "
                                "None")


def node_address() -> str:
    """The IP address of the node this process runs on."""
    import socket

    try:
        import ray

        if ray.is_initialized():
            return ray.util.get_node_ip_address()
    except ImportError:
        pass
    return socket.gethostbyname(socket.gethostname())


def process_memory() -> dict[str, int]:
    """This process's resident set size and proportional set size in bytes.

    RSS counts the torch libraries and object-store pages that processes
    share once per process; PSS splits shared pages among their users, so
    PSS summed over the process tree is what the tree really occupies.
    """
    import psutil

    process = psutil.Process(os.getpid())
    rss = process.memory_info().rss
    try:
        pss = process.memory_full_info().pss
    except (AttributeError, psutil.AccessDenied):  # no PSS outside Linux
        pss = rss
    return {"rss": rss, "pss": pss}


def return_freed_memory() -> None:
    """Give memory that was freed back to the OS (glibc keeps it otherwise).

    Evaluating 500 test samples at a time frees tens of MB of activations
    at once, which glibc's allocator would keep in the process for good.
    """
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):   # not glibc: nothing to do
        pass


def evaluate(model, test: dict[str, np.ndarray], setup: Setup, device,
             batch_size: int = 500) -> dict[str, float]:
    """Accuracy and mean loss of a model on the test split (eval mode, then back)."""
    model.eval()
    x_all, y_all = test["x_test"], test["y_test"]
    correct, loss, units = 0, 0.0, 0
    try:
        with torch.no_grad():
            for start in range(0, len(y_all), batch_size):
                x = make_batch(x_all[start:start + batch_size], setup.mean, setup.std,
                               train=False, generator=None)
                y = as_tensor(np.asarray(y_all[start:start + batch_size], dtype=np.int64))
                logits = model(x.to(device))
                y = y.to(device)
                loss += split_loss(logits, y, reduction="sum").item()
                correct += correct_predictions(logits, y)
                units += count_targets(y)
    finally:
        model.train()
        return_freed_memory()
    # Per sample for classifiers; per target token (and token accuracy) for language models.
    return {"accuracy": correct / units, "test_loss": loss / units}


class _Process:
    """What the orchestrator asks of any actor process: who and where it is, its memory."""

    def __init__(self, setup: Setup, gpus: float):
        self.setup = setup
        self.cfg = setup.config
        torch.set_num_threads(self.cfg.torch_threads)
        self.algo: Algorithm = setup.algorithm()
        self.algo.device = pick_device(gpus)

    def pid(self) -> int:
        return os.getpid()

    def node(self) -> str:
        return node_address()

    def memory(self) -> dict[str, int]:
        return process_memory()

    def store(self, spill_dir: str | None) -> StateStore:
        return StateStore(self.cfg.state_memory_mib * MIB, spill_dir)

    def evaluate_global(self, global_state: dict[str, State],
                        test: dict[str, np.ndarray]) -> dict[str, float]:
        """Test metrics of the global model (here when the algorithm has no server)."""
        return evaluate(self.algo.eval_model(ServerState(), global_state), test, self.setup,
                        self.algo.device)


class ClientRuntime(_Process):
    """A client worker: hosts a shard of virtual clients and their persistent state.

    On Ray it trains up to ``worker_threads`` clients at once, one per thread
    (torch releases the GIL in its kernels). Each client runs in a working set
    of its own; the lock guards what the threads share: the spare working
    sets, the state store and who is mid-round. The order in which a worker
    runs its segments never matters: a segment that must follow another
    depends on it through the object store.
    """

    def __init__(self, setup: Setup, train: dict[str, np.ndarray],
                 client_indices: dict[int, np.ndarray], spill_dir: str | None = None):
        super().__init__(setup, setup.config.gpus_per_worker)
        self.train = train
        self.indices = client_indices
        self.states = self.store(spill_dir)
        self.lock = threading.Lock()
        self.active: dict[int, ClientRound] = {}    # clients mid-round, by id
        self.free: list[ClientState] = [self._build()]   # working sets not in use
        # Dropout (LoRA's) draws from torch's global generator, which a process has
        # one of: such models are seeded per segment and train one client at a time.
        self.draws_global_rng = any(isinstance(m, nn.Dropout) and m.p > 0
                                    for model in self.free[0].models.values()
                                    for m in model.modules())

    def cohort(self, requested: int) -> int:
        """Most clients this worker runs as a cohort: ``requested``, or (0) as many
        clients parked mid-round as fit COHORT_MEMORY, at most MAX_COHORT; one for
        models that draw from the process's generator, which are seeded segment by
        segment."""
        if self.draws_global_rng:
            return 1
        if requested:
            return requested
        client = self.free[0]
        parked = state_nbytes([client.models, client.optimizers]) + self._activation_bytes()
        return max(1, min(MAX_COHORT, COHORT_MEMORY // max(parked, 1)))

    def _activation_bytes(self) -> int:
        """What x_c keeps for backward on one batch beyond its own weights: a client
        waiting for a reply between its forward and backward pass holds that much.
        Counted by storage, as a tensor saved by two operations is held once."""
        with unseeded():
            x_c = self.algo.place(self.algo.arch.make_client())
        weights = {p.untyped_storage().data_ptr() for p in x_c.parameters()}
        held: dict[int, int] = {}

        def pack(tensor):
            storage = tensor.untyped_storage()
            if storage.data_ptr() not in weights:
                held[storage.data_ptr()] = storage.nbytes()
            return tensor

        x, _ = self.algo.arch.example_batch(self.cfg.batch_size)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            x_c(x.to(self.algo.device))
        return sum(held.values())

    # -------------------------------------------------------- working sets
    def _build(self) -> ClientState:
        client = ClientState(-1, 0)
        # The initial weights drawn here are replaced by each client's state.
        with unseeded():
            self.algo.build_client(client)
        return client

    def _take(self, cid: int) -> ClientState:
        """A working set holding client cid's state (its first, if it never took part)."""
        with self.lock:
            client = self.free.pop() if self.free else None
            state = self.states.get(cid)
        client = client or self._build()
        client.cid, client.num_samples = cid, len(self.indices[cid])
        client.start, client.metrics, client.round = {}, {}, None
        load_kept(self.algo, client, state)
        return client

    def _put_back(self, client: ClientState, keep: bool) -> None:
        state = save_kept(self.algo, client) if keep else None
        release_gradients(client.models)
        with self.lock:
            if keep:
                self.states.put(client.cid, state)
            self.free.append(client)

    # -------------------------------------------------------- training
    def run_segment(self, rnd: int, segment: Segment,
                    start: dict[str, State] | ClientResult | None,
                    reply: Any, turn: Any = None) -> tuple[dict[int, Any], ClientResult | None]:
        """Run one segment of a client's round; returns (uploads by k, end-of-round result).

        A first segment starts from ``start``: the round's broadcast, or, for a
        sequential protocol, the previous client's result (its hand-over).
        ``turn`` is only waited for (see Orchestrator.execute).
        """
        if self.draws_global_rng:
            # Seeded per segment, so results do not depend on which worker runs what.
            with seeded(self.cfg.seed, "segment", segment.cid, rnd, segment.index):
                return self._run_segment(rnd, segment, start, reply)
        return self._run_segment(rnd, segment, start, reply)

    def run_cohort(self, rnd: int, segments: list[Segment], *inputs: Any) -> tuple:
        """Run several clients' segments as a cohort; the work they ask to do together
        (``Together``) runs as one call per kind, once every client has asked or ended.

        ``inputs`` are each segment's (start, reply) in turn; returns each one's
        (uploads, end-of-round result) in turn, flat, as the caller's refs expect.
        """
        rounds = [self._open(rnd, segment, start)
                  for segment, start in zip(segments, inputs[0::2])]
        advances = [r.advance(segment, reply)
                    for r, segment, reply in zip(rounds, segments, inputs[1::2])]
        outputs: list[Any] = [None] * len(segments)
        results: dict[int, Any] = {i: None for i in range(len(segments))}
        while results:
            asked: dict[tuple, list[tuple[int, Together]]] = {}
            for i, result in results.items():
                try:
                    request = advances[i].send(result)
                except StopIteration as end:
                    outputs[i] = self._close(rnd, segments[i], rounds[i], end.value)
                    continue
                asked.setdefault(request.key, []).append((i, request))
            results = {}
            for requests in asked.values():
                answers = requests[0][1].fn([request.job for _, request in requests])
                results.update((i, answer) for (i, _), answer in zip(requests, answers))
        return tuple(value for pair in outputs for value in pair)

    def _run_segment(self, rnd, segment, start, reply):
        rounds = self._open(rnd, segment, start)
        return self._close(rnd, segment, rounds, rounds.run(segment, reply))

    def _open(self, rnd: int, segment: Segment, start) -> ClientRound:
        """The client's round, begun at its first segment; ready to run ``segment``."""
        algo, cid = self.algo, segment.cid
        indices = self.indices[cid]
        stop = segment.stop if segment.blocked_at is None else segment.blocked_at + 1
        images = client_images(self.cfg, self.train, indices, cid, rnd,
                               range(segment.first, stop))

        def batch(k: int):
            x, y = client_batch(self.cfg, self.train, self.setup.mean, self.setup.std,
                                indices, cid, rnd, k, images=images.get(k))
            return x.to(algo.device), y.to(algo.device)

        if segment.is_first:
            client = self._take(cid)
            client.start = start.states if isinstance(start, ClientResult) else start
            self.active[cid] = ClientRound(algo, client, rnd, segment, batch)
        rounds = self.active[cid]
        rounds.batch_of = batch
        return rounds

    def _close(self, rnd: int, segment: Segment, rounds: ClientRound,
               uploads: dict[int, Upload]) -> tuple[dict[int, Upload], ClientResult | None]:
        if not segment.is_last:
            return uploads, None
        cid = segment.cid
        client = rounds.client
        client.round = None
        _check_finite(client.metrics, rnd, f"client {cid}")
        release_gradients(client.models)
        result = ClientResult(rounds.result, dict(client.metrics), client.num_samples,
                              state_nbytes([client.models, client.optimizers]))
        del self.active[cid]
        self._put_back(client, keep=True)
        return uploads, result

    def invert(self, cid: int | None, global_state: dict[str, State],
               test: dict[str, np.ndarray]) -> dict[str, float]:
        """The model-inversion attack on the final client model x_c: the global one, or
        client cid's own (unshared client models)."""
        from ..leakage import inversion_attack

        client = None
        if cid is None:
            with unseeded():       # its weights are replaced below
                model = self.algo.place(self.algo.arch.make_client())
            load_state(model, global_state["client"])
        else:
            client = self._take(cid)
            model = client.models["client"]
        # (Sliced: the embedded synthetic split makes its images on demand.)
        x = make_batch(test["x_test"][0:len(test["y_test"])], self.setup.mean, self.setup.std,
                       train=False, generator=None)
        half = len(x) // 2
        try:
            return inversion_attack(model, x[:half], x[half:], epochs=self.cfg.inversion_epochs,
                                    seed=stream_seed(self.cfg.seed, "inversion") % 2**31,
                                    device=self.algo.device)
        finally:
            if client is not None:
                self._put_back(client, keep=False)
            return_freed_memory()

    def evaluate_clients(self, cids: list[int], export: dict[str, State],
                         test: dict[str, np.ndarray]) -> dict[int, dict[str, float]]:
        """Test metrics of each listed client's own model (unshared client models)."""
        scores = {}
        for cid in cids:
            client = self._take(cid)
            scores[cid] = evaluate(self.algo.client_eval_model(client, export), test,
                                   self.setup, self.algo.device)
            self._put_back(client, keep=False)
        return scores

    # -------------------------------------------------------- checkpoints
    def checkpoint(self, location: str, tag: str) -> dict[int, tuple[str, int, str]]:
        """Write the state of clients that changed since the last checkpoint."""
        with self.lock:
            return self.states.checkpoint(RunFolder(location), "state/clients", tag)

    def restore(self, location: str, files: dict[int, tuple[str, int, str | None]]) -> None:
        with self.lock:
            self.states.restore(RunFolder(location), files)

    def close(self) -> None:
        self.states.close()


class ServerRuntime(_Process):
    """The server: the algorithm's server state, fed uploads in simulated arrival order."""

    def __init__(self, setup: Setup, test: dict[str, np.ndarray], spill_dir: str | None = None):
        super().__init__(setup, setup.config.server_gpus)
        self.spill_dir = spill_dir
        self.state = self._fresh_state()
        self.test = test
        self.observers = server_observers(self.algo)

    def _fresh_state(self) -> ServerState:
        state = self.algo.init_server()
        state.clients = self.store(self.spill_dir)
        return state

    def serve(self, rnd: int, uploads: list[tuple[int, int]], *produced: dict[int, Upload]):
        """Serve one upload, or a barrier group at once (one reply per upload)."""
        payloads = [out[k] for (cid, k), out in zip(uploads, produced)]
        with seeded(self.cfg.seed, "serve", rnd, *uploads[0]):
            replies = observed_serve(self.algo, self.state, rnd, payloads, self.observers)
        return replies[0] if len(replies) == 1 else tuple(replies)

    def end_round(self, rnd: int, global_state: dict[str, State],
                  weights: dict[int, float]) -> dict[str, Any]:
        self.algo.end_server_round(self.state, rnd, global_state, weights)
        release_gradients(self.state.models)
        metrics, self.state.metrics = self.state.metrics, {}
        per_client, self.state.client_metrics = self.state.client_metrics, {}
        _check_finite(metrics, rnd, "the server")
        return {"metrics": metrics, "client_metrics": per_client,
                "state_bytes": self.algo.server_state_bytes(self.state)}

    def evaluate(self, global_state: dict[str, State]) -> dict[str, float]:
        return evaluate(self.algo.eval_model(self.state, global_state), self.test, self.setup,
                        self.algo.device)

    def eval_export(self) -> dict[str, State]:
        return self.algo.eval_export(self.state)

    # -------------------------------------------------------- checkpoints
    def checkpoint(self, location: str, tag: str) -> dict[str, Any]:
        """Write the server's models and optimizers, and the per-client state that changed."""
        folder = RunFolder(location)
        arrays = {}
        for name, model in self.state.models.items():
            arrays.update({f"model.{name}.{k}": v for k, v in to_state(model).items()})
        for name, optimizer in self.state.optimizers.items():
            arrays.update({f"optimizer.{name}.{k}": v
                           for k, v in optimizer.state_arrays().items()})
        server = f"state/server.{tag}.safetensors"
        data = to_safetensors(arrays)
        folder.write_bytes(server, data)
        clients = self.state.clients.checkpoint(folder, "state/server-clients", tag)
        return {"server": server, "server_sha256": digest(data), "clients": clients}

    def restore(self, location: str, server: str, server_sha256: str | None,
                clients: dict[int, tuple[str, int, str | None]]) -> None:
        folder = RunFolder(location)
        self.state.clients.close()
        self.state = self._fresh_state()
        where = folder.path(server)
        arrays = from_safetensors(read_verified(folder.read_bytes(server), server_sha256, where),
                                  where)
        for name, model in self.state.models.items():
            prefix = f"model.{name}."
            load_state(model, {k[len(prefix):]: v for k, v in arrays.items()
                               if k.startswith(prefix)})
        for name, optimizer in self.state.optimizers.items():
            prefix = f"optimizer.{name}."
            optimizer.load_state_arrays({k[len(prefix):]: v for k, v in arrays.items()
                                         if k.startswith(prefix)})
        self.state.clients.restore(folder, clients)

    def close(self) -> None:
        self.state.clients.close()
