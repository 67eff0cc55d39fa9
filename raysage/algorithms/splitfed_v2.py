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

from ..netsim.planner import ClientRoundPlan, Exchange
from .base import Algorithm, Keeps, ServerState, load_state, to_state


class SplitFedV2(Algorithm):
    name = "splitfed_v2"
    description = "parallel split learning, one server model stepped in arrival order (Thapa 2022)"
    aggregated = ("client",)
    # x_c comes with every broadcast; its optimizer's state is the client's own.
    client_keeps = Keeps(optimizers=("client",))

    # ------------------------------------------------------------ schedule
    def exchange(self, k: int, b: int) -> Exchange:
        """Iteration k: (h, y) up, the server steps x_s, dL/dh down; the client waits."""
        s = self.sizes
        return Exchange(k, up={"smashed_up": s.smashed_per_sample * b,
                               "labels_up": s.labels_per_sample * b},
                        server_flops=self.costs.server_step * b,
                        down={"grad_down": s.grad_per_sample * b},
                        blocking=True)

    def plan_client_round(self, rnd, cid, batch_sizes):
        c, s = self.costs, self.sizes
        return ClientRoundPlan(
            cid,
            download={"client_model_down": s.client},
            forward_flops=[c.client_forward * b for b in batch_sizes],
            backward_flops=[c.client_backward * b for b in batch_sizes],
            exchanges={k: self.exchange(k, b) for k, b in enumerate(batch_sizes)},
            upload={"client_model_up": s.client},
        )

    def init_global(self):
        return {"client": to_state(self.initial_client_model())}

    # -------------------------------------------------------------- client
    def build_client(self, client):
        x_c = self.place(self.arch.make_client())
        client.models["client"] = x_c
        client.optimizers["client"] = self.client_optimizer(x_c)

    def start_round(self, client, rnd, global_state):
        load_state(client.models["client"], global_state["client"])

    def forward(self, client, rnd, k, x, y):
        smashed = client.models["client"](x)
        client.carry.update(smashed=smashed)
        return self.smashed_upload(smashed, y)

    def receive(self, client, rnd, reply):
        client.carry["grad"] = self.tensor(reply)

    def backward(self, client, rnd, k):
        optimizer = client.optimizers["client"]
        optimizer.zero_grad()
        client.carry.pop("smashed").backward(client.carry.pop("grad"))
        optimizer.step()

    def end_round(self, client, rnd):
        return {"client": to_state(client.models["client"])}

    # -------------------------------------------------------------- server
    def init_server(self) -> ServerState:
        x_s = self.place(self.initial_server_model())
        return ServerState(models={"server": x_s}, optimizers={"server": self.server_optimizer(x_s)})

    def server_model(self, server: ServerState, rnd: int, cid: int):
        """The x_s (and optimizer) that client cid's batches step: here the one shared model."""
        return server.models["server"], server.optimizers["server"]

    def serve(self, server, rnd, cid, k, upload):
        x_s, optimizer = self.server_model(server, rnd, cid)
        smashed = self.tensor(upload["smashed"]).requires_grad_()
        self.server_step(server, x_s, optimizer, smashed, self.tensor(upload["y"]))
        return smashed.grad.cpu().numpy()
