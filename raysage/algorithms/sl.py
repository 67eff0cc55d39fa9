"""Vanilla split learning (Gupta & Raskar 2018; Vepakomma et al. 2018).

One x_c, one x_s. Clients take turns in a seeded order each round: for each
of its batches the client sends (h, y), the server steps x_s and returns
dL/dh, and the client steps x_c. Then the client hands x_c to the next
client through the server (|x_c| up, |x_c| down, counted as
``server_model``: the hand-over; a lone participant too receives x_c from
the server and returns it). Nothing runs in parallel, so the simulated round time is the
sum of the clients' times.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from .base import (GRAD_DOWN, HAND_OVER, LABELS_UP, SERVER_LOSS, SMASHED_UP, Algorithm,
                   ClientRoundPlan, Keeps, stream_seed)
from .state import load_state, to_state
from .steps import serve_with_gradient, smashed_exchange, split_training


class SplitLearning(Algorithm):
    name = "sl"
    label = "SL"
    colour = "#7f7f7f"
    description = "vanilla split learning: clients in turn, x_c handed over via the server"
    byte_kinds = (SMASHED_UP, LABELS_UP, GRAD_DOWN, HAND_OVER)
    metrics = (SERVER_LOSS,)
    # x_c comes with the hand-over; its optimizer's state is the client's own.
    client_keeps = Keeps(optimizers=("client",))

    def order(self, rnd: int, cids: list[int]) -> list[int]:
        """The round's seeded turn order of the participants."""
        rng = np.random.default_rng(stream_seed(self.cfg.seed, "sl-order", rnd))
        return [cids[i] for i in rng.permutation(len(cids))]

    def plan_client_round(self, rnd, p):
        c, s = self.costs, self.sizes
        return ClientRoundPlan(
            p.cid, download={},
            forward_flops=[c.client_forward * b for b in p.batch_sizes],
            backward_flops=[c.client_backward * b for b in p.batch_sizes],
            exchanges={k: smashed_exchange(self, k, b, down={GRAD_DOWN.name: s.grad_per_sample * b},
                                           blocking=True)
                       for k, b in enumerate(p.batch_sizes)},
            upload={})

    def plan_round(self, rnd, participants):
        # Every client receives x_c from the server and returns it there: also a lone
        # participant, whose x_c the server held since another client's turn.
        hand_over = {HAND_OVER.name: self.sizes.client}
        by_id = {p.cid: p for p in participants}
        plans, previous = [], None
        for cid in self.order(rnd, sorted(by_id)):
            plan = self.plan_client_round(rnd, by_id[cid])
            plans.append(replace(plan, download=hand_over, upload=hand_over, after=previous))
            previous = cid
        return plans

    def init_global(self):
        return {"client": to_state(self.initial_client_model())}

    def build_client(self, client):
        x_c = self.place(self.arch.make_client())
        client.models["client"] = x_c
        client.optimizers["client"] = self.client_optimizer(x_c)

    def client_round(self, client, rnd):
        # client.start: the broadcast for the first in turn, else the previous one's x_c.
        load_state(client.models["client"], client.start["client"])
        yield from split_training(self, client)
        return {"client": to_state(client.models["client"])}

    def serve(self, server, rnd, upload):
        return serve_with_gradient(self, server, server.models["server"],
                                   server.optimizers["server"], upload)

    def aggregate(self, rnd, results, total, global_state):
        """No averaging: the global x_c is the one the last client of the turn holds."""
        results = list(results)
        if not results:  # everyone dropped: x_c stays where it was
            return dict(global_state)
        last = self.order(rnd, [cid for cid, _, _ in results])[-1]
        return {"client": next(states for cid, _, states in results if cid == last)["client"]}
