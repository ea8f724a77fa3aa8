"""A result's local tree: its files as listed by descriptor (never following a symlink out),
the names a store accepts, each file opened only while it is the file that was listed, the
fingerprint of a listing, a tree still being written, and the move aside before a tree is
deleted (and its recovery after a crash).
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import hashlib
import itertools
import os
import shutil
import stat
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from loguru import logger

from syncd import folders, marker
from syncd.errors import (
    BeingWritten,
    InputError,
    OperatorError,
    SyncdError,
    TransientError,
    TreeChanged,
    os_error,
    printable,
)
from syncd.layout import CONTROL, Result, name_problem

# The longest key S3 accepts, in UTF-8 bytes.
MAX_KEY_BYTES = 1024


# Folders deeper than this under a result folder are not walked: no Zarr store comes near it,
# and each level holds a descriptor while the tree is walked.
MAX_DEPTH = 128


@dataclass(frozen=True, slots=True)
class LocalFile:
    """A regular file of a result tree: its path in the tree, its size and modification time
    (to notice a file that changes while it is uploaded), its inode and device (to read the
    file that was listed and no other), and whether its path is a symlink inside the tree.
    Kept small: a tree may hold 100,000 of them."""

    rel: str
    size: int
    mtime_ns: int
    ino: int
    dev: int
    follow: bool = False


def tree_files(result: Result, say: bool = True) -> Iterator[LocalFile]:
    """Every regular file of the tree, in a stable order; symlinks only when they stay inside.

    Never follows a symlink out of the tree: the result folder and its workflow folder must not
    be symlinks, folders are walked by descriptor (a folder swapped for a symlink while it is
    walked is not entered), and a symlink to a file is uploaded as that file only when the file
    lies inside the tree. Each file's device and inode are kept, so that the upload reads the
    file that was listed and nothing else. A file with a hard link outside the tree is
    uploaded only when it belongs to the result folder's owner, who could have copied it in. A
    name no store can take, and a tree deeper than MAX_DEPTH, are this result's input errors.
    What is skipped is logged when `say` (the first listing of an attempt, not its re-reads).
    """
    log = logger.warning if say else logger.debug
    with open_folder(result) as tree_fd:
        root = Path(os.path.realpath(f"/proc/self/fd/{tree_fd}"))
        owner = os.fstat(tree_fd).st_uid
        # Files of several names and another owner: how many names each has, which are here.
        linked: dict[tuple[int, int], tuple[int, list[str]]] = {}
        for folder, filenames, dir_fd in walk(result, tree_fd, log):
            for name in filenames:
                rel = (folder / name).as_posix().removeprefix("./")
                check_name(result, rel)
                info = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
                follow = stat.S_ISLNK(info.st_mode)
                if follow:
                    target = Path(os.path.realpath(root / rel))
                    try:
                        info = target.stat()
                    except FileNotFoundError:
                        log(
                            "{}: skipping symlink {} that leads nowhere",
                            result.name,
                            printable(rel),
                        )
                        continue
                    if not target.is_relative_to(root) or target == root:
                        log(
                            "{}: skipping symlink {} that leads outside the tree",
                            result.name,
                            printable(rel),
                        )
                        continue
                if not stat.S_ISREG(info.st_mode):
                    log("{}: skipping {}: not a regular file", result.name, printable(rel))
                    continue
                # A symlink is no name of its file: the file's own name in the tree is counted.
                if info.st_nlink > 1 and info.st_uid != owner and not follow:
                    key = (info.st_dev, info.st_ino)
                    linked.setdefault(key, (info.st_nlink, []))[1].append(rel)
                yield LocalFile(
                    rel, info.st_size, info.st_mtime_ns, info.st_ino, info.st_dev, follow
                )
        for links, here in linked.values():
            if len(here) < links:
                raise InputError(
                    f"file {printable(str(result.tree / here[0]))} has a hard link "
                    "outside the result folder and another owner than the folder: syncd "
                    "uploads only the result's own files: replace it with a copy (the result is "
                    "published once it is fixed)"
                )


def walk(
    result: Result, tree_fd: int, log: Callable[..., None]
) -> Iterator[tuple[PurePosixPath, list[str], int]]:
    """Each folder of the tree, depth first in name order, as (its path in the tree, the names
    of its files, a descriptor of it), without recursion: a tree thousands of folders deep is
    an input error, not a crash. Only the folders on the way down hold a descriptor."""
    top = os.dup(tree_fd)
    try:
        folders, files = entries(result, PurePosixPath("."), top, log)
    except BaseException:
        os.close(top)
        raise
    stack = [(PurePosixPath("."), top, iter(folders))]
    try:
        yield PurePosixPath("."), files, top
        while stack:
            path, fd, below = stack[-1]
            name = next(below, None)
            if name is None:
                stack.pop()
                os.close(fd)
                continue
            if len(stack) > MAX_DEPTH:  # entering a folder MAX_DEPTH + 1 deep
                raise InputError(
                    f"folder {printable(str(result.tree / path / name))} lies more than "
                    f"{MAX_DEPTH} folders deep in the result, deeper than syncd walks: flatten "
                    "the tree (the result is published once it is fixed)"
                )
            try:
                child = os.open(name, FOLDER, dir_fd=fd)
            except OSError as exc:
                if exc.errno in (errno.ELOOP, errno.ENOTDIR):
                    continue  # swapped for a link or a file since it was listed: not entered
                raise
            try:
                folders, files = entries(result, path / name, child, log)
            except BaseException:
                os.close(child)
                raise
            stack.append((path / name, child, iter(folders)))
            yield path / name, files, child
    finally:
        for _, fd, _ in stack:
            os.close(fd)


FOLDER = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def entries(
    result: Result, path: PurePosixPath, fd: int, log: Callable[..., None]
) -> tuple[list[str], list[str]]:
    """The names of the folders and of the other entries of the folder `fd`, each sorted; a
    symlink to a folder is neither (never entered, said once per walk)."""
    folders, files = [], []
    with os.scandir(fd) as listing:
        for entry in listing:
            if entry.is_dir(follow_symlinks=False):
                folders.append(entry.name)
            elif entry.is_symlink() and entry.is_dir():
                log(
                    "{}: skipping symlinked folder {}",
                    result.name,
                    printable(str(path / entry.name).removeprefix("./")),
                )
            else:
                files.append(entry.name)
    return sorted(folders), sorted(files)


@contextmanager
def open_folder(result: Result) -> Iterator[int]:
    """A descriptor of the result folder, opened one folder at a time from outputs_dir without
    following a symlink, so neither the workflow folder nor the tree can lead elsewhere."""
    with ExitStack() as stack:
        try:
            fd = stack.enter_context(folders.opened(result.outputs_dir, result.tree))
        except FileNotFoundError as exc:
            if exc.filename == str(result.outputs_dir):
                raise
            raise no_folder(result) from None
        except OSError as exc:
            what = "result folder" if exc.filename == str(result.tree) else "workflow folder"
            if isinstance(exc, folders.SymlinkInTheWay):
                raise exc.error(what) from None
            raise os_error(exc, f"opening {what}", exc.filename) from None
        yield fd


# A marker may come a moment before its folder; one older than this has lost its folder.
FOLDER_GRACE = 600.0


def no_folder(result: Result) -> SyncdError:
    """A finished result without its folder: transient while its signal (marker or metadata)
    is new (the folder's rename may come second), then a problem for a person, logged once."""
    try:
        age = time.time() - os.lstat(result.signal).st_mtime
    except OSError:
        age = 0.0
    what = f"{result.signal_name} {result.signal}"
    if age < FOLDER_GRACE:
        return TransientError(
            f"{what} has no result folder {result.tree} yet; published as soon as the folder "
            "appears"
        )
    return InputError(
        f"{what} has no result folder {result.tree}: restore the folder or remove the "
        f"{result.signal_name}"
    )


def check_name(result: Result, rel: str) -> None:
    """Refuse a file whose key a store would refuse or a reader would misread (the names of
    its workflow and result folders are part of the key too)."""
    if (folder := name_problem(result.tree, result.rel)) is not None:
        raise InputError(folder)  # the result's own name (or its workflow's)
    problem = None
    key = result.key(rel)
    try:
        key_bytes = len(key.encode("utf-8"))
    except UnicodeEncodeError:
        problem = "its path is not valid UTF-8, which S3 keys must be"
    else:
        if CONTROL.search(key):
            problem = "its path holds control characters"
        elif key_bytes > MAX_KEY_BYTES:
            problem = f"its key would be {key_bytes} bytes, above S3's limit of {MAX_KEY_BYTES}"
    if problem:
        raise InputError(
            f"file {printable(str(result.tree / rel))} cannot be uploaded: {problem}: rename it "
            "(the result is published once it is fixed)"
        )


# Seconds a tree written after its signal must be left alone before it is published.
QUIET = 30.0


def changed() -> SyncdError:
    return TreeChanged(
        "files changed while they were uploaded; retrying once the tree is quiet (a marker "
        "must only be dropped when the result is complete)"
    )


def fingerprint(result: Result, files: list[LocalFile]) -> str:
    digest = hashlib.sha256(result.remote_path.encode())
    for f in files:
        digest.update(f"\0{f.rel}\0{f.size}\0{f.mtime_ns}\0{f.ino}\0{f.dev}".encode())
    return digest.hexdigest()


@contextlib.contextmanager
def open_listed(result: Result, file: LocalFile) -> Iterator[Path]:
    """A path that reads exactly the listed file: the file is opened without following a
    symlink (unless the listing found a symlink inside the tree), checked to be the same inode,
    size and mtime, and handed to the client as its /proc/self/fd path, which cannot be
    swapped any more."""
    path = result.tree / file.rel
    # O_NONBLOCK: a FIFO swapped in must not hang the event loop (its inode tells it apart).
    flags = os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | (0 if file.follow else os.O_NOFOLLOW)
    try:
        fd = os.open(path, flags)
    except FileNotFoundError:
        raise changed() from None
    except OSError as exc:
        if exc.errno == errno.ELOOP:  # swapped for a symlink since it was listed
            raise changed() from None
        raise os_error(exc, "reading", path) from None
    try:
        info = os.fstat(fd)
        same = (info.st_ino, info.st_dev, info.st_size, info.st_mtime_ns) == (
            file.ino,
            file.dev,
            file.size,
            file.mtime_ns,
        )
        if not same:
            raise changed()
        try:
            yield Path(f"/proc/self/fd/{fd}")
        except OSError as exc:
            if exc.filename is not None:  # a local read failed, not a store request
                raise os_error(exc, "reading", path) from None
            raise
    finally:
        os.close(fd)


def settled(result: Result, files: list[LocalFile]) -> None:
    """Files written after the result's signal (a marker dropped before its tree was done, a
    folder filled after its marker) mean its writer may still be at it: BeingWritten until
    the tree has been left alone for QUIET seconds, so that a half tree is never published."""
    try:
        signalled = os.stat(result.signal).st_mtime_ns
        # The result folder changes with every name made in it (its first files included).
        written = {"its folder": os.stat(result.tree).st_mtime_ns}
    except OSError:
        return  # published by hand without a signal: as it is
    written |= {printable(f.rel): f.mtime_ns for f in files}
    newest = max(written, key=lambda name: written[name])
    if written[newest] <= signalled:
        return
    age = time.time() - written[newest] / 1e9
    if 0 <= age < QUIET:  # dated ahead of this clock: nothing to wait for that would end
        raise BeingWritten(
            f"{newest} was written {age:.0f} s ago, after its {result.signal_name}: its writer "
            f"may still be at it; published once the tree has been left alone for {QUIET:.0f} s "
            "(by the daemon, or by syncd sync run again then)",
            QUIET - age,
        )


def holds_exactly(result: Result, files: list[LocalFile]) -> bool:
    """True when the tree still holds exactly `files`, compared as it is walked."""
    return all(a == b for a, b in itertools.zip_longest(files, tree_files(result, say=False)))


@contextlib.contextmanager
def tree_errors(result: Result) -> Iterator[None]:
    """A tree that cannot be walked, in the taxonomy's words."""
    try:
        yield
    except OSError as exc:
        raise os_error(exc, "reading", exc.filename or result.tree) from None


def aside_path(result: Result) -> Path:
    return result.tree.with_name(marker.aside_name(result.name))


@contextlib.contextmanager
def tree_parent(result: Result) -> Iterator[int]:
    """The folder of the result's tree (outputs_dir or its workflow folder), opened from
    outputs_dir without following a symlink: trees are moved and deleted in it by name."""
    with folders.opened(result.outputs_dir, result.tree.parent) as fd:
        yield fd


def exists(name: str, folder: int) -> os.stat_result | None:
    try:
        return os.stat(name, dir_fd=folder, follow_symlinks=False)
    except FileNotFoundError:
        return None


def move_aside(result: Result, files: list[LocalFile]) -> Path | None:
    """Move the tree aside (a crash never leaves a half tree under its name) and check it holds
    exactly the uploaded files; if not, move it back and retry: something was written after
    the upload, and it is not in the bucket. None: the tree is a mount point, which cannot be
    moved; it stays where it is."""
    aside = aside_path(result)
    try:
        with tree_parent(result) as parent:
            if exists(aside.name, parent):  # never deleted unseen: it may be the only copy
                raise OperatorError(
                    f"{aside} is in the way: a stopped syncd left it; restart syncd to clean it "
                    "up, or remove it"
                )
            os.rename(result.name, aside.name, src_dir_fd=parent, dst_dir_fd=parent)
    except OSError as exc:
        if exc.errno in (errno.EBUSY, errno.EXDEV):
            return None
        raise os_error(exc, "moving aside", result.tree) from None
    moved = dataclasses.replace(result, rel=result.rel.with_name(aside.name))
    try:
        same = holds_exactly(moved, files)
    except (OSError, SyncdError):
        same = False
    if not same:
        move_back(result, aside)
        raise TreeChanged(
            "files appeared or changed after the upload; the local tree is kept and the "
            "result uploaded again"
        )
    return aside


def move_back(result: Result, aside: Path) -> None:
    try:
        with tree_parent(result) as parent:
            os.rename(aside.name, result.name, src_dir_fd=parent, dst_dir_fd=parent)
    except OSError as exc:
        raise os_error(exc, f"moving {aside} back to", result.tree) from None


def delete_aside(result: Result, aside: Path) -> None:
    """Delete the tree moved aside; the result is recorded by now, so a tree that will not go
    (a read-only mount inside it) is said, not a failure."""
    try:
        with tree_parent(result) as parent:
            shutil.rmtree(aside.name, dir_fd=parent)
    except OSError as exc:
        logger.warning(
            "{}: published, but the local tree moved aside to {} cannot be removed ({}): "
            "remove it by hand (delete_local_after_upload)",
            result.name,
            aside,
            exc.strerror or exc,
        )
        return
    logger.info(
        "{}: removed the local tree {} (delete_local_after_upload)", result.name, result.tree
    )


def recover_aside(result: Result, recorded: bool, deleting: bool) -> None:
    """A tree a killed daemon left moved aside: deleted if its result is recorded (the bucket
    was verified before) and trees are deleted after upload (`deleting`: else it is someone's
    folder of that name, never deleted), otherwise put back under its name."""
    aside = aside_path(result)
    with tree_parent(result) as parent:
        found = exists(aside.name, parent)
        if found is None or not stat.S_ISDIR(found.st_mode):
            return
        if recorded and not deleting:
            logger.warning(
                "{}: {} looks like a tree a stopped syncd left to delete, but "
                "delete_local_after_upload is off: left as it is; remove it if it is not needed",
                result.name,
                aside,
            )
        elif recorded:
            shutil.rmtree(aside.name, dir_fd=parent)
            logger.info("{}: removed {} that a stopped daemon left", result.name, aside)
        elif exists(result.name, parent) is None:
            os.rename(aside.name, result.name, src_dir_fd=parent, dst_dir_fd=parent)
            logger.warning("{}: put back {} that a stopped daemon left aside", result.name, aside)
        else:
            logger.warning(
                "{}: {} was left aside by a stopped daemon and {} exists again: compare and "
                "remove one of them",
                result.name,
                aside,
                result.tree,
            )
