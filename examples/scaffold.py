"""SCAFFOLD (Karimireddy et al., ICML 2020), option II: an algorithm in one file.

Run it next to the built-in algorithms, without changing raysage:

    raysage simulate --algorithm examples/scaffold.py:Scaffold --client-optimizer sgd

Every participant trains the whole model (x_c and x_s composed), as in
FedAvg, but corrects each local gradient by c - c_i: c is the server's
control variate, c_i the client's own. After K local steps with learning
rate eta_l, option II sets

    c_i+ = c_i - c + (x - y_i) / (K eta_l)

where x is the global model and y_i the client's. The client uploads y_i and
Delta c_i = c_i+ - c_i and keeps c_i+; the server averages the models
(weights n_i / sum n_j) and moves c by Delta c_i summed over the
participants over the number of clients N (|S|/N times their mean).

What the file shows of the contract (see raysage/algorithms/base.py):

* per-client persistent tensors: ``Keeps(tensors=("c_i",))`` with
  ``fresh_client_tensors``; the engine stores and restores c_i per client;
* server state across rounds without a server process: c lives in the
  global state beside the model, and what a client reads of it travels;
* byte kinds of its own that name what they carry (``control_down`` carries
  the global state's part ``control``, ``control_up`` the upload's
  ``control_delta``); the engine measures both against the plan;
* sizes the engine gives: ``sizes.client_parameters`` and
  ``sizes.server_parameters`` are the bytes of a tensor shaped like the
  model's parameters, which is what c and c_i are;
* no ``eval_model``: without a server process, the whole model of the
  global state is evaluated.

The correction is applied to the gradient before the client's optimizer
steps; with ``--client-optimizer sgd`` (no momentum) that is SCAFFOLD as
published.
"""

from __future__ import annotations

import numpy as np
import torch

from raysage.algorithms.base import TRAIN_LOSS, Algorithm, ByteKind, ClientRoundPlan, Keeps
from raysage.algorithms.state import WeightedAverage, load_state, to_state
from raysage.lazy import nn
from raysage.models import split_loss

MODEL_DOWN = ByteKind("model_down", "the global model x (x_c and x_s), broadcast",
                      carries=("client", "server"), direction="down")
CONTROL_DOWN = ByteKind("control_down", "the server's control variate c, broadcast",
                        carries=("control",), direction="down")
MODEL_UP = ByteKind("model_up", "the client's model y_i, uploaded for averaging",
                    carries=("client", "server"), direction="up")
CONTROL_UP = ByteKind("control_up", "the client's control update Delta c_i",
                      carries=("control_delta",), direction="up")


class Scaffold(Algorithm):
    name = "scaffold"
    label = "SCAFFOLD"
    colour = "#8c564b"
    description = "FedAvg with client and server control variates (Karimireddy 2020, option II)"
    byte_kinds = (MODEL_DOWN, CONTROL_DOWN, MODEL_UP, CONTROL_UP)
    metrics = (TRAIN_LOSS,)
    aggregated = ("client", "server")
    client_keeps = Keeps(optimizers=("full",), tensors=("c_i",))
    has_server = False

    def control_bytes(self) -> int:
        return self.sizes.client_parameters + self.sizes.server_parameters

    def plan_client_round(self, rnd, p):
        model = self.sizes.client + self.sizes.server
        return ClientRoundPlan(
            p.cid,
            download={MODEL_DOWN.name: model, CONTROL_DOWN.name: self.control_bytes()},
            forward_flops=[self.costs.full_step * b for b in p.batch_sizes],
            backward_flops=[0.0] * len(p.batch_sizes),
            exchanges={},
            upload={MODEL_UP.name: model, CONTROL_UP.name: self.control_bytes()},
        )

    def init_global(self):
        state = super().init_global()
        return state | {"control": {"c": np.zeros(self.control_bytes() // 4, np.float32)}}

    def build_client(self, client):
        model = self.place(nn.Sequential(self.arch.make_client(), self.arch.make_server()))
        client.models["full"] = model
        client.optimizers["full"] = self.client_optimizer(model)

    def fresh_client_tensors(self, cid):
        return {"c_i": torch.zeros(self.control_bytes() // 4)}

    def client_round(self, client, rnd):
        model, optimizer = client.models["full"], client.optimizers["full"]
        lower, upper = model
        load_state(lower, client.start["client"])
        load_state(upper, client.start["server"])
        params = [p for p in model.parameters() if p.requires_grad]
        c, c_i = self.tensor(client.start["control"]["c"]), client.tensors["c_i"]
        x = nn.utils.parameters_to_vector(params).detach().clone()
        correction = c - c_i
        steps = 0
        for step in client.steps():
            loss = split_loss(model(step.x), step.y)
            client.log("train_loss", loss.item(), len(step.y))
            optimizer.zero_grad()
            loss.backward()
            offset = 0
            for p in params:
                p.grad.add_(correction[offset:offset + p.numel()].view_as(p))
                offset += p.numel()
            optimizer.step()
            steps += 1
        y = nn.utils.parameters_to_vector(params).detach()
        c_plus = c_i - c + (x - y) / (steps * self.cfg.client_lr) if steps else c_i
        client.tensors["c_i"] = c_plus
        return {"client": to_state(lower), "server": to_state(upper),
                "control_delta": {"c": (c_plus - c_i).cpu().numpy()}}

    def aggregate(self, rnd, results, total, global_state):
        models = {name: WeightedAverage() for name in ("client", "server")}
        delta = np.zeros_like(global_state["control"]["c"], dtype=np.float64)
        for _, n, states in results:
            for name, average in models.items():
                average.add(n / total, states[name])
            delta += states["control_delta"]["c"]
        if not total:  # everyone dropped: nothing moves
            return dict(global_state)
        # c <- c + |S|/N mean(Delta c_i) = c + sum(Delta c_i) / N
        control = (global_state["control"]["c"] + delta / self.cfg.clients).astype(np.float32)
        return {name: average.result() for name, average in models.items()} | {
            "control": {"c": control}}
