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
import socket
import struct
import time
from collections.abc import Callable
from urllib.parse import urlsplit

from loguru import logger

from syncd.config import ConfigError, DaemonSettings, ObjectStorage
from syncd.objects import ObjectHeaders
from syncd.storage.base import ObjectStore
from syncd.storage.body import Body

# The longest request head the relay reads (S3 heads are well below 8 KiB).
HEAD_LIMIT = 16 * 1024
# What the kernel takes from a client before the relay reads it (Linux doubles it).
RECEIVE_WINDOW = 16 * 1024
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
PROXY_VARIABLES = (
    "HTTPS_PROXY",
    "https_proxy",
    "HTTP_PROXY",
    "http_proxy",
    "ALL_PROXY",
    "all_proxy",
)


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


class Link:
    """One client's connection through the relay to the store."""

    def __init__(self, client: asyncio.StreamWriter, store: asyncio.StreamWriter) -> None:
        self.client, self.store = client, store
        self.asking = False  # bytes went to the store since its last answer

    def reset(self) -> None:
        for writer in (self.client, self.store):
            with contextlib.suppress(OSError):
                sock = writer.get_extra_info("socket")
                if sock is not None:  # a reset, not a close that sends what is buffered
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            writer.transport.abort()


class Relay:
    """The proxy both clients use while the cap is set; `url` once started."""

    def __init__(self, storage: ObjectStorage, config: DaemonSettings) -> None:
        require_no_proxy()
        self.throttle = Throttle(config)
        self.allowed = destination(storage)
        self.server: asyncio.Server | None = None
        self.connections: set[asyncio.Task[None]] = set()
        self.links: set[Link] = set()
        self.url = ""

    async def start(self) -> None:
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        # A small window: a client hands over no more than the relay is about to send, so a
        # request it gives up (a timeout, a cancelled upload) ends here at once, instead of
        # reaching the store whole minutes later from the buffers, and its clock for an
        # answer starts once its body is really on its way.
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RECEIVE_WINDOW)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", 0))
        listener.listen(128)
        listener.setblocking(False)
        self.server = await asyncio.start_server(self._serve, sock=listener, limit=HEAD_LIMIT)
        self.url = f"http://127.0.0.1:{listener.getsockname()[1]}"

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
            if isinstance(exc, socket.gaierror):
                reason = f"its name does not resolve: {exc.strerror}"
            elif isinstance(exc, OSError) and exc.errno:
                reason = os.strerror(exc.errno)
            else:
                reason = "no answer"
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
        link = Link(writer, store_w)
        self.links.add(link)
        try:
            if tunnel:
                writer.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
                await writer.drain()
            else:
                await self.throttle.take(len(head))
                link.asking = True
                store_w.write(head)
            up = asyncio.ensure_future(self._pipe(reader, store_w, link, upstream=True))
            down = asyncio.ensure_future(self._pipe(store_r, writer, link, upstream=False))
            try:
                await asyncio.wait([up, down], return_when=asyncio.FIRST_COMPLETED)
            finally:
                up.cancel()
                down.cancel()
                await asyncio.gather(up, down, return_exceptions=True)
        finally:
            self.links.discard(link)
            store_w.close()

    async def _pipe(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        link: Link,
        upstream: bool,
    ) -> None:
        with contextlib.suppress(OSError):
            while data := await reader.read(self.throttle.piece() if upstream else 65536):
                if upstream:
                    await self.throttle.take(len(data))
                link.asking = upstream
                writer.write(data)
                await writer.drain()
            if writer.can_write_eof():
                writer.write_eof()

    def cut(self) -> None:
        """End at once, with a reset both ways, every connection whose request the store has
        not begun to answer: syncd gave up some upload, and a request it gave up must never
        reach the store later from the buffers (its bytes may be older than the file's now).
        The clients send again those of the others, as after any dropped connection."""
        for link in list(self.links):
            if link.asking:
                link.reset()


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
    """Where the relay may connect: the endpoint's host and port; at AWS, the bucket's S3
    hosts (virtual-hosted, path-style, accelerated) and STS (credentials of a web identity),
    over https."""
    if storage.endpoint_url:
        url = urlsplit(storage.endpoint_url)
        port = url.port or (443 if url.scheme == "https" else 80)
        host = (url.hostname or "").lower()
        return lambda h, p: (h.lower(), p) == (host, port)
    bucket, region = (storage.bucket or "").lower(), storage.region.lower()
    hosts = {
        f"{bucket}.s3.amazonaws.com",
        f"{bucket}.s3.{region}.amazonaws.com",
        f"{bucket}.s3-accelerate.amazonaws.com",
        "s3.amazonaws.com",
        f"s3.{region}.amazonaws.com",
        "sts.amazonaws.com",
        f"sts.{region}.amazonaws.com",
    }
    return lambda h, p: p == 443 and h.lower() in hosts


class RelayedStore:
    """A store reached through the relay: an upload that ends in anything but success (a
    failure, a timeout, a cancelled attempt) cuts the requests the store has not answered."""

    def __init__(self, store: ObjectStore, relay: Relay) -> None:
        self.store, self.relay = store, relay
        self.description = store.description

    async def connect(self) -> None:
        await self.store.connect()

    async def put(self, body: Body, key: str, headers: ObjectHeaders) -> None:
        try:
            await self.store.put(body, key, headers)
        except BaseException:
            self.relay.cut()
            raise

    def held(self, size: int) -> int:
        return self.store.held(size)

    def deadline(self, size: int) -> float:
        return self.store.deadline(size)

    async def delete(self, keys: list[str]) -> None:
        await self.store.delete(keys)

    async def sizes(self, prefix: str) -> dict[str, int]:
        return await self.store.sizes(prefix)

    async def probe(self) -> None:
        await self.store.probe()

    async def abort_uploads(self, prefix: str, keep: set[str]) -> int:
        return await self.store.abort_uploads(prefix, keep)

    async def close(self) -> None:
        await self.store.close()
