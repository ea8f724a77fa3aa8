"""How long a request, a file and a client's own retries may take: sized by the bytes they
carry, so a slow link never fails a transfer that moves and a hung one is given up in time."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from datetime import timedelta
from typing import Any

from syncd.budget import PARTS_PER_FILE, SLOWEST_RATE
from syncd.errors import Unanswered

# A few quick retries inside the client absorb a single failed request (rclone serve s3 fails
# one now and then); longer outages are the daemon's to retry, with backoff, per result.
CLIENT_RETRIES: Any = {
    "max_retries": 3,
    "retry_timeout": timedelta(seconds=30),
    "backoff": {
        "init_backoff": timedelta(milliseconds=100),
        "max_backoff": timedelta(seconds=2),
        "base": 2,
    },
}


CONNECT_TIMEOUT = 10.0
# Silence after a request was sent before it is retried: a store may work on an answer for a
# while (CompleteMultipartUpload of GiBs), and S3 sends whitespace meanwhile.
READ_TIMEOUT = 120.0
# How long a request without a body (a listing page, an abort, a delete) may take, the
# client's retries of it included: one try's timeouts. A store slow to list (rclone hashes
# each object it lists) answers within them; one that never answers would otherwise hold the
# attempt through every retry of both clients, some 18 minutes, without a word.
ANSWER_TIMEOUT = CONNECT_TIMEOUT + READ_TIMEOUT


def request_timeout(request_bytes: int) -> float:
    """Seconds a request carrying `request_bytes` may take."""
    return 60.0 + request_bytes / SLOWEST_RATE


def answered(key: str, request_bytes: int) -> AbstractAsyncContextManager[None]:
    """Bounds a request that carries `request_bytes` of `key`, the client's quick retries of it
    included, by `request_timeout`: a store that takes it and never answers (not even "100
    Continue", which botocore asks for and then waits on with no timeout) is a transient
    SyncdError then, not a worker held until the file's deadline."""
    limit = request_timeout(request_bytes)
    return unanswered_after(limit, f"upload of {key}", " (a minute, and its bytes at 16 kB/s)")


def asked(action: str) -> AbstractAsyncContextManager[None]:
    """Bounds one request without a body (its client's retries included) by ANSWER_TIMEOUT."""
    return unanswered_after(ANSWER_TIMEOUT, action)


@asynccontextmanager
async def unanswered_after(limit: float, action: str, why: str = "") -> AsyncIterator[None]:
    """`action`, given up as Unanswered once `limit` seconds passed (`why` that long)."""
    try:
        async with asyncio.timeout(limit):
            yield
    except TimeoutError:
        raise Unanswered(
            f"{action} failed: no answer within {limit:.0f} s{why}: the store takes requests "
            "but does not answer them"
        ) from None


def file_deadline(size: int, single_below: int, part_bytes: int, retries: int) -> float:
    """Seconds the requests of one file may take, every retry included: one request below
    `single_below` bytes, else parts of `part_bytes`, PARTS_PER_FILE at once. Sized by the
    file, so a small file's upload that hangs outside any request (a client's connection pool,
    say) is given up in minutes, not in the hours a part could take."""
    if size < single_below:
        return (retries + 1) * request_timeout(size) + 60.0
    rounds = -(-size // (part_bytes * PARTS_PER_FILE))
    return (retries + 1) * rounds * request_timeout(part_bytes) + 60.0
