"""Progress of one result's upload: counted as the store acknowledges each file, for
`syncd status` and the STATUS= line, and drawn for a person running `syncd sync` (a bar on a
terminal, a plain line per tenth otherwise)."""

from __future__ import annotations

import time
from typing import TextIO

WIDTH = 30


class Progress:
    """Files and bytes of one result as they are uploaded; drawn on `stream` if one is given."""

    def __init__(self, name: str, files: int, total: int, stream: TextIO | None = None) -> None:
        self.name, self.files, self.total, self.stream = name, files, total, stream
        self.terminal = stream is not None and stream.isatty()
        self.done_files = self.done_bytes = 0
        self.started = self.drawn = time.monotonic()
        self.tenths = 0

    def advance(self, size: int, files: int = 1) -> None:
        self.done_files += files
        self.done_bytes += size
        if self.stream is None:
            return
        now = time.monotonic()
        finished = self.done_files == self.files
        if self.terminal:
            if finished or now - self.drawn >= 0.1:
                self.drawn = now
                self.stream.write("\r" + self.line(bar=True))
                if finished:
                    self.stream.write("\n")
                self.stream.flush()
            return
        tenths = int(10 * self.fraction())
        if tenths > self.tenths or finished:
            self.tenths = tenths
            self.stream.write(self.line(bar=False) + "\n")
            self.stream.flush()

    def fraction(self) -> float:
        if self.total:
            return self.done_bytes / self.total
        return self.done_files / self.files if self.files else 1.0

    def rate(self) -> float:
        """Bytes per second acknowledged since the upload began."""
        return self.done_bytes / max(time.monotonic() - self.started, 1e-9)

    def line(self, bar: bool) -> str:
        fraction = self.fraction()
        rate = self.rate() / 1e6
        counts = (
            f"{self.done_files}/{self.files} files, "
            f"{self.done_bytes / 1e6:.1f}/{self.total / 1e6:.1f} MB, {rate:.1f} MB/s"
        )
        if not bar:
            return f"{self.name}: {fraction:4.0%} ({counts})"
        filled = int(WIDTH * fraction)
        return f"{self.name} [{'#' * filled}{'.' * (WIDTH - filled)}] {fraction:4.0%} {counts}"


def amount(done: int, total: int) -> str:
    """Bytes done of a total, in the total's unit: `310/820 MB`, `1.2/4.0 GB`, `12/70 kB`."""
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if total >= size:
            digits = 1 if total < 10 * size else 0
            return f"{done / size:.{digits}f}/{total / size:.{digits}f} {unit}"
    return f"{done}/{total} B"


def speed(rate: float) -> str:
    """Bytes per second as a person reads them: `42 MB/s`, `1.5 MB/s`, `310 kB/s`."""
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if rate >= size:
            return f"{rate / size:.{1 if rate < 10 * size else 0}f} {unit}/s"
    return f"{rate:.0f} B/s"
