"""The result metadata JSON: read it, decide whether it is recorded, rewrite it atomically.

The rewrite keeps every field the file had and sets `storage_type`, `signed_url`,
`remote_path` and `output_files`. A file that is not a JSON object is never overwritten.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import stat
import tempfile
from pathlib import Path
from typing import Any

from syncd.errors import Kind, SyncdError, os_error
from syncd.layout import LocalFile, Result

Metadata = dict[str, Any]
# Temporary files of the rewrite; one a kill left behind is removed at the next start.
TEMP_SUFFIX = ".syncd.tmp"


def read(path: Path) -> Metadata | None:
    """The metadata object, or None when the file does not exist. A symlink is refused: the
    rewrite would have to write through it or replace it, and neither is syncd's to do."""
    try:
        # O_NONBLOCK: a FIFO in its place must not hang the reader (it is refused below).
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise unusable(path, exc) from None
    try:
        with os.fdopen(fd, "rb") as f:
            if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
                raise SyncdError(
                    f"metadata {path} is not a regular file; left as it is: replace it with the "
                    "metadata JSON, or remove it",
                    Kind.INPUT,
                )
            raw = f.read()
    except OSError as exc:
        raise unusable(path, exc) from None
    try:
        document = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise SyncdError(
            f"metadata {path} is not valid JSON ({exc}); left as it is: fix or remove it "
            "and the result is uploaded on the next scan",
            Kind.INPUT,
        ) from None
    if not isinstance(document, dict):
        raise SyncdError(
            f"metadata {path} is not a JSON object; left as it is: fix or remove it "
            "and the result is uploaded on the next scan",
            Kind.INPUT,
        )
    return document


def unusable(path: Path, exc: OSError) -> SyncdError:
    if exc.errno == errno.ELOOP:
        return not_a_file(path, "a symlink")
    return os_error(exc, "reading metadata", path)


def not_a_file(path: Path, what: str) -> SyncdError:
    return SyncdError(
        f"metadata {path} is {what}; left as it is: syncd never writes through one or "
        "replaces it: put the metadata file itself there",
        Kind.INPUT,
    )


def is_recorded(document: Metadata | None, result: Result) -> bool:
    """True when the metadata already says this result is in S3."""
    return (
        document is not None
        and document.get("storage_type") == "s3"
        and document.get("remote_path") == result.remote_path
    )


def recorded(
    document: Metadata | None, result: Result, files: list[LocalFile], signed_url: str | None
) -> Metadata:
    """The metadata with the upload recorded; a missing file starts from the basics."""
    updated = (
        dict(document)
        if document is not None
        else {
            "request_id": result.name,
            "status": "completed",
        }
    )
    updated.update(
        storage_type="s3",
        signed_url=signed_url,
        remote_path=result.remote_path,
        output_files=[{"path": f"{result.name}/{f.rel}", "size": f.size} for f in files],
    )
    return updated


def write_atomic(path: Path, document: Metadata) -> None:
    """Replace `path` so readers see the old file or the new one, never a partial one. The new
    file keeps the old one's mode, and its owner and group where this user may set them (so
    the server can still write it). Failures come as SyncdError; no temporary file stays."""
    try:
        text = json.dumps(document, indent=2, ensure_ascii=False) + "\n"
        data = text.encode()
    except UnicodeEncodeError:  # a lone surrogate in a value: keep it, as a JSON escape
        data = (json.dumps(document, indent=2) + "\n").encode()
    try:
        _write(path, data)
    except OSError as exc:
        raise os_error(exc, "writing metadata", path) from None


def _write(path: Path, data: bytes) -> None:
    try:
        old = path.lstat()
    except FileNotFoundError:
        old = None
    if old is not None and not stat.S_ISREG(old.st_mode):
        raise not_a_file(path, "a symlink" if stat.S_ISLNK(old.st_mode) else "not a file")
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=TEMP_SUFFIX)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            if old is not None:
                with contextlib.suppress(PermissionError):
                    os.fchown(f.fileno(), old.st_uid, old.st_gid)
            os.fchmod(f.fileno(), old.st_mode & 0o7777 if old is not None else 0o644)
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dir_fd)  # make the rename itself durable
    finally:
        os.close(dir_fd)
