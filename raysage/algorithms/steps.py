"""Steps that several algorithms share, as functions.

Algorithms do not inherit from one another; where two take the same step
(SplitFed's and SGLR's client loop, the local-loss loop of FSL_AN and
CSE-FSL, SplitFed v1's per-client server copies) they call the same function
here, and each algorithm's file still reads on its own.
"""

from __future__ import annotations

from typing import Any, Generator

from ..lazy import nn, torch
from ..models import split_loss
from ..streams import unseeded
from .base import LABELS_UP, SMASHED_UP, ClientState, Exchange, ServerState, Upload
from .optim import Optimizer
from .state import load_state, state_nbytes, to_state, weighted_average

# ------------------------------------------------------------ the plan

def smashed_exchange(algo, k: int, b: int, **changes: Any) -> Exchange:
    """Iteration k sends its batch's smashed data and labels and the server steps x_s
    on them; ``changes`` add a reply (``down``, ``blocking``) or more server work."""
    s = algo.sizes
    fields = dict(up={SMASHED_UP.name: s.smashed_per_sample * b,
                      LABELS_UP.name: s.labels_per_sample * b},
                  server_flops=algo.costs.server_step * b, samples=b)
    return Exchange(k, **(fields | changes))


# ------------------------------------------------------------ the server

def server_step(server: ServerState, x_s: nn.Module, optimizer: Optimizer,
                smashed: torch.Tensor, y: torch.Tensor) -> None:
    """Step x_s on CE(x_s(h), y); dL/dh lands in smashed.grad if h requires it."""
    loss = split_loss(x_s(smashed), y)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    server.log("server_loss", loss.item(), len(y))


def serve_with_gradient(algo, server: ServerState, x_s: nn.Module, optimizer: Optimizer,
                        upload: Upload):
    """Step x_s on the upload and return dL/dh for the client (SplitFed, SL): the
    cut-layer gradient of x_s as it stood before the step, which the step's
    backward computes."""
    leaf = algo.tensor(upload["smashed"]).requires_grad_()
    server_step(server, x_s, optimizer, leaf, algo.tensor(upload["y"]))
    return leaf.grad.cpu().numpy()


def serve_smashed(algo, server: ServerState, x_s: nn.Module, optimizer: Optimizer,
                  upload: Upload) -> None:
    """Step x_s on an upload of (h, y); nothing goes back (FSL_AN, CSE-FSL, FSL-SAGE)."""
    server_step(server, x_s, optimizer, algo.tensor(upload["smashed"]),
                algo.tensor(upload["y"]))


# ------------------------------------------------------------ clients

def split_training(algo, client: ClientState) -> Generator:
    """Every batch: h = x_c(x) up with y, wait for dL/dh, backpropagate it through
    x_c and step (split learning, SplitFed, SGLR)."""
    x_c, optimizer = client.models["client"], client.optimizers["client"]
    for step in client.steps():
        smashed = x_c(step.x)
        grad = yield step.upload(smashed=smashed, y=step.y)
        grad = algo.tensor(grad)
        optimizer.zero_grad()
        smashed.backward(grad)
        optimizer.step()


def local_loss_training(algo, client: ClientState) -> Generator:
    """Every batch: train x_c and x_a on the local loss CE(x_a(x_c(x)), y), uploading
    (h, y) where the plan says, for the server to step its x_s (FSL_AN, CSE-FSL)."""
    x_c, x_a = client.models["client"], client.models["aux"]
    for step in client.steps():
        x, y = step.x, step.y
        smashed = x_c(x)
        if step.uploads:
            yield step.upload(smashed=smashed, y=y)
        loss = split_loss(x_a(smashed), y)
        for optimizer in client.optimizers.values():
            optimizer.zero_grad()
        loss.backward()
        for optimizer in client.optimizers.values():
            optimizer.step()
        client.log("train_loss", loss.item(), len(y))


def local_loss_work(m) -> None:
    """The cost model's piece ``aux_step``: x_a forward and full backward on the smashed
    data (local-loss training of x_a)."""
    split_loss(m.aux(m.h.detach()), m.y).backward()


def cross_entropy_grad(model: nn.Module, h: torch.Tensor, y: torch.Tensor,
                       create_graph: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, dL/dh) of the batch-mean cross-entropy of model(h)."""
    leaf = h if h.requires_grad else h.detach().requires_grad_()
    loss = split_loss(model(leaf), y)
    (grad,) = torch.autograd.grad(loss, leaf, create_graph=create_graph)
    return loss, grad


# --------------------------------------------------- per-client server copies
#
# SplitFed v1 and FSL_AN keep one copy of x_s per client: client i's batches
# step copy i, and at the end of the round the copies are averaged.

def server_copy(algo, server: ServerState, cid: int) -> tuple[nn.Module, Optimizer]:
    """Client cid's own x_s copy and optimizer, starting from the averaged x_s at its
    first batch of a round.

    A copy's weights are reset every round, so between rounds the server keeps
    only the copy's optimizer state per client (in ``server.clients``); the
    copies themselves exist while their clients' rounds run.
    """
    copy = server.live.get(cid)
    if copy is None:
        if server.spare:
            copy = server.spare.pop()
        else:
            # (Initial weights are replaced below; drawing them must not move the
            # seeded stream this upload is served on.)
            with unseeded():
                model = algo.place(algo.arch.make_server())
            copy = {"model": model, "optimizer": algo.server_optimizer(model)}
        copy["model"].load_state_dict(server.models["server"].state_dict())
        copy["optimizer"].load_state_arrays(server.clients.get(cid))
        server.live[cid] = copy
    return copy["model"], copy["optimizer"]


def average_server_copies(server: ServerState, weights: dict[int, float]) -> None:
    """FedAvg of this round's server copies into the server model, in client-id order;
    then each copy's optimizer state is kept for its client and the copy put away."""
    copies = [(w, to_state(server.live[cid]["model"])) for cid, w in weights.items()
              if cid in server.live]
    if copies:
        total = sum(w for w, _ in copies)
        load_state(server.models["server"], weighted_average([(w / total, s) for w, s in copies]))
    for cid in sorted(server.live):
        copy = server.live.pop(cid)
        server.clients.put(cid, copy["optimizer"].state_arrays())
        copy["model"].zero_grad(set_to_none=True)
        server.spare.append(copy)


def copies_server_model_bytes(algo, live_clients: int) -> int:
    """The averaged x_s, and a copy with gradients and optimizer state per live client."""
    copy = algo.sizes.server * (2 + algo.optimizer_copies(algo.cfg.server_optimizer))
    return algo.sizes.server + live_clients * copy


def copies_state_bytes(server: ServerState) -> int:
    """A real server keeps a whole copy (weights and optimizer) for every client it has seen."""
    model = state_nbytes(server.models["server"])
    return (state_nbytes([server.models, server.optimizers, server.clients])
            + len(server.clients) * model)
