"""What every result uploading at once shares, and so what `max_concurrency` and
`max_bandwidth` mean: at most `files_in_flight(max_concurrency, max_bandwidth)` files in
flight, shared by all results, each sending up to PARTS_PER_FILE parts at once, at most
`upload_buffer` bytes of their data held in memory, and at most `max_bandwidth` bytes a second
on the wire (storage/relay.py) for all of them together.

The seed calls `max_concurrency` "max concurrent transfers"; the Earth2Studio server's uploader
(multi-storage-client's `sync_from`, Rust client) passes it on as the parts of one file at once,
the meaning s3transfer's and multi-storage-client's `max_concurrency` have, and keeps 8 workers x
16 files in flight whatever it is set to: 128 files, a mean of 55 requests in flight on 2,025
small files through a 40 ms link (bench/). Over such a link each small file costs a round trip,
so files in flight decide the time: at 16 files syncd did 336 files/s, at 128 the server's 554.
syncd takes the setting as the load it may put on the store and the link, counted as the server
counts it at its default: FILES_PER_TRANSFER x max_concurrency files (128 at 16), a smaller
setting still fewer.

A file takes one transfer slot and reserves what its client holds in memory while sending it
(the store's `held()`), and gives both back when it is done. So requests in flight stay at
`requests_in_flight(max_concurrency)` and memory near upload_buffer, however large the files
are and however many results upload at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import resource
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

# While a store pushes back: the window is halved at most this often when no file gets through,
# and grows fast again once it has not pushed back for RECOVERED seconds.
PUSHBACK_EVERY = 2.0
RECOVERED = 10.0
# A store that still pushes back at one file in flight gets a pause before the next file starts,
# doubling from FLOOR_PAUSE to FLOOR_MAX_PAUSE until a file gets through: the rate of requests
# keeps falling, as in the AWS SDKs' adaptive retry mode, instead of one file after another.
FLOOR_PAUSE = 0.5
FLOOR_MAX_PAUSE = 16.0

# Parts of one multipart file in flight at once; the rest of the parallelism is across files.
# Two keep a loopback upload as fast as four did, at half the memory per file (measured).
PARTS_PER_FILE = 2

# Files in flight per unit of max_concurrency: the server's uploader's 8 workers.
FILES_PER_TRANSFER = 8

# The slowest link a request must still get through, in bytes per second per request. A
# request is failed only once it has taken longer than its bytes need at this rate (plus a
# minute), so a slow uplink shared by many transfers never fails one that is moving. Under a
# bandwidth cap, no more files go at once than the cap feeds at this rate, and the smallest
# cap feeds one file's parts.
SLOWEST_RATE = 16 * 1024
MIN_BANDWIDTH = PARTS_PER_FILE * SLOWEST_RATE


# Descriptors one file in flight may hold: the file, and a connection for each part in flight
# with one to spare. Descriptors kept for everything else (the watcher, the state, the logs).
DESCRIPTORS_PER_FILE = PARTS_PER_FILE + 2
DESCRIPTORS_KEPT = 256


def files_in_flight(max_concurrency: int, max_bandwidth: int | None = None) -> int:
    """At most FILES_PER_TRANSFER x max_concurrency, no more than the process may hold
    descriptors for (under systemd's soft limit of 1,024 a max_concurrency of 64 would ask for
    about 2,000 and fail every result on 'Too many open files'; `raise_open_files` lifts the
    soft limit first, as far as the hard one allows), and no more than a bandwidth cap feeds
    at SLOWEST_RATE a request."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    room = max(FILES_PER_TRANSFER, (soft - DESCRIPTORS_KEPT) // DESCRIPTORS_PER_FILE)
    fed = room if max_bandwidth is None else max(1, max_bandwidth // MIN_BANDWIDTH)
    return min(FILES_PER_TRANSFER * max_concurrency, room, fed)


def raise_open_files() -> None:
    """Lift the soft limit of open files to the hard one (systemd sets 1,024 and 524,288), as
    programs that need many descriptors are to do themselves."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = hard if hard != resource.RLIM_INFINITY else 1 << 20
    if soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))


def requests_in_flight(max_concurrency: int) -> int:
    """The most requests that carry file bytes at once: what a client's connection pool needs."""
    return PARTS_PER_FILE * files_in_flight(max_concurrency)


class TransferBudget:
    """Transfer slots and held bytes, shared by every result. A store that pushes back (503
    SlowDown) narrows the slots as TCP narrows its window: halved at most once a window of
    files (or every PUSHBACK_EVERY seconds while none gets through), widened by one each
    window of files acknowledged, and doubled each window once the store has not pushed back
    for RECOVERED seconds; never above `transfers`, and below one file as a pause between
    files (FLOOR_PAUSE)."""

    def __init__(self, transfers: Callable[[], int], limit: int) -> None:
        """`transfers`: files in flight at most, asked at each admission (a reload may
        change it); `limit`: bytes held at most."""
        self.most = transfers
        self.limit = limit
        self.active = 0
        self.used = 0
        self.changed = asyncio.Condition()
        self.window = math.inf  # files in flight the store takes now
        self.pushed_at = -math.inf  # when the store last pushed back (monotonic)
        self.narrowed_at = -math.inf  # when the window was last halved
        self.since_narrowed = 0  # files acknowledged since
        self.floor_pause = 0.0  # the pause between files at one file in flight, while pushed back
        self.resume_at = -math.inf  # no file starts before (monotonic)

    @property
    def transfers(self) -> int:
        most = self.most()
        return most if self.window >= most else max(1, int(self.window))

    @property
    def narrowed(self) -> bool:
        return self.window < self.most()

    def pushed_back(self) -> bool:
        """The store refused a file for the rate of requests; True if that narrowed the window
        (at one file it cannot narrow further)."""
        now = time.monotonic()
        self.pushed_at = now
        if self.window <= 1:  # one file at a time is still too many
            self.floor_pause = min(max(FLOOR_PAUSE, 2 * self.floor_pause), FLOOR_MAX_PAUSE)
            self.resume_at = now + self.floor_pause
            return False
        width = min(self.window, self.most())
        if self.since_narrowed < width and now - self.narrowed_at < PUSHBACK_EVERY:
            return False  # a refusal of the same window: halved for it already
        before = self.transfers
        self.window = max(1.0, min(width, self.active) / 2)
        self.narrowed_at, self.since_narrowed = now, 0
        return self.transfers != before

    def acknowledged(self) -> bool:
        """A file was stored; True if that ended a narrowing (the window is whole again)."""
        self.since_narrowed += 1
        self.floor_pause = 0.0
        if not self.narrowed:
            return False
        calm = time.monotonic() - self.pushed_at > RECOVERED
        self.window += 1.0 if calm else 1.0 / self.window
        if self.window < self.most():
            return False
        self.window = math.inf
        return True

    @asynccontextmanager
    async def hold(self, amount: int) -> AsyncIterator[None]:
        """One transfer slot and `amount` bytes (at most the whole limit, so a file larger
        than the limit still goes, alone)."""
        amount = min(amount, self.limit)
        async with self.changed:
            while True:
                paused = self.resume_at - time.monotonic()
                if paused > 0:
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(paused):
                            await self.changed.wait()
                elif self.active < self.transfers and self.used + amount <= self.limit:
                    break
                else:
                    await self.changed.wait()
            self.active += 1
            self.used += amount
        try:
            yield
        finally:
            async with self.changed:
                self.active -= 1
                self.used -= amount
                self.changed.notify_all()
