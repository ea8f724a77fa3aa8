"""One raw client of ../shared/bench/upload_bench.py as a process the bench can time with its
own clock: it builds the client, says `ready`, uploads when it reads `go` on stdin, then says
how much CPU and memory the upload took, as one JSON line.

    python bench/peer.py <client> <endpoint> <tree> <prefix>
"""

from __future__ import annotations

import importlib.util
import json
import resource
import sys
from pathlib import Path

UPLOAD_BENCH = Path(__file__).resolve().parents[2] / "shared" / "bench" / "upload_bench.py"


def peak_rss_mb() -> float:
    # VmHWM, not ru_maxrss: the latter carries the forking parent's peak across exec.
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return 0.0


def main(client: str, endpoint: str, tree: str, prefix: str) -> None:
    spec = importlib.util.spec_from_file_location("upload_bench", UPLOAD_BENCH)
    assert spec is not None and spec.loader is not None
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    builder, options, _ = bench.PY_CLIENTS[client]
    upload = builder(endpoint, Path(tree), prefix, **options)
    print("ready", flush=True)
    sys.stdin.readline()
    before = resource.getrusage(resource.RUSAGE_SELF)
    upload()
    after = resource.getrusage(resource.RUSAGE_SELF)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    print(json.dumps({"cpu_s": cpu, "rss_mb": peak_rss_mb()}), flush=True)


if __name__ == "__main__":
    main(*sys.argv[1:5])
