"""What clients send to an S3 server, request by request, read from the bytes a `Proxy` forwards:
method, path, headers, body, and when the server's answer to it ended. HTTP/1.1 as S3 clients
speak it: Content-Length or chunked bodies, interim 1xx answers, keep-alive connections.
"""

from __future__ import annotations

import base64
import hashlib
import threading
import time
from dataclasses import dataclass, field
from urllib.parse import unquote, urlsplit


@dataclass
class Request:
    method: str
    target: str
    headers: dict[str, str]  # lower-case names
    body: bytes
    started_at: float  # when its head went to the server
    sent_at: float  # when its last byte went to the server
    status: int | None = None
    answered_at: float | None = None  # when the server's answer to it ended

    @property
    def key(self) -> str:
        """The object key of a path-style request (/bucket/key)."""
        return unquote(urlsplit(self.target).path).split("/", 2)[-1]

    @property
    def query(self) -> str:
        return urlsplit(self.target).query

    @property
    def carries_data(self) -> bool:
        """A PutObject or UploadPart (not a copy, not the start or end of a multipart upload)."""
        return self.method == "PUT" and "x-amz-copy-source" not in self.headers

    def checksum_error(self) -> str | None:
        """None when the body carries a checksum header and it matches the body."""
        md5 = self.headers.get("content-md5")
        sha256 = self.headers.get("x-amz-checksum-sha256")
        crc32 = self.headers.get("x-amz-checksum-crc32")
        if md5 is None and sha256 is None and crc32 is None:
            return f"{self.method} {self.target}: no checksum header"
        if md5 is not None and md5 != b64(hashlib.md5(self.body).digest()):
            return f"{self.method} {self.target}: Content-MD5 does not match the body"
        if sha256 is not None and sha256 != b64(hashlib.sha256(self.body).digest()):
            return f"{self.method} {self.target}: x-amz-checksum-sha256 does not match the body"
        if crc32 is not None:
            import zlib

            if crc32 != b64(zlib.crc32(self.body).to_bytes(4, "big")):
                return f"{self.method} {self.target}: x-amz-checksum-crc32 does not match"
        return None


def b64(digest: bytes) -> str:
    return base64.b64encode(digest).decode()


@dataclass
class Stream:
    """One direction of one connection, parsed as it arrives."""

    buffer: bytearray = field(default_factory=bytearray)
    head: tuple[str, dict[str, str]] | None = None  # start line and headers of the message
    began: float = 0.0  # when the head was whole


class HttpRecorder:
    """Pass as `Proxy(observer=...)`; `requests` is every request seen, in the order sent."""

    def __init__(self) -> None:
        self.requests: list[Request] = []
        self.lock = threading.Lock()
        self.up: dict[int, Stream] = {}
        self.down: dict[int, Stream] = {}
        self.unanswered: dict[int, list[Request]] = {}

    def __call__(self, connection: int, upstream: bool, data: bytes) -> None:
        with self.lock:
            streams = self.up if upstream else self.down
            stream = streams.setdefault(connection, Stream())
            stream.buffer += data
            while True:
                message = self._message(stream, connection, upstream)
                if message is None:
                    return
                start, headers, body, began = message
                now = time.monotonic()
                if upstream:
                    method, target, _ = start.split(" ", 2)
                    request = Request(method, target, headers, body, began, now)
                    self.requests.append(request)
                    self.unanswered.setdefault(connection, []).append(request)
                else:
                    status = int(start.split(" ", 2)[1])
                    if 100 <= status < 200:
                        continue  # 100 Continue: the final answer follows
                    waiting = self.unanswered.get(connection)
                    if waiting:
                        answered = waiting.pop(0)
                        answered.status, answered.answered_at = status, now

    def _message(
        self, stream: Stream, connection: int, upstream: bool
    ) -> tuple[str, dict[str, str], bytes, float] | None:
        """The next whole message of `stream`, taken out of its buffer; None if incomplete."""
        if stream.head is None:
            end = stream.buffer.find(b"\r\n\r\n")
            if end < 0:
                return None
            lines = bytes(stream.buffer[:end]).decode("latin-1").split("\r\n")
            del stream.buffer[: end + 4]
            headers = {}
            for line in lines[1:]:
                name, _, value = line.partition(":")
                headers[name.strip().lower()] = value.strip()
            stream.head = (lines[0], headers)
            stream.began = time.monotonic()
        start, headers = stream.head
        if not upstream and self._bodiless(start, connection):
            body = b""
        elif headers.get("transfer-encoding", "").lower() == "chunked":
            parsed = dechunk(stream.buffer)
            if parsed is None:
                return None
            body, used = parsed
            del stream.buffer[:used]
        else:
            length = int(headers.get("content-length", "0"))
            if len(stream.buffer) < length:
                return None
            body = bytes(stream.buffer[:length])
            del stream.buffer[:length]
        stream.head = None
        return start, headers, body, stream.began

    def _bodiless(self, start: str, connection: int) -> bool:
        status = int(start.split(" ", 2)[1])
        waiting = self.unanswered.get(connection)
        head = bool(waiting) and waiting[0].method == "HEAD"
        return head or status in (204, 304) or 100 <= status < 200

    def uploads(self) -> list[Request]:
        with self.lock:
            return [r for r in self.requests if r.carries_data]


def dechunk(buffer: bytearray) -> tuple[bytes, int] | None:
    """A chunked body at the start of `buffer` and the bytes it used; None if incomplete."""
    body = bytearray()
    at = 0
    while True:
        end = buffer.find(b"\r\n", at)
        if end < 0:
            return None
        size = int(bytes(buffer[at:end]).split(b";")[0], 16)
        at = end + 2
        if size == 0:
            trailer_end = buffer.find(b"\r\n\r\n", at - 2)
            if trailer_end < 0:
                return None
            return bytes(body), trailer_end + 4
        if len(buffer) < at + size + 2:
            return None
        body += buffer[at : at + size]
        at += size + 2
