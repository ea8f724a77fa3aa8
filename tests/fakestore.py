"""An in-memory stand-in for `syncd.storage.ObjectStore`: a dict of key -> bytes, read from the
`Body` it is given as the real adapters read it, that can be told to fail with the errors the
adapters raise (botocore's, translated as the s3fs adapter translates them), to lose what it
acknowledges, to keep other bytes than it was sent, or to run a hook while a file is sent."""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from botocore.exceptions import ClientError, EndpointConnectionError

from syncd.objects import ObjectHeaders
from syncd.storage.body import Body
from syncd.storage.etags import Etags, Sent
from syncd.storage.s3fs_client import failures

PART_SIZE = 8 * 1024 * 1024


def s3_error(code: str, message: str, operation: str = "PutObject") -> ClientError:
    """An S3 error answer as botocore raises it."""
    return ClientError({"Error": {"Code": code, "Message": message}}, operation)


def access_denied() -> ClientError:
    return s3_error("AccessDenied", "Access Denied")


def slow_down() -> ClientError:
    return s3_error("SlowDown", "Please reduce your request rate.")


def unreachable() -> EndpointConnectionError:
    """The store does not answer at all (a transient connection failure)."""
    return EndpointConnectionError(endpoint_url="http://127.0.0.1:9/bucket")


@dataclass
class Failure:
    make: Callable[[], Exception]
    times: int | None  # None: every time
    key_suffix: str  # only puts of keys ending so ("": any)

    def applies(self, key: str) -> bool:
        return key.endswith(self.key_suffix) and (self.times is None or self.times > 0)


class FakeStore:
    """What a bucket holds, in memory; `puts` lists every key a put was asked for (failed ones
    too), `stored` counts the puts of each key the store acknowledged."""

    description = "fake store (memory)"

    def __init__(self, part_size: int = PART_SIZE, check_etags: bool = False) -> None:
        self.part_size = part_size
        self.objects: dict[str, bytes] = {}
        self.headers: dict[str, ObjectHeaders] = {}
        self.puts: list[str] = []
        self.stored: Counter[str] = Counter()
        self.deleted: list[str] = []
        self.failures: list[Failure] = []
        self.lose: set[str] = set()  # key suffixes acknowledged but never kept
        self.flip: set[str] = set()  # key suffixes kept with one byte flipped
        self.while_sending: Callable[[str], None] | None = None  # after the body was read
        self.connected = self.closed = False
        # A store that may verify nothing answers the MD5 of what it keeps, as moto does; the
        # adapters check it with `Etags` on a custom endpoint.
        self.etags = Etags(self.description, checking=check_etags)

    def fail(
        self, make: Callable[[], Exception], times: int | None = 1, key_suffix: str = ""
    ) -> None:
        """Fail the next `times` puts (None: all) of keys ending with `key_suffix`."""
        self.failures.append(Failure(make, times, key_suffix))

    def healed(self) -> None:
        self.failures.clear()

    async def connect(self) -> None:
        self.connected = True

    async def close(self) -> None:
        self.closed = True

    async def put(self, body: Body, key: str, headers: ObjectHeaders) -> None:
        self.puts.append(key)
        with failures(f"upload of {key}"):
            for failure in self.failures:
                if failure.applies(key):
                    if failure.times is not None:
                        failure.times -= 1
                    raise failure.make()
            if body.size <= self.part_size:
                data = await body.whole()
                sent = Sent.whole(body.md5.digest())
            else:
                digests: list[bytes] = []
                data = b"".join([piece async for piece in body.parts(self.part_size, digests)])
                sent = Sent.parts(digests, self.part_size)
            if self.while_sending is not None:
                self.while_sending(key)
            if any(key.endswith(s) for s in self.flip) and data:
                data = bytes([data[0] ^ 0xFF]) + data[1:]
            if not any(key.endswith(s) for s in self.lose):
                self.objects[key] = data
                self.headers[key] = headers
            answered = await sent.of_stored(self._pieces(data))
            await self.etags.check(key, answered, sent, self._read)
            self.stored[key] += 1

    async def _pieces(self, data: bytes) -> AsyncIterator[bytes]:
        yield data

    async def _read(self, key: str) -> AsyncIterator[bytes]:
        yield self.objects.get(key, b"")

    def held(self, size: int) -> int:
        return min(size, self.part_size)

    def deadline(self, size: int) -> float:
        return 60.0

    async def delete(self, keys: list[str]) -> None:
        for key in keys:
            self.objects.pop(key, None)
            self.deleted.append(key)

    async def sizes(self, prefix: str) -> dict[str, int]:
        return {k: len(v) for k, v in self.objects.items() if k.startswith(prefix)}

    async def probe(self) -> None:
        pass

    async def abort_uploads(self, prefix: str, keep: set[str]) -> int:
        return 0

    def md5(self, key: str) -> str:
        return hashlib.md5(self.objects[key]).hexdigest()
