"""Whether the store holds the bytes syncd sent, from the ETag it answered: a PutObject's is the
MD5 of the bytes, a multipart upload's the MD5 of its parts' MD5s followed by `-` and their
count, both computed from digests syncd has already (no second pass over the bytes). A store
that verifies no checksum (moto, some gateways) keeps a byte flipped on the way, and its answer
shows it. A store whose ETags are not MD5s (encryption) is found out by reading objects back:
once NOT_MD5S in a row hold the bytes sent under other ETags, the store is relied on for its own
checks of the checksum headers, until it answers an MD5 ETag again. One odd answer (a garbled
header on the way) never turns the checks off."""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from loguru import logger

from syncd.errors import OperatorError, SyncdError, damaged

# Reads an object's bytes back, in pieces of any size.
Reader = Callable[[str], AsyncIterator[bytes]]
# Objects read back in a row, each holding the bytes sent under an ETag that is not their MD5,
# before the store's ETags are taken for something else than MD5s.
NOT_MD5S = 3


@dataclass(frozen=True)
class Sent:
    """What was sent as one object: its bytes' MD5, or its parts' MD5s and their size."""

    digests: tuple[bytes, ...]
    part_size: int | None = None  # None: one PutObject

    @classmethod
    def whole(cls, digest: bytes) -> Sent:
        return cls((digest,))

    @classmethod
    def parts(cls, digests: list[bytes], part_size: int) -> Sent:
        return cls(tuple(digests), part_size)

    @property
    def etag(self) -> str:
        """The ETag a store that keeps these bytes answers for them."""
        if self.part_size is None:
            return self.digests[0].hex()
        return f"{hashlib.md5(b''.join(self.digests)).hexdigest()}-{len(self.digests)}"

    async def of_stored(self, pieces: AsyncIterator[bytes]) -> str:
        """The ETag of the bytes `pieces` holds, cut into parts as these were."""
        if self.part_size is None:
            whole = hashlib.md5()
            async for piece in pieces:
                whole.update(piece)
            return whole.hexdigest()
        digests: list[bytes] = []
        part, filled = hashlib.md5(), 0
        async for piece in pieces:
            view = memoryview(piece)
            while view:
                take = min(len(view), self.part_size - filled)
                part.update(view[:take])
                view, filled = view[take:], filled + take
                if filled == self.part_size:
                    digests.append(part.digest())
                    part, filled = hashlib.md5(), 0
        if filled:
            digests.append(part.digest())
        return Sent.parts(digests, self.part_size).etag


class Etags:
    """Checks each answered ETag against what was sent, while `checking`: for a store that may
    verify nothing (a custom endpoint). AWS S3 verifies the checksum header of every request."""

    def __init__(self, description: str, checking: bool) -> None:
        self.description = description
        self.checking = checking
        self.not_md5s = 0  # objects read back in a row that hold what was sent, ETags aside
        self.relied = False  # found out: the store's ETags are not MD5s

    def missing(self, key: str) -> SyncdError:
        """The store acknowledged `key` without an ETag."""
        return OperatorError(
            f"upload of {key} failed: {self.description} acknowledged it without an ETag, "
            "which no S3 store does: check that endpoint_url is the store's S3 API"
        )

    async def check(self, key: str, answered: str | None, sent: Sent, read: Reader) -> None:
        """The store answered `answered` for `key`: unless it is the ETag of what was sent, the
        object's bytes decide whether they were damaged on the way (a transient SyncdError: the
        file is sent again) or this ETag is not an MD5."""
        etag = (answered or "").strip('"').lower()
        if not self.checking:
            return
        if etag == sent.etag:
            self.not_md5s = 0
            if self.relied:
                self.relied = False
                logger.info("{} answers MD5 ETags again: checking them", self.description)
            return
        if not etag:  # every S3 store answers one: this is something else
            raise self.missing(key)
        if self.relied:
            return
        stored = await sent.of_stored(read(key))
        if stored != sent.etag:
            if etag == stored:  # the ETag is the stored bytes' MD5: the store does answer MD5s
                self.not_md5s = 0
            raise damaged(key, stored=stored, sent=sent.etag)
        self.not_md5s += 1
        if self.not_md5s >= NOT_MD5S and not self.relied:
            self.relied = True
            logger.info(
                "{} answers ETags that are not MD5s (encryption?): relying on its own checks of "
                "the checksum headers",
                self.description,
            )
