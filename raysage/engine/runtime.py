"""What runs inside a client worker and inside the server.

These are plain classes: the serial backend calls them in-process and the
Ray backend wraps them with ``ray.remote``, so both backends execute the
same code on the same inputs.
"""

from __future__ import annotations

import io
import math
import os
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import numpy as np
import torch

from ..algorithms import ClientState, ModelSizes, algorithm_class
from ..algorithms.base import (Algorithm, State, as_tensor, release_gradients, seeded,
                               state_nbytes, stream_seed)
from ..config import Config, build_config
from ..data import make_batch
from ..errors import RaysageError
from ..models import correct_predictions, count_targets, get_architecture, split_loss
from ..netsim.cost import ModelCosts
from ..netsim.planner import Segment


@dataclass(frozen=True)
class Setup:
    """Everything a worker or the server needs to rebuild the algorithm."""

    config: dict[str, Any]
    num_classes: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    sizes: ModelSizes
    costs: ModelCosts

    def algorithm(self) -> Algorithm:
        cfg = build_config(self.config)
        arch = architecture(cfg, self.num_classes)
        return algorithm_class(cfg.algorithm)(cfg, arch, self.sizes, self.costs)


def lora_rank(cfg: Config) -> int:
    if cfg.lora_rank is not None:
        return cfg.lora_rank
    return 4 if cfg.weights_dir else 0


def architecture(cfg: Config, num_classes: int):
    """The config's split model (the language-model fields matter only for gpt2)."""
    return get_architecture(cfg.model, num_classes, gpt2_size=cfg.gpt2_size,
                            seq_len=cfg.seq_len, cut_layer=cfg.cut_layer,
                            aux_depth=cfg.aux_depth, lora_rank=lora_rank(cfg),
                            lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                            weights_dir=cfg.weights_dir, seed=cfg.seed)


class NonFiniteLoss(RaysageError):
    pass


@dataclass
class ClientResult:
    """What a client's round ends with: its uploads by name, its metrics, its size."""

    states: dict[str, State]
    metrics: dict[str, float]
    num_samples: int
    state_bytes: int          # the client's persistent state (models, optimizer, buffers)


def _threads(cfg: Config) -> None:
    torch.set_num_threads(cfg.torch_threads)


def pick_device(gpus: float) -> torch.device:
    """The GPU Ray assigned to this actor (fractions share one), else the CPU."""
    if gpus > 0 and torch.cuda.is_available():
        return torch.device("cuda")
    return torch.device("cpu")


def num_batches(num_samples: int, batch_size: int) -> int:
    return math.ceil(num_samples / batch_size)


def batch_sizes(num_samples: int, cfg: Config) -> list[int]:
    """Sizes of a client's local iterations in one round (the last batch may be short)."""
    per_epoch = [min(cfg.batch_size, num_samples - j * cfg.batch_size)
                 for j in range(num_batches(num_samples, cfg.batch_size))]
    return per_epoch * cfg.local_epochs


@lru_cache(maxsize=8)
def _epoch_order(seed: int, cid: int, rnd: int, epoch: int, n: int) -> np.ndarray:
    return np.random.default_rng(stream_seed(seed, "shuffle", cid, rnd, epoch)).permutation(n)


def batch_indices(cfg: Config, indices: np.ndarray, cid: int, rnd: int, k: int) -> np.ndarray:
    """Training-set indices of client cid's k-th local batch in round rnd.

    A pure function of (seed, client, round, k), so a client's batches do not
    depend on how its round is cut into segments or where it runs.
    """
    per_epoch = num_batches(len(indices), cfg.batch_size)
    epoch, j = divmod(k, per_epoch)
    order = _epoch_order(cfg.seed, cid, rnd, epoch, len(indices))
    return indices[order[j * cfg.batch_size:(j + 1) * cfg.batch_size]]


def client_batch(cfg: Config, data: dict[str, np.ndarray], mean, std, indices: np.ndarray,
                 cid: int, rnd: int, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The augmented, normalised k-th batch of a client (also used by tests)."""
    idx = batch_indices(cfg, indices, cid, rnd, k)
    augment = torch.Generator().manual_seed(stream_seed(cfg.seed, "augment", cid, rnd, k))
    x = make_batch(data["x_train"][idx], mean, std, train=True, generator=augment)
    return x, torch.from_numpy(np.asarray(data["y_train"][idx], dtype=np.int64))


def _check_finite(metrics: dict[str, float], rnd: int, who: str) -> None:
    for name, value in metrics.items():
        if not math.isfinite(value):
            raise NonFiniteLoss(f"{name.replace('_sum', '')} became {value} in round {rnd} "
                                f"at {who}; lower the learning rate or check the data")


def to_blob(obj: Any) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def from_blob(blob: bytes) -> Any:
    # Our own checkpoint (models, optimizers, arrays), written by this code;
    # full unpickling is needed to restore optimizer objects bound to modules.
    return torch.load(io.BytesIO(blob), map_location="cpu", weights_only=False)


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


@torch.no_grad()
def evaluate(model, test: dict[str, np.ndarray], setup: Setup, device,
             batch_size: int = 500) -> dict[str, float]:
    """Accuracy and mean loss of a model on the test split (eval mode, then back)."""
    model.eval()
    x_all, y_all = test["x_test"], test["y_test"]
    correct, loss, units = 0, 0.0, 0
    try:
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
    # Per sample for classifiers; per target token (and token accuracy) for language models.
    return {"accuracy": correct / units, "test_loss": loss / units}


class _Process:
    """What the orchestrator asks of any actor process: who and where it is, its memory."""

    def pid(self) -> int:
        return os.getpid()

    def node(self) -> str:
        return node_address()

    def memory(self) -> dict[str, int]:
        return process_memory()


class ClientRuntime(_Process):
    """A client worker: hosts a shard of virtual clients and their persistent state."""

    def __init__(self, setup: Setup, train: dict[str, np.ndarray],
                 client_indices: dict[int, np.ndarray]):
        self.cfg = build_config(setup.config)
        _threads(self.cfg)
        self.setup = setup
        self.algo = setup.algorithm()
        self.algo.device = pick_device(self.cfg.gpus_per_worker)
        self.train = train
        self.indices = client_indices
        self.clients: dict[int, ClientState] = {}
        for cid in sorted(client_indices):
            client = ClientState(cid, len(client_indices[cid]))
            self.algo.init_client(client)
            self.clients[cid] = client

    def run_segment(self, rnd: int, segment: Segment,
                    start: dict[str, State] | ClientResult | None,
                    reply: Any) -> tuple[dict[int, Any], ClientResult | None]:
        """Run one segment of a client's round; returns (uploads by k, end-of-round result).

        A first segment starts from ``start``: the round's broadcast, or, for a
        sequential protocol, the previous client's result (its hand-over).
        """
        # Dropout (LoRA's) draws from torch's global generator: seed it per
        # segment so that results do not depend on which worker runs what.
        with seeded(self.cfg.seed, "segment", segment.cid, rnd, segment.index):
            return self._run_segment(rnd, segment, start, reply)

    def _run_segment(self, rnd, segment, start, reply):
        algo, client = self.algo, self.clients[segment.cid]
        if segment.is_first:
            client.metrics = {}
            if isinstance(start, ClientResult):
                start = start.states
            algo.start_round(client, rnd, start)
        if segment.reply_of is not None:
            algo.receive(client, rnd, reply)
        if segment.resume is not None:
            algo.backward(client, rnd, segment.resume)
        uploads = {}
        for k in range(segment.first, segment.stop):
            x, y = client_batch(self.cfg, self.train, self.setup.mean, self.setup.std,
                                self.indices[segment.cid], segment.cid, rnd, k)
            upload = algo.forward(client, rnd, k, x.to(algo.device), y.to(algo.device))
            if upload is not None:
                uploads[k] = upload
            if k == segment.blocked_at:
                break
            algo.backward(client, rnd, k)
        if not segment.is_last:
            return uploads, None
        _check_finite(client.metrics, rnd, f"client {segment.cid}")
        states = algo.end_round(client, rnd)
        release_gradients(client.models)
        return uploads, ClientResult(states, dict(client.metrics), client.num_samples,
                                     state_nbytes([client.models, client.optimizers]))

    @torch.no_grad()
    def evaluate_clients(self, cids: list[int], export: dict[str, State],
                         test: dict[str, np.ndarray]) -> dict[int, dict[str, float]]:
        """Test metrics of each listed client's own model (unshared client models)."""
        return {cid: evaluate(self.algo.client_eval_model(self.clients[cid], export), test,
                              self.setup, self.algo.device)
                for cid in cids}

    def export_state(self) -> bytes:
        """Every hosted client's persistent state, for a checkpoint."""
        return to_blob(self.clients)

    def import_state(self, blob: bytes) -> None:
        self.clients = from_blob(blob)
        for client in self.clients.values():
            for model in client.models.values():
                model.to(self.algo.device)


class ServerRuntime(_Process):
    """The server: the algorithm's server state, fed uploads in simulated arrival order."""

    def __init__(self, setup: Setup, test: dict[str, np.ndarray]):
        self.cfg = build_config(setup.config)
        _threads(self.cfg)
        self.setup = setup
        self.algo = setup.algorithm()
        self.algo.device = pick_device(self.cfg.server_gpus)
        self.state = self.algo.init_server()
        self.test = test

    def serve(self, rnd: int, uploads: list[tuple[int, int]], *produced: dict[int, Any]):
        """Serve one upload, or a barrier group at once (one reply per upload)."""
        payloads = [(cid, k, out[k]) for (cid, k), out in zip(uploads, produced)]
        with seeded(self.cfg.seed, "serve", rnd, *uploads[0]):
            if len(payloads) == 1:
                return self.algo.serve(self.state, rnd, *payloads[0])
            return tuple(self.algo.serve_group(self.state, rnd, payloads))

    def end_round(self, rnd: int, global_state: dict[str, State],
                  weights: dict[int, float]) -> dict[str, Any]:
        self.algo.end_server_round(self.state, rnd, global_state, weights)
        release_gradients([self.state.models, self.state.per_client])
        metrics, self.state.metrics = self.state.metrics, {}
        _check_finite(metrics, rnd, "the server")
        return {"metrics": metrics,
                "state_bytes": state_nbytes([self.state.models, self.state.optimizers,
                                             self.state.per_client])}

    @torch.no_grad()
    def evaluate(self, global_state: dict[str, State]) -> dict[str, float]:
        return evaluate(self.algo.eval_model(self.state, global_state), self.test, self.setup,
                        self.algo.device)

    def eval_export(self) -> dict[str, State]:
        return self.algo.eval_export(self.state)

    def export_state(self) -> bytes:
        return to_blob(self.state)

    def import_state(self, blob: bytes) -> None:
        self.state = from_blob(blob)
        for model in self.state.models.values():
            model.to(self.algo.device)
