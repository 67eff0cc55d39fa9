"""CSE-FSL (Mu & Shen, ICC 2023): a local auxiliary loss, sparse uploads, one server model.

Clients train x_c and x_a on the local loss CE(x_a(x_c(x)), y) and never wait
for the server. They upload (h, y) only every q-th local iteration
(``server_update_interval``; iterations 0, q, 2q, ... of a round, counted
across local epochs), and the server steps one shared x_s in arrival order.
End of round: FedAvg of x_c and x_a (2 |x_c| + 2 |x_a| per client). Nothing
else comes down.
"""

from __future__ import annotations

from pydantic import Field

from .base import (AUX_DOWN, AUX_UP, CLIENT_MODEL_DOWN, CLIENT_MODEL_UP, LABELS_UP, SERVER_LOSS,
                   SMASHED_UP, TRAIN_LOSS, Algorithm, AuxParams, ClientRoundPlan, Keeps)
from .state import load_state, to_state
from .steps import local_loss_training, local_loss_work, serve_smashed, smashed_exchange


class CSEFSLParams(AuxParams):
    server_update_interval: int = Field(
        5, ge=1, description="q: clients upload smashed data every q-th local iteration")


class CSEFSL(Algorithm):
    name = "cse_fsl"
    label = "CSE-FSL"
    colour = "#ff7f0e"
    description = ("local auxiliary loss, uploads every q-th step to one shared server model "
                   "(Mu 2023)")
    Params = CSEFSLParams
    byte_kinds = (SMASHED_UP, LABELS_UP, CLIENT_MODEL_DOWN, CLIENT_MODEL_UP, AUX_DOWN, AUX_UP)
    metrics = (TRAIN_LOSS, SERVER_LOSS)
    aggregated = ("client", "aux")
    estimator = "aux"          # x_c trains on the local loss's gradient at the cut
    # x_c and x_a come with every broadcast; their optimizers' state is the client's.
    client_keeps = Keeps(optimizers=("client", "aux"))
    runs_language_task = True

    @classmethod
    def costed_work(cls):
        return {"aux_step": local_loss_work}

    def plan_client_round(self, rnd, p):
        c, s, q = self.costs, self.sizes, self.params.server_update_interval
        return ClientRoundPlan(
            p.cid,
            download={CLIENT_MODEL_DOWN.name: s.client, AUX_DOWN.name: s.aux},
            forward_flops=[c.client_forward * b for b in p.batch_sizes],
            backward_flops=[(c.of("aux_step") + c.client_backward) * b
                            for b in p.batch_sizes],
            exchanges={k: smashed_exchange(self, k, b)
                       for k, b in enumerate(p.batch_sizes) if k % q == 0},
            upload={CLIENT_MODEL_UP.name: s.client, AUX_UP.name: s.aux},
        )

    def build_client(self, client):
        x_c, x_a = self.place(self.arch.make_client()), self.place(self.arch.make_aux())
        client.models.update(client=x_c, aux=x_a)
        client.optimizers.update(client=self.client_optimizer(x_c), aux=self.aux_optimizer(x_a))

    def client_round(self, client, rnd):
        load_state(client.models["client"], client.start["client"])
        load_state(client.models["aux"], client.start["aux"])
        yield from local_loss_training(self, client)
        return {"client": to_state(client.models["client"]),
                "aux": to_state(client.models["aux"])}

    def serve(self, server, rnd, upload):
        serve_smashed(self, server, server.models["server"], server.optimizers["server"], upload)
