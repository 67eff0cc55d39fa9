"""The contract between an algorithm and the engine.

An algorithm is one class, in plain torch and without Ray, that reads like
its paper's pseudocode. The engine gives it clients, a server, the simulated
world and the bookkeeping (bytes, time, determinism, checkpoints, results);
the algorithm says what happens in a round through its hooks. Every
algorithm defines the first three; the others as its shape needs them
(``check_contract`` says which, when the algorithm is loaded):

``plan_client_round(rnd, p)``
    What client ``p.cid`` sends in round ``rnd``, and when: the bytes by kind
    of the broadcast and the end-of-round upload, the FLOPs of each local
    iteration, and an :class:`Exchange` for every iteration that uploads to
    the server (its bytes, the server's work, the reply's bytes, whether the
    client waits for it). This is the schedule, stated once: the simulated
    clock and the dry run (``raysage plan``) are derived from it without
    touching a tensor, and the client's code below reads it from its steps
    instead of stating it again. ``p.uploaded`` is how many samples the
    client uploaded in earlier rounds, which the engine counts from the
    plans' ``Exchange.samples`` (FSL-SAGE's alignment cost grows with the
    client's buffer at the server).

``build_client(client)``
    The working models and optimizers a worker trains its clients in, built
    once and reused client after client. :attr:`client_keeps` names what of
    them outlives a client's round (its own x_a, its optimizer's moments):
    the engine stores that part as arrays and loads it back when the client
    takes part again, so a client costs only its state. A client's first
    state comes from :meth:`fresh_client_models`, seeded by its id.

``client_round(client, rnd)``
    A client's local round, written once as a generator::

        def client_round(self, client, rnd):
            load_state(x_c, client.start["client"])      # the broadcast
            for step in client.steps():                  # the plan's iterations
                h = x_c(step.x)
                if step.uploads:                         # the plan has an Exchange here
                    reply = yield step.upload(smashed=h, y=step.y)
                ...                                      # backward, optimizer step
            return {"client": to_state(x_c)}             # what the client uploads

    ``yield step.upload(...)`` sends the arrays to the server; it evaluates
    to the server's reply when the plan's exchange is blocking, else to
    None. A reply the client does not wait for enters its computation before
    the first iteration that starts after it arrives on the simulated clock:
    ``replies = yield from step.arrivals()`` at the top of an iteration (and
    ``yield from client.arrivals()`` after the last one) hands them over, by
    the iteration that caused them. The engine cuts the generator at these
    points to interleave clients and server in simulated order, and checks
    the generator against the plan: an upload the plan does not have, or one
    it has that never comes, stops the run with one line that says where.

``serve(server, rnd, upload)``
    The server handling one upload, in simulated arrival order; returns the
    reply (None when the plan has none): a dict of arrays named as the byte
    kinds' ``carries`` say, a single array (the reply's one planned kind), or
    a :class:`StandIn`. Uploads whose exchanges share a ``group`` are a
    barrier, served together by ``serve_group``. Needed when plans exchange.

``fresh_client_models(cid)`` / ``fresh_client_tensors(cid)``
    A client's first kept models and tensors (see :class:`Keeps`), needed
    when ``client_keeps`` names any.

``aggregate(rnd, results, total, global_state)``
    The new global state. The default is FedAvg, with weights n_i / sum n_j
    in client-id order, of every part named in :attr:`aggregated`.

``init_global()`` / ``init_server()``
    The first global state (by default the initial models named in
    ``aggregated``) and the server's models; optional hooks cover the rest
    (``end_server_round``, evaluation, memory estimates). The global state is
    also where an algorithm without a server process keeps server state
    across rounds (SCAFFOLD's control variate): what a client reads of it is
    what it downloads.

``eval_model(server, global_state)``
    The model whose test accuracy is reported: by default the global x_c
    below the server's x_s, or, without a server process, the whole model of
    the global state.

Bytes are measured, not only declared: the engine holds what each client's
round moves (the broadcast parts it reads, its uploads, the replies, its
end-of-round upload) against its plan, kind by kind, and stops the run at a
difference (see :mod:`raysage.engine.traffic`). Sizes come from the engine
(:class:`ModelSizes`), never counted by hand.

Each algorithm owns its vocabulary: its parameters as a typed config section
(:attr:`Params`, a pydantic model: ``cfg.params``), the byte kinds its plans
use (:attr:`byte_kinds`, one column each in the results), the metrics it logs
(:attr:`metrics`: ``client.log(name, value, weight)`` and ``server.log``
become per-client and per-round columns), its ``label`` and ``colour`` in
reports. The engine never branches on an algorithm's name. Algorithms do not
inherit from one another; steps they share are functions in
:mod:`raysage.algorithms.steps`.

The driver uses an algorithm only to plan and average, so nothing here
imports torch before a tensor is needed (see :mod:`raysage.lazy`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import cached_property
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Generator, Iterable, Iterator, Literal

import numpy as np
from pydantic import Field

from ..lazy import nn, torch
from ..models import frozen_bytes, transfer_bytes
from ..netsim.cost import ModelCosts
from ..netsim.planner import ClientRoundPlan, Exchange
from ..params import OptimizerName, Section
from ..store import StateStore
from ..streams import global_rng, seeded, stream_seed, unseeded
from .optim import Optimizer
from .state import (State, WeightedAverage, as_tensor, load_kept, load_state, state_nbytes,
                    to_state)

if TYPE_CHECKING:
    from ..models import SplitArchitecture

LABEL_BYTES = 8                        # labels travel as int64

__all__ = ["Algorithm", "AuxParams", "ByteKind", "ByteTotal", "ClientState", "Exchange",
           "ClientRoundPlan", "Keeps", "Metric", "ModelSizes", "Participant", "Section",
           "ServerState", "Setup", "StandIn", "State", "Step", "Upload", "stream_seed"]


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
    # Trainable parameters only (no buffers): what a tensor shaped like a model's
    # parameters costs, e.g. SCAFFOLD's control variates.
    client_parameters: int = 0
    server_parameters: int = 0
    aux_parameters: int = 0

    @classmethod
    def of(cls, arch: SplitArchitecture) -> "ModelSizes":
        with global_rng(0):
            client, server, aux = arch.make_client(), arch.make_server(), arch.make_aux()
        return cls(transfer_bytes(client), transfer_bytes(server), transfer_bytes(aux),
                   arch.smashed_bytes_per_sample, arch.label_bytes,
                   math.prod(arch.cut_shape) * 4, frozen_bytes(client), frozen_bytes(server),
                   frozen_bytes(aux), parameter_bytes(client), parameter_bytes(server),
                   parameter_bytes(aux))

    def __post_init__(self):
        if not self.grad_per_sample:
            object.__setattr__(self, "grad_per_sample", self.smashed_per_sample)


@dataclass(frozen=True)
class Setup:
    """Everything needed to rebuild an algorithm anywhere: driver, worker or server.

    ``cls`` travels with it, so a worker on another node runs a user's
    algorithm from a file that only the driver's machine has (see
    :func:`raysage.algorithms.algorithm_class`).
    """

    config: Any          # the run's raysage.config.Config (config imports algorithms, not back)
    num_classes: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    sizes: ModelSizes
    costs: ModelCosts
    cls: type | None = None

    def algorithm(self) -> "Algorithm":
        from . import algorithm_class

        return (self.cls or algorithm_class(self.config.algorithm))(self)


# ---------------------------------------------------------------- vocabulary

class AuxParams(Section):
    """The optimizer of an auxiliary model x_a, for algorithms that train one."""

    aux_optimizer: OptimizerName = Field(
        "adam", description="optimizer of x_a when trained (alignment, local-loss methods)")
    aux_lr: float = Field(1e-3, gt=0.0, description="learning rate of x_a")
    aux_weight_decay: float = Field(0.0, ge=0.0, description="weight decay of x_a")


@dataclass(frozen=True)
class ByteKind:
    """A kind of traffic: one column of bytes per client and round.

    ``carries`` names what travels as this kind, in ``direction`` ("up": client
    to server, "down": server to client, "both"): arrays of an upload or a
    reply by their names, parts of the broadcast and of the end-of-round upload
    by theirs. The engine measures those and stops the run when they differ
    from the plan, so every byte that travels belongs to a kind.
    """

    name: str
    description: str
    # The FSL-SAGE paper counts every byte but the labels sent with smashed data.
    in_paper_total: bool = True
    carries: tuple[str, ...] = ()
    direction: Literal["up", "down", "both"] = "both"


@dataclass(frozen=True)
class ByteTotal:
    """A named sum of some of an algorithm's byte kinds, beside ``total_bytes``: a
    column per client and round, its running sum, and a line of the run's summary."""

    name: str                      # the column
    cumulative: str                # the running sum's column
    label: str                     # in summaries
    counts: Callable[[ByteKind], bool]

    def of(self, kinds: Iterable[ByteKind], bytes_by_kind: dict[str, int]) -> int:
        return sum(bytes_by_kind.get(kind.name, 0) for kind in kinds if self.counts(kind))


# The FSL-SAGE paper's total: every byte but the labels sent with smashed data.
PAPER_TOTAL = ByteTotal("paper_total_bytes", "cumulative_paper_bytes", "paper total",
                        lambda kind: kind.in_paper_total)


@dataclass(frozen=True)
class Metric:
    """A measurement an algorithm logs: ``log(name, value, weight)``.

    A client's column is the weighted mean of what was logged for it (by the
    client, or by the server with ``log_client``); NaN if nothing was. The
    round's column pools every weighted value of the round (``pooled``), or
    is the mean of the clients' columns (``client_mean``). ``count`` names a
    column holding the sum of the weights (how many measurements there were).
    ``per_client=False`` metrics are only logged by the server for the round.
    """

    name: str
    description: str
    per_round: Literal["pooled", "client_mean"] = "pooled"
    count: str | None = None
    per_client: bool = True


# What most algorithms send; an algorithm lists the kinds it uses in byte_kinds.
SMASHED_UP = ByteKind("smashed_up", "smashed activations h, client to server",
                      carries=("smashed",), direction="up")
LABELS_UP = ByteKind("labels_up", "labels sent with the smashed activations",
                     in_paper_total=False, carries=("y",), direction="up")
GRAD_DOWN = ByteKind("grad_down", "cut-layer gradients dL/dh, server to client",
                     carries=("grad",), direction="down")
CLIENT_MODEL_DOWN = ByteKind("client_model_down", "the global client model x_c, broadcast",
                             carries=("client",), direction="down")
CLIENT_MODEL_UP = ByteKind("client_model_up", "the client's x_c, uploaded for averaging",
                           carries=("client",), direction="up")
AUX_DOWN = ByteKind("aux_down", "an auxiliary model x_a, server to client", carries=("aux",),
                    direction="down")
AUX_UP = ByteKind("aux_up", "the client's x_a, uploaded for averaging", carries=("aux",),
                  direction="up")
HAND_OVER = ByteKind("server_model", "x_c handed to the next client through the server",
                     carries=("client",))

TRAIN_LOSS = Metric("train_loss", "training loss of the client's batches, per sample")
SERVER_LOSS = Metric("server_loss", "loss of the server model's steps, per sample",
                     per_client=False)


@dataclass(frozen=True)
class Keeps:
    """What of a client's working set outlives its round, by name.

    ``models`` are kept whole (their state dicts, frozen weights aside);
    ``optimizers`` keep their per-parameter state (Adam's moments and step
    count, SGD's momentum); ``tensors`` are plain tensors of the client's own
    (``client.tensors[name]``: SCAFFOLD's control variate c_i). A client's first
    models and tensors come from ``fresh_client_models`` and
    ``fresh_client_tensors``. Anything not named is overwritten at the start of
    every round, by the broadcast or a hand-over, and is never stored.
    """

    models: tuple[str, ...] = ()
    optimizers: tuple[str, ...] = ()
    tensors: tuple[str, ...] = ()


@dataclass(frozen=True)
class Participant:
    """What planning knows of a client in a round."""

    cid: int
    batch_sizes: list[int]       # of its local iterations, epochs included
    uploaded: int = 0            # samples it uploaded in earlier rounds (Exchange.samples)


# ---------------------------------------------------------- a client's round

@dataclass
class Upload:
    """Arrays a client sends to the server at local iteration ``k``.

    ``observed`` rides along for a measurement (an observer's copy, which the
    simulated system would not send): it is not traffic and is never counted.
    """

    cid: int
    k: int
    arrays: dict[str, np.ndarray]
    observed: dict[str, np.ndarray] = field(default_factory=dict)

    def __getitem__(self, name: str) -> np.ndarray:
        return self.arrays[name]

    def __contains__(self, name: str) -> bool:
        return name in self.arrays


@dataclass
class StandIn:
    """A reply the simulator moves in place of what the simulated system sends.

    FSL-SAGE's server sends the aligned x_a,i; raysage aligns in the client's
    worker, so the buffer and its targets travel instead. ``kind`` is the byte
    kind the real message has, and its bytes are measured as the transfer
    bytes of the client's working model ``model`` (the one the real message
    would replace), not as the arrays that stand in for it.
    """

    kind: str
    model: str
    arrays: dict[str, np.ndarray]

    def __getitem__(self, name: str) -> np.ndarray:
        return self.arrays[name]

    def __contains__(self, name: str) -> bool:
        return name in self.arrays


@dataclass(frozen=True)
class Wait:
    """Yielded by ``arrivals()``: the client needs replies that arrive before iteration k."""

    k: int


def parameter_bytes(module: nn.Module) -> int:
    """Bytes of a model's trainable parameters."""
    return sum(p.numel() * p.element_size() for p in module.parameters() if p.requires_grad)


def _array(value: Any) -> np.ndarray:
    if isinstance(value, np.ndarray):
        return value
    return value.detach().cpu().numpy()


class Step:
    """Local iteration ``k`` of a client's round: its batch and what the plan says of it."""

    def __init__(self, rounds, k: int):
        self._round, self.k = rounds, k
        self._batch = None

    @property
    def uploads(self) -> bool:
        """The plan has an upload to the server at this iteration."""
        return self.k in self._round.exchanges

    @property
    def waits(self) -> bool:
        """The upload's yield returns the server's reply (a blocking exchange)."""
        return self._round.exchanges.get(self.k, False)

    @property
    def x(self):
        return self._data()[0]

    @property
    def y(self):
        return self._data()[1]

    def _data(self):
        if self._batch is None:
            self._batch = self._round.batch(self.k)
        return self._batch

    def upload(self, observed: dict[str, Any] | None = None, **arrays: Any) -> Upload:
        """What to ``yield`` to send these tensors or arrays to the server (each named
        as a byte kind's ``carries`` says); ``observed``: arrays for a measurement
        only, not sent in the simulated system."""
        return Upload(self._round.cid, self.k, {name: _array(v) for name, v in arrays.items()},
                      {name: _array(v) for name, v in (observed or {}).items()})

    def arrivals(self) -> Generator[Wait, Any, dict[int, Any]]:
        """Replies that arrive before this iteration starts, by the iteration that sent
        their upload (empty when none does): ``replies = yield from step.arrivals()``."""
        return (yield from self._round.arrivals(self.k))


@dataclass
class ClientState:
    """The working set a worker runs one client's round in.

    Its models and optimizers are built once and reused for client after
    client; ``cid`` and the kept state say whose round it currently is.
    ``start`` holds what the round begins from: the broadcast global state,
    or a sequential protocol's hand-over.
    """

    cid: int
    num_samples: int
    models: dict[str, nn.Module] = field(default_factory=dict)
    optimizers: dict[str, Optimizer] = field(default_factory=dict)
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)  # Keeps.tensors
    start: dict[str, State] = field(default_factory=dict)
    metrics: dict[str, list[float]] = field(default_factory=dict)   # name -> [sum, weight]
    round: Any = None             # the engine's view of this round (steps, replies)

    def log(self, name: str, value: float, weight: float = 1.0) -> None:
        _add(self.metrics, name, value, weight)

    def steps(self) -> Iterator[Step]:
        """The round's local iterations, in order (epochs included)."""
        return self.round.steps()

    def arrivals(self) -> Generator[Wait, Any, dict[int, Any]]:
        """Replies that arrive after the last iteration started (see Step.arrivals)."""
        return (yield from self.round.arrivals(None))


def _add(sums: dict[str, list[float]], name: str, value: float, weight: float) -> None:
    entry = sums.setdefault(name, [0.0, 0.0])
    entry[0] += float(value) * weight
    entry[1] += weight


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
    metrics: dict[str, list[float]] = field(default_factory=dict)       # this round's
    # This round's measurements per client, made where the server is.
    client_metrics: dict[int, dict[str, list[float]]] = field(default_factory=dict)

    def log(self, name: str, value: float, weight: float = 1.0) -> None:
        _add(self.metrics, name, value, weight)

    def log_client(self, cid: int, name: str, value: float, weight: float = 1.0) -> None:
        _add(self.client_metrics.setdefault(cid, {}), name, value, weight)


def make_optimizer(kind: str, params, lr: float, weight_decay: float,
                   momentum: float) -> Optimizer:
    """SGD, Adam, or AdamW (decoupled weight decay, as the paper's GPT-2 fine-tuning)."""
    return Optimizer(kind, params, lr=lr, weight_decay=weight_decay, momentum=momentum)


# ------------------------------------------------------------- the contract

class Algorithm:
    name: ClassVar[str]
    label: ClassVar[str]                 # in reports, e.g. "FSL-SAGE"
    colour: ClassVar[str] = "#17becf"    # in every figure
    description: ClassVar[str]
    # The algorithm's own parameters: a config section (see Section).
    Params: ClassVar[type[Section]] = Section
    byte_kinds: ClassVar[tuple[ByteKind, ...]] = ()
    # Sums of byte kinds reported beside total_bytes (the paper's, by default).
    byte_totals: ClassVar[tuple[ByteTotal, ...]] = (PAPER_TOTAL,)
    metrics: ClassVar[tuple[Metric, ...]] = (TRAIN_LOSS,)
    aggregated: ClassVar[tuple[str, ...]] = ()
    # What of a client outlives its round (see Keeps); the engine stores it.
    client_keeps: ClassVar[Keeps] = Keeps()
    # False for algorithms whose server only averages (FedAvg): the driver
    # averages, so no server process is started, and a worker evaluates.
    has_server: ClassVar[bool] = True
    # Unshared client models (SGLR) are evaluated client by client, on a
    # seeded sample of clients, instead of as one global model.
    evaluate_on_clients: ClassVar[bool] = False
    # Whether it runs GPT-2 on E2E (the paper's language-model comparison).
    runs_language_task: ClassVar[bool] = False
    # The working model whose cross-entropy gradient at the cut the client trains on
    # in place of the server's (an auxiliary model), if any: observers compare the
    # two (raysage.observers.EstimateQuality).
    estimator: ClassVar[str | None] = None
    # True when a server reply starts work the client asks to run Together with
    # other clients' (FSL-SAGE's alignment): the engine then runs the segments
    # that resume with a reply as cohorts, up to Config.cohort clients per worker.
    replies_work_together: ClassVar[bool] = False

    def __init__(self, setup: Setup):
        self.setup = setup
        self.cfg = setup.config
        self.params = self.cfg.params
        self.sizes, self.costs = setup.sizes, setup.costs
        # Set by the runtime hosting this instance (a GPU when it reserved one).
        self.device: Any = "cpu"
        self._eval_models: dict[str, nn.Module] = {}

    @classmethod
    def from_config(cls, cfg, num_classes: int = 10) -> "Algorithm":
        """An instance for a config, with sizes and costs counted here (tests, notebooks)."""
        from ..models import architecture
        from ..netsim.cost import measure_costs

        arch = architecture(cfg, num_classes)
        setup = Setup(cfg, num_classes, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25),
                      ModelSizes.of(arch), measure_costs(arch, cls), cls)
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

    def aux_optimizer(self, module: nn.Module | list[torch.Tensor]) -> Optimizer:
        """x_a's optimizer, from the algorithm's AuxParams (a model, or a Stack's tensors)."""
        p = self.params
        params = module.parameters() if isinstance(module, nn.Module) else module
        return make_optimizer(p.aux_optimizer, params, p.aux_lr, p.aux_weight_decay,
                              self.cfg.momentum)

    # -- initial models; every algorithm seeds x_c, x_s and a shared x_a from the
    #    same streams so that equivalence tests compare like with like.
    def initial_client_model(self) -> nn.Module:
        with seeded(self.cfg.seed, "init", "client"):
            return self.arch.make_client()

    def initial_server_model(self) -> nn.Module:
        with seeded(self.cfg.seed, "init", "server"):
            return self.arch.make_server()

    def initial_aux_model(self, cid: int | str = "shared") -> nn.Module:
        with seeded(self.cfg.seed, "init", "aux", cid):
            return self.arch.make_aux()

    # ============================================================ the hooks
    # -- the cost model: FLOPs per sample of the algorithm's own pieces of work,
    #    counted once per architecture (``self.costs.of(name)``); a piece is a
    #    function of raysage.netsim.cost.Pieces that runs it on an example batch.
    @classmethod
    def costed_work(cls) -> dict[str, Callable[[Any], None]]:
        return {}

    # -- the schedule (pure: no tensors)
    def plan_client_round(self, rnd: int, p: Participant) -> ClientRoundPlan:
        raise NotImplementedError(f"{self.name} must define plan_client_round")

    def plan_round(self, rnd: int, participants: list[Participant]) -> list[ClientRoundPlan]:
        """Plans of the round's participants (in id order); sequential protocols
        override it to order clients (see ClientRoundPlan.after)."""
        return [self.plan_client_round(rnd, p) for p in participants]

    # -- a client
    def build_client(self, client: ClientState) -> None:
        """Build the working models and optimizers a worker runs its clients in."""
        raise NotImplementedError(f"{self.name} must define build_client")

    def fresh_client_models(self, cid: int) -> dict[str, nn.Module]:
        """Kept models (Keeps.models) of a client that has never taken part, seeded by
        its id. Required when client_keeps names models."""
        raise NotImplementedError

    def fresh_client_tensors(self, cid: int) -> dict[str, torch.Tensor]:
        """Kept tensors (Keeps.tensors) of a client that has never taken part. Required
        when client_keeps names tensors."""
        raise NotImplementedError

    def client_round(self, client: ClientState, rnd: int
                     ) -> Generator[Upload | Wait, Any, dict[str, State]]:
        raise NotImplementedError(f"{self.name} must define client_round")

    # -- the server
    def init_server(self) -> ServerState:
        """One x_s, stepped by its own optimizer (the usual split-learning server)."""
        x_s = self.place(self.initial_server_model())
        return ServerState(models={"server": x_s},
                           optimizers={"server": self.server_optimizer(x_s)})

    def serve(self, server: ServerState, rnd: int, upload: Upload) -> Any | None:
        raise NotImplementedError(f"{self.name} plans uploads but defines no serve()")

    def server_model_for(self, server: ServerState, upload: Upload) -> nn.Module:
        """The server model this upload will step (an observer's question): the one
        x_s, unless the algorithm keeps a copy per client."""
        return server.models["server"]

    def serve_group(self, server: ServerState, rnd: int, uploads: list[Upload]) -> list[Any]:
        """A barrier group of uploads, in client-id order; one reply each."""
        raise NotImplementedError(f"{self.name} plans barrier groups but defines no "
                                  "serve_group()")

    def end_server_round(self, server: ServerState, rnd: int, global_state: dict[str, State],
                         weights: dict[int, float]) -> None:
        """Server work after aggregation, e.g. averaging server-side copies with the
        participants' weights n_i / sum n_j (given in client-id order)."""

    # -- the global state
    def init_global(self) -> dict[str, State]:
        """The initial model of every aggregated part ("client", "server", "aux")."""
        initial = {"client": self.initial_client_model, "server": self.initial_server_model,
                   "aux": self.initial_aux_model}
        return {name: to_state(initial[name]()) for name in self.aggregated}

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

    # -- evaluation
    def eval_model(self, server: ServerState, global_state: dict[str, State]) -> nn.Module:
        """The model whose test accuracy is reported: the global x_c below the server's
        x_s, or, without a server process, the global x_c below the global x_s (a
        whole-model algorithm such as FedAvg averages both)."""
        if not self.has_server:
            model = self._eval_part("full", self.arch.make_full)
            load_state(model[0], global_state["client"])
            load_state(model[1], global_state["server"])
            return model
        lower = self._eval_part("client", self.arch.make_client)
        load_state(lower, global_state["client"])
        return nn.Sequential(lower, server.models["server"])

    def _eval_part(self, name: str, build) -> nn.Module:
        """A model kept for evaluation only (never part of the simulated state)."""
        if name not in self._eval_models:
            # Its weights are replaced before use; drawing them must not move anyone's
            # stream (a serial sweep evaluates on the driver's threads).
            with unseeded():
                self._eval_models[name] = self.place(build())
        return self._eval_models[name]

    def eval_export(self, server: ServerState) -> dict[str, State]:
        """What a worker needs from the server to evaluate its clients (evaluate_on_clients)."""
        return {"server": to_state(server.models["server"])}

    def client_eval_model(self, client: ClientState, export: dict[str, State]) -> nn.Module:
        raise NotImplementedError(f"{self.name} evaluates on clients but defines no "
                                  "client_eval_model()")

    # -- memory estimates (before anything runs)
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
        these local batches that takes part in up to ``rounds`` rounds; never more than
        ``rounds`` times what one round leaves (the memory estimate relies on it)."""
        return 0

    def server_state_bytes(self, server: ServerState) -> int:
        """Bytes a real server holds: models, optimizer state and per-client state."""
        return state_nbytes([server.models, server.optimizers, server.clients])

    # -- tests and notebooks
    def new_client(self, cid: int, num_samples: int) -> ClientState:
        """A working set holding client cid's first state."""
        client = ClientState(cid, num_samples)
        self.build_client(client)
        load_kept(self, client, None)
        return client


# ------------------------------------------------------ checking the contract

def defines_hook(cls: type, hook: str) -> bool:
    return getattr(cls, hook) is not getattr(Algorithm, hook)


def check_contract(cls: type[Algorithm]) -> None:
    """The hooks an algorithm's shape needs, checked when it is loaded: a missing one is
    one line here, not a traceback in the middle of a run."""
    from ..errors import ContractError

    def need(hook: str, why: str) -> None:
        if not defines_hook(cls, hook):
            raise ContractError(f"algorithm {cls.__name__} ({cls.name}) must define {hook}() "
                                f"{why}")

    need("plan_client_round", "(every algorithm: what a client sends in a round, and when)")
    need("build_client", "(every algorithm: the working models a worker trains clients in)")
    need("client_round", "(every algorithm: a client's local round)")
    if cls.client_keeps.models:
        need("fresh_client_models", f"because client_keeps keeps models "
             f"{list(cls.client_keeps.models)}: a client's first state of them")
    if cls.client_keeps.tensors:
        need("fresh_client_tensors", f"because client_keeps keeps tensors "
             f"{list(cls.client_keeps.tensors)}: a client's first value of them")
    if cls.evaluate_on_clients:
        need("client_eval_model", "because evaluate_on_clients is set")
        if not cls.has_server:
            raise ContractError(f"algorithm {cls.__name__} ({cls.name}) sets "
                                "evaluate_on_clients, which takes the server's part from the "
                                "server process, and has_server = False; set has_server = True "
                                "or evaluate the global model")
    if (not cls.has_server and not defines_hook(cls, "eval_model")
            and not defines_hook(cls, "init_global")
            and not {"client", "server"} <= set(cls.aggregated)):
        raise ContractError(
            f"algorithm {cls.__name__} ({cls.name}) has no server process, so by default it "
            "is evaluated as the whole model from the global state, but aggregated = "
            f"{list(cls.aggregated)} lacks 'client' or 'server'; aggregate both or define "
            "eval_model()")
    for kind in cls.byte_kinds:
        if kind.direction not in ("up", "down", "both"):
            raise ContractError(f"algorithm {cls.__name__}: byte kind '{kind.name}' has "
                                f"direction {kind.direction!r}; use 'up', 'down' or 'both'")
