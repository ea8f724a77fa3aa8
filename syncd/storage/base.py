"""What syncd needs from a bucket, whichever client talks to it."""

from __future__ import annotations

from typing import Protocol

from syncd.config import ObjectStorage, redact_url
from syncd.errors import SyncdError, TransientError
from syncd.objects import ObjectHeaders
from syncd.storage.body import Body


class Multiparts(Protocol):
    """Where an adapter keeps the multipart uploads it started, until they are completed or
    aborted, so that a restart can resume them (journal.Multiparts)."""

    async def begun(self, key: str, upload_id: str, part_size: int) -> None: ...

    async def find(self, key: str) -> tuple[str, int] | None:
        """The upload id and part size of the unfinished upload of `key`."""
        ...

    async def ended(self, key: str) -> None: ...

    async def under(self, prefix: str) -> dict[str, str]:
        """Upload ids by key, for keys under `prefix`."""
        ...


class ObjectStore(Protocol):
    """What syncd needs from a bucket."""

    description: str

    async def connect(self) -> None:
        """Build the clients (no request is sent), so the first result does not wait for it."""
        ...

    async def put(self, body: Body, key: str, headers: ObjectHeaders) -> None:
        """Upload `body` as `key`: stored once the store has acknowledged it."""
        ...

    def held(self, size: int) -> int:
        """Bytes this client holds in memory at most while it uploads a file of `size`."""
        ...

    def deadline(self, size: int) -> float:
        """Seconds after which the upload of a file of `size` can only be hung: every
        request and retry of it would have timed out by then."""
        ...

    async def delete(self, keys: list[str]) -> None:
        """Delete these objects."""
        ...

    async def sizes(self, prefix: str) -> dict[str, int]:
        """Size of every object whose key starts with `prefix`."""
        ...

    async def probe(self) -> None:
        """Reach the bucket with one cheap listing; raise SyncdError if that fails."""
        ...

    async def abort_uploads(self, prefix: str, keep: set[str]) -> int:
        """Abort the unfinished multipart uploads under `prefix`, but those of the keys in
        `keep` that can be resumed; return how many."""
        ...

    async def close(self) -> None: ...


class Pages:
    """A listing's pages as a store hands them out: one whose next page is one it handed out
    already (a token, a marker, keys listed before) would page forever, and is a SyncdError
    instead."""

    def __init__(self, action: str) -> None:
        self.action = action
        self.seen: set[object] = set()

    def turn(self, mark: object) -> None:
        """The store points to its next page with `mark` (a token or a marker)."""
        if not mark or mark in self.seen:
            raise self.repeated()
        self.seen.add(mark)

    def repeated(self) -> SyncdError:
        return TransientError(
            f"{self.action} failed: the store pages through the same listing again and again "
            "(a continuation token, a marker or a key repeats): a fault of the store; retrying"
        )


def location(storage: ObjectStorage) -> str:
    endpoint = redact_url(storage.endpoint_url or "") or (
        "s3-accelerate" if storage.accelerated else "AWS S3"
    )
    return f"s3://{storage.bucket} ({endpoint}, {storage.region})"
