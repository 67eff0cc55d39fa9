"""SGLR: server-side local gradient averaging and split learning rates.

Pal, Park et al. (arXiv 2112.05929). Parallel split learning without FedAvg:
each client keeps its own x_c, the server one x_s. At every iteration all
participants send (h_i, y_i) and the server waits for all of them (a
barrier, so each iteration lasts as long as its slowest client). It
concatenates them, computes one loss, steps x_s with the server learning
rate eta_s = eta_c * m^alpha (m: the clients taking part in that iteration),
and computes each client's cut-layer gradient g_i. A seeded random fraction
phi of the clients receives the average of their g_i; the others receive
their own.

Gradient scale: g_i is the gradient of client i's own batch-mean loss
(the concatenated mean loss's gradient times N / b_i), so a client receives
what SplitFed would send it and eta_c keeps its meaning; only the server's
step sees the larger batch, which the split learning rate compensates.

Test accuracy: the mean over clients of (x_c,i then x_s), on a seeded
sample of ``eval_clients`` clients when there are more.
"""

from __future__ import annotations

import numpy as np
from pydantic import Field

from ..lazy import nn, torch
from ..models import split_loss
from .base import (GRAD_DOWN, LABELS_UP, SERVER_LOSS, SMASHED_UP, Algorithm, ClientRoundPlan,
                   Keeps, Section, ServerState, make_optimizer, stream_seed)
from .state import load_state
from .steps import smashed_exchange, split_training


class SGLRParams(Section):
    sglr_alpha: float = Field(
        0.5, ge=0.0, description="alpha: server learning rate = client_lr * m ** alpha "
        "(0 turns it off)")
    sglr_phi: float = Field(
        0.5, ge=0.0, lt=1.0, description="phi: fraction of clients that receive the averaged "
        "cut-layer gradient (below 1)")


class SGLR(Algorithm):
    name = "sglr"
    label = "SGLR"
    colour = "#e377c2"
    description = ("parallel split learning, server-side gradient averaging, split learning "
                   "rates (Pal 2021)")
    Params = SGLRParams
    byte_kinds = (SMASHED_UP, LABELS_UP, GRAD_DOWN)
    metrics = (SERVER_LOSS,)
    evaluate_on_clients = True
    # No FedAvg: each client's x_c is its own, and so is its optimizer's state.
    client_keeps = Keeps(models=("client",), optimizers=("client",))

    def server_lr(self, clients: int) -> float:
        """eta_s = eta_c * m^alpha, m the clients that take part in the iteration."""
        return self.cfg.client_lr * clients ** self.params.sglr_alpha

    def plan_client_round(self, rnd, p):
        c, s = self.costs, self.sizes
        # Every iteration is a barrier over the round's clients; no FedAvg, so
        # nothing is broadcast or uploaded besides the per-step traffic.
        return ClientRoundPlan(
            p.cid, download={},
            forward_flops=[c.client_forward * b for b in p.batch_sizes],
            backward_flops=[c.client_backward * b for b in p.batch_sizes],
            exchanges={k: smashed_exchange(self, k, b, down={GRAD_DOWN.name: s.grad_per_sample * b},
                                           blocking=True, group=("iteration", k))
                       for k, b in enumerate(p.batch_sizes)},
            upload={})

    def build_client(self, client):
        x_c = self.place(self.arch.make_client())
        client.models["client"] = x_c
        client.optimizers["client"] = self.client_optimizer(x_c)

    def fresh_client_models(self, cid):
        return {"client": self.initial_client_model()}   # every client starts from one x_c

    def client_round(self, client, rnd):
        # Client models are never shared: the client goes on from its own x_c.
        yield from split_training(self, client)
        return {}

    def init_server(self):
        x_s = self.place(self.initial_server_model())
        c = self.cfg
        # The rate is set again at every iteration for the clients it actually has.
        participants = max(1, round(c.participation * c.clients))
        optimizer = make_optimizer(c.server_optimizer, x_s.parameters(),
                                   self.server_lr(participants), c.server_weight_decay,
                                   c.momentum)
        return ServerState(models={"server": x_s}, optimizers={"server": optimizer})

    def averaged_clients(self, rnd: int, k: int, cids: list[int]) -> list[int]:
        """The seeded fraction phi of this iteration's clients that get the averaged gradient."""
        count = int(round(self.params.sglr_phi * len(cids)))
        rng = np.random.default_rng(stream_seed(self.cfg.seed, "sglr-phi", rnd, k))
        return sorted(cids[i] for i in rng.choice(len(cids), size=count, replace=False))

    def serve(self, server, rnd, upload):
        return self.serve_group(server, rnd, [upload])[0]

    def serve_group(self, server, rnd, arrived):
        # One concatenated batch in client-id order; replies in the order given.
        uploads = sorted(arrived, key=lambda u: u.cid)
        x_s, optimizer = server.models["server"], server.optimizers["server"]
        # Clients that dropped, or whose data ran out, do not count in m.
        optimizer.lr = self.server_lr(len(uploads))
        smashed = [self.tensor(u["smashed"]).requires_grad_() for u in uploads]
        y = torch.cat([self.tensor(u["y"]) for u in uploads])
        loss = split_loss(x_s(torch.cat(smashed)), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        server.log("server_loss", loss.item(), len(y))

        grads = {u.cid: h.grad * (len(y) / len(h)) for u, h in zip(uploads, smashed)}
        chosen = self.averaged_clients(rnd, uploads[0].k, [u.cid for u in uploads])
        # Averaging needs equal shapes; a short last batch is averaged with its own kind.
        for shape in {grads[c].shape for c in chosen}:
            same = [c for c in chosen if grads[c].shape == shape]
            mean = torch.stack([grads[c] for c in same]).mean(0)
            for c in same:
                grads[c] = mean
        return [grads[u.cid].cpu().numpy() for u in arrived]

    def client_eval_model(self, client, export):
        upper = self._eval_part("server", self.arch.make_server)
        load_state(upper, export["server"])
        return nn.Sequential(client.models["client"], upper)
