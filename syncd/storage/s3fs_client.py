"""The s3fs adapter (aiobotocore on the running loop): PutObject up to multipart_chunksize,
else syncd's own multipart (s3fs's cannot take a header per part); Content-MD5 on every
request, which S3, MinIO and rclone verify; on a custom endpoint each answered ETag is checked
too (`etags`), for a store that verifies nothing. Its multipart uploads resume: each one is
journaled (`Multiparts`) from its start to its end, and a later attempt asks the store which
parts it holds (ListParts), keeps those whose size and MD5 match the local bytes and sends
only the rest. It also sends the obstore adapter's multipart uploads (obstore hides their ids,
so they could not resume), and aborts the unfinished ones nobody resumes.

s3fs is used through its async surface: with `asynchronous=True` fsspec's coroutines are the
`_`-prefixed twins of its methods (`_call_s3` of `call_s3`: one S3 call with s3fs's retries and
its translation of botocore's errors), and `set_session()` hands out the aiobotocore client it
made, which this adapter closes."""

from __future__ import annotations

import asyncio
import base64
import contextlib
from collections.abc import AsyncIterator
from contextlib import AbstractContextManager
from typing import Any

from loguru import logger

from syncd.budget import PARTS_PER_FILE, SLOWEST_RATE, requests_in_flight
from syncd.config import ObjectStorage, without_userinfo
from syncd.errors import SyncdError, first_failure, store_error, store_errors
from syncd.objects import ObjectHeaders
from syncd.storage.base import Multiparts, Pages, location
from syncd.storage.body import Body
from syncd.storage.etags import Etags, Sent
from syncd.storage.timeouts import (
    CONNECT_TIMEOUT,
    READ_TIMEOUT,
    answered,
    asked,
    file_deadline,
)

# The parts a store holds of an upload: part number -> (MD5 hex of its bytes, size).
Stored = dict[int, tuple[str, int]]


class Differs(Exception):
    """A part the store holds of an upload to resume differs from the file's bytes."""


class S3fsStore:
    """s3fs/aiobotocore on the running event loop; one PutObject or multipart per file."""

    def __init__(
        self, storage: ObjectStorage, multiparts: Multiparts | None, proxy: str | None = None
    ) -> None:
        """`multiparts`: where unfinished multipart uploads are journaled; None (`syncd check`)
        for a store that uploads nothing. `proxy`: the bandwidth relay, if any."""
        self.storage = storage
        self.proxy = proxy
        self.multiparts = multiparts
        self.description = f"{location(storage)} via s3fs"
        # As with obstore: a file of up to one part goes as one PutObject, a larger one in
        # parts (s3fs's own put waits for two parts; syncd sends its parts itself).
        self.single_put_below = storage.multipart_chunksize + 1
        self.fs: Any = None
        self.session: Any = None  # the aiobotocore client s3fs made
        # S3 verifies Content-MD5; a custom endpoint's store may only keep it (moto). Named
        # without a client: obstore's adapter shares these findings about the store.
        self.etags = Etags(location(storage), checking=storage.endpoint_url is not None)

    async def _client(self) -> Any:
        if self.fs is None:
            import s3fs

            storage = self.storage
            config: dict[str, Any] = {
                # One connection for each request in flight, and one for a listing or a
                # clean-up of another result meanwhile.
                "max_pool_connections": requests_in_flight(storage.max_concurrency) + 1,
                "retries": {"max_attempts": 3, "mode": "standard"},
                "connect_timeout": CONNECT_TIMEOUT,
                # Runs only while botocore waits for bytes of an answer, never while a slow body
                # is sent (measured). s3fs sets 15 s; a CompleteMultipartUpload of 2 GiB took
                # moto 26 s here, and a retry racing the first completion fails it (500).
                # Through the bandwidth relay the kernel takes a body whole long before the
                # relay has sent it: the wait for an answer begins that much earlier.
                "read_timeout": READ_TIMEOUT
                + (storage.multipart_chunksize / SLOWEST_RATE if self.proxy is not None else 0),
            }
            if storage.accelerated:
                config["s3"] = {"use_accelerate_endpoint": True}
            if self.proxy is not None:
                config["proxies"] = {"http": self.proxy, "https": self.proxy}
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
                # botocore refuses a user and password beside its own Authorization header.
                endpoint_url=without_userinfo(storage.endpoint_url),
                client_kwargs={"region_name": storage.region},
                config_kwargs=config,
            )
            self.fs.retries = 3  # s3fs's own retry loop, around botocore's
            self.session = await self.fs.set_session()
        return self.fs

    async def connect(self) -> None:
        await self._client()

    async def put(self, body: Body, key: str, headers: ObjectHeaders) -> None:
        if body.size >= self.single_put_below:
            return await self.multipart(body, key, headers)
        fs = await self._client()
        with failures(f"upload of {key}"):
            # Straight to s3fs's client call: its _put_file costs ~12 % more CPU per small
            # file (type guessing, checks, callbacks), the bottleneck here.
            data = await body.whole()
            md5 = base64.b64encode(body.md5.digest()).decode()
            async with answered(key, body.size):
                answer = await fs._call_s3(
                    "put_object",
                    Bucket=self.storage.bucket,
                    Key=key,
                    ContentType=headers.content_type,
                    CacheControl=headers.cache_control,
                    Body=data,
                    ContentMD5=md5,
                )
            await self.etags.check(
                key, answer.get("ETag"), Sent.whole(body.md5.digest()), self._read
            )

    async def multipart(self, body: Body, key: str, headers: ObjectHeaders) -> None:
        """Upload `body` in parts of multipart_chunksize, resuming the journaled upload of
        `key` if the store still holds it and every part it holds matches the file."""
        fs = await self._client()
        with failures(f"upload of {key}"):
            upload, stored = await self._resumable(fs, key)
            if upload is not None:
                try:
                    kept = await self._send(fs, body, upload, stored)
                except Differs:
                    # The file changed since: start afresh (rclone cannot replace a part).
                    logger.info(
                        "{}: the store holds parts of an earlier upload that differ from the "
                        "file; uploading it afresh",
                        key,
                    )
                    await self._abort(fs, upload)
                else:
                    logger.info(
                        "{}: resumed its multipart upload: {} of {} bytes were stored already "
                        "and match the file",
                        key,
                        kept,
                        body.size,
                    )
                    return
            started = await fs._call_s3(
                "create_multipart_upload",
                Bucket=self.storage.bucket,
                Key=key,
                ContentType=headers.content_type,
                CacheControl=headers.cache_control,
            )
            upload = {"Bucket": self.storage.bucket, "Key": key, "UploadId": started["UploadId"]}
            if self.multiparts is not None:
                await self.multiparts.begun(
                    key, started["UploadId"], self.storage.multipart_chunksize
                )
            await self._send(fs, body, upload, {})

    async def _send(self, fs: Any, body: Body, upload: dict[str, Any], stored: Stored) -> int:
        """Send the parts the store does not hold and complete the upload; returns the bytes
        it held already."""
        try:
            parts, digests, kept = await self._parts(fs, body, upload, stored)
            answer = await fs._call_s3(
                "complete_multipart_upload", **upload, MultipartUpload={"Parts": parts}
            )
        except Differs:
            raise
        except BaseException:
            if self.multiparts is None:  # not resumable: best effort (a stop may be under way)
                aborting = asyncio.ensure_future(self._abort(fs, upload))
                await asyncio.wait([aborting], timeout=CONNECT_TIMEOUT)
            raise
        if self.multiparts is not None:
            await self.multiparts.ended(upload["Key"])
        sent = Sent.parts(digests, self.storage.multipart_chunksize)
        await self.etags.check(upload["Key"], answer.get("ETag"), sent, self._read)
        return kept

    async def _read(self, key: str) -> AsyncIterator[bytes]:
        fs = await self._client()
        answer = await fs._call_s3("get_object", Bucket=self.storage.bucket, Key=key)
        async with answer["Body"] as stream:
            while piece := await stream.read(1 << 20):
                yield piece

    async def _abort(self, fs: Any, upload: dict[str, Any], forget: bool = True) -> bool:
        """Abort `upload` and, if `forget`, its journal entry; one the store does not know any
        more is gone too. Returns whether the store had it."""
        aborted = False
        with contextlib.suppress(FileNotFoundError):  # NoSuchUpload
            async with asked(f"aborting the multipart upload of {upload['Key']}"):
                await fs._call_s3("abort_multipart_upload", **upload)
            aborted = True
        if forget and self.multiparts is not None:
            await self.multiparts.ended(upload["Key"])
        return aborted

    async def _resumable(self, fs: Any, key: str) -> tuple[dict[str, Any] | None, Stored]:
        """The journaled upload of `key` and the parts the store holds of it, if it can be
        resumed; else (None, {}), with the upload aborted if the store still has it."""
        found = await self.multiparts.find(key) if self.multiparts is not None else None
        if found is None:
            return None, {}
        upload_id, part_size = found
        upload = {"Bucket": self.storage.bucket, "Key": key, "UploadId": upload_id}
        if part_size == self.storage.multipart_chunksize:
            try:
                return upload, await self._stored_parts(fs, upload)
            except FileNotFoundError:
                pass  # NoSuchUpload: completed, aborted, or the store forgot it
        await self._abort(fs, upload)  # its parts would not fit
        return None, {}

    async def _stored_parts(self, fs: Any, upload: dict[str, Any]) -> Stored:
        stored: Stored = {}
        marker = 0
        pages = Pages(f"listing the parts of {upload['Key']}")
        while True:
            page = await fs._call_s3("list_parts", **upload, PartNumberMarker=marker)
            for part in page.get("Parts", []):
                stored[part["PartNumber"]] = (part["ETag"].strip('"').lower(), part["Size"])
            if not page.get("IsTruncated"):
                return stored
            marker = page.get("NextPartNumberMarker")
            pages.turn(marker)

    async def _parts(
        self, fs: Any, body: Body, upload: dict[str, Any], stored: Stored
    ) -> tuple[list[dict[str, Any]], list[bytes], int]:
        """Send the parts of `body`, PARTS_PER_FILE at a time, each with its Content-MD5; a
        part the store holds with the same size and MD5 is not sent again, one that differs
        raises Differs. Returns the parts, their MD5s and the bytes not sent again."""
        parts: list[dict[str, Any]] = []
        digests: list[bytes] = []  # each part's MD5, taken as Body reads it
        kept = 0
        slots = asyncio.Semaphore(PARTS_PER_FILE)

        async def send(number: int, data: bytes) -> None:
            nonlocal kept
            try:
                digest = digests[number - 1]
                if number in stored:
                    if stored[number] != (digest.hex(), len(data)):
                        raise Differs
                    parts.append({"PartNumber": number, "ETag": f'"{digest.hex()}"'})
                    kept += len(data)
                    return
                md5 = base64.b64encode(digest).decode()
                async with answered(f"{upload['Key']} (part {number})", len(data)):
                    answer = await fs._call_s3(
                        "upload_part", **upload, PartNumber=number, Body=data, ContentMD5=md5
                    )
                parts.append({"PartNumber": number, "ETag": answer["ETag"]})
            finally:
                slots.release()

        try:
            async with asyncio.TaskGroup() as group:
                number = 0
                async for data in body.parts(self.storage.multipart_chunksize, digests):
                    await slots.acquire()
                    number += 1
                    group.create_task(send(number, data))
        except BaseExceptionGroup as errors:
            raise first_failure(errors, Exception) from None
        return sorted(parts, key=lambda part: part["PartNumber"]), digests, kept

    def deadline(self, size: int) -> float:
        part = self.storage.multipart_chunksize
        return file_deadline(size, self.single_put_below, part, retries=3 * 3)

    async def delete(self, keys: list[str]) -> None:
        fs = await self._client()
        with failures(f"deleting {len(keys)} objects"):
            for start in range(0, len(keys), 1000):
                batch = [{"Key": key} for key in keys[start : start + 1000]]
                async with asked(f"deleting {len(keys)} objects"):
                    answer = await fs._call_s3(
                        "delete_objects", Bucket=self.storage.bucket, Delete={"Objects": batch}
                    )
                if answer.get("Errors"):  # a success that refuses some keys
                    from botocore.exceptions import ClientError

                    raise ClientError({"Error": answer["Errors"][0]}, "DeleteObjects")

    def held(self, size: int) -> int:
        # Measured: syncd reads PARTS_PER_FILE parts (or a whole small file) at once, and
        # botocore holds a second copy of each while it signs and sends it.
        return 2 * min(size, PARTS_PER_FILE * self.storage.multipart_chunksize)

    async def _list(self, action: str, **params: Any) -> dict[str, Any]:
        fs = await self._client()
        async with asked(action):
            answer: dict[str, Any] = await fs._call_s3(
                "list_objects_v2", Bucket=self.storage.bucket, **params
            )
        return answer

    async def sizes(self, prefix: str) -> dict[str, int]:
        found: dict[str, int] = {}
        params: dict[str, Any] = {"Prefix": prefix}
        pages = Pages(f"listing {prefix}")
        with failures(f"listing {prefix}"):
            while True:
                page = await self._list(f"listing {prefix}", **params)
                found.update({o["Key"]: o["Size"] for o in page.get("Contents", [])})
                if not page.get("IsTruncated"):
                    return found
                params["ContinuationToken"] = page.get("NextContinuationToken")
                pages.turn(params["ContinuationToken"])

    async def probe(self) -> None:
        with failures(f"listing {self.description}"):
            await self._list(f"listing {self.description}", Prefix=self.storage.prefix, MaxKeys=1)

    async def abort_uploads(self, prefix: str, keep: set[str]) -> int:
        fs = await self._client()
        bucket = self.storage.bucket
        journaled = await self.multiparts.under(prefix) if self.multiparts is not None else {}
        resumed = {(key, upload_id) for key, upload_id in journaled.items() if key in keep}
        aborted = 0

        async def abort(key: str, upload_id: str) -> None:
            nonlocal aborted
            upload = {"Bucket": bucket, "Key": key, "UploadId": upload_id}
            # Forget only this very upload: another of the same key may be the one resumed.
            aborted += await self._abort(fs, upload, forget=journaled.get(key) == upload_id)

        with failures(f"aborting multipart uploads under {prefix}"):
            # Those this host journaled first: rclone cannot list them.
            for key, upload_id in journaled.items():
                if (key, upload_id) not in resumed:
                    await abort(key, upload_id)
        with failures(f"listing multipart uploads under {prefix}"):
            marker: dict[str, str] = {}
            pages = Pages(f"listing multipart uploads under {prefix}")
            while True:
                async with asked(f"listing multipart uploads under {prefix}"):
                    page = await fs._call_s3(
                        "list_multipart_uploads", Bucket=bucket, Prefix=prefix, **marker
                    )
                for upload in page.get("Uploads", []):
                    if (upload["Key"], upload["UploadId"]) not in resumed:
                        await abort(upload["Key"], upload["UploadId"])
                if not page.get("IsTruncated"):
                    return aborted
                marker = {
                    "KeyMarker": page.get("NextKeyMarker"),
                    "UploadIdMarker": page.get("NextUploadIdMarker"),
                }
                pages.turn(tuple(marker.values()) if any(marker.values()) else None)

    async def close(self) -> None:
        if self.session is not None:
            await self.session.close()
        self.fs = self.session = None


def failures(action: str) -> AbstractContextManager[None]:
    """s3fs's and botocore's exceptions in the taxonomy's words."""
    return store_errors(action, translated)


def translated(exc: Exception, action: str) -> SyncdError:
    """botocore's ClientError (raised, or the cause of the OSError s3fs raised from it) holds
    the S3 error the store answered."""
    from botocore.exceptions import ClientError

    for cause in (exc, exc.__cause__, exc.__context__):
        if isinstance(cause, ClientError):
            error = cause.response.get("Error", {})
            if error.get("Code"):
                return store_error(exc, action, error["Code"], error.get("Message"))
    return store_error(exc, action)
