"""Vanilla split learning (Gupta & Raskar 2018; Vepakomma et al. 2018).

One x_c, one x_s. Clients take turns in a seeded order each round: for each
of its batches the client sends (h, y), the server steps x_s and returns
dL/dh, and the client steps x_c. Then the client hands x_c to the next
client through the server (|x_c| up, |x_c| down, counted as
``server_model``: the hand-over; a round with a single client hands
nothing over). Nothing runs in parallel, so the simulated
round time is the sum of the clients' times.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from .base import stream_seed
from .splitfed_v2 import SplitFedV2


class SplitLearning(SplitFedV2):
    name = "sl"
    description = "vanilla split learning: clients in turn, x_c handed over via the server"
    aggregated = ()

    def order(self, rnd: int, cids: list[int]) -> list[int]:
        """The round's seeded turn order of the participants."""
        rng = np.random.default_rng(stream_seed(self.cfg.seed, "sl-order", rnd))
        return [cids[i] for i in rng.permutation(len(cids))]

    def plan_round(self, rnd, batches):
        # A lone client keeps x_c: there is nobody to hand it to.
        hand_over = {"server_model": self.sizes.client} if len(batches) > 1 else {}
        plans, previous = [], None
        for cid in self.order(rnd, sorted(batches)):
            plan = self.plan_client_round(rnd, cid, batches[cid])
            plans.append(replace(plan, download=hand_over, upload=hand_over, after=previous))
            previous = cid
        return plans

    def aggregate(self, rnd, results, total, global_state):
        """No averaging: the global x_c is the one the last client of the turn holds."""
        results = list(results)
        if not results:  # everyone dropped: x_c stays where it was
            return dict(global_state)
        last = self.order(rnd, [cid for cid, _, _ in results])[-1]
        return {"client": next(states for cid, _, states in results if cid == last)["client"]}
