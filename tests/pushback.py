"""A front on 127.0.0.1 for a real S3 server that pushes back as S3 does when a prefix gets more
writes than it takes: a write (PUT, POST, DELETE) above `rate` a second is answered 503
SlowDown and never reaches the server; everything else is forwarded. It can also answer the
writes to one key with an error of its choice (or an empty 200) a number of times. Counts the
writes it let through, per path, so a test sees whether a file was sent to the store twice.

`with PushBack(port, rate) as front:` starts it on its own event loop and stops it.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import Counter
from collections.abc import Coroutine
from typing import Any

from tests.proxy import Front


class PushBack(Front):
    def __init__(
        self,
        target_port: int,
        rate: float = math.inf,
        broken: str = "",
        broken_times: int = 0,
        broken_answer: tuple[int, str] = (500, "InternalError"),
    ) -> None:
        super().__init__(target_port)
        self.rate = rate  # writes a second it lets through, all connections together
        self.broken = broken  # writes whose path holds this are answered...
        self.broken_times = broken_times  # ...this many times...
        self.broken_answer = broken_answer  # ...with this status and S3 code (200: empty, no ETag)
        self.tokens = 1.0
        self.last = time.monotonic()
        self.refused = 0
        self.forwarded: Counter[str] = Counter()  # "METHOD /path?query" -> times let through

    def puts(self) -> Counter[str]:
        """PutObject and UploadPart requests let through, by path and query."""
        return Counter({k: n for k, n in self.forwarded.items() if k.startswith("PUT ")})

    def _admit(self) -> bool:
        """A token bucket of `rate` a second, holding a tenth of a second's worth at most."""
        if self.rate == math.inf:
            return True
        now = time.monotonic()
        self.tokens = min(max(1.0, self.rate / 10), self.tokens + (now - self.last) * self.rate)
        self.last = now
        if self.tokens < 1:
            return False
        self.tokens -= 1
        return True

    def _pipes(
        self,
        client_r: asyncio.StreamReader,
        client_w: asyncio.StreamWriter,
        server_r: asyncio.StreamReader,
        server_w: asyncio.StreamWriter,
    ) -> tuple[Coroutine[Any, Any, None], Coroutine[Any, Any, None]]:
        return self._requests(client_r, client_w, server_w), self._answers(server_r, client_w)

    async def _answers(
        self, server_r: asyncio.StreamReader, client_w: asyncio.StreamWriter
    ) -> None:
        with _gone():
            while data := await server_r.read(65536):
                client_w.write(data)
                await client_w.drain()

    async def _requests(
        self,
        client_r: asyncio.StreamReader,
        client_w: asyncio.StreamWriter,
        server_w: asyncio.StreamWriter,
    ) -> None:
        """One request after another (a client sends the next only once it has the answer to
        the last, so a refusal written here never cuts into a forwarded answer)."""
        with _gone():
            while True:
                try:
                    head = await client_r.readuntil(b"\r\n\r\n")
                except asyncio.IncompleteReadError:
                    return
                method, target = head.split(b" ", 2)[:2]
                headers = dict(
                    (name.strip().lower(), value.strip())
                    for name, _, value in (
                        line.partition(b":") for line in head.split(b"\r\n")[1:] if line
                    )
                )
                length = int(headers.get(b"content-length", b"0"))
                waits = headers.get(b"expect", b"").lower() == b"100-continue"
                write = method in (b"PUT", b"POST", b"DELETE")
                broken = write and self.broken and self.broken.encode() in target
                if broken and self.broken_times > 0:
                    self.broken_times -= 1
                    refusal = _answer(*self.broken_answer, waits)
                elif write and not self._admit():
                    self.refused += 1
                    refusal = _answer(503, "SlowDown", waits)
                else:
                    refusal = b""
                if refusal:
                    if waits:  # the body never comes: say no, and end the connection
                        client_w.write(refusal)
                        await client_w.drain()
                        return
                    await client_r.readexactly(length)
                    client_w.write(refusal)
                    await client_w.drain()
                    continue
                if write:
                    self.forwarded[f"{method.decode()} {target.decode()}"] += 1
                server_w.write(head)
                left = length
                while left:
                    piece = await client_r.read(min(left, 65536))
                    if not piece:
                        return
                    server_w.write(piece)
                    await server_w.drain()
                    left -= len(piece)


def _answer(status: int, code: str, close: bool) -> bytes:
    body = (
        f'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{code}</Code>'
        f"<Message>{code} (tests/pushback.py)</Message></Error>"
    ).encode()
    if status == 200:
        body = b""
    return (
        f"HTTP/1.1 {status} {code}\r\nContent-Type: application/xml\r\n".encode()
        + f"Content-Length: {len(body)}\r\n".encode()
        + (b"Connection: close\r\n" if close else b"")
        + b"\r\n"
        + body
    )


class _gone:
    """Ends a pipe quietly when either side went away."""

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: type[BaseException] | None, exc: object, tb: object) -> bool:
        return kind is not None and issubclass(kind, (ConnectionError, OSError))
