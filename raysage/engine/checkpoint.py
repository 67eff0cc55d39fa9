"""Checkpoints: arrays and a manifest, never pickled objects.

A checkpoint of round r is ``checkpoint.json`` in the run folder, a small
manifest (where the run stands, planning's memory, and which file holds
each piece of state), plus safetensors files under ``state/``:

* ``state/global.<tag>.safetensors``: the global state the driver broadcasts;
* ``state/server.<tag>.safetensors``: the server's models and optimizers;
* ``state/clients/<id>.<tag>.safetensors`` and ``state/server-clients/...``:
  one file per client, written by the worker (or the server) that holds the
  client, only for clients whose state changed since the previous
  checkpoint. Client state never passes through the driver.

The manifest is written last and atomically, so a run interrupted while
writing a checkpoint resumes from the previous one; files no manifest
names are removed when a run resumes. Reading a checkpoint parses JSON and
raw arrays only, so a folder someone hands you cannot run code on
``--resume``; arrays are loaded onto whatever device the resumed run uses.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

from ..errors import RaysageError
from ..results import RunFolder
from ..store import from_safetensors, to_safetensors

CHECKPOINT = "checkpoint.json"
FORMAT = "raysage-checkpoint/2"
# Written by raysage before checkpoints were arrays; reading it would unpickle.
PICKLED_CHECKPOINT = "checkpoint.pt"


@dataclass
class Progress:
    """Where a run stands after a round: what a checkpoint restores."""

    next_round: int
    global_state: dict[str, dict[str, Any]]
    sim_time: float
    totals: dict[str, float]      # bytes (integers) and joules
    wall_time: float


def _flatten(global_state: dict[str, dict[str, Any]]) -> dict[str, Any]:
    return {f"{part}/{key}": array for part, state in global_state.items()
            for key, array in state.items()}


def _unflatten(arrays: dict[str, Any], parts: list[str]) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {part: {} for part in parts}
    for name, array in arrays.items():
        part, _, key = name.partition("/")
        if part not in out or not key:
            raise ValueError(f"unexpected array {name!r}")
        out[part][key] = array
    return out


class Manifest(dict):
    """The parsed checkpoint.json (a dict), with the file maps keyed by client id."""

    def client_files(self, kind: str) -> dict[int, tuple[str, int]]:
        return {int(cid): (name, size) for cid, (name, size) in self[kind].items()}

    def files(self) -> set[str]:
        names = {self["global"]} | ({self["server"]} if self["server"] else set())
        for kind in ("clients", "server_clients"):
            names |= {name for name, _ in self[kind].values()}
        return names


def write_checkpoint(folder: RunFolder, progress: Progress, orchestrator,
                     previous: Manifest | None) -> Manifest:
    """Have every actor write what changed, then the driver the global state and manifest."""
    tag = f"r{progress.next_round - 1}"
    parts = orchestrator.checkpoint_actors(str(folder), tag)
    global_name = f"state/global.{tag}.safetensors"
    folder.write_bytes(global_name, to_safetensors(_flatten(progress.global_state)))
    clients = dict(previous["clients"]) if previous else {}
    server_clients = dict(previous["server_clients"]) if previous else {}
    clients.update({str(cid): list(entry) for cid, entry in parts["clients"].items()})
    server_clients.update({str(cid): list(entry)
                           for cid, entry in parts["server_clients"].items()})
    manifest = Manifest(
        format=FORMAT, next_round=progress.next_round, sim_time=progress.sim_time,
        wall_time=progress.wall_time, totals=progress.totals,
        parts=sorted(progress.global_state),
        uploaded={str(cid): n for cid, n in orchestrator.world.uploaded.items()},
        **{"global": global_name}, server=parts["server"], clients=clients,
        server_clients=server_clients)
    folder.write_bytes(CHECKPOINT, json.dumps(manifest).encode())
    if previous:
        for name in previous.files() - manifest.files():
            folder.delete(name)
    return manifest


def read_manifest(folder: RunFolder) -> Manifest | None:
    """The run's checkpoint manifest, validated; None if the run has none yet."""
    if not folder.exists(CHECKPOINT):
        if folder.exists(PICKLED_CHECKPOINT):
            raise RaysageError(
                f"{folder.path(PICKLED_CHECKPOINT)} is a checkpoint of an older raysage, "
                "written with pickle, which can run code when read; raysage no longer reads "
                "it: start the run again in a new folder")
        return None
    where = folder.path(CHECKPOINT)
    try:
        manifest = Manifest(json.loads(folder.read_bytes(CHECKPOINT)))
        _validate(manifest)
    except (ValueError, TypeError, KeyError, AttributeError) as exc:
        raise RaysageError(f"checkpoint {where} cannot be read ({type(exc).__name__}: "
                           f"{str(exc)[:120]}); remove it to restart the run from round 0"
                           ) from None
    return manifest


def _state_file(name: Any) -> None:
    """Only files raysage writes: relative paths under state/, ending in .safetensors."""
    if (not isinstance(name, str) or not name.startswith("state/")
            or not name.endswith(".safetensors") or ".." in name.split("/")
            or "\\" in name):
        raise ValueError(f"{name!r} is not a state file of this run")


def _validate(m: Manifest) -> None:
    if m.get("format") != FORMAT:
        raise ValueError(f"format {m.get('format')!r}, expected {FORMAT!r}")
    if not isinstance(m["next_round"], int) or m["next_round"] < 1:
        raise ValueError(f"next_round {m['next_round']!r}")
    for key in ("sim_time", "wall_time"):
        if not isinstance(m[key], (int, float)) or not math.isfinite(m[key]):
            raise ValueError(f"{key} {m[key]!r}")
    if not all(isinstance(v, (int, float)) and math.isfinite(v) for v in m["totals"].values()):
        raise ValueError("totals must be numbers")
    if not isinstance(m["parts"], list):
        raise ValueError("parts")
    if not all(cid.isdigit() and isinstance(n, int) for cid, n in m["uploaded"].items()):
        raise ValueError("uploaded")
    _state_file(m["global"])
    if m["server"] is not None:
        _state_file(m["server"])
    for kind in ("clients", "server_clients"):
        for cid, entry in m[kind].items():
            name, size = entry
            if not cid.isdigit() or not isinstance(size, int) or size < 0:
                raise ValueError(f"{kind} entry {cid!r}")
            _state_file(name)


def read_progress(folder: RunFolder, manifest: Manifest) -> Progress:
    name = manifest["global"]
    arrays = from_safetensors(folder.read_bytes(name), folder.path(name))
    try:
        global_state = _unflatten(arrays, manifest["parts"])
    except ValueError as exc:
        raise RaysageError(f"{folder.path(name)}: {exc}; remove {CHECKPOINT} to restart the "
                           "run from round 0") from None
    return Progress(manifest["next_round"], global_state, float(manifest["sim_time"]),
                    dict(manifest["totals"]), float(manifest["wall_time"]))


def remove_unlisted_state(folder: RunFolder, manifest: Manifest | None) -> None:
    """Delete state files no manifest names (left by an interrupted checkpoint or run)."""
    keep = manifest.files() if manifest else set()
    for name in folder.list_files("state"):
        if name not in keep:
            folder.delete(name)
