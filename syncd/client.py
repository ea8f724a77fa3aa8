"""For readers of result metadata: a result's files and its Zarr store, whether it is in S3
behind a CloudFront signed URL (`storage_type: "s3"`) or still on the server (`"server"`).

    from syncd.client import open_dataset
    ds = open_dataset(metadata)                        # lazily, over the signed URL
    ds = open_dataset(metadata, outputs="/outputs")    # a result kept on the server

Every file read whole from S3 is checked against the MD5 syncd recorded for it in
`output_files` (a `ChecksumError` names a file whose bytes differ). Transient HTTP errors are
retried. A 403 becomes `AccessError`, which says whether the URL
expired or does not cover the path; within a valid URL, CloudFront's 403 for an object S3
does not have is a missing file, as Zarr expects. Paths are file names, not URL text: a `#`,
`?`, `%`, `+`, `&`, space or non-ASCII letter in a name is percent-encoded on the way out.
Needs the `client` extra (xarray, zarr).
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from pathlib import Path
from typing import Any
from urllib.parse import quote, unquote, urlsplit

import aiohttp
import fsspec
import yarl
from fsspec.implementations.http import HTTPFileSystem

from syncd.policy import expiry

RETRIES = 4
TRANSIENT = {500, 502, 503, 504}


class AccessError(PermissionError):
    """CloudFront refused a signed URL; the message says why."""


class ChecksumError(OSError):
    """A file read from S3 is not the file syncd uploaded: its MD5 differs from the record."""


def file_url(signed_url: str, path: str) -> str:
    """The signed URL of one file of the result (`path` inside the result)."""
    url = quoted(f"{result_root(signed_url)}/{path.lstrip('/')}")
    return f"{url}?{signed_url.partition('?')[2]}"


def result_root(signed_url: str) -> str:
    """The result's base URL as plain text (not percent-encoded), without the wildcard."""
    return unquote(signed_url.partition("?")[0].removesuffix("*").rstrip("/"))


def quoted(url: str) -> str:
    """`url` (plain text, no query) with its path percent-encoded. Split by hand: in a file
    name `#` and `?` are data, not the start of a fragment or a query."""
    scheme, _, rest = url.partition("://")
    netloc, slash, path = rest.partition("/")
    return f"{scheme}://{netloc}{quote(slash + path)}"


def refusal(signed_url: str, url: str, now: float | None = None) -> AccessError | None:
    """Why CloudFront refuses `url` under `signed_url`, or None if the URL itself is fine
    (then a 403 means the object does not exist)."""
    now = time.time() if now is None else now
    expires = expiry(signed_url)
    if expires is not None and now >= expires:
        stamp = time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime(expires))
        return AccessError(
            f"the signed URL expired at {stamp}: fetch the result's metadata again (syncd "
            "renews it) or ask the operator for `syncd sign`"
        )
    covered = signed_url.partition("?")[0].removesuffix("*")
    requested = url.partition("?")[0]
    if not requested.startswith(covered):
        return AccessError(f"the signed URL covers {covered}*, not {requested}")
    return None


class SignedHTTPFileSystem(HTTPFileSystem):
    """fsspec over one CloudFront signed URL: every request carries its signing query. Paths
    are plain text URLs (`result_root(signed_url)/<path>`), encoded here, once."""

    def __init__(
        self, signed_url: str, *, md5: dict[str, str] | None = None, **options: Any
    ) -> None:
        """`md5`: the MD5 (hex) each file must have, by its plain URL."""
        query = dict(p.split("=", 1) for p in urlsplit(signed_url).query.split("&") if p)
        super().__init__(params=query, encoded=True, **options)
        self.signed_url = signed_url
        self.md5 = md5 or {}

    def encode_url(self, url: str) -> yarl.URL:
        return yarl.URL(quoted(url), encoded=True)

    async def _cat_file(
        self, url: str, start: int | None = None, end: int | None = None, **kwargs: Any
    ) -> bytes:
        data: bytes = await self._retried(super()._cat_file, url, start=start, end=end, **kwargs)
        expected = self.md5.get(url) if start is None and end is None else None
        if expected is not None and hashlib.md5(data).hexdigest() != expected:
            raise ChecksumError(
                f"{url}: the bytes read ({len(data)}) do not have the MD5 recorded in "
                f"output_files ({expected}); the copy in the bucket or on the way is damaged: "
                "read it again, or ask the operator to publish the result again"
            )
        return data

    async def _info(self, url: str, **kwargs: Any) -> dict[str, Any]:
        info: dict[str, Any] = await self._retried(super()._info, url, **kwargs)
        return info

    async def _retried(self, call: Any, url: str, **kwargs: Any) -> Any:
        for attempt in range(RETRIES):
            try:
                return await call(url, **kwargs)
            except aiohttp.ClientResponseError as exc:
                if exc.status == 403:
                    refused = refusal(self.signed_url, quoted(url))
                    raise refused or FileNotFoundError(url) from None
                if exc.status not in TRANSIENT or attempt == RETRIES - 1:
                    raise
            except (TimeoutError, aiohttp.ClientConnectionError):
                if attempt == RETRIES - 1:
                    raise
            await asyncio.sleep(0.2 * 2**attempt)
        raise AssertionError("unreachable")


def create_cloudfront_mapper(
    signed_url: str, zarr_path: str = "", md5: dict[str, str] | None = None
) -> fsspec.FSMap:
    """An fsspec mapper over the result (or the Zarr store at `zarr_path` in it), for
    `xr.open_zarr(mapper, consolidated=True)`; `md5` as `checksums(metadata)` gives it."""
    root = result_root(signed_url)
    if zarr_path.strip("/"):
        root = f"{root}/{zarr_path.strip('/')}"
    # Keyword, never None: zarr rebuilds the filesystem from its JSON form.
    return SignedHTTPFileSystem(signed_url, md5=md5 or {}).get_mapper(root)


def checksums(metadata: dict[str, Any]) -> dict[str, str]:
    """The MD5 syncd recorded for each file of an S3 result, by the file's plain URL."""
    root = result_root(metadata["signed_url"])
    return {
        f"{root}/{_inside(metadata, entry['path'])}": entry["md5"]
        for entry in metadata.get("output_files", [])
        if isinstance(entry, dict) and isinstance(entry.get("md5"), str)
    }


def download_result(
    metadata: dict[str, Any], path: str, outputs: str | Path | None = None
) -> bytes:
    """The bytes of one file of a result. `path` is as in `output_files`
    (`exec_X/results.zarr/.zarray`) or inside the result (`results.zarr/.zarray`). For
    `storage_type: "server"`, `outputs` is the server's outputs folder or an HTTP base URL."""
    inside = _inside(metadata, path)
    if metadata.get("storage_type") == "s3":
        fs = SignedHTTPFileSystem(metadata["signed_url"], md5=checksums(metadata))
        data: bytes = fs.cat_file(f"{result_root(metadata['signed_url'])}/{inside}")
        return data
    location = _server_location(metadata, outputs)
    if isinstance(location, Path):
        return (location / inside).read_bytes()
    fetched: bytes = fsspec.filesystem("http").cat_file(f"{location}/{quote(inside)}")
    return fetched


def open_dataset(
    metadata: dict[str, Any], outputs: str | Path | None = None, zarr_path: str | None = None
) -> Any:
    """The result's Zarr store as a lazily loaded xarray Dataset."""
    import xarray as xr

    zarr_path = zarr_path or _zarr_path(metadata)
    consolidated = any(
        _inside(metadata, f["path"]) == f"{zarr_path}/.zmetadata"
        for f in metadata.get("output_files", [])
    )
    if metadata.get("storage_type") == "s3":
        store: Any = create_cloudfront_mapper(
            metadata["signed_url"], zarr_path, checksums(metadata)
        )
    else:
        location = _server_location(metadata, outputs)
        if isinstance(location, Path):
            store = str(location / zarr_path)
        else:
            store = fsspec.get_mapper(f"{location}/{quote(zarr_path)}")
    return xr.open_zarr(store, consolidated=consolidated or None)


def _exec_name(metadata: dict[str, Any]) -> str:
    remote = metadata.get("remote_path") or ""
    return remote.rstrip("/").rsplit("/", 1)[-1] or str(metadata.get("request_id", ""))


def _inside(metadata: dict[str, Any], path: str) -> str:
    name = _exec_name(metadata)
    return path.removeprefix(f"{name}/") if name else path


def _zarr_path(metadata: dict[str, Any]) -> str:
    for entry in metadata.get("output_files", []):
        parts = _inside(metadata, entry["path"]).split("/")
        for depth, part in enumerate(parts[:-1]):
            if part.endswith(".zarr"):
                return "/".join(parts[: depth + 1])
    raise FileNotFoundError("the result's output_files hold no *.zarr store")


def _server_location(metadata: dict[str, Any], outputs: str | Path | None) -> Path | str:
    """Where the result's tree is on the server: a folder, or an HTTP base URL."""
    if outputs is None:
        raise ValueError("a result kept on the server needs `outputs`: its folder or base URL")
    name = _exec_name(metadata)
    if isinstance(outputs, str) and outputs.startswith(("http://", "https://")):
        return f"{outputs.rstrip('/')}/{quote(name)}"
    base = Path(outputs)
    candidates = [base / name]
    if metadata.get("workflow_name"):
        candidates.append(base / str(metadata["workflow_name"]) / name)
    return next((c for c in candidates if c.is_dir()), candidates[0])
