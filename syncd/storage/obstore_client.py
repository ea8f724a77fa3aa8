"""The obstore adapter (Rust `object_store`): PutObject up to multipart_chunksize, with
x-amz-checksum-sha256. Files above it go as obstore's multipart uploads, but those of more than
RESUMABLE_PARTS parts: they go as the s3fs adapter's, which resume after a restart (obstore's
cannot: it hides their ids). On a store that may only keep the checksum header (a custom
endpoint) every answered ETag is checked (`etags`): a multipart one against the MD5s of the
parts, taken as each part is read."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Iterator
from contextlib import AbstractContextManager
from datetime import timedelta
from typing import TYPE_CHECKING, Any

from syncd.budget import PARTS_PER_FILE
from syncd.config import ObjectStorage
from syncd.errors import SyncdError, store_error, store_errors
from syncd.objects import ObjectHeaders
from syncd.storage.base import Pages, location
from syncd.storage.body import Body
from syncd.storage.etags import Sent
from syncd.storage.s3fs_client import S3fsStore
from syncd.storage.timeouts import (
    CLIENT_RETRIES,
    CONNECT_TIMEOUT,
    answered,
    asked,
    file_deadline,
    request_timeout,
)

# Files of more parts resume after a restart. Resuming saves at most a file's bytes, and sending
# parts through botocore costs two CPU-seconds more per GB than obstore (SigV4 hashes each
# part on plain HTTP, Content-MD5 a second MD5 pass): measured, large-few on loopback took
# 4.5 s instead of 2.7. At 32 parts of 8 MiB, at most 256 MiB are sent again after a kill.
RESUMABLE_PARTS = 32
# object_store's words for an answer without an ETag (it needs one for its PutResult).
NO_ETAG = "ETag Header missing"

if TYPE_CHECKING:
    from obstore.store import ClientConfig, S3Config


class ObstoreStore:
    """obstore's S3Store: Rust, async. `multipart` (the s3fs adapter) sends the files of more
    than RESUMABLE_PARTS parts and aborts unfinished uploads, which obstore cannot list."""

    def __init__(
        self, storage: ObjectStorage, multipart: S3fsStore, proxy: str | None = None
    ) -> None:
        from obstore.store import S3Store

        self.storage = storage
        self.description = f"{location(storage)} via obstore"
        config: S3Config = {"region": storage.region}
        if storage.access_key_id:
            config["access_key_id"] = storage.access_key_id
        if storage.secret_access_key:
            config["secret_access_key"] = storage.secret_access_key.get_secret_value()
        if storage.session_token:
            config["session_token"] = storage.session_token.get_secret_value()
        # Each PutObject and part carries x-amz-checksum-sha256, for the store to verify.
        config["checksum_algorithm"] = "sha256"
        if storage.endpoint_url:
            config["endpoint"] = storage.endpoint_url
            config["virtual_hosted_style_request"] = False
        elif storage.accelerated:
            config["endpoint"] = f"https://{storage.bucket}.s3-accelerate.amazonaws.com"
            config["virtual_hosted_style_request"] = True
        client: ClientConfig = {
            "connect_timeout": timedelta(seconds=CONNECT_TIMEOUT),
            # A whole-request timeout (obstore has no progress-based one for uploads), set
            # from the largest request it sends: one part, or one file below a part.
            "timeout": timedelta(seconds=request_timeout(storage.multipart_chunksize)),
        }
        if (storage.endpoint_url or "").startswith("http:"):
            client["allow_http"] = True
        if proxy is not None:  # the bandwidth relay
            client["proxy_url"] = proxy
        self.store = S3Store(
            storage.bucket, config=config, client_options=client, retry_config=CLIENT_RETRIES
        )
        self.multipart = multipart
        self.etags = multipart.etags  # one finding per store, whichever client made it

    async def put(self, body: Body, key: str, headers: ObjectHeaders) -> None:
        import obstore

        attributes: Any = {
            "Content-Type": headers.content_type,
            "Cache-Control": headers.cache_control,
        }
        part_size = self.storage.multipart_chunksize
        if self.resumable(body.size):
            return await self.multipart.multipart(body, key, headers)
        with failures(f"upload of {key}"), self.etag_required(key):
            if body.size <= part_size:
                data = await body.whole()
                async with answered(key, body.size):
                    answer = await obstore.put_async(
                        self.store, key, data, attributes=attributes, use_multipart=False
                    )
                sent = Sent.whole(body.md5.digest())
            else:
                digests: list[bytes] | None = [] if self.etags.checking else None
                answer = await obstore.put_async(
                    self.store,
                    key,
                    body.parts(part_size, digests),
                    attributes=attributes,
                    chunk_size=part_size,
                    max_concurrency=PARTS_PER_FILE,
                )
                if digests is None:
                    return
                sent = Sent.parts(digests, part_size)
            await self.etags.check(key, answer.get("e_tag"), sent, self._read)

    @contextlib.contextmanager
    def etag_required(self, key: str) -> Iterator[None]:
        try:
            yield
        except Exception as exc:
            if NO_ETAG in str(exc):
                raise self.etags.missing(key) from None
            raise

    def resumable(self, size: int) -> bool:
        return size > RESUMABLE_PARTS * self.storage.multipart_chunksize

    async def _read(self, key: str) -> AsyncIterator[bytes]:
        import obstore

        stored = await obstore.get_async(self.store, key)
        async for piece in stored.stream():
            yield bytes(piece)

    def held(self, size: int) -> int:
        if self.resumable(size):
            return self.multipart.held(size)
        # Measured: obstore reads one part ahead of the parts it sends.
        return min(size, (PARTS_PER_FILE + 1) * self.storage.multipart_chunksize)

    def deadline(self, size: int) -> float:
        if self.resumable(size):
            return self.multipart.deadline(size)
        part = self.storage.multipart_chunksize
        return file_deadline(size, part + 1, part, CLIENT_RETRIES["max_retries"])

    async def delete(self, keys: list[str]) -> None:
        import obstore

        with failures(f"deleting {len(keys)} objects"):
            for start in range(0, len(keys), 1000):  # one DeleteObjects request each
                async with asked(f"deleting {len(keys)} objects"):
                    await obstore.delete_async(self.store, keys[start : start + 1000])

    async def sizes(self, prefix: str) -> dict[str, int]:
        import obstore

        found: dict[str, int] = {}
        listed: set[str] = set()
        pages = Pages(f"listing {prefix}")
        with failures(f"listing {prefix}"):
            stream = obstore.list(self.store, prefix=prefix, chunk_size=1000)
            while True:
                async with asked(f"listing {prefix}"):  # one page each
                    batch = await anext(stream, None)
                if batch is None:
                    break
                # obstore follows the tokens itself: S3 never lists a key twice.
                paths = [meta["path"] for meta in batch]
                if len(listed.union(paths)) != len(listed) + len(paths):
                    raise pages.repeated()
                listed.update(paths)
                for meta in batch:
                    # obstore lists by path segments; keep only keys under the exact prefix.
                    if meta["path"].startswith(prefix):
                        found[meta["path"]] = meta["size"]
        return found

    async def probe(self) -> None:
        import obstore

        with failures(f"listing {self.description}"):
            await obstore.list_with_delimiter_async(self.store, self.storage.prefix or None)

    async def connect(self) -> None:
        pass  # the S3Store is built; it opens connections on the first request

    async def abort_uploads(self, prefix: str, keep: set[str]) -> int:
        return await self.multipart.abort_uploads(prefix, keep)

    async def close(self) -> None:
        await self.multipart.close()


def failures(action: str) -> AbstractContextManager[None]:
    """obstore's exceptions in the taxonomy's words."""
    return store_errors(action, translated)


def translated(exc: Exception, action: str) -> SyncdError:
    """obstore carries the S3 error document in its message; its types say only that the
    credentials were refused."""
    from obstore.exceptions import PermissionDeniedError, UnauthenticatedError

    refused = isinstance(exc, (PermissionDeniedError, UnauthenticatedError))
    return store_error(exc, action, unauthenticated=refused)
