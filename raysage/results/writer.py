"""The run folder: resolved config, per-round and per-client Parquet, summary.

A run folder is a local path or any URI a pyarrow filesystem understands
(``s3://bucket/runs/a``, ``gs://…``, ``file:///…``), so a job on a cluster
can write where its submitter reads. Every file is written under a
temporary name and moved into place, so an interrupted run leaves complete
files of the rounds it finished, never a half-written one. (On object stores,
where a move is a copy, the object only appears once it is whole.)
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from ..config import Config
from ..errors import ConfigError, RaysageError, one_line


# The lock a run holds on its folder while it runs (see RunFolder.lock).
LOCK = ".raysage.lock"


class RunFolder:
    """One run's folder: a local directory, or a folder on a pyarrow filesystem.

    Local folders use plain file operations, so a worker that writes its
    clients' state does not import pyarrow (about 30 MB per process) unless
    the run folder is remote.
    """

    def __init__(self, location: str | os.PathLike):
        location = str(location)
        self.location = location
        self.is_local = "://" not in location
        if self.is_local:
            self.root, self._fs = os.path.abspath(location), None
            return
        import pyarrow as pa
        import pyarrow.fs as pafs

        try:
            self._fs, self.root = pafs.FileSystem.from_uri(location)
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError, OSError) as exc:
            raise ConfigError(f"cannot use {location!r} as a run folder: "
                              f"{one_line(exc)}; give a local path or a URI such as "
                              "s3://bucket/runs/name") from None

    @property
    def fs(self):
        """The folder's pyarrow filesystem (a local one for a local folder)."""
        if self._fs is None:
            import pyarrow.fs as pafs

            self._fs = pafs.LocalFileSystem()
        return self._fs

    def path(self, name: str) -> str:
        return f"{self.root.rstrip('/')}/{name}"

    def is_nonempty(self) -> bool:
        """Whether the folder holds anything; fails in one line, before a run starts, where
        no run folder can be (a file, an unwritable place)."""
        if self.is_local:
            if os.path.isfile(self.root):
                raise ConfigError(f"run folder {self} is a file, not a folder; choose another "
                                  "--out")
            if os.path.isdir(self.root) and set(os.listdir(self.root)) - {LOCK}:
                return True
            self.check_writable()
            return False
        import pyarrow.fs as pafs

        info = self.fs.get_file_info(self.root)
        if info.type == pafs.FileType.File:
            raise ConfigError(f"run folder {self} is a file, not a folder; choose another --out")
        return (info.type != pafs.FileType.NotFound
                and bool(self.fs.get_file_info(pafs.FileSelector(self.root,
                                                                 allow_not_found=True))))

    # ------------------------------------------------------------ the lock
    def lock(self, announce) -> bool:
        """Take the folder for this run: a lock file created atomically, holding this
        process's id, host and start time. Another live run's lock is refused in one
        line; a lock left by a process of this host that no longer runs is taken over,
        with a line saying so. Returns whether the folder was created for the run.
        (A remote folder cannot be locked atomically; it is used unlocked.)"""
        import socket

        if not self.is_local:
            return False
        created = not os.path.isdir(self.root)
        if created:
            self.check_writable()
            os.makedirs(self.root, exist_ok=True)
        path = self.path(LOCK)
        me = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.time()}
        for _ in range(3):
            try:
                descriptor = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = _lock_holder(path)
                for _ in range(20):     # a lock just created may not hold its JSON yet
                    if holder is not None:
                        break
                    time.sleep(0.05)
                    holder = _lock_holder(path)
                if holder is None or not _lock_is_stale(holder, me["host"]):
                    if created:
                        with contextlib.suppress(OSError):   # the other run's now
                            os.rmdir(self.root)
                    raise ConfigError(_in_use(self, path, holder)) from None
                announce(f"raysage: {self} was locked by process {holder['pid']} on this "
                         "host, which no longer runs; taking the folder over")
                with contextlib.suppress(FileNotFoundError):
                    os.remove(path)
                continue
            with os.fdopen(descriptor, "w") as out:
                json.dump(me, out)
            self._locked, self._created = True, created
            return created
        raise ConfigError(_in_use(self, path, _lock_holder(path)))

    def unlock(self) -> None:
        """Give the folder back; a folder created for a run that wrote nothing goes too."""
        if not getattr(self, "_locked", False):
            return
        self._locked = False
        with contextlib.suppress(FileNotFoundError):
            os.remove(self.path(LOCK))
        if self._created:
            with contextlib.suppress(OSError):       # not empty: the run wrote its files
                os.rmdir(self.root)

    def check_writable(self) -> None:
        """Create and remove a folder where the run folder goes (or inside it), so that a
        place we cannot write fails now, not after minutes of start-up. (Object stores:
        the first write says what is wrong.)"""
        place = Path(self.root)
        while not place.exists() and place != place.parent:
            place = place.parent
        if not place.is_dir():
            raise ConfigError(f"cannot create run folder {self}: {place} is a file, not a "
                              "folder; choose another --out")
        try:
            os.rmdir(tempfile.mkdtemp(prefix=".raysage-", dir=place))
        except OSError as exc:
            raise ConfigError(f"cannot write run folder {self}: {exc.strerror or exc} in "
                              f"{place}; choose another --out") from None

    def exists(self, name: str) -> bool:
        if self.is_local:
            return os.path.isfile(self.path(name))
        import pyarrow.fs as pafs

        return self.fs.get_file_info(self.path(name)).type == pafs.FileType.File

    def write_bytes(self, name: str, data: bytes) -> None:
        """Write to a temporary name and move it into place."""
        parent, _, base = name.rpartition("/")
        tmp = self.path(f"{parent}/.{base}.tmp" if parent else f".{name}.tmp")
        try:
            if self.is_local:
                os.makedirs(os.path.dirname(tmp), exist_ok=True)
                with open(tmp, "wb") as out:
                    out.write(data)
                os.replace(tmp, self.path(name))
                return
            self.fs.create_dir(self.path(parent) if parent else self.root, recursive=True)
            with self.fs.open_output_stream(tmp) as out:
                out.write(data)
            self.fs.move(tmp, self.path(name))
        except OSError as exc:  # a full disk, a folder made read-only mid-run
            raise RaysageError(f"cannot write {self.path(name)}: {one_line(exc)}; free space "
                               "or fix the folder's permissions, then continue the run from "
                               f"its last checkpoint with raysage simulate --resume {self}"
                               ) from None

    def read_bytes(self, name: str) -> bytes:
        if self.is_local:
            with open(self.path(name), "rb") as f:
                return f.read()
        with self.fs.open_input_stream(self.path(name)) as f:
            return f.read()

    def delete(self, name: str) -> None:
        try:
            if self.is_local:
                os.remove(self.path(name))
            else:
                self.fs.delete_file(self.path(name))
        except FileNotFoundError:
            pass

    def delete_all(self) -> None:
        """Remove everything in the folder (the folder stays)."""
        if self.is_local:
            for entry in os.scandir(self.root):
                shutil.rmtree(entry.path) if entry.is_dir() else os.remove(entry.path)
        else:
            self.fs.delete_dir_contents(self.root, missing_dir_ok=True)

    def names(self) -> list[str]:
        """Names of the files and folders directly in the folder."""
        if self.is_local:
            return sorted(os.listdir(self.root)) if os.path.isdir(self.root) else []
        import pyarrow.fs as pafs

        infos = self.fs.get_file_info(pafs.FileSelector(self.root, allow_not_found=True))
        return sorted(i.path.rstrip("/").rsplit("/", 1)[-1] for i in infos)

    def list_files(self, folder: str) -> list[str]:
        """Names (relative to the run folder) of every file under ``folder``."""
        root = self.root.rstrip("/") + "/"
        if self.is_local:
            return sorted(os.path.join(top, f)[len(root):]
                          for top, _, files in os.walk(self.path(folder)) for f in files)
        import pyarrow.fs as pafs

        selector = pafs.FileSelector(self.path(folder), recursive=True, allow_not_found=True)
        return sorted(info.path[len(root):] for info in self.fs.get_file_info(selector)
                      if info.type == pafs.FileType.File)

    def write_table(self, name: str, rows: list[dict[str, Any]]) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        buffer = io.BytesIO()
        pq.write_table(pa.Table.from_pylist(rows), buffer)
        self.write_bytes(name, buffer.getvalue())

    def read_table(self, name: str) -> list[dict[str, Any]]:
        import pyarrow.parquet as pq

        return pq.read_table(io.BytesIO(self.read_bytes(name))).to_pylist()

    def __str__(self) -> str:
        return self.location


def _lock_holder(path: str) -> dict[str, Any] | None:
    """Who holds a lock file, or None when it cannot be read as one."""
    try:
        with open(path, encoding="utf-8") as f:
            holder = json.loads(f.read(4096))
    except (OSError, ValueError):
        return None
    if not (isinstance(holder, dict) and isinstance(holder.get("pid"), int)
            and isinstance(holder.get("host"), str)
            and isinstance(holder.get("since"), (int, float))):
        return None
    return holder


def _lock_is_stale(holder: dict[str, Any], host: str) -> bool:
    """Whether a lock's process is gone: only decidable on the host that took it. A pid
    that runs again, but was started after the lock was taken, is another process."""
    import psutil

    if holder["host"] != host:
        return False
    try:
        started = psutil.Process(holder["pid"]).create_time()
    except psutil.NoSuchProcess:
        return True
    except psutil.Error:       # it exists, but we may not look at it: not ours to take
        return False
    return started > holder["since"] + 1.0


def _in_use(folder: RunFolder, path: str, holder: dict[str, Any] | None) -> str:
    if holder is None:
        return (f"run folder {folder} has a lock file {path} that raysage cannot read; if no "
                "run uses the folder, remove the file, else choose another --out")
    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(holder["since"]))
    return (f"run folder {folder} is in use by another run (process {holder['pid']} on "
            f"{holder['host']}, since {since}); wait for it to finish or choose another --out")


class RunWriter:
    """Writes a run folder; with ``keep_rounds_below`` it continues an existing one,
    keeping the rows of rounds before that (the rounds a checkpoint covers)."""

    def __init__(self, folder: RunFolder, cfg: Config, keep_rounds_below: int | None = None,
                 algorithm: Any = None):
        self.folder = folder
        self.rounds: list[dict[str, Any]] = []
        self.clients: list[dict[str, Any]] = []
        if keep_rounds_below is None:
            self.write_config(cfg, algorithm)
            return
        for name, rows in (("rounds.parquet", self.rounds), ("clients.parquet", self.clients)):
            if folder.exists(name):
                rows.extend(self._read_rows(name, keep_rounds_below))
        if {r["round"] for r in self.rounds} < set(range(keep_rounds_below)):
            raise RaysageError(f"{folder.path('rounds.parquet')} lacks rounds the checkpoint "
                               f"covers (0 to {keep_rounds_below - 1}); restore the file, or "
                               "start the run again in a new folder")
        self.truncate(keep_rounds_below)

    def write_config(self, cfg: Config, algorithm: Any = None) -> None:
        """config.yaml, and the config again as one Parquet row, so that reports read
        Parquet only; with the algorithm's label and colour, since a report may not be
        able to import an algorithm that came from a user's file."""
        from ..config import write_yaml

        self.folder.write_bytes("config.yaml", write_yaml(cfg).encode())
        row = cfg.flat_dict()
        if algorithm is not None:
            row |= {"algorithm_label": algorithm.label, "algorithm_colour": algorithm.colour}
        self.folder.write_table("run.parquet", [row])

    def _read_rows(self, name: str, rounds: int) -> list[dict[str, Any]]:
        """A table of the run being resumed, or one line when it cannot be read."""
        import pyarrow as pa

        try:
            rows = self.folder.read_table(name)
        except (pa.ArrowException, OSError) as exc:
            raise RaysageError(f"{self.folder.path(name)} is damaged ({one_line(exc)[:120]}); "
                               "restore the file, or start the run again in a new folder"
                               ) from None
        if any(not isinstance(r.get("round"), int) for r in rows):
            raise RaysageError(f"{self.folder.path(name)} has rows without a round; it is not "
                               "a table raysage wrote: restore it or start the run again")
        return rows

    def truncate(self, next_round: int) -> None:
        """Forget rows of rounds >= next_round (they are about to be run again)."""
        self.rounds[:] = [r for r in self.rounds if r["round"] < next_round]
        self.clients[:] = [r for r in self.clients if r["round"] < next_round]

    def add_round(self, round_row: dict[str, Any], client_rows: list[dict[str, Any]]) -> None:
        self.rounds.append(round_row)
        self.clients.extend(client_rows)
        # Rewriting whole tables keeps each file self-contained and valid
        # after every round; a round's rows are small next to its training.
        self.folder.write_table("rounds.parquet", self.rounds)
        self.folder.write_table("clients.parquet", self.clients)

    def finish(self, summary: dict[str, Any]) -> None:
        self.folder.write_bytes("summary.json", (json.dumps(summary, indent=2) + "\n").encode())
