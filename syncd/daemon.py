"""The daemon: find marked results (watch, start-up scan, periodic rescan) and publish them.

Results go through one queue to `parallel_results` workers. A result is queued at most once
at a time; one that fails stays marked and unrecorded, so the next rescan picks it up again.
SIGTERM or SIGINT stops the daemon; unfinished results are published on the next start.
"""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path, PurePosixPath

from loguru import logger

from syncd.config import Settings
from syncd.layout import Layout, Result
from syncd.publish import Publisher, PublishError
from syncd.watch import MarkerWatcher


class Daemon:
    def __init__(self, settings: Settings, layout: Layout, publisher: Publisher) -> None:
        self.settings = settings
        self.layout = layout
        self.publisher = publisher
        self.queue: asyncio.Queue[Result] = asyncio.Queue()
        self.queued: set[PurePosixPath] = set()  # waiting or in progress
        self.done: set[PurePosixPath] = set()  # recorded; never looked at again

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        watcher = MarkerWatcher(
            self.layout,
            on_marker=lambda path: loop.call_soon_threadsafe(self.offer_marker, path),
            on_folder=lambda _: loop.call_soon_threadsafe(self.start_scan),
        )
        watcher.start()
        daemon = self.settings.syncd
        logger.info(
            "syncd watching {} for *{} markers; uploading to {}; {} results in parallel",
            self.layout.outputs_dir,
            daemon.marker_suffix,
            self.publisher.store.description,
            daemon.parallel_results,
        )
        tasks = [asyncio.create_task(self.work()) for _ in range(daemon.parallel_results)]
        tasks.append(asyncio.create_task(self.rescan_every(daemon.rescan_interval)))
        try:
            await stop.wait()
            logger.info("syncd stopping; unfinished results resume on the next start")
        finally:
            watcher.stop()
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def rescan_every(self, interval: float) -> None:
        while True:  # the first pass is the start-up scan
            await self.scan()
            await asyncio.sleep(interval)

    def start_scan(self) -> None:
        asyncio.get_running_loop().create_task(self.scan())

    async def scan(self) -> None:
        for result in await asyncio.to_thread(lambda: list(self.layout.marked())):
            self.offer(result)

    def offer_marker(self, path: Path) -> None:
        result = self.layout.for_marker(path)
        if result is not None:
            self.offer(result)

    def offer(self, result: Result) -> None:
        if result.rel in self.queued or result.rel in self.done:
            return
        self.queued.add(result.rel)
        self.queue.put_nowait(result)

    async def work(self) -> None:
        while True:
            result = await self.queue.get()
            try:
                published = await self.publisher.publish(result)
                self.done.add(result.rel)
                if published is None:
                    logger.debug("{}: already recorded in {}", result.name, result.metadata)
                else:
                    logger.info(
                        "{}: uploaded {} files, {} bytes in {:.2f} s ({:.1f} MB/s) to {}; "
                        "recorded in {}",
                        result.name,
                        published.files,
                        published.bytes,
                        published.seconds,
                        published.bytes / max(published.seconds, 1e-9) / 1e6,
                        result.remote_path,
                        result.metadata,
                    )
            except PublishError as exc:
                logger.error("{}", exc)
            except Exception:
                logger.exception("{}: unexpected error; retrying on the next scan", result.name)
            finally:
                self.queued.discard(result.rel)
