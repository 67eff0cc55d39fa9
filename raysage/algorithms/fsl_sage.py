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
instead of one after another in the server process. The clients a worker
runs as a cohort hand their alignments over together, and those with small
buffers train as one stacked computation (see ``align`` and cohort.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
from pydantic import Field

from ..lazy import nn, torch
from ..models import split_loss
from .base import (AUX_DOWN, CLIENT_MODEL_DOWN, CLIENT_MODEL_UP, LABELS_UP, SERVER_LOSS,
                   SMASHED_UP, TRAIN_LOSS, Algorithm, AuxParams, ClientRoundPlan, Keeps, Metric,
                   StandIn, stream_seed)
from .cohort import Stack, Together, stacks
from .state import load_state, to_state
from .steps import cross_entropy_grad, serve_smashed, smashed_exchange


@dataclass
class Alignment:
    """One client's alignment: its x_a,i, and the buffer and targets z the server sent."""

    aux: nn.Module
    cid: int
    rnd: int
    targets: dict[str, np.ndarray]


class FSLSageParams(AuxParams):
    server_update_interval: int = Field(
        5, ge=1, description="q: clients upload smashed data every q-th local iteration")
    align_interval: int = Field(
        10, ge=1, description="l: the server aligns auxiliary models in rounds t with t % l == 0")
    align_epochs: int = Field(100, ge=1, description="epochs of each alignment")
    align_batch_size: int = Field(1000, ge=1, description="batch size of alignment")
    align_buffer: int = Field(
        1000, ge=1, description="smashed samples the server keeps per client for alignment")
    align_blocking: bool = Field(
        True, description="the client waits for its aligned auxiliary model (true, as the "
        "reference) or goes on with the old one until it arrives")
    # The paper's GPT-2 alignment: 40 epochs, batch 8, a buffer of 64 sequences.
    model_defaults = {"gpt2": {"align_epochs": 40, "align_batch_size": 8, "align_buffer": 64}}
    aux_init: Literal["shared", "per_client"] = Field(
        "shared", description="initial auxiliary models: shared (every client starts from the "
        "same one, as the reference code) or per_client (each from its own seeded stream)")


NMSE_BEFORE = Metric("nmse_before", "NMSE of x_a's estimates on the client's buffer before "
                     "alignment", per_round="client_mean", count="alignments")
NMSE_AFTER = Metric("nmse_after", "NMSE of x_a's estimates on the client's buffer after "
                    "alignment", per_round="client_mean", count="alignments")


class FSLSage(Algorithm):
    name = "fsl_sage"
    label = "FSL-SAGE"
    colour = "#d62728"
    description = ("clients train on auxiliary-model gradient estimates; the server "
                   "periodically aligns them (Nair et al. ICML 2025)")
    Params = FSLSageParams
    byte_kinds = (SMASHED_UP, LABELS_UP, AUX_DOWN, CLIENT_MODEL_DOWN, CLIENT_MODEL_UP)
    metrics = (TRAIN_LOSS, SERVER_LOSS, NMSE_BEFORE, NMSE_AFTER)
    aggregated = ("client",)
    estimator = "aux"          # x_c trains on x_a,i's estimate of the server's gradient
    # x_a,i is the client's own and never averaged; x_c comes with every broadcast.
    client_keeps = Keeps(models=("aux",), optimizers=("client",))
    runs_language_task = True
    replies_work_together = True   # the alignment a reply starts (see align)

    # ------------------------------------------------------------ schedule
    @classmethod
    def costed_work(cls):
        def aux_estimate(m):
            """x_a forward and the gradient w.r.t. h only (g_hat)."""
            leaf = m.smashed()
            torch.autograd.grad(split_loss(m.aux(leaf), m.y), leaf)

        def align_step(m):
            """One alignment sample: g_hat with create_graph, then backward."""
            leaf = m.smashed()
            (g_hat,) = torch.autograd.grad(split_loss(m.aux(leaf), m.y), leaf,
                                           create_graph=True)
            g_hat.pow(2).sum().backward()

        return {"aux_estimate": aux_estimate, "align_step": align_step}

    def aligns_at(self, rnd: int, k: int) -> bool:
        return rnd % self.params.align_interval == 0 and k == 0

    def alignment_flops(self, buffered: int) -> float:
        targets = self.costs.server_step * buffered
        return targets + self.params.align_epochs * buffered * self.costs.of("align_step")

    def plan_client_round(self, rnd, p):
        c, s, q = self.costs, self.sizes, self.params.server_update_interval
        exchanges = {}
        buffered = min(self.params.align_buffer, p.uploaded)
        for k, b in enumerate(p.batch_sizes):
            if k % q:
                continue
            buffered = min(self.params.align_buffer, buffered + b)
            if self.aligns_at(rnd, k):
                exchanges[k] = smashed_exchange(
                    self, k, b, server_flops=c.server_step * b + self.alignment_flops(buffered),
                    down={AUX_DOWN.name: s.aux}, blocking=self.params.align_blocking)
            else:
                exchanges[k] = smashed_exchange(self, k, b)
        return ClientRoundPlan(
            p.cid,
            download={CLIENT_MODEL_DOWN.name: s.client},
            forward_flops=[c.client_forward * b for b in p.batch_sizes],
            backward_flops=[(c.of("aux_estimate") + c.client_backward) * b
                            for b in p.batch_sizes],
            exchanges=exchanges,
            upload={CLIENT_MODEL_UP.name: s.client},
        )

    def server_client_bytes(self, batch_sizes, rounds):
        """Client i's alignment buffer: its uploaded samples, up to align_buffer."""
        q = self.params.server_update_interval
        uploaded = rounds * sum(b for k, b in enumerate(batch_sizes) if k % q == 0)
        return min(self.params.align_buffer, uploaded) * (self.sizes.smashed_per_sample
                                                          + self.sizes.labels_per_sample)

    # -------------------------------------------------------------- client
    def build_client(self, client):
        x_c = self.place(self.arch.make_client())
        client.models["client"] = x_c
        client.models["aux"] = self.place(self.arch.make_aux())
        client.optimizers["client"] = self.client_optimizer(x_c)

    def fresh_client_models(self, cid):
        # The reference starts every client from one x_a; per_client draws each its own.
        return {"aux": self.initial_aux_model("shared" if self.params.aux_init == "shared"
                                              else cid)}

    def client_round(self, client, rnd):
        x_c, x_a = client.models["client"], client.models["aux"]
        optimizer = client.optimizers["client"]
        load_state(x_c, client.start["client"])
        for step in client.steps():
            for reply in (yield from step.arrivals()).values():
                yield from self.receive_alignment(client, rnd, reply)
            x, y = step.x, step.y
            smashed = x_c(x)
            if step.uploads:
                reply = yield step.upload(smashed=smashed, y=y)
                if reply is not None:           # the aligned x_a, waited for
                    yield from self.receive_alignment(client, rnd, reply)
            loss, g_hat = cross_entropy_grad(x_a, smashed.detach(), y)
            optimizer.zero_grad()
            smashed.backward(g_hat)
            optimizer.step()
            client.log("train_loss", loss.item(), len(y))
        for reply in (yield from client.arrivals()).values():
            yield from self.receive_alignment(client, rnd, reply)
        return {"client": to_state(x_c)}

    def receive_alignment(self, client, rnd, reply):
        """The aligned x_a,i arrives (computed here, see "Where alignment runs"), with
        the alignments of the clients the engine runs beside this one."""
        before, after = yield Together(self.align, Alignment(client.models["aux"], client.cid,
                                                             rnd, reply))
        client.log("nmse_before", before)
        client.log("nmse_after", after)

    # -------------------------------------------------------------- server
    def serve(self, server, rnd, upload):
        x_s = server.models["server"]
        serve_smashed(self, server, x_s, server.optimizers["server"], upload)

        # Client i's buffer: its last align_buffer uploaded samples. Targets are
        # (N,) labels or (N, T) tokens.
        keep = self.params.align_buffer
        old = server.clients.get(upload.cid)
        buffer = {name: np.array(upload[name][-keep:]) if old is None
                  else np.concatenate([old[name], upload[name]])[-keep:]
                  for name in ("smashed", "y")}
        server.clients.put(upload.cid, buffer)
        if not self.aligns_at(rnd, upload.k):
            return None
        # The targets must see x_s as it stands now; the aux training that
        # follows does not touch x_s (see "Where alignment runs").
        z = self.true_gradients(x_s, self.tensor(buffer["smashed"]), self.tensor(buffer["y"]))
        # What travels here stands in for the aligned x_a,i the real server sends.
        return StandIn(AUX_DOWN.name, "aux",
                       {"smashed": buffer["smashed"], "y": buffer["y"], "z": z.cpu().numpy()})

    # ----------------------------------------------------------- alignment
    def true_gradients(self, x_s: nn.Module, smashed: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Per-sample cut-layer gradients z of CE(x_s(h), y), leaving x_s untouched.

        No optimizer step and no parameter gradients; BatchNorm running
        statistics, which a train-mode forward would move, are restored.
        """
        saved = {name: buf.clone() for name, buf in x_s.named_buffers()}
        chunks = []
        size = self.params.align_batch_size
        for h, target in zip(smashed.split(size), y.split(size)):
            leaf = h.detach().requires_grad_()
            loss = split_loss(x_s(leaf), target, reduction="sum")
            (z,) = torch.autograd.grad(loss, leaf)
            chunks.append(z)
        with torch.no_grad():
            for name, buf in x_s.named_buffers():
                buf.copy_(saved[name])
        return torch.cat(chunks)

    def align(self, jobs: list[Alignment]) -> list[tuple[float, float]]:
        """Train each job's x_a,i on its buffer towards the true gradients; NMSE before
        and after, per job.

        Jobs handed over together (clients of one cohort) whose buffers have one
        shape train as one stacked computation (see cohort.py for when a job is
        stacked); a job's result does not depend on which others share it.
        """
        results: list[tuple[float, float]] = [(0.0, 0.0)] * len(jobs)
        sizes = [job.targets["smashed"].nbytes for job in jobs]
        shapes = [job.targets["smashed"].shape for job in jobs]
        for members, vmapped in stacks(sizes, shapes, self.device):
            aligned = self._align_stack([jobs[i] for i in members], vmapped)
            for i, result in zip(members, aligned):
                results[i] = result
        return results

    def _align_stack(self, jobs: list[Alignment], vmapped: bool) -> list[tuple[float, float]]:
        stack = Stack([job.aux for job in jobs], vmapped)
        smashed, y, z = (stack.pad(torch.stack([self.tensor(job.targets[name]) for job in jobs]))
                         for name in ("smashed", "y", "z"))
        before = self.nmse(self.estimates(stack, smashed, y), z, len(jobs))
        optimizer = self.aux_optimizer(stack.parameters)

        def step(h, targets, z_batch):
            _, g_hat = self.input_gradients(stack, h, targets, create_graph=True)
            loss = (g_hat - z_batch / h.shape[1]).pow(2).sum()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()

        n, size = smashed.shape[1], self.params.align_batch_size
        if stack.vmapped and n <= size:
            # Each epoch is one batch of the whole buffer, whose order only reorders
            # the summands of batch sums: a stack skips the shuffle.
            for _ in range(self.params.align_epochs):
                step(smashed, y, z)
        else:
            orders = [torch.Generator().manual_seed(stream_seed(self.cfg.seed, "align", job.cid,
                                                                job.rnd)) for job in jobs]
            copies = torch.arange(len(smashed), device=self.device)[:, None]
            for _ in range(self.params.align_epochs):
                shuffled = stack.pad(torch.stack([torch.randperm(n, generator=g) for g in orders])
                                     ).to(self.device)
                for batch in shuffled.split(size, dim=1):
                    step(smashed[copies, batch], y[copies, batch], z[copies, batch])
        after = self.nmse(self.estimates(stack, smashed, y), z, len(jobs))
        stack.write_back()
        return list(zip(before, after))

    @staticmethod
    def input_gradients(stack: Stack, h: torch.Tensor, y: torch.Tensor,
                        create_graph: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """(summed loss, g_hat) of each copy on its own batch: g_hat[i] = d/dh_i of the
        batch-mean cross-entropy of copy i (h, y: copies x batch x ...)."""
        leaf = h if h.requires_grad else h.detach().requires_grad_()
        logits = stack(leaf)
        # Copies share no parameters and see only their own rows, so the gradient of
        # the sum of their batch means is, for each h_i, that copy's own.
        loss = split_loss(logits.flatten(0, 1), y.flatten(0, 1), reduction="sum") / h.shape[1]
        (grad,) = torch.autograd.grad(loss, leaf, create_graph=create_graph)
        return loss, grad

    def estimates(self, stack: Stack, smashed: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Per-sample g_hat over each copy's buffer, chunked as the targets are."""
        chunks = []
        size = self.params.align_batch_size
        for h, target in zip(smashed.split(size, dim=1), y.split(size, dim=1)):
            _, g = self.input_gradients(stack, h, target)
            chunks.append(g * h.shape[1])
        return torch.cat(chunks, dim=1)

    @staticmethod
    def nmse(estimate: torch.Tensor, target: torch.Tensor, copies: int) -> list[float]:
        """||g_hat - z||^2 / ||z||^2 of each of the first ``copies`` copies (each summed on
        its own, so a copy's figure does not depend on the others)."""
        return [float((estimate[i] - target[i]).pow(2).sum()
                      / target[i].pow(2).sum().clamp_min(1e-30)) for i in range(copies)]
