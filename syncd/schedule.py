"""When each result is tried: the one queue to the workers, the timers, and the journal's next
tries.

Results go through one queue to `parallel_results` workers. A result is queued at most once at a
time. A failed result is offered again when the journal's next try is due (the attempt set it,
with backoff); a start makes every one due at once. A fresh event for a waiting result (its
marker dropped again, its metadata rewritten, its folder appearing after the signal) tries it at
once; a result whose metadata is being written is read again by a timer here, not by the
journal. A result the journal waits for that has lost its signal is abandoned.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections.abc import Awaitable
from pathlib import PurePosixPath
from typing import TypeVar

from loguru import logger

from syncd.attempt import Attempts
from syncd.chores import Chores
from syncd.errors import SyncdError
from syncd.journal import Journal, State, clock
from syncd.layout import Layout, Result
from syncd.metadata import Stamp

T = TypeVar("T")


async def ask(question: Awaitable[T], otherwise: T) -> T:
    """The journal's answer, or `otherwise` when it cannot say: a locked or broken
    database is reported where a failure is journalled, not at every look."""
    try:
        return await question
    except SyncdError:
        return otherwise


class Scheduler:
    def __init__(
        self,
        layout: Layout,
        journal: Journal,
        attempts: Attempts,
        chores: Chores,
        stopping: asyncio.Event,
    ) -> None:
        self.layout = layout
        self.journal = journal
        self.attempts = attempts
        self.chores = chores
        self.stopping = stopping  # set: nothing more is queued
        self.queue: asyncio.Queue[Result] = asyncio.Queue()
        self.queued: set[str] = set()  # waiting in the queue or in progress
        # Offered again after a moment, by a timer here rather than by the journal's next try.
        self.later: set[str] = set()
        # Retries are due by the journal's next_try; those up to this time were offered.
        self.retried_until = 0.0
        self.retries_changed = asyncio.Event()
        # Finished and not yet recorded: when each was finished (its signal's mtime).
        self.since: dict[str, float] = {}

    async def retry_when_due(self) -> None:
        """Offer each failed result again when the journal says its next try is due."""
        while True:
            self.retries_changed.clear()
            now = clock()
            try:
                due = await self.journal.due(self.retried_until, now)
            except SyncdError as exc:  # the rescan finds the results meanwhile
                logger.warning("cannot read the retries due: {}", exc)
                due = []
            self.retried_until = now
            for rel in due:
                await self.offer(self.layout.result(PurePosixPath(rel)))
            first = (await self.retries_after(now))[1]
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(None if first is None else first - now):
                    await self.retries_changed.wait()

    async def retries_after(self, now: float) -> tuple[int, float | None]:
        nothing: tuple[int, float | None] = (0, None)
        return await ask(self.journal.retries_after(now), nothing)

    async def stamp(self, rel: str) -> Stamp | None:
        """The stamp of a recorded result's metadata as the journal keeps it; None if the
        result is not a recorded, watched one (or the journal cannot say)."""
        return await ask(self.journal.stamp(rel), None)

    async def next_try(self, rel: str) -> float | None:
        """When a result that waits for its next try gets it (being written: its timer offers
        it; failed: the journal's time); None when it does not wait."""
        if rel in self.later:
            return math.inf
        entry = await ask(self.journal.get(rel), None)  # unknown: tried, not lost
        if entry is None or entry.state != State.RETRYING:
            return None
        return entry.next_try or 0.0

    async def offer(self, result: Result, fresh: bool = False) -> None:
        """Queue `result`, unless it is queued or recorded; one that waits for its next try
        only when `fresh` (an event for it: tried now)."""
        rel = result.rel.as_posix()
        if self.unwanted(rel) or await self.stamp(rel) is not None:
            return
        if not fresh and (await self.next_try(rel) or 0.0) > clock():
            return
        if self.unwanted(rel):  # queued, or a stop, while the journal answered
            return
        self.later.discard(rel)
        if rel not in self.since:
            self.since[rel] = finished_at(result)
        self.queued.add(rel)
        self.queue.put_nowait(result)

    def offer_later(self, result: Result, delay: float) -> None:
        """Offer `result` again in `delay` seconds, by a timer: its writer is at it (no backoff,
        no journal: not a failure), or the journal could not keep its next try."""
        rel = result.rel.as_posix()

        def again() -> None:
            if rel in self.later:
                self.later.discard(rel)
                if not self.stopping.is_set():
                    self.chores.start(self.offer(result, fresh=True))

        self.later.add(rel)
        asyncio.get_running_loop().call_later(delay, again)

    def abandon(self, result: Result) -> None:
        """A result the journal waits for has lost its signal: forgotten, and what an attempt
        of it left in the bucket unfinished is aborted."""
        self.since.pop(result.rel.as_posix(), None)
        self.chores.start(self.attempts.abandon(result))

    async def next(self) -> Result:
        """The next result to try, once there is one."""
        return await self.queue.get()

    def ended(self, result: Result) -> None:
        """Its attempt ended: it may be queued again."""
        self.queued.discard(result.rel.as_posix())

    def unwanted(self, rel: str) -> bool:
        """Not to be queued now: queued already, or syncd is stopping."""
        return rel in self.queued or self.stopping.is_set()

    def in_hand(self, rel: str) -> bool:
        """Queued, being tried, or read again shortly."""
        return rel in self.queued or rel in self.later

    def is_queued(self, rel: str) -> bool:
        """Queued or being tried."""
        return rel in self.queued

    def settled(self, rel: str) -> None:
        """It waits to be published no more (recorded, unfinished, left alone, forgotten)."""
        self.since.pop(rel, None)

    def oldest(self) -> float | None:
        """When the oldest result still waiting to be published was finished."""
        return min(self.since.values(), default=None)

    async def failing(self) -> int:
        """Failed results waiting for their next try."""
        return (await self.retries_after(self.retried_until))[0]

    def retry_times_changed(self) -> None:
        """The journal's next tries changed (a failure, new retry delays): look at them again."""
        self.retries_changed.set()

    def waiting(self) -> int:
        """Results queued, or read again shortly (metadata being written)."""
        return self.queue.qsize() + len(self.later)

    async def left(self) -> int:
        """Results not yet published that the next start takes up (those in progress aside)."""
        return len(self.queued) + len(self.later) + (await self.retries_after(clock()))[0]


def finished_at(result: Result) -> float:
    """When `result` was finished: its signal's mtime (now, if it cannot be read)."""
    with contextlib.suppress(OSError):
        return result.signal.stat().st_mtime
    return time.time()
