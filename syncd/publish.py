"""Publish one result, in two steps the attempt calls: `upload` its tree, then `record` it.

`upload` sends every file of the tree and checks the tree did not change while it was read:
a file is read only if it is still the file that was listed (same inode, size and mtime,
opened without following a symlink), so nothing from outside the tree is ever sent. A PutObject
or CompleteMultipartUpload answered with success is stored, in S3's terms, so the store's
acknowledgements are the proof. After an interrupted or failed attempt, the multipart uploads
and the objects it left that are not in the tree any more are removed first and last, so the
signed prefix serves exactly `output_files`.

`record` signs the URL and rewrites the metadata. With delete_local_after_upload it first lists
the bucket (the local copy is about to be the last one), moves the tree aside, checks that what
was moved is exactly what the bucket holds, records, and only then deletes it.
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import json
import math
import os
import random
import sys
import time
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import Any

from loguru import logger

from syncd import folders, marker, metadata
from syncd.budget import TransferBudget, files_in_flight
from syncd.config import Settings
from syncd.errors import (
    OperatorError,
    SyncdError,
    Throttled,
    TransientError,
    Unanswered,
    first_failure,
    os_error,
    printable,
)
from syncd.layout import Layout, Result
from syncd.objects import headers_for, is_zarr_metadata
from syncd.progress import Progress
from syncd.signing import UrlSigner
from syncd.storage import Body, ObjectStore
from syncd.tree import (
    LocalFile,
    changed,
    delete_aside,
    fingerprint,
    holds_exactly,
    move_aside,
    move_back,
    open_listed,
    recover_aside,
    settled,
    tree_errors,
    tree_files,
)

# Answers that mean this store or these credentials cannot clean up, while uploads may work.
CLEANUP_REFUSED = {"AccessDenied", "NotImplemented", "MethodNotAllowed"}
HASH_READ = 8 * 1024 * 1024  # bytes read at a time to compare a file with what was published
# A file the store refuses for the rate of requests is sent again within the attempt, after a
# pause from PUSHED_BACK_PAUSE doubling to PUSHED_BACK_MAX_PAUSE, this many times.
PUSHED_BACK_TRIES = 10
PUSHED_BACK_PAUSE = 0.25
PUSHED_BACK_MAX_PAUSE = 16.0
# Results whose acknowledged files are remembered after a failed attempt (the last to fail).
REMEMBERED = 256


@dataclass(frozen=True)
class Replaceable:
    """Which record of another place the metadata may hold and still be recorded into: this
    daemon's own earlier one (`own`), or with `force` any."""

    own: str | None = None
    force: bool = False

    def holds(self, remote_path: str) -> bool:
        return self.force or remote_path == self.own


@dataclass(frozen=True)
class Uploaded:
    """A tree the store has acknowledged, file by file."""

    files: list[LocalFile]
    md5: dict[str, str]  # each file's MD5 (hex) by its path in the tree, as it was sent
    bytes: int
    seconds: float
    fingerprint: str  # of the listing: the same tree needs no second upload
    sent: bool  # False when an earlier attempt had uploaded this very tree

    @property
    def mb_per_s(self) -> float:
        return self.bytes / max(self.seconds, 1e-9) / 1e6

    def acknowledgement(self) -> str:
        """What the state keeps of a tree uploaded whole, to record it without sending it
        again."""
        return json.dumps({"fingerprint": self.fingerprint, "md5": self.md5}, separators=(",", ":"))


@dataclass(frozen=True)
class Changes:
    """How a tree differs from what was published of it (paths in the tree)."""

    rewritten: list[str]  # published as immutable, and holding other bytes now
    removed: list[str]  # published, and not in the tree any more
    other: list[str]  # added, or a Zarr metadata document (revalidated) rewritten

    def __bool__(self) -> bool:
        return bool(self.rewritten or self.removed or self.other)

    def refusal(self, result: Result) -> str | None:
        """Why the tree is never published again under its name, if it is not: the published
        files are what readers got, and no re-publish may change or delete one."""
        more = f" and {len(self.rewritten) - 1} more files" if len(self.rewritten) > 1 else ""
        if self.rewritten:
            return (
                f"{printable(self.rewritten[0])}{more} changed since the result was published "
                f"to {result.remote_path}, and readers and CDNs may keep the published bytes for "
                "a year (Cache-Control: immutable), so they are never replaced under the same "
                "name: publish the new tree as a new result (copy the folder to a new exec_* "
                "name)"
            )
        if self.removed:
            more = f" and {len(self.removed) - 1} more files" if len(self.removed) > 1 else ""
            return (
                f"{printable(self.removed[0])}{more} were published to {result.remote_path} and "
                "are not in the tree any more, and syncd never deletes a published file: restore "
                "them, or publish the new tree as a new result (copy the folder to a new exec_* "
                "name)"
            )
        return None


def acknowledged_md5(acknowledgement: str | None, fingerprint: str) -> dict[str, str] | None:
    """The MD5s of an earlier upload of the tree with this fingerprint, if there was one (a
    state file of an older syncd holds a bare fingerprint: sent again)."""
    try:
        earlier = json.loads(acknowledgement or "null")
    except json.JSONDecodeError:
        return None
    if not isinstance(earlier, dict) or earlier.get("fingerprint") != fingerprint:
        return None
    md5 = earlier.get("md5")
    return md5 if isinstance(md5, dict) else None


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
        self.settings = settings
        self.storage = settings.object_storage
        self.store = store
        self.signer = signer  # replaced on a reload
        self.cleanup_warned = False
        self.acknowledged_at = time.monotonic()  # the last file the store acknowledged
        self.deadlines: dict[str, float] = {}  # key -> when its transfer must have ended
        self.uploads: dict[str, Progress] = {}  # rel -> its upload, while it runs
        # result rel -> the files the store acknowledged in an attempt that failed, with their
        # MD5: the next attempt does not send them again while they stay the same.
        self.stored_before: dict[str, dict[LocalFile, str]] = {}
        self.narrowest_said: float = math.inf  # the narrowest window said, while narrowed
        # One bound for every result this publisher uploads.
        self.budget = TransferBudget(
            lambda: files_in_flight(self.storage.max_concurrency, settings.syncd.max_bandwidth),
            settings.syncd.upload_buffer,
        )

    async def read_metadata(
        self, result: Result
    ) -> tuple[metadata.Metadata | None, metadata.Stamp | None]:
        return await asyncio.to_thread(metadata.read_stamped, result)

    async def upload(
        self, result: Result, interrupted: bool, acknowledged: str | None = None
    ) -> Uploaded:
        """Upload the tree. `interrupted`: an earlier attempt may have left parts and objects.
        `acknowledged`: what the state kept of a tree an earlier attempt uploaded whole."""
        files = await asyncio.to_thread(self._list_tree, result)
        await asyncio.to_thread(settled, result, files)
        # Taken only now: an attempt that stops before it uploads leaves it for the next.
        stored = self.stored_before.pop(result.rel.as_posix(), {})
        started = time.monotonic()
        total = sum(f.size for f in files)
        done = fingerprint(result, files)
        earlier = acknowledged_md5(acknowledged, done)
        if earlier is not None:
            # The bucket may have lost them since (deleted by hand, a store that drops writes).
            lacking, _ = await self._lacking(result, files)
            if not lacking:
                logger.info("{}: already uploaded by an earlier attempt; recording it", result.name)
                return Uploaded(files, earlier, total, 0.0, done, sent=False)
            logger.warning(
                "{}: the bucket lacks {} of the {} files an earlier attempt uploaded (first: "
                "{}); sending them again",
                result.name,
                len(lacking),
                len(files),
                result.key(lacking[0].rel),
            )
            missing = set(lacking)
            stored |= {f: earlier[f.rel] for f in files if f not in missing and f.rel in earlier}
            interrupted = True
        if not files:
            logger.warning(
                "{}: the result folder is empty; recording it with no files", result.name
            )
        logger.info("{}: uploading {} files, {} bytes", result.name, len(files), total)
        if interrupted:
            await self._abort_unfinished(result, {result.key(f.rel) for f in files})
        stream = sys.stderr if self.show_progress else None
        progress = self.uploads[result.rel.as_posix()] = Progress(
            printable(result.name), len(files), total, stream
        )
        md5 = {f.rel: stored[f] for f in files if f in stored}
        if md5:
            logger.info(
                "{}: {} files the store acknowledged in an earlier attempt are not sent again",
                result.name,
                len(md5),
            )
            progress.advance(sum(f.size for f in files if f.rel in md5), len(md5))
        try:
            # Zarr metadata documents only once every chunk is stored.
            unsent = [f for f in files if f.rel not in md5]
            chunks = [f for f in unsent if not is_zarr_metadata(f.rel)]
            await self._upload(result, chunks, md5, progress)
            documents = [f for f in unsent if is_zarr_metadata(f.rel)]
            await self._upload(result, documents, md5, progress)
            if not await asyncio.to_thread(self._unchanged, result, files):
                raise changed()
        except BaseException:
            self._remember(result, files, md5)
            raise
        finally:
            self.uploads.pop(result.rel.as_posix(), None)
        if interrupted:
            await self._remove_strays(result, files)
        seconds = time.monotonic() - started
        return Uploaded(files, md5, total, seconds, done, sent=True)

    async def record(
        self,
        result: Result,
        uploaded: Uploaded,
        kept: metadata.Kept,
        replaces: str | None = None,
        force: bool = False,
    ) -> metadata.Stamp | None:
        """Sign and write `kept` (the record of `uploaded`) into the metadata; with
        delete_local_after_upload, delete the tree only once the bucket verifiably holds every
        file of it. Returns the metadata's stamp, or None (nothing written, nothing deleted)
        when the metadata meanwhile records another place, unless it is `replaces` (this
        daemon's own earlier record) or `force`."""
        replaceable = Replaceable(replaces, force)
        if not self.settings.syncd.delete_local_after_upload:
            return await asyncio.to_thread(self._record, result, kept, replaceable)
        # A listing costs little on S3, but some servers hash every object to answer it
        # (rclone: ~0.7 s per 500 MB), so it is paid only where it guards the last copy.
        await self._verify(result, uploaded)
        aside = await asyncio.to_thread(move_aside, result, uploaded.files)
        if aside is None:  # a mount point: recorded, and its files stay
            stamp = await asyncio.to_thread(self._record, result, kept, replaceable)
            if stamp is not None:
                logger.warning(
                    "{}: published, but its local tree {} is a mount point and cannot be moved "
                    "aside to be removed: unmount it and remove it by hand "
                    "(delete_local_after_upload)",
                    result.name,
                    result.tree,
                )
            return stamp
        try:
            stamp = await asyncio.to_thread(self._record, result, kept, replaceable)
        except BaseException:
            await asyncio.to_thread(move_back, result, aside)
            raise
        if stamp is None:
            await asyncio.to_thread(move_back, result, aside)
            return None
        await asyncio.to_thread(delete_aside, result, aside)
        return stamp

    async def restore(
        self, result: Result, kept: metadata.Kept, replaces: str | None = None
    ) -> metadata.Stamp | None:
        """Write a record made before into the metadata again, with a fresh signed URL; None
        when the metadata records another place by now (but `replaces`, this daemon's own)."""
        return await asyncio.to_thread(self._record, result, kept, Replaceable(replaces))

    async def changes(self, result: Result, published: list[dict[str, Any]]) -> Changes:
        """How the tree differs from `published` (a record's output_files): every file of the
        same size is read to compare its MD5."""
        return await asyncio.to_thread(self._changes, result, published)

    def _changes(self, result: Result, published: list[dict[str, Any]]) -> Changes:
        before: dict[str, tuple[Any, Any]] = {}
        for entry in published:
            if isinstance(entry, dict) and isinstance(entry.get("path"), str):
                rel = entry["path"].partition("/")[2]
                before[rel] = (entry.get("size"), entry.get("md5"))
        rewritten: list[str] = []
        other: list[str] = []
        for file in self._list_tree(result, say=False):
            size, md5 = before.pop(file.rel, (None, None))
            if size is None:
                other.append(file.rel)
            elif size != file.size or (isinstance(md5, str) and md5 != self._md5(result, file)):
                (other if is_zarr_metadata(file.rel) else rewritten).append(file.rel)
        return Changes(rewritten, sorted(before), other)

    def _md5(self, result: Result, file: LocalFile) -> str:
        digest = hashlib.md5()
        with tree_errors(result), open_listed(result, file) as path, open(path, "rb") as f:
            while piece := f.read(HASH_READ):
                digest.update(piece)
        return digest.hexdigest()

    async def listing(self, result: Result) -> str:
        """The fingerprint of the tree as it is now."""
        files = await asyncio.to_thread(self._list_tree, result, False)
        return fingerprint(result, files)

    def _list_tree(self, result: Result, say: bool = True) -> list[LocalFile]:
        """The tree's files; what is skipped is said when `say` (the upload's listing), not at
        every later comparison with what was published."""
        with tree_errors(result):
            return list(tree_files(result, say))

    def _unchanged(self, result: Result, before: list[LocalFile]) -> bool:
        with tree_errors(result):
            return holds_exactly(result, before)

    async def abort_unfinished(self, result: Result) -> None:
        """Abort every unfinished multipart upload of a result nobody uploads any more."""
        try:
            await self._abort_unfinished(result, set())
        except Exception as exc:  # best effort: a lifecycle rule is the other way
            logger.debug("{}: no multipart clean-up: {}", result.name, exc)

    async def _abort_unfinished(self, result: Result, keys: set[str]) -> None:
        """Abort multipart uploads an interrupted attempt left, but those of `keys` that this
        attempt resumes. Best effort: the seed's IAM policy does not grant listing them, and
        some S3-compatible servers cannot."""
        try:
            aborted = await self.store.abort_uploads(f"{result.remote_path}/", keys)
        except Unanswered:
            raise
        except SyncdError as exc:
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

    def _remember(self, result: Result, files: list[LocalFile], md5: dict[str, str]) -> None:
        """Keep what the store acknowledged of an attempt that failed, for the next one; of the
        REMEMBERED results that failed last (one removed meanwhile is never tried again)."""
        self.stored_before[result.rel.as_posix()] = {f: md5[f.rel] for f in files if f.rel in md5}
        while len(self.stored_before) > REMEMBERED:
            del self.stored_before[next(iter(self.stored_before))]

    async def _remove_strays(self, result: Result, files: list[LocalFile]) -> None:
        """Delete objects under the result's prefix that are not files of the tree (left by an
        attempt on a tree that has changed since), so the signed prefix serves only the
        result."""
        listed = await self.store.sizes(f"{result.remote_path}/")
        wanted = {result.key(f.rel) for f in files}
        strays = sorted(set(listed) - wanted)
        if not strays:
            return
        try:
            await self.store.delete(strays)
        except SyncdError as exc:
            if exc.code not in CLEANUP_REFUSED:
                raise
            raise OperatorError(
                f"the bucket holds {len(strays)} objects under {result.remote_path}/ that are "
                f"not in the tree (first: {strays[0]}) and deleting them was refused: grant "
                "s3:DeleteObject, or delete them"
            ) from None
        logger.info(
            "{}: deleted {} objects an earlier attempt left that are not in the tree",
            result.name,
            len(strays),
        )

    async def _upload(
        self,
        result: Result,
        files: list[LocalFile],
        md5: dict[str, str],
        progress: Progress,
    ) -> None:
        """Upload `files`, putting each one's MD5 into `md5` once the store acknowledged it."""
        pending = iter(files)

        async def worker() -> None:
            # Workers pull from one iterator, so memory does not grow with the file count.
            for file in pending:
                md5[file.rel] = await self._send(result, file)
                self.acknowledged_at = time.monotonic()
                progress.advance(file.size)

        try:
            async with asyncio.TaskGroup() as group:
                # As many workers as files could be in flight; the budget admits them.
                for _ in range(min(self.budget.transfers, len(files))):
                    group.create_task(worker())
        except BaseExceptionGroup as errors:
            raise first_failure(errors) from None

    async def _send(self, result: Result, file: LocalFile) -> str:
        """Upload one file, sent again while the store pushes back (fewer files in flight each
        time, after a pause that grows); returns its MD5 once the store acknowledged it."""
        for refusals in itertools.count(1):
            try:
                async with self.budget.hold(self.store.held(file.size)):
                    with open_listed(result, file) as path:
                        body = Body(path, file.size, changed)
                        await self._put(body, result.key(file.rel), file.rel)
            except SyncdError as exc:
                if not isinstance(exc, Throttled) or refusals > PUSHED_BACK_TRIES:
                    raise
                if self.budget.pushed_back() and self.budget.transfers < self.narrowest_said:
                    # Said at each new low, not at each swing of the window around it.
                    self.narrowest_said = self.budget.transfers
                    logger.info(
                        "{}: the store pushes back (SlowDown): at most {} in flight now",
                        result.name,
                        file_count(self.budget.transfers),
                    )
                pause = min(PUSHED_BACK_PAUSE * 2**refusals, PUSHED_BACK_MAX_PAUSE)
                await asyncio.sleep(random.uniform(pause / 2, pause))
                continue
            if self.budget.acknowledged():
                self.narrowest_said = math.inf
                logger.info(
                    "the store takes requests again: up to {} in flight",
                    file_count(self.budget.transfers),
                )
            return body.hexdigest()
        raise AssertionError("unreachable")

    async def _put(self, body: Body, key: str, rel: str) -> None:
        """One file, within a deadline the client's own timeouts should never reach: a
        transfer that hangs anyway becomes a transient failure instead of a stuck worker."""
        limit = self.store.deadline(body.size)
        self.deadlines[key] = time.monotonic() + limit
        try:
            async with asyncio.timeout(limit):
                await self.store.put(body, key, headers_for(rel))
        except TimeoutError:
            raise TransientError(
                f"upload of {key} did not end within {limit:.0f} s, past every timeout and retry "
                "of its requests: the store takes them but does not answer"
            ) from None
        finally:
            del self.deadlines[key]

    def busy_until(self) -> float:
        """When the slowest transfer in flight must have ended (0 if none is)."""
        return max(self.deadlines.values(), default=0.0)

    async def _lacking(
        self, result: Result, files: list[LocalFile]
    ) -> tuple[list[LocalFile], dict[str, int]]:
        """The files the bucket lacks or holds with another size, and its listing."""
        listed = await self.store.sizes(f"{result.remote_path}/")
        return [f for f in files if listed.get(result.key(f.rel)) != f.size], listed

    async def _verify(self, result: Result, uploaded: Uploaded) -> None:
        files = uploaded.files
        wrong, listed = await self._lacking(result, files)
        if wrong:
            # The files it lists are not sent again: only those it lacks.
            lacking = set(wrong)
            self._remember(result, [f for f in files if f not in lacking], uploaded.md5)
            first = wrong[0]
            there = listed.get(result.key(first.rel))
            raise TransientError(
                f"after upload the bucket lacks {len(wrong)} of {len(files)} files "
                f"or holds other sizes (first: {result.key(first.rel)}, "
                f"{first.size} bytes locally, "
                f"{'absent from the bucket' if there is None else f'{there} in the bucket'}); "
                "the local tree is kept and they are sent again; if this repeats, the store "
                "does not keep what it acknowledges: check it"
            )

    def _record(
        self, result: Result, kept: metadata.Kept, replaceable: Replaceable
    ) -> metadata.Stamp | None:
        signed_url = (
            self.signer.sign(result.remote_path, self.storage.signed_url_expires_in)
            if self.signer
            else None
        )
        # Re-read: the server may have added fields while the upload ran, and another daemon
        # may have recorded the result for its own prefix (never overwritten, or two daemons
        # would take turns at the file).
        latest = metadata.read(result)
        elsewhere = metadata.recorded_elsewhere(latest, result)
        if elsewhere is not None and not replaceable.holds(elsewhere):
            return None
        return metadata.write_atomic(
            result, metadata.recorded(latest, result, kept.output_files, signed_url)
        )


def file_count(count: int) -> str:
    return f"{count} file{'' if count == 1 else 's'}"


def recover_leftovers(layout: Layout, deleting: bool) -> None:
    """What a killed daemon left in the folders of outputs_dir: metadata temp files are
    removed, trees moved aside for deletion are deleted or put back (`recover_aside`)."""
    places = {layout.outputs_dir, *layout.workflow_dirs(), *layout.metadata_folders()}
    for place in sorted(places):
        try:
            with folders.opened(layout.outputs_dir, place) as folder:
                with os.scandir(folder) as listing:
                    entries = [(e.name, e.is_file(follow_symlinks=False)) for e in listing]
                for name, is_file in entries:
                    if name.startswith(".") and name.endswith(marker.TEMP_SUFFIX) and is_file:
                        try:
                            os.unlink(name, dir_fd=folder)
                        except OSError as exc:
                            logger.warning(
                                "cannot clean up {}: {}", place / name, os_error(exc, "removing")
                            )
                            continue
                        logger.info("removed {} that a stopped daemon left", place / name)
        except (OSError, SyncdError):
            continue  # a folder not made yet, or not syncd's to clean
        for name, _ in entries:
            if marker.is_aside(name):
                rel = PurePosixPath(place.relative_to(layout.outputs_dir).as_posix())
                result = layout.result(rel / name[1 : -len(marker.DELETING)])
                try:
                    recorded = metadata.is_recorded(metadata.read(result), result)
                except SyncdError:
                    recorded = False
                try:
                    recover_aside(result, recorded, deleting)
                except OSError as exc:
                    logger.warning(
                        "cannot clean up {}: {}", place / name, os_error(exc, "recovering")
                    )
