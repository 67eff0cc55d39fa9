"""SplitFed v2 (Thapa et al., AAAI 2022): parallel clients, a single server model.

Per local iteration every client sends (h, y); the server steps its one x_s
on CE(x_s(h), y), in the order the batches arrive (simulated arrival time,
then client id), and returns dL/dh, with which the client backpropagates and
steps x_c. The client waits for that gradient at every step, so the
simulated clock shows the queue at the single server. End of round: FedAvg
of the client models.

Bytes per batch: s_h B up (plus labels), s_h B down; per round 2 |x_c|.
"""

from __future__ import annotations

from .base import (CLIENT_MODEL_DOWN, CLIENT_MODEL_UP, GRAD_DOWN, LABELS_UP, SERVER_LOSS,
                   SMASHED_UP, Algorithm, ClientRoundPlan, Keeps)
from .state import load_state, to_state
from .steps import serve_with_gradient, smashed_exchange, split_training


class SplitFedV2(Algorithm):
    name = "splitfed_v2"
    label = "SplitFed v2"
    colour = "#9467bd"
    description = "parallel split learning, one server model stepped in arrival order (Thapa 2022)"
    byte_kinds = (SMASHED_UP, LABELS_UP, GRAD_DOWN, CLIENT_MODEL_DOWN, CLIENT_MODEL_UP)
    metrics = (SERVER_LOSS,)
    aggregated = ("client",)
    # x_c comes with every broadcast; its optimizer's state is the client's own.
    client_keeps = Keeps(optimizers=("client",))
    runs_language_task = True

    def plan_client_round(self, rnd, p):
        c, s = self.costs, self.sizes
        # Every iteration: (h, y) up, the server steps x_s, dL/dh down; the client waits.
        return ClientRoundPlan(
            p.cid,
            download={CLIENT_MODEL_DOWN.name: s.client},
            forward_flops=[c.client_forward * b for b in p.batch_sizes],
            backward_flops=[c.client_backward * b for b in p.batch_sizes],
            exchanges={k: smashed_exchange(self, k, b, down={GRAD_DOWN.name: s.grad_per_sample * b},
                                           blocking=True)
                       for k, b in enumerate(p.batch_sizes)},
            upload={CLIENT_MODEL_UP.name: s.client},
        )

    def build_client(self, client):
        x_c = self.place(self.arch.make_client())
        client.models["client"] = x_c
        client.optimizers["client"] = self.client_optimizer(x_c)

    def client_round(self, client, rnd):
        load_state(client.models["client"], client.start["client"])
        yield from split_training(self, client)
        return {"client": to_state(client.models["client"])}

    def serve(self, server, rnd, upload):
        return serve_with_gradient(self, server, server.models["server"],
                                   server.optimizers["server"], upload)
