"""The contract between an algorithm and the engine.

An algorithm says, in plain torch and without Ray:

* **what is sent, and when**: :meth:`Algorithm.plan_client_round` returns
  the bytes by kind and the FLOPs of each local iteration, and which
  iterations upload to the server and wait for its reply. The simulated
  clock and the dry run are derived from this alone.
* **what a client does**: :meth:`start_round` (load the broadcast),
  :meth:`forward` (iteration k up to the cut layer; returns the upload, if
  the plan has one at k), :meth:`receive` (a server reply arrives),
  :meth:`backward` (finish iteration k), :meth:`end_round` (what the client
  uploads at the end, by name).
* **what the server does**: :meth:`serve` (one upload, in simulated arrival
  order; returns the reply, if the plan has one), :meth:`end_server_round`.
* **what is aggregated**: the names in :attr:`aggregated` are averaged by
  the engine with weights n_i / sum n_j, in client-id order, into the global
  state that is broadcast next round.

The engine never branches on an algorithm's name.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn as nn

from ..config import Config
from ..models import (SplitArchitecture, frozen_bytes, frozen_names, split_loss,
                      transfer_bytes, transfer_state)
from ..netsim.cost import ModelCosts
from ..netsim.planner import ClientRoundPlan

State = dict[str, np.ndarray]          # a model's state dict as numpy arrays (zero-copy in Ray)
LABEL_BYTES = 8                        # labels travel as int64


@dataclass(frozen=True)
class ModelSizes:
    """Bytes on the wire of each model part, and of the smashed data per sample."""

    client: int
    server: int
    aux: int
    smashed_per_sample: int
    labels_per_sample: int = LABEL_BYTES
    grad_per_sample: int = 0       # dL/dh: fp32 activations (no mask); 0 = smashed_per_sample
    # Frozen weights never travel; they are reported beside the traffic.
    client_frozen: int = 0
    server_frozen: int = 0
    aux_frozen: int = 0

    @classmethod
    def of(cls, arch: SplitArchitecture) -> "ModelSizes":
        with torch.random.fork_rng():
            torch.manual_seed(0)
            client, server, aux = arch.make_client(), arch.make_server(), arch.make_aux()
        return cls(transfer_bytes(client), transfer_bytes(server), transfer_bytes(aux),
                   arch.smashed_bytes_per_sample, arch.label_bytes,
                   math.prod(arch.cut_shape) * 4, frozen_bytes(client), frozen_bytes(server),
                   frozen_bytes(aux))

    def __post_init__(self):
        if not self.grad_per_sample:
            object.__setattr__(self, "grad_per_sample", self.smashed_per_sample)


@dataclass
class ClientState:
    """One virtual client's persistent state, kept by the worker that hosts it."""

    cid: int
    num_samples: int
    models: dict[str, nn.Module] = field(default_factory=dict)
    optimizers: dict[str, torch.optim.Optimizer] = field(default_factory=dict)
    carry: dict[str, Any] = field(default_factory=dict)   # forward -> backward of one iteration
    metrics: dict[str, float] = field(default_factory=dict)  # this round's sums

    def log(self, name: str, value: float) -> None:
        self.metrics[name] = self.metrics.get(name, 0.0) + float(value)


@dataclass
class ServerState:
    models: dict[str, nn.Module] = field(default_factory=dict)
    optimizers: dict[str, torch.optim.Optimizer] = field(default_factory=dict)
    per_client: dict[int, dict[str, Any]] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)     # this round's sums

    def log(self, name: str, value: float) -> None:
        self.metrics[name] = self.metrics.get(name, 0.0) + float(value)


# ----------------------------------------------------------------- helpers

def stream_seed(seed: int, *path: int | str) -> int:
    """A 63-bit seed for the random stream named by (seed, *path).

    Streams are named, not drawn in execution order, so results do not
    depend on which worker runs what or in which order.
    """
    words = [seed] + [w if isinstance(w, int) else int.from_bytes(w.encode(), "little") % 2**32
                      for w in path]
    return int(np.random.SeedSequence(words).generate_state(2, dtype=np.uint32).view(np.uint64)[0]
               >> np.uint64(1))


@contextlib.contextmanager
def seeded(seed: int, *path: int | str):
    """Run a block (e.g. model construction) on torch's RNG seeded by a named stream."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(stream_seed(seed, *path))
        yield


def as_tensor(array: np.ndarray) -> torch.Tensor:
    """A tensor on the array's memory; read-only arrays (read zero-copy from
    Ray's object store) are copied first, since torch must not share them."""
    return torch.from_numpy(array if array.flags.writeable else array.copy())


def to_state(module: nn.Module) -> State:
    """What of a model travels: its state without frozen parameters (a LoRA
    model's base weights are the same everywhere and never change)."""
    return {k: v.detach().cpu().numpy().copy() for k, v in transfer_state(module).items()}


def load_state(module: nn.Module, state: State) -> None:
    missing, unexpected = module.load_state_dict(
        {k: torch.from_numpy(np.array(v)) for k, v in state.items()}, strict=False)
    absent = set(missing) - frozen_names(module)
    if unexpected or absent:
        raise KeyError(f"state does not fit the model: missing {sorted(absent)}, "
                       f"unexpected {sorted(unexpected)}")


def state_nbytes(obj: Any, _seen: set[int] | None = None) -> int:
    """Bytes held by models (parameters, buffers, gradients), optimizer state and arrays."""
    seen = set() if _seen is None else _seen
    if id(obj) in seen:
        return 0
    seen.add(id(obj))
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, np.ndarray):
        return obj.nbytes
    if isinstance(obj, nn.Module):
        total = sum(state_nbytes(t, seen) for t in obj.state_dict(keep_vars=True).values())
        return total + sum(state_nbytes(p.grad, seen) for p in obj.parameters()
                           if p.grad is not None)
    if isinstance(obj, torch.optim.Optimizer):
        return sum(state_nbytes(v, seen) for st in obj.state.values() for v in st.values())
    if isinstance(obj, dict):
        return sum(state_nbytes(v, seen) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(state_nbytes(v, seen) for v in obj)
    return 0


def release_gradients(obj: Any) -> None:
    """Drop the gradients of every model in obj: between rounds they are dead weight,
    and a checkpoint does not keep them, so state is the same restored or not."""
    if isinstance(obj, nn.Module):
        obj.zero_grad(set_to_none=True)
    elif isinstance(obj, dict):
        for value in obj.values():
            release_gradients(value)
    elif isinstance(obj, (list, tuple)):
        for value in obj:
            release_gradients(value)


def make_optimizer(kind: str, params, lr: float, weight_decay: float,
                   momentum: float) -> torch.optim.Optimizer:
    if kind == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    if kind == "adamw":  # decoupled weight decay, as the paper's GPT-2 fine-tuning
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    return torch.optim.SGD(params, lr=lr, weight_decay=weight_decay, momentum=momentum)


def cross_entropy_grad(model: nn.Module, h: torch.Tensor, y: torch.Tensor,
                       create_graph: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, dL/dh) of the batch-mean cross-entropy of model(h)."""
    leaf = h if h.requires_grad else h.detach().requires_grad_()
    loss = split_loss(model(leaf), y)
    (grad,) = torch.autograd.grad(loss, leaf, create_graph=create_graph)
    return loss, grad


# ------------------------------------------------------------- the contract

class Algorithm:
    name: ClassVar[str]
    description: ClassVar[str]
    aggregated: ClassVar[tuple[str, ...]] = ()
    # Unshared client models (SGLR) are evaluated client by client, on a
    # seeded sample of clients, instead of as one global model.
    evaluate_on_clients: ClassVar[bool] = False

    def __init__(self, cfg: Config, arch: SplitArchitecture, sizes: ModelSizes,
                 costs: ModelCosts):
        self.cfg, self.arch, self.sizes, self.costs = cfg, arch, sizes, costs
        # Set by the runtime hosting this instance (a GPU when it reserved one).
        self.device = torch.device("cpu")

    def place(self, module: nn.Module) -> nn.Module:
        return module.to(self.device)

    def tensor(self, array: np.ndarray) -> torch.Tensor:
        return as_tensor(array).to(self.device)

    # -- optimizers, one place so every algorithm builds them alike
    def client_optimizer(self, module: nn.Module) -> torch.optim.Optimizer:
        c = self.cfg
        return make_optimizer(c.client_optimizer, module.parameters(), c.client_lr,
                              c.client_weight_decay, c.momentum)

    def server_optimizer(self, module: nn.Module) -> torch.optim.Optimizer:
        c = self.cfg
        return make_optimizer(c.server_optimizer, module.parameters(), c.server_lr,
                              c.server_weight_decay, c.momentum)

    def aux_optimizer(self, module: nn.Module) -> torch.optim.Optimizer:
        c = self.cfg
        return make_optimizer(c.aux_optimizer, module.parameters(), c.aux_lr,
                              c.aux_weight_decay, c.momentum)

    # -- the two moves every split algorithm shares
    @staticmethod
    def smashed_upload(smashed: torch.Tensor, y: torch.Tensor) -> dict[str, np.ndarray]:
        """What crosses the network for one batch: the smashed activations and labels."""
        return {"smashed": smashed.detach().cpu().numpy(), "y": y.cpu().numpy()}

    @staticmethod
    def server_step(server: "ServerState", x_s: nn.Module, optimizer: torch.optim.Optimizer,
                    smashed: torch.Tensor, y: torch.Tensor) -> None:
        """Step x_s on CE(x_s(h), y); dL/dh lands in smashed.grad if h requires it."""
        loss = split_loss(x_s(smashed), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        server.log("server_loss_sum", loss.item() * len(y))
        server.log("server_samples", len(y))

    # -- initial models; every algorithm seeds x_c and x_s from the same
    #    streams so that equivalence tests compare like with like.
    def initial_client_model(self) -> nn.Module:
        with seeded(self.cfg.seed, "init", "client"):
            return self.arch.make_client()

    def initial_server_model(self) -> nn.Module:
        with seeded(self.cfg.seed, "init", "server"):
            return self.arch.make_server()

    def initial_aux_model(self, cid: int | str) -> nn.Module:
        with seeded(self.cfg.seed, "init", "aux", cid):
            return self.arch.make_aux()

    # -- schedule (pure)
    def plan_round(self, rnd: int, batches: dict[int, list[int]]) -> list[ClientRoundPlan]:
        """Plans of the round's participants (cid -> batch sizes, in id order)."""
        return [self.plan_client_round(rnd, cid, sizes) for cid, sizes in batches.items()]

    def plan_client_round(self, rnd: int, cid: int, batch_sizes: list[int]) -> ClientRoundPlan:
        raise NotImplementedError

    def commit_round(self, rnd: int, participants: list[int]) -> None:
        """The round's final participants (planning may be redone when clients drop)."""

    def optimizer_copies(self, kind: str) -> int:
        """Model-sized tensors an optimizer keeps: Adam's two moments, SGD's momentum."""
        if kind == "adam":
            return 2
        return 1 if self.cfg.momentum > 0 else 0

    def estimated_server_bytes(self, num_clients: int) -> int:
        """The server's state: x_s with its gradients and optimizer state. Algorithms
        that keep per-client server state add it."""
        return self.sizes.server * (2 + self.optimizer_copies(self.cfg.server_optimizer))

    def plan_state(self) -> dict[str, Any]:
        """What planning remembers between rounds, for checkpoints."""
        return {}

    def load_plan_state(self, state: dict[str, Any]) -> None:
        pass

    def aggregate(self, rnd: int, results: list[tuple[int, int, dict[str, State]]],
                  global_state: dict[str, State]) -> dict[str, State]:
        """New global state from (cid, n_i, uploaded states), given in client-id order.

        FedAvg of every name in ``aggregated`` with weights n_i / sum n_j.
        """
        if not results:  # everyone dropped: nothing to average
            return dict(global_state)
        total = sum(n for _, n, _ in results)
        new = dict(global_state)
        for name in self.aggregated:
            new[name] = weighted_average([(n / total, states[name]) for _, n, states in results])
        return new

    # -- global state
    def init_global(self) -> dict[str, State]:
        raise NotImplementedError

    # -- client side
    def init_client(self, client: ClientState) -> None:
        raise NotImplementedError

    def start_round(self, client: ClientState, rnd: int, global_state: dict[str, State]) -> None:
        raise NotImplementedError

    def forward(self, client: ClientState, rnd: int, k: int, x: torch.Tensor,
                y: torch.Tensor) -> Any | None:
        raise NotImplementedError

    def receive(self, client: ClientState, rnd: int, reply: Any) -> None:
        raise NotImplementedError(f"{self.name} sends no replies to clients")

    def backward(self, client: ClientState, rnd: int, k: int) -> None:
        raise NotImplementedError

    def end_round(self, client: ClientState, rnd: int) -> dict[str, State]:
        raise NotImplementedError

    # -- server side
    def init_server(self) -> ServerState:
        return ServerState()

    def serve(self, server: ServerState, rnd: int, cid: int, k: int, upload: Any) -> Any | None:
        raise NotImplementedError(f"{self.name} sends nothing to the server during training")

    def serve_group(self, server: ServerState, rnd: int,
                    uploads: list[tuple[int, int, Any]]) -> list[Any]:
        """A barrier group of uploads (cid, k, upload), in client-id order; one reply each."""
        raise NotImplementedError(f"{self.name} plans no barrier groups")

    def end_server_round(self, server: ServerState, rnd: int, global_state: dict[str, State],
                         weights: dict[int, float]) -> None:
        """Server work after aggregation, e.g. averaging server-side copies with the
        participants' weights n_i / sum n_j (given in client-id order)."""

    def eval_model(self, server: ServerState, global_state: dict[str, State]) -> nn.Module:
        """The model whose test accuracy is reported: the global x_c below the server's x_s."""
        lower = server.models.get("eval_client")
        if lower is None:
            lower = server.models["eval_client"] = self.place(self.arch.make_client())
        load_state(lower, global_state["client"])
        return nn.Sequential(lower, server.models["server"])

    # -- per-client evaluation (evaluate_on_clients)
    def eval_export(self, server: ServerState) -> dict[str, State]:
        """What a worker needs from the server to evaluate its clients."""
        return {"server": to_state(server.models["server"])}

    def client_eval_model(self, client: ClientState, export: dict[str, State]) -> nn.Module:
        raise NotImplementedError


def weighted_average(weighted_states: list[tuple[float, State]]) -> State:
    """FedAvg of whole states (parameters and buffers), summed in the order given.

    The caller passes clients in id order so that the floating-point sum, and
    hence the result, is the same whatever worker computed each state.
    Sums run in float64 and are cast back to each entry's dtype (integer
    buffers such as BatchNorm's num_batches_tracked are rounded).
    """
    first = weighted_states[0][1]
    sums = {name: np.zeros(arr.shape, np.float64) for name, arr in first.items()}
    for weight, state in weighted_states:
        for name, acc in sums.items():
            acc += weight * state[name]
    out = {}
    for name, acc in sums.items():
        dtype = first[name].dtype
        out[name] = (np.rint(acc) if np.issubdtype(dtype, np.integer) else acc).astype(dtype)
    return out
