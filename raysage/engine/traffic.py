"""What actually crosses each link, measured and held against the plan.

A plan states its bytes in advance (the simulated clock needs them); this
module measures what a client's round really moves -- the broadcast parts it
reads, each upload, each reply, its end-of-round upload -- by byte kind, and
stops the run when the two differ, so no byte travels uncounted, whoever
wrote the algorithm. An algorithm's :class:`~raysage.algorithms.base.ByteKind`
says which names it carries; a reply that is a single array counts as the
one kind the plan gives that reply, and a :class:`~raysage.algorithms.base.StandIn`
counts as the model whose message it stands in for.

Measuring is reading array sizes: it costs nothing next to the training.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Iterator

import numpy as np

from ..algorithms.base import Algorithm, StandIn
from ..errors import ContractError
from ..lazy import nn, torch
from ..models import transfer_bytes


class ByteMismatch(ContractError):
    """What travelled differs from what the plan declared."""


def nbytes(value: Any) -> int:
    """Bytes of an array, a tensor, or a state (a mapping of them)."""
    if isinstance(value, np.ndarray):
        return value.nbytes
    if isinstance(value, Mapping):
        return sum(nbytes(v) for v in value.values())
    if "torch" in type(value).__module__ and isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if value is None:
        return 0
    if isinstance(value, (list, tuple)):
        return sum(nbytes(v) for v in value)
    raise ContractError(f"a {type(value).__name__} travels between client and server; send "
                        "numpy arrays, tensors or mappings of them")


def carriers(algo: Algorithm, direction: str) -> dict[str, str]:
    """Name (of an array or a model part) -> the byte kind that carries it this way."""
    out: dict[str, str] = {}
    for kind in algo.byte_kinds:
        if kind.direction in (direction, "both"):
            for name in kind.carries:
                out.setdefault(name, kind.name)
    return out


class Traffic:
    """One client's round: what it moved, checked message by message against its plan."""

    def __init__(self, algo: Algorithm, cid: int, rnd: int, plan):
        self.algo, self.cid, self.rnd, self.plan = algo, cid, rnd, plan
        self.up, self.down = carriers(algo, "up"), carriers(algo, "down")
        # A model may declare that its smashed data travels with more than the
        # activations (GPT-2's attention mask, a byte per position, which right
        # padding lets the simulator leave out); those bytes ride with each row.
        sizes = algo.sizes
        self.smashed_extra = sizes.smashed_per_sample - sizes.grad_per_sample

    def _fail(self, message: str) -> None:
        raise ByteMismatch(f"{self.algo.name}: client {self.cid} in round {self.rnd}: "
                           f"{message}")

    def _by_kind(self, items: Mapping[str, Any], carried: dict[str, str], what: str,
                 direction: str) -> dict[str, int]:
        measured: dict[str, int] = {}
        for name, value in items.items():
            kind = carried.get(name)
            if kind is None:
                observed = (", or pass it as observed= if it is a measurement the simulated "
                            "system would not send") if what.startswith("the upload at") else ""
                self._fail(f"{what} carries '{name}' ({nbytes(value)} bytes), which no byte "
                           f"kind of the algorithm carries {direction}; name it in a ByteKind's "
                           f"carries and plan its bytes{observed}")
            size = nbytes(value)
            if name == "smashed" and direction == "up" and self.smashed_extra:
                size += len(value) * self.smashed_extra
            measured[kind] = measured.get(kind, 0) + size
        return measured

    def _compare(self, measured: dict[str, int], planned: dict[str, int], what: str) -> None:
        for kind in sorted(set(measured) | set(planned)):
            got, want = measured.get(kind, 0), planned.get(kind, 0)
            if got != want:
                self._fail(f"{what} moved {got} bytes of {kind}, but plan_client_round "
                           f"declared {want}; make the plan state what travels")

    # -------------------------------------------------------------- messages
    def broadcast(self, read: Mapping[str, Any]) -> None:
        """The parts of the round's start (broadcast or hand-over) the client read."""
        self._compare(self._by_kind(read, self.down, "the broadcast", "down"),
                      self.plan.download, "the broadcast")

    def upload(self, k: int, arrays: Mapping[str, Any]) -> None:
        what = f"the upload at iteration {k}"
        self._compare(self._by_kind(arrays, self.up, what, "up"),
                      self.plan.exchanges[k].up, what)

    def reply(self, k: int, reply: Any, models: Mapping[str, nn.Module]) -> None:
        planned = self.plan.exchanges[k].down
        what = f"the reply to iteration {k}'s upload"
        if isinstance(reply, StandIn):
            if reply.kind not in planned:
                self._fail(f"{what} stands in for {reply.kind}, which the plan does not send "
                           f"there (it plans {sorted(planned) or 'no reply'})")
            measured = {reply.kind: transfer_bytes(models[reply.model])}
        elif reply is None or isinstance(reply, Mapping):
            measured = self._by_kind(reply or {}, self.down, what, "down")
        else:
            if len(planned) != 1:
                self._fail(f"{what} is one array, but the plan gives that reply "
                           f"{len(planned)} byte kinds; reply with a dict named by the kinds' "
                           "carries")
            measured = {next(iter(planned)): nbytes(reply)}
        self._compare(measured, planned, what)

    def result(self, states: Mapping[str, Any]) -> None:
        self._compare(self._by_kind(states, self.up, "the end-of-round upload", "up"),
                      self.plan.upload, "the end-of-round upload")


class Reads(Mapping):
    """A round's start (the broadcast or a hand-over) that records which parts the
    client reads: those, and only those, are what it downloads."""

    def __init__(self, parts: Mapping[str, Any] | None):
        self.parts = parts or {}
        self.read: dict[str, Any] = {}

    def __getitem__(self, name: str) -> Any:
        value = self.parts[name]
        self.read[name] = value
        return value

    def __iter__(self) -> Iterator[str]:
        return iter(self.parts)

    def __len__(self) -> int:
        return len(self.parts)
