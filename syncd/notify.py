"""systemd notifications without a library: READY=1, RELOADING=1, STOPPING=1, WATCHDOG=1,
STATUS=.

A datagram to $NOTIFY_SOCKET (a leading `@` names an abstract socket). Outside systemd the
variable is unset and every call does nothing.
"""

from __future__ import annotations

import contextlib
import os
import socket
import time

from syncd.errors import printable


class Notifier:
    def __init__(self, environ: os._Environ[str] | dict[str, str] = os.environ) -> None:
        address = environ.get("NOTIFY_SOCKET", "")
        self.address = "\0" + address[1:] if address.startswith("@") else address
        usec = environ.get("WATCHDOG_USEC", "")
        pid = environ.get("WATCHDOG_PID", "")
        mine = not pid or pid == str(os.getpid())
        # Ping at half the interval systemd waits, as sd_watchdog_enabled() advises.
        self.watchdog_interval = int(usec) / 2e6 if usec.isdigit() and mine else None

    def send(self, *lines: str, wait: float = 1.0) -> None:
        """Send, waiting at most `wait` seconds for room in a queue nobody reads (it holds
        ten datagrams): the event loop never hangs on systemd."""
        if not self.address:
            return
        # If systemd is gone there is nothing useful to do about a failed send.
        with (
            socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock,
            contextlib.suppress(OSError),
        ):
            sock.settimeout(wait)
            sock.sendto("\n".join(lines).encode(), self.address)

    def ready(self, status: str) -> None:
        self.send("READY=1", f"STATUS={status}")

    def reloading(self) -> None:
        # systemd takes the service for reloading until the next READY=1.
        self.send(
            "RELOADING=1", f"MONOTONIC_USEC={time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000}"
        )

    def stopping(self) -> None:
        self.send("STOPPING=1", "STATUS=stopping")

    # A ping or a status no one takes now is worth nothing later: the next one follows.
    def watchdog(self) -> None:
        self.send("WATCHDOG=1", wait=0)

    def status(self, status: str) -> None:
        self.send(f"STATUS={printable(status)}", wait=0)  # one line, whatever names it holds
