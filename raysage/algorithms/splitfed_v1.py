"""SplitFed v1 (Thapa et al., AAAI 2022): parallel clients, one server copy per client.

As SplitFed v2, except that the server keeps a copy of x_s (and its
optimizer) per client and client i's batches step copy i. At the end of the
round the server averages the participants' copies (weights n_i / sum n_j;
server-internal, no bytes) and every copy starts the next round from that
average. Server memory grows linearly with the number of clients.
"""

from __future__ import annotations

from .base import ServerState, load_state, state_nbytes, to_state, unseeded, weighted_average
from .splitfed_v2 import SplitFedV2


def server_copy(algo, server: ServerState, rnd: int, cid: int):
    """Client cid's own x_s copy and optimizer, starting from the averaged x_s at its
    first batch of a round (shared by the algorithms that keep per-client copies).

    A copy's weights are reset every round, so between rounds the server keeps
    only the copy's optimizer state per client (in ``server.clients``); the
    copies themselves exist while their clients' rounds run.
    """
    copy = server.live.get(cid)
    if copy is None:
        if server.spare:
            copy = server.spare.pop()
        else:
            # (Initial weights are replaced below; drawing them must not move the
            # seeded stream this upload is served on.)
            with unseeded():
                model = algo.place(algo.arch.make_server())
            copy = {"model": model, "optimizer": algo.server_optimizer(model)}
        copy["model"].load_state_dict(server.models["server"].state_dict())
        copy["optimizer"].load_state_arrays(server.clients.get(cid))
        server.live[cid] = copy
    return copy["model"], copy["optimizer"]


def average_server_copies(server: ServerState, rnd: int, weights: dict[int, float]) -> None:
    """FedAvg of this round's server copies into the server model, in client-id order;
    then each copy's optimizer state is kept for its client and the copy put away."""
    copies = [(w, to_state(server.live[cid]["model"])) for cid, w in weights.items()
              if cid in server.live]
    if copies:
        total = sum(w for w, _ in copies)
        load_state(server.models["server"], weighted_average([(w / total, s) for w, s in copies]))
    for cid in sorted(server.live):
        copy = server.live.pop(cid)
        server.clients.put(cid, copy["optimizer"].state_arrays())
        copy["model"].zero_grad(set_to_none=True)
        server.spare.append(copy)


def copies_state_bytes(algo, server: ServerState) -> int:
    """A real server keeps a whole copy (weights and optimizer) for every client it has seen."""
    model = state_nbytes(server.models["server"])
    return (state_nbytes([server.models, server.optimizers, server.clients])
            + len(server.clients) * model)


class SplitFedV1(SplitFedV2):
    name = "splitfed_v1"
    description = "parallel split learning, one server model copy per client (Thapa 2022)"

    def init_server(self) -> ServerState:
        # The averaged x_s; it is never stepped itself, so it needs no optimizer.
        return ServerState(models={"server": self.place(self.initial_server_model())})

    def server_model(self, server, rnd, cid):
        return server_copy(self, server, rnd, cid)

    def server_model_bytes(self, live_clients):
        return self.sizes.server + live_clients * super().server_model_bytes(live_clients)

    def server_client_bytes(self, batch_sizes, rounds):
        return self.sizes.server * self.optimizer_copies(self.cfg.server_optimizer)

    def server_state_bytes(self, server):
        return copies_state_bytes(self, server)

    def end_server_round(self, server, rnd, global_state, weights):
        average_server_copies(server, rnd, weights)
