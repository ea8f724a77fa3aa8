"""Finding results: the watcher's events, the start-up scan and the rescans, and what each
means for a result (offered, tried at once, forgotten, looked at again).

A result is finished when its marker exists, or (completion by metadata) when its metadata
says so. A fresh event for a waiting result (its marker dropped again, its metadata rewritten,
its folder appearing after the signal) tries it at once; a removed signal forgets it. The
watcher's events come as one stream, heard one after the other in the order the watcher saw
them; a loss of events (or a new workflow folder) starts a rescan.

A recorded result is watched through the stamp of its metadata, which the journal keeps (in
memory it costs nothing but, with signed URLs, its next renewal time): when the metadata
changes (an event, or a stat at each rescan) the result is tried again, and a record someone
else's write removed is restored; when the metadata is deleted it is watched no more.
"""

from __future__ import annotations

import asyncio
from pathlib import Path, PurePosixPath

from loguru import logger

from syncd import metadata
from syncd.attempt import Attempts
from syncd.chores import Chores
from syncd.config import DaemonSettings
from syncd.errors import SyncdError, classify
from syncd.journal import Journal
from syncd.layout import Layout, Result
from syncd.metadata import Stamp
from syncd.metrics import Metrics
from syncd.resign import Resigner
from syncd.schedule import Scheduler, ask
from syncd.watch import EventsLost, FileChanged, FileGone, FolderAppeared, WatchEvent


class Finder:
    def __init__(
        self,
        config: DaemonSettings,
        layout: Layout,
        journal: Journal,
        attempts: Attempts,
        scheduler: Scheduler,
        chores: Chores,
        resigner: Resigner | None,
        metrics: Metrics,
        stopping: asyncio.Event,
    ) -> None:
        self.config = config
        self.layout = layout
        self.journal = journal
        self.attempts = attempts
        self.scheduler = scheduler
        self.chores = chores
        self.resigner = resigner
        self.metrics = metrics
        self.stopping = stopping
        self.rechecking: set[str] = set()  # recorded results being looked at again
        self.events: asyncio.Queue[WatchEvent | None] = asyncio.Queue()
        # Files heard changing while their result was queued or tried: heard again after.
        self.meanwhile: dict[str, set[Path]] = {}

    def tell(self, event: WatchEvent | None) -> None:
        """Queue one of the watcher's events (None: there are no more)."""
        self.events.put_nowait(event)

    async def listen(self) -> None:
        """Hear the watcher's events one after the other, in the order it saw them, until None
        (told after the watcher stopped, so those it told before are heard too). One that
        fails is logged, and the next is heard."""
        while (event := await self.events.get()) is not None:
            try:
                await self.hear(event)
            except Exception as exc:
                logger.opt(exception=exc).debug("where this error came from")
                logger.error(
                    "cannot act on the watcher's {}: {}; the next rescan looks again",
                    event,
                    classify(exc),
                )

    async def hear(self, event: WatchEvent) -> None:
        match event:
            case FileChanged(path):
                await self.file_changed(path)
            case FileGone(path):
                await self.file_gone(path)
            case FolderAppeared():
                self.start_scan()
            case EventsLost(why):
                self.events_lost(why)

    async def rescan_every(self) -> None:
        while True:  # the first pass is the start-up scan
            await self.scan()
            await asyncio.sleep(self.config.rescan_interval)

    def events_lost(self, why: str) -> None:
        self.metrics.rescans.inc()
        logger.warning("{}: events may have been lost; rescanning {}", why, self.layout.outputs_dir)
        self.start_scan()

    def start_scan(self) -> None:
        if not self.stopping.is_set():
            self.chores.start(self.scan())

    def recheck(self, result: Result, what: str = "marked again") -> None:
        """A recorded result marked again, or its metadata written again without its record:
        say whether its tree changed since (once at a time)."""
        rel = result.rel.as_posix()
        if rel not in self.rechecking and not self.stopping.is_set():
            self.rechecking.add(rel)
            task = self.chores.start(self.attempts.recheck(result, what))
            task.add_done_callback(lambda _: self.rechecking.discard(rel))

    async def scan(self) -> None:
        """Look at every recorded result's metadata, then offer every signalled result that
        is not recorded."""
        try:
            watched = await self.journal.stamps()
        except SyncdError as exc:
            logger.warning("cannot read the recorded results: {}", exc)
            watched = []

        def changed() -> list[tuple[str, Stamp, Stamp | None]]:
            # One Result at a time: a year of results must not be held at once.
            found = []
            for rel, known in watched:
                now = metadata.stamp(self.layout.result(PurePosixPath(rel)))
                if now != known:
                    found.append((rel, known, now))
            return found

        try:
            for rel, known, now in await asyncio.to_thread(changed):
                await self.metadata_changed(self.layout.result(PurePosixPath(rel)), known, now)
        except Exception as exc:
            logger.warning("cannot look at recorded results' metadata: {}", classify(exc))
        try:
            signalled = await asyncio.to_thread(lambda: list(self.layout.signalled()))
        except Exception as exc:
            logger.warning("cannot scan {}: {}", self.layout.outputs_dir, classify(exc))
            return
        recorded = {rel for rel, _ in watched}  # those changed since were offered above
        for result in signalled:
            if result.rel.as_posix() not in recorded:
                await self.scheduler.offer(result)
        here = {result.rel.as_posix() for result in signalled}
        nothing: list[str] = []
        for rel in await ask(self.journal.waiting(), nothing):
            # Its signal went while no event could say so (syncd was down).
            if rel not in here and not self.scheduler.in_hand(rel):
                result = self.layout.result(PurePosixPath(rel))
                if await asyncio.to_thread(result.signal_gone):
                    self.scheduler.abandon(result)

    async def file_changed(self, path: Path) -> None:
        """A file or folder appeared or was written: its result is tried now, even if it
        waits; a recorded result whose metadata changed is looked at again."""
        result = self.layout.for_path(path)
        if result is None:
            return
        rel = result.rel.as_posix()
        if self.scheduler.is_queued(rel):
            # Heard again once its attempt has ended, when the journal says what became of it.
            self.meanwhile.setdefault(rel, set()).add(path)
            return
        try:
            known = await self.scheduler.stamp(rel)
            if known is not None:
                if path == result.metadata:
                    await self.metadata_changed(result, known, metadata.stamp(result))
                elif (
                    path == result.marker and not result.by_metadata and marked_since(result, known)
                ):
                    self.recheck(result)
            elif (
                path == result.signal
                or await self.scheduler.next_try(rel) is not None
                or result.signal.exists()
            ):
                await self.scheduler.offer(result, fresh=True)
        except OSError as exc:  # the next rescan looks again
            logger.debug("{}: cannot look at {}: {}", result.name, path, exc)

    def attempt_ended(self, result: Result) -> None:
        """The files heard changing while the result was queued or tried, heard again."""
        for path in sorted(self.meanwhile.pop(result.rel.as_posix(), ())):
            self.tell(FileChanged(path))

    async def metadata_changed(self, result: Result, known: Stamp, now: Stamp | None) -> None:
        """A recorded result's metadata as it is now: gone (nothing left to care for, unless
        its marker stays), or written by someone else (try it again: its record is restored
        if it was lost)."""
        rel = result.rel.as_posix()
        if now == known:
            return
        try:
            if not await self.journal.drop_stamp(rel, known):
                return  # no longer recorded, or rewritten by syncd since `known`
        except SyncdError as exc:
            logger.warning("{}: {}", result.name, exc)
        if self.resigner is not None:
            self.resigner.forget(rel)
        if now is None and not result.signal.exists():
            logger.debug("{}: its metadata was removed; nothing more to do", result.name)
        else:  # written by someone else, or removed while its marker stays: restored now
            await self.scheduler.offer(result, fresh=True)

    async def file_gone(self, path: Path) -> None:
        result = self.layout.for_path(path)
        if result is None:
            return
        rel = result.rel.as_posix()
        known = await self.scheduler.stamp(rel) if path == result.metadata else None
        if known is not None:
            await self.metadata_changed(result, known, None)
        elif (
            path == result.signal
            and not self.scheduler.is_queued(rel)
            and await self.scheduler.next_try(rel) is not None
            and not self.scheduler.is_queued(rel)  # queued while the journal answered
        ):
            name = result.signal_name
            await self.attempts.forget(result, f"its {name} was removed", short=f"{name} removed")
            self.scheduler.settled(rel)
        elif path == result.metadata and await self.scheduler.next_try(rel) is not None:
            # Metadata that failed it (malformed, say) removed: tried now, as its error says.
            await self.scheduler.offer(result, fresh=True)


def marked_since(result: Result, known: Stamp) -> bool:
    """Whether the result's marker was dropped after its metadata recorded it: marked again,
    not an event of the marking that was published, heard after it (a burst, a rescan). The
    same time counts as after: file times move in clock ticks, and an attempt takes longer."""
    return result.marker.stat().st_mtime_ns >= known[2]
