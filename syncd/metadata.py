"""The result metadata JSON: read it, decide whether it is finished and recorded, rewrite it
atomically.

The rewrite keeps every field the file had and sets `storage_type`, `signed_url`,
`remote_path` and `output_files`. A file that is not a JSON object is never overwritten. Other
writers (the Earth2Studio server) write it in place, so a file that does not parse and changed
in the last `BEING_WRITTEN` seconds is read again shortly rather than reported. Each read and
write gives the file's `Stamp`, so a later change by someone else can be noticed with a stat.
"""

from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import stat
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from syncd import folders, marker
from syncd.errors import BeingWritten, InputError, SyncdError, os_error
from syncd.layout import Result
from syncd.tree import LocalFile

Metadata = dict[str, Any]
Stamp = tuple[int, int, int]  # (inode, size, mtime in ns): the file as syncd last saw it
# A file that does not parse and changed more recently than this is still being written.
BEING_WRITTEN = 30.0
# Seconds before a metadata file that is being written is read again.
READ_AGAIN = 1.0


def stamp_of(info: os.stat_result) -> Stamp:
    return (info.st_ino, info.st_size, info.st_mtime_ns)


def stamp(result: Result) -> Stamp | None:
    """The metadata file's stamp now, or None if there is no file."""
    try:
        with folders.opened(result.outputs_dir, result.metadata.parent) as fd:
            return stamp_of(os.stat(result.metadata.name, dir_fd=fd, follow_symlinks=False))
    except FileNotFoundError:
        return None


def read(result: Result) -> Metadata | None:
    """The metadata object, or None when the file does not exist."""
    return read_stamped(result)[0]


def read_stamped(result: Result) -> tuple[Metadata | None, Stamp | None]:
    """The metadata object and the stamp of the file it was read from (None, None when there
    is no file). It is read where it is written: from outputs_dir without following a symlink,
    and a symlink in its place is refused (the rewrite would have to write through it or
    replace it, and neither is syncd's to do)."""
    path = result.metadata
    try:
        with folders.opened(result.outputs_dir, path.parent) as folder:
            # O_NONBLOCK: a FIFO in its place must not hang the reader (it is refused below).
            flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
            fd = os.open(path.name, flags, dir_fd=folder)
    except FileNotFoundError:
        return None, None
    except OSError as exc:
        raise unusable(result, exc, "reading metadata") from None
    try:
        with os.fdopen(fd, "rb") as f:
            info = os.fstat(f.fileno())
            if not stat.S_ISREG(info.st_mode):
                raise InputError(
                    f"metadata {path} is not a regular file; left as it is: replace it with the "
                    "metadata JSON, or remove it"
                )
            raw = f.read()
    except OSError as exc:
        raise unusable(result, exc, "reading metadata") from None
    try:
        document = json.loads(raw, parse_float=finite, parse_constant=not_json)
    except RecursionError:
        raise InputError(
            f"metadata {path} nests its values deeper than a JSON reader follows; left as it "
            "is: fix or remove it and the result is uploaded on the next scan"
        ) from None
    except ValueError as exc:  # JSON that does not parse, or a number too long to convert
        cut_short = isinstance(exc, (json.JSONDecodeError, UnicodeDecodeError))
        if cut_short and time.time() - info.st_mtime < BEING_WRITTEN:
            raise BeingWritten(
                f"metadata {path} is not complete JSON yet ({exc}); reading it again shortly",
                READ_AGAIN,
            ) from None
        raise InputError(
            f"metadata {path} is not valid JSON ({exc}); left as it is: fix or remove it "
            "and the result is uploaded on the next scan"
        ) from None
    if not isinstance(document, dict):
        raise InputError(
            f"metadata {path} is not a JSON object; left as it is: fix or remove it "
            "and the result is uploaded on the next scan"
        )
    return document, stamp_of(info)


def finite(text: str) -> float:
    """A JSON number as a float; one beyond a double's range would be written back as Infinity,
    which no JSON reader takes."""
    value = float(text)
    if math.isinf(value):
        raise ValueError(f"the number {text[:40]} is beyond what JSON readers can hold")
    return value


def not_json(name: str) -> float:
    """NaN and Infinity, which Python reads but JSON does not have."""
    raise ValueError(f"{name} is not a JSON value")


def completed(document: Metadata | None) -> bool:
    """True when the metadata says the workflow finished (the server's last write)."""
    return document is not None and document.get("status") == "completed"


def unusable(result: Result, exc: OSError, action: str) -> SyncdError:
    """What keeps syncd from reading or writing the result's metadata file."""
    path = result.metadata
    if isinstance(exc, folders.SymlinkInTheWay):
        workflow = len(result.rel.parts) == 2 and exc.filename == str(result.tree.parent)
        return exc.error("workflow folder" if workflow else f"metadata {path}: folder")
    if exc.errno == errno.ELOOP:
        return not_a_file(path, "a symlink")
    return os_error(exc, action, path)


def not_a_file(path: Path, what: str) -> SyncdError:
    return InputError(
        f"metadata {path} is {what}; left as it is: syncd never writes through one or "
        "replaces it: put the metadata file itself there"
    )


def is_recorded(document: Metadata | None, result: Result) -> bool:
    """True when the metadata already says this result is in S3."""
    return records(document, result.remote_path)


def records(document: Metadata | None, remote_path: str) -> bool:
    """True when the metadata says its result is in S3 at `remote_path`."""
    return (
        document is not None
        and document.get("storage_type") == "s3"
        and document.get("remote_path") == remote_path
    )


def altered(document: Metadata | None, kept: Kept | None) -> bool:
    """Whether the metadata records the result where syncd put it, but with other
    `output_files` than syncd wrote (edited by hand or by a tool): syncd owns its record."""
    return (
        document is not None
        and kept is not None
        and records(document, kept.remote_path)
        and document.get("output_files") != kept.output_files
    )


def recorded_elsewhere(document: Metadata | None, result: Result) -> str | None:
    """The remote_path of a record the metadata holds for another place than this result's
    (another prefix, another result sharing the file, the server's own upload), or None."""
    if document is None or document.get("storage_type") != "s3":
        return None
    remote_path = document.get("remote_path")
    if not isinstance(remote_path, str) or not remote_path or remote_path == result.remote_path:
        return None
    return remote_path


@dataclass(frozen=True)
class Kept:
    """The record syncd made for a result, kept in its state to restore it if the metadata is
    written again without it (`signed_url` is signed afresh)."""

    remote_path: str
    output_files: list[dict[str, Any]]

    def as_dict(self) -> dict[str, Any]:
        return {"remote_path": self.remote_path, "output_files": self.output_files}

    def dumps(self) -> str:
        return json.dumps(self.as_dict(), separators=(",", ":"), ensure_ascii=False)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Kept:
        return cls(data["remote_path"], data["output_files"])

    @classmethod
    def loads(cls, text: str) -> Kept:
        return cls.from_dict(json.loads(text))

    @classmethod
    def of(cls, result: Result, document: Metadata | None) -> Kept | None:
        """The record in metadata that holds one for this result."""
        files = document.get("output_files") if document is not None else None
        if not is_recorded(document, result) or not isinstance(files, list):
            return None
        return cls(result.remote_path, files)


def output_files(
    result: Result, files: list[LocalFile], md5: dict[str, str]
) -> list[dict[str, Any]]:
    """The `output_files` entries of a tree: `<exec>/<path in tree>`, size, and the MD5 of the
    bytes sent (hex; readers check what they download against it)."""
    return [{"path": f"{result.name}/{f.rel}", "size": f.size, "md5": md5[f.rel]} for f in files]


def recorded(
    document: Metadata | None,
    result: Result,
    files: list[dict[str, Any]],
    signed_url: str | None,
) -> Metadata:
    """The metadata with the upload recorded (`files`: its output_files entries); a missing
    file starts from the basics."""
    updated = (
        dict(document)
        if document is not None
        else {
            "request_id": result.name,
            "status": "completed",
        }
    )
    updated |= {
        "storage_type": "s3",
        "signed_url": signed_url,
        "remote_path": result.remote_path,
        "output_files": files,
    }
    return updated


def write_atomic(result: Result, document: Metadata) -> Stamp:
    """Replace the result's metadata file so readers see the old file or the new one, never a
    partial one, in the folder reached from outputs_dir without following a symlink. The new
    file keeps the old one's mode, and its owner and group where this user may set them (so
    the server can still write it); a file made anew those of its folder. Failures come as
    SyncdError; no temporary file stays. Returns the new file's stamp."""
    path = result.metadata
    try:
        text = json.dumps(document, indent=2, ensure_ascii=False) + "\n"
        data = text.encode()
    except UnicodeEncodeError:  # a lone surrogate in a value: keep it, as a JSON escape
        data = (json.dumps(document, indent=2) + "\n").encode()
    except RecursionError:
        raise InputError(
            f"metadata {path} nests its values deeper than syncd can write back; left as it is: "
            "fix or remove it and the result is uploaded on the next scan"
        ) from None
    try:
        with folders.opened(result.outputs_dir, path.parent) as folder:
            return _write(folder, path, data)
    except OSError as exc:
        raise unusable(result, exc, "writing metadata") from None


def _write(folder: int, path: Path, data: bytes) -> Stamp:
    try:
        old = os.stat(path.name, dir_fd=folder, follow_symlinks=False)
    except FileNotFoundError:
        old = None
    if old is not None and not stat.S_ISREG(old.st_mode):
        raise not_a_file(path, "a symlink" if stat.S_ISLNK(old.st_mode) else "not a file")
    tmp = marker.temp_name(path.name)
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    fd = os.open(tmp, flags, 0o600, dir_fd=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            # A new file belongs to the folder's owner: a root `syncd sync` makes none of root's.
            owner = old if old is not None else os.fstat(folder)
            folders.adopt(f.fileno(), owner.st_uid, owner.st_gid)
            os.fchmod(f.fileno(), old.st_mode & 0o7777 if old is not None else 0o644)
            os.fsync(f.fileno())
            written = stamp_of(os.fstat(f.fileno()))
        os.replace(tmp, path.name, src_dir_fd=folder, dst_dir_fd=folder)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp, dir_fd=folder)
        raise
    os.fsync(folder)  # make the rename itself durable
    return written
