"""The contract between an algorithm and the engine.

An algorithm says, in plain torch and without Ray:

* **what is sent, and when**: :meth:`Algorithm.plan_client_round` returns
  the bytes by kind and the FLOPs of each local iteration, and which
  iterations upload to the server and wait for its reply. The simulated
  clock and the dry run are derived from this alone.
* **what a client is**: :meth:`build_client` makes a worker's working
  models and optimizers (once, not per client), and :attr:`client_keeps`
  names the part of them that persists per client between its rounds
  (FSL-SAGE's own x_a,i, optimizer moments). The engine stores that part as
  arrays, loads it into the working models when the client takes part, and
  writes it back when its round ends; a client's first state comes from
  :meth:`fresh_client_models`, seeded by its id.
* **what a client does**: :meth:`start_round` (load the broadcast),
  :meth:`forward` (iteration k up to the cut layer; returns the upload, if
  the plan has one at k), :meth:`receive` (a server reply arrives),
  :meth:`backward` (finish iteration k), :meth:`end_round` (what the client
  uploads at the end, by name).
* **what the server does**: :meth:`serve` (one upload, in simulated arrival
  order; returns the reply, if the plan has one), :meth:`end_server_round`.
  Per-client server state lives in ``server.clients``, a store of arrays
  like the clients' own.
* **what is aggregated**: the names in :attr:`aggregated` are averaged by
  the engine with weights n_i / sum n_j, in client-id order, into the global
  state that is broadcast next round.

The engine never branches on an algorithm's name. The driver uses an
algorithm only to plan and average, so nothing here imports torch before a
tensor is needed (see :mod:`raysage.lazy`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import cached_property
from typing import TYPE_CHECKING, Any, ClassVar, Iterable

import numpy as np

from ..config import Config, build_config
from ..errors import RaysageError
from ..lazy import nn, torch
from ..models import frozen_bytes, frozen_names, split_loss, transfer_bytes, transfer_state
from ..netsim.cost import ModelCosts
from ..netsim.planner import ClientRoundPlan
from ..store import StateStore
from ..streams import global_rng, seeded, stream_seed, unseeded
from .optim import Optimizer

if TYPE_CHECKING:
    from ..models import SplitArchitecture

State = dict[str, np.ndarray]          # a model's state dict as numpy arrays (zero-copy in Ray)
LABEL_BYTES = 8                        # labels travel as int64

__all__ = ["Algorithm", "ClientState", "Keeps", "ModelSizes", "ServerState", "Setup", "State",
           "stream_seed"]


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
        with global_rng(0):
            client, server, aux = arch.make_client(), arch.make_server(), arch.make_aux()
        return cls(transfer_bytes(client), transfer_bytes(server), transfer_bytes(aux),
                   arch.smashed_bytes_per_sample, arch.label_bytes,
                   math.prod(arch.cut_shape) * 4, frozen_bytes(client), frozen_bytes(server),
                   frozen_bytes(aux))

    def __post_init__(self):
        if not self.grad_per_sample:
            object.__setattr__(self, "grad_per_sample", self.smashed_per_sample)


@dataclass(frozen=True)
class Setup:
    """Everything needed to rebuild an algorithm anywhere: driver, worker or server."""

    config: dict[str, Any]
    num_classes: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    sizes: ModelSizes
    costs: ModelCosts

    def algorithm(self) -> "Algorithm":
        from . import algorithm_class

        return algorithm_class(self.config["algorithm"])(self)


@dataclass(frozen=True)
class Keeps:
    """What of a client's working set outlives its round, by name.

    ``models`` are kept whole (their state dicts, frozen weights aside);
    ``optimizers`` keep their per-parameter state (Adam's moments and step
    count, SGD's momentum). Anything not named is overwritten at the start of
    every round, by the broadcast or a hand-over, and is never stored.
    """

    models: tuple[str, ...] = ()
    optimizers: tuple[str, ...] = ()


@dataclass
class ClientState:
    """The working set a worker runs one client's round in.

    Its models and optimizers are built once and reused for client after
    client; ``cid`` and the kept state say whose round it currently is.
    """

    cid: int
    num_samples: int
    models: dict[str, nn.Module] = field(default_factory=dict)
    optimizers: dict[str, Optimizer] = field(default_factory=dict)
    carry: dict[str, Any] = field(default_factory=dict)   # forward -> backward of one iteration
    metrics: dict[str, float] = field(default_factory=dict)  # this round's sums

    def log(self, name: str, value: float) -> None:
        self.metrics[name] = self.metrics.get(name, 0.0) + float(value)


@dataclass
class ServerState:
    models: dict[str, nn.Module] = field(default_factory=dict)
    optimizers: dict[str, Optimizer] = field(default_factory=dict)
    # What the server keeps per client between rounds, as arrays (RAM budget, spill).
    clients: StateStore = field(default_factory=lambda: StateStore(budget=0))
    # Per-client objects alive during a round only (SplitFed v1's copies of x_s),
    # and those put away after it, to be reused for other clients.
    live: dict[int, dict[str, Any]] = field(default_factory=dict)
    spare: list[dict[str, Any]] = field(default_factory=list)
    metrics: dict[str, float] = field(default_factory=dict)     # this round's sums
    # This round's sums per client (measurements made where the server is).
    client_metrics: dict[int, dict[str, float]] = field(default_factory=dict)

    def log(self, name: str, value: float) -> None:
        self.metrics[name] = self.metrics.get(name, 0.0) + float(value)

    def log_client(self, cid: int, name: str, value: float) -> None:
        sums = self.client_metrics.setdefault(cid, {})
        sums[name] = sums.get(name, 0.0) + float(value)


# ----------------------------------------------------------------- helpers

def as_tensor(array: np.ndarray) -> torch.Tensor:
    """A tensor on the array's memory; read-only arrays (read zero-copy from
    Ray's object store) are copied first, since torch must not share them."""
    return torch.from_numpy(array if array.flags.writeable else array.copy())


def to_state(module: nn.Module) -> State:
    """What of a model travels: its state without frozen parameters (a LoRA
    model's base weights are the same everywhere and never change)."""
    return {k: v.detach().cpu().numpy().copy() for k, v in transfer_state(module).items()}


class StateMismatch(RaysageError):
    """Arrays (a checkpoint's, a client's) that do not fit the model they are loaded into."""


def load_state(module: nn.Module, state: State) -> None:
    try:
        missing, unexpected = module.load_state_dict(
            {k: torch.from_numpy(np.array(v)) for k, v in state.items()}, strict=False)
    except RuntimeError as exc:  # shapes that differ
        raise StateMismatch(f"state does not fit the model: {str(exc).splitlines()[-1].strip()}"
                            ) from None
    absent = set(missing) - frozen_names(module)
    if unexpected or absent:
        raise StateMismatch(f"state does not fit the model: missing {sorted(absent)[:3]}, "
                            f"unexpected {sorted(unexpected)[:3]}")


def state_nbytes(obj: Any, _seen: set[int] | None = None) -> int:
    """Bytes held by models (parameters, buffers, gradients), optimizer state and arrays."""
    seen = set() if _seen is None else _seen
    if id(obj) in seen:
        return 0
    seen.add(id(obj))
    if isinstance(obj, np.ndarray):
        return obj.nbytes
    if isinstance(obj, dict):
        return sum(state_nbytes(v, seen) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(state_nbytes(v, seen) for v in obj)
    if isinstance(obj, StateStore):
        return obj.total_bytes
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, nn.Module):
        total = sum(state_nbytes(t, seen) for t in obj.state_dict(keep_vars=True).values())
        return total + sum(state_nbytes(p.grad, seen) for p in obj.parameters()
                           if p.grad is not None)
    if isinstance(obj, Optimizer):
        return obj.nbytes()
    return 0


def release_gradients(obj: Any) -> None:
    """Drop the gradients of every model in obj: between rounds they are dead weight,
    and a checkpoint does not keep them, so state is the same restored or not."""
    if isinstance(obj, dict):
        for value in obj.values():
            release_gradients(value)
    elif isinstance(obj, (list, tuple)):
        for value in obj:
            release_gradients(value)
    elif isinstance(obj, nn.Module):
        obj.zero_grad(set_to_none=True)


def make_optimizer(kind: str, params, lr: float, weight_decay: float,
                   momentum: float) -> Optimizer:
    """SGD, Adam, or AdamW (decoupled weight decay, as the paper's GPT-2 fine-tuning)."""
    return Optimizer(kind, params, lr=lr, weight_decay=weight_decay, momentum=momentum)


def cross_entropy_grad(model: nn.Module, h: torch.Tensor, y: torch.Tensor,
                       create_graph: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, dL/dh) of the batch-mean cross-entropy of model(h)."""
    leaf = h if h.requires_grad else h.detach().requires_grad_()
    loss = split_loss(model(leaf), y)
    (grad,) = torch.autograd.grad(loss, leaf, create_graph=create_graph)
    return loss, grad


# ------------------------------------------------------- estimate quality
#
# FSL-SAGE, CSE-FSL and FSL_AN train the client on a stand-in for the server's
# gradient at the cut: x_a's gradient estimate, or a local loss. How close that
# stand-in is, at each upload, is measured as an observer: with the cut-layer
# gradient the server's x_s would return for the same batch right then. The
# measurement draws nothing from the training's random streams and moves no
# model, so results are the same with it on or off.

def gradient_of(model: nn.Module, h: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """d/dh of model's batch-mean cross-entropy on (h, y), leaving model untouched:
    no parameter gradients, BatchNorm statistics restored, torch's generator too."""
    with global_rng():
        saved = {name: buf.clone() for name, buf in model.named_buffers()}
        _, grad = cross_entropy_grad(model, h.detach(), y)
        with torch.no_grad():
            for name, buf in model.named_buffers():
                buf.copy_(saved[name])
    return grad


def log_agreement(log, used: torch.Tensor, true: torch.Tensor) -> None:
    """Log the cosine and NMSE of the gradient a client used against the true one
    (over the whole batch), and that one upload was measured."""
    u, t = used.detach().flatten().double(), true.detach().flatten().double()
    log("estimate_cosine_sum", float(u @ t / (u.norm() * t.norm()).clamp_min(1e-300)))
    log("estimate_nmse_sum", float((u - t).pow(2).sum() / t.pow(2).sum().clamp_min(1e-300)))
    log("estimate_measured", 1)


class WeightedAverage:
    """FedAvg of whole states (parameters and buffers), added one client at a time.

    Clients are added in id order so that the floating-point sum, and hence
    the result, is the same whatever worker computed each state; only one
    state needs to be in memory at a time. Sums run in float64 and are cast
    back to each entry's dtype (integer buffers such as BatchNorm's
    num_batches_tracked are rounded).
    """

    def __init__(self):
        self.sums: dict[str, np.ndarray] | None = None
        self.dtypes: dict[str, np.dtype] = {}

    def add(self, weight: float, state: State) -> None:
        if self.sums is None:
            self.sums = {name: np.zeros(arr.shape, np.float64) for name, arr in state.items()}
            self.dtypes = {name: arr.dtype for name, arr in state.items()}
        for name, acc in self.sums.items():
            acc += weight * state[name]

    def result(self) -> State:
        out = {}
        for name, acc in self.sums.items():
            dtype = self.dtypes[name]
            # (np.rint of a 0-d array is a scalar; asarray keeps every entry an array.)
            out[name] = np.asarray(np.rint(acc) if np.issubdtype(dtype, np.integer)
                                   else acc).astype(dtype)
        return out


def weighted_average(weighted_states: Iterable[tuple[float, State]]) -> State:
    average = WeightedAverage()
    for weight, state in weighted_states:
        average.add(weight, state)
    return average.result()


# ------------------------------------------------------------- the contract

class Algorithm:
    name: ClassVar[str]
    description: ClassVar[str]
    aggregated: ClassVar[tuple[str, ...]] = ()
    # What of a client outlives its round (see Keeps); the engine stores it.
    client_keeps: ClassVar[Keeps] = Keeps()
    # False for algorithms whose server only averages (FedAvg): the driver
    # averages, so no server process is started, and a worker evaluates.
    has_server: ClassVar[bool] = True
    # Unshared client models (SGLR) are evaluated client by client, on a
    # seeded sample of clients, instead of as one global model.
    evaluate_on_clients: ClassVar[bool] = False

    def __init__(self, setup: Setup):
        self.setup = setup
        self.cfg = build_config(setup.config)
        self.sizes, self.costs = setup.sizes, setup.costs
        # Set by the runtime hosting this instance (a GPU when it reserved one).
        self.device: Any = "cpu"
        self._eval_models: dict[str, nn.Module] = {}

    @classmethod
    def from_config(cls, cfg: Config, num_classes: int = 10) -> "Algorithm":
        """An instance for a config, with sizes and costs counted here (tests, notebooks)."""
        from ..models import architecture
        from ..netsim.cost import measure_costs

        arch = architecture(cfg, num_classes)
        setup = Setup(cfg.to_dict(), num_classes, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25),
                      ModelSizes.of(arch), measure_costs(arch))
        return cls(setup)

    @cached_property
    def arch(self) -> SplitArchitecture:
        """The split model, built on first use (never on the driver)."""
        from ..models import architecture

        return architecture(self.cfg, self.setup.num_classes)

    def place(self, module: nn.Module) -> nn.Module:
        return module.to(self.device)

    def tensor(self, array: np.ndarray) -> torch.Tensor:
        return as_tensor(array).to(self.device)

    # -- optimizers, one place so every algorithm builds them alike
    def client_optimizer(self, module: nn.Module) -> Optimizer:
        c = self.cfg
        return make_optimizer(c.client_optimizer, module.parameters(), c.client_lr,
                              c.client_weight_decay, c.momentum)

    def server_optimizer(self, module: nn.Module) -> Optimizer:
        c = self.cfg
        return make_optimizer(c.server_optimizer, module.parameters(), c.server_lr,
                              c.server_weight_decay, c.momentum)

    def aux_optimizer(self, module: nn.Module) -> Optimizer:
        c = self.cfg
        return make_optimizer(c.aux_optimizer, module.parameters(), c.aux_lr,
                              c.aux_weight_decay, c.momentum)

    # -- the two moves every split algorithm shares
    @staticmethod
    def smashed_upload(smashed: torch.Tensor, y: torch.Tensor) -> dict[str, np.ndarray]:
        """What crosses the network for one batch: the smashed activations and labels."""
        return {"smashed": smashed.detach().cpu().numpy(), "y": y.cpu().numpy()}

    @staticmethod
    def server_step(server: "ServerState", x_s: nn.Module, optimizer: Optimizer,
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
        if kind in ("adam", "adamw"):
            return 2
        return 1 if self.cfg.momentum > 0 else 0

    def server_model_bytes(self, live_clients: int) -> int:
        """The server's models with gradients and optimizer state, and whatever it holds
        per client during a round (``live_clients`` take part at once)."""
        return self.sizes.server * (2 + self.optimizer_copies(self.cfg.server_optimizer))

    def server_client_bytes(self, batch_sizes: list[int], rounds: int) -> int:
        """What the server keeps, at most, per client between rounds, for a client with
        these local batches that takes part in up to ``rounds`` rounds."""
        return 0

    def plan_state(self) -> dict[str, Any]:
        """What planning remembers between rounds, for checkpoints (JSON-able)."""
        return {}

    def load_plan_state(self, state: dict[str, Any]) -> None:
        pass

    def aggregate(self, rnd: int, results: Iterable[tuple[int, int, dict[str, State]]],
                  total: int, global_state: dict[str, State]) -> dict[str, State]:
        """New global state from (cid, n_i, uploaded states), given in client-id order.

        FedAvg of every name in ``aggregated`` with weights n_i / total, where
        total = sum n_j over the round's participants. ``results`` is consumed
        once, one client at a time.
        """
        sums = {name: WeightedAverage() for name in self.aggregated}
        for _, n, states in results:
            for name, average in sums.items():
                average.add(n / total, states[name])
        if not total:  # everyone dropped: nothing to average
            return dict(global_state)
        return dict(global_state) | {name: average.result() for name, average in sums.items()}

    # -- global state
    def init_global(self) -> dict[str, State]:
        raise NotImplementedError

    # -- client side
    def build_client(self, client: ClientState) -> None:
        """Build the working models and optimizers a worker runs its clients in."""
        raise NotImplementedError

    def fresh_client_models(self, cid: int) -> dict[str, nn.Module]:
        """Kept models of a client that has never taken part, seeded by its id."""
        return {}

    def new_client(self, cid: int, num_samples: int) -> ClientState:
        """A working set holding client cid's first state (tests and notebooks)."""
        client = ClientState(cid, num_samples)
        self.build_client(client)
        load_kept(self, client, None)
        return client

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

    def server_state_bytes(self, server: ServerState) -> int:
        """Bytes a real server holds: models, optimizer state and per-client state."""
        return state_nbytes([server.models, server.optimizers, server.clients])

    def eval_model(self, server: ServerState, global_state: dict[str, State]) -> nn.Module:
        """The model whose test accuracy is reported: the global x_c below the server's x_s."""
        lower = self._eval_part("client", self.arch.make_client)
        load_state(lower, global_state["client"])
        return nn.Sequential(lower, server.models["server"])

    def _eval_part(self, name: str, build) -> nn.Module:
        """A model kept for evaluation only (never part of the simulated state)."""
        if name not in self._eval_models:
            self._eval_models[name] = self.place(build())
        return self._eval_models[name]

    # -- per-client evaluation (evaluate_on_clients)
    def eval_export(self, server: ServerState) -> dict[str, State]:
        """What a worker needs from the server to evaluate its clients."""
        return {"server": to_state(server.models["server"])}

    def client_eval_model(self, client: ClientState, export: dict[str, State]) -> nn.Module:
        raise NotImplementedError


# ------------------------------------------------------------- kept state

def save_kept(algo: Algorithm, client: ClientState) -> State:
    """The client's kept state (see Keeps) as one flat mapping of arrays."""
    keeps = algo.client_keeps
    out: State = {}
    for name in keeps.models:
        out.update({f"model.{name}.{k}": v for k, v in to_state(client.models[name]).items()})
    for name in keeps.optimizers:
        out.update({f"optimizer.{name}.{k}": v
                    for k, v in client.optimizers[name].state_arrays().items()})
    return out


def load_kept(algo: Algorithm, client: ClientState, state: State | None) -> None:
    """Load a client's kept state into the working set; None: its first round."""
    keeps = algo.client_keeps
    if state is None:
        fresh = algo.fresh_client_models(client.cid)
        for name in keeps.models:
            client.models[name].load_state_dict(fresh[name].state_dict())
        for name in keeps.optimizers:
            client.optimizers[name].load_state_arrays(None)
        return
    for name in keeps.models:
        prefix = f"model.{name}."
        load_state(client.models[name], {k[len(prefix):]: v for k, v in state.items()
                                         if k.startswith(prefix)})
    for name in keeps.optimizers:
        prefix = f"optimizer.{name}."
        client.optimizers[name].load_state_arrays(
            {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)})
