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
import stat
import time
import uuid
from pathlib import Path
from typing import Any

from syncd.errors import Kind, SyncdError, os_error
from syncd.layout import Result


def _read(path: str) -> str:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return ""


def _started(pid: int) -> str:
    """When process `pid` started (clock ticks since boot), to tell it from a reused pid."""
    fields = _read(f"/proc/{pid}/stat").rpartition(")")[2].split()
    return fields[19] if len(fields) > 19 else ""


def _pidns() -> str:
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return ""


# Who this process is, unique per process instance: two daemons in containers with the same
# hostname and pid 1 differ in their pid namespace, and each run has its own instance id.
IDENTITY: dict[str, Any] = {
    "host": socket.gethostname(),
    "boot": _read("/proc/sys/kernel/random/boot_id"),
    "pidns": _pidns(),
    "pid": os.getpid(),
    "started": _started(os.getpid()),
    "instance": uuid.uuid4().hex[:8],
}
OWNER = f"{IDENTITY['host']}:{IDENTITY['pid']}:{IDENTITY['instance']}"


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
        try:
            return self.path.exists() and newest_generation(self.result) == self.generation
        except OSError:
            return False

    def release(self) -> None:
        try:
            self.path.unlink(missing_ok=True)
        except OSError:
            return  # it expires after claim_timeout; nothing here is worth failing for
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
    except NotADirectoryError:
        raise FileExistsError(result.marker.parent / CLAIMS) from None
    for entry in entries:
        # Anything else in the folder (other names, folders, links) is not a claim.
        suffix = entry.name[len(prefix) :] if entry.name.startswith(prefix) else ""
        if suffix.isdigit() and entry.is_file(follow_symlinks=False):
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
        # A claim whose mtime lies further in the future than the timeout is as stale as an
        # old one: no live owner sets its clock that far off.
        if abs(time.time() - path.stat().st_mtime) >= timeout:
            return None
    except FileNotFoundError:
        return None  # released a moment ago
    try:
        owner = json.loads(path.read_text())
        name = str(owner["owner"])
    except (OSError, ValueError, KeyError, TypeError):
        return "another daemon"  # its owner is still writing it, or just released it
    return None if died_here(owner) else name


def died_here(owner: dict[str, Any]) -> bool:
    """True for a claim of a daemon in this very process namespace that is gone (killed,
    restarted): no need to wait claim_timeout for it. Any doubt (another host, container or
    boot) waits."""
    if owner.get("instance") == IDENTITY["instance"]:
        return False
    if any(owner.get(key) != IDENTITY[key] for key in ("host", "boot", "pidns")):
        return False
    pid = owner.get("pid")
    if not isinstance(pid, int):
        return False
    if pid == IDENTITY["pid"]:
        return True  # our pid, an earlier run of ours
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        # Alive, another user's (an admin's `sudo syncd sync`); under the unit's
        # ProtectProc=invisible its /proc entry cannot even be read: it waits like any other.
        return False
    # Alive: gone only if the pid was reused, which its start time tells; a start time that
    # cannot be read is no proof of that.
    started = _started(pid)
    return bool(started) and started != owner.get("started")


def try_claim(result: Result, timeout: float) -> Claim | str:
    """A claim on `result`, or the owner of the live claim that stops us."""
    folder = result.marker.parent / CLAIMS
    try:
        return _try_claim(result, timeout)
    except FileExistsError:  # from mkdir: something that is not a folder has its name
        raise SyncdError(
            f"{folder} is not a folder, and syncd keeps its claims there: remove it",
            Kind.OPERATOR,
        ) from None
    except OSError as exc:
        raise os_error(exc, "claiming the result in", folder) from None


def _try_claim(result: Result, timeout: float) -> Claim | str:
    old = generations(result)  # one listing of the folder serves both checks
    newest = old[-1] if old else 0
    owner = holder(result, newest, timeout)
    if owner is not None:
        return owner
    generation = newest + 1
    path = claim_path(result, generation)
    for tries_left in reversed(range(3)):
        make_folder(path.parent)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            break
        except FileExistsError:
            return holder(result, newest_generation(result), timeout) or "another daemon"
        except FileNotFoundError:
            if not tries_left:
                raise
            # Another daemon released its claim and removed the empty folder just now.
    try:
        with os.fdopen(fd, "w") as f:
            json.dump({"owner": OWNER, **IDENTITY, "since": time.time()}, f)
    except BaseException:
        # An empty claim would hold the result for claim_timeout.
        Claim(result, generation, took_over=False).release()
        raise
    for stale in old:  # a dead daemon's claims
        claim_path(result, stale).unlink(missing_ok=True)
    return Claim(result, generation, took_over=bool(old))


def make_folder(folder: Path) -> None:
    """The claims folder; a symlink or a file in its place is refused. A new one is as
    writable as the folder it is in, and has its owner and group where this user may set
    them: a claims folder an admin's `sudo syncd sync` made must not lock the daemon out."""
    try:
        os.mkdir(folder, 0o700)
    except FileExistsError:
        if not stat.S_ISDIR(os.lstat(folder).st_mode):
            raise FileExistsError(folder) from None
        return
    parent = os.stat(folder.parent)
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        for owner in (parent.st_uid, -1):  # the owner only root may set; the group also members
            with contextlib.suppress(PermissionError):
                os.fchown(fd, owner, parent.st_gid)
                break
        os.fchmod(fd, stat.S_IMODE(parent.st_mode) & 0o2777)
    finally:
        os.close(fd)
