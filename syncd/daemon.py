"""The daemon: find finished results (watch, start-up scan, periodic rescan) and publish them.

A result is finished when its marker exists, or (completion by metadata) when its metadata
says so. Results go through one queue to `parallel_results` workers, each of which hands one
result to `attempt` (which decides, journals and logs) and acts on the typed outcome. A result
is queued at most once at a time and published under a claim, so daemons sharing outputs_dir
never both record it. A failed result is offered again when the journal's next try is due (the
attempt set it, with backoff); a start makes every one due at once. A fresh event for a waiting
result (its marker dropped again, its metadata rewritten, its folder appearing after the
signal) tries it at once; a removed signal forgets it.

A recorded result is watched through the stamp of its metadata, which the journal keeps (in
memory it costs nothing but, with signed URLs, its next renewal time): when the metadata
changes (an event, or a stat at each rescan) the result is tried again, and a record someone
else's write removed is restored; when the metadata is deleted it is watched no more.

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
import faulthandler
import signal
import time
from collections.abc import Callable
from pathlib import Path, PurePosixPath

from loguru import logger

from syncd import logs, metadata
from syncd.attempt import Attempts
from syncd.chores import Chores
from syncd.config import ConfigError, Settings, apply, changes, rate_text
from syncd.errors import SyncdError, classify
from syncd.health import Health
from syncd.layout import Layout, Result
from syncd.metadata import Stamp
from syncd.metrics import Metrics
from syncd.notify import Notifier
from syncd.publish import Publisher, recover_leftovers
from syncd.report import REPORT_EVERY, Reporter
from syncd.resign import Resigner
from syncd.schedule import Scheduler, ask
from syncd.signals import (
    FATAL_SIGNALS,
    IGNORED_SIGNALS,
    STOP_SIGNALS,
    hung_up_while_starting,
)
from syncd.signing import UrlSigner
from syncd.state import StateStore
from syncd.watch import ResultWatcher
from syncd.workers import Workers


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
        load: Callable[[], Settings],
    ) -> None:
        self.settings = settings
        self.load = load  # the settings as the files say now, for a reload
        self.config = settings.syncd
        self.layout = layout
        self.publisher = publisher
        self.state = state
        self.attempts = Attempts(settings, publisher, state)
        self.notifier = notifier
        self.resigner = resigner
        self.metrics = metrics
        self.rechecking: set[str] = set()
        self.stopping = asyncio.Event()
        self.aborting = asyncio.Event()
        self.reloading = asyncio.Event()
        self.chores = Chores()
        self.scheduler = Scheduler(layout, state, self.attempts, self.chores, self.stopping)
        self.workers = Workers(
            self.config,
            self.attempts,
            self.scheduler,
            self.chores,
            resigner,
            metrics,
            self.recheck,
            self.stopping,
            self.aborting,
        )
        self.health = Health(layout, publisher, metrics, notifier, self.workers)
        self.reporter = Reporter(publisher, state, metrics, notifier, self.scheduler, self.workers)

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in STOP_SIGNALS:
            loop.add_signal_handler(sig, self.request_stop, sig)
        loop.add_signal_handler(signal.SIGHUP, self.reloading.set)
        if hung_up_while_starting():  # the settings may have changed since they were read
            self.reloading.set()
        for sig in IGNORED_SIGNALS:
            loop.add_signal_handler(sig, ignored, sig)
        faulthandler.enable()  # SIGSEGV, SIGBUS, SIGFPE, SIGILL, SIGABRT
        for sig in FATAL_SIGNALS:
            faulthandler.register(sig, chain=True)
        self.state.start()
        deleting = self.config.delete_local_after_upload
        await asyncio.to_thread(recover_leftovers, self.layout, deleting)
        self.workers.progress_at = loop.time()
        watcher = ResultWatcher(
            self.layout,
            self.config,
            on_file=lambda path: loop.call_soon_threadsafe(self.file_changed, path),
            on_gone=lambda path: loop.call_soon_threadsafe(self.file_gone, path),
            on_folder=lambda _: loop.call_soon_threadsafe(self.start_scan),
            on_lost=lambda why: loop.call_soon_threadsafe(self.events_lost, why),
        )
        watcher.start()
        workers = [
            asyncio.create_task(self.workers.work()) for _ in range(self.config.parallel_results)
        ]
        helpers = [
            asyncio.create_task(self.rescan_every()),
            asyncio.create_task(self.scheduler.retry_when_due()),
            asyncio.create_task(self.health.tend(watcher)),
            asyncio.create_task(self.reporter.report_every(REPORT_EVERY)),
        ]
        if self.resigner is not None:
            helpers.append(asyncio.create_task(self.renew_every(self.resigner)))
        self.health.tasks = workers + helpers
        logger.info(
            "syncd watching {} ({}) for {}; uploading to {}; {} results in parallel{}",
            self.layout.outputs_dir,
            "polling" if watcher.polling else "inotify",
            f"{self.config.metadata_file} with status completed"
            if self.layout.by_metadata
            else f"*{self.config.marker_suffix} markers",
            self.publisher.store.description,
            self.config.parallel_results,
            f"; sending at most {rate_text(cap)}"
            if (cap := self.config.max_bandwidth) is not None
            else "",
        )
        self.notifier.ready(f"watching {self.layout.outputs_dir}")
        try:
            while not self.stopping.is_set():
                await first_of(self.stopping, self.reloading)
                if self.reloading.is_set() and not self.stopping.is_set():
                    self.reloading.clear()
                    self.reload()
        finally:
            self.notifier.stopping()
            watcher.stop()
            # Everything but the uploads ends first, so that nothing is done after the line
            # that says syncd stopped.
            chores = [*helpers, *self.chores.tasks]
            for task in chores:
                task.cancel()
            await asyncio.gather(*chores, return_exceptions=True)
            await self.workers.drain(workers)

    def request_stop(self, sig: signal.Signals) -> None:
        if self.stopping.is_set():
            logger.warning(
                "{}: a second stop signal: stopping now; unfinished results resume later", sig.name
            )
            self.aborting.set()
        else:
            logger.info("{} received: stopping", sig.name)
        self.stopping.set()

    def reload(self) -> None:
        """SIGHUP (`systemctl reload syncd`): read the settings again and change live what can
        change without a restart; work in flight goes on. Bad settings change nothing."""
        self.notifier.reloading()
        try:
            new = self.load()
            signer = UrlSigner.from_settings(new.object_storage)  # a key rotated in place too
        except ConfigError as exc:
            logger.error("reload failed, the settings stay as they were: {}", exc)
            self.notifier.ready(self.reporter.status or "running")
            return
        for notice in new.notices:
            logger.warning(notice)
        live, fixed = changes(self.settings, new)
        apply(self.settings, new, live)
        if any(name.startswith("syncd.log_") for name in live):
            logs.configure(self.config)
        if signer is not None and self.settings.object_storage.signs_urls:
            self.publisher.signer = signer
            if self.resigner is not None:
                self.resigner.signer = signer
        if live or not fixed:
            logger.info("settings reloaded: {}", ", ".join(live) or "nothing changed")
        if fixed:
            logger.warning(
                "{} changed, which takes a restart (systemctl restart syncd); running on with "
                "the value{} it had",
                ", ".join(fixed),
                "s" if len(fixed) > 1 else "",
            )
        self.scheduler.retries_changed.set()  # the retry delays may have changed
        self.notifier.ready(self.reporter.status or "running")

    async def rescan_every(self) -> None:
        while True:  # the first pass is the start-up scan
            await self.scan()
            await asyncio.sleep(self.config.rescan_interval)

    async def renew_every(self, resigner: Resigner) -> None:
        while True:
            # Often enough to renew a URL inside its margin, at most once a rescan.
            await asyncio.sleep(min(self.config.rescan_interval, max(resigner.margin / 2, 0.5)))
            now = time.time()
            for rel in resigner.due(now):
                result = self.layout.result(PurePosixPath(rel))
                renewal = asyncio.ensure_future(asyncio.to_thread(resigner.refresh, result, now))
                try:
                    stamp = await asyncio.shield(renewal)
                except asyncio.CancelledError:  # stopping: a rewrite begun ends before syncd does
                    await asyncio.wait([renewal])
                    raise
                except Exception as exc:  # one bad metadata file never stops the others
                    logger.warning(
                        "{}: cannot renew its signed URL: {}", result.name, classify(exc)
                    )
                    resigner.later(rel, now)
                    continue
                if stamp is not None:
                    self.metrics.renewed.inc()
                    with contextlib.suppress(SyncdError):  # a rescan sees it as changed then
                        if self.state.watching(rel) is not None:
                            self.state.watch(rel, stamp)

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
            watched = self.state.watched()
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
                self.metadata_changed(self.layout.result(PurePosixPath(rel)), known, now)
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
                self.scheduler.offer(result)
        here = (
            {result.rel.as_posix() for result in signalled}
            | self.scheduler.queued
            | self.scheduler.later
        )
        nothing: list[str] = []
        for rel in ask(self.state.waiting, nothing):
            if rel not in here:  # its signal went while no event could say so (syncd was down)
                self.scheduler.abandon(self.layout.result(PurePosixPath(rel)))

    def file_changed(self, path: Path) -> None:
        """A file or folder appeared or was written: its result is tried now, even if it
        waits; a recorded result whose metadata changed is looked at again."""
        result = self.layout.for_path(path)
        if result is None:
            return
        rel = result.rel.as_posix()
        try:
            known = self.scheduler.watching(rel)
            if known is not None:
                if path == result.metadata:
                    self.metadata_changed(result, known, metadata.stamp(result))
                elif path == result.marker and not result.by_metadata:
                    self.recheck(result)
            elif (
                path == result.signal
                or self.scheduler.next_try(rel) is not None
                or result.signal.exists()
            ):
                self.scheduler.offer(result, fresh=True)
        except OSError as exc:  # the next rescan looks again
            logger.debug("{}: cannot look at {}: {}", result.name, path, exc)

    def metadata_changed(self, result: Result, known: Stamp | None, now: Stamp | None) -> None:
        """A recorded result's metadata as it is now: gone (nothing left to care for), or
        written by someone else (try it again: its record is restored if it was lost)."""
        rel = result.rel.as_posix()
        if now == known or self.scheduler.watching(rel) != known:
            return  # unchanged, no longer recorded, or rewritten by syncd since `known`
        try:
            self.state.watch(rel, None)
        except SyncdError as exc:
            logger.warning("{}: {}", result.name, exc)
        if self.resigner is not None:
            self.resigner.forget(rel)
        if now is None:
            logger.debug("{}: its metadata was removed; nothing more to do", result.name)
        else:
            self.scheduler.offer(result, fresh=True)

    def file_gone(self, path: Path) -> None:
        result = self.layout.for_path(path)
        if result is None:
            return
        rel = result.rel.as_posix()
        known = self.scheduler.watching(rel) if path == result.metadata else None
        if known is not None:
            self.metadata_changed(result, known, None)
        elif (
            path == result.signal
            and rel not in self.scheduler.queued
            and self.scheduler.next_try(rel) is not None
        ):
            name = result.signal_name
            self.attempts.forget(result, f"its {name} was removed", short=f"{name} removed")
            self.scheduler.since.pop(rel, None)


def ignored(sig: int) -> None:
    logger.warning(
        "{} received: syncd has no use for it and goes on (SIGTERM stops it, SIGHUP reloads its "
        "settings)",
        signal.Signals(sig).name if sig in signal.Signals._value2member_map_ else f"signal {sig}",
    )


async def first_of(*events: asyncio.Event) -> None:
    """Wait until one of `events` is set."""
    waits = [asyncio.create_task(event.wait()) for event in events]
    try:
        await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for wait in waits:
            wait.cancel()
