"""Watch outputs_dir and its workflow folders for completion markers (watchdog, inotify).

Only outputs_dir and the workflow folders directly under it are watched, each on its own,
so the watch count stays at one per workflow however large the result trees are. Events can
be lost (inotify drops them when its queue overflows), so the daemon also rescans.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from loguru import logger
from watchdog.events import FileSystemEvent, FileSystemEventHandler
from watchdog.observers import Observer

from syncd.layout import EXEC_PREFIX, Layout


class MarkerWatcher(FileSystemEventHandler):
    """Calls `on_marker(path)` for each file that appears, and `on_folder(path)` for each new
    workflow folder, from watchdog's thread."""

    def __init__(
        self,
        layout: Layout,
        on_marker: Callable[[Path], None],
        on_folder: Callable[[Path], None],
    ) -> None:
        self.layout = layout
        self.on_marker = on_marker
        self.on_folder = on_folder
        self.observer = Observer()
        self.watched: set[Path] = set()

    def start(self) -> None:
        self.watch(self.layout.outputs_dir)
        for folder in self.layout.workflow_dirs():
            self.watch(folder)
        self.observer.start()

    def stop(self) -> None:
        self.observer.stop()
        self.observer.join(timeout=5)

    def watch(self, folder: Path) -> None:
        if folder in self.watched:
            return
        try:
            self.observer.schedule(self, str(folder), recursive=False)
        except OSError as exc:
            logger.warning("cannot watch {} ({}); the periodic rescan covers it", folder, exc)
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
        elif path.parent == self.layout.outputs_dir and not path.name.startswith(EXEC_PREFIX):
            self.watch(path)
            self.on_folder(path)
