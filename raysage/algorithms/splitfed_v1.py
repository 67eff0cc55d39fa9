"""SplitFed v1 (Thapa et al., AAAI 2022): parallel clients, one server copy per client.

As SplitFed v2, except that the server keeps a copy of x_s (and its
optimizer) per client and client i's batches step copy i. At the end of the
round the server averages the participants' copies (weights n_i / sum n_j;
server-internal, no bytes) and every copy starts the next round from that
average. Server memory grows linearly with the number of clients.
"""

from __future__ import annotations

from .base import ServerState, load_state, to_state, weighted_average
from .splitfed_v2 import SplitFedV2


def server_copy(algo, server: ServerState, rnd: int, cid: int):
    """Client cid's own x_s copy and optimizer, reset to the averaged x_s at its first
    batch of a round (shared by the algorithms that keep per-client server copies)."""
    copy = server.per_client.get(cid)
    if copy is None:
        model = algo.place(algo.arch.make_server())
        copy = server.per_client[cid] = {"model": model, "optimizer": algo.server_optimizer(model),
                                         "round": None}
    if copy["round"] != rnd:
        copy["model"].load_state_dict(server.models["server"].state_dict())
        copy["round"] = rnd
    return copy["model"], copy["optimizer"]


def average_server_copies(server: ServerState, rnd: int, weights: dict[int, float]) -> None:
    """FedAvg of this round's server copies into the server model, in client-id order."""
    copies = [(w, to_state(server.per_client[cid]["model"])) for cid, w in weights.items()
              if cid in server.per_client and server.per_client[cid]["round"] == rnd]
    if copies:
        total = sum(w for w, _ in copies)
        load_state(server.models["server"], weighted_average([(w / total, s) for w, s in copies]))


class SplitFedV1(SplitFedV2):
    name = "splitfed_v1"
    description = "parallel split learning, one server model copy per client (Thapa 2022)"

    def init_server(self) -> ServerState:
        # The averaged x_s; it is never stepped itself, so it needs no optimizer.
        return ServerState(models={"server": self.place(self.initial_server_model())})

    def server_model(self, server, rnd, cid):
        return server_copy(self, server, rnd, cid)

    def estimated_server_bytes(self, num_clients):
        return self.sizes.server + num_clients * super().estimated_server_bytes(num_clients)

    def end_server_round(self, server, rnd, global_state, weights):
        average_server_copies(server, rnd, weights)
