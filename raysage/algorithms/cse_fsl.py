"""CSE-FSL (Mu & Shen, ICC 2023): FSL_AN with one shared server model and sparse uploads.

Clients train x_c and x_a on the local auxiliary loss, as in FSL_AN, but
upload (h, y) only every q-th local iteration (``server_update_interval``;
iterations 0, q, 2q, ... of a round, counted across local epochs), and the
server steps one shared x_s in arrival order. x_a is FedAvg'd every round
(2 |x_a| per client). Nothing comes down besides the averaged models.
"""

from __future__ import annotations

from .base import Algorithm, ServerState
from .fsl_an import FSLAN


class CSEFSL(FSLAN):
    name = "cse_fsl"
    description = "local auxiliary loss, uploads every q-th step to one shared server model (Mu 2023)"

    def uploads_at(self, k: int) -> bool:
        return k % self.cfg.server_update_interval == 0

    def init_server(self) -> ServerState:
        x_s = self.place(self.initial_server_model())
        return ServerState(models={"server": x_s}, optimizers={"server": self.server_optimizer(x_s)})

    def server_model(self, server, rnd, cid):
        return server.models["server"], server.optimizers["server"]

    def server_model_bytes(self, live_clients):
        return Algorithm.server_model_bytes(self, live_clients)

    def server_client_bytes(self, batch_sizes, rounds):
        return 0

    def server_state_bytes(self, server):
        return Algorithm.server_state_bytes(self, server)

    def end_server_round(self, server, rnd, global_state, weights):
        """One shared server model: nothing to average."""
