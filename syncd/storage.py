"""Object store clients behind one small async interface: obstore (Rust) and s3fs.

`use_rust_client` picks obstore; otherwise s3fs. Both take the same settings: endpoint,
region, credentials (or the standard AWS chain when none are set), transfer acceleration
(AWS only), `max_concurrency` and `multipart_chunksize`.

Every file is read once, by syncd, and its MD5 computed as it is read (a `Body`); every request
that carries its bytes carries a checksum the store verifies before it stores them: s3fs sends
Content-MD5 on each PutObject and UploadPart (verified by S3, MinIO, rclone, ...); obstore sends
x-amz-checksum-sha256 and the signed payload's SHA-256 (verified by S3; object_store
cannot send Content-MD5). Other stores may only keep those (rclone, moto), so with a custom
endpoint obstore's single PutObjects are also checked after the fact: the ETag the store answers
must be the MD5 syncd computed anyway. A store whose ETags are not MD5s (encryption) is found
out once, by reading the object back, and not checked that way any more. Multipart ETags are not
checked: that would cost a second MD5 pass over every large file.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, Protocol

from loguru import logger

if TYPE_CHECKING:
    from obstore.store import ClientConfig, S3Config

from syncd.budget import PARTS_PER_FILE
from syncd.config import ObjectStorage
from syncd.errors import SyncdError, store_error
from syncd.objects import ObjectHeaders

# Files up to this size are read on the event loop: a thread costs more than the read.
READ_INLINE = 256 * 1024


class Body:
    """The bytes of one file as they are read, once, with their MD5 computed on the way; a
    file that does not hold exactly `size` bytes any more is a SyncdError (`changed`)."""

    def __init__(self, path: Path, size: int, changed: SyncdError) -> None:
        self.path = path
        self.size = size
        self.changed = changed
        self.md5 = hashlib.md5()

    async def whole(self) -> bytes:
        if self.size <= READ_INLINE:
            return self._read_whole()
        return await asyncio.to_thread(self._read_whole)

    def _read_whole(self) -> bytes:
        with open(self.path, "rb") as f:
            data = f.read(self.size + 1)
        if len(data) != self.size:
            raise self.changed
        self.md5.update(data)
        return data

    async def parts(self, part_size: int) -> AsyncIterator[bytes]:
        """The file in pieces of `part_size` (the last one shorter), in order."""
        with open(self.path, "rb") as f:
            left = self.size
            while left > 0:
                piece = await asyncio.to_thread(self._read_piece, f, min(part_size, left))
                left -= len(piece)
                yield piece
            if await asyncio.to_thread(f.read, 1):
                raise self.changed

    def _read_piece(self, f: BinaryIO, size: int) -> bytes:
        data = f.read(size)
        if len(data) != size:
            raise self.changed
        self.md5.update(data)
        return data

    def hexdigest(self) -> str:
        return self.md5.hexdigest()


class ObjectStore(Protocol):
    """What syncd needs from a bucket."""

    description: str

    async def connect(self) -> None:
        """Build the clients (no request is sent), so the first result does not wait for it."""
        ...

    async def put(self, body: Body, key: str, headers: ObjectHeaders) -> None:
        """Upload `body` as `key`: stored once the store has acknowledged it."""
        ...

    def held(self, size: int) -> int:
        """Bytes this client holds in memory at most while it uploads a file of `size`."""
        ...

    def deadline(self, size: int) -> float:
        """Seconds after which the upload of a file of `size` can only be hung: every
        request and retry of it would have timed out by then."""
        ...

    async def delete(self, keys: list[str]) -> None:
        """Delete these objects."""
        ...

    async def sizes(self, prefix: str) -> dict[str, int]:
        """Size of every object whose key starts with `prefix`."""
        ...

    async def probe(self) -> None:
        """Reach the bucket with one cheap listing; raise SyncdError if that fails."""
        ...

    async def abort_uploads(self, prefix: str) -> int:
        """Abort the unfinished multipart uploads under `prefix`; return how many."""
        ...

    async def close(self) -> None: ...


def open_store(storage: ObjectStorage) -> ObjectStore:
    if storage.use_transfer_acceleration and storage.endpoint_url is not None:
        logger.warning(
            "use_transfer_acceleration is ignored with endpoint_url {}: acceleration exists "
            "only on AWS S3 itself",
            storage.endpoint_url,
        )
    return ObstoreStore(storage) if storage.use_rust_client else S3fsStore(storage)


# A few quick retries inside the client absorb a single failed request (rclone serve s3 fails
# one now and then); longer outages are the daemon's to retry, with backoff, per result.
CLIENT_RETRIES: Any = {
    "max_retries": 3,
    "retry_timeout": timedelta(seconds=30),
    "backoff": {
        "init_backoff": timedelta(milliseconds=100),
        "max_backoff": timedelta(seconds=2),
        "base": 2,
    },
}


# The slowest link a request must still get through, in bytes per second per request. A
# request is failed only once it has taken longer than its bytes need at this rate (plus a
# minute), so a slow uplink shared by many transfers never fails one that is moving.
SLOWEST_RATE = 16 * 1024
CONNECT_TIMEOUT = 10.0


def request_timeout(request_bytes: int) -> float:
    """Seconds a request carrying `request_bytes` may take."""
    return 60.0 + request_bytes / SLOWEST_RATE


def file_deadline(size: int, single_below: int, part_bytes: int, retries: int) -> float:
    """Seconds the requests of one file may take, every retry included: one request below
    `single_below` bytes, else parts of `part_bytes`, PARTS_PER_FILE at once. Sized by the
    file, so a small file's upload that hangs outside any request (a client's connection pool,
    say) is given up in minutes, not in the hours a part could take."""
    if size < single_below:
        return (retries + 1) * request_timeout(size) + 60.0
    rounds = -(-size // (part_bytes * PARTS_PER_FILE))
    return (retries + 1) * rounds * request_timeout(part_bytes) + 60.0


def _location(storage: ObjectStorage) -> str:
    endpoint = storage.endpoint_url or ("s3-accelerate" if storage.accelerated else "AWS S3")
    return f"s3://{storage.bucket} ({endpoint}, {storage.region})"


class ObstoreStore:
    """obstore's S3Store: Rust, async, multipart for files above multipart_chunksize."""

    def __init__(self, storage: ObjectStorage) -> None:
        from obstore.store import S3Store

        self.storage = storage
        self.description = f"{_location(storage)} via obstore"
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
        self.store = S3Store(
            storage.bucket, config=config, client_options=client, retry_config=CLIENT_RETRIES
        )
        # S3 verifies the checksum header; another store may only keep it (rclone, moto).
        self.check_etags = storage.endpoint_url is not None
        # obstore cannot list multipart uploads; the s3fs client does that rare housekeeping,
        # built on first use (only after an interrupted or failed attempt): botocore's S3
        # model costs ~30 MB and 0.3 s.
        self.housekeeping = S3fsStore(storage)

    async def put(self, body: Body, key: str, headers: ObjectHeaders) -> None:
        import obstore

        attributes: Any = {
            "Content-Type": headers.content_type,
            "Cache-Control": headers.cache_control,
        }
        part_size = self.storage.multipart_chunksize
        with store_errors(f"upload of {key}"):
            if body.size <= part_size:
                data = await body.whole()
                answer = await obstore.put_async(
                    self.store, key, data, attributes=attributes, use_multipart=False
                )
                if self.check_etags:
                    await self._check_etag(body, key, (answer.get("e_tag") or "").strip('"'))
                return
            await obstore.put_async(
                self.store,
                key,
                body.parts(part_size),
                attributes=attributes,
                chunk_size=part_size,
                max_concurrency=PARTS_PER_FILE,
            )

    async def _check_etag(self, body: Body, key: str, etag: str) -> None:
        """The store answered `etag` for `body`: unless it is the MD5 syncd expects, the
        object's bytes decide whether they were damaged on the way (a SyncdError) or the store's
        ETags are not MD5s (then they are not checked again)."""
        import obstore

        if not etag or etag == body.hexdigest():
            return
        stored = await obstore.get_async(self.store, key)
        digest = hashlib.md5()
        async for piece in stored.stream():
            digest.update(piece)
        if digest.hexdigest() == body.hexdigest():
            if not self.check_etags:
                return  # another upload found it out meanwhile
            self.check_etags = False
            logger.info(
                "{} answers ETags that are not MD5s (encryption?): relying on its own checks of "
                "the x-amz-checksum-sha256 header",
                self.description,
            )
            return
        raise SyncdError(
            f"upload of {key} failed: the store holds other bytes than were sent (MD5 "
            f"{digest.hexdigest()}, sent {body.hexdigest()}): damaged on the way; sending it again"
        )

    def held(self, size: int) -> int:
        # Measured: obstore reads one part ahead of the parts it sends.
        return min(size, (PARTS_PER_FILE + 1) * self.storage.multipart_chunksize)

    def deadline(self, size: int) -> float:
        part = self.storage.multipart_chunksize
        return file_deadline(size, part + 1, part, CLIENT_RETRIES["max_retries"])

    async def delete(self, keys: list[str]) -> None:
        import obstore

        with store_errors(f"deleting {len(keys)} objects"):
            await obstore.delete_async(self.store, keys)

    async def sizes(self, prefix: str) -> dict[str, int]:
        import obstore

        found: dict[str, int] = {}
        with store_errors(f"listing {prefix}"):
            async for batch in obstore.list(self.store, prefix=prefix, chunk_size=1000):
                for meta in batch:
                    # obstore lists by path segments; keep only keys under the exact prefix.
                    if meta["path"].startswith(prefix):
                        found[meta["path"]] = meta["size"]
        return found

    async def probe(self) -> None:
        import obstore

        with store_errors(f"listing {self.description}"):
            await obstore.list_with_delimiter_async(self.store, self.storage.prefix or None)

    async def connect(self) -> None:
        pass  # the S3Store is built; it opens connections on the first request

    async def abort_uploads(self, prefix: str) -> int:
        return await self.housekeeping.abort_uploads(prefix)

    async def close(self) -> None:
        await self.housekeeping.close()


class S3fsStore:
    """s3fs/aiobotocore on the running event loop; one PutObject or multipart per file."""

    def __init__(self, storage: ObjectStorage) -> None:
        self.storage = storage
        self.description = f"{_location(storage)} via s3fs"
        # s3fs's own threshold: a file under two parts goes as one PutObject.
        self.single_put_below = 2 * storage.multipart_chunksize
        self.fs: Any = None

    async def _client(self) -> Any:
        if self.fs is None:
            import s3fs

            storage = self.storage
            config: dict[str, Any] = {
                "max_pool_connections": max(10, storage.max_concurrency),
                "retries": {"max_attempts": 3, "mode": "standard"},
                # botocore's read timeout (60 s) only runs while it waits for bytes of the
                # answer, never while a slow body is sent (measured): it stays.
                "connect_timeout": CONNECT_TIMEOUT,
            }
            if storage.accelerated:
                config["s3"] = {"use_accelerate_endpoint": True}
            if storage.endpoint_url:
                # botocore >= 1.36 sends CRC32 checksums that some S3-compatible servers reject.
                config["request_checksum_calculation"] = "when_required"
                config["response_checksum_validation"] = "when_required"
            self.fs = s3fs.S3FileSystem(
                asynchronous=True,
                skip_instance_cache=True,
                key=storage.access_key_id,
                secret=storage.secret_access_key.get_secret_value()
                if storage.secret_access_key
                else None,
                token=storage.session_token.get_secret_value() if storage.session_token else None,
                endpoint_url=storage.endpoint_url,
                client_kwargs={"region_name": storage.region},
                config_kwargs=config,
            )
            self.fs.retries = 3  # s3fs's own retry loop, around botocore's
            await self.fs.set_session()
        return self.fs

    async def connect(self) -> None:
        await self._client()

    async def put(self, body: Body, key: str, headers: ObjectHeaders) -> None:
        fs = await self._client()
        target = {"Bucket": self.storage.bucket, "Key": key}
        described = {"ContentType": headers.content_type, "CacheControl": headers.cache_control}
        with store_errors(f"upload of {key}"):
            if body.size < self.single_put_below:
                # Straight to s3fs's client call: its _put_file costs ~12 % more CPU per small
                # file (type guessing, checks, callbacks), the bottleneck here.
                data = await body.whole()
                md5 = base64.b64encode(body.md5.digest()).decode()
                await fs._call_s3("put_object", **target, **described, Body=data, ContentMD5=md5)
                return
            started = await fs._call_s3("create_multipart_upload", **target, **described)
            upload = {**target, "UploadId": started["UploadId"]}
            try:
                parts = await self._parts(fs, body, upload)
                await fs._call_s3(
                    "complete_multipart_upload", **upload, MultipartUpload={"Parts": parts}
                )
            except BaseException:
                # Best effort (a stop may be under way): what is left, the next attempt aborts.
                aborting = asyncio.ensure_future(fs._call_s3("abort_multipart_upload", **upload))
                await asyncio.wait([aborting], timeout=CONNECT_TIMEOUT)
                raise

    async def _parts(self, fs: Any, body: Body, upload: dict[str, str]) -> list[dict[str, Any]]:
        """Send the parts of `body`, PARTS_PER_FILE at a time, each with its Content-MD5."""
        parts: list[dict[str, Any]] = []
        slots = asyncio.Semaphore(PARTS_PER_FILE)

        async def send(number: int, data: bytes) -> None:
            try:
                digest = await asyncio.to_thread(lambda: hashlib.md5(data).digest())  # off the loop
                md5 = base64.b64encode(digest).decode()
                answer = await fs._call_s3(
                    "upload_part", **upload, PartNumber=number, Body=data, ContentMD5=md5
                )
                parts.append({"PartNumber": number, "ETag": answer["ETag"]})
            finally:
                slots.release()

        try:
            async with asyncio.TaskGroup() as group:
                number = 0
                async for data in body.parts(self.storage.multipart_chunksize):
                    await slots.acquire()
                    number += 1
                    group.create_task(send(number, data))
        except* Exception as errors:
            raise errors.exceptions[0] from None
        return sorted(parts, key=lambda part: part["PartNumber"])

    def deadline(self, size: int) -> float:
        part = self.storage.multipart_chunksize
        return file_deadline(size, self.single_put_below, part, retries=3 * 3)

    async def delete(self, keys: list[str]) -> None:
        fs = await self._client()
        with store_errors(f"deleting {len(keys)} objects"):
            for start in range(0, len(keys), 1000):
                batch = [{"Key": key} for key in keys[start : start + 1000]]
                answer = await fs._call_s3(
                    "delete_objects", Bucket=self.storage.bucket, Delete={"Objects": batch}
                )
                if answer.get("Errors"):  # a success that refuses some keys
                    from botocore.exceptions import ClientError

                    raise ClientError({"Error": answer["Errors"][0]}, "DeleteObjects")

    def held(self, size: int) -> int:
        # Measured: s3fs reads PARTS_PER_FILE parts (or a file under 2 parts) at once, and
        # botocore holds a second copy of each while it signs and sends it.
        parts = PARTS_PER_FILE * self.storage.multipart_chunksize
        return 2 * (size if size < self.single_put_below else parts)

    async def _list(self, **params: Any) -> dict[str, Any]:
        fs = await self._client()
        answer: dict[str, Any] = await fs._call_s3(
            "list_objects_v2", Bucket=self.storage.bucket, **params
        )
        return answer

    async def sizes(self, prefix: str) -> dict[str, int]:
        found: dict[str, int] = {}
        params: dict[str, Any] = {"Prefix": prefix}
        with store_errors(f"listing {prefix}"):
            while True:
                page = await self._list(**params)
                found.update({o["Key"]: o["Size"] for o in page.get("Contents", [])})
                if not page.get("IsTruncated"):
                    return found
                params["ContinuationToken"] = page["NextContinuationToken"]

    async def probe(self) -> None:
        with store_errors(f"listing {self.description}"):
            await self._list(Prefix=self.storage.prefix, MaxKeys=1)

    async def abort_uploads(self, prefix: str) -> int:
        fs = await self._client()
        bucket = self.storage.bucket
        aborted = 0
        with store_errors(f"listing multipart uploads under {prefix}"):
            page = await fs._call_s3("list_multipart_uploads", Bucket=bucket, Prefix=prefix)
            # A page holds up to 1,000; aborting them shrinks the list, so list again.
            while page.get("Uploads"):
                for upload in page["Uploads"]:
                    await fs._call_s3(
                        "abort_multipart_upload",
                        Bucket=bucket,
                        Key=upload["Key"],
                        UploadId=upload["UploadId"],
                    )
                    aborted += 1
                if not page.get("IsTruncated"):
                    break
                page = await fs._call_s3("list_multipart_uploads", Bucket=bucket, Prefix=prefix)
        return aborted

    async def close(self) -> None:
        if self.fs is not None and self.fs._s3 is not None:
            await self.fs._s3.close()
        self.fs = None


@contextmanager
def store_errors(action: str) -> Iterator[None]:
    """Translate a client's exception into the taxonomy, once; local read errors pass through."""
    try:
        yield
    except SyncdError:
        raise  # already in the taxonomy's words (the file changed while it was read)
    except Exception as exc:
        # obstore raises FileNotFoundError for a missing bucket, but without a file name.
        if isinstance(exc, OSError) and exc.filename is not None:
            raise
        raise store_error(exc, action) from exc
