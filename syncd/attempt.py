"""One attempt at one result, as the daemon and `syncd sync` both make it: see that it is
finished, claim it, upload it, remember the upload, record it, keep its state, and after a
failure say when to try again. A result this daemon recorded whose metadata was written again
without the record (the Earth2Studio server writes its own view) gets the record back from
the state, without uploading again.

An attempt never raises: whatever fails becomes a SyncdError in the outcome (an exception of
an unexpected kind is classified as transient and its traceback logged at DEBUG), so the
worker that made it always goes on with the next result. Retries back off exponentially from
retry_min_delay to retry_max_delay, with jitter so that many results failing together do not
retry together; a failure only a person can fix waits retry_permanent_delay.
"""

from __future__ import annotations

import asyncio
import random
import time
from dataclasses import dataclass

from loguru import logger

from syncd import claims, metadata
from syncd.config import Settings
from syncd.errors import SyncdError, classify
from syncd.layout import Result
from syncd.metadata import Kept, Metadata, Stamp
from syncd.publish import Publisher, Uploaded
from syncd.state import Record, State, StateStore

# Seconds before a metadata file that is being written is read again.
BEING_WRITTEN_RETRY = 1.0


@dataclass(frozen=True)
class Outcome:
    done: bool  # recorded now or before
    stamp: Stamp | None = None  # of the metadata as recorded, when done
    unfinished: str | None = None  # why it is not finished (marker removed, status running)
    held_by: str | None = None  # another daemon is publishing it
    error: SyncdError | None = None
    attempts: int = 0  # failed attempts so far, this one included
    retry_in: float = 0.0  # seconds until the next attempt, after a failure
    uploaded: Uploaded | None = None  # the tree recorded now
    restored: bool = False  # the record was written again, without an upload


class Attempts:
    def __init__(self, settings: Settings, publisher: Publisher, state: StateStore) -> None:
        self.config = settings.syncd
        self.publisher = publisher
        self.state = state

    async def attempt(self, result: Result, force: bool = False) -> Outcome:
        """Publish `result` if it is finished, unless its metadata records it already.
        `force` (syncd sync): publish it whatever its signal and metadata say."""
        try:
            return await self._attempt(result, force)
        except Exception as exc:  # never CancelledError: a stop must stop the attempt
            error = classify(exc)
            if error is not exc:
                logger.opt(exception=exc).debug("{}: where this error came from", result.name)
            return self.failed(result, error)

    async def _attempt(self, result: Result, force: bool) -> Outcome:
        # Cheap checks first, so results recorded long ago cost no claim; a metadata file that
        # cannot be recorded into stops the attempt before anything is uploaded.
        marked = force or result.by_metadata or await asyncio.to_thread(result.marker.exists)
        if not marked:
            return Outcome(done=False, unfinished="its marker was removed")
        document, stamp = await self.publisher.read_metadata(result)
        recorded = metadata.is_recorded(document, result)
        if not force:
            if result.by_metadata and not metadata.completed(document):
                return Outcome(done=False, unfinished=not_completed(document))
            if recorded:
                return self.already(result, document, stamp)
            kept = self.kept(result)
            if kept is not None:
                return self.restored(result, await self.publisher.restore(result, kept), kept)
        claim = await asyncio.to_thread(claims.try_claim, result, self.config.claim_timeout)
        if isinstance(claim, str):
            return Outcome(done=False, held_by=claim)
        heartbeat = asyncio.create_task(self.keep(claim))
        try:
            # Under the claim, look again: another daemon may have recorded it meanwhile.
            document, stamp = await self.publisher.read_metadata(result)
            if metadata.is_recorded(document, result) and not force:
                return self.already(result, document, stamp)
            # Published before (and forced now), or left by a killed daemon: the bucket may
            # hold objects that are not in the tree any more.
            uploaded = await self.upload(result, recorded or claim.took_over)
            if not await asyncio.to_thread(claim.still_ours):
                raise SyncdError("another daemon took over this result; leaving it")
            files = metadata.output_files(result, uploaded.files, uploaded.md5)
            kept = Kept(result.remote_path, files)
            stamp = await self.publisher.record(result, uploaded, kept)
        finally:
            heartbeat.cancel()
            await asyncio.to_thread(claim.release)
        return self.done(result, uploaded, kept, stamp)

    def kept(self, result: Result) -> Kept | None:
        """The record this daemon made for the result, if it made one for this remote_path."""
        text = self.state.kept(result.rel.as_posix())
        if text is None:
            return None
        kept = Kept.loads(text)
        return kept if kept.remote_path == result.remote_path else None

    async def upload(self, result: Result, maybe_left: bool) -> Uploaded:
        rel = result.rel.as_posix()
        previous = self.state.get(rel)
        acknowledged = previous.uploaded if previous is not None else None
        attempts = previous.attempts if previous is not None else 0
        self.state.set(Record(rel, State.UPLOADING, attempts=attempts, uploaded=acknowledged))
        self.state.keep_record(rel, None)  # the bucket is about to change under it
        # Only an attempt that failed or was killed can have left parts or objects behind.
        interrupted = maybe_left or (previous is not None and previous.state != State.DONE)
        uploaded = await self.publisher.upload(result, interrupted, acknowledged)
        if uploaded.sent:
            self.state.remember_upload(rel, uploaded.acknowledgement())
        return uploaded

    def already(self, result: Result, document: Metadata | None, stamp: Stamp | None) -> Outcome:
        """Recorded before (by this daemon before a restart, or by another): the state keeps
        the record, so that it can be restored if the metadata loses it."""
        rel = result.rel.as_posix()
        previous = self.state.get(rel)
        if previous is None or previous.state != State.DONE:
            self.state.set(Record(rel, State.DONE))
        if self.state.kept(rel) is None:
            kept = Kept.of(result, document)
            if kept is not None:
                self.state.keep_record(rel, kept.dumps())
        return Outcome(done=True, stamp=stamp)

    def restored(self, result: Result, stamp: Stamp, kept: Kept) -> Outcome:
        rel = result.rel.as_posix()
        previous = self.state.get(rel)
        files, size = (previous.files, previous.bytes) if previous else (None, None)
        self.state.set(Record(rel, State.DONE, files=files, bytes=size))
        logger.info(
            "{}: its metadata {} was written without syncd's record; restored the record "
            "({} files in {}) without uploading again",
            result.name,
            result.metadata,
            len(kept.output_files),
            result.remote_path,
        )
        return Outcome(done=True, stamp=stamp, restored=True)

    def done(self, result: Result, uploaded: Uploaded, kept: Kept, stamp: Stamp) -> Outcome:
        rel = result.rel.as_posix()
        self.state.set(Record(rel, State.DONE, files=len(uploaded.files), bytes=uploaded.bytes))
        self.state.keep_record(rel, kept.dumps())
        logger.info(
            "{}: uploaded {} files, {} bytes in {:.2f} s ({:.1f} MB/s) to {}; recorded in {}",
            result.name,
            len(uploaded.files),
            uploaded.bytes,
            uploaded.seconds,
            uploaded.mb_per_s,
            result.remote_path,
            result.metadata,
        )
        return Outcome(done=True, stamp=stamp, uploaded=uploaded)

    async def keep(self, claim: claims.Claim) -> None:
        while True:
            await asyncio.sleep(self.config.claim_timeout / 4)
            try:
                await asyncio.to_thread(claim.refresh)
            except Exception as exc:  # a full disk, say: still_ours() decides before recording
                logger.warning("{}: cannot refresh its claim: {}", claim.result.name, classify(exc))

    def failed(self, result: Result, error: SyncdError) -> Outcome:
        """The outcome of a failed attempt, with its backoff; kept in the state if it can be
        (the database failing too is only logged: the retry is not lost with it)."""
        rel = result.rel.as_posix()
        try:
            previous = self.state.get(rel)
        except SyncdError:
            previous = None
        attempts = (previous.attempts if previous else 0) + 1
        if error.code == metadata.BEING_WRITTEN_CODE:
            # Its writer is at it: no backoff, and nothing for the operator to see.
            return Outcome(done=False, error=error, attempts=attempts, retry_in=BEING_WRITTEN_RETRY)
        if error.permanent:
            delay = self.config.retry_permanent_delay
        else:
            ceiling = min(
                self.config.retry_max_delay, self.config.retry_min_delay * 2 ** (attempts - 1)
            )
            delay = random.uniform(ceiling / 2, ceiling)
        record = Record(
            rel,
            State.RETRYING,
            attempts,
            str(error),
            error.permanent,
            time.time() + delay,
            uploaded=previous.uploaded if previous else None,
        )
        try:
            self.state.set(record)
        except SyncdError as exc:
            logger.warning("{}: {}", result.name, exc)
        return Outcome(done=False, error=error, attempts=attempts, retry_in=delay)


def not_completed(document: Metadata | None) -> str:
    """Why a result finished by its metadata is not finished yet."""
    if document is None:
        return "it has no metadata file"
    return f"its metadata says status {document.get('status')!r}"
