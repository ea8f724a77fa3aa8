"""What every result uploading at once shares, and so what `max_concurrency` means: at most
`max_concurrency` files in flight (the seed's "max concurrent transfers", shared by all results),
each sending up to PARTS_PER_FILE parts at once, and at most `upload_buffer` bytes of their data
held in memory.

A file takes one transfer slot and reserves what its client holds in memory while sending it
(the store's `held()`), and gives both back when it is done. So requests in flight stay at
`requests_in_flight(max_concurrency)` and memory near upload_buffer, however large the files
are and however many results upload at once.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

# Parts of one multipart file in flight at once; the rest of the parallelism is across files.
# Two keep a loopback upload as fast as four did, at half the memory per file (measured).
PARTS_PER_FILE = 2


def requests_in_flight(max_concurrency: int) -> int:
    """The most requests that carry file bytes at once: what a client's connection pool needs."""
    return PARTS_PER_FILE * max_concurrency


class TransferBudget:
    def __init__(self, transfers: int, limit: int) -> None:
        self.transfers = transfers
        self.limit = limit
        self.active = 0
        self.used = 0
        self.changed = asyncio.Condition()

    @asynccontextmanager
    async def hold(self, amount: int) -> AsyncIterator[None]:
        """One transfer slot and `amount` bytes (at most the whole limit, so a file larger
        than the limit still goes, alone)."""
        amount = min(amount, self.limit)
        async with self.changed:
            await self.changed.wait_for(
                lambda: self.active < self.transfers and self.used + amount <= self.limit
            )
            self.active += 1
            self.used += amount
        try:
            yield
        finally:
            async with self.changed:
                self.active -= 1
                self.used -= amount
                self.changed.notify_all()
