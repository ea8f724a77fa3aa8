"""The daemon: find finished results (watch, start-up scan, periodic rescan) and publish them.

A result is finished when its marker exists, or (completion by metadata) when its metadata
says so. Results go through one queue to `parallel_results` workers. A result is queued at
most once at a time and published under a claim, so daemons sharing outputs_dir never both
record it. A failure is retried with capped exponential backoff and jitter; one only a person
can fix is logged once and retried slowly. A fresh event for a waiting result (its marker
dropped again, its metadata rewritten, its folder appearing after the signal) tries it at once;
a removed signal forgets it.

A recorded result needs only its metadata's stamp: when the metadata changes (an event, or a
stat at each rescan) the result is tried again, and a record someone else's write removed is
restored; when the metadata is deleted the result is forgotten.

Once a second the daemon tells `metrics` how things stand (systemd's STATUS= line, and the
Prometheus gauges when metrics are on).

Workers never die: an attempt turns every failure into its outcome, and the worker loop logs
whatever escapes its own bookkeeping and goes on. The systemd watchdog is fed only while the
pipeline is healthy: every worker and helper task alive, the watcher and the metrics server
running, and either nothing to do or something moving (a file acknowledged, an attempt
finished, a transfer within its deadline) in the last `STALL` seconds; otherwise systemd
restarts the daemon.

The first SIGTERM stops new work and gives uploads in flight `stop_grace` seconds; a second
SIGTERM or SIGINT stops at once. Unfinished results resume on the next start.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import time
from pathlib import Path
from typing import Any, NamedTuple

from loguru import logger

from syncd import metadata
from syncd.attempt import Attempts, Outcome
from syncd.config import Settings
from syncd.errors import SyncdError, classify
from syncd.layout import Layout, Result
from syncd.metadata import Stamp
from syncd.metrics import Metrics, Standing, status_line
from syncd.notify import Notifier
from syncd.publish import Publisher, recover_leftovers
from syncd.resign import Resigner
from syncd.state import Record, State, StateStore
from syncd.watch import ResultWatcher

# Seconds without any progress while results are being worked on before the daemon counts as
# wedged (every transfer has its own deadline; this catches what has none).
STALL = 600.0
# Seconds between looks at the watched folders and the pipeline's health.
TEND_EVERY = 2.0
# Seconds between reports of how things stand (STATUS=, metrics).
REPORT_EVERY = 1.0


class Waiting(NamedTuple):
    handle: asyncio.TimerHandle  # offers the result again
    failing: bool  # after a failure (not: its metadata is being written)


class Daemon:
    def __init__(
        self,
        settings: Settings,
        layout: Layout,
        publisher: Publisher,
        state: StateStore,
        notifier: Notifier,
        resigner: Resigner | None,
        metrics: Metrics,
    ) -> None:
        self.config = settings.syncd
        self.layout = layout
        self.publisher = publisher
        self.state = state
        self.attempts = Attempts(settings, publisher, state)
        self.notifier = notifier
        self.resigner = resigner
        self.metrics = metrics
        self.queue: asyncio.Queue[Result] = asyncio.Queue()
        self.queued: set[str] = set()  # waiting in the queue or in progress
        # Recorded: only their metadata (its stamp as last written or seen) and signed URLs
        # need care.
        self.done: dict[str, tuple[Result, Stamp | None]] = {}
        self.waiting: dict[str, Waiting] = {}  # until the next attempt
        # Finished and not yet recorded: when each was finished (its signal's mtime).
        self.since: dict[str, float] = {}
        self.last_published: tuple[str, float] | None = None
        self.status = ""  # as last sent to systemd
        self.reported: dict[str, str] = {}  # the permanent error already logged per result
        self.busy: set[asyncio.Task[None]] = set()
        self.tasks: list[asyncio.Task[None]] = []  # workers and helpers; none may end
        self.scans: set[asyncio.Task[None]] = set()  # rescans after lost events
        self.progress_at = 0.0  # loop time of the last finished attempt
        self.unhealthy: str | None = None
        self.stopping = asyncio.Event()
        self.aborting = asyncio.Event()

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.request_stop)
        self.state.reset_interrupted()
        await asyncio.to_thread(recover_leftovers, self.layout)
        self.progress_at = loop.time()
        watcher = ResultWatcher(
            self.layout,
            self.config,
            on_file=lambda path: loop.call_soon_threadsafe(self.file_changed, path),
            on_gone=lambda path: loop.call_soon_threadsafe(self.file_gone, path),
            on_folder=lambda _: loop.call_soon_threadsafe(self.start_scan),
            on_lost=lambda why: loop.call_soon_threadsafe(self.events_lost, why),
        )
        watcher.start()
        workers = [asyncio.create_task(self.work()) for _ in range(self.config.parallel_results)]
        helpers = [
            asyncio.create_task(self.rescan_every(self.config.rescan_interval)),
            asyncio.create_task(self.tend(watcher)),
            asyncio.create_task(self.report_every(REPORT_EVERY)),
        ]
        if self.resigner is not None:
            # Look often enough to renew a URL inside its margin, at most once a rescan.
            every = min(self.config.rescan_interval, max(self.resigner.margin / 2, 0.5))
            helpers.append(asyncio.create_task(self.renew_every(every)))
        self.tasks = workers + helpers
        logger.info(
            "syncd watching {} ({}) for {}; uploading to {}; {} results in parallel",
            self.layout.outputs_dir,
            "polling" if watcher.polling else "inotify",
            f"{self.config.metadata_file} with status completed"
            if self.layout.by_metadata
            else f"*{self.config.marker_suffix} markers",
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
            either: list[asyncio.Future[Any]] = [finished, abort]
            await asyncio.wait(
                either, timeout=self.config.stop_grace, return_when="FIRST_COMPLETED"
            )
            abort.cancel()
        unfinished = [t for t in workers if not t.done()]
        for task in unfinished:
            task.cancel()
        await asyncio.gather(*workers, return_exceptions=True)
        for waiting in self.waiting.values():
            waiting.handle.cancel()
        left = len(self.queued) + len(self.waiting)
        logger.info("syncd stopped; {} results left for the next start", left)

    async def rescan_every(self, interval: float) -> None:
        while True:  # the first pass is the start-up scan
            await self.scan()
            await asyncio.sleep(interval)

    async def renew_every(self, interval: float) -> None:
        assert self.resigner is not None
        while True:
            await asyncio.sleep(interval)
            now = time.time()
            due = [r for r, _ in self.done.values() if self.resigner.due(r, now)]
            for result in due:
                try:
                    stamp = await asyncio.to_thread(self.resigner.refresh, result, now)
                except Exception as exc:  # one bad metadata file never stops the others
                    logger.warning(
                        "{}: cannot renew its signed URL: {}", result.name, classify(exc)
                    )
                    self.resigner.later(result, now)
                    continue
                rel = result.rel.as_posix()
                if stamp is not None:
                    self.metrics.renewed.inc()
                    if rel in self.done:
                        self.done[rel] = (result, stamp)

    async def report_every(self, interval: float) -> None:
        while True:
            standing = self.standing()
            try:
                await asyncio.to_thread(self.metrics.update, standing)
            except Exception as exc:  # metrics are never worth stopping the daemon for
                logger.warning("cannot update the metrics: {}", classify(exc))
            line = status_line(standing, time.time())
            if line != self.status:
                self.notifier.status(line)
                self.status = line
            await asyncio.sleep(interval)

    def standing(self) -> Standing:
        failing = sum(w.failing for w in self.waiting.values())
        return Standing(
            uploading=len(self.busy),
            waiting=self.queue.qsize() + len(self.waiting) - failing,
            failing=failing,
            done=len(self.done),
            oldest_since=min(self.since.values(), default=None),
            last_published=self.last_published,
        )

    async def tend(self, watcher: ResultWatcher) -> None:
        """Every few seconds: watch again what was replaced, and feed systemd's watchdog
        while the pipeline is healthy."""
        while True:
            try:
                await asyncio.to_thread(watcher.check)
            except Exception as exc:
                logger.warning("cannot look at {}: {}", self.layout.outputs_dir, classify(exc))
            problem = self.health(watcher)
            if problem is None:
                self.notifier.watchdog()
            elif problem != self.unhealthy:
                logger.error("syncd is not healthy: {}; no longer feeding the watchdog", problem)
            self.unhealthy = problem
            await asyncio.sleep(TEND_EVERY)

    def health(self, watcher: ResultWatcher) -> str | None:
        """None while the pipeline works; otherwise what is wrong with it."""
        ended = [t for t in self.tasks if t.done() and t is not asyncio.current_task()]
        if ended:
            return f"{len(ended)} of its tasks ended"
        if not watcher.alive:
            return "the watcher of outputs_dir stopped"
        if not self.metrics.alive:
            return "the metrics server stopped"
        if not self.busy:
            return None
        now = asyncio.get_running_loop().time()
        moved = max(self.progress_at, self.publisher.acknowledged_at)
        if now - moved < STALL or now < self.publisher.busy_until():
            return None
        return f"{len(self.busy)} results in progress and nothing moved for {now - moved:.0f} s"

    def events_lost(self, why: str) -> None:
        self.metrics.rescans.inc()
        logger.warning("{}: events may have been lost; rescanning {}", why, self.layout.outputs_dir)
        self.start_scan()

    def start_scan(self) -> None:
        if not self.stopping.is_set():
            task = asyncio.get_running_loop().create_task(self.scan())
            self.scans.add(task)  # the loop keeps only a weak reference to a task
            task.add_done_callback(self.scans.discard)

    async def scan(self) -> None:
        recorded = list(self.done.values())
        try:
            stamps = await asyncio.to_thread(
                lambda: [metadata.stamp(result.metadata) for result, _ in recorded]
            )
        except Exception as exc:
            logger.warning("cannot look at recorded results' metadata: {}", classify(exc))
        else:
            for (result, known), now in zip(recorded, stamps, strict=True):
                self.metadata_changed(result, known, now)
        try:
            signalled = await asyncio.to_thread(lambda: list(self.layout.signalled()))
        except Exception as exc:
            logger.warning("cannot scan {}: {}", self.layout.outputs_dir, classify(exc))
            return
        for result in signalled:
            self.offer(result)

    def file_changed(self, path: Path) -> None:
        """A file or folder appeared or was written: its result is tried now, even if it
        waits; a recorded result whose metadata changed is looked at again."""
        result = self.layout.for_path(path)
        if result is None:
            return
        rel = result.rel.as_posix()
        try:
            if rel in self.done:
                if path == result.metadata:
                    known = self.done[rel][1]
                    self.metadata_changed(result, known, metadata.stamp(result.metadata))
            elif path == result.signal or rel in self.waiting or result.signal.exists():
                self.offer(result, fresh=True)
        except OSError as exc:  # the next rescan looks again
            logger.debug("{}: cannot look at {}: {}", result.name, path, exc)

    def metadata_changed(self, result: Result, known: Stamp | None, now: Stamp | None) -> None:
        """A recorded result's metadata as it is now: gone (nothing left to care for), or
        written by someone else (try it again: its record is restored if it was lost)."""
        rel = result.rel.as_posix()
        current = self.done.get(rel)
        if now == known or current is None or current[1] != known:
            return  # unchanged, no longer recorded, or rewritten by syncd since `known`
        del self.done[rel]
        if self.resigner is not None:
            self.resigner.forget(result)
        if now is None:
            logger.debug("{}: its metadata was removed; nothing more to do", result.name)
        else:
            self.offer(result, fresh=True)

    def file_gone(self, path: Path) -> None:
        result = self.layout.for_path(path)
        if result is None:
            return
        rel = result.rel.as_posix()
        if rel in self.done and path == result.metadata:
            self.metadata_changed(result, self.done[rel][1], None)
        elif rel in self.waiting and path == result.signal:
            name = result.signal_name
            self.forget(result, f"its {name} was removed", short=f"{name} removed")

    def forget(self, result: Result, why: str, short: str | None = None) -> None:
        """Its signal is gone: nothing more is done for it until one comes again. `short`: the
        reason as `syncd status` shows it."""
        rel = result.rel.as_posix()
        waiting = self.waiting.pop(rel, None)
        if waiting is not None:
            waiting.handle.cancel()
        self.reported.pop(rel, None)
        self.since.pop(rel, None)
        logger.info("{}: {}; forgotten", result.name, why)
        try:
            self.state.set(Record(rel, State.FORGOTTEN, last_error=short or why))
        except SyncdError as exc:
            logger.warning("{}: {}", result.name, exc)

    def not_finished(self, result: Result, why: str) -> None:
        """The attempt found the result not finished: forgotten if it was tried before (its
        marker was removed), else left quietly until its signal comes (status running)."""
        try:
            previous = self.state.get(result.rel.as_posix())
        except SyncdError:
            previous = None
        if previous is not None and previous.state in (State.RETRYING, State.PENDING):
            self.forget(result, why)
        else:
            self.since.pop(result.rel.as_posix(), None)
            logger.debug("{}: not finished: {}", result.name, why)

    def offer(self, result: Result, fresh: bool = False) -> None:
        rel = result.rel.as_posix()
        if rel in self.queued or rel in self.done or self.stopping.is_set():
            return
        if rel in self.waiting:
            if not fresh:
                return
            self.waiting.pop(rel).handle.cancel()
        if rel not in self.since:
            self.since[rel] = finished_at(result)
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
            except Exception as exc:  # a bug in the bookkeeping below: the worker goes on
                logger.opt(exception=exc).debug("{}: where it came from", result.name)
                logger.error("{}: {}", result.name, classify(exc))
                self.retry_later(result, self.config.retry_max_delay)
            finally:
                self.busy.discard(task)
                self.queued.discard(result.rel.as_posix())
                self.progress_at = asyncio.get_running_loop().time()

    async def process(self, result: Result) -> None:
        rel = result.rel.as_posix()
        outcome = await self.attempts.attempt(result)
        if outcome.done:
            self.done[rel] = (result, outcome.stamp)
            self.reported.pop(rel, None)
            self.since.pop(rel, None)
            self.count(result, outcome)
            return
        if outcome.unfinished is not None:
            self.not_finished(result, outcome.unfinished)
            return
        if outcome.held_by is not None:
            logger.debug("{}: being published by {}", result.name, outcome.held_by)
            return  # a rescan looks again; a dead owner's claim expires
        assert outcome.error is not None
        message = f"{result.name}: {outcome.error}"
        being_written = outcome.error.code == metadata.BEING_WRITTEN_CODE
        if being_written:  # its writer is at it: not a failure
            logger.debug("{} (attempt {})", message, outcome.attempts)
        else:
            self.metrics.failures.labels(outcome.error.kind.value).inc()
            if not outcome.error.permanent:
                logger.warning(
                    "{} (attempt {}; retrying in {:.1f} s)",
                    message,
                    outcome.attempts,
                    outcome.retry_in,
                )
            elif self.reported.get(rel) != message:  # log it once, not every retry
                logger.error("{} (retrying every {:.0f} s)", message, outcome.retry_in)
                self.reported[rel] = message
        self.retry_later(result, outcome.retry_in, failing=not being_written)

    def count(self, result: Result, outcome: Outcome) -> None:
        """A recorded result, in the metrics."""
        if outcome.restored:
            self.metrics.restored.inc()
        uploaded = outcome.uploaded
        if uploaded is None:
            return
        seconds = uploaded.seconds if uploaded.sent else None
        self.metrics.published(len(uploaded.files), uploaded.bytes, seconds)
        self.last_published = (result.name, time.time())

    def retry_later(self, result: Result, delay: float, failing: bool = True) -> None:
        rel = result.rel.as_posix()
        loop = asyncio.get_running_loop()

        def again() -> None:
            self.waiting.pop(rel, None)
            self.offer(result)

        old = self.waiting.pop(rel, None)
        if old is not None:
            old.handle.cancel()
        self.waiting[rel] = Waiting(loop.call_later(delay, again), failing)


def finished_at(result: Result) -> float:
    """When `result` was finished: its signal's mtime (now, if it cannot be read)."""
    with contextlib.suppress(OSError):
        return result.signal.stat().st_mtime
    return time.time()
