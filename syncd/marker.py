"""The completion marker: what says a result folder is finished, and how one is made.

`syncd.mark_finished` and `syncd mark` make it; the daemon's layout reads it. The standard
library only, so that a workflow with just `syncd[client]` installed can mark its results.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import stat
from pathlib import Path

from syncd.errors import printable
from syncd.folders import adopt

# What a result folder's name starts with (`exec_<epoch>_<hex8>`).
EXEC_PREFIX = "exec_"
# The marker of `exec_X` is `exec_X<suffix>` beside it (syncd.marker_suffix).
MARKER_SUFFIX = ".done"
# The end of every temporary file syncd makes beside results (markers, metadata): a daemon
# removes those a stopped process left.
TEMP_SUFFIX = ".syncd.tmp"
# A tree syncd moved aside to delete after upload (delete_local_after_upload) is named
# `.exec_X.deleting` until it is deleted, or moved back when the upload must be made again.
DELETING = ".deleting"
# The longest file name of the filesystems results live on (ext4, xfs, tmpfs).
NAME_MAX = 255


def temp_name(name: str) -> str:
    """A new temporary file's name for the file `name`, beside it, no longer than a name may
    be (the file's own name, cut short where it would not fit)."""
    tail = f".{secrets.token_hex(4)}{TEMP_SUFFIX}"
    room = NAME_MAX - 1 - len(tail)
    while len(os.fsencode(name)) > room:
        name = name[:-1]
    return f".{name}{tail}"


def aside_name(name: str) -> str:
    """The name the tree `name` has while syncd holds it aside."""
    return f".{name}{DELETING}"


def is_aside(name: str) -> bool:
    """`name` is a tree syncd moved aside (no writer names a folder so)."""
    return name.startswith(f".{EXEC_PREFIX}") and name.endswith(DELETING)


class NotAResult(ValueError):
    """The path given is not an existing result folder; nothing was created."""


def mark_finished(path: str | os.PathLike[str], marker_suffix: str = MARKER_SUFFIX) -> Path:
    """Say that the result folder `path` (an `exec_*` folder, its files all written) is
    finished: create its marker `<path><marker_suffix>` beside it, whole at once (a temporary
    file, fsync, rename), and return the marker's path. Marking a result again tells syncd to
    look at it again. Raises NotAResult when `path` is not an existing `exec_*` folder (a
    symlink to one is not), OSError when the marker cannot be written."""
    folder = result_folder(path)
    marker = folder.with_name(f"{folder.name}{marker_suffix}")
    try:
        parent = os.open(folder.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            _create(parent, marker.name)
        finally:
            os.close(parent)
    except OSError as exc:  # about the marker, not the temporary file it was being made as
        raise type(exc)(exc.errno, exc.strerror, str(marker)) from None
    return marker


def result_folder(path: str | os.PathLike[str]) -> Path:
    """`path` made absolute, once it is known to be an existing `exec_*` folder, not a
    symlink; else NotAResult."""
    folder = Path(os.path.normpath(os.path.abspath(path)))
    given = printable(os.fspath(path))
    if not folder.name.startswith(EXEC_PREFIX) or folder.name == EXEC_PREFIX:
        raise NotAResult(f"{given} is not a result folder: its name must start with {EXEC_PREFIX}")
    try:
        info = os.lstat(folder)
    except (FileNotFoundError, NotADirectoryError):
        raise NotAResult(f"{given} does not exist: give the folder of a written result") from None
    if stat.S_ISLNK(info.st_mode):
        raise NotAResult(
            f"{given} is a symlink: syncd publishes only a real folder; mark the folder itself"
        )
    if not stat.S_ISDIR(info.st_mode):
        raise NotAResult(f"{given} is not a folder: give the folder of a written result")
    return folder


def _create(parent: int, marker: str) -> None:
    tmp = temp_name(marker)
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    fd = os.open(tmp, flags, 0o644, dir_fd=parent)
    try:
        try:
            # Root's marker belongs to the folder's owner, as everything else syncd makes there.
            folder = os.fstat(parent)
            adopt(fd, folder.st_uid, folder.st_gid)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, marker, src_dir_fd=parent, dst_dir_fd=parent)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp, dir_fd=parent)
        raise
    os.fsync(parent)  # the rename itself is durable
