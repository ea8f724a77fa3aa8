"""The bandwidth cap (`syncd.max_bandwidth`): an HTTP proxy on 127.0.0.1 through which both
clients reach the store, sending the bytes of every connection together at no more than the
cap, in pieces of a few milliseconds of it, so the wire sees the cap, not bursts of parts.

Neither client lets syncd pace the bytes of a request it sends (each takes a whole part or
file), so the pacing is done where the bytes leave: a CONNECT tunnel for an https store, an
absolute-form request for an http one. It reaches only the store's own host (and AWS's, for
the standard endpoints): no other process on the host can use it to send anything elsewhere.
The cap is read from the running settings at each piece, so a reload changes it live.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import Callable
from urllib.parse import urlsplit

from loguru import logger

from syncd.config import ConfigError, DaemonSettings, ObjectStorage

# The longest request head the relay reads (S3 heads are well below 8 KiB).
HEAD_LIMIT = 64 * 1024
# What one burst may send beyond the cap: this many seconds of it.
BURST = 0.05
# Seconds to reach the store before the relay answers the client with 502, and for a client
# to send its request's head (a connection that sends nothing holds nothing for long).
CONNECT_TIMEOUT = 10.0


class Throttle:
    """A token bucket shared by every connection: `max_bandwidth` bytes a second in all,
    granted in arrival order."""

    def __init__(self, config: DaemonSettings) -> None:
        self.config = config
        self.lock = asyncio.Lock()
        self.allowance = 0.0
        self.last = time.monotonic()

    @property
    def rate(self) -> int | None:
        return self.config.max_bandwidth

    def piece(self) -> int:
        """Bytes to read at once: about 10 ms of the cap, within 4-64 KiB."""
        rate = self.rate
        return 65536 if rate is None else min(65536, max(4096, rate // 100))

    async def take(self, size: int) -> None:
        rate = self.rate
        if rate is None:
            return
        async with self.lock:
            now = time.monotonic()
            self.allowance = min(rate * BURST, self.allowance + (now - self.last) * rate)
            self.last = now
            self.allowance -= size
            if self.allowance < 0:
                await asyncio.sleep(-self.allowance / rate)


# The proxy the environment may give both clients; the relay connects straight to the store.
PROXY_VARIABLES = ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY")


def require_no_proxy(environ: os._Environ[str] | dict[str, str] = os.environ) -> None:
    """ConfigError when the environment sends the clients through a proxy of its own, which
    the relay would go around."""
    for name in PROXY_VARIABLES:
        if environ.get(name):
            raise ConfigError(
                f"syncd.max_bandwidth cannot work with ${name} set: syncd's relay would reach "
                "the store without that proxy; unset max_bandwidth (and cap the rate at the "
                f"proxy) or unset {name}"
            )


class Relay:
    """The proxy both clients use while the cap is set; `url` once started."""

    def __init__(self, storage: ObjectStorage, config: DaemonSettings) -> None:
        require_no_proxy()
        self.throttle = Throttle(config)
        self.allowed = destination(storage)
        self.server: asyncio.Server | None = None
        self.connections: set[asyncio.Task[None]] = set()
        self.url = ""

    async def start(self) -> None:
        self.server = await asyncio.start_server(
            self._serve, "127.0.0.1", 0, limit=HEAD_LIMIT, reuse_address=True
        )
        self.url = f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
            for task in list(self.connections):
                task.cancel()
            await asyncio.gather(*self.connections, return_exceptions=True)
            await self.server.wait_closed()
            self.server = None

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self.connections.add(task)
        try:
            await self._relay(reader, writer)
        except (
            OSError,
            TimeoutError,
            asyncio.IncompleteReadError,
            asyncio.LimitOverrunError,
            ValueError,
        ):
            pass  # a client that went away or spoke no HTTP: its request fails and is retried
        except asyncio.CancelledError:
            pass  # the relay closes; asyncio would log a handler that ends cancelled as an error
        finally:
            self.connections.discard(task)
            writer.close()

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        async with asyncio.timeout(CONNECT_TIMEOUT):
            head = await reader.readuntil(b"\r\n\r\n")
        method, target, _ = head.split(b"\r\n", 1)[0].decode("latin-1").split(" ", 2)
        tunnel = method == "CONNECT"
        host, port = address(target, tunnel)
        if not self.allowed(host, port):
            logger.warning("bandwidth relay: refused a request for {}:{}", host, port)
            writer.write(b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\n\r\n")
            await writer.drain()
            return
        try:
            async with asyncio.timeout(CONNECT_TIMEOUT):
                store_r, store_w = await asyncio.open_connection(host, port)
        except (OSError, TimeoutError) as exc:
            # In S3's words, so that either client reports why (the relay is in the way).
            errno = getattr(exc, "errno", None)
            reason = os.strerror(errno) if errno else "no answer"
            body = (
                "<Error><Code>Unreachable</Code><Message>"
                f"the store at {host}:{port} cannot be reached ({reason})</Message></Error>"
            ).encode()
            writer.write(
                b"HTTP/1.1 502 Bad Gateway\r\nContent-Type: application/xml\r\n"
                + f"Content-Length: {len(body)}\r\n\r\n".encode()
                + body
            )
            await writer.drain()
            return
        logger.debug(
            "bandwidth relay: {} to {}:{}", "a tunnel" if tunnel else "requests", host, port
        )
        try:
            if tunnel:
                writer.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
                await writer.drain()
            else:
                await self.throttle.take(len(head))
                store_w.write(head)
            up = asyncio.ensure_future(self._pipe(reader, store_w, paced=True))
            down = asyncio.ensure_future(self._pipe(store_r, writer, paced=False))
            try:
                await asyncio.wait([up, down], return_when=asyncio.FIRST_COMPLETED)
            finally:
                up.cancel()
                down.cancel()
                await asyncio.gather(up, down, return_exceptions=True)
        finally:
            store_w.close()

    async def _pipe(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, paced: bool
    ) -> None:
        with contextlib.suppress(OSError):
            while data := await reader.read(self.throttle.piece() if paced else 65536):
                if paced:
                    await self.throttle.take(len(data))
                writer.write(data)
                await writer.drain()
            if writer.can_write_eof():
                writer.write_eof()


def address(target: str, tunnel: bool) -> tuple[str, int]:
    """The host and port a request asks for: `host:port` of a CONNECT, the URL of another."""
    if tunnel:
        host, _, port = target.rpartition(":")
        return host.strip("[]"), int(port)
    url = urlsplit(target)
    if url.scheme != "http" or not url.hostname:
        raise ValueError(f"not an absolute http URL: {target!r}")
    return url.hostname, url.port or 80


def destination(storage: ObjectStorage) -> Callable[[str, int], bool]:
    """Where the relay may connect: the endpoint's host and port, or AWS's https hosts."""
    if storage.endpoint_url:
        url = urlsplit(storage.endpoint_url)
        port = url.port or (443 if url.scheme == "https" else 80)
        host = (url.hostname or "").lower()
        return lambda h, p: (h.lower(), p) == (host, port)
    return lambda h, p: p == 443 and (h.lower().endswith(".amazonaws.com"))
