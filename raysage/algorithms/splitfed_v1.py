"""SplitFed v1 (Thapa et al., AAAI 2022): parallel clients, one server copy per client.

Per local iteration every client sends (h, y); the server steps client i's
own copy of x_s (and its optimizer) on CE(x_s,i(h), y) and returns dL/dh,
with which the client backpropagates and steps x_c; the client waits for
that gradient at every step. At the end of the round the clients' models
are averaged (FedAvg, 2 |x_c| per client) and so are the participants'
server copies (weights n_i / sum n_j; server-internal, no bytes); every copy
starts the next round from that average. Server memory grows linearly with
the number of clients.
"""

from __future__ import annotations

from .base import (CLIENT_MODEL_DOWN, CLIENT_MODEL_UP, GRAD_DOWN, LABELS_UP, SERVER_LOSS,
                   SMASHED_UP, Algorithm, ClientRoundPlan, Keeps, ServerState)
from .state import load_state, to_state
from .steps import (average_server_copies, copies_server_model_bytes, copies_state_bytes,
                    serve_with_gradient, server_copy, smashed_exchange, split_training)


class SplitFedV1(Algorithm):
    name = "splitfed_v1"
    label = "SplitFed v1"
    colour = "#2ca02c"
    description = "parallel split learning, one server model copy per client (Thapa 2022)"
    byte_kinds = (SMASHED_UP, LABELS_UP, GRAD_DOWN, CLIENT_MODEL_DOWN, CLIENT_MODEL_UP)
    metrics = (SERVER_LOSS,)
    aggregated = ("client",)
    # x_c comes with every broadcast; its optimizer's state is the client's own.
    client_keeps = Keeps(optimizers=("client",))

    def plan_client_round(self, rnd, p):
        c, s = self.costs, self.sizes
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

    def init_server(self):
        # The averaged x_s; it is never stepped itself, so it needs no optimizer.
        return ServerState(models={"server": self.place(self.initial_server_model())})

    def serve(self, server, rnd, upload):
        x_s, optimizer = server_copy(self, server, upload.cid)
        return serve_with_gradient(self, server, x_s, optimizer, upload)

    def end_server_round(self, server, rnd, global_state, weights):
        average_server_copies(server, weights)

    def server_model_bytes(self, live_clients):
        return copies_server_model_bytes(self, live_clients)

    def server_client_bytes(self, batch_sizes, rounds):
        return self.sizes.server * self.optimizer_copies(self.cfg.server_optimizer)

    def server_state_bytes(self, server):
        return copies_state_bytes(server)
