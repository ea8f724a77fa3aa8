"""Publish one result: upload its tree, check the bucket holds it, sign a URL, record it.

The metadata is only rewritten once the bucket has been listed and holds every file with
its size, so a recorded result is always a complete one.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

from loguru import logger

from syncd import metadata
from syncd.config import Settings
from syncd.layout import LocalFile, Result, tree_files
from syncd.signing import UrlSigner
from syncd.storage import ObjectStore, StoreError


class PublishError(Exception):
    """A result that could not be published this time; the message says why and what to do."""


@dataclass(frozen=True)
class Published:
    result: Result
    files: int
    bytes: int
    seconds: float
    signed_url: str | None


class Publisher:
    """Holds the store and signer shared by every result."""

    def __init__(self, settings: Settings, store: ObjectStore, signer: UrlSigner | None) -> None:
        self.storage = settings.object_storage
        self.store = store
        self.signer = signer

    async def publish(self, result: Result, force: bool = False) -> Published | None:
        """Upload and record `result`; None if its metadata already records it (unless forced)."""
        current = await asyncio.to_thread(self._read_metadata, result)
        if metadata.is_recorded(current, result) and not force:
            return None
        try:
            files = await asyncio.to_thread(tree_files, result.tree)
        except FileNotFoundError:
            raise PublishError(
                f"{result.name}: marker {result.marker} has no result folder {result.tree}: "
                "remove the marker or restore the folder"
            ) from None
        except OSError as exc:
            raise PublishError(
                f"{result.name}: cannot read {exc.filename or result.tree} ({exc.strerror}): "
                "fix its permissions"
            ) from None
        started = time.monotonic()
        total = sum(f.size for f in files)
        logger.info("{}: uploading {} files, {} bytes", result.name, len(files), total)
        await self._upload(result, files)
        await self._verify(result, files)
        seconds = time.monotonic() - started
        signed_url = (
            self.signer.sign(result.remote_path, self.storage.signed_url_expires_in)
            if self.signer
            else None
        )
        await asyncio.to_thread(self._record, result, files, signed_url)
        return Published(result, len(files), total, seconds, signed_url)

    def _read_metadata(self, result: Result) -> metadata.Metadata | None:
        try:
            return metadata.read(result.metadata)
        except metadata.MetadataError as exc:
            raise PublishError(f"{result.name}: {exc}") from None

    async def _upload(self, result: Result, files: list[LocalFile]) -> None:
        pending = iter(files)

        async def worker() -> None:
            # Workers pull from one iterator, so memory does not grow with the file count.
            for file in pending:
                try:
                    await self.store.put(file, result.key(file.rel))
                except OSError as exc:
                    raise PublishError(
                        f"{result.name}: cannot read {file.path} ({exc.strerror}); "
                        "retrying on the next scan"
                    ) from None
                except StoreError as exc:
                    raise PublishError(f"{result.name}: {exc}") from None

        try:
            async with asyncio.TaskGroup() as group:
                for _ in range(min(self.storage.max_concurrency, len(files))):
                    group.create_task(worker())
        except* PublishError as errors:
            raise errors.exceptions[0] from None

    async def _verify(self, result: Result, files: list[LocalFile]) -> None:
        try:
            listed = await self.store.sizes(f"{result.remote_path}/")
        except StoreError as exc:
            raise PublishError(f"{result.name}: cannot verify the upload: {exc}") from None
        wrong = [f for f in files if listed.get(result.key(f.rel)) != f.size]
        if wrong:
            first = wrong[0]
            raise PublishError(
                f"{result.name}: after upload the bucket lacks {len(wrong)} of {len(files)} files "
                f"or holds other sizes (first: {result.key(first.rel)}, "
                f"{first.size} bytes locally, {listed.get(result.key(first.rel))} in the bucket); "
                "retrying on the next scan"
            )

    def _record(self, result: Result, files: list[LocalFile], signed_url: str | None) -> None:
        # Re-read: the server may have added fields while the upload ran.
        latest = self._read_metadata(result)
        metadata.write_atomic(result.metadata, metadata.recorded(latest, result, files, signed_url))
