"""A local file's bytes as an upload reads them, with their MD5 computed on the way."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import BinaryIO

from syncd.errors import SyncdError

# Files up to this size are read on the event loop: a thread costs more than the read.
READ_INLINE = 256 * 1024


class Body:
    """The bytes of one file as they are read, with their MD5 computed on the way (each read
    starts it afresh); a file that does not hold exactly `size` bytes any more is the SyncdError
    `changed()` makes (made only then: a read that holds is the rule)."""

    def __init__(self, path: Path, size: int, changed: Callable[[], SyncdError]) -> None:
        self.path = path
        self.size = size
        self.changed = changed
        self.md5 = hashlib.md5()

    async def whole(self) -> bytes:
        if self.size <= READ_INLINE:
            return self._read_whole()
        return await asyncio.to_thread(self._read_whole)

    def _read_whole(self) -> bytes:
        with open(self.path, "rb") as f:
            data = f.read(self.size + 1)
        if len(data) != self.size:
            raise self.changed()
        self.md5 = hashlib.md5(data)
        return data

    async def parts(
        self, part_size: int, digests: list[bytes] | None = None
    ) -> AsyncIterator[bytes]:
        """The file in pieces of `part_size` (the last one shorter), in order; each piece's own
        MD5 appended to `digests` if given (a multipart ETag is made of them)."""
        self.md5 = hashlib.md5()
        with open(self.path, "rb") as f:
            left = self.size
            while left > 0:
                piece = await asyncio.to_thread(self._read_piece, f, min(part_size, left), digests)
                left -= len(piece)
                yield piece
            if await asyncio.to_thread(f.read, 1):
                raise self.changed()

    def _read_piece(self, f: BinaryIO, size: int, digests: list[bytes] | None) -> bytes:
        data = f.read(size)
        if len(data) != size:
            raise self.changed()
        self.md5.update(data)
        if digests is not None:
            digests.append(hashlib.md5(data).digest())
        return data

    def hexdigest(self) -> str:
        return self.md5.hexdigest()
