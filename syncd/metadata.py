"""The result metadata JSON: read it, decide whether it is recorded, rewrite it atomically.

The rewrite keeps every field the file had and sets `storage_type`, `signed_url`,
`remote_path` and `output_files`. A file that is not a JSON object is never overwritten.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

from syncd.layout import LocalFile, Result

Metadata = dict[str, Any]


class MetadataError(Exception):
    """A metadata file that exists but cannot be used; it is left untouched."""


def read(path: Path) -> Metadata | None:
    """The metadata object, or None when the file does not exist."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise MetadataError(
            f"metadata {path} cannot be read ({exc.strerror}): fix its permissions"
        ) from None
    try:
        document = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise MetadataError(
            f"metadata {path} is not valid JSON ({exc}); left as it is: fix or remove it "
            "and the result is uploaded on the next scan"
        ) from None
    if not isinstance(document, dict):
        raise MetadataError(
            f"metadata {path} is not a JSON object; left as it is: fix or remove it "
            "and the result is uploaded on the next scan"
        )
    return document


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
    """Replace `path` so readers see the old file or the new one, never a partial one."""
    data = (json.dumps(document, indent=2, ensure_ascii=False) + "\n").encode()
    try:
        mode = path.stat().st_mode & 0o7777
    except FileNotFoundError:
        mode = 0o644
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fchmod(f.fileno(), mode)
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
