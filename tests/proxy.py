"""A TCP proxy on 127.0.0.1 in front of a real server, for faults that come from the link:
throttled bandwidth shared by every connection, delay, dropped connections, corrupted bytes.

It runs its own event loop in a thread; `with Proxy(port) as proxy:` starts and stops it.
"""

from __future__ import annotations

import asyncio
import itertools
import re
import threading
import time
from collections.abc import Callable
from types import TracebackType


class Proxy:
    def __init__(
        self,
        target_port: int,
        rate: float | None = None,  # bytes/s towards the server, shared by all connections
        delay: float = 0.0,  # seconds before each chunk towards the server
        drop_after: int | None = None,  # close each connection after this many bytes up
        corrupt_at: int | None = None,  # flip one byte at this offset of each connection...
        corrupt_connections: int | None = None,  # ...of the first this many connections only
        delay_listings: float = 0.0,  # seconds before each GET (a listing) reaches the server
        lie_etags: bool = False,  # answer every MD5 ETag as another one (an encrypting store)
        # Sees every piece forwarded: (connection number, towards the server?, bytes).
        observer: Callable[[int, bool, bytes], None] | None = None,
    ) -> None:
        self.target_port = target_port
        self.rate = rate
        self.delay = delay
        self.drop_after = drop_after
        self.corrupt_at = corrupt_at
        self.corrupt_connections = corrupt_connections
        self.delay_listings = delay_listings
        self.observer = observer
        self.lie_etags = lie_etags
        self.connections = itertools.count()
        self.port = 0
        self.sent = 0  # bytes forwarded to the server, all connections
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.allowance = 0.0
        self.last = time.monotonic()
        self.lock: asyncio.Lock | None = None
        self.server: asyncio.Server | None = None
        self.writers: set[asyncio.StreamWriter] = set()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> Proxy:
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
        self.lock = asyncio.Lock()
        self.server = await asyncio.start_server(self._connection, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]

    async def _stop(self) -> None:
        assert self.server is not None
        self.server.close()
        for writer in list(self.writers):  # each connection then ends by itself
            writer.close()
        await self.server.wait_closed()

    async def _connection(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter):
        try:
            server_r, server_w = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            client_w.close()
            return
        self.writers |= {client_w, server_w}
        number = next(self.connections)
        up = asyncio.ensure_future(self._pipe(client_r, server_w, number, upstream=True))
        down = asyncio.ensure_future(self._pipe(server_r, client_w, number, upstream=False))
        await asyncio.wait([up, down], return_when=asyncio.FIRST_COMPLETED)
        for writer in (client_w, server_w):
            writer.close()
            self.writers.discard(writer)
        await asyncio.gather(up, down, return_exceptions=True)

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
        while True:
            data = await reader.read(16384 if upstream and self.rate else 65536)
            if not data:
                writer.write_eof()
                return
            if upstream:
                if self.delay:
                    await asyncio.sleep(self.delay)
                if self.delay_listings and data.startswith(b"GET "):
                    await asyncio.sleep(self.delay_listings)
                if self.rate:
                    await self._throttle(len(data))
                if corrupt and offset <= self.corrupt_at < offset + len(data):  # type: ignore[operator]
                    i = self.corrupt_at - offset
                    data = data[:i] + bytes([data[i] ^ 0xFF]) + data[i + 1 :]
                if self.drop_after is not None and offset + len(data) > self.drop_after:
                    return
                offset += len(data)
                self.sent += len(data)
            elif self.lie_etags:
                data = re.sub(rb'(?i)(etag: *"?)[0-9a-f]{32}', rb"\g<1>" + b"e" * 32, data)
            if self.observer is not None:
                self.observer(number, upstream, data)
            writer.write(data)
            await writer.drain()

    async def _throttle(self, size: int) -> None:
        """A token bucket shared by every connection: `rate` bytes a second in all."""
        assert self.lock is not None and self.rate is not None
        async with self.lock:
            now = time.monotonic()
            self.allowance = min(self.rate, self.allowance + (now - self.last) * self.rate)
            self.last = now
            self.allowance -= size
            if self.allowance < 0:
                await asyncio.sleep(-self.allowance / self.rate)
