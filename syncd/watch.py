"""Watch outputs_dir, its workflow folders and the metadata folders for the files that finish
results, and for rewrites of their metadata (watchdog).

Only outputs_dir and the folders directly under it are watched, each on its own, so the
watch count stays at one per workflow however large the result trees are. A file counts as
written when it is closed after writing (inotify) or its listing changes (polling), so a
metadata file written in place is looked at once it is whole, not at every write. inotify
can lose events (its queue overflows, the watch limit is reached): each loss is told as
`EventsLost`, and the daemon answers with a full rescan. On NFS/CIFS, where inotify sees nothing
other hosts do, `watch: poll` compares folder listings instead.

A watch ends silently when its folder is removed or mounted over, so `check()` (called every
few seconds) compares each watched folder with what is at its path now and watches again
what was replaced. A folder that is a symlink is never watched.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import stat
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from loguru import logger
from watchdog.events import FileSystemEvent, FileSystemEventHandler
from watchdog.observers import Observer
from watchdog.observers.api import BaseObserver, ObservedWatch
from watchdog.observers.polling import PollingObserver

from syncd.config import DaemonSettings
from syncd.layout import Layout
from syncd.marker import EXEC_PREFIX, is_aside

Identity = tuple[int, int]  # (st_dev, st_ino) of a watched folder


@dataclass(frozen=True)
class FileChanged:
    """A file appeared or was written, or a result folder appeared (after its signal)."""

    path: Path


@dataclass(frozen=True)
class FileGone:
    """A file was removed."""

    path: Path


@dataclass(frozen=True)
class FolderAppeared:
    """A new workflow folder under outputs_dir (watched from now on)."""

    path: Path


@dataclass(frozen=True)
class EventsLost:
    """Events may have been lost, and why."""

    why: str


WatchEvent = FileChanged | FileGone | FolderAppeared | EventsLost


def identity(folder: Path, follow: bool = False) -> Identity | None:
    """The folder at `folder` now, or None if there is none (or, unless `follow`, only a
    symlink)."""
    try:
        info = os.stat(folder, follow_symlinks=follow)
    except OSError:
        return None
    return (info.st_dev, info.st_ino) if stat.S_ISDIR(info.st_mode) else None


class ResultWatcher(FileSystemEventHandler):
    """Tells `tell`, from watchdog's threads (and from `start` and `check`), one `WatchEvent`
    at a time, in the order it sees them."""

    def __init__(
        self, layout: Layout, daemon: DaemonSettings, tell: Callable[[WatchEvent], object]
    ) -> None:
        self.layout = layout
        self.poll_interval = daemon.poll_interval
        self.polling = daemon.watch == "poll"
        self.tell = tell
        self.observer: BaseObserver = self._observer()
        self.watched: dict[Path, tuple[Identity, ObservedWatch]] = {}
        self.overflow = OverflowAlarm(tell)
        self.missing_reported = False
        self.lock = threading.RLock()  # watchdog's threads and the daemon both watch folders

    def _observer(self) -> BaseObserver:
        if self.polling:
            return PollingObserver(timeout=self.poll_interval)
        return Observer()

    @property
    def alive(self) -> bool:
        return self.observer.is_alive()

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
        for folder in self.folders():
            self.watch(folder)

    def folders(self) -> list[Path]:
        """The folders besides outputs_dir that can hold markers or metadata files."""
        inside = [f for f in self.layout.metadata_folders() if f.parent == self.layout.outputs_dir]
        return sorted({*self.layout.workflow_dirs(), *inside})

    def stop(self) -> None:
        logging.getLogger("watchdog.observers.inotify_c").removeHandler(self.overflow)
        self.observer.stop()
        self.observer.join(timeout=5)

    def identity(self, folder: Path) -> Identity | None:
        # outputs_dir itself may be a symlink (an operator's choice); nothing under it may.
        return identity(folder, follow=folder == self.layout.outputs_dir)

    def watch(self, folder: Path) -> None:
        with self.lock:
            self._watch(folder)

    def _watch(self, folder: Path) -> None:
        now = self.identity(folder)
        if now is None:
            return
        known = self.watched.get(folder)
        if known is not None:
            if known[0] == now:
                return
            self._unwatch(folder)  # the folder was replaced: its watch is dead
        try:
            handle = self.observer.schedule(self, str(folder), recursive=False)
        except OSError as exc:
            if folder == self.layout.outputs_dir:
                raise
            limit = exc.errno in (errno.ENOSPC, errno.EMFILE)
            self.tell(
                EventsLost(
                    f"cannot watch {folder} ({exc.strerror or exc})"
                    + ("; raise fs.inotify.max_user_watches" if limit else "")
                )
            )
            return
        self.watched[folder] = (now, handle)

    def _unwatch(self, folder: Path) -> None:
        _, handle = self.watched.pop(folder)
        with contextlib.suppress(KeyError, OSError):  # dropped already when the folder went
            self.observer.unschedule(handle)

    def check(self) -> None:
        """Watch again what was replaced: outputs_dir removed and made again or remounted, a
        workflow folder made anew. Reports a loss (so the daemon rescans) when it does."""
        with self.lock:
            self._check()

    def _check(self) -> None:
        outputs = self.layout.outputs_dir
        now = self.identity(outputs)
        if now is None:
            if not self.missing_reported:
                self.missing_reported = True
                logger.warning("outputs_dir {} is gone; watching for it to come back", outputs)
            return
        replaced = [f for f, (known, _) in self.watched.items() if self.identity(f) != known]
        if self.missing_reported or outputs in replaced:
            self.missing_reported = False
            for folder in list(self.watched):
                self._unwatch(folder)
            self._rewatch("outputs_dir {} was replaced or remounted; watching it again")
            return
        for folder in replaced:
            self._unwatch(folder)
            self._watch(folder)

    def _rewatch(self, message: str) -> None:
        try:
            self._watch(self.layout.outputs_dir)
        except OSError as exc:
            self.tell(EventsLost(f"cannot watch {self.layout.outputs_dir} ({exc.strerror or exc})"))
            return
        for folder in self.folders():
            self._watch(folder)
        self.tell(EventsLost(message.format(self.layout.outputs_dir)))

    def on_created(self, event: FileSystemEvent) -> None:
        self._appeared(Path(str(event.src_path)), event.is_directory)

    def on_moved(self, event: FileSystemEvent) -> None:
        # Writers create markers, and often result folders, by rename. syncd's own move of a
        # tree back from aside is not news: the attempt that made it knows, and its retry
        # keeps its time.
        if not any(is_aside(part) for part in Path(str(event.src_path)).parts):
            self._appeared(Path(str(event.dest_path)), event.is_directory)

    def on_closed(self, event: FileSystemEvent) -> None:
        # inotify's IN_CLOSE_WRITE: a file written in place (the server's metadata) is whole.
        self._appeared(Path(str(event.src_path)), event.is_directory)

    def on_modified(self, event: FileSystemEvent) -> None:
        # inotify reports every write (on_closed says when it ends); polling only this.
        if self.polling and not event.is_directory:
            self._appeared(Path(str(event.src_path)), is_directory=False)

    def on_deleted(self, event: FileSystemEvent) -> None:
        if not event.is_directory:
            self.tell(FileGone(Path(str(event.src_path))))

    def _appeared(self, path: Path, is_directory: bool) -> None:
        if not is_directory or path.name.startswith(EXEC_PREFIX):
            self.tell(FileChanged(path))  # a file, or a result folder that came after its signal
        elif path.parent == self.layout.outputs_dir and not path.name.startswith("."):
            self.watch(path)
            self.tell(FolderAppeared(path))


class OverflowAlarm(logging.Handler):
    """watchdog (7.x) notices IN_Q_OVERFLOW but only logs it; its handlers get no event.
    This hears that log record and reports the loss."""

    def __init__(self, tell: Callable[[WatchEvent], object]) -> None:
        super().__init__(logging.WARNING)
        self.tell = tell

    def emit(self, record: logging.LogRecord) -> None:
        if "overflow" in record.getMessage().lower():
            self.tell(EventsLost("the inotify event queue overflowed"))
