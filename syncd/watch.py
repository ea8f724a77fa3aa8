"""Watch outputs_dir and its workflow folders for completion markers (watchdog).

Only outputs_dir and the workflow folders directly under it are watched, each on its own,
so the watch count stays at one per workflow however large the result trees are. inotify
can lose events (its queue overflows, the watch limit is reached): each loss calls
`on_lost`, and the daemon answers with a full rescan. On NFS/CIFS, where inotify sees nothing
other hosts do, `watch: poll` compares folder listings instead.
"""

from __future__ import annotations

import errno
import logging
from collections.abc import Callable
from pathlib import Path

from loguru import logger
from watchdog.events import FileSystemEvent, FileSystemEventHandler
from watchdog.observers import Observer
from watchdog.observers.api import BaseObserver
from watchdog.observers.polling import PollingObserver

from syncd.config import DaemonSettings
from syncd.layout import EXEC_PREFIX, Layout


class MarkerWatcher(FileSystemEventHandler):
    """Calls, from watchdog's threads, `on_marker(path)` for each file that appears,
    `on_folder(path)` for each new workflow folder and `on_lost(why)` when events were lost."""

    def __init__(
        self,
        layout: Layout,
        daemon: DaemonSettings,
        on_marker: Callable[[Path], None],
        on_folder: Callable[[Path], None],
        on_lost: Callable[[str], None],
    ) -> None:
        self.layout = layout
        self.poll_interval = daemon.poll_interval
        self.polling = daemon.watch == "poll"
        self.on_marker = on_marker
        self.on_folder = on_folder
        self.on_lost = on_lost
        self.observer: BaseObserver = self._observer()
        self.watched: set[Path] = set()
        self.overflow = OverflowAlarm(on_lost)

    def _observer(self) -> BaseObserver:
        if self.polling:
            return PollingObserver(timeout=self.poll_interval)
        return Observer()

    def start(self) -> None:
        logging.getLogger("watchdog.observers.inotify_c").addHandler(self.overflow)
        try:
            self.watch(self.layout.outputs_dir)
            self.observer.start()
        except OSError as exc:
            if self.polling:
                raise
            logger.warning(
                "inotify cannot watch {} ({}); polling every {} s instead. Raise "
                "fs.inotify.max_user_watches / max_user_instances to watch again",
                self.layout.outputs_dir,
                exc.strerror or exc,
                self.poll_interval,
            )
            self.polling = True
            self.observer = self._observer()
            self.watched.clear()
            self.watch(self.layout.outputs_dir)
            self.observer.start()
        for folder in self.layout.workflow_dirs():
            self.watch(folder)

    def stop(self) -> None:
        logging.getLogger("watchdog.observers.inotify_c").removeHandler(self.overflow)
        self.observer.stop()
        self.observer.join(timeout=5)

    def watch(self, folder: Path) -> None:
        if folder in self.watched:
            return
        try:
            self.observer.schedule(self, str(folder), recursive=False)
        except OSError as exc:
            if folder == self.layout.outputs_dir:
                raise
            limit = exc.errno in (errno.ENOSPC, errno.EMFILE)
            self.on_lost(
                f"cannot watch {folder} ({exc.strerror or exc})"
                + ("; raise fs.inotify.max_user_watches" if limit else "")
            )
            return
        self.watched.add(folder)

    def on_created(self, event: FileSystemEvent) -> None:
        self._appeared(Path(str(event.src_path)), event.is_directory)

    def on_moved(self, event: FileSystemEvent) -> None:
        # Writers create markers by rename.
        self._appeared(Path(str(event.dest_path)), event.is_directory)

    def _appeared(self, path: Path, is_directory: bool) -> None:
        if not is_directory:
            self.on_marker(path)
        elif path.parent == self.layout.outputs_dir and not path.name.startswith(
            (EXEC_PREFIX, ".")
        ):
            self.watch(path)
            self.on_folder(path)


class OverflowAlarm(logging.Handler):
    """watchdog (7.x) notices IN_Q_OVERFLOW but only logs it; its handlers get no event.
    This hears that log record and reports the loss."""

    def __init__(self, on_lost: Callable[[str], None]) -> None:
        super().__init__(logging.WARNING)
        self.on_lost = on_lost

    def emit(self, record: logging.LogRecord) -> None:
        if "overflow" in record.getMessage().lower():
            self.on_lost("the inotify event queue overflowed")
