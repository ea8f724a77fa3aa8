"""How things stand, said once a second: each upload's progress into the journal (for `syncd
status`), the Prometheus gauges when metrics are on, and systemd's STATUS= line when it
changes. `metrics` words the line; this part gathers what it says.
"""

from __future__ import annotations

import asyncio
import contextlib
import time

from loguru import logger

from syncd.errors import SyncdError, classify
from syncd.journal import Journal
from syncd.metrics import Metrics, Standing, status_line
from syncd.notify import Notifier
from syncd.publish import Publisher
from syncd.schedule import Scheduler, ask
from syncd.workers import Workers

# Seconds between reports of how things stand (STATUS=, metrics).
REPORT_EVERY = 1.0


class Reporter:
    def __init__(
        self,
        publisher: Publisher,
        journal: Journal,
        metrics: Metrics,
        notifier: Notifier,
        scheduler: Scheduler,
        workers: Workers,
    ) -> None:
        self.publisher = publisher
        self.journal = journal
        self.metrics = metrics
        self.notifier = notifier
        self.scheduler = scheduler
        self.workers = workers
        self.status = ""  # as last sent to systemd

    async def report_every(self, interval: float) -> None:
        while True:
            for rel, upload in list(self.publisher.uploads.items()):  # for syncd status
                with contextlib.suppress(SyncdError):  # said where an attempt journals
                    await self.journal.progress(rel, upload.done_bytes, upload.total, upload.rate())
            standing = await self.standing()
            try:
                await asyncio.to_thread(self.metrics.update, standing)
            except Exception as exc:  # metrics are never worth stopping the daemon for
                logger.warning("cannot update the metrics: {}", classify(exc))
            line = status_line(standing, time.time())
            if line != self.status:
                self.notifier.status(line)
                self.status = line
            await asyncio.sleep(interval)

    async def standing(self) -> Standing:
        scheduler = self.scheduler
        return Standing(
            uploading=len(self.workers.busy),
            uploads=tuple(self.publisher.uploads.values()),
            waiting=scheduler.waiting(),
            failing=await scheduler.failing(),
            done=await ask(self.journal.count_stamped(), 0),
            oldest_since=scheduler.oldest(),
            last_published=self.workers.last_published,
        )
