"""Per-client state that outlives a round, kept as named arrays.

A virtual client is its state, not objects: what an algorithm declares to
persist per client (FSL-SAGE's x_a,i and x_c's optimizer moments; the
server's alignment buffer of client i) is a flat mapping of names to numpy
arrays here. A worker loads a client's arrays into its working models when
the client takes part and writes them back when its round ends; a client
that never took part has no entry and costs nothing.

:class:`StateStore` keeps the most recently used entries in RAM up to a
byte budget and spills the rest to a local folder, one safetensors file per
client. safetensors stores raw arrays with a JSON header, so reading a file
never runs code, and a file written on one machine (or device) reads on any
other. Checkpoints write the entries changed since the previous checkpoint
to the run folder in the same format; the manifest that lists them is
written by the driver (:mod:`raysage.engine.checkpoint`), which never sees
the arrays themselves.
"""

from __future__ import annotations

import os
import shutil
from collections import OrderedDict
from pathlib import Path

import numpy as np

State = dict[str, np.ndarray]


def digest(data: bytes) -> str:
    """The SHA-256 of a file's bytes, kept apart from the file and checked when it is read."""
    import hashlib

    return hashlib.sha256(data).hexdigest()


def read_verified(data: bytes, expected: str | None, where: str) -> bytes:
    """``data`` if its SHA-256 is the one recorded when it was written (None: nothing was
    recorded, as in checkpoints of raysage before checksums)."""
    if expected is not None and digest(data) != expected:
        from .errors import RaysageError

        raise RaysageError(f"{where} is damaged: its SHA-256 is not the one recorded when it "
                           "was written; restore the file, or remove the run's checkpoint.json "
                           "to restart the run from round 0")
    return data


def state_size(state: State) -> int:
    return sum(a.nbytes for a in state.values())


def to_safetensors(state: State) -> bytes:
    from safetensors.numpy import save

    # (np.ascontiguousarray would turn a 0-d array, Adam's step, into shape (1,).)
    arrays = {k: np.asarray(v) for k, v in state.items()}
    return save({k: v if v.flags.c_contiguous else v.copy(order="C") for k, v in arrays.items()})


def from_safetensors(data: bytes, where: str) -> State:
    """Arrays of a safetensors file; a file that is not one fails with one line."""
    from safetensors import SafetensorError
    from safetensors.numpy import load

    from .errors import RaysageError

    try:
        return load(data)
    except (SafetensorError, ValueError, OverflowError) as exc:
        raise RaysageError(f"{where} is not a valid state file ({exc}); remove the run's "
                           "checkpoint.json to restart the run from round 0") from None


class StateStore:
    """Client id -> state, in RAM up to ``budget`` bytes, the least recently used spilled.

    ``get`` returns arrays the caller must not modify; ``put`` replaces a
    client's entry. Entries restored from a checkpoint are read from the run
    folder when first asked for.
    """

    def __init__(self, budget: int, spill_dir: str | os.PathLike | None = None):
        self.budget = budget
        self.spill_dir = Path(spill_dir) if spill_dir is not None else None
        self._ram: OrderedDict[int, State] = OrderedDict()
        self._ram_bytes = 0
        self._sizes: dict[int, int] = {}          # every known entry, wherever it is
        self._spilled: set[int] = set()           # entries whose spill file is current
        self._checkpointed: dict[int, str] = {}   # entry -> its file in the run folder
        # SHA-256 of each entry's spill file and of its checkpointed file, kept apart
        # from the files and checked when they are read.
        self._spill_digests: dict[int, str] = {}
        self._checkpoint_digests: dict[int, str | None] = {}
        self._changed: set[int] = set()           # since the last checkpoint
        self._folder = None                       # the run folder of _checkpointed files

    # ------------------------------------------------------------ access
    def __contains__(self, cid: int) -> bool:
        return cid in self._sizes

    def __len__(self) -> int:
        return len(self._sizes)

    def clients(self) -> list[int]:
        return sorted(self._sizes)

    @property
    def ram_bytes(self) -> int:
        return self._ram_bytes

    @property
    def total_bytes(self) -> int:
        """Bytes of every entry, in RAM or not: the state a real deployment holds."""
        return sum(self._sizes.values())

    @property
    def disk_bytes(self) -> int:
        return sum(self._sizes[c] for c in self._spilled if c not in self._ram)

    def get(self, cid: int) -> State | None:
        state = self._ram.get(cid)
        if state is not None:
            self._ram.move_to_end(cid)
            return state
        if cid in self._spilled:
            state = self._read_spill(cid)
        elif cid in self._checkpointed:
            name, where = self._checkpointed[cid], self._folder.path(self._checkpointed[cid])
            state = from_safetensors(read_verified(self._folder.read_bytes(name),
                                                   self._checkpoint_digests.get(cid), where),
                                     where)
        else:
            return None
        self._hold(cid, state)
        return state

    def put(self, cid: int, state: State) -> None:
        self._drop_from_ram(cid)
        self._spilled.discard(cid)
        self._changed.add(cid)
        self._sizes[cid] = state_size(state)
        self._hold(cid, state)

    # ------------------------------------------------------------ RAM and spill
    def _hold(self, cid: int, state: State) -> None:
        self._ram[cid] = state
        self._ram_bytes += self._sizes[cid]
        self._evict(keep=cid)

    def _drop_from_ram(self, cid: int) -> None:
        if self._ram.pop(cid, None) is not None:
            self._ram_bytes -= self._sizes[cid]

    def _evict(self, keep: int) -> None:
        """Spill least recently used entries until RAM is within the budget.

        Without a spill folder the store is unbounded (tests, tiny runs).
        """
        if self.spill_dir is None:
            return
        for cid in list(self._ram):
            if self._ram_bytes <= self.budget:
                return
            if cid == keep or self._sizes[cid] == 0:
                continue
            if cid not in self._spilled:
                self._write_spill(cid, self._ram[cid])
            self._drop_from_ram(cid)

    def _spill_path(self, cid: int) -> Path:
        return self.spill_dir / f"{cid}.safetensors"

    def _write_spill(self, cid: int, state: State) -> None:
        self.spill_dir.mkdir(parents=True, exist_ok=True)
        path = self._spill_path(cid)
        tmp = path.with_suffix(".tmp")
        data = to_safetensors(state)
        tmp.write_bytes(data)
        tmp.replace(path)
        self._spilled.add(cid)
        self._spill_digests[cid] = digest(data)

    def _read_spill(self, cid: int) -> State:
        path = self._spill_path(cid)
        return from_safetensors(read_verified(path.read_bytes(), self._spill_digests.get(cid),
                                              f"spilled state file {path}"), str(path))

    def close(self) -> None:
        """Forget everything and remove the spill folder."""
        self._ram.clear()
        self._ram_bytes = 0
        self._sizes.clear()
        self._spilled.clear()
        self._checkpointed.clear()
        self._spill_digests.clear()
        self._checkpoint_digests.clear()
        self._changed.clear()
        if self.spill_dir is not None:
            shutil.rmtree(self.spill_dir, ignore_errors=True)

    # ------------------------------------------------------------ checkpoints
    def checkpoint(self, folder, prefix: str, tag: str) -> dict[int, tuple[str, int, str]]:
        """Write the entries changed since the last checkpoint into ``folder``.

        Returns {client: (file name, bytes, SHA-256 of the file)} of what was
        written; entries not listed are where the previous checkpoint put them.
        """
        written = {}
        for cid in sorted(self._changed):
            state = self.get(cid)
            name = f"{prefix}/{cid}.{tag}.safetensors"
            data = to_safetensors(state)
            folder.write_bytes(name, data)
            self._checkpointed[cid] = name
            self._checkpoint_digests[cid] = digest(data)
            written[cid] = (name, self._sizes[cid], self._checkpoint_digests[cid])
        self._folder = folder
        self._changed.clear()
        return written

    def restore(self, folder, files: dict[int, tuple[str, int, str | None]]) -> None:
        """Start from a checkpoint: every entry is read from ``folder`` when first needed,
        and checked against the SHA-256 its checkpoint recorded."""
        self.close()
        self._folder = folder
        for cid, (name, size, sha256) in files.items():
            self._checkpointed[cid] = name
            self._sizes[cid] = size
            self._checkpoint_digests[cid] = sha256
