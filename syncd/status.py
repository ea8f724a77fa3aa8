"""`syncd status`: every finished result with its state, from the state file and the
completion signals (markers, or metadata that says completed).

A finished result the state file does not know yet is `pending`, `done` when its metadata
already records it (another daemon published it), or `elsewhere` when its metadata records
another place. One the state file says is uploading is so only while a live process holds its
claim: a daemon killed in the middle left it `pending`, for its next start.
"""

from __future__ import annotations

import asyncio
import os
import stat
from collections import Counter
from dataclasses import asdict
from pathlib import Path, PurePosixPath
from typing import Any

from loguru import logger

from syncd import claims, metadata
from syncd.config import ConfigError, Settings
from syncd.errors import SyncdError, printable
from syncd.journal import Entry, Journal, State, clock, no_folder, wall_time
from syncd.layout import Layout
from syncd.progress import amount, speed

ORDER = {
    State.RETRYING: 0,
    State.UPLOADING: 1,
    State.PENDING: 2,
    State.ELSEWHERE: 3,
    State.DONE: 4,
    State.FORGOTTEN: 5,
}
# The states whose last error says why they are as they are.
EXPLAINED = (State.RETRYING, State.FORGOTTEN, State.ELSEWHERE)


def entries(settings: Settings) -> list[Entry]:
    known: dict[str, Entry] = {}
    if has_state(settings.syncd.state_dir):
        store = Journal(settings.syncd.state_dir, readonly=True)
        try:
            known = {r.rel: r for r in asyncio.run(store.all())}
        finally:
            store.close()
    else:
        logger.warning(
            "no state file {} yet: results are shown as the disk alone says (failures and "
            "retries are not); if the daemon runs, this is not its state_dir: run syncd status "
            "with its settings (sudo /opt/syncd/systemd/syncd-as-unit status)",
            settings.syncd.state_dir / "state.db",
        )
    layout = Layout(settings)
    for rel, entry in known.items():
        if entry.state == State.UPLOADING and not claimed(layout, rel, settings):
            known[rel] = Entry(rel, State.PENDING, attempts=entry.attempts)
    for result in layout.signalled():
        rel = result.rel.as_posix()
        if rel in known and known[rel].state != State.FORGOTTEN:
            continue
        try:
            document = metadata.read(result)
        except SyncdError:
            document = None
        if result.by_metadata and not metadata.completed(document):
            continue
        if metadata.is_recorded(document, result):
            known[rel] = Entry(rel, State.DONE)
        elif (elsewhere := metadata.recorded_elsewhere(document, result)) is not None:
            known[rel] = Entry(rel, State.ELSEWHERE, last_error=f"its metadata records {elsewhere}")
        else:
            known[rel] = Entry(rel, State.PENDING)
    return sorted(known.values(), key=lambda r: (ORDER[r.state], r.rel))


def claimed(layout: Layout, rel: str, settings: Settings) -> bool:
    """Whether a live process holds the claim on the result `rel` (in doubt: yes)."""
    result = layout.result(PurePosixPath(rel))
    try:
        with claims.claims_folder(result) as fd:
            newest = claims.generations(result, fd)[-1:] or [0]
            return claims.holder(result, fd, newest[0], settings.syncd.claim_timeout) is not None
    except (OSError, SyncdError):
        return True


def has_state(state_dir: Path) -> bool:
    """Whether the daemon has kept a state file yet; ConfigError when state_dir cannot be read
    by this user or is no folder (every result would look pending)."""
    remedy = (
        "run syncd status as the daemon's user (sudo /opt/syncd/systemd/syncd-as-unit status), "
        "or fix state_dir"
    )
    try:
        info = os.stat(state_dir)
        if stat.S_ISDIR(info.st_mode):
            os.stat(state_dir / "state.db")
    except FileNotFoundError:
        return False
    except OSError as exc:
        raise ConfigError(
            f"state_dir {state_dir} cannot be read ({exc.strerror}): {remedy}"
        ) from None
    if not stat.S_ISDIR(info.st_mode):
        raise no_folder(state_dir)
    return True


def as_dict(entry: Entry) -> dict[str, Any]:
    """A result's state as JSON: its next try in Unix time."""
    next_try = wall_time(entry.next_try) if entry.next_try is not None else None
    return asdict(entry) | {"state": entry.state.value, "next_try": next_try}


def progress(entry: Entry) -> str:
    """An upload's bytes sent of its total and its rate: `310/820 MB 42 MB/s`."""
    if entry.state != State.UPLOADING or entry.sent is None or entry.bytes is None:
        return "-"
    return f"{amount(entry.sent, entry.bytes)} {speed(entry.rate or 0.0)}"


def table(rows: list[Entry]) -> str:
    """The table a person reads: names from the disk and errors escaped, so that a folder's
    name can never drive the terminal (a title, colours, lines hidden)."""
    now = clock()
    header = ("RESULT", "STATE", "ATTEMPTS", "PROGRESS", "NEXT TRY", "LAST ERROR")
    lines = [header] + [
        (
            printable(r.rel),
            r.state.value,
            str(r.attempts),
            progress(r),
            f"in {max(r.next_try - now, 0):.0f} s"
            if r.next_try and r.state == State.RETRYING
            else "-",
            printable(r.last_error or "-") if r.state in EXPLAINED else "-",
        )
        for r in rows
    ]
    widths = [max(len(line[i]) for line in lines) for i in range(len(header) - 1)]
    text = [
        "  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=False))
        + "  "
        + line[-1]
        for line in lines
    ]
    counts = Counter(r.state.value for r in rows)
    summary = ", ".join(f"{counts[s.value]} {s.value}" for s in ORDER if counts[s.value])
    text.append(f"{len(rows)} results: {summary or 'none marked'}")
    return "\n".join(text)
