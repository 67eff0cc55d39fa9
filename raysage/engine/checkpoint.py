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
names are removed when a run resumes. The manifest records the SHA-256 of
every file it names, and of the config the run was made with (all of it but
the settings a resume may change); a resume verifies every file before
anything starts, and each file again when it is read. Reading a checkpoint parses JSON and
raw arrays only, so a folder someone hands you cannot run code on
``--resume``; arrays are loaded onto whatever device the resumed run uses.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

from ..config import EXECUTION_FIELDS, shown
from ..errors import RaysageError
from ..results import RunFolder
from ..store import digest, from_safetensors, read_verified, to_safetensors

CHECKPOINT = "checkpoint.json"
FORMAT = "raysage-checkpoint/3"
# Written before checksums: read, but its files cannot be verified.
UNVERIFIED_FORMAT = "raysage-checkpoint/2"
# What --resume may change: how far the run goes, how often it checkpoints and
# evaluates, and where it executes; never what it computes.
RESUMABLE_FIELDS = ("rounds", "budget_gib", "checkpoint_every", "eval_every",
                    *sorted(EXECUTION_FIELDS - {"out", "checkpoint_every"}))
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
            raise ValueError(f"unexpected array {shown(name)}")
        out[part][key] = array
    return out


class Manifest(dict):
    """The parsed checkpoint.json (a dict), with the file maps keyed by client id."""

    def client_files(self, kind: str) -> dict[int, tuple[str, int, str | None]]:
        """{client: (file, bytes, SHA-256 or None)} of one kind of per-client state."""
        return {int(cid): (name, size, self.digest(name))
                for cid, (name, size) in self[kind].items()}

    def digest(self, name: str | None) -> str | None:
        """The SHA-256 recorded for a file (None for a checkpoint made before checksums)."""
        return self.get("digests", {}).get(name)

    @property
    def verified(self) -> bool:
        return self["format"] == FORMAT

    def files(self) -> set[str]:
        names = {self["global"]} | ({self["server"]} if self["server"] else set())
        for kind in ("clients", "server_clients"):
            names |= {name for name, _ in self[kind].values()}
        return names


def config_digest(cfg) -> str:
    """SHA-256 of what a run computes: its config but the fields a resume may change."""
    values = {k: v for k, v in cfg.to_dict().items()
              if k not in RESUMABLE_FIELDS and k not in EXECUTION_FIELDS}
    return digest(json.dumps(values, sort_keys=True, default=str).encode())


def write_checkpoint(folder: RunFolder, progress: Progress, orchestrator,
                     previous: Manifest | None) -> Manifest:
    """Have every actor write what changed, then the driver the global state and manifest."""
    tag = f"r{progress.next_round - 1}"
    parts = orchestrator.checkpoint_actors(str(folder), tag)
    global_name = f"state/global.{tag}.safetensors"
    data = to_safetensors(_flatten(progress.global_state))
    folder.write_bytes(global_name, data)
    digests = {global_name: digest(data)}
    if parts["server"] is not None:
        digests[parts["server"]] = parts["server_sha256"]
    listed = {}
    for kind in ("clients", "server_clients"):
        listed[kind] = dict(previous[kind]) if previous else {}
        for cid, (name, size, sha256) in parts[kind].items():
            listed[kind][str(cid)] = [name, size]
            digests[name] = sha256
    manifest = Manifest(
        format=FORMAT, next_round=progress.next_round, sim_time=progress.sim_time,
        wall_time=progress.wall_time, totals=progress.totals,
        parts=sorted(progress.global_state),
        uploaded={str(cid): n for cid, n in orchestrator.world.uploaded.items()},
        **{"global": global_name}, server=parts["server"], clients=listed["clients"],
        server_clients=listed["server_clients"], config_sha256=config_digest(orchestrator.cfg),
        digests={})
    # Files the previous checkpoint wrote and this one keeps keep their digests (a
    # checkpoint made before checksums had none: its files are hashed once, now).
    kept = previous.get("digests", {}) if previous else {}
    manifest["digests"] = {name: digests.get(name) or kept.get(name)
                           or digest(folder.read_bytes(name))
                           for name in sorted(manifest.files())}
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
        raise ValueError(f"{shown(name)} is not a state file of this run")


def _validate(m: Manifest) -> None:
    if m.get("format") not in (FORMAT, UNVERIFIED_FORMAT):
        raise ValueError(f"format {shown(m.get('format'))}, expected {FORMAT!r}")
    if not isinstance(m["next_round"], int) or m["next_round"] < 1:
        raise ValueError(f"next_round {shown(m['next_round'])}")
    for key in ("sim_time", "wall_time"):
        if not isinstance(m[key], (int, float)) or not math.isfinite(m[key]):
            raise ValueError(f"{key} {shown(m[key])}")
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
                raise ValueError(f"{kind} entry {shown(cid)}")
            _state_file(name)
    if m["format"] == FORMAT:
        if not isinstance(m.get("config_sha256"), str):
            raise ValueError("config_sha256")
        digests = m["digests"]
        if not isinstance(digests, dict) or set(digests) != m.files() or not all(
                isinstance(d, str) and len(d) == 64 for d in digests.values()):
            raise ValueError("digests must give a SHA-256 for every file it names")


def verify_checkpoint(folder: RunFolder, manifest: Manifest) -> None:
    """Every file the checkpoint names is there and unchanged; else one line naming the
    first that is not, and what to do."""
    if not manifest.verified:
        return
    for name in sorted(manifest.files()):
        where = folder.path(name)
        if not folder.exists(name):
            raise RaysageError(f"{where} is missing, but the checkpoint of round "
                               f"{manifest['next_round'] - 1} needs it; restore the file, or "
                               f"remove {folder.path(CHECKPOINT)} to restart the run from "
                               "round 0")
        read_verified(folder.read_bytes(name), manifest.digest(name), where)


def check_config(folder: RunFolder, manifest: Manifest, cfg) -> None:
    """The config a run resumes with is the one its checkpoint was made with."""
    if manifest.verified and config_digest(cfg) != manifest["config_sha256"]:
        raise RaysageError(
            f"{folder.path('config.yaml')} was edited after the checkpoint of round "
            f"{manifest['next_round'] - 1} was made with it; put it back as it was (a resumed "
            "run must compute what it started computing); to run further, checkpoint or "
            "evaluate at another cadence or execute elsewhere, pass --rounds, --budget-gib, "
            "--checkpoint-every, --eval-every or an execution flag (--workers, ...) with "
            "--resume")


def read_progress(folder: RunFolder, manifest: Manifest) -> Progress:
    name = manifest["global"]
    where = folder.path(name)
    arrays = from_safetensors(read_verified(folder.read_bytes(name), manifest.digest(name),
                                            where), where)
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
