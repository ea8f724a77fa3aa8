"""Each result's state, kept in SQLite under state_dir so it survives restarts.

A result is `pending` (marked, not started), `uploading`, `retrying` (with attempts, last
error and next try) or `done`. `syncd status` reads the same file while the daemon runs.
"""

from __future__ import annotations

import sqlite3
import time
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

from syncd.config import ConfigError

SCHEMA = """
CREATE TABLE IF NOT EXISTS results (
    rel        TEXT PRIMARY KEY,
    state      TEXT NOT NULL,
    attempts   INTEGER NOT NULL DEFAULT 0,
    last_error TEXT,
    permanent  INTEGER NOT NULL DEFAULT 0,
    next_try   REAL,
    files      INTEGER,
    bytes      INTEGER,
    updated    REAL NOT NULL
)
"""


class State(StrEnum):
    PENDING = "pending"
    UPLOADING = "uploading"
    RETRYING = "retrying"
    DONE = "done"


@dataclass(frozen=True)
class Record:
    rel: str
    state: State
    attempts: int = 0
    last_error: str | None = None
    permanent: bool = False
    next_try: float | None = None
    files: int | None = None
    bytes: int | None = None
    updated: float = 0.0


class StateStore:
    """One SQLite file; every change is its own small transaction."""

    def __init__(self, state_dir: Path, readonly: bool = False) -> None:
        self.path = state_dir / "state.db"
        try:
            if readonly:
                self.db = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True)
            else:
                state_dir.mkdir(parents=True, exist_ok=True)
                # `syncd sync` and `syncd status` may open it while the daemon runs.
                self.db = sqlite3.connect(self.path, isolation_level=None, timeout=30)
                if self.db.execute("PRAGMA journal_mode").fetchone()[0] != "wal":
                    self.db.execute("PRAGMA journal_mode=WAL")
                self.db.execute("PRAGMA synchronous=NORMAL")
                self.db.execute(SCHEMA)
        except (OSError, sqlite3.Error) as exc:
            raise ConfigError(
                f"state_dir {state_dir}: cannot open {self.path} ({exc}): make it writable by "
                "this user or set syncd.state_dir (SYNCD_STATE_DIR)"
            ) from None

    def close(self) -> None:
        self.db.close()

    def reset_interrupted(self) -> None:
        """Results a killed daemon was uploading are pending again."""
        self.db.execute(
            "UPDATE results SET state = ? WHERE state = ?",
            (State.PENDING.value, State.UPLOADING.value),
        )

    def get(self, rel: str) -> Record | None:
        row = self.db.execute(f"SELECT {COLUMNS} FROM results WHERE rel = ?", (rel,)).fetchone()
        return _record(row) if row else None

    def all(self) -> list[Record]:
        try:
            rows = self.db.execute(f"SELECT {COLUMNS} FROM results ORDER BY rel").fetchall()
        except sqlite3.OperationalError:  # a read-only look at a state file not yet created
            return []
        return [_record(row) for row in rows]

    def set(self, record: Record) -> None:
        self.db.execute(
            f"INSERT OR REPLACE INTO results ({COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                record.rel,
                record.state.value,
                record.attempts,
                record.last_error,
                int(record.permanent),
                record.next_try,
                record.files,
                record.bytes,
                time.time(),
            ),
        )


COLUMNS = "rel, state, attempts, last_error, permanent, next_try, files, bytes, updated"


def _record(row: tuple) -> Record:
    rel, state, attempts, last_error, permanent, next_try, files, size, updated = row
    return Record(
        rel, State(state), attempts, last_error, bool(permanent), next_try, files, size, updated
    )
