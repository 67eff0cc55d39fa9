"""SplitFed with top-k sparsified cut-layer gradients: an algorithm in one file.

Run it next to the built-in algorithms, without changing raysage:

    raysage simulate --algorithm examples/topk_splitfed.py:TopKSplitFed --topk 0.1
    raysage sweep --grid algorithm=splitfed_v2,examples/topk_splitfed.py:TopKSplitFed \
        --out runs/topk
    raysage report runs/topk

The method: SplitFed v2 (one server model, clients wait for dL/dh at every
step), except that the server sends down only the ``topk`` fraction of each
sample's gradient entries with the largest magnitude, as (value, index)
pairs; the client backpropagates that sparse gradient. Traffic down shrinks
by about 1/(2 * topk) for fp32 values and int32 indices; the question is what
the lost entries cost in accuracy.

What the file shows of the contract (see raysage/algorithms/base.py):

* ``Params``: its own typed config section, ``--topk`` on the command line;
* ``byte_kinds``: a kind of traffic of its own, ``sparse_grad_down``, which
  becomes a column of rounds.parquet and clients.parquet;
* ``metrics``: ``kept_energy``, the share of each gradient's squared norm
  the sparse gradient keeps, logged by the server for each client;
* ``plan_client_round``: the schedule, stated once; ``client_round`` reads it
  from its steps;
* ``serve``: one upload in, one reply out: a dict whose arrays (``values``,
  ``indices``) are what ``sparse_grad_down`` carries; the engine measures
  them against the plan.
"""

from __future__ import annotations

import math

import torch
from pydantic import Field

from raysage.algorithms.base import (CLIENT_MODEL_DOWN, CLIENT_MODEL_UP, LABELS_UP, SERVER_LOSS,
                                     SMASHED_UP, Algorithm, ByteKind, ClientRoundPlan, Keeps,
                                     Metric, Section)
from raysage.algorithms.state import load_state, to_state
from raysage.algorithms.steps import server_step, smashed_exchange

SPARSE_GRAD_DOWN = ByteKind("sparse_grad_down",
                            "top-k cut-layer gradient entries, fp32 value and int32 index each",
                            carries=("values", "indices"), direction="down")
KEPT_ENERGY = Metric("kept_energy", "share of the cut-layer gradient's squared norm that the "
                     "top-k entries keep, per batch", count="sparsified_batches")


class TopKParams(Section):
    topk: float = Field(0.1, gt=0.0, le=1.0,
                        description="fraction of each sample's gradient entries sent down")


class TopKSplitFed(Algorithm):
    name = "topk_splitfed"
    label = "SplitFed top-k"
    colour = "#bcbd22"
    description = "SplitFed v2 with top-k sparsified cut-layer gradients (an example)"
    Params = TopKParams
    byte_kinds = (SMASHED_UP, LABELS_UP, SPARSE_GRAD_DOWN, CLIENT_MODEL_DOWN, CLIENT_MODEL_UP)
    metrics = (SERVER_LOSS, KEPT_ENERGY)
    aggregated = ("client",)
    client_keeps = Keeps(optimizers=("client",))

    def kept_entries(self) -> int:
        """Gradient entries sent per sample."""
        per_sample = self.sizes.grad_per_sample // 4        # fp32 entries
        return max(1, math.ceil(self.params.topk * per_sample))

    def plan_client_round(self, rnd, p):
        c, s = self.costs, self.sizes
        down = self.kept_entries() * (4 + 4)                # value and index
        return ClientRoundPlan(
            p.cid,
            download={CLIENT_MODEL_DOWN.name: s.client},
            forward_flops=[c.client_forward * b for b in p.batch_sizes],
            backward_flops=[c.client_backward * b for b in p.batch_sizes],
            exchanges={k: smashed_exchange(self, k, b, down={SPARSE_GRAD_DOWN.name: down * b},
                                           blocking=True)
                       for k, b in enumerate(p.batch_sizes)},
            upload={CLIENT_MODEL_UP.name: s.client},
        )

    def build_client(self, client):
        x_c = self.place(self.arch.make_client())
        client.models["client"] = x_c
        client.optimizers["client"] = self.client_optimizer(x_c)

    def client_round(self, client, rnd):
        x_c, optimizer = client.models["client"], client.optimizers["client"]
        load_state(x_c, client.start["client"])
        for step in client.steps():
            smashed = x_c(step.x)
            sparse = yield step.upload(smashed=smashed, y=step.y)
            # SplitFed's step, on a dense gradient with zeros where nothing was sent.
            grad = torch.zeros_like(smashed).flatten(1).scatter_(
                1, self.tensor(sparse["indices"]).long(), self.tensor(sparse["values"]))
            optimizer.zero_grad()
            smashed.backward(grad.view_as(smashed))
            optimizer.step()
        return {"client": to_state(x_c)}

    def serve(self, server, rnd, upload):
        smashed = self.tensor(upload["smashed"]).requires_grad_()
        server_step(server, server.models["server"], server.optimizers["server"], smashed,
                    self.tensor(upload["y"]))
        grad = smashed.grad.flatten(1)
        keep = grad.abs().topk(self.kept_entries(), dim=1).indices
        values = grad.gather(1, keep)
        total = grad.pow(2).sum()
        if total > 0:
            server.log_client(upload.cid, "kept_energy", float(values.pow(2).sum() / total))
        # What travels: each sample's kept entries as (value, index) pairs.
        return {"values": values.cpu().numpy(), "indices": keep.to(torch.int32).cpu().numpy()}
