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
import errno
import json
import os
import socket
import stat
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from loguru import logger

from syncd import folders
from syncd.config import CLAIMS_FOLDER
from syncd.errors import OperatorError, SyncdError, os_error
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
# Claims of this process it could not remove (their folder went read-only, say): its own, so
# its next attempt takes them over at once instead of waiting claim_timeout for itself.
LEFT_BEHIND: set[Path] = set()


class Claim:
    """This daemon's claim on one result."""

    def __init__(self, result: Result, generation: int, took_over: bool) -> None:
        self.result = result
        self.generation = generation
        self.took_over = took_over  # from a daemon that died holding it, mid-upload maybe
        self.name = claim_name(result, generation)

    def refresh(self) -> None:
        # Gone means taken over after all; still_ours() says so before anything is recorded.
        with claims_folder(self.result) as fd, contextlib.suppress(FileNotFoundError):
            if fd is not None:
                os.utime(self.name, dir_fd=fd, follow_symlinks=False)

    def still_ours(self) -> bool:
        try:
            with claims_folder(self.result) as fd:
                found = generations(self.result, fd)
        except (OSError, SyncdError):
            return False
        return bool(found) and found[-1] == self.generation

    def release(self) -> None:
        try:
            with claims_folder(self.result) as fd:
                if fd is not None:
                    os.unlink(self.name, dir_fd=fd)
            outputs, folder = self.result.outputs_dir, self.result.marker.parent
            # Only when empty: others may hold claims in it.
            with folders.opened(outputs, folder) as parent, contextlib.suppress(OSError):
                os.rmdir(CLAIMS, dir_fd=parent)
        except (OSError, SyncdError) as exc:
            # Nothing here is worth failing for: other daemons wait claim_timeout for it.
            left = folder_path(self.result) / self.name
            if left not in LEFT_BEHIND:
                LEFT_BEHIND.add(left)
                logger.warning(
                    "{}: cannot remove its claim {} ({}): other daemons leave the result alone "
                    "until it is claim_timeout old",
                    self.result.name,
                    left,
                    exc.strerror if isinstance(exc, OSError) else exc,
                )


CLAIMS = CLAIMS_FOLDER
# The most of a claim file that is read: a claim is a line of JSON.
CLAIM_BYTES = 4096
# Times the claims folder is made again when the release of the last claim in it removed it
# meanwhile (several workers, or daemons, claim and release results in it at once).
MAKE_TRIES = 8


def claim_name(result: Result, generation: int) -> str:
    return f"{result.name}.{generation}"


def folder_path(result: Result) -> Path:
    return result.marker.parent / CLAIMS


@contextlib.contextmanager
def claims_folder(result: Result, make: bool = False) -> Iterator[int | None]:
    """A descriptor of the result's claims folder (None when there is none, unless `make`),
    opened from outputs_dir without following a symlink. Something else in its place is
    FileExistsError."""
    path = folder_path(result)
    with folders.opened(result.outputs_dir, result.marker.parent) as parent:
        fd = None
        for _ in range(MAKE_TRIES if make else 1):
            try:
                if make:
                    make_folder(parent, path)
                fd = folders.open_at(parent, CLAIMS, path)
                break
            except FileNotFoundError:
                continue  # the last claim in it released just now took it along: made again
            except (folders.SymlinkInTheWay, NotADirectoryError):
                raise FileExistsError(path) from None
        if make and fd is None:
            raise FileNotFoundError(errno.ENOENT, "it vanished as often as it was made", path)
        try:
            yield fd
        finally:
            if fd is not None:
                os.close(fd)


def generations(result: Result, fd: int | None) -> list[int]:
    """The generations of the claims on `result` in the claims folder `fd`, oldest first."""
    if fd is None:
        return []
    prefix = f"{result.name}."
    found = []
    with os.scandir(fd) as entries:
        for entry in entries:
            # Anything else in the folder (other names, folders, links) is not a claim.
            suffix = entry.name[len(prefix) :] if entry.name.startswith(prefix) else ""
            if suffix.isascii() and suffix.isdigit() and entry.is_file(follow_symlinks=False):
                found.append(int(suffix))
    return sorted(found)


def holder(result: Result, fd: int | None, newest: int, timeout: float) -> str | None:
    """Who holds a live claim of generation `newest` on `result`, or None if nobody does."""
    if not newest or fd is None:
        return None
    name = claim_name(result, newest)
    try:
        # A claim whose mtime lies further in the future than the timeout is as stale as an
        # old one: no live owner sets its clock that far off.
        if abs(time.time() - os.stat(name, dir_fd=fd, follow_symlinks=False).st_mtime) >= timeout:
            return None
    except FileNotFoundError:
        return None  # released a moment ago
    try:
        owner = json.loads(read_claim(fd, name))
        who = str(owner["owner"])
    except (OSError, ValueError, KeyError, TypeError, RecursionError):
        return "another daemon"  # its owner is still writing it, or just released it
    if folder_path(result) / name in LEFT_BEHIND and owner.get("instance") == IDENTITY["instance"]:
        return None  # this process's own, left behind
    return None if died_here(owner) else who


def read_claim(fd: int, name: str) -> bytes:
    claim = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=fd)
    try:
        return os.read(claim, CLAIM_BYTES)
    finally:
        os.close(claim)


def died_here(owner: dict[str, Any]) -> bool:
    """True for a claim of a daemon in this very process namespace that is gone (killed,
    restarted): no need to wait claim_timeout for it. Any doubt (another host, container or
    boot) waits."""
    if owner.get("instance") == IDENTITY["instance"]:
        return False  # ours and alive (one left behind is taken over: `holder`)
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
    folder = folder_path(result)
    try:
        return _try_claim(result, timeout)
    except FileExistsError:  # something that is not a folder has its name
        raise OperatorError(
            f"{folder} is not a folder, and syncd keeps its claims there: remove it"
        ) from None
    except OSError as exc:
        raise os_error(exc, "claiming the result in", folder) from None


def _try_claim(result: Result, timeout: float) -> Claim | str:
    tries_left = MAKE_TRIES
    while True:
        with claims_folder(result, make=True) as fd:
            assert fd is not None
            old = generations(result, fd)  # one listing of the folder serves both checks
            newest = old[-1] if old else 0
            owner = holder(result, fd, newest, timeout)
            if owner is not None:
                return owner
            generation = newest + 1
            name = claim_name(result, generation)
            flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
            try:
                claim = os.open(name, flags, 0o644, dir_fd=fd)
            except FileExistsError:
                newest = max(generations(result, fd), default=0)
                return holder(result, fd, newest, timeout) or "another daemon"
            except FileNotFoundError:
                if not tries_left:
                    raise
                tries_left -= 1
                continue  # another daemon released its claim and removed the empty folder
            try:
                with os.fdopen(claim, "w") as f:
                    json.dump({"owner": OWNER, **IDENTITY, "since": time.time()}, f)
            except BaseException:
                # An empty claim would hold the result for claim_timeout.
                Claim(result, generation, took_over=False).release()
                raise
            for stale in old:  # a dead daemon's claims, or ours left behind
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(claim_name(result, stale), dir_fd=fd)
                LEFT_BEHIND.discard(folder_path(result) / claim_name(result, stale))
            return Claim(result, generation, took_over=bool(old))


def make_folder(parent: int, path: Path) -> None:
    """The claims folder `path`, in the folder `parent`. A new one is as writable as the folder
    it is in, and has its owner and group where this user may set them: a claims folder an
    admin's `sudo syncd sync` made must not lock the daemon out."""
    try:
        os.mkdir(CLAIMS, 0o700, dir_fd=parent)
    except FileExistsError:
        return  # opened without following a symlink next: anything else is refused there
    folder = os.fstat(parent)
    fd = folders.open_at(parent, CLAIMS, path)
    try:
        folders.adopt(fd, folder.st_uid, folder.st_gid)
        os.fchmod(fd, stat.S_IMODE(folder.st_mode) & 0o2777)
    finally:
        os.close(fd)
