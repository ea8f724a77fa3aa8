"""What each file of a result is as an object: its Content-Type and Cache-Control, and whether
it is a Zarr store's metadata document, which is uploaded only after every chunk of the result
(a reader listing the bucket never finds a store that names data it does not hold yet).
"""

from __future__ import annotations

import mimetypes
from dataclasses import dataclass
from pathlib import PurePosixPath

# The documents that describe a Zarr store (v3: zarr.json; v2: the rest; .zmetadata is v2's
# consolidated metadata).
ZARR_METADATA = frozenset({"zarr.json", ".zmetadata", ".zgroup", ".zarray", ".zattrs"})
JSON = "application/json"
BINARY = "application/octet-stream"
OWN_TYPES = {".json": JSON, ".nc": "application/x-netcdf", ".nc4": "application/x-netcdf"}
# Exec ids never repeat, and syncd never publishes a file again under its key with other bytes,
# so a chunk never changes under its key. The metadata documents are revalidated (a cheap 304
# against their ETag): a result published again with `syncd sync` (files added) may change
# what they say.
IMMUTABLE = "public, max-age=31536000, immutable"
REVALIDATE = "no-cache"


@dataclass(frozen=True)
class ObjectHeaders:
    content_type: str
    cache_control: str


def is_zarr_metadata(rel: str) -> bool:
    return PurePosixPath(rel).name in ZARR_METADATA


def headers_for(rel: str) -> ObjectHeaders:
    """The headers of the object for the file at `rel` in a result's tree."""
    if is_zarr_metadata(rel):
        return ObjectHeaders(JSON, REVALIDATE)
    suffix = PurePosixPath(rel).suffix.lower()
    # Zarr chunks have no suffix ("0.0.1", "c/0/0"): plain bytes.
    content_type = OWN_TYPES.get(suffix) or mimetypes.guess_type(rel, strict=True)[0] or BINARY
    return ObjectHeaders(content_type, IMMUTABLE)
