"""FedAvg (McMahan et al., 2017) on the split model.

Every participant downloads the whole model (x_c and x_s composed), trains it
for E local epochs on its own data, and uploads it; the server averages the
uploads with weights n_i / sum n_j. Each client has its own copy of both
halves (the FSL-SAGE reference code shares one server-half object across
clients; we do not). The whole model is trained with the client's optimizer
settings, since it all runs on the client, and each client's optimizer state
persists across the rounds it takes part in.

Bytes per round: 2 |x_c + x_s| per participant.
"""

from __future__ import annotations

from ..lazy import nn
from ..models import split_loss
from ..netsim.planner import ClientRoundPlan
from .base import Algorithm, ClientState, Keeps, ServerState, load_state, to_state


class FedAvg(Algorithm):
    name = "fedavg"
    description = "each client trains the whole model locally; the server averages (McMahan 2017)"
    aggregated = ("client", "server")
    # The whole model comes with every broadcast; only the optimizer's state is the client's.
    client_keeps = Keeps(optimizers=("full",))
    has_server = False

    def plan_client_round(self, rnd, cid, batch_sizes):
        whole = self.sizes.client + self.sizes.server
        return ClientRoundPlan(
            cid,
            download={"client_model_down": whole},
            forward_flops=[self.costs.full_step * b for b in batch_sizes],
            backward_flops=[0.0] * len(batch_sizes),
            exchanges={},
            upload={"client_model_up": whole},
        )

    def init_global(self):
        return {"client": to_state(self.initial_client_model()),
                "server": to_state(self.initial_server_model())}

    # -- client
    def build_client(self, client: ClientState) -> None:
        model = self.place(nn.Sequential(self.arch.make_client(), self.arch.make_server()))
        client.models["full"] = model
        client.optimizers["full"] = self.client_optimizer(model)

    def start_round(self, client, rnd, global_state):
        lower, upper = client.models["full"]
        load_state(lower, global_state["client"])
        load_state(upper, global_state["server"])

    def forward(self, client, rnd, k, x, y):
        loss = split_loss(client.models["full"](x), y)
        client.carry["loss"] = loss
        client.log("train_loss_sum", loss.item() * len(y))
        client.log("train_samples", len(y))
        return None

    def backward(self, client, rnd, k):
        optimizer = client.optimizers["full"]
        optimizer.zero_grad()
        client.carry.pop("loss").backward()
        optimizer.step()

    def end_round(self, client, rnd):
        lower, upper = client.models["full"]
        return {"client": to_state(lower), "server": to_state(upper)}

    # -- the server only averages, which the engine does; evaluation needs the average
    def server_model_bytes(self, live_clients):
        return 0

    def eval_model(self, server: ServerState, global_state):
        model = self._eval_part("full", self.arch.make_full)
        load_state(model[0], global_state["client"])
        load_state(model[1], global_state["server"])
        return model
