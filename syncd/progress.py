"""Progress of `syncd sync` for a person: a bar on a terminal, a plain line per tenth otherwise."""

from __future__ import annotations

import sys
import time
from typing import TextIO

WIDTH = 30


class Progress:
    """Files and bytes of one result as they are uploaded."""

    def __init__(self, name: str, files: int, total: int, stream: TextIO = sys.stderr) -> None:
        self.name, self.files, self.total, self.stream = name, files, total, stream
        self.terminal = stream.isatty()
        self.done_files = self.done_bytes = 0
        self.started = self.drawn = time.monotonic()
        self.tenths = 0

    def advance(self, size: int) -> None:
        self.done_files += 1
        self.done_bytes += size
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

    def line(self, bar: bool) -> str:
        fraction = self.fraction()
        rate = self.done_bytes / max(time.monotonic() - self.started, 1e-9) / 1e6
        counts = (
            f"{self.done_files}/{self.files} files, "
            f"{self.done_bytes / 1e6:.1f}/{self.total / 1e6:.1f} MB, {rate:.1f} MB/s"
        )
        if not bar:
            return f"{self.name}: {fraction:4.0%} ({counts})"
        filled = int(WIDTH * fraction)
        return f"{self.name} [{'#' * filled}{'.' * (WIDTH - filled)}] {fraction:4.0%} {counts}"
