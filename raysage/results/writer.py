"""The run folder: resolved config, per-round and per-client Parquet, summary.

Every file is written to a temporary name in the same folder and renamed
into place, so an interrupted run leaves complete files of the rounds it
finished, never a half-written one.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from ..config import Config, save_config


def atomic_write(path: Path, write) -> None:
    """Call write(tmp_path) and move the result to path in one rename."""
    tmp = path.with_name(f".{path.name}.tmp")
    write(tmp)
    os.replace(tmp, path)


class RunWriter:
    """Writes a run folder; with ``keep_rounds_below`` it continues an existing one,
    keeping the rows of rounds before that (the rounds a checkpoint covers)."""

    def __init__(self, run_dir: Path, cfg: Config, keep_rounds_below: int | None = None):
        self.run_dir = run_dir
        self.rounds: list[dict[str, Any]] = []
        self.clients: list[dict[str, Any]] = []
        if keep_rounds_below is None:
            run_dir.mkdir(parents=True, exist_ok=True)
            atomic_write(run_dir / "config.yaml", lambda p: save_config(cfg, p))
            return
        for name, rows in (("rounds.parquet", self.rounds), ("clients.parquet", self.clients)):
            if (run_dir / name).exists():
                rows.extend(pq.read_table(run_dir / name).to_pylist())
        self.truncate(keep_rounds_below)

    def truncate(self, next_round: int) -> None:
        """Forget rows of rounds >= next_round (they are about to be run again)."""
        self.rounds[:] = [r for r in self.rounds if r["round"] < next_round]
        self.clients[:] = [r for r in self.clients if r["round"] < next_round]

    def add_round(self, round_row: dict[str, Any], client_rows: list[dict[str, Any]]) -> None:
        self.rounds.append(round_row)
        self.clients.extend(client_rows)
        # Rewriting whole tables keeps each file self-contained and valid
        # after every round; a round's rows are small next to its training.
        for name, rows in (("rounds.parquet", self.rounds), ("clients.parquet", self.clients)):
            table = pa.Table.from_pylist(rows)
            atomic_write(self.run_dir / name, lambda p, t=table: pq.write_table(t, p))

    def finish(self, summary: dict[str, Any]) -> None:
        atomic_write(self.run_dir / "summary.json",
                     lambda p: p.write_text(json.dumps(summary, indent=2) + "\n"))
