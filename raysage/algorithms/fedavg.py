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
from .base import TRAIN_LOSS, Algorithm, ByteKind, ClientRoundPlan, Keeps
from .state import load_state, to_state

# The whole model travels, both halves, in the columns of the client model.
MODEL_DOWN = ByteKind("client_model_down", "the global model (x_c and x_s), broadcast",
                      carries=("client", "server"), direction="down")
MODEL_UP = ByteKind("client_model_up", "the client's model (x_c and x_s), uploaded for "
                    "averaging", carries=("client", "server"), direction="up")


class FedAvg(Algorithm):
    name = "fedavg"
    label = "FedAvg"
    colour = "#1f77b4"
    description = "each client trains the whole model locally; the server averages (McMahan 2017)"
    byte_kinds = (MODEL_DOWN, MODEL_UP)
    metrics = (TRAIN_LOSS,)
    aggregated = ("client", "server")
    # The whole model comes with every broadcast; only the optimizer's state is the client's.
    client_keeps = Keeps(optimizers=("full",))
    # The server only averages, which the engine does.
    has_server = False
    runs_language_task = True

    def plan_client_round(self, rnd, p):
        whole = self.sizes.client + self.sizes.server
        return ClientRoundPlan(
            p.cid,
            download={MODEL_DOWN.name: whole},
            forward_flops=[self.costs.full_step * b for b in p.batch_sizes],
            backward_flops=[0.0] * len(p.batch_sizes),
            exchanges={},
            upload={MODEL_UP.name: whole},
        )

    def build_client(self, client):
        model = self.place(nn.Sequential(self.arch.make_client(), self.arch.make_server()))
        client.models["full"] = model
        client.optimizers["full"] = self.client_optimizer(model)

    def client_round(self, client, rnd):
        # Nothing goes to the server during the round: a plain function will do.
        model, optimizer = client.models["full"], client.optimizers["full"]
        lower, upper = model
        load_state(lower, client.start["client"])
        load_state(upper, client.start["server"])
        for step in client.steps():
            loss = split_loss(model(step.x), step.y)
            client.log("train_loss", loss.item(), len(step.y))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        return {"client": to_state(lower), "server": to_state(upper)}

    def server_model_bytes(self, live_clients):
        return 0
