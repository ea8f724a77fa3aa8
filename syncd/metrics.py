"""What an operator watches: Prometheus metrics, served over HTTP and/or written for
node_exporter's textfile collector, and the one line `systemctl status` shows.

The daemon says what happens (a result published, an attempt failed, a URL renewed, events
lost) and, once a second, how things stand (a `Standing`); this module alone names the metrics
and words the status line. Off unless `metrics_address` or `metrics_file` is set; the status
line is always kept (it costs one datagram when it changes).
"""

from __future__ import annotations

import errno
import os
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from loguru import logger
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    start_http_server,
    write_to_textfile,
)

from syncd.config import ConfigError, DaemonSettings, listen_address
from syncd.errors import Kind, os_error
from syncd.progress import Progress, amount, speed

# Upload time per result, from a one-file result on loopback to a large one over a slow link.
UPLOAD_BUCKETS = (0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600, 7200)


@dataclass(frozen=True)
class Standing:
    """How things stand: results by what is happening to them."""

    uploading: int  # attempts in progress
    uploads: tuple[Progress, ...]  # those sending their trees
    waiting: int  # queued, or read again shortly (metadata being written)
    failing: int  # waiting for the next attempt after a failure
    done: int  # recorded, with their metadata watched
    oldest_since: float | None  # when the oldest result not yet published was finished
    last_published: tuple[str, float] | None  # its name and the time


class Metrics:
    def __init__(self, config: DaemonSettings) -> None:
        self.address = config.metrics_address
        self.file = config.metrics_file
        self.outputs_dir = config.outputs_dir
        self.server: Any = None
        self.serving: threading.Thread | None = None
        self.file_error: str | None = None  # the last one logged
        self.started = False
        # syncd's own metrics, in the textfile too; served over HTTP with the process's (in a
        # textfile they would be node_exporter's own names, which it refuses to collect twice).
        registry = self.registry = CollectorRegistry()
        self.served = CollectorRegistry()
        ProcessCollector(registry=self.served)
        self.served.register(registry)
        self.results = Gauge(
            "syncd_results", "Results this daemon knows, by state", ["state"], registry=registry
        )
        self.oldest = Gauge(
            "syncd_oldest_unpublished_age_seconds",
            "Seconds since the oldest finished result that is not yet published was finished "
            "(0 when none waits)",
            registry=registry,
        )
        self.last_publish = Gauge(
            "syncd_last_publish_timestamp_seconds",
            "Unix time of the last result published (0: none since start)",
            registry=registry,
        )
        self.published_results = Counter(
            "syncd_published_results", "Results uploaded and recorded", registry=registry
        )
        self.published_files = Counter(
            "syncd_published_files", "Files of the results recorded", registry=registry
        )
        self.published_bytes = Counter(
            "syncd_published_bytes", "Bytes of the results recorded", registry=registry
        )
        self.failures = Counter(
            "syncd_failures",
            "Failed attempts, by kind: transient (retried with backoff), operator (a setting, "
            "permission or the store's refusal), input (a result's own files)",
            ["kind"],
            registry=registry,
        )
        for kind in Kind:
            self.failures.labels(kind.value)  # every kind present from the start, at 0
        self.upload_seconds = Histogram(
            "syncd_upload_duration_seconds",
            "Seconds to upload one result's tree",
            buckets=UPLOAD_BUCKETS,
            registry=registry,
        )
        self.restored = Counter(
            "syncd_records_restored",
            "Records written again into metadata someone else rewrote without them",
            registry=registry,
        )
        self.renewed = Counter(
            "syncd_signed_urls_renewed", "Signed URLs renewed before expiry", registry=registry
        )
        self.rescans = Counter(
            "syncd_lost_event_rescans",
            "Rescans of outputs_dir after filesystem events were lost",
            registry=registry,
        )
        self.free = Gauge(
            "syncd_outputs_free_bytes",
            "Bytes free on the filesystem of outputs_dir for its writers",
            registry=registry,
        )

    def start(self) -> None:
        """Serve and write the metrics; a setting that cannot work is a ConfigError."""
        if self.address is not None:
            host, port = listen_address(self.address)
            try:
                self.server, self.serving = start_http_server(port, host, registry=self.served)
            except OSError as exc:
                raise cannot_listen(self.address, exc) from None
        if self.file is not None:
            try:
                write_to_textfile(str(self.file), self.registry)
            except OSError as exc:
                raise cannot_write(self.file, exc) from None
        self.started = True

    def check(self) -> None:
        """What `start` would refuse, found without serving or writing anything (`syncd
        check`; a port taken shows only at the start: the daemon may hold it right now)."""
        if self.address is not None:
            host, port = listen_address(self.address)
            try:
                socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
            except OSError as exc:
                raise cannot_listen(self.address, exc) from None
        if self.file is not None:
            folder = self.file.parent
            if not folder.is_dir():
                raise cannot_write(self.file, OSError(errno.ENOENT, os.strerror(errno.ENOENT)))
            if not os.access(folder, os.W_OK | os.X_OK):
                raise cannot_write(self.file, OSError(errno.EACCES, os.strerror(errno.EACCES)))

    @property
    def alive(self) -> bool:
        """False once the HTTP server's thread has ended while it should serve."""
        return self.serving is None or self.serving.is_alive()

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
            self.server = self.serving = None
        if self.file is not None and self.started:
            self.write()  # the last counts, for a scrape after the stop

    def published(self, files: int, size: int, seconds: float | None) -> None:
        """A result recorded after its upload (`seconds`: None when an earlier attempt sent it)."""
        self.published_results.inc()
        self.published_files.inc(files)
        self.published_bytes.inc(size)
        self.last_publish.set(time.time())
        if seconds is not None:
            self.upload_seconds.observe(seconds)

    def update(self, standing: Standing) -> None:
        """Set the gauges from `standing`, and write the textfile. Blocks on the filesystem."""
        for state, count in (
            ("uploading", standing.uploading),
            ("pending", standing.waiting),
            ("retrying", standing.failing),
            ("done", standing.done),
        ):
            self.results.labels(state).set(count)
        since = standing.oldest_since
        self.oldest.set(max(time.time() - since, 0.0) if since is not None else 0.0)
        try:
            info = os.statvfs(self.outputs_dir)
        except OSError:
            pass  # outputs_dir gone for a moment: the watcher says so
        else:
            self.free.set(info.f_bavail * info.f_frsize)
        if self.file is not None:
            self.write()

    def write(self) -> None:
        """The textfile, replaced whole (a scrape never reads half of it); a failure is logged
        once until it changes."""
        assert self.file is not None
        try:
            write_to_textfile(str(self.file), self.registry)
        except OSError as exc:
            error = str(os_error(exc, "writing", self.file))
            if error != self.file_error:
                logger.warning("metrics not written: {}", error)
            self.file_error = error
        else:
            if self.file_error is not None:
                logger.info("metrics written to {} again", self.file)
            self.file_error = None


def status_line(standing: Standing, now: float) -> str:
    """What `systemctl status` shows, e.g. `3 uploading (310/820 MB, 42 MB/s), 12 waiting,
    1 failing; last published exec_1769560728_10ed9d3c 4 s ago`."""
    counts = [
        f"{count} {what}"
        for count, what in (
            (standing.uploading, f"uploading{sending(standing.uploads)}"),
            (standing.waiting, "waiting"),
            (standing.failing, "failing"),
        )
        if count
    ]
    line = ", ".join(counts) or "idle"
    if standing.last_published is None:
        return f"{line}; nothing published since start"
    name, at = standing.last_published
    return f"{line}; last published {name} {ago(now - at)} ago"


def sending(uploads: tuple[Progress, ...]) -> str:
    """The bytes sent of all uploads together and their rate, e.g. ` (310/820 MB, 42 MB/s)`."""
    if not uploads:
        return ""
    sent = sum(u.done_bytes for u in uploads)
    total = sum(u.total for u in uploads)
    return f" ({amount(sent, total)}, {speed(sum(u.rate() for u in uploads))})"


def ago(seconds: float) -> str:
    seconds = max(seconds, 0.0)
    if seconds < 60:
        return f"{seconds:.0f} s"
    if seconds < 3600:
        return f"{seconds / 60:.0f} min"
    if seconds < 2 * 86400:
        return f"{seconds / 3600:.0f} h"
    return f"{seconds / 86400:.0f} days"


def cannot_listen(address: str, exc: OSError) -> ConfigError:
    return ConfigError(
        f"syncd.metrics_address {address}: cannot listen ({exc.strerror or exc}); choose a "
        "free port or an address of this host"
    )


def cannot_write(file: Path, exc: OSError) -> ConfigError:
    return ConfigError(
        f"syncd.metrics_file {file}: cannot write it ({exc.strerror or exc}); create its folder "
        "or make it writable for syncd"
    )
