"""FSL_AN: federated split learning with a local auxiliary loss (Han et al., 2021).

Each client has x_c and a small auxiliary head x_a. Per local step it
computes CE(x_a(h), y), updates x_c and x_a with it -- no server gradient,
so it never waits -- and uploads (h, y) at every step. The server keeps one
x_s copy per client, steps it on each upload and returns nothing. End of
round: FedAvg of x_c, of x_a (2 |x_a| per client) and of the server copies.
"""

from __future__ import annotations

from .base import (AUX_DOWN, AUX_UP, CLIENT_MODEL_DOWN, CLIENT_MODEL_UP, LABELS_UP, SERVER_LOSS,
                   SMASHED_UP, TRAIN_LOSS, Algorithm, AuxParams, ClientRoundPlan, Keeps,
                   ServerState)
from .state import load_state, to_state
from .steps import (average_server_copies, copies_server_model_bytes, copies_state_bytes,
                    local_loss_training, local_loss_work, serve_smashed, server_copy, smashed_exchange)


class FSLAN(Algorithm):
    name = "fsl_an"
    label = "FSL_AN"
    colour = "#8c564b"
    description = ("clients train on a local auxiliary loss and upload smashed data every step "
                   "(Han 2021)")
    byte_kinds = (SMASHED_UP, LABELS_UP, CLIENT_MODEL_DOWN, CLIENT_MODEL_UP, AUX_DOWN, AUX_UP)
    Params = AuxParams
    metrics = (TRAIN_LOSS, SERVER_LOSS)
    aggregated = ("client", "aux")
    estimator = "aux"          # x_c trains on the local loss's gradient at the cut
    # x_c and x_a come with every broadcast; their optimizers' state is the client's.
    client_keeps = Keeps(optimizers=("client", "aux"))

    @classmethod
    def costed_work(cls):
        return {"aux_step": local_loss_work}

    def plan_client_round(self, rnd, p):
        c, s = self.costs, self.sizes
        return ClientRoundPlan(
            p.cid,
            download={CLIENT_MODEL_DOWN.name: s.client, AUX_DOWN.name: s.aux},
            forward_flops=[c.client_forward * b for b in p.batch_sizes],
            backward_flops=[(c.of("aux_step") + c.client_backward) * b
                            for b in p.batch_sizes],
            exchanges={k: smashed_exchange(self, k, b) for k, b in enumerate(p.batch_sizes)},
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

    def init_server(self):
        # The averaged x_s; client i's batches step its own copy.
        return ServerState(models={"server": self.place(self.initial_server_model())})

    def serve(self, server, rnd, upload):
        x_s, optimizer = server_copy(self, server, upload.cid)
        serve_smashed(self, server, x_s, optimizer, upload)

    def server_model_for(self, server, upload):
        return server_copy(self, server, upload.cid)[0]

    def end_server_round(self, server, rnd, global_state, weights):
        average_server_copies(server, weights)

    def server_model_bytes(self, live_clients):
        return copies_server_model_bytes(self, live_clients)

    def server_client_bytes(self, batch_sizes, rounds):
        return self.sizes.server * self.optimizer_copies(self.cfg.server_optimizer)

    def server_state_bytes(self, server):
        return copies_state_bytes(server)
