"""The daemon: find marked results (watch, start-up scan, periodic rescan) and publish them.

Results go through one queue to `parallel_results` workers. A result is queued at most once
at a time and published under a claim, so daemons sharing outputs_dir never both record it.
A failure is retried with capped exponential backoff and jitter; one only a person can fix is
logged once and retried slowly. The first SIGTERM stops new work and gives uploads in flight
`stop_grace` seconds; a second SIGTERM or SIGINT stops at once. Unfinished results resume on
the next start.
"""

from __future__ import annotations

import asyncio
import signal
import time
from pathlib import Path

from loguru import logger

from syncd.attempt import Attempts
from syncd.config import Settings
from syncd.layout import Layout, Result
from syncd.notify import Notifier
from syncd.publish import Publisher
from syncd.resign import Resigner
from syncd.state import StateStore
from syncd.watch import MarkerWatcher


class Daemon:
    def __init__(
        self,
        settings: Settings,
        layout: Layout,
        publisher: Publisher,
        state: StateStore,
        notifier: Notifier,
        resigner: Resigner | None,
    ) -> None:
        self.config = settings.syncd
        self.layout = layout
        self.publisher = publisher
        self.state = state
        self.attempts = Attempts(settings, publisher, state)
        self.notifier = notifier
        self.resigner = resigner
        self.queue: asyncio.Queue[Result] = asyncio.Queue()
        self.queued: set[str] = set()  # waiting or in progress
        self.done: dict[str, Result] = {}  # recorded; only their signed URLs need care
        self.not_before: dict[str, float] = {}  # backoff: no new attempt before (loop time)
        self.reported: dict[str, str] = {}  # the permanent error already logged per result
        self.busy: set[asyncio.Task[None]] = set()
        self.stopping = asyncio.Event()
        self.aborting = asyncio.Event()

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.request_stop)
        self.state.reset_interrupted()
        watcher = MarkerWatcher(
            self.layout,
            self.config,
            on_marker=lambda path: loop.call_soon_threadsafe(self.offer_marker, path),
            on_folder=lambda _: loop.call_soon_threadsafe(self.start_scan),
            on_lost=lambda why: loop.call_soon_threadsafe(self.events_lost, why),
        )
        watcher.start()
        workers = [asyncio.create_task(self.work()) for _ in range(self.config.parallel_results)]
        helpers = [asyncio.create_task(self.rescan_every(self.config.rescan_interval))]
        if self.resigner is not None:
            # Look often enough to renew a URL inside its margin, at most once a rescan.
            every = min(self.config.rescan_interval, max(self.resigner.margin / 2, 0.5))
            helpers.append(asyncio.create_task(self.renew_every(every)))
        if self.notifier.watchdog_interval:
            helpers.append(asyncio.create_task(self.ping_watchdog(self.notifier.watchdog_interval)))
        logger.info(
            "syncd watching {} ({}) for *{} markers; uploading to {}; {} results in parallel",
            self.layout.outputs_dir,
            "polling" if watcher.polling else "inotify",
            self.config.marker_suffix,
            self.publisher.store.description,
            self.config.parallel_results,
        )
        self.notifier.ready(f"watching {self.layout.outputs_dir}")
        try:
            await self.stopping.wait()
        finally:
            self.notifier.stopping()
            watcher.stop()
            for task in helpers:
                task.cancel()
            await self.drain(workers)
            await asyncio.gather(*helpers, return_exceptions=True)

    def request_stop(self) -> None:
        if self.stopping.is_set():
            logger.warning("second stop signal: stopping now; unfinished results resume later")
            self.aborting.set()
        self.stopping.set()

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
            await asyncio.wait(
                [finished, abort], timeout=self.config.stop_grace, return_when="FIRST_COMPLETED"
            )
            abort.cancel()
        unfinished = [t for t in workers if not t.done()]
        for task in unfinished:
            task.cancel()
        await asyncio.gather(*workers, return_exceptions=True)
        logger.info("syncd stopped; {} results left for the next start", len(self.queued))

    async def rescan_every(self, interval: float) -> None:
        while True:  # the first pass is the start-up scan
            await self.scan()
            await asyncio.sleep(interval)

    async def renew_every(self, interval: float) -> None:
        assert self.resigner is not None
        while True:
            await asyncio.sleep(interval)
            now = time.time()
            for result in [r for r in self.done.values() if self.resigner.due(r, now)]:
                try:
                    await asyncio.to_thread(self.resigner.refresh, result, now)
                except OSError as exc:
                    logger.warning("{}: cannot renew its signed URL: {}", result.name, exc)

    async def ping_watchdog(self, interval: float) -> None:
        # From the event loop that does the work: if it stalls, systemd notices and restarts.
        while True:
            self.notifier.watchdog()
            await asyncio.sleep(interval)

    def events_lost(self, why: str) -> None:
        logger.warning("{}: events may have been lost; rescanning {}", why, self.layout.outputs_dir)
        self.start_scan()

    def start_scan(self) -> None:
        if not self.stopping.is_set():
            asyncio.get_running_loop().create_task(self.scan())

    async def scan(self) -> None:
        for result in await asyncio.to_thread(lambda: list(self.layout.marked())):
            self.offer(result)

    def offer_marker(self, path: Path) -> None:
        result = self.layout.for_marker(path)
        if result is not None:
            self.offer(result)

    def offer(self, result: Result) -> None:
        rel = result.rel.as_posix()
        if rel in self.queued or rel in self.done or self.stopping.is_set():
            return
        if self.not_before.get(rel, 0) > asyncio.get_running_loop().time():
            return
        self.queued.add(rel)
        self.queue.put_nowait(result)

    async def work(self) -> None:
        task = asyncio.current_task()
        assert task is not None
        while not self.stopping.is_set():
            result = await self.queue.get()
            self.busy.add(task)
            try:
                await self.process(result)
            finally:
                self.busy.discard(task)
                self.queued.discard(result.rel.as_posix())

    async def process(self, result: Result) -> None:
        rel = result.rel.as_posix()
        outcome = await self.attempts.attempt(result)
        if outcome.done:
            self.done[rel] = result
            self.not_before.pop(rel, None)
            self.reported.pop(rel, None)
            return
        if outcome.held_by is not None:
            logger.debug("{}: being published by {}", result.name, outcome.held_by)
            return  # a rescan looks again; a dead owner's claim expires
        assert outcome.error is not None
        message = str(outcome.error)
        if not outcome.error.permanent:
            logger.warning(
                "{} (attempt {}; retrying in {:.1f} s)", message, outcome.attempts, outcome.retry_in
            )
        elif self.reported.get(rel) != message:  # log it once, not every retry
            logger.error("{} (retrying every {:.0f} s)", message, outcome.retry_in)
            self.reported[rel] = message
        loop = asyncio.get_running_loop()
        self.not_before[rel] = loop.time() + outcome.retry_in
        loop.call_later(outcome.retry_in, self.offer, result)
