"""The daemon: find finished results (watch, start-up scan, periodic rescan) and publish them.

This part runs the others and wires them together: `find` hears the watcher and scans,
`schedule` decides when each result is tried and queues it, `workers` hand it to `attempt` (a
result is published under a claim, so daemons sharing outputs_dir never both record it),
`chores` run beside them, `health` feeds systemd's watchdog, `report` says how things stand,
and `resign` renews signed URLs.

SIGHUP reloads the settings, changing live what can change without a restart. The first
SIGTERM stops new work and gives uploads in flight `stop_grace` seconds; a second SIGTERM or
SIGINT stops at once. Helpers and chores end first, then the workers are drained. Unfinished
results resume on the next start.
"""

from __future__ import annotations

import asyncio
import contextlib
import faulthandler
import signal
from collections.abc import Callable

from loguru import logger

from syncd import logs
from syncd.attempt import Attempts
from syncd.chores import Chores
from syncd.config import ConfigError, Settings, apply, changes, rate_text
from syncd.errors import TransientError
from syncd.find import Finder
from syncd.health import Health
from syncd.journal import Journal
from syncd.layout import Layout
from syncd.metrics import Metrics
from syncd.notify import Notifier
from syncd.publish import Publisher, recover_leftovers
from syncd.report import REPORT_EVERY, Reporter
from syncd.resign import Resigner, renew_every
from syncd.schedule import Scheduler
from syncd.signals import (
    FATAL_SIGNALS,
    IGNORED_SIGNALS,
    STOP_SIGNALS,
    hung_up_while_starting,
)
from syncd.signing import UrlSigner
from syncd.watch import ResultWatcher
from syncd.workers import Workers


class Daemon:
    def __init__(
        self,
        settings: Settings,
        layout: Layout,
        publisher: Publisher,
        journal: Journal,
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
        self.journal = journal
        self.attempts = Attempts(settings, publisher, journal)
        self.notifier = notifier
        self.resigner = resigner
        self.metrics = metrics
        self.stopping = asyncio.Event()
        self.aborting = asyncio.Event()
        self.reloading = asyncio.Event()
        self.chores = Chores()
        self.scheduler = Scheduler(layout, journal, self.attempts, self.chores, self.stopping)
        self.finder = Finder(
            self.config,
            layout,
            journal,
            self.attempts,
            self.scheduler,
            self.chores,
            resigner,
            metrics,
            self.stopping,
        )
        self.workers = Workers(
            self.config,
            self.attempts,
            self.scheduler,
            self.chores,
            resigner,
            metrics,
            self.finder.recheck,
            self.finder.attempt_ended,
            self.stopping,
            self.aborting,
        )
        self.health = Health(layout, publisher, metrics, notifier, self.workers, journal)
        self.reporter = Reporter(
            publisher, journal, metrics, notifier, self.scheduler, self.workers
        )

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in STOP_SIGNALS:
            loop.add_signal_handler(sig, self.request_stop, sig)
        loop.add_signal_handler(signal.SIGHUP, self.request_reload)
        if hung_up_while_starting():  # the settings may have changed since they were read
            self.reloading.set()
        for sig in IGNORED_SIGNALS:
            loop.add_signal_handler(sig, ignored, sig)
        faulthandler.enable()  # SIGSEGV, SIGBUS, SIGFPE, SIGILL, SIGABRT
        for sig in FATAL_SIGNALS:
            faulthandler.register(sig, chain=True)
        if not await self.start_journal():
            return
        deleting = self.config.delete_local_after_upload
        await asyncio.to_thread(recover_leftovers, self.layout, deleting)
        self.workers.progress_at = loop.time()
        watcher = ResultWatcher(
            self.layout,
            self.config,
            tell=lambda event: loop.call_soon_threadsafe(self.finder.tell, event),
        )
        watcher.start()
        listening = asyncio.create_task(self.finder.listen())
        workers = [
            asyncio.create_task(self.workers.work()) for _ in range(self.config.parallel_results)
        ]
        helpers = [
            asyncio.create_task(self.finder.rescan_every()),
            asyncio.create_task(self.scheduler.retry_when_due()),
            asyncio.create_task(self.health.tend(watcher)),
            asyncio.create_task(self.reporter.report_every(REPORT_EVERY)),
        ]
        if self.resigner is not None:
            renewing = renew_every(
                self.resigner, self.config, self.layout, self.journal, self.metrics
            )
            helpers.append(asyncio.create_task(renewing))
        self.health.tasks = [*workers, *helpers, listening]
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
            if self.reloading.is_set():  # a SIGHUP just before the stop signal
                self.reload_dropped()
        finally:
            self.notifier.stopping()
            watcher.stop()
            # Heard after what the watcher told before it stopped (those calls are queued on the
            # loop already), while nothing more is queued for the workers.
            loop.call_soon(self.finder.tell, None)
            await asyncio.wait([listening])
            # Everything but the uploads ends first, so that nothing is done after the line
            # that says syncd stopped.
            chores = [*helpers, *self.chores.tasks]
            for task in chores:
                task.cancel()
            await asyncio.gather(*chores, return_exceptions=True)
            await self.workers.drain(workers)

    async def start_journal(self) -> bool:
        """The journal's start, once the state file can be written: one another process holds
        locked is waited for (said once), as at any other time. False: a stop came first."""
        said = False
        while not self.stopping.is_set():
            try:
                await self.journal.start()
                return True
            except TransientError as exc:
                if not said:
                    logger.warning("{}", exc)
                    said = True
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(1):
                    await self.stopping.wait()
        return False

    def request_reload(self) -> None:
        if self.stopping.is_set():
            self.reload_dropped()
        else:
            self.reloading.set()

    def reload_dropped(self) -> None:
        logger.warning("SIGHUP received while stopping: no reload; a start reads the settings")

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
            old = self.publisher.signer
            named = any(n.startswith("object_storage.cloudfront_private_key") for n in live)
            if old is not None and not old.same_key(signer) and not named:
                live = [*live, "the CloudFront private key (replaced in its file)"]
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
        self.scheduler.retry_times_changed()  # the retry delays may have changed
        self.notifier.ready(self.reporter.status or "running")


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
