"""One attempt at one result, as the daemon and `syncd sync` both make it, and the one place
that decides its course: see that it is finished, claim it, upload it, remember the upload,
record it, journal its state, say when to try again after a failure, and log what became of
it. `publish` does the work it decides on.

A result this daemon recorded whose metadata was written again without the record (the
Earth2Studio server writes its own view) gets the record back from the journal, without
uploading again.

An attempt never raises: whatever fails becomes a `Failed` outcome, or `Postponed` while its
writer is still at it (an exception of an unexpected kind is classified as transient and its
traceback logged at DEBUG), so the worker that made it always goes on with the next result.
Retries back off exponentially from retry_min_delay to retry_max_delay, with jitter so that
many results failing together do not retry together; a failure only a person can fix is logged
once and waits retry_permanent_delay. When a failed result is tried again is kept in the
journal, which the scheduler reads; a postponed one is looked at again by the scheduler's timer.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import time
from dataclasses import dataclass

from loguru import logger

from syncd import claims, metadata
from syncd.config import Settings
from syncd.errors import BeingWritten, InputError, SyncdError, TransientError, classify
from syncd.journal import Entry, Journal, State, clock
from syncd.layout import Result
from syncd.metadata import Kept, Metadata, Stamp
from syncd.publish import Publisher, Uploaded
from syncd.tree import QUIET


@dataclass(frozen=True)
class Recorded:
    """Its metadata records it: by this attempt, before, or again without an upload."""

    stamp: Stamp | None  # of the metadata as recorded
    uploaded: Uploaded | None = None  # the tree this attempt recorded
    restored: bool = False  # the record was written again from the journal


@dataclass(frozen=True)
class Unfinished:
    """Not finished (yet): its marker was removed, or its metadata does not say completed."""

    why: str


@dataclass(frozen=True)
class Held:
    """Another daemon is publishing it."""

    by: str


@dataclass(frozen=True)
class Elsewhere:
    """Its metadata records another place (`remote_path`): left alone. `ours`: the record
    syncd made under an earlier prefix, which stays (its tree was deleted); its URL is renewed."""

    remote_path: str
    ours: bool = False


@dataclass(frozen=True)
class Postponed:
    """Its writer is still at it (metadata that does not parse yet, files written after its
    signal): looked at again in `retry_in` seconds. Not a failure: no backoff, no journal."""

    why: BeingWritten
    retry_in: float


@dataclass(frozen=True)
class Failed:
    error: SyncdError
    attempts: int  # failed attempts so far, this one included
    retry_in: float  # seconds until the next attempt, as the journal keeps it
    journaled: bool = True  # False: the journal could not keep it (locked, full disk)


Outcome = Recorded | Unfinished | Held | Elsewhere | Postponed | Failed
# The journal's states of a result whose metadata records it.
RECORDED = (State.DONE, State.ELSEWHERE)


class Attempts:
    def __init__(
        self, settings: Settings, publisher: Publisher, journal: Journal, retries: bool = True
    ) -> None:
        """`retries`: a daemon tries a failed result again; `syncd sync` only says why."""
        self.config = settings.syncd
        self.retries = retries
        self.publisher = publisher
        self.journal = journal
        # The permanent error last logged per failing result: logged once, not every retry.
        self.reported: dict[str, str] = {}
        # Failed attempts the journal could not keep (a full or locked state_dir), so that
        # their backoff still grows.
        self.unjournaled: dict[str, int] = {}

    async def attempt(self, result: Result, by_hand: bool = False, again: bool = False) -> Outcome:
        """Publish `result` if it is finished, unless its metadata records it already.
        `by_hand` (syncd sync): publish it whatever its signal says, and over another place's
        record; one recorded here already only if its tree changed since, or `again`
        (--force). Never when files it published were rewritten or removed since."""
        try:
            return await self._attempt(result, by_hand, again)
        except asyncio.CancelledError:  # a stop: the next start (or sync) finishes it
            await self.cut_off(result)
            raise
        except Exception as exc:  # never CancelledError: a stop must stop the attempt
            error = classify(exc)
            if error is not exc:
                logger.opt(exception=exc).debug("{}: where this error came from", result.name)
            return await self.failed(result, error)

    async def _attempt(self, result: Result, by_hand: bool, again: bool) -> Outcome:
        # Cheap checks first, so results recorded long ago cost no claim; a metadata file that
        # cannot be recorded into stops the attempt before anything is uploaded.
        marked = by_hand or result.by_metadata or await asyncio.to_thread(result.marker.is_file)
        if not marked:
            return await self.unfinished(result, "its marker was removed")
        document, stamp = await self.publisher.read_metadata(result)
        recorded = metadata.is_recorded(document, result)
        own = await self.own_record(result)
        if by_hand and recorded and not await self.changed_since(result, document, again):
            return await self.already(result, document, stamp)
        if not by_hand:
            if result.by_metadata and not metadata.completed(document):
                return await self.unfinished(result, not_completed(document))
            here = await self.journal.kept(result.rel.as_posix(), result.remote_path)
            if recorded and not metadata.altered(document, here):
                return await self.already(result, document, stamp)
            elsewhere = foreign(document, result, own)
            if elsewhere is not None:
                return await self.left_alone(result, elsewhere, stamp)
            if here is not None and own is not None:
                # Its record here, written again or altered; or, the prefix back, the one it
                # had here (whether its tree is still there or not: its objects are).
                restored = await self.publisher.restore(result, here, own.remote_path)
                if restored is None:
                    return await self.overtaken(result, own)
                how = (
                    "written with its output_files changed"
                    if recorded
                    else "removed while its marker stays"
                    if document is None
                    else None
                )
                return await self.restored(result, restored, here, own, how)
            if own is not None and self.tree_gone(result, document, own):
                return await self.stays(result, own, stamp)
            if await self.record_dropped_lately(result, stamp):
                # Its owner restores it within seconds, if it is still there to do it.
                return Held("the daemon whose record its metadata held")
        claim = await asyncio.to_thread(claims.try_claim, result, self.config.claim_timeout)
        if isinstance(claim, str):
            logger.debug("{}: being published by {}", result.name, claim)
            return Held(claim)  # a rescan looks again; a dead owner's claim expires
        heartbeat = asyncio.create_task(self.heartbeat(claim))
        try:
            # Under the claim, look again: another daemon may have recorded it meanwhile.
            document, stamp = await self.publisher.read_metadata(result)
            if not by_hand:
                if metadata.is_recorded(document, result):
                    return await self.already(result, document, stamp)
                elsewhere = foreign(document, result, own)
                if elsewhere is not None:
                    return await self.left_alone(result, elsewhere, stamp)
            uploaded = await self.upload(result, published_before=recorded, claim=claim)
            if not await asyncio.to_thread(claim.still_ours):
                raise TransientError("another daemon took over this result; leaving it")
            files = metadata.output_files(result, uploaded.files, uploaded.md5)
            kept = Kept(result.remote_path, files)
            replaces = own.remote_path if own is not None else None
            written = await self.publisher.record(result, uploaded, kept, replaces, by_hand)
        finally:
            heartbeat.cancel()
            await asyncio.to_thread(claim.release)
        if written is None:
            return await self.overtaken(result, own)
        return await self.done(result, uploaded, kept, written)

    async def changed_since(self, result: Result, document: Metadata | None, again: bool) -> bool:
        """Whether a result recorded here is to be published again by hand: when its tree
        changed since, or `again`. Published files rewritten (a reader must never get old cached
        chunks under new Zarr metadata) or removed (never deleted from the bucket) refuse it."""
        kept = Kept.of(result, document)
        if kept is None:
            return True
        changes = await self.publisher.changes(result, kept.output_files)
        refusal = changes.refusal(result)
        if refusal is not None:
            raise InputError(refusal)
        if not changes and not again:
            logger.info(
                "{}: already published to {} and unchanged since; nothing sent (`syncd sync "
                "--force` sends it again)",
                result.name,
                result.remote_path,
            )
            return False
        return True

    async def look_back(self, result: Result, uploaded: Uploaded) -> None:
        """QUIET seconds after a result was published, a look at its tree: files its writer
        added or changed after the marker said it was finished are said (a marker dropped too
        early), never silently left out."""
        await asyncio.sleep(QUIET)
        try:
            now = await self.publisher.listing(result)
        except Exception:
            return  # gone (delete_local_after_upload), or unreadable: nothing to compare
        if now != uploaded.fingerprint:
            await self.recheck(result, "written to after it was published")

    async def recheck(self, result: Result, what: str = "marked again") -> None:
        """A new marker on a recorded result, or its tree written after it was published:
        say whether its tree changed since it was published; it is never published again by
        itself (the bucket keeps what readers got)."""
        if not os.path.lexists(result.tree):
            return  # deleted after publishing (delete_local_after_upload): nothing to compare
        try:
            document, _ = await self.publisher.read_metadata(result)
            kept = Kept.of(result, document)
            if kept is None:
                return
            changes = await self.publisher.changes(result, kept.output_files)
        except Exception as exc:
            logger.warning(
                "{}: cannot compare its tree with what was published: {}",
                result.name,
                classify(exc),
            )
            return
        refusal = changes.refusal(result)
        if refusal is not None:
            logger.warning("{}: {}, but {}; it stays as published", result.name, what, refusal)
        elif changes:
            logger.warning(
                "{}: {}, and {} files were added or rewritten (Zarr metadata) since it was "
                "published to {}; it stays as published: `syncd sync {}` publishes the change",
                result.name,
                what,
                len(changes.other),
                result.remote_path,
                result.tree,
            )
        else:
            logger.info("{}: {}; already published and unchanged", result.name, what)

    async def cut_off(self, result: Result) -> None:
        """An attempt stopped in the middle: the journal says pending, not uploading, so that
        syncd status does not show an upload nobody is making."""
        rel = result.rel.as_posix()
        with contextlib.suppress(SyncdError):
            previous = await self.journal.get(rel)
            if previous is not None and previous.state == State.UPLOADING:
                if await self.nobody_takes_it_up(result):
                    short = f"syncd sync interrupted, no {result.signal_name}"
                    await self.journal.forgotten(rel, short)
                else:
                    await self.journal.pending(previous)

    async def nobody_takes_it_up(self, result: Result) -> bool:
        """Whether no daemon tries `result` after this process: a `syncd sync` of a result with
        no signal. Journalled pending or retrying, a daemon would take its missing signal for
        one removed, forget it and abort the upload `syncd sync` run again resumes."""
        return not self.retries and not await asyncio.to_thread(os.path.isfile, result.signal)

    async def own_record(self, result: Result) -> Kept | None:
        """The record this daemon made for the result, for whatever remote_path it had then."""
        return await self.journal.kept(result.rel.as_posix())

    async def upload(self, result: Result, published_before: bool, claim: claims.Claim) -> Uploaded:
        rel = result.rel.as_posix()
        previous = await self.journal.get(rel)
        acknowledged = previous.uploaded if previous is not None else None
        attempts = previous.attempts if previous is not None else 0
        await self.journal.uploading(rel, attempts, acknowledged)
        if await self.journal.kept(rel, result.remote_path) is not None:
            await self.journal.drop_kept(rel, result.remote_path)  # the bucket is to change
        # (A record under another prefix stays: nothing under it changes, and it is restored
        # if the prefix comes back.)
        # The bucket may hold parts or objects that are not in the tree any more after a
        # publish (forced again now), after a failed or killed attempt of this host (the
        # journal says so), or of any daemon that died holding the claim (the claim says so).
        interrupted = (
            published_before
            or claim.took_over
            or (previous is not None and previous.state != State.DONE)
        )
        uploaded = await self.publisher.upload(result, interrupted, acknowledged)
        if uploaded.sent:
            await self.journal.remember_upload(rel, uploaded.acknowledgement())
        return uploaded

    async def already(
        self, result: Result, document: Metadata | None, stamp: Stamp | None
    ) -> Outcome:
        """Recorded before (by this daemon before a restart, or by another): the journal keeps
        the record, so that it can be restored if the metadata loses it."""
        rel = result.rel.as_posix()
        previous = await self.journal.get(rel)
        if previous is None or previous.state != State.DONE:
            await self.journal.done(rel)
        if await self.journal.stamp(rel) != stamp:
            await self.journal.set_stamp(rel, stamp)
        if await self.journal.kept(rel, result.remote_path) is None:
            kept = Kept.of(result, document)
            if kept is not None:
                await self.journal.set_kept(rel, kept)
        self.reported.pop(rel, None)
        return Recorded(stamp)

    async def record_dropped_lately(self, result: Result, stamp: Stamp | None) -> bool:
        """Whether the metadata held another place's record until someone wrote it again
        less than claim_timeout ago (the server writing its own view, say)."""
        previous = await self.previous(result.rel.as_posix())
        if previous is None or previous.state != State.ELSEWHERE or stamp is None:
            return False
        return time.time() - stamp[2] / 1e9 < self.config.claim_timeout

    async def overtaken(self, result: Result, own: Kept | None) -> Outcome:
        """Another place's record came into the metadata while this attempt worked."""
        document, stamp = await self.publisher.read_metadata(result)
        elsewhere = foreign(document, result, own)
        if elsewhere is None:  # gone again meanwhile: the change is looked at anew
            raise TransientError("its metadata changed while it was recorded; trying again")
        return await self.left_alone(result, elsewhere, stamp)

    def tree_gone(self, result: Result, document: Metadata | None, own: Kept) -> bool:
        """Whether the metadata holds this daemon's record under an earlier prefix for a tree
        delete_local_after_upload removed: it cannot be published anew, and stays."""
        return (
            own.remote_path != result.remote_path
            and metadata.recorded_elsewhere(document, result) == own.remote_path
            and not os.path.lexists(result.tree)
        )

    async def stays(self, result: Result, own: Kept, stamp: Stamp | None) -> Outcome:
        """Recorded under an earlier prefix, its local tree deleted since: its objects are
        there and its record points at them; said once."""
        message = (
            f"its metadata records {own.remote_path}, where syncd published it under its earlier "
            "prefix; its local tree was deleted (delete_local_after_upload), so it stays there, "
            f"not at {result.remote_path}"
        )
        return await self.elsewhere(result, own.remote_path, message, stamp, "INFO", ours=True)

    async def left_alone(self, result: Result, elsewhere: str, stamp: Stamp | None) -> Outcome:
        """Its metadata records another place: another syncd's prefix (two daemons on one
        outputs dir), the server's own upload, or another result sharing the file. Never
        overwritten, so two daemons never take turns at one file; said once."""
        remedy = (
            f"`syncd sync {result.tree}` publishes it to {result.remote_path}"
            if os.path.lexists(result.tree)
            else "its local tree is gone, so it cannot be published here"
        )
        message = (
            f"its metadata {result.metadata} records {elsewhere}, not {result.remote_path} "
            "(another syncd's prefix, the server's own upload, or another result's "
            f"file); left as it is: {remedy}"
        )
        return await self.elsewhere(result, elsewhere, message, stamp, "WARNING")

    async def elsewhere(
        self,
        result: Result,
        remote_path: str,
        message: str,
        stamp: Stamp | None,
        level: str,
        ours: bool = False,
    ) -> Outcome:
        """Journal and say (once) that the result is recorded at another place."""
        rel = result.rel.as_posix()
        previous = await self.journal.get(rel)
        said = previous is not None and (previous.state, previous.last_error) == (
            State.ELSEWHERE,
            message,
        )
        if not said and self.reported.get(rel) != message:
            logger.log(level, "{}: {}", result.name, message)
        self.reported[rel] = message
        await self.journal.elsewhere(rel, message)
        await self.journal.set_stamp(rel, stamp)
        return Elsewhere(remote_path, ours)

    async def restored(
        self, result: Result, stamp: Stamp, kept: Kept, own: Kept, how: str | None = None
    ) -> Outcome:
        """`kept` written into the metadata again: it had lost or altered it (`how` it was
        written, if not simply without it), or it held `own`, the record syncd made under
        another prefix, the latest no more."""
        rel = result.rel.as_posix()
        previous = await self.journal.get(rel)
        files, size = (previous.files, previous.bytes) if previous else (None, None)
        await self.journal.done(rel, files, size)
        await self.journal.set_stamp(rel, stamp)
        self.reported.pop(rel, None)
        if own.remote_path != kept.remote_path:
            await self.journal.set_kept(rel, kept)
            logger.info(
                "{}: its metadata recorded {}, where syncd published it under another prefix; "
                "restored the record it made under this prefix ({} files in {}) without "
                "uploading again",
                result.name,
                own.remote_path,
                len(kept.output_files),
                result.remote_path,
            )
            return Recorded(stamp, restored=True)
        logger.info(
            "{}: its metadata {} was {}; restored the record ({} files in {}) without uploading "
            "again",
            result.name,
            result.metadata,
            how or "written without syncd's record",
            len(kept.output_files),
            result.remote_path,
        )
        return Recorded(stamp, restored=True)

    async def done(self, result: Result, uploaded: Uploaded, kept: Kept, stamp: Stamp) -> Outcome:
        rel = result.rel.as_posix()
        await self.journal.done(rel, len(uploaded.files), uploaded.bytes)
        await self.journal.set_stamp(rel, stamp)
        await self.journal.set_kept(rel, kept)
        self.reported.pop(rel, None)
        self.unjournaled.pop(rel, None)
        if not uploaded.sent:
            logger.info(
                "{}: {} files, {} bytes uploaded to {} by an earlier attempt; recorded in {}",
                result.name,
                len(uploaded.files),
                uploaded.bytes,
                result.remote_path,
                result.metadata,
            )
            return Recorded(stamp, uploaded=uploaded)
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
        return Recorded(stamp, uploaded=uploaded)

    async def heartbeat(self, claim: claims.Claim) -> None:
        while True:
            await asyncio.sleep(self.config.claim_timeout / 4)
            try:
                await asyncio.to_thread(claim.refresh)
            except Exception as exc:  # a full disk, say: still_ours() decides before recording
                logger.warning("{}: cannot refresh its claim: {}", claim.result.name, classify(exc))

    async def failed(self, result: Result, error: SyncdError) -> Failed | Postponed:
        """The outcome of a failed attempt, with its backoff, journalled and logged (the
        journal failing too is only logged: the next rescan tries the result again)."""
        rel = result.rel.as_posix()
        previous = await self.previous(rel)
        attempts = max(previous.attempts if previous else 0, self.unjournaled.get(rel, 0)) + 1
        if isinstance(error, BeingWritten) and self.retries:
            # Its writer is at it: no backoff, no journal, nothing for the operator to see.
            logger.debug("{}: {} (attempt {})", result.name, error, attempts)
            return Postponed(error, error.retry_in)
        if not self.retries and previous is not None and previous.state in RECORDED:
            # `syncd sync` refused a result published already: it stays as it was published.
            self.say(result, error, attempts, 0.0)
            return Failed(error, attempts, 0.0, journaled=False)
        if await self.nobody_takes_it_up(result):
            self.say(result, error, attempts, 0.0)
            try:
                why = f"syncd sync failed, no {result.signal_name}: {error}"
                await self.journal.forgotten(rel, why, error.permanent)
            except SyncdError as exc:
                logger.warning("{}: {}", result.name, exc)
                return Failed(error, attempts, 0.0, journaled=False)
            return Failed(error, attempts, 0.0)
        delay = self.backoff(error, attempts)
        self.say(result, error, attempts, delay)
        uploaded = previous.uploaded if previous else None
        try:
            await self.journal.retrying(rel, attempts, error, clock() + delay, uploaded)
        except SyncdError as exc:
            if str(exc) != str(error):  # else said just now, as the attempt's own failure
                logger.warning("{}: {}", result.name, exc)
            self.unjournaled[rel] = attempts
            return Failed(error, attempts, delay, journaled=False)
        self.unjournaled.pop(rel, None)
        return Failed(error, attempts, delay)

    async def previous(self, rel: str) -> Entry | None:
        """The journal's record of `rel`, or None when there is none or the journal cannot
        say (a failure is still reported and retried without it)."""
        try:
            return await self.journal.get(rel)
        except SyncdError:
            return None

    def backoff(self, error: SyncdError, attempts: int) -> float:
        """Seconds until the next try after `attempts` failed ones."""
        if error.permanent:
            return self.config.retry_permanent_delay
        ceiling = min(
            self.config.retry_max_delay, self.config.retry_min_delay * 2 ** (attempts - 1)
        )
        return random.uniform(ceiling / 2, ceiling)

    def say(self, result: Result, error: SyncdError, attempts: int, delay: float) -> None:
        """Log a failure: `syncd sync` says it once; a daemon says a transient one at every
        retry, and one only a person can fix once until it changes."""
        message = f"{result.name}: {error}"
        rel = result.rel.as_posix()
        if not self.retries:
            logger.error("{}", message)
        elif not error.permanent:
            logger.warning("{} (attempt {}; retrying in {:.1f} s)", message, attempts, delay)
        elif self.reported.get(rel) != message:
            logger.error("{} (retrying every {:.0f} s)", message, delay)
            self.reported[rel] = message

    async def unfinished(self, result: Result, why: str) -> Unfinished:
        """Not finished: forgotten if it was tried before (its marker was removed since), else
        left quietly until its signal comes (status running)."""
        previous = await self.previous(result.rel.as_posix())
        if previous is not None and previous.state in (State.RETRYING, State.PENDING):
            await self.forget(result, why)
        else:
            logger.debug("{}: not finished: {}", result.name, why)
        return Unfinished(why)

    async def abandon(self, result: Result) -> None:
        """Its signal went while syncd was down: forgotten, and the multipart uploads an
        attempt of it left unfinished are aborted, under a claim so that nobody who publishes
        it by hand right now loses them."""
        name = result.signal_name
        await self.forget(result, f"its {name} was removed", short=f"{name} removed")
        try:
            claim = await asyncio.to_thread(claims.try_claim, result, self.config.claim_timeout)
        except SyncdError:
            return
        if isinstance(claim, str):
            return
        try:
            await self.publisher.abort_unfinished(result)
        finally:
            await asyncio.to_thread(claim.release)

    async def forget(self, result: Result, why: str, short: str | None = None) -> None:
        """Its signal is gone: nothing more is done for it until one comes again. `short`: the
        reason as `syncd status` shows it."""
        rel = result.rel.as_posix()
        self.reported.pop(rel, None)
        logger.info("{}: {}; forgotten", result.name, why)
        try:
            await self.journal.forgotten(rel, short or why)
        except SyncdError as exc:
            logger.warning("{}: {}", result.name, exc)


def foreign(document: Metadata | None, result: Result, own: Kept | None) -> str | None:
    """The remote_path of another place's record in the metadata, which is left alone; a record
    this daemon made itself before its prefix changed (`own`) is not one: it is published anew
    under the prefix of now."""
    elsewhere = metadata.recorded_elsewhere(document, result)
    if elsewhere is None or (own is not None and own.remote_path == elsewhere):
        return None
    return elsewhere


def not_completed(document: Metadata | None) -> str:
    """Why a result finished by its metadata is not finished yet."""
    if document is None:
        return "it has no metadata file"
    return f"its metadata says status {document.get('status')!r}"
