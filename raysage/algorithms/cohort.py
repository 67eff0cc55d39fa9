"""Work of several clients run as one computation: the request and the stacked models.

An algorithm's client round asks for work that may run together with the same
work of other clients by yielding a ``Together``; the engine gathers the
requests of the clients it runs at once on a worker (a cohort), calls the
function with the list of their jobs and sends each client its own result.
Clients never see each other's jobs; how many share a call is the engine's
choice, so the function must give every job the result it gives it alone.

``Stack`` is the usual way to do that for small models: C clients' copies of
one architecture with their parameters stacked, run by ``torch.func.vmap`` over
``functional_call`` (a convolution becomes a grouped one, a linear layer a
batched matmul). A sum of the copies' losses has, for each copy's parameters,
exactly that copy's gradient, so one backward pass trains them all, and an
elementwise optimizer over the stacked tensors steps each copy as it would
step it alone.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from ..lazy import nn, torch


@dataclass(frozen=True)
class Together:
    """Yielded by a client round: ``fn([job, ...])`` returns one result per job, in order.

    The client resumes with its own result. Jobs handed to one call come from
    different clients of the same round on one worker.
    """

    fn: Callable[[list[Any]], list[Any]]
    job: Any

    @property
    def key(self) -> tuple:
        """Requests with the same key may share a call."""
        return (getattr(self.fn, "__self__", None) is not None and id(self.fn.__self__),
                getattr(self.fn, "__func__", self.fn))


def run_alone(request: Together) -> Any:
    """A request whose client runs without a cohort."""
    (result,) = request.fn([request.job])
    return result


# How jobs are stacked. On a CPU a stack pays while its inputs stay in the
# caches (benchmarks/bench_cohort.py, one torch thread, per client against one
# at a time: a cnn x_a on 20 samples, 160 KiB of h, 1.84x in stacks of 16; on
# 100 samples, 800 KiB, 1.49x in stacks of 8 but 1.02x in stacks of 16;
# simple_conv's x_a on 128 samples, 2 MiB, 1.33x in pairs and 0.92x in eights,
# and a lone job stacked beside its duplicate costs 1.5x). A job larger than
# STACK_JOB_BYTES therefore runs alone and unstacked, on any company, and a
# stack holds at most STACK_BYTES of inputs. On a GPU every job is stacked, in
# stacks of any size.
STACK_JOB_BYTES = 1 << 20
STACK_BYTES = 4 << 20
# The smallest vmapped stack: vmap over a single copy may pick other kernels (a
# plain convolution instead of a grouped one) than over several, which would
# make a client's result depend on whether it had company. A lone copy is
# therefore run beside a duplicate of itself, whose result is dropped.
MIN_STACK = 2


def stacks(sizes: list[int], keys: list, device) -> list[tuple[list[int], bool]]:
    """Jobs (by their input bytes and a key: jobs of one key have equal shapes) split
    into stacks: (indices, vmapped), in order. Whether a job is stacked depends only
    on its own size, never on the other jobs, so its result does not either."""
    on_gpu = str(device).startswith("cuda")
    out: list[tuple[list[int], bool]] = []
    open_: dict = {}
    for i, (size, key) in enumerate(zip(sizes, keys)):
        if not on_gpu and size > STACK_JOB_BYTES:
            out.append(([i], False))
            continue
        members = open_.setdefault(key, [])
        if members and not on_gpu and (len(members) + 1) * size > STACK_BYTES:
            out.append((members, True))
            members = open_[key] = []
        members.append(i)
    out.extend((members, True) for members in open_.values() if members)
    return out


class Stack:
    """C copies of one architecture, their parameters and buffers stacked on a leading
    dim (``vmapped``), or a single copy run as it is, seen with a leading dim of 1.

    Parameters that no copy trains (frozen embeddings) are taken from the first
    copy unstacked when every copy holds the same values, so a frozen GPT-2
    embedding is not copied C times.
    """

    def __init__(self, modules: list[nn.Module], vmapped: bool = True):
        self.modules = modules
        self.size = len(modules)
        self.template = modules[0]
        self.vmapped = vmapped
        if not vmapped:
            if len(modules) != 1:
                raise ValueError("an unstacked Stack holds one model")
            return
        copies = modules + [modules[0]] * max(0, MIN_STACK - len(modules))
        named = [dict(m.named_parameters()) for m in copies]
        buffers = [dict(m.named_buffers()) for m in copies]
        self.trainable: dict[str, torch.Tensor] = {}
        self.batched: dict[str, torch.Tensor] = {}     # per copy, never trained here
        self.shared: dict[str, torch.Tensor] = {}
        for name, p in self.template.named_parameters():
            tensors = [n[name].detach() for n in named]
            if p.requires_grad:
                self.trainable[name] = torch.stack(tensors).requires_grad_()
            elif all(n[name] is p or torch.equal(n[name], p) for n in named):
                self.shared[name] = p.detach()
            else:
                self.batched[name] = torch.stack(tensors)
        for name, _ in self.template.named_buffers():
            self.batched[name] = torch.stack([b[name] for b in buffers])

        def one(trainable, batched, x):
            return torch.func.functional_call(self.template, (trainable, batched, self.shared),
                                              (x,), strict=True)

        self._forward = torch.func.vmap(one, randomness="different")

    @property
    def parameters(self) -> list[torch.Tensor]:
        """The trainable parameters, for an optimizer: stacked, or the model's own."""
        if not self.vmapped:
            return [p for p in self.template.parameters() if p.requires_grad]
        return list(self.trainable.values())

    def pad(self, x: torch.Tensor) -> torch.Tensor:
        """Inputs of the C copies, (C, ...) -> the stack's (with the duplicate's)."""
        if self.vmapped and len(x) < MIN_STACK:
            x = torch.cat([x] + [x[:1]] * (MIN_STACK - len(x)))
        return x

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """Every copy's output on its own inputs: x is (stack size, N, ...)."""
        if not self.vmapped:
            return self.template(x[0])[None]
        return self._forward(self.trainable, self.batched, x)

    def write_back(self) -> None:
        """Copy each copy's stacked parameters and buffers into its module."""
        if not self.vmapped:
            return
        with torch.no_grad():
            for i, module in enumerate(self.modules):
                for name, p in module.named_parameters():
                    if name in self.trainable:
                        p.copy_(self.trainable[name][i])
                for name, buf in module.named_buffers():
                    buf.copy_(self.batched[name][i])
