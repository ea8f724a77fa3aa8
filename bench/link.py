"""The bench's distant link: the tests' proxy (tests/proxy.py) in a process of its own, so that its
CPU is its own and shows whether the link itself is the bottleneck.

    python -m bench.link <server port> <rtt ms> [<MB/s cap, shared by all connections>]

Prints `port N` once it listens. Each line on stdin asks for the figures since the last one:
one JSON line with its CPU seconds, the mean and peak requests in flight, the bytes carried
towards the server. It stops at the end of stdin.
"""

from __future__ import annotations

import asyncio
import json
import resource
import sys

from tests.proxy import Proxy


def cpu_seconds() -> float:
    used = resource.getrusage(resource.RUSAGE_SELF)
    return used.ru_utime + used.ru_stime


async def taken(proxy: Proxy) -> tuple[float, int]:
    return proxy.requests.take()


def main(port: str, rtt_ms: str, mbps: str = "0") -> None:
    rate = float(mbps) * 1e6 or None
    with Proxy(int(port), rate=rate, rtt=float(rtt_ms) / 1000) as proxy:
        print(f"port {proxy.port}", flush=True)
        cpu, sent = cpu_seconds(), 0
        for _ in sys.stdin:
            # The counts belong to the proxy's loop: read them there.
            mean, peak = asyncio.run_coroutine_threadsafe(taken(proxy), proxy.loop).result(10)
            now = cpu_seconds()
            figures = {"cpu_s": now - cpu, "in_flight": mean, "peak": peak, "up": proxy.sent - sent}
            print(json.dumps(figures), flush=True)
            cpu, sent = now, proxy.sent


if __name__ == "__main__":
    main(*sys.argv[1:4])
