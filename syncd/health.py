"""The pipeline's health, and systemd's watchdog fed only while it is good.

Every few seconds the watched folders are looked at again (what was replaced is watched
again) and the pipeline is judged healthy when every worker and helper task is alive, the
watcher and the metrics server run, the state file is the one it opened, and either nothing
is being worked on or something moved (a file acknowledged, an attempt finished, a transfer
within its deadline) in the last `STALL` seconds. Only then is the watchdog fed; otherwise
systemd restarts the daemon. A task that ended is logged once, with its traceback (a bug: what
a fix needs), while the others go on.
"""

from __future__ import annotations

import asyncio

from loguru import logger

from syncd.errors import classify
from syncd.journal import Journal
from syncd.layout import Layout
from syncd.metrics import Metrics
from syncd.notify import Notifier
from syncd.publish import Publisher
from syncd.watch import ResultWatcher
from syncd.workers import Workers

# Seconds without any progress while results are being worked on before the daemon counts as
# wedged (every transfer has its own deadline; this catches what has none).
STALL = 600.0
# Seconds between looks at the watched folders and the pipeline's health.
TEND_EVERY = 2.0


class Health:
    def __init__(
        self,
        layout: Layout,
        publisher: Publisher,
        metrics: Metrics,
        notifier: Notifier,
        workers: Workers,
        journal: Journal,
    ) -> None:
        self.layout = layout
        self.journal = journal
        self.publisher = publisher
        self.metrics = metrics
        self.notifier = notifier
        self.workers = workers
        self.tasks: list[asyncio.Task[None]] = []  # workers and helpers; none may end
        self.unhealthy: str | None = None  # the problem last logged
        self.said_ended: set[asyncio.Task[None]] = set()  # ended tasks whose end was logged

    async def tend(self, watcher: ResultWatcher) -> None:
        """Every few seconds: watch again what was replaced, and feed systemd's watchdog
        while the pipeline is healthy."""
        while True:
            try:
                await asyncio.to_thread(watcher.check)
            except Exception as exc:
                logger.warning("cannot look at {}: {}", self.layout.outputs_dir, classify(exc))
            problem = self.problem(watcher)
            if problem is None:
                self.notifier.watchdog()
            elif problem != self.unhealthy:
                logger.error("syncd is not healthy: {}; no longer feeding the watchdog", problem)
            self.unhealthy = problem
            await asyncio.sleep(TEND_EVERY)

    def problem(self, watcher: ResultWatcher) -> str | None:
        """None while the pipeline works; otherwise what is wrong with it."""
        ended = [t for t in self.tasks if t.done() and t is not asyncio.current_task()]
        for task in ended:
            if task not in self.said_ended:  # a bug: its traceback is what a fix needs
                self.said_ended.add(task)
                exc = None if task.cancelled() else task.exception()
                logger.opt(exception=exc).error(
                    "{} ended: {}",
                    getattr(task.get_coro(), "__qualname__", task.get_name()),
                    classify(exc) if exc else "cancelled",
                )
        if ended:
            return f"{len(ended)} of its tasks ended"
        if not watcher.alive:
            return "the watcher of outputs_dir stopped"
        if not self.metrics.alive:
            return "the metrics server stopped"
        if self.journal.replaced():
            return (
                f"its state file {self.journal.path} was removed or replaced while it runs, so "
                "what it keeps goes to a file nobody sees: restart syncd"
            )
        busy = self.workers.busy
        if not busy:
            return None
        now = asyncio.get_running_loop().time()
        moved = max(self.workers.progress_at, self.publisher.acknowledged_at)
        if now - moved < STALL or now < self.publisher.busy_until():
            return None
        return f"{len(busy)} results in progress and nothing moved for {now - moved:.0f} s"
