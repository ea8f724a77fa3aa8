"""Where results live: exec trees, their completion markers and metadata, and their keys in S3.

A result is `<outputs_dir>/exec_*/` or `<outputs_dir>/<workflow>/exec_*/`; the workflow marks
it finished with `<exec dir><marker_suffix>` beside the tree. The metadata file is a template
relative to outputs_dir. Objects go to `<prefix>/<exec path under outputs_dir>/<path in tree>`.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from loguru import logger

from syncd.config import Settings

EXEC_PREFIX = "exec_"


class LayoutError(Exception):
    """A path that is not a result under outputs_dir."""


@dataclass(frozen=True)
class Result:
    """One exec tree and the files around it."""

    outputs_dir: Path
    rel: PurePosixPath  # exec_X or <workflow>/exec_X
    marker: Path
    metadata: Path
    remote_path: str  # <prefix>/<rel>

    @property
    def name(self) -> str:
        return self.rel.name

    @property
    def tree(self) -> Path:
        return self.outputs_dir / self.rel

    def key(self, path_in_tree: str) -> str:
        return f"{self.remote_path}/{path_in_tree}"


@dataclass(frozen=True, slots=True)
class LocalFile:
    """A regular file of a result tree: its path in the tree, its size, and its modification
    time (to notice a file that changes while it is uploaded). Kept small: a tree may hold
    100,000 of them."""

    rel: str
    size: int
    mtime_ns: int


class Layout:
    """Maps paths under outputs_dir to results, following the configured names."""

    def __init__(self, settings: Settings) -> None:
        daemon = settings.syncd
        self.outputs_dir = normalized(daemon.outputs_dir)
        self.marker_suffix = daemon.marker_suffix
        self.metadata_file = daemon.metadata_file
        self.prefix = settings.object_storage.prefix

    def result(self, rel: PurePosixPath) -> Result:
        workflow = rel.parent.name if len(rel.parts) == 2 else ""
        metadata = self.metadata_file.format(
            exec=rel.name, exec_path=rel.as_posix(), workflow=workflow
        )
        return Result(
            outputs_dir=self.outputs_dir,
            rel=rel,
            marker=self.outputs_dir / rel.parent / f"{rel.name}{self.marker_suffix}",
            metadata=self.outputs_dir / metadata,
            remote_path="/".join(part for part in (self.prefix, rel.as_posix()) if part),
        )

    def for_marker(self, marker: Path) -> Result | None:
        """The result a marker file finishes, or None if the path is not a marker."""
        name = marker.name
        if not (name.startswith(EXEC_PREFIX) and name.endswith(self.marker_suffix)):
            return None
        exec_name = name[: -len(self.marker_suffix)]
        if exec_name == EXEC_PREFIX:
            return None
        try:
            parent = normalized(marker).parent.relative_to(self.outputs_dir)
        except ValueError:
            return None
        if len(parent.parts) > 1:
            return None
        return self.result(PurePosixPath(parent.as_posix(), exec_name))

    def for_tree(self, tree: Path) -> Result:
        """The result for an exec folder given on the command line."""
        path = normalized(tree)
        try:
            rel = PurePosixPath(path.relative_to(self.outputs_dir).as_posix())
        except ValueError:
            raise LayoutError(
                f"{tree} is not under outputs_dir {self.outputs_dir}: "
                "set syncd.outputs_dir (SYNCD_OUTPUTS_DIR or --outputs-dir)"
            ) from None
        if not rel.name.startswith(EXEC_PREFIX) or len(rel.parts) > 2:
            raise LayoutError(
                f"{tree} is not a result folder: expected {self.outputs_dir}/exec_* "
                f"or {self.outputs_dir}/<workflow>/exec_*"
            )
        if not path.is_dir():
            raise LayoutError(f"{tree} is not a folder")
        return self.result(rel)

    def marked(self) -> Iterator[Result]:
        """Every result whose marker exists, at the top level and one workflow folder deep."""
        for folder in [self.outputs_dir, *self.workflow_dirs()]:
            try:
                entries = sorted(os.scandir(folder), key=lambda e: e.name)
            except OSError as exc:
                logger.warning("cannot list {}: {}", folder, exc.strerror)
                continue
            for entry in entries:
                if entry.is_file():
                    result = self.for_marker(Path(entry.path))
                    if result is not None:
                        yield result

    def workflow_dirs(self) -> list[Path]:
        """Folders of outputs_dir that may hold results (anything but exec trees)."""
        try:
            return sorted(
                Path(e.path)
                for e in os.scandir(self.outputs_dir)
                if e.is_dir(follow_symlinks=False) and not e.name.startswith((EXEC_PREFIX, "."))
            )
        except OSError as exc:
            logger.warning("cannot list {}: {}", self.outputs_dir, exc.strerror)
            return []


def normalized(path: Path) -> Path:
    """Absolute, with `..` folded (not resolved: outputs_dir may itself be a symlink)."""
    return Path(os.path.normpath(path.absolute()))


def tree_files(tree: Path) -> Iterator[LocalFile]:
    """Every regular file of the tree, in a stable order; symlinks only when they stay inside.

    A symlink is uploaded as the file it points to when that file lies inside the tree, and is
    skipped with a warning otherwise: a result must never carry data from elsewhere on the host.
    Symlinked folders are never followed.
    """
    root = tree.resolve()
    if not root.is_dir():
        raise FileNotFoundError(f"result folder {tree} does not exist")
    for folder, dirnames, filenames in os.walk(root, onerror=_raise):
        base = Path(folder)
        for name in dirnames:
            if (base / name).is_symlink():
                logger.warning("{}: skipping symlinked folder {}", tree.name, base / name)
        dirnames.sort()
        for name in sorted(filenames):
            path = base / name
            rel = path.relative_to(root).as_posix()
            info = path.lstat()
            if stat.S_ISLNK(info.st_mode):
                target = path.resolve()
                if not target.is_relative_to(root) or not target.is_file():
                    logger.warning(
                        "{}: skipping symlink {} that leads outside the tree", tree.name, rel
                    )
                    continue
                info = target.stat()
            elif not stat.S_ISREG(info.st_mode):
                logger.warning("{}: skipping {}: not a regular file", tree.name, rel)
                continue
            yield LocalFile(rel, info.st_size, info.st_mtime_ns)


def _raise(error: OSError) -> None:
    # os.walk skips folders it cannot list unless told otherwise; a skipped folder is lost data.
    raise error
