"""The journal: each result's state, kept in SQLite under state_dir so it survives restarts.

A result is `pending` (marked, not started), `uploading`, `retrying` (with attempts, last
error and next try: the one place a retry time is kept; the daemon offers a result again when
it falls due), `done`, `forgotten` (its marker was removed while it waited), or `elsewhere`
(its metadata records another place: another prefix's or another result's record, left alone). A
result whose tree was uploaded whole but not recorded keeps that upload's acknowledgement (the
tree's fingerprint and each file's MD5), so the next attempt records it without sending the
tree again. A recorded result (done or elsewhere) keeps the stamp of its metadata as syncd
last wrote or saw it, so a write by someone else is noticed with a stat while nothing of it is
held in memory.
`syncd status` reads the same file while the daemon runs.

The metadata files are the record of what is published; this database is only a journal. A
corrupt one is moved aside with one warning and started afresh. Every failure to use it is a
SyncdError (a lock held too long is transient).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import os
import sqlite3
import stat
import tempfile
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any, TypeVar

from loguru import logger

from syncd.config import ConfigError
from syncd.errors import SyncdError, state_error
from syncd.metadata import Kept, Stamp

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
    updated    REAL NOT NULL,
    uploaded   TEXT,
    recorded   TEXT,
    earlier    TEXT,
    stamp      TEXT,
    sent       INTEGER,
    rate       REAL
)
"""
# The multipart uploads this host started and has not completed or aborted: a restart resumes
# them from the parts the store kept (rclone cannot list them, and S3 may not let syncd).
MULTIPART_SCHEMA = """
CREATE TABLE IF NOT EXISTS multipart (
    key       TEXT PRIMARY KEY,
    upload_id TEXT NOT NULL,
    part_size INTEGER NOT NULL
)
"""
# Columns later versions added, for a state file an earlier version made.
ADDED_COLUMNS = {
    "uploaded": "TEXT",
    "recorded": "TEXT",
    "earlier": "TEXT",
    "stamp": "TEXT",
    "sent": "INTEGER",
    "rate": "REAL",
}
# Records kept of a result under other prefixes than its latest one (a prefix changed and
# changed back restores the record it had there): the newest few.
EARLIER_RECORDS = 8
T = TypeVar("T")
# The write-ahead log's bound: checkpointed at WAL_PAGES pages (of 4 KiB), truncated to WAL_BYTES.
WAL_PAGES = 64
WAL_BYTES = 512 * 1024
# How long a write waits for another process's lock before it counts as a failure.
LOCK_TIMEOUT = 10.0


def clock() -> float:
    """The journal's clock for next tries: seconds since boot (CLOCK_BOOTTIME), which no step of
    the wall clock moves, so a clock set back an hour never holds a retry back an hour. A start
    makes every waiting result due anyway, so a reboot, which starts it again, costs nothing."""
    return time.clock_gettime(time.CLOCK_BOOTTIME)


def wall_time(when: float) -> float:
    """A time of the journal's clock as Unix time, as of now, for people to read."""
    return time.time() + (when - clock())


class Corrupt(sqlite3.DatabaseError):
    """What PRAGMA quick_check found wrong."""


def corrupt(exc: sqlite3.DatabaseError) -> bool:
    """True when the file is damaged or not a database at all (SQLite's own error codes)."""
    name = getattr(exc, "sqlite_errorname", "")
    return isinstance(exc, Corrupt) or name in ("SQLITE_CORRUPT", "SQLITE_NOTADB")


class State(StrEnum):
    PENDING = "pending"
    UPLOADING = "uploading"
    RETRYING = "retrying"
    DONE = "done"
    FORGOTTEN = "forgotten"
    ELSEWHERE = "elsewhere"  # its metadata records another place: left alone


# The states whose metadata is watched: a change by someone else is looked at.
WATCHED = (State.DONE.value, State.ELSEWHERE.value)


@dataclass(frozen=True)
class Entry:
    """A result's line in the journal."""

    rel: str
    state: State
    attempts: int = 0
    last_error: str | None = None
    permanent: bool = False
    next_try: float | None = None  # on the journal's clock (`clock`)
    files: int | None = None
    bytes: int | None = None
    updated: float = 0.0
    uploaded: str | None = None  # acknowledgement of a tree uploaded whole, not yet recorded
    sent: int | None = None  # uploading: bytes the store acknowledged so far (of `bytes`)
    rate: float | None = None  # uploading: bytes per second since the upload began


def not_a_folder(state_dir: Path) -> ConfigError | None:
    """The error for a state_dir that is there but no folder (a file in its place)."""
    if state_dir.exists() and not state_dir.is_dir():
        return no_folder(state_dir)
    return None


def unusable(state_dir: Path) -> ConfigError | None:
    """What `syncd run` would refuse about state_dir, found by making what run makes (the
    folder and a file in it) and removing it again: `syncd check` leaves nothing behind."""
    if (error := not_a_folder(state_dir)) is not None:
        return error
    made: list[Path] = []
    try:
        for folder in reversed([state_dir, *state_dir.parents]):
            if not folder.is_dir():
                folder.mkdir()
                made.append(folder)
        fd, probe = tempfile.mkstemp(prefix=".syncd-check-", dir=state_dir)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        return ConfigError(
            f"state_dir {state_dir}: cannot make it or write in it ({exc.strerror}: "
            f"{exc.filename}): make it writable by this user or set syncd.state_dir "
            "(SYNCD_STATE_DIR)"
        )
    finally:
        for folder in reversed(made):
            with contextlib.suppress(OSError):
                folder.rmdir()
    return None


def no_folder(state_dir: Path) -> ConfigError:
    return ConfigError(
        f"state_dir {state_dir} is not a folder: set syncd.state_dir (SYNCD_STATE_DIR) to a "
        "folder this user may write, or remove what is in its place"
    )


class Journal:
    """One SQLite file; every change is its own small transaction. Every call runs on the
    journal's own thread, in the order it was asked, so that a write waiting for another
    process's lock (or for the disk) never holds up the event loop."""

    def __init__(self, state_dir: Path, readonly: bool = False) -> None:
        self.path = state_dir / "state.db"
        self.select = COLUMNS
        self.thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="journal")
        if (error := not_a_folder(state_dir)) is not None:
            raise error
        try:
            refuse_links(self.path)
            if readonly:
                self.db = sqlite3.connect(
                    f"file:{self.path}?mode=ro", uri=True, timeout=2, check_same_thread=False
                )
                self.select = self._columns_of_any_version()
                self.identity = file_identity(self.path)
                return
            state_dir.mkdir(parents=True, exist_ok=True)
            try:
                self.db = self._open()
            except sqlite3.DatabaseError as exc:
                if not corrupt(exc):  # locked, a full disk: not a reason to start afresh
                    raise
                self._move_aside(exc)
                self.db = self._open()
        except (OSError, sqlite3.Error) as exc:
            raise ConfigError(
                f"state_dir {state_dir}: cannot open {self.path} ({exc}): make it writable by "
                "this user or set syncd.state_dir (SYNCD_STATE_DIR)"
            ) from None
        self.identity = file_identity(self.path)

    def _columns_of_any_version(self) -> str:
        """COLUMNS as they can be read from this file: NULL for those a daemon of an earlier
        version, which may still be running, has not added."""
        with self.errors():
            present = {row[1] for row in self.db.execute("PRAGMA table_info(results)")}
        return ", ".join(
            c if c in present or not present else f"NULL AS {c}" for c in COLUMNS.split(", ")
        )

    def _open(self) -> sqlite3.Connection:
        give_to_folder_owner(self.path)
        # `syncd sync` and `syncd status` may open it while the daemon runs. The connection is
        # made here and used by the journal's thread alone.
        db = sqlite3.connect(
            self.path, isolation_level=None, timeout=LOCK_TIMEOUT, check_same_thread=False
        )
        try:
            if db.execute("PRAGMA quick_check").fetchone()[0] != "ok":
                raise Corrupt("database disk image is malformed")
            if db.execute("PRAGMA journal_mode").fetchone()[0] != "wal":
                db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")
            # The write-ahead log is folded into the file every WAL_PAGES pages and cut back to
            # WAL_BYTES: SQLite's own bound (~4 MB) would fill a small state_dir.
            db.execute(f"PRAGMA wal_autocheckpoint={WAL_PAGES}")
            db.execute(f"PRAGMA journal_size_limit={WAL_BYTES}")
            db.execute(SCHEMA)
            db.execute(MULTIPART_SCHEMA)
            columns = {row[1] for row in db.execute("PRAGMA table_info(results)")}
            for column, kind in ADDED_COLUMNS.items():  # a file of an earlier version
                if column not in columns:
                    db.execute(f"ALTER TABLE results ADD COLUMN {column} {kind}")
        except BaseException:
            db.close()
            raise
        return db

    def _move_aside(self, exc: sqlite3.Error) -> None:
        aside = self.path.with_name(f"state.db.corrupt-{time.strftime('%Y%m%dT%H%M%S')}")
        self.path.rename(aside)
        for extra in ("-wal", "-shm"):
            self.path.with_name(f"state.db{extra}").unlink(missing_ok=True)
        logger.warning(
            "state database {} is corrupt ({}); moved it to {} and started a new one: the "
            "metadata files are the record, so nothing published is lost",
            self.path,
            exc,
            aside,
        )

    @contextmanager
    def errors(self) -> Iterator[None]:
        try:
            yield
        except sqlite3.Error as exc:
            raise state_error(exc, self.path) from None

    async def _run(self, work: Callable[[sqlite3.Connection], T]) -> T:
        """`work` done on the journal's thread after everything asked before it. Once asked,
        it is done even if the task that asked is cancelled meanwhile (a stop), so that no
        change is half made and none overtakes another."""

        def guarded() -> T:
            with self.errors():
                return work(self.db)

        job = asyncio.get_running_loop().run_in_executor(self.thread, guarded)
        return await asyncio.shield(job)

    async def _write(self, query: str, *args: object) -> None:
        await self._run(lambda db: db.execute(query, args))

    async def _one(self, query: str, *args: object) -> tuple[Any, ...] | None:
        row: tuple[Any, ...] | None = await self._run(lambda db: db.execute(query, args).fetchone())
        return row

    async def _rows(self, query: str, *args: object) -> list[tuple[Any, ...]]:
        rows: list[tuple[Any, ...]] = await self._run(lambda db: db.execute(query, args).fetchall())
        return rows

    def replaced(self) -> bool:
        """Whether the state file was removed or replaced since it was opened: what is written
        goes to a file nobody else sees, and is lost at the next start."""
        return file_identity(self.path) != self.identity

    def close(self) -> None:
        """After everything asked of it is done."""
        self.thread.shutdown(wait=True)
        self.db.close()

    async def start(self) -> None:
        """At a daemon's start: results a killed daemon was uploading are pending again, every
        result waiting to be retried is due now (a start, after a fix, tries them all), and no
        recorded result is watched until an attempt has looked at it under the settings of
        this run (its remote_path may have changed). Next tries of an earlier version, in Unix
        time, lie far ahead of the journal's clock: due now as well."""
        now = clock()

        def start(db: sqlite3.Connection) -> None:
            db.execute(
                "UPDATE results SET state = ? WHERE state = ?",
                (State.PENDING.value, State.UPLOADING.value),
            )
            db.execute(
                "UPDATE results SET next_try = ? WHERE state = ? AND next_try > ?",
                (now, State.RETRYING.value, now),
            )
            db.execute("UPDATE results SET stamp = NULL WHERE stamp IS NOT NULL")

        await self._run(start)

    async def due(self, after: float, until: float) -> list[str]:
        """Results whose next try falls in (`after`, `until`]."""
        rows = await self._rows(
            "SELECT rel FROM results WHERE state = ? AND next_try > ? AND next_try <= ? "
            "ORDER BY next_try",
            State.RETRYING.value,
            after,
            until,
        )
        return [row[0] for row in rows]

    async def retries_after(self, after: float) -> tuple[int, float | None]:
        """How many results wait for a try after `after`, and when the first of them is due."""
        row = await self._one(
            "SELECT COUNT(*), MIN(next_try) FROM results WHERE state = ? AND next_try > ?",
            State.RETRYING.value,
            after,
        )
        assert row is not None
        return row[0], row[1]

    async def get(self, rel: str) -> Entry | None:
        row = await self._one(f"SELECT {self.select} FROM results WHERE rel = ?", rel)
        return _entry(row) if row else None

    async def all(self) -> list[Entry]:
        def read(db: sqlite3.Connection) -> list[tuple[Any, ...]]:
            try:
                return db.execute(f"SELECT {self.select} FROM results ORDER BY rel").fetchall()
            except sqlite3.OperationalError as exc:
                if "no such table" not in str(exc):
                    raise
                return []  # a read-only look at a state file not yet made

        return [_entry(row) for row in await self._run(read)]

    # A result's state changes only by these transitions, named by the state they lead to. Each
    # replaces the result's entry; its kept record and its stamp stay as they are.

    async def uploading(self, rel: str, attempts: int, uploaded: str | None) -> None:
        """An attempt begins its upload (`uploaded`: what an earlier one acknowledged)."""
        await self._set(Entry(rel, State.UPLOADING, attempts=attempts, uploaded=uploaded))

    async def pending(self, entry: Entry) -> None:
        """An attempt stopped in the middle of its upload: pending, not uploading, so that
        syncd status does not show an upload nobody is making."""
        await self._set(dataclasses.replace(entry, state=State.PENDING))

    async def retrying(
        self, rel: str, attempts: int, error: SyncdError, next_try: float, uploaded: str | None
    ) -> None:
        """An attempt failed: tried again at `next_try` (on the journal's clock)."""
        await self._set(
            Entry(
                rel,
                State.RETRYING,
                attempts,
                str(error),
                error.permanent,
                next_try,
                uploaded=uploaded,
            )
        )

    async def done(self, rel: str, files: int | None = None, size: int | None = None) -> None:
        """Its metadata records it (`files`, `size`: of the tree uploaded, if known)."""
        await self._set(Entry(rel, State.DONE, files=files, bytes=size))

    async def elsewhere(self, rel: str, why: str) -> None:
        """Its metadata records another place: left alone."""
        await self._set(Entry(rel, State.ELSEWHERE, last_error=why))

    async def forgotten(self, rel: str, why: str, permanent: bool = False) -> None:
        """Its signal went while it waited, or it never had one (`syncd sync` failed, and
        `permanent` says if a person must fix why): nothing more is done for it until one
        comes."""
        await self._set(Entry(rel, State.FORGOTTEN, last_error=why, permanent=permanent))

    async def _set(self, entry: Entry) -> None:
        await self._write(
            f"INSERT INTO results ({COLUMNS}) VALUES ({SLOTS}) ON CONFLICT(rel) DO UPDATE "
            f"SET {UPDATES}",
            entry.rel,
            entry.state.value,
            entry.attempts,
            entry.last_error,
            int(entry.permanent),
            entry.next_try,
            entry.files,
            entry.bytes,
            time.time(),
            entry.uploaded,
            entry.sent,
            entry.rate,
        )

    async def progress(self, rel: str, sent: int, total: int, rate: float) -> None:
        """How far the upload of `rel` has come, while it is uploading. Never waits for
        another process's lock: a second later it is worth nothing, and the next one follows."""

        def note(db: sqlite3.Connection) -> None:
            db.execute("PRAGMA busy_timeout = 0")
            try:
                db.execute(
                    "UPDATE results SET sent = ?, bytes = ?, rate = ? WHERE rel = ? AND state = ?",
                    (sent, total, rate, rel, State.UPLOADING.value),
                )
            except sqlite3.OperationalError as exc:
                if "locked" not in str(exc) and "busy" not in str(exc):
                    raise
            finally:
                db.execute(f"PRAGMA busy_timeout = {int(LOCK_TIMEOUT * 1000)}")

        await self._run(note)

    async def set_kept(self, rel: str, kept: Kept) -> None:
        """Keep the record syncd made (it is the latest); one it made under another prefix
        before is kept too, so that it is restored if that prefix comes back."""

        def keep(db: sqlite3.Connection) -> None:
            latest, earlier = _records(db, rel)
            others = [
                k for k in [latest, *earlier] if k is not None and k.remote_path != kept.remote_path
            ]
            _keep(db, rel, kept, others)

        await self._run(keep)

    async def drop_kept(self, rel: str, remote_path: str) -> None:
        """Forget the record under `remote_path`: the bucket is about to change under it."""

        def drop(db: sqlite3.Connection) -> None:
            latest, earlier = _records(db, rel)
            if latest is not None and latest.remote_path == remote_path:
                latest = None
            _keep(db, rel, latest, [k for k in earlier if k.remote_path != remote_path])

        await self._run(drop)

    async def kept(self, rel: str, remote_path: str | None = None) -> Kept | None:
        """The record syncd made last, or the one it made under `remote_path`."""
        latest, earlier = await self._run(lambda db: _records(db, rel))
        if remote_path is None:
            return latest
        return next((k for k in [latest, *earlier] if k and k.remote_path == remote_path), None)

    async def set_stamp(self, rel: str, stamp: Stamp | None) -> None:
        """The stamp of a recorded result's metadata as syncd last wrote or saw it; None: the
        metadata is gone, and the result needs no more looks."""
        text = ":".join(map(str, stamp)) if stamp is not None else None
        await self._write("UPDATE results SET stamp = ? WHERE rel = ?", text, rel)

    async def drop_stamp(self, rel: str, known: Stamp) -> bool:
        """No more looks at a recorded result's metadata, if its stamp is still `known` (one
        step, so that a stamp an attempt or a renewal set meanwhile stays); False if not."""
        text = ":".join(map(str, known))

        def drop(db: sqlite3.Connection) -> bool:
            cursor = db.execute(
                "UPDATE results SET stamp = NULL WHERE rel = ? AND stamp = ? AND state IN (?, ?)",
                (rel, text, *WATCHED),
            )
            return cursor.rowcount == 1

        return await self._run(drop)

    async def restamp(self, rel: str, stamp: Stamp) -> None:
        """The stamp of a recorded result's metadata syncd rewrote (a renewal), if it is still
        watched (one step: a result no longer watched stays so)."""
        text = ":".join(map(str, stamp))
        await self._write(
            "UPDATE results SET stamp = ? WHERE rel = ? AND stamp IS NOT NULL AND state IN (?, ?)",
            text,
            rel,
            *WATCHED,
        )

    async def stamp(self, rel: str) -> Stamp | None:
        """The stamp of a recorded result's metadata, or None if it is not a watched one."""
        row = await self._one(
            "SELECT stamp FROM results WHERE rel = ? AND state IN (?, ?)", rel, *WATCHED
        )
        return _stamp(row[0]) if row else None

    async def stamps(self) -> list[tuple[str, Stamp]]:
        """Every recorded result whose metadata is watched, with its stamp."""
        rows = await self._rows(
            "SELECT rel, stamp FROM results WHERE state IN (?, ?) AND stamp IS NOT NULL",
            *WATCHED,
        )
        return [(rel, stamp) for rel, text in rows if (stamp := _stamp(text)) is not None]

    async def waiting(self) -> list[str]:
        """Results not yet recorded that the journal has seen marked: pending or retrying."""
        rows = await self._rows(
            "SELECT rel FROM results WHERE state IN (?, ?)",
            State.PENDING.value,
            State.RETRYING.value,
        )
        return [row[0] for row in rows]

    async def count_stamped(self) -> int:
        row = await self._one(
            "SELECT COUNT(*) FROM results WHERE state = ? AND stamp IS NOT NULL",
            State.DONE.value,
        )
        assert row is not None
        return int(row[0])

    async def remember_upload(self, rel: str, acknowledgement: str) -> None:
        await self._write("UPDATE results SET uploaded = ? WHERE rel = ?", acknowledgement, rel)


def _records(db: sqlite3.Connection, rel: str) -> tuple[Kept | None, list[Kept]]:
    """The record syncd made last for `rel`, and those it made under other prefixes before."""
    row = db.execute("SELECT recorded, earlier FROM results WHERE rel = ?", (rel,)).fetchone()
    if row is None:
        return None, []
    latest = Kept.loads(row[0]) if row[0] else None
    earlier = [Kept.from_dict(k) for k in json.loads(row[1] or "[]")]
    return latest, earlier


def _keep(db: sqlite3.Connection, rel: str, latest: Kept | None, earlier: list[Kept]) -> None:
    text = json.dumps([k.as_dict() for k in earlier[:EARLIER_RECORDS]], separators=(",", ":"))
    db.execute(
        "UPDATE results SET recorded = ?, earlier = ? WHERE rel = ?",
        (latest.dumps() if latest is not None else None, text, rel),
    )


def file_identity(path: Path) -> tuple[int, int] | None:
    """The device and inode of `path`; None when it is not there (or cannot be looked at)."""
    try:
        info = os.stat(path)
    except OSError:
        return None
    return info.st_dev, info.st_ino


def refuse_links(path: Path) -> None:
    """The state files are opened by name (SQLite's way): one that is a symlink would make a
    root `syncd sync` create or change the file it points to, so it is refused."""
    for name in (path.name, f"{path.name}-wal", f"{path.name}-shm"):
        if path.with_name(name).is_symlink():
            raise ConfigError(
                f"state database {path.with_name(name)} is a symlink, which syncd never opens: "
                "remove it (state_dir must hold the files themselves)"
            )


def give_to_folder_owner(path: Path) -> None:
    """Run by root (an admin's `sudo syncd sync`), the state files belong to the owner of
    state_dir, so that the daemon, which runs as that user, can still write them. Done before
    SQLite opens the file: root's SQLite gives the WAL files it makes the database's owner."""
    if os.geteuid() != 0:
        return
    folder = os.stat(path.parent)
    with contextlib.suppress(FileExistsError):
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o640))
    for name in (path.name, f"{path.name}-wal", f"{path.name}-shm"):
        try:
            info = os.lstat(path.with_name(name))
        except FileNotFoundError:
            continue
        if stat.S_ISREG(info.st_mode) and (info.st_uid, info.st_gid) != (
            folder.st_uid,
            folder.st_gid,
        ):
            os.chown(path.with_name(name), folder.st_uid, folder.st_gid, follow_symlinks=False)


class Multiparts:
    """The state's journal of unfinished multipart uploads, as the storage adapters use it. A
    journal that cannot answer or write costs only the chance to resume: never an upload."""

    def __init__(self, journal: Journal) -> None:
        self.journal = journal

    async def _ask(self, query: str, *args: object) -> list[tuple[Any, ...]]:
        try:
            return await self.journal._rows(query, *args)
        except SyncdError as exc:
            logger.debug("multipart journal: {}", exc)
            return []

    async def begun(self, key: str, upload_id: str, part_size: int) -> None:
        await self._ask(
            "INSERT OR REPLACE INTO multipart (key, upload_id, part_size) VALUES (?, ?, ?)",
            key,
            upload_id,
            part_size,
        )

    async def find(self, key: str) -> tuple[str, int] | None:
        rows = await self._ask("SELECT upload_id, part_size FROM multipart WHERE key = ?", key)
        return (rows[0][0], rows[0][1]) if rows else None

    async def ended(self, key: str) -> None:
        await self._ask("DELETE FROM multipart WHERE key = ?", key)

    async def under(self, prefix: str) -> dict[str, str]:
        """Upload ids by key, for keys that start with `prefix`."""
        rows = await self._ask(
            "SELECT key, upload_id FROM multipart WHERE substr(key, 1, ?) = ?", len(prefix), prefix
        )
        return {key: upload_id for key, upload_id in rows}


COLUMNS = (
    "rel, state, attempts, last_error, permanent, next_try, files, bytes, updated, uploaded, "
    "sent, rate"
)
SLOTS = ", ".join("?" * len(COLUMNS.split(",")))
UPDATES = ", ".join(f"{c} = excluded.{c}" for c in COLUMNS.split(", ")[1:])


def _stamp(text: str | None) -> Stamp | None:
    try:
        ino, size, mtime_ns = map(int, (text or "").split(":"))
    except ValueError:
        return None
    return (ino, size, mtime_ns)


def _state(text: str) -> State:
    """A row's state; one only another version of syncd knows is looked at again as pending
    (the metadata says what is published, and the attempt finds it out)."""
    try:
        return State(text)
    except ValueError:
        return State.PENDING


def _entry(row: tuple[Any, ...]) -> Entry:
    rel, state, attempts, last_error, permanent, next_try, files, size, updated, *rest = row
    return Entry(
        rel,
        _state(state),
        attempts,
        last_error,
        bool(permanent),
        next_try,
        files,
        size,
        updated,
        *rest,
    )
