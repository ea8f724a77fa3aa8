"""The workers: `parallel_results` tasks, each taking the next result from the scheduler's
queue, handing it to `attempt` (which decides, journals and logs) and acting on the typed
outcome.

Workers never die: an attempt turns every failure into its outcome, and the worker loop logs
whatever escapes its own bookkeeping and goes on. At stop, uploads in flight get `stop_grace`
seconds (a second stop signal ends them at once); unfinished results resume on the next start.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

from loguru import logger

from syncd.attempt import (
    Attempts,
    Elsewhere,
    Failed,
    Held,
    Outcome,
    Postponed,
    Recorded,
    Unfinished,
)
from syncd.chores import Chores
from syncd.config import DaemonSettings
from syncd.errors import classify
from syncd.layout import Result
from syncd.metrics import Metrics
from syncd.resign import Resigner
from syncd.schedule import Scheduler


class Workers:
    def __init__(
        self,
        config: DaemonSettings,
        attempts: Attempts,
        scheduler: Scheduler,
        chores: Chores,
        resigner: Resigner | None,
        metrics: Metrics,
        recheck: Callable[[Result, str], None],
        heard_again: Callable[[Result], None],
        stopping: asyncio.Event,
        aborting: asyncio.Event,
    ) -> None:
        self.config = config
        self.attempts = attempts
        self.scheduler = scheduler
        self.chores = chores
        self.resigner = resigner
        self.metrics = metrics
        self.recheck = recheck  # a recorded result written again: has its tree changed?
        self.heard_again = heard_again  # what was heard of a result while it was tried
        self.stopping = stopping
        self.aborting = aborting
        self.busy: set[asyncio.Task[None]] = set()  # the workers in an attempt
        self.progress_at = 0.0  # loop time of the last finished attempt
        self.last_published: tuple[str, float] | None = None

    async def work(self) -> None:
        task = asyncio.current_task()
        assert task is not None
        while not self.stopping.is_set():
            result = await self.scheduler.next()
            self.busy.add(task)
            try:
                self.settle(result, await self.attempts.attempt(result))
            except Exception as exc:  # a bug in the bookkeeping: the worker goes on
                logger.opt(exception=exc).debug("{}: where it came from", result.name)
                logger.error("{}: {}; the next rescan tries it again", result.name, classify(exc))
            finally:
                self.busy.discard(task)
                self.scheduler.ended(result)
                self.heard_again(result)
                self.progress_at = asyncio.get_running_loop().time()

    def settle(self, result: Result, outcome: Outcome) -> None:
        """Act on what became of an attempt (the attempt has logged and journalled it)."""
        rel = result.rel.as_posix()
        match outcome:
            case Recorded():
                if self.resigner is not None:
                    self.resigner.track(rel)
                self.scheduler.settled(rel)
                self.count(result, outcome)
                if outcome.uploaded is not None and outcome.uploaded.sent:
                    self.chores.start(self.attempts.look_back(result, outcome.uploaded))
                if outcome.restored:  # the writer came back (the server saying completed)
                    self.recheck(result, "its metadata was written again")
            case Elsewhere(remote_path, ours):
                if ours and self.resigner is not None:
                    self.resigner.track(rel, remote_path)
                self.scheduler.settled(rel)
            case Unfinished():
                self.scheduler.settled(rel)
            case Held():
                pass  # a rescan looks again; a dead owner's claim expires
            case Postponed():
                self.scheduler.offer_later(result, outcome.retry_in)
            case Failed():
                self.metrics.failures.labels(outcome.error.kind.value).inc()
                if outcome.journaled:
                    self.scheduler.retry_times_changed()
                else:  # the journal could not keep its next try: this timer does
                    self.scheduler.offer_later(result, outcome.retry_in)

    def count(self, result: Result, outcome: Recorded) -> None:
        """A recorded result, in the metrics."""
        if outcome.restored:
            self.metrics.restored.inc()
        uploaded = outcome.uploaded
        if uploaded is None:
            return
        seconds = uploaded.seconds if uploaded.sent else None
        self.metrics.published(len(uploaded.files), uploaded.bytes, seconds)
        self.last_published = (result.name, time.time())

    async def drain(self, workers: list[asyncio.Task[None]]) -> None:
        """Let uploads in flight finish within stop_grace, then cancel what is left."""
        for task in workers:
            if task not in self.busy:
                task.cancel()
        in_flight = [t for t in workers if t in self.busy]
        if in_flight and not self.aborting.is_set():
            logger.info(
                "syncd stopping: waiting up to {:.0f} s for {} results being uploaded",
                self.config.stop_grace,
                len(in_flight),
            )
            finished = asyncio.gather(*in_flight, return_exceptions=True)
            abort = asyncio.create_task(self.aborting.wait())
            either: list[asyncio.Future[Any]] = [finished, abort]
            await asyncio.wait(
                either, timeout=self.config.stop_grace, return_when="FIRST_COMPLETED"
            )
            abort.cancel()
        # Still uploading: their attempts journal them pending. (Idle workers are cancelled
        # but maybe not done yet.)
        cut_off = [t for t in workers if t in self.busy and not t.done()]
        for task in workers:
            task.cancel()
        await asyncio.gather(*workers, return_exceptions=True)
        left = await self.scheduler.left() + len(cut_off)
        logger.info("syncd stopped; {} results left for the next start", left)
