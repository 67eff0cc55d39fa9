"""Observers: measurements beside training, attached to the upload/reply path.

An observer is not part of any algorithm. The engine offers each one the
messages of a client's round as they pass (an upload as the client sends
it, a reply as the client receives it, each time the client goes on after
taking its replies) and every upload at the server before the algorithm
serves it. What an observer needs to carry between the two sides rides in
an upload's ``observed`` arrays, or beside a reply (:class:`Observed`), and
is never counted as traffic. Observers draw nothing from training's random
streams and move no model, so results are bit-identical with them on or off.

Two exist; each declares its columns (``metrics``) and makes, per client
round and per server, what it attaches there (None where it does not apply
or is turned off):

* :class:`EstimateQuality` (``estimate_quality``): how close the gradient a
  client trains on, in place of the server's, is to the true cut-layer
  gradient of the server's model for the same batch, at each upload.
  It applies to algorithms that name an ``estimator`` (the working model
  whose cross-entropy gradient at the cut the client trains on: FSL-SAGE's
  x_a, the local loss's head of CSE-FSL and FSL_AN).
* :class:`Leakage` (``leakage_uploads``): what someone on the link could
  learn, on a seeded sample of a client's uploads (see :mod:`raysage.leakage`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial
from typing import TYPE_CHECKING, Any

import numpy as np

from .algorithms.base import Metric, Upload
from .algorithms.steps import cross_entropy_grad
from .leakage import LeakageProbe, leakage_metrics, sampled_uploads
from .lazy import nn, torch
from .streams import global_rng

if TYPE_CHECKING:
    from .algorithms.base import Algorithm, ClientState, ServerState


@dataclass
class Observed:
    """A reply with what an observer at the server sends along for the client's side."""

    reply: Any
    data: dict[str, np.ndarray] = field(default_factory=dict)


@dataclass(frozen=True)
class Panel:
    """One panel of an observer's figure in ``raysage report``: a column against round."""

    column: str
    title: str
    ylabel: str
    log: bool = False          # a log axis when the values span decades


@dataclass(frozen=True)
class Figure:
    name: str                  # the PNG's name
    title: str
    panels: tuple[Panel, ...]


class RoundObserver:
    """What an observer attaches to one client's round (all hooks optional)."""

    def upload(self, k: int, upload: Upload, step) -> None:
        """The client sends ``upload`` at iteration k (``step``: the iteration running)."""

    def reply(self, k: int, reply: Any, observed: dict[str, np.ndarray]) -> None:
        """The reply to iteration k's upload reaches the client."""

    def resumed(self) -> None:
        """The client went on after the replies it was handed (or ended its round)."""

    def metrics(self) -> dict[str, list[float]]:
        """Sums to add to the client's metrics at the end of its round."""
        return {}


# ------------------------------------------------------------ estimate quality

ESTIMATE_COSINE = Metric(
    "estimate_cosine", "cosine of the gradient the client trained on with the true "
    "cut-layer gradient, per upload", count="estimate_uploads")
ESTIMATE_NMSE = Metric(
    "estimate_nmse", "NMSE of the gradient the client trained on against the true "
    "cut-layer gradient, per upload", count="estimate_uploads")


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
    (over the whole batch)."""
    u, t = used.detach().flatten().double(), true.detach().flatten().double()
    log("estimate_cosine", float(u @ t / (u.norm() * t.norm()).clamp_min(1e-300)))
    log("estimate_nmse", float((u - t).pow(2).sum() / t.pow(2).sum().clamp_min(1e-300)))


class EstimateQuality:
    """The gradient a client trains on against the server's, at every upload.

    The server's gradient is that of the model the upload will step, as it
    stands when the upload is served (``Algorithm.server_model_for``). The
    client's is its estimator's gradient for the same smashed batch: taken
    as it uploads when it does not wait for a reply, and otherwise when it
    goes on after the reply (FSL-SAGE's client waits for its aligned x_a and
    trains on that), with the server's gradient sent along with the reply.
    """

    figure = Figure("estimate_quality_vs_round.png", "Gradient estimate quality vs round", (
        Panel("estimate_cosine", "cosine", "cosine with the true gradient"),
        Panel("estimate_nmse", "NMSE", "NMSE to the true gradient", log=True)))

    @staticmethod
    def applies(algo: Algorithm) -> bool:
        return algo.estimator is not None

    @classmethod
    def metrics(cls, algo: Algorithm) -> tuple[Metric, ...]:
        return (ESTIMATE_COSINE, ESTIMATE_NMSE) if cls.applies(algo) else ()

    @classmethod
    def for_round(cls, algo, client, rnd, exchanges) -> RoundObserver | None:
        if cls.applies(algo) and algo.cfg.estimate_quality:
            return _EstimateRound(algo, client, exchanges)
        return None

    @classmethod
    def for_server(cls, algo: Algorithm):
        return _EstimateServer(algo) if cls.applies(algo) and algo.cfg.estimate_quality \
            else None


class _EstimateRound(RoundObserver):
    def __init__(self, algo: Algorithm, client: ClientState, exchanges: dict[int, bool]):
        self.algo, self.client, self.exchanges = algo, client, exchanges
        self.pending: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.answered: list[tuple[int, np.ndarray]] = []

    def _estimate(self, h: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return gradient_of(self.client.models[self.algo.estimator], h, y)

    def upload(self, k, upload, step):
        h, y = self.algo.tensor(upload["smashed"]), self.algo.tensor(upload["y"])
        if self.exchanges[k]:        # it trains on what it has after the reply
            self.pending[k] = (h, y)
        else:
            upload.observed["estimate"] = self._estimate(h, y).cpu().numpy()

    def reply(self, k, reply, observed):
        if k in self.pending and "true_gradient" in observed:
            self.answered.append((k, observed["true_gradient"]))

    def resumed(self):
        for k, true in self.answered:
            h, y = self.pending.pop(k)
            log_agreement(self.client.log, self._estimate(h, y), self.algo.tensor(true))
        self.answered = []


class _EstimateServer:
    def __init__(self, algo: Algorithm):
        self.algo = algo

    def serve(self, server: ServerState, rnd: int, upload: Upload) -> dict[str, np.ndarray]:
        algo = self.algo
        true = gradient_of(algo.server_model_for(server, upload), algo.tensor(upload["smashed"]),
                           algo.tensor(upload["y"]))
        if "estimate" in upload.observed:
            log_agreement(partial(server.log_client, upload.cid),
                          algo.tensor(upload.observed["estimate"]), true)
            return {}
        return {"true_gradient": true.cpu().numpy()}


# ------------------------------------------------------------------- leakage

class Leakage:
    """Leakage on a seeded sample of each client's uploads (see raysage.leakage)."""

    figure = Figure("leakage_vs_round.png", "Leakage vs round", (
        Panel("leak_input_dcor", "input leakage: dCor(inputs, smashed data)",
              "distance correlation"),
        Panel("leak_label_smashed", "label leakage: attack accuracy on smashed data",
              "attack accuracy"),
        Panel("leak_label_grad", "label leakage: attack accuracy on cut-layer gradients",
              "attack accuracy")))

    @staticmethod
    def metrics(algo: Algorithm) -> tuple[Metric, ...]:
        return leakage_metrics()

    @staticmethod
    def for_round(algo, client, rnd, exchanges) -> RoundObserver | None:
        cfg = algo.cfg
        measured = sampled_uploads(cfg.seed, client.cid, rnd, sorted(exchanges),
                                   cfg.leakage_uploads)
        return _LeakageRound(LeakageProbe(cfg.seed, client.cid, rnd, measured)) if measured \
            else None

    @staticmethod
    def for_server(algo: Algorithm):
        return None


class _LeakageRound(RoundObserver):
    def __init__(self, probe: LeakageProbe):
        self.probe = probe

    def upload(self, k, upload, step):
        if step is not None and step.k == k:
            self.probe.upload(k, step.x, step.y, upload.arrays)

    def reply(self, k, reply, observed):
        self.probe.reply(k, reply)

    def metrics(self):
        return self.probe.metrics()


# ----------------------------------------------------------------- the engine's

OBSERVERS = (EstimateQuality, Leakage)


def observer_metrics(algo: Algorithm) -> tuple[Metric, ...]:
    """Every observer's columns for this algorithm."""
    return tuple(metric for observer in OBSERVERS for metric in observer.metrics(algo))


def round_observers(algo: Algorithm, client: ClientState, rnd: int,
                    exchanges: dict[int, bool]) -> list[RoundObserver]:
    made = (observer.for_round(algo, client, rnd, exchanges) for observer in OBSERVERS)
    return [o for o in made if o is not None]


def server_observers(algo: Algorithm) -> list:
    made = (observer.for_server(algo) for observer in OBSERVERS)
    return [o for o in made if o is not None]


def serve(algo: Algorithm, server: ServerState, rnd: int, payloads: list[Upload],
          observers: list) -> Any:
    """Serve one upload, or a barrier group (one reply each), as the engine does: the
    observers see each upload first, and what they send along rides with its reply."""
    sent = [{} for _ in payloads]
    for observer in observers:
        for extra, upload in zip(sent, payloads):
            extra.update(observer.serve(server, rnd, upload))
    if len(payloads) == 1:
        replies = [algo.serve(server, rnd, payloads[0])]
    else:
        replies = algo.serve_group(server, rnd, payloads)
        if len(replies) != len(payloads):
            from .errors import ContractError

            raise ContractError(f"{algo.name}: serve_group returned {len(replies)} replies "
                                f"for {len(payloads)} uploads; return one per upload")
    return [Observed(reply, extra) if extra else reply for reply, extra in zip(replies, sent)]
