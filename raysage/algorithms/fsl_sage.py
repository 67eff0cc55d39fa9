"""FSL-SAGE: federated split learning via smashed activation gradient estimation.

Nair et al., ICML 2025 (arXiv 2505.23182). Client i holds its part x_c,i of
the model and an auxiliary model x_a,i that *estimates* the gradient the
server would return for the smashed activations h. The server holds one x_s
and, per client, the last ``align_buffer`` uploaded smashed samples and a
copy of x_a,i, which it periodically aligns to the true gradients.

Per local iteration k of client i in round t (q = server_update_interval,
l = align_interval):

1. h = x_c,i(x)
2. if k % q == 0: upload (h, y); the server steps x_s on CE(x_s(h), y) and
   appends (h, y) to client i's buffer. Nothing is sent back ...
3. ... unless t % l == 0 and k == 0: the server then aligns x_a,i and sends
   it down; with ``align_blocking`` (the reference) the client waits and uses
   it at once, otherwise it goes on with the old x_a,i until it arrives.
4. g_hat = d/dh mean_b CE(x_a,i(h)_b, y_b); backpropagate g_hat through
   x_c,i and step. The client never updates x_a,i.

End of round: FedAvg of the client models (2 |x_c| per client).

Alignment minimises sum over elements (g_hat - z)^2 for align_epochs epochs
of Adam, where z are the true cut-layer gradients under the current x_s.
Scales: z is computed per align-batch-sized chunk of the buffer as the
gradient of a *summed* loss (one row per sample), and so is the estimate;
both are divided by the batch size b, which makes them gradients of a
batch-mean loss as in the reference. With the defaults (buffer 1000, batch
1000) this is exactly the reference objective; with other sizes each batch
keeps the batch-mean scale that a client sees during training.

Where alignment runs. In the simulated world the server aligns its copy of
x_a,i and sends it down (|x_a| bytes, server compute on the simulated clock).
The client never changes x_a,i, so the server's copy and the client's are
always equal; the simulator therefore keeps a single copy, in the client's
worker. The server computes the targets z against x_s at the simulated
moment of the client's upload and hands (buffer, z) to the worker, which
runs the aux training there. The result is the same model the server would
send, and alignments of different clients run in parallel on the workers
instead of one after another in the server process.
"""

from __future__ import annotations

from functools import partial

import numpy as np

from ..lazy import nn, torch
from ..models import split_loss
from ..netsim.planner import ClientRoundPlan, Exchange
from .base import (Algorithm, ClientState, Keeps, ServerState, cross_entropy_grad, gradient_of,
                   load_state, log_agreement, stream_seed, to_state)


class FSLSage(Algorithm):
    name = "fsl_sage"
    description = ("clients train on auxiliary-model gradient estimates; the server "
                   "periodically aligns them (Nair et al. ICML 2025)")
    aggregated = ("client",)
    # x_a,i is the client's own and never averaged; x_c comes with every broadcast.
    client_keeps = Keeps(models=("aux",), optimizers=("client",))

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # Smashed samples each client has in the server's buffer at the start
        # of a round, for the cost of alignment in the plan.
        self._buffered: dict[int, int] = {}
        self._uploads_this_round: dict[int, int] = {}

    # ------------------------------------------------------------ schedule
    def uploads_at(self, k: int) -> bool:
        return k % self.cfg.server_update_interval == 0

    def aligns_at(self, rnd: int, k: int) -> bool:
        return rnd % self.cfg.align_interval == 0 and k == 0

    def alignment_flops(self, buffered: int) -> float:
        targets = self.costs.server_step * buffered
        return targets + self.cfg.align_epochs * buffered * self.costs.align_step

    def plan_client_round(self, rnd, cid, batch_sizes):
        c, s = self.costs, self.sizes
        exchanges = {}
        buffered = self._buffered.get(cid, 0)
        for k, b in enumerate(batch_sizes):
            if not self.uploads_at(k):
                continue
            buffered = min(self.cfg.align_buffer, buffered + b)
            work = c.server_step * b
            if self.aligns_at(rnd, k):
                exchanges[k] = Exchange(
                    k, up={"smashed_up": s.smashed_per_sample * b, "labels_up": s.labels_per_sample * b},
                    server_flops=work + self.alignment_flops(buffered),
                    down={"aux_down": s.aux}, blocking=self.cfg.align_blocking)
            else:
                exchanges[k] = Exchange(
                    k, up={"smashed_up": s.smashed_per_sample * b, "labels_up": s.labels_per_sample * b},
                    server_flops=work)
        self._uploads_this_round[cid] = buffered
        return ClientRoundPlan(
            cid,
            download={"client_model_down": s.client},
            forward_flops=[c.client_forward * b for b in batch_sizes],
            backward_flops=[(c.aux_estimate + c.client_backward) * b for b in batch_sizes],
            exchanges=exchanges,
            upload={"client_model_up": s.client},
        )

    def commit_round(self, rnd, participants):
        for cid in participants:
            self._buffered[cid] = self._uploads_this_round[cid]
        self._uploads_this_round = {}

    def server_client_bytes(self, batch_sizes, rounds):
        """Client i's alignment buffer: its uploaded samples, up to align_buffer."""
        uploaded = rounds * sum(b for k, b in enumerate(batch_sizes) if self.uploads_at(k))
        return min(self.cfg.align_buffer, uploaded) * (self.sizes.smashed_per_sample
                                                       + self.sizes.labels_per_sample)

    def plan_state(self):
        return {"buffered": dict(self._buffered)}

    def load_plan_state(self, state):
        # Keys come back from JSON as strings.
        self._buffered = {int(cid): n for cid, n in state["buffered"].items()}

    def init_global(self):
        return {"client": to_state(self.initial_client_model())}

    # -------------------------------------------------------------- client
    def build_client(self, client: ClientState) -> None:
        x_c = self.place(self.arch.make_client())
        client.models["client"] = x_c
        client.models["aux"] = self.place(self.arch.make_aux())
        client.optimizers["client"] = self.client_optimizer(x_c)

    def fresh_client_models(self, cid):
        # The reference starts every client from one x_a; per_client draws each its own.
        return {"aux": self.initial_aux_model("shared" if self.cfg.aux_init == "shared"
                                              else cid)}

    def start_round(self, client, rnd, global_state):
        load_state(client.models["client"], global_state["client"])

    def waits_for_alignment(self, rnd: int, k: int) -> bool:
        return self.aligns_at(rnd, k) and self.cfg.align_blocking

    def forward(self, client, rnd, k, x, y):
        smashed = client.models["client"](x)
        client.carry.update(smashed=smashed, y=y)
        if not self.uploads_at(k):
            return None
        upload = self.smashed_upload(smashed, y)
        if self.cfg.estimate_quality and not self.waits_for_alignment(rnd, k):
            # The estimate this batch will train on (x_a does not change before its
            # backward), for the server to compare with its own (an observer's copy:
            # no bytes are counted for it).
            upload["estimate"] = gradient_of(client.models["aux"], smashed, y).cpu().numpy()
        return upload

    def receive(self, client, rnd, reply):
        """The aligned x_a,i arrives (computed here, see "Where alignment runs")."""
        before, after = self.align(client.models["aux"], client.cid, rnd, reply)
        client.log("alignments", 1)
        client.log("nmse_before_sum", before)
        client.log("nmse_after_sum", after)
        if "z_batch" in reply:   # this batch's true gradient, to measure after alignment
            client.carry["z_batch"] = self.tensor(reply["z_batch"])

    def backward(self, client, rnd, k):
        smashed, y = client.carry.pop("smashed"), client.carry.pop("y")
        loss, g_hat = cross_entropy_grad(client.models["aux"], smashed.detach(), y)
        if "z_batch" in client.carry:
            log_agreement(client.log, g_hat, client.carry.pop("z_batch"))
        optimizer = client.optimizers["client"]
        optimizer.zero_grad()
        smashed.backward(g_hat)
        optimizer.step()
        client.log("train_loss_sum", loss.item() * len(y))
        client.log("train_samples", len(y))

    def end_round(self, client, rnd):
        return {"client": to_state(client.models["client"])}

    # -------------------------------------------------------------- server
    def init_server(self) -> ServerState:
        x_s = self.place(self.initial_server_model())
        return ServerState(models={"server": x_s}, optimizers={"server": self.server_optimizer(x_s)})

    def serve(self, server, rnd, cid, k, upload):
        x_s = server.models["server"]
        h, y = self.tensor(upload["smashed"]), self.tensor(upload["y"])
        # Estimate quality: the true gradient for this batch, with x_s as it stands
        # when the upload is served (the client's estimate came with it, or is
        # measured by the client after the alignment it waits for).
        measure = self.cfg.estimate_quality and ("estimate" in upload
                                                 or self.waits_for_alignment(rnd, k))
        z_batch = gradient_of(x_s, h, y) if measure else None
        if "estimate" in upload:
            log_agreement(partial(server.log_client, cid), self.tensor(upload["estimate"]),
                          z_batch)
        self.server_step(server, x_s, server.optimizers["server"], h, y)

        # Client i's buffer: its last align_buffer uploaded samples. Targets are
        # (N,) labels or (N, T) tokens.
        keep = self.cfg.align_buffer
        old = server.clients.get(cid)
        buffer = {name: np.array(upload[name][-keep:]) if old is None
                  else np.concatenate([old[name], upload[name]])[-keep:]
                  for name in ("smashed", "y")}
        server.clients.put(cid, buffer)
        if not self.aligns_at(rnd, k):
            return None
        # The targets must see x_s as it stands now; the aux training that
        # follows does not touch x_s (see "Where alignment runs").
        z = self.true_gradients(x_s, self.tensor(buffer["smashed"]), self.tensor(buffer["y"]))
        reply = {"smashed": buffer["smashed"], "y": buffer["y"], "z": z.cpu().numpy()}
        if z_batch is not None and "estimate" not in upload:
            reply["z_batch"] = z_batch.cpu().numpy()
        return reply

    # ----------------------------------------------------------- alignment
    def true_gradients(self, x_s: nn.Module, smashed: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Per-sample cut-layer gradients z of CE(x_s(h), y), leaving x_s untouched.

        No optimizer step and no parameter gradients; BatchNorm running
        statistics, which a train-mode forward would move, are restored.
        """
        saved = {name: buf.clone() for name, buf in x_s.named_buffers()}
        chunks = []
        for h, target in zip(smashed.split(self.cfg.align_batch_size),
                             y.split(self.cfg.align_batch_size)):
            leaf = h.detach().requires_grad_()
            loss = split_loss(x_s(leaf), target, reduction="sum")
            (z,) = torch.autograd.grad(loss, leaf)
            chunks.append(z)
        with torch.no_grad():
            for name, buf in x_s.named_buffers():
                buf.copy_(saved[name])
        return torch.cat(chunks)

    def estimates(self, aux: nn.Module, smashed: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Per-sample g_hat over the buffer, chunked as the targets are."""
        chunks = []
        for h, target in zip(smashed.split(self.cfg.align_batch_size),
                             y.split(self.cfg.align_batch_size)):
            _, g = cross_entropy_grad(aux, h, target)
            chunks.append(g * len(target))
        return torch.cat(chunks)

    @staticmethod
    def nmse(estimate: torch.Tensor, target: torch.Tensor) -> float:
        return float((estimate - target).pow(2).sum() / target.pow(2).sum().clamp_min(1e-30))

    def align(self, aux: nn.Module, cid: int, rnd: int, targets: dict) -> tuple[float, float]:
        """Train x_a,i on the buffer towards the true gradients; NMSE before and after."""
        smashed, y = self.tensor(targets["smashed"]), self.tensor(targets["y"])
        z = self.tensor(targets["z"])
        before = self.nmse(self.estimates(aux, smashed, y), z)

        optimizer = self.aux_optimizer(aux)
        order = torch.Generator().manual_seed(stream_seed(self.cfg.seed, "align", cid, rnd))
        for _ in range(self.cfg.align_epochs):
            shuffled = torch.randperm(len(y), generator=order).to(self.device)
            for batch in shuffled.split(self.cfg.align_batch_size):
                b = len(batch)
                _, g_hat = cross_entropy_grad(aux, smashed[batch], y[batch], create_graph=True)
                loss = (g_hat - z[batch] / b).pow(2).sum()
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
        return before, self.nmse(self.estimates(aux, smashed, y), z)
