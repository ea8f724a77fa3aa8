"""A TCP proxy on 127.0.0.1 in front of a real server, for faults that come from the link:
throttled bandwidth shared by every connection, delay, dropped connections, corrupted bytes; and
for the bench's distant link: a round-trip time added as a delay line (every byte arrives `rtt`
later, throughput is not capped by it), with the requests it carries counted.

It runs its own event loop in a thread; `with Proxy(port) as proxy:` starts and stops it.
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import math
import re
import threading
import time
from collections.abc import Callable, Coroutine
from types import TracebackType
from typing import Any, Self


class Front:
    """A TCP server on 127.0.0.1 in front of a real server, on its own event loop in a thread;
    `with` starts and stops it. Subclasses handle each connection."""

    def __init__(self, target_port: int, port: int = 0) -> None:
        self.target_port = target_port
        self.port = port  # where it listens: a free port unless given
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.server: asyncio.Server | None = None
        self.writers: set[asyncio.StreamWriter] = set()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> Self:
        self.thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self.loop).result(10)
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        asyncio.run_coroutine_threadsafe(self._stop(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)

    async def _start(self) -> None:
        self.server = await asyncio.start_server(self._connection, "127.0.0.1", self.port)
        self.port = self.server.sockets[0].getsockname()[1]

    async def _stop(self) -> None:
        assert self.server is not None
        self.server.close()
        for writer in list(self.writers):  # each connection then ends by itself
            writer.close()
        await self.server.wait_closed()

    async def _connection(
        self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter
    ) -> None:
        try:
            server_r, server_w = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            client_w.close()
            return
        self.writers |= {client_w, server_w}
        up, down = map(asyncio.ensure_future, self._pipes(client_r, client_w, server_r, server_w))
        await asyncio.wait([up, down], return_when=asyncio.FIRST_COMPLETED)
        for writer in (client_w, server_w):
            writer.close()
            self.writers.discard(writer)
        await asyncio.gather(up, down, return_exceptions=True)

    def _pipes(
        self,
        client_r: asyncio.StreamReader,
        client_w: asyncio.StreamWriter,
        server_r: asyncio.StreamReader,
        server_w: asyncio.StreamWriter,
    ) -> tuple[Coroutine[Any, Any, None], Coroutine[Any, Any, None]]:
        """What carries the client's bytes to the server, and what carries the answers back."""
        raise NotImplementedError


# Where in a PUT's body `flip_puts` flips a byte: past the size line a body in aws-chunked
# framing starts with, so that the bytes of the file are damaged, not the framing.
FLIP_INTO_BODY = 512


def flipped(data: bytes, at: int) -> bytes:
    """`data` with the byte at `at` inverted."""
    return data[:at] + bytes([data[at] ^ 0xFF]) + data[at + 1 :]


class Proxy(Front):
    def __init__(
        self,
        target_port: int,
        rate: float | None = None,  # bytes/s towards the server, shared by all connections
        delay: float = 0.0,  # seconds before each chunk towards the server
        rtt: float = 0.0,  # seconds added to each round trip, half each way, as a delay line
        drop_after: int | None = None,  # close each connection after this many bytes up
        corrupt_at: int | None = None,  # flip one byte at this offset of each connection...
        corrupt_connections: int | None = None,  # ...of the first this many connections only
        delay_listings: float = 0.0,  # seconds before each GET (a listing) reaches the server
        # Answer MD5 ETags as other ones: every one (True: an encrypting store), or the first N.
        lie_etags: bool | int = False,
        flip_puts: int = 0,  # flip one byte of the body of each of the next N PUT requests
        # Every listing says there is more, and the next page is always the first: a store
        # that pages forever.
        endless_listings: bool = False,
        hide_in_listings: str = "",  # listings leave out the keys that end so
        # From a PUT on (PutObject, UploadPart), a connection takes every byte and answers
        # nothing, not even "100 Continue": a store that hangs.
        swallow_puts: bool = False,
        hang: bool = False,  # so does every request: a store that takes them and never answers
        # Sees every piece forwarded: (connection number, towards the server?, bytes).
        observer: Callable[[int, bool, bytes], None] | None = None,
        port: int = 0,  # where it listens: a free port unless given
    ) -> None:
        super().__init__(target_port, port)
        self.rate = rate
        self.delay = delay
        self.rtt = rtt
        self.drop_after = drop_after
        self.corrupt_at = corrupt_at
        self.corrupt_connections = corrupt_connections
        self.delay_listings = delay_listings
        self.observer = observer
        self.etag_lies = math.inf if lie_etags is True else int(lie_etags)
        self.flip_puts = flip_puts
        self.endless_listings = endless_listings
        self.hide_in_listings = hide_in_listings
        self.listings = 0  # listing requests seen
        self.swallow_puts = swallow_puts
        self.hang = hang
        self.swallowed = 0  # PUT requests taken and never answered
        self.connections = itertools.count()
        self.sent = 0  # bytes forwarded to the server, all connections
        self.allowance = 0.0
        self.last = time.monotonic()
        self.lock: asyncio.Lock | None = None
        self.requests = InFlight()

    async def _start(self) -> None:
        self.lock = asyncio.Lock()
        await super()._start()

    def _pipes(
        self,
        client_r: asyncio.StreamReader,
        client_w: asyncio.StreamWriter,
        server_r: asyncio.StreamReader,
        server_w: asyncio.StreamWriter,
    ) -> tuple[Coroutine[Any, Any, None], Coroutine[Any, Any, None]]:
        number = next(self.connections)
        return (
            self._pipe(client_r, server_w, number, upstream=True),
            self._pipe(server_r, client_w, number, upstream=False),
        )

    async def _pipe(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        number: int,
        upstream: bool,
    ) -> None:
        try:
            await self._forward(reader, writer, number, upstream)
        except (ConnectionError, OSError):
            return  # the other side went away

    async def _forward(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        number: int,
        upstream: bool,
    ) -> None:
        offset = 0
        corrupt = self.corrupt_at is not None and (
            self.corrupt_connections is None or number < self.corrupt_connections
        )
        # An answer's first byte reaching the client ends the request in flight.
        arrived = None if upstream else functools.partial(self.requests.answered, number)
        line = DelayLine(writer, self.rtt / 2, arrived) if self.rtt else None
        swallowing = False
        flip_in: int | None = None  # body bytes of this PUT before the one to flip
        try:
            while True:
                data = await reader.read(self._piece(upstream))
                if not data:
                    if line is not None:
                        await line.drain()
                    writer.write_eof()
                    return
                if upstream and (
                    swallowing or self.hang or (self.swallow_puts and data.startswith(b"PUT "))
                ):
                    self.swallowed += not swallowing
                    swallowing = True
                    continue
                if upstream:
                    self.requests.asked(number)
                    if self.delay:
                        await asyncio.sleep(self.delay)
                    if self.delay_listings and data.startswith(b"GET "):
                        await asyncio.sleep(self.delay_listings)
                    if (
                        self.endless_listings
                        and data.startswith(b"GET /")
                        and b"list-type=2" in data
                    ):
                        self.listings += 1
                        data = re.sub(rb"&?continuation-token=[^& ]*", b"", data, count=1)
                    if self.rate:
                        await self._throttle(len(data))
                    if self.flip_puts and data.startswith(b"PUT "):
                        head = data.find(b"\r\n\r\n")
                        if head >= 0:
                            self.flip_puts -= 1
                            flip_in = head + 4 + FLIP_INTO_BODY
                    if flip_in is not None:
                        if flip_in < len(data):
                            data, flip_in = flipped(data, flip_in), None
                        else:
                            flip_in -= len(data)
                    if corrupt and offset <= self.corrupt_at < offset + len(data):  # type: ignore[operator]
                        data = flipped(data, self.corrupt_at - offset)
                    if self.drop_after is not None and offset + len(data) > self.drop_after:
                        return
                    offset += len(data)
                    self.sent += len(data)
                elif self.etag_lies > 0:
                    data, lied = re.subn(
                        rb'(?i)(etag: *"?)[0-9a-f]{32}',
                        rb"\g<1>" + b"e" * 32,
                        data,
                        count=0 if math.isinf(self.etag_lies) else 1,
                    )
                    self.etag_lies -= lied
                elif self.endless_listings:
                    data = endless(await whole_answer(reader, data))
                elif self.hide_in_listings:
                    data = hidden(await whole_answer(reader, data), self.hide_in_listings)
                if self.observer is not None:
                    self.observer(number, upstream, data)
                if line is not None:
                    await line.send(data)
                else:
                    if arrived is not None:
                        arrived()
                    writer.write(data)
                    await writer.drain()
        finally:
            if line is not None:
                line.close()

    def _piece(self, upstream: bool) -> int:
        """Bytes to read at once: about 10 ms of a throttled link, within 16-256 KiB."""
        if upstream and self.rate:
            return min(262144, max(16384, int(self.rate / 100)))
        return 65536

    async def _throttle(self, size: int) -> None:
        """A token bucket shared by every connection: `rate` bytes a second in all."""
        assert self.lock is not None and self.rate is not None
        async with self.lock:
            now = time.monotonic()
            # A burst of 50 ms of the link at most: a link's capacity is its steady rate.
            self.allowance = min(self.rate / 20, self.allowance + (now - self.last) * self.rate)
            self.last = now
            self.allowance -= size
            if self.allowance < 0:
                await asyncio.sleep(-self.allowance / self.rate)


async def whole_answer(reader: asyncio.StreamReader, data: bytes) -> bytes:
    """`data` and what follows it up to the end of the answer it begins (by Content-Length)."""
    while data.startswith(b"HTTP/") and b"\r\n\r\n" not in data:
        data += await reader.read(65536)
    found = re.search(rb"(?i)\r\ncontent-length: *(\d+)", data.partition(b"\r\n\r\n")[0])
    if not data.startswith(b"HTTP/") or found is None:
        return data
    while len(data.partition(b"\r\n\r\n")[2]) < int(found.group(1)):
        more = await reader.read(65536)
        if not more:
            break
        data += more
    return data


def hidden(answer: bytes, ending: str) -> bytes:
    """A listing's whole answer without the keys that end with `ending`."""
    head, _, body = answer.partition(b"\r\n\r\n")
    pattern = (
        rb"<Contents>(?:(?!</Contents>).)*?" + re.escape(ending.encode()) + rb"</Key>.*?</Contents>"
    )
    if not answer.startswith(b"HTTP/") or not re.search(pattern, body, flags=re.S):
        return answer
    body = re.sub(pattern, b"", body, flags=re.S)
    head = re.sub(rb"(?i)content-length: *\d+", b"Content-Length: %d" % len(body), head)
    return head + b"\r\n\r\n" + body


def endless(answer: bytes) -> bytes:
    """A listing's whole answer, saying there is a next page."""
    if b"<IsTruncated>false</IsTruncated>" not in answer:
        return answer
    more = b"<IsTruncated>true</IsTruncated><NextContinuationToken>AAAA</NextContinuationToken>"
    head, _, body = answer.partition(b"\r\n\r\n")
    body = body.replace(b"<IsTruncated>false</IsTruncated>", more)
    head = re.sub(rb"(?i)content-length: *\d+", b"Content-Length: %d" % len(body), head)
    return head + b"\r\n\r\n" + body


class InFlight:
    """Requests the link carries: a connection has one from its first byte towards the server
    until the first byte of the answer reaches the client. Keeps the peak and the time average."""

    def __init__(self) -> None:
        self.asking: set[int] = set()
        self.peak = 0
        self.area = 0.0  # requests x seconds since `since`
        self.since = self.changed = time.monotonic()

    def _step(self) -> None:
        now = time.monotonic()
        self.area += len(self.asking) * (now - self.changed)
        self.changed = now

    def asked(self, number: int) -> None:
        if number not in self.asking:
            self._step()
            self.asking.add(number)
            self.peak = max(self.peak, len(self.asking))

    def answered(self, number: int) -> None:
        if number in self.asking:
            self._step()
            self.asking.discard(number)

    def take(self) -> tuple[float, int]:
        """Mean and peak since the last take, and start afresh."""
        self._step()
        mean = self.area / max(self.changed - self.since, 1e-9)
        peak, self.peak = self.peak, len(self.asking)
        self.area, self.since = 0.0, self.changed
        return mean, peak


class DelayLine:
    """One direction of a connection, `delay` seconds long: each piece is written `delay` after
    it was read, while later pieces keep coming (up to 64 pieces on the line); `arrived` is
    called as each one is written."""

    def __init__(
        self, writer: asyncio.StreamWriter, delay: float, arrived: Callable[[], None] | None
    ) -> None:
        self.writer, self.delay, self.arrived = writer, delay, arrived
        self.line: asyncio.Queue[tuple[float, bytes] | None] = asyncio.Queue(64)
        self.task = asyncio.ensure_future(self._deliver())

    async def send(self, data: bytes) -> None:
        if self.task.done():  # the far side went away
            raise ConnectionResetError
        await self.line.put((time.monotonic() + self.delay, data))

    async def drain(self) -> None:
        await self.line.put(None)
        await self.task

    def close(self) -> None:
        self.task.cancel()

    async def _deliver(self) -> None:
        try:
            while (piece := await self.line.get()) is not None:
                due, data = piece
                if (wait := due - time.monotonic()) > 0:
                    await asyncio.sleep(wait)
                if self.arrived is not None:
                    self.arrived()
                self.writer.write(data)
                await self.writer.drain()
        finally:  # the far side went away: a sender waiting on a full line must not wait forever
            while not self.line.empty():
                self.line.get_nowait()
