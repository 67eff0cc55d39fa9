"""SGLR: server-side local gradient averaging and split learning rates.

Pal, Park et al. (arXiv 2112.05929). Parallel split learning without FedAvg:
each client keeps its own x_c, the server one x_s. At every iteration all
participants send (h_i, y_i) and the server waits for all of them (a
barrier, so each iteration lasts as long as its slowest client). It
concatenates them, computes one loss, steps x_s with the server learning
rate eta_s = eta_c * m^alpha (m: the clients taking part in that iteration),
and computes each client's cut-layer gradient
g_i. A seeded random fraction phi of the clients receives the average of
their g_i; the others receive their own.

Gradient scale: g_i is the gradient of client i's own batch-mean loss
(the concatenated mean loss's gradient times N / b_i), so a client receives
what SplitFed would send it and eta_c keeps its meaning; only the server's
step sees the larger batch, which the split learning rate compensates.

Test accuracy: the mean over clients of (x_c,i then x_s), on a seeded
sample of ``eval_clients`` clients when there are more.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from ..lazy import nn, torch
from ..models import split_loss
from .base import Keeps, ServerState, load_state, make_optimizer, stream_seed
from .splitfed_v2 import SplitFedV2


class SGLR(SplitFedV2):
    name = "sglr"
    description = "parallel split learning, server-side gradient averaging, split learning rates (Pal 2021)"
    aggregated = ()
    evaluate_on_clients = True
    # No FedAvg: each client's x_c is its own, and so is its optimizer's state.
    client_keeps = Keeps(models=("client",), optimizers=("client",))

    @property
    def participants_per_round(self) -> int:
        return max(1, round(self.cfg.participation * self.cfg.clients))

    def server_lr(self, clients: int) -> float:
        """eta_s = eta_c * m^alpha, m the clients that take part in the iteration."""
        return self.cfg.client_lr * clients ** self.cfg.sglr_alpha

    # ------------------------------------------------------------ schedule
    def plan_client_round(self, rnd, cid, batch_sizes):
        plan = super().plan_client_round(rnd, cid, batch_sizes)
        barrier = {k: replace(ex, group=("iteration", k)) for k, ex in plan.exchanges.items()}
        # No FedAvg: nothing is broadcast or uploaded besides the per-step traffic.
        return replace(plan, download={}, upload={}, exchanges=barrier)

    def init_global(self):
        return {}

    # -------------------------------------------------------------- client
    def build_client(self, client):
        x_c = self.place(self.arch.make_client())
        client.models["client"] = x_c
        client.optimizers["client"] = self.client_optimizer(x_c)

    def fresh_client_models(self, cid):
        return {"client": self.initial_client_model()}   # every client starts from one x_c

    def start_round(self, client, rnd, global_state):
        """Client models are never shared: nothing to load."""

    def end_round(self, client, rnd):
        return {}

    # -------------------------------------------------------------- server
    def init_server(self) -> ServerState:
        x_s = self.place(self.initial_server_model())
        c = self.cfg
        # The rate is set again at every iteration for the clients it actually has.
        optimizer = make_optimizer(c.server_optimizer, x_s.parameters(),
                                   self.server_lr(self.participants_per_round),
                                   c.server_weight_decay, c.momentum)
        return ServerState(models={"server": x_s}, optimizers={"server": optimizer})

    def serve(self, server, rnd, cid, k, upload):
        return self.serve_group(server, rnd, [(cid, k, upload)])[0]

    def averaged_clients(self, rnd: int, k: int, cids: list[int]) -> list[int]:
        """The seeded fraction phi of this iteration's clients that get the averaged gradient."""
        count = int(round(self.cfg.sglr_phi * len(cids)))
        rng = np.random.default_rng(stream_seed(self.cfg.seed, "sglr-phi", rnd, k))
        return sorted(cids[i] for i in rng.choice(len(cids), size=count, replace=False))

    def serve_group(self, server, rnd, uploads):
        uploads = sorted(uploads, key=lambda u: u[0])
        x_s, optimizer = server.models["server"], server.optimizers["server"]
        # Clients that dropped, or whose data ran out, do not count in m.
        optimizer.lr = self.server_lr(len(uploads))
        smashed = [self.tensor(u["smashed"]).requires_grad_() for _, _, u in uploads]
        y = torch.cat([self.tensor(u["y"]) for _, _, u in uploads])
        loss = split_loss(x_s(torch.cat(smashed)), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        server.log("server_loss_sum", loss.item() * len(y))
        server.log("server_samples", len(y))

        grads = {cid: h.grad * (len(y) / len(h)) for (cid, _, _), h in zip(uploads, smashed)}
        k = uploads[0][1]
        chosen = self.averaged_clients(rnd, k, [cid for cid, _, _ in uploads])
        # Averaging needs equal shapes; a short last batch is averaged with its own kind.
        for shape in {grads[c].shape for c in chosen}:
            same = [c for c in chosen if grads[c].shape == shape]
            mean = torch.stack([grads[c] for c in same]).mean(0)
            for c in same:
                grads[c] = mean
        return [grads[cid].cpu().numpy() for cid, _, _ in uploads]

    # ---------------------------------------------------------- evaluation
    def client_eval_model(self, client, export):
        upper = self._eval_part("server", self.arch.make_server)
        load_state(upper, export["server"])
        return nn.Sequential(client.models["client"], upper)
