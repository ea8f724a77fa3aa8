"""Folders under outputs_dir, opened one name at a time from outputs_dir without following a
symlink, so that whatever syncd reads or writes through them (metadata and its temporary files,
claims, a tree moved aside or deleted) stays inside outputs_dir, whatever the settings say and
whatever links appear on the disk while syncd works. outputs_dir itself may be a symlink: that
is the operator's choice; nothing under it may lead elsewhere.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path, PurePosixPath

from syncd.errors import InputError, OperatorError, SyncdError, printable

FOLDER = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC


class SymlinkInTheWay(OSError):
    """A folder on the way is a symlink, which syncd never follows."""

    def __init__(self, path: Path) -> None:
        super().__init__(errno.ELOOP, "a symlink where a folder belongs", str(path))

    def error(self, what: str) -> SyncdError:
        """This, in the taxonomy's words; `what` says which folder it is."""
        return InputError(
            f"{what} {printable(str(self.filename))} is a symlink; syncd never follows one: "
            "move the folder itself there"
        )


def parts_under(outputs_dir: Path, path: Path) -> tuple[str, ...]:
    """The names that lead from outputs_dir to `path`; a path that leads anywhere else (outside,
    or through `.` and `..`) is refused: nothing syncd makes may land outside outputs_dir."""
    try:
        parts = PurePosixPath(path.relative_to(outputs_dir).as_posix()).parts
    except ValueError:
        parts = ("..",)
    if any(part in (".", "..") for part in parts):
        raise OperatorError(
            f"{path} is not inside outputs_dir {outputs_dir}; syncd writes nothing outside it: "
            "check syncd.metadata_file"
        )
    return parts


def open_at(fd: int, name: str, path: Path) -> int:
    """The folder `name` in the folder `fd`, never through a symlink (`path` names it)."""
    try:
        return os.open(name, FOLDER | os.O_NOFOLLOW, dir_fd=fd)
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.ENOTDIR) and is_symlink(fd, name):
            raise SymlinkInTheWay(path) from None
        raise type(exc)(exc.errno, exc.strerror, str(path)) from None


def is_symlink(fd: int, name: str) -> bool:
    try:
        return stat.S_ISLNK(os.stat(name, dir_fd=fd, follow_symlinks=False).st_mode)
    except OSError:
        return False


@contextmanager
def opened(outputs_dir: Path, folder: Path) -> Iterator[int]:
    """A descriptor of `folder` (outputs_dir or a folder under it), opened from outputs_dir one
    name at a time. OSError names the folder on the way that failed (SymlinkInTheWay for a
    symlink); SyncdError for a path outside outputs_dir."""
    parts = parts_under(outputs_dir, folder)
    fd = os.open(outputs_dir, FOLDER)
    try:
        for depth, part in enumerate(parts):
            child = open_at(fd, part, outputs_dir.joinpath(*parts[: depth + 1]))
            os.close(fd)
            fd = child
        yield fd
    finally:
        os.close(fd)


def adopt(fd: int, uid: int, gid: int) -> None:
    """Give what `fd` is the owner and group of what it replaces or where it is, as far as this
    user may: the owner only root sets, the group also a member of it (the group the server and
    syncd share, which must stay so that both can write)."""
    for owner in (uid, -1):
        try:
            os.fchown(fd, owner, gid)
            return
        except PermissionError:
            continue
