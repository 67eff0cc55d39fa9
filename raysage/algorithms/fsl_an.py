"""FSL_AN: federated split learning with a local auxiliary loss (Han et al., 2021).

Each client has x_c and a small auxiliary head x_a. Per local step it
computes CE(x_a(h), y), updates x_c and x_a with it -- no server gradient,
so it never waits -- and uploads (h, y) at every step. The server keeps one
x_s copy per client, steps it on each upload and returns nothing. End of
round: FedAvg of x_c, of x_a (2 |x_a| per client) and of the server copies.
"""

from __future__ import annotations

from functools import partial

from ..models import split_loss
from ..netsim.planner import ClientRoundPlan, Exchange
from .base import (Algorithm, Keeps, ServerState, gradient_of, load_state, log_agreement,
                   to_state)
from .splitfed_v1 import average_server_copies, copies_state_bytes, server_copy

GLOBAL_AUX = "shared"  # names the random stream of the shared initial x_a


class FSLAN(Algorithm):
    name = "fsl_an"
    description = "clients train on a local auxiliary loss and upload smashed data every step (Han 2021)"
    aggregated = ("client", "aux")
    # x_c and x_a come with every broadcast; their optimizers' state is the client's.
    client_keeps = Keeps(optimizers=("client", "aux"))

    def uploads_at(self, k: int) -> bool:
        return True

    # ------------------------------------------------------------ schedule
    def plan_client_round(self, rnd, cid, batch_sizes):
        c, s = self.costs, self.sizes
        exchanges = {k: Exchange(k, up={"smashed_up": s.smashed_per_sample * b,
                                        "labels_up": s.labels_per_sample * b},
                                 server_flops=c.server_step * b)
                     for k, b in enumerate(batch_sizes) if self.uploads_at(k)}
        return ClientRoundPlan(
            cid,
            download={"client_model_down": s.client, "aux_down": s.aux},
            forward_flops=[c.client_forward * b for b in batch_sizes],
            backward_flops=[(c.aux_step + c.client_backward) * b for b in batch_sizes],
            exchanges=exchanges,
            upload={"client_model_up": s.client, "aux_up": s.aux},
        )

    def init_global(self):
        return {"client": to_state(self.initial_client_model()),
                "aux": to_state(self.initial_aux_model(GLOBAL_AUX))}

    # -------------------------------------------------------------- client
    def build_client(self, client):
        x_c, x_a = self.place(self.arch.make_client()), self.place(self.arch.make_aux())
        client.models.update(client=x_c, aux=x_a)
        client.optimizers.update(client=self.client_optimizer(x_c), aux=self.aux_optimizer(x_a))

    def start_round(self, client, rnd, global_state):
        load_state(client.models["client"], global_state["client"])
        load_state(client.models["aux"], global_state["aux"])

    def forward(self, client, rnd, k, x, y):
        smashed = client.models["client"](x)
        client.carry.update(smashed=smashed, y=y)
        if not self.uploads_at(k):
            return None
        upload = self.smashed_upload(smashed, y)
        if self.cfg.estimate_quality:
            # The local loss's gradient at the cut, which x_c trains on instead of the
            # server's (x_a steps only in backward), for the server to compare.
            upload["estimate"] = gradient_of(client.models["aux"], smashed, y).cpu().numpy()
        return upload

    def backward(self, client, rnd, k):
        smashed, y = client.carry.pop("smashed"), client.carry.pop("y")
        loss = split_loss(client.models["aux"](smashed), y)
        for optimizer in client.optimizers.values():
            optimizer.zero_grad()
        loss.backward()
        for optimizer in client.optimizers.values():
            optimizer.step()
        client.log("train_loss_sum", loss.item() * len(y))
        client.log("train_samples", len(y))

    def end_round(self, client, rnd):
        return {"client": to_state(client.models["client"]),
                "aux": to_state(client.models["aux"])}

    # -------------------------------------------------------------- server
    def init_server(self) -> ServerState:
        return ServerState(models={"server": self.place(self.initial_server_model())})

    def server_model(self, server: ServerState, rnd: int, cid: int):
        return server_copy(self, server, rnd, cid)

    def server_model_bytes(self, live_clients):
        return self.sizes.server + live_clients * super().server_model_bytes(live_clients)

    def server_client_bytes(self, batch_sizes, rounds):
        return self.sizes.server * self.optimizer_copies(self.cfg.server_optimizer)

    def server_state_bytes(self, server):
        return copies_state_bytes(self, server)

    def serve(self, server, rnd, cid, k, upload):
        x_s, optimizer = self.server_model(server, rnd, cid)
        h, y = self.tensor(upload["smashed"]), self.tensor(upload["y"])
        if "estimate" in upload:   # against x_s as it stands when the upload is served
            log_agreement(partial(server.log_client, cid), self.tensor(upload["estimate"]),
                          gradient_of(x_s, h, y))
        self.server_step(server, x_s, optimizer, h, y)
        return None

    def end_server_round(self, server, rnd, global_state, weights):
        average_server_copies(server, rnd, weights)
