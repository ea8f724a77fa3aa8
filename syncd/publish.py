"""Publish one result: upload its tree, sign a URL, record it in the metadata.

The metadata is only rewritten once the store has acknowledged every file (a PutObject or
CompleteMultipartUpload answered with success is stored, in S3's terms) and the tree has not
changed while it was read, so a recorded result is always a complete one. Before the local
tree is deleted (delete_local_after_upload) the bucket is also listed, to check it holds every
file with its size: the local copy is the last one then. Multipart uploads left by an
interrupted or failed attempt are aborted first.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from loguru import logger

from syncd import metadata
from syncd.budget import TransferBudget
from syncd.config import Settings
from syncd.layout import LocalFile, Result, tree_files
from syncd.progress import Progress
from syncd.signing import UrlSigner
from syncd.storage import ObjectStore, StoreError

# Answers that mean this store or these credentials cannot clean up, while uploads may work.
CLEANUP_REFUSED = {"AccessDenied", "NotImplemented", "MethodNotAllowed"}


class PublishError(Exception):
    """A result that could not be published this time; the message says why and what to do.
    `permanent` when only a person can fix it, so retrying fast is pointless."""

    def __init__(self, message: str, permanent: bool = False) -> None:
        super().__init__(message)
        self.permanent = permanent


@dataclass(frozen=True)
class Published:
    result: Result
    files: int
    bytes: int
    seconds: float
    signed_url: str | None

    @property
    def mb_per_s(self) -> float:
        return self.bytes / max(self.seconds, 1e-9) / 1e6


class Publisher:
    """Holds the store and signer shared by every result."""

    def __init__(
        self,
        settings: Settings,
        store: ObjectStore,
        signer: UrlSigner | None,
        show_progress: bool = False,
    ) -> None:
        self.show_progress = show_progress  # for a person running syncd sync
        self.storage = settings.object_storage
        self.delete_local = settings.syncd.delete_local_after_upload
        self.store = store
        self.signer = signer
        self.cleanup_warned = False
        # One bound for every result this publisher uploads.
        self.budget = TransferBudget(self.storage.max_concurrency, settings.syncd.upload_buffer)

    async def is_recorded(self, result: Result) -> bool:
        current = await asyncio.to_thread(self._read_metadata, result)
        return metadata.is_recorded(current, result)

    async def publish(
        self,
        result: Result,
        force: bool = False,
        still_ours: Callable[[], bool] | None = None,
        clean_up: bool = False,
    ) -> Published | None:
        """Upload and record `result`; None if its metadata already records it (unless forced).
        `still_ours` is asked just before the metadata is written; False abandons the result.
        `clean_up` first aborts the multipart uploads an earlier attempt left."""
        current = await asyncio.to_thread(self._read_metadata, result)
        if metadata.is_recorded(current, result) and not force:
            return None
        files = await asyncio.to_thread(self._list_tree, result)
        if not files:
            logger.warning(
                "{}: the result folder is empty; recording it with no files", result.name
            )
        started = time.monotonic()
        total = sum(f.size for f in files)
        logger.info("{}: uploading {} files, {} bytes", result.name, len(files), total)
        if clean_up:
            await self._abort_unfinished(result)
        progress = Progress(result.name, len(files), total) if self.show_progress else None
        await self._upload(result, files, progress)
        if not await asyncio.to_thread(self._unchanged, result, files):
            raise PublishError(
                f"{result.name}: files changed while they were uploaded; retrying once the "
                "tree is quiet (a marker must only be dropped when the result is complete)"
            )
        if self.delete_local:
            # A listing costs little on S3, but some servers hash every object to answer it
            # (rclone: ~0.7 s per 500 MB), so it is paid only where it guards the last copy.
            await self._verify(result, files)
        seconds = time.monotonic() - started
        signed_url = (
            self.signer.sign(result.remote_path, self.storage.signed_url_expires_in)
            if self.signer
            else None
        )
        if still_ours is not None and not still_ours():
            raise PublishError(f"{result.name}: another daemon took over this result; leaving it")
        await asyncio.to_thread(self._record, result, files, signed_url)
        if self.delete_local:
            await asyncio.to_thread(remove_tree, result)
        return Published(result, len(files), total, seconds, signed_url)

    def _read_metadata(self, result: Result) -> metadata.Metadata | None:
        try:
            return metadata.read(result.metadata)
        except metadata.MetadataError as exc:
            raise PublishError(f"{result.name}: {exc}", permanent=True) from None

    def _list_tree(self, result: Result) -> list[LocalFile]:
        with tree_errors(result):
            return list(tree_files(result.tree))

    def _unchanged(self, result: Result, before: list[LocalFile]) -> bool:
        """True when the tree still holds exactly `before`, compared as it is walked."""
        with tree_errors(result):
            return all(a == b for a, b in itertools.zip_longest(before, tree_files(result.tree)))

    async def _abort_unfinished(self, result: Result) -> None:
        """Abort multipart uploads an interrupted attempt left. Best effort: the seed's IAM
        policy does not grant listing them, and some S3-compatible servers cannot."""
        try:
            aborted = await self.store.abort_uploads(f"{result.remote_path}/")
        except StoreError as exc:
            if exc.code not in CLEANUP_REFUSED:  # the upload itself says what is wrong next
                logger.debug("{}: no multipart clean-up: {}", result.name, exc)
            elif not self.cleanup_warned:
                self.cleanup_warned = True
                logger.warning(
                    "cannot clean up unfinished multipart uploads ({}): grant "
                    "s3:ListBucketMultipartUploads and s3:AbortMultipartUpload, or add a "
                    "lifecycle rule that aborts incomplete multipart uploads",
                    exc,
                )
            return
        if aborted:
            logger.info("{}: aborted {} unfinished multipart uploads", result.name, aborted)

    async def _upload(
        self, result: Result, files: list[LocalFile], progress: Progress | None
    ) -> None:
        pending = iter(files)

        async def worker() -> None:
            # Workers pull from one iterator, so memory does not grow with the file count.
            for file in pending:
                path = result.tree / file.rel
                try:
                    with store_errors_of(result):
                        async with self.budget.hold(self.store.held(file.size)):
                            await self.store.put(path, result.key(file.rel))
                    if progress is not None:
                        progress.advance(file.size)
                except FileNotFoundError:
                    raise PublishError(
                        f"{result.name}: {path} vanished during the upload; retrying once the "
                        "tree is quiet"
                    ) from None
                except OSError as exc:
                    raise PublishError(
                        f"{result.name}: cannot read {path} ({exc.strerror}): fix its permissions",
                        permanent=True,
                    ) from None

        try:
            async with asyncio.TaskGroup() as group:
                for _ in range(min(self.storage.max_concurrency, len(files))):
                    group.create_task(worker())
        except* PublishError as errors:
            raise errors.exceptions[0] from None

    async def _verify(self, result: Result, files: list[LocalFile]) -> None:
        with store_errors_of(result):
            listed = await self.store.sizes(f"{result.remote_path}/")
        wrong = [f for f in files if listed.get(result.key(f.rel)) != f.size]
        if wrong:
            first = wrong[0]
            raise PublishError(
                f"{result.name}: after upload the bucket lacks {len(wrong)} of {len(files)} files "
                f"or holds other sizes (first: {result.key(first.rel)}, "
                f"{first.size} bytes locally, {listed.get(result.key(first.rel))} in the bucket)"
            )

    def _record(self, result: Result, files: list[LocalFile], signed_url: str | None) -> None:
        # Re-read: the server may have added fields while the upload ran.
        latest = self._read_metadata(result)
        metadata.write_atomic(result.metadata, metadata.recorded(latest, result, files, signed_url))


@contextmanager
def store_errors_of(result: Result) -> Iterator[None]:
    """A StoreError becomes this result's PublishError, keeping whether it is permanent."""
    try:
        yield
    except StoreError as exc:
        raise PublishError(f"{result.name}: {exc}", permanent=exc.permanent) from None


@contextmanager
def tree_errors(result: Result) -> Iterator[None]:
    """A tree that cannot be walked becomes this result's PublishError, for a person to fix."""
    try:
        yield
    except FileNotFoundError:
        raise PublishError(
            f"{result.name}: marker {result.marker} has no result folder {result.tree}: "
            "remove the marker or restore the folder",
            permanent=True,
        ) from None
    except OSError as exc:
        raise PublishError(
            f"{result.name}: cannot read {exc.filename or result.tree} ({exc.strerror}): "
            "fix its permissions",
            permanent=True,
        ) from None


def remove_tree(result: Result) -> None:
    """Remove a published tree (delete_local_after_upload). It is first renamed aside, so a
    crash mid-way never leaves a half tree under the result's own name."""
    aside = result.tree.with_name(f".{result.name}.deleting")
    if aside.exists():
        shutil.rmtree(aside)  # left by an earlier crash
    os.rename(result.tree, aside)
    shutil.rmtree(aside)
    logger.info(
        "{}: removed the local tree {} (delete_local_after_upload)", result.name, result.tree
    )
