"""Where results live: exec trees, their completion markers and metadata, and their keys in S3.

A result is `<outputs_dir>/exec_*/` or `<outputs_dir>/<workflow>/exec_*/`. The metadata file is
a template relative to outputs_dir, read both ways: from a result to its file, and from a file
to its result. What says a result is finished (`completion`) is its marker
`<exec dir><marker_suffix>` beside the tree, or its metadata file (the Earth2Studio server
writes no marker). Objects go to `<prefix>/<exec path under outputs_dir>/<path in tree>`.
"""

from __future__ import annotations

import os
import re
import string
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from loguru import logger

from syncd.config import Settings
from syncd.errors import InputError, printable
from syncd.marker import EXEC_PREFIX


class LayoutError(InputError):
    """A path given on the command line that is not a result under outputs_dir (exit 2)."""


@dataclass(frozen=True)
class Result:
    """One exec tree and the files around it."""

    outputs_dir: Path
    rel: PurePosixPath  # exec_X or <workflow>/exec_X
    marker: Path
    metadata: Path
    remote_path: str  # <prefix>/<rel>
    by_metadata: bool = False  # finished when its metadata says so, not by a marker

    @property
    def signal(self) -> Path:
        """The file that says the result is finished."""
        return self.metadata if self.by_metadata else self.marker

    @property
    def signal_name(self) -> str:
        return "metadata" if self.by_metadata else "marker"

    def signal_gone(self) -> bool:
        """Whether its signal is known not to exist: not merely unseen, in a folder syncd may
        not search (said by the scan), which is no reason to forget the result."""
        try:
            os.stat(self.signal)
        except (FileNotFoundError, NotADirectoryError):
            return True
        except OSError:
            return False
        return False

    @property
    def name(self) -> str:
        return self.rel.name

    @property
    def tree(self) -> Path:
        return self.outputs_dir / self.rel

    def key(self, path_in_tree: str) -> str:
        return f"{self.remote_path}/{path_in_tree}"


class Layout:
    """Maps paths under outputs_dir to results, following the configured names."""

    def __init__(self, settings: Settings) -> None:
        daemon = settings.syncd
        self.outputs_dir = normalized(daemon.outputs_dir)
        self.marker_suffix = daemon.marker_suffix
        self.metadata_file = daemon.metadata_file
        self.metadata_pattern = metadata_pattern(daemon.metadata_file)
        self.by_metadata = daemon.completion == "metadata"
        self.prefix = settings.object_storage.prefix
        # Folders already said to be symlinks (by path) or unlistable (list:<path>).
        self.reported: set[str] = set()

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
            by_metadata=self.by_metadata,
        )

    def for_path(self, path: Path) -> Result | None:
        """The result a path belongs to: its marker, its metadata file or its tree; None for
        anything else."""
        return self.for_marker(path) or self.for_metadata(path) or self.for_folder(path)

    def for_metadata(self, path: Path) -> Result | None:
        """The result whose metadata file is `path` (the template read backwards)."""
        try:
            rel_path = normalized(path).relative_to(self.outputs_dir).as_posix()
        except ValueError:
            return None
        match = self.metadata_pattern.fullmatch(rel_path)
        if match is None:
            return None
        fields = match.groupdict()
        if fields.get("exec_path"):
            rel = PurePosixPath(fields["exec_path"])
        elif "workflow" in fields and fields.get("exec"):
            rel = PurePosixPath(fields["workflow"], fields["exec"])
        else:
            return None  # the template does not say which workflow (config refuses this)
        if not result_path(rel) or not self.nameable(rel):
            return None
        result = self.result(rel)
        return result if result.metadata == normalized(path) else None

    def for_folder(self, path: Path) -> Result | None:
        """The result whose tree is `path`."""
        try:
            rel = PurePosixPath(normalized(path).relative_to(self.outputs_dir).as_posix())
        except ValueError:
            return None
        return self.result(rel) if result_path(rel) and self.nameable(rel) else None

    def for_marker(self, marker: Path) -> Result | None:
        """The result a marker file finishes, or None if the path is not a marker."""
        exec_name = marker.name.removesuffix(self.marker_suffix)
        if exec_name == marker.name or not exec_name:
            return None
        return self.for_folder(marker.with_name(exec_name))

    def nameable(self, rel: PurePosixPath) -> bool:
        """Whether the result `rel` has a name it can be published under; one that has not is
        said once, as an input error, and left alone."""
        problem = name_problem(self.outputs_dir / rel, rel)
        if problem is None:
            return True
        if f"name:{rel}" not in self.reported:
            self.reported.add(f"name:{rel}")
            logger.error("{}", problem)
        return False

    def for_tree(self, tree: Path) -> Result:
        """The result for an exec folder given on the command line: one the daemon would
        publish, or a LayoutError that says why not."""
        given = printable(str(tree))
        path = normalized(tree)
        rel = self.under_outputs_dir(path)
        if rel is None:
            raise LayoutError(
                f"{given} is not under outputs_dir {self.outputs_dir}: "
                "set syncd.outputs_dir (SYNCD_OUTPUTS_DIR or --outputs-dir)"
            )
        if not result_path(rel):
            raise LayoutError(
                f"{given} is not a result folder: expected {self.outputs_dir}/exec_* "
                f"or {self.outputs_dir}/<workflow>/exec_* (not in a folder whose name starts "
                "with . or exec_)"
            )
        if (problem := name_problem(self.outputs_dir / rel, rel)) is not None:
            raise LayoutError(problem)
        workflow = self.outputs_dir / rel.parent
        if len(rel.parts) == 2 and workflow.is_symlink():
            raise LayoutError(self.symlinked_workflow(workflow))
        path = self.outputs_dir / rel
        if not path.is_dir():
            raise LayoutError(f"{given} {'is not a folder' if path.exists() else 'does not exist'}")
        return self.result(rel)

    def symlinked_workflow(self, folder: Path) -> str:
        return (
            f"workflow folder {printable(str(folder))} is a symlink; syncd never follows one, "
            f"so its results are not uploaded: move the folder itself into {self.outputs_dir}"
        )

    def under_outputs_dir(self, path: Path) -> PurePosixPath | None:
        """`path` (absolute, folded) as a path under outputs_dir, also when one of them was
        reached through a symlink (a shell's working folder is the real one); None if it is
        not under it."""
        for folder, base in (
            (path, self.outputs_dir),
            (
                Path(os.path.realpath(path.parent)) / path.name,
                Path(os.path.realpath(self.outputs_dir)),
            ),
        ):
            try:
                return PurePosixPath(folder.relative_to(base).as_posix())
            except ValueError:
                continue
        return None

    def to_sign(self, target: str) -> str:
        """The remote_path `syncd sign` signs for `target`: a result folder's; a result's whose
        tree delete_local_after_upload removed (given by its path: its metadata is still
        there); or a result's remote_path as given."""
        path = Path(target)
        if path.is_dir():
            return self.for_tree(path).remote_path
        rel = self.under_outputs_dir(normalized(path))
        if (
            rel is not None
            and result_path(rel)
            and name_problem(self.outputs_dir / rel, rel) is None
            and self.result(rel).metadata.is_file()
        ):
            return self.result(rel).remote_path
        return self.remote(target)

    def remote(self, remote_path: str) -> str:
        """A result's remote_path as given on the command line (`syncd sign`), checked to name
        one: `<prefix>/exec_*` or `<prefix>/<workflow>/exec_*`, nothing more, nothing less."""
        parts = remote_path.strip("/").split("/")
        prefix = self.prefix.split("/") if self.prefix else []
        rel = PurePosixPath(*parts[len(prefix) :]) if len(parts) > len(prefix) else None
        if (
            parts[: len(prefix)] != prefix
            or rel is None
            or not result_path(rel)
            or any(part in ("", ".", "..") for part in parts)
            or CONTROL.search(remote_path)
        ):
            raise LayoutError(
                f"{printable(remote_path)} is neither a result folder nor a result's remote_path: "
                f"give {self.outputs_dir}/[<workflow>/]exec_* or "
                f"{self.prefix + '/' if self.prefix else ''}[<workflow>/]exec_*"
            )
        return "/".join(parts)

    def signalled(self) -> Iterator[Result]:
        """Every result whose completion signal exists: its marker, or with completion by
        metadata its metadata file (whatever it says yet), at the top level and one workflow
        folder deep."""
        find: Callable[[Path], Result | None]
        if self.by_metadata:
            folders, find = self.metadata_folders(), self.for_metadata
        else:
            folders, find = [self.outputs_dir, *self.workflow_dirs()], self.for_marker
        for folder in folders:
            try:
                entries = sorted(os.scandir(folder), key=lambda e: e.name)
            except FileNotFoundError:
                continue  # a metadata folder not made yet
            except OSError as exc:
                self.unlisted(folder, exc)
                continue
            self.reported.discard(f"list:{folder}")
            for entry in entries:
                if entry.is_file():
                    result = find(Path(entry.path))
                    if result is not None:
                        yield result

    def metadata_folders(self) -> list[Path]:
        """The folders metadata files go to: one per workflow folder, or one for all."""
        workflows = ["", *(folder.name for folder in self.workflow_dirs())]
        samples = (self.result(PurePosixPath(w, "exec_x")) for w in workflows)
        return sorted({sample.metadata.parent for sample in samples})

    def unlisted(self, folder: Path, exc: OSError) -> None:
        """A folder that cannot be listed: said once, until it can be again."""
        if f"list:{folder}" in self.reported:
            return
        self.reported.add(f"list:{folder}")
        logger.error(
            "cannot list {} ({}): give the syncd user read and search access to it; until then "
            "the results in it are not seen",
            printable(str(folder)),
            exc.strerror or exc,
        )

    def workflow_dirs(self) -> list[Path]:
        """Folders of outputs_dir that may hold results (anything but exec trees). A symlink to
        a folder is never one: it is reported once and left alone."""
        try:
            entries = list(os.scandir(self.outputs_dir))
        except OSError as exc:
            self.unlisted(self.outputs_dir, exc)
            return []
        self.reported.discard(f"list:{self.outputs_dir}")
        folders = []
        for entry in entries:
            if entry.name.startswith((EXEC_PREFIX, ".")):
                continue
            if entry.is_dir(follow_symlinks=False):
                folders.append(Path(entry.path))
            elif entry.is_symlink() and entry.is_dir() and entry.path not in self.reported:
                self.reported.add(entry.path)
                logger.error("{}", self.symlinked_workflow(Path(entry.path)))
        return sorted(folders)


def name_problem(tree: Path, rel: PurePosixPath) -> str | None:
    """Why the result `rel` (its folder `tree`) cannot be published under its name, which is
    part of every key, of remote_path and of what syncd says; or None."""
    name = rel.as_posix()
    if name != name.encode("utf-8", "surrogateescape").decode("utf-8", "replace"):
        problem = "its name is not valid UTF-8, which S3 keys must be"
    elif CONTROL.search(name):
        problem = "its name holds control characters"
    else:
        return None
    return (
        f"result folder {printable(str(tree))} cannot be uploaded: {problem}: rename the folder "
        "(the result is published once it is fixed)"
    )


def result_path(rel: PurePosixPath) -> bool:
    """Whether `rel` (under outputs_dir) names a result: exec_X or <workflow>/exec_X."""
    name = rel.name
    if not name.startswith(EXEC_PREFIX) or name == EXEC_PREFIX or len(rel.parts) > 2:
        return False
    return len(rel.parts) == 1 or not rel.parts[0].startswith((EXEC_PREFIX, "."))


PLACEHOLDERS = {
    "exec": f"{EXEC_PREFIX}[^/]+",
    "exec_path": f"(?:[^/]+/)?{EXEC_PREFIX}[^/]+",
    "workflow": "[^/]*",
}


def metadata_pattern(template: str) -> re.Pattern[str]:
    """A regular expression that reads the placeholders back out of a metadata file's path."""
    parts = []
    seen: set[str] = set()
    for literal, name, _, _ in string.Formatter().parse(template):
        parts.append(re.escape(literal))
        if name is None:
            continue
        parts.append(f"(?P={name})" if name in seen else f"(?P<{name}>{PLACEHOLDERS[name]})")
        seen.add(name)
    return re.compile("".join(parts), re.DOTALL)


def normalized(path: Path) -> Path:
    """Absolute, with `..` folded (not resolved: outputs_dir may itself be a symlink)."""
    return Path(os.path.normpath(path.absolute()))


CONTROL = re.compile("[\x00-\x1f\x7f-\x9f]")
