"""The memory bound: at most a fixed number of bytes of file data in flight, across every
result being uploaded.

Both clients hold a file (or, for multipart, up to PARTS_PER_FILE parts of it) in memory
while they send it. A file reserves that much before its upload starts and gives it back
after, so memory stays near max_concurrency x multipart_chunksize however large the files
are and however many results upload at once.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

# Parts of one multipart file in flight at once; the rest of the parallelism is across files.
PARTS_PER_FILE = 4


class ByteBudget:
    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0
        self.changed = asyncio.Condition()

    def cost(self, size: int, chunksize: int) -> int:
        """What uploading a file of `size` bytes holds in memory at most."""
        return min(size, PARTS_PER_FILE * chunksize, self.limit)

    @asynccontextmanager
    async def hold(self, amount: int) -> AsyncIterator[None]:
        async with self.changed:
            await self.changed.wait_for(lambda: self.used + amount <= self.limit)
            self.used += amount
        try:
            yield
        finally:
            async with self.changed:
                self.used -= amount
                self.changed.notify_all()
