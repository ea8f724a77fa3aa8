"""Claims: several daemons may share one outputs_dir (two servers on one NFS export); each
result is published by whichever claims it first.

A claim is a file `.syncd-claims/<exec>.<n>` in the folder of the result's marker, created with
O_EXCL (atomic on local filesystems and NFSv3+). The claims have a folder of their own (gone
when empty) so that finding a result's claims lists a handful of files, not every result of
outputs_dir. An owner refreshes its mtime while it works. A claim whose mtime is older than
claim_timeout belongs to a dead daemon: another takes over by creating generation n+1, which
again only one can do. An owner checks before recording that no newer generation exists. Hosts
are assumed to keep their clocks in step (NTP), well within the timeout.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import time
import uuid
from pathlib import Path

from syncd.layout import Result

OWNER = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


class Claim:
    """This daemon's claim on one result."""

    def __init__(self, result: Result, generation: int, took_over: bool) -> None:
        self.result = result
        self.generation = generation
        self.took_over = took_over  # from a daemon that died holding it, mid-upload maybe
        self.path = claim_path(result, generation)

    def refresh(self) -> None:
        # Gone means taken over after all; still_ours() says so before anything is recorded.
        with contextlib.suppress(FileNotFoundError):
            os.utime(self.path)

    def still_ours(self) -> bool:
        return self.path.exists() and newest_generation(self.result) == self.generation

    def release(self) -> None:
        self.path.unlink(missing_ok=True)
        with contextlib.suppress(OSError):  # only when empty: others may hold claims in it
            self.path.parent.rmdir()


CLAIMS = ".syncd-claims"


def claim_path(result: Result, generation: int) -> Path:
    return result.marker.parent / CLAIMS / f"{result.name}.{generation}"


def generations(result: Result) -> list[int]:
    prefix = f"{result.name}."
    found = []
    try:
        entries = list(os.scandir(result.marker.parent / CLAIMS))
    except FileNotFoundError:
        return []
    for entry in entries:
        suffix = entry.name[len(prefix) :] if entry.name.startswith(prefix) else ""
        if suffix.isdigit():
            found.append(int(suffix))
    return sorted(found)


def newest_generation(result: Result) -> int:
    found = generations(result)
    return found[-1] if found else 0


def holder(result: Result, newest: int, timeout: float) -> str | None:
    """Who holds a live claim of generation `newest` on `result`, or None if nobody does."""
    if not newest:
        return None
    path = claim_path(result, newest)
    try:
        if time.time() - path.stat().st_mtime >= timeout:
            return None
    except FileNotFoundError:
        return None  # released a moment ago
    try:
        owner = str(json.loads(path.read_text())["owner"])
    except (OSError, ValueError, KeyError):
        return "another daemon"  # its owner is still writing it, or just released it
    return None if died_here(owner) else owner


def died_here(owner: str) -> bool:
    """True for a claim of a daemon on this host that is gone (killed, restarted): no need
    to wait claim_timeout for it."""
    host, _, rest = owner.partition(":")
    pid, _, _ = rest.partition(":")
    if host != socket.gethostname() or not pid.isdigit() or owner == OWNER:
        return False
    if int(pid) == os.getpid():
        return True  # our pid, another run (pid 1 in a container, say)
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False  # alive, another user's
    return False


def try_claim(result: Result, timeout: float) -> Claim | str:
    """A claim on `result`, or the owner of the live claim that stops us."""
    old = generations(result)  # one listing of the folder serves both checks
    newest = old[-1] if old else 0
    owner = holder(result, newest, timeout)
    if owner is not None:
        return owner
    generation = newest + 1
    path = claim_path(result, generation)
    for tries_left in reversed(range(3)):
        path.parent.mkdir(exist_ok=True)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            break
        except FileExistsError:
            return holder(result, newest_generation(result), timeout) or "another daemon"
        except FileNotFoundError:
            if not tries_left:
                raise
            # Another daemon released its claim and removed the empty folder just now.
    with os.fdopen(fd, "w") as f:
        json.dump({"owner": OWNER, "since": time.time()}, f)
    for stale in old:  # a dead daemon's claims
        claim_path(result, stale).unlink(missing_ok=True)
    return Claim(result, generation, took_over=bool(old))
