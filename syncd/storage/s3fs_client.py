"""The s3fs adapter (aiobotocore on the running loop): PutObject below two parts, else syncd's
own multipart (s3fs's cannot take a header per part); Content-MD5 on every request, which S3,
MinIO and rclone verify. It also aborts unfinished multipart uploads for the obstore adapter."""

from __future__ import annotations

import asyncio
import base64
import hashlib
from typing import Any

from syncd.budget import PARTS_PER_FILE, requests_in_flight
from syncd.config import ObjectStorage
from syncd.errors import store_errors
from syncd.objects import ObjectHeaders
from syncd.storage.base import location
from syncd.storage.body import Body
from syncd.storage.timeouts import CONNECT_TIMEOUT, file_deadline


class S3fsStore:
    """s3fs/aiobotocore on the running event loop; one PutObject or multipart per file."""

    def __init__(self, storage: ObjectStorage) -> None:
        self.storage = storage
        self.description = f"{location(storage)} via s3fs"
        # s3fs's own threshold: a file under two parts goes as one PutObject.
        self.single_put_below = 2 * storage.multipart_chunksize
        self.fs: Any = None

    async def _client(self) -> Any:
        if self.fs is None:
            import s3fs

            storage = self.storage
            config: dict[str, Any] = {
                # One connection for each request in flight, and one for a listing or a
                # clean-up of another result meanwhile.
                "max_pool_connections": requests_in_flight(storage.max_concurrency) + 1,
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
