"""syncd end to end against the S3 clients users would pick, in the same run on the same trees,
on loopback and through a distant link.

    .venv/bin/python -m bench.run                      # loopback: 3 profiles x 2 servers x 3 reps
    .venv/bin/python -m bench.run --links loopback,40ms,40ms@40MBps,80ms     # and distant links
    .venv/bin/python -m bench.run --rtt-ms 40 --link-mbps 40       # loopback and one such link
    .venv/bin/python -m bench.run --reps 1 --profiles mixed --servers rclone   # a quick look
    .venv/bin/python -m bench.run --scale     # also 2,000 marked results, 100,000 files, backlog
    .venv/bin/python -m bench.run --pushback 50   # also 10 results to a store taking 50 writes/s

Trees come from ../shared/bench/gen_tree.py; rclone serve s3 and moto start on 127.0.0.1. A link
(`40ms@40MBps`: 40 ms round trips, 40 MB/s each way shared by all connections) is `bench/link.py`,
a proxy every client goes through; it reports its own CPU and the requests in flight. Links use the
first server only. Per repetition, interleaved, each tree read once untimed before each upload:
syncd (the real daemon, at its defaults) with each client, and the peers: multi-storage-client as
the Earth2Studio server calls it and at its best, obstore with 64 puts in flight, s5cmd, rclone
copy tuned (`bench/peer.py`); and, as a floor rather than a peer, obstore with 64 puts in flight
that also takes every file's MD5 in Python, as syncd must. Every upload is verified by listing,
then deleted. One clock, this process's, from the moment a client is told to go to the moment its
work is done: syncd from the marker's rename to its metadata saying s3; a Python peer, built by
`bench/peer.py`, from `go` on its stdin to its report; s5cmd and rclone (Go binaries, they start in
milliseconds) from their start to their exit. CPU and peak RSS are each process's own; syncd's
other figures come from its JSON log and metrics.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, replace
from datetime import datetime
from pathlib import Path
from typing import IO, NamedTuple

import yaml

from tests.pushback import PushBack
from tests.servers import KEY, SECRET, S3Server, wait_until

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "bench"
DATA = ROOT / "bench" / "data"
BIN = Path(sys.executable).parent
BUCKET = "bench"  # the raw-client bench's own bucket name
PROFILES = ["small-many", "large-few", "mixed"]
SYNCD_CLIENTS = {"syncd-obstore": True, "syncd-s3fs": False}  # name: use_rust_client
PEERS = ["msc_server", "msc_best", "obstore_async64", "s5cmd", "rclone_tuned"]
# Measured beside the peers, never one of them: obstore x 64 that also reads every byte in Python
# and takes its MD5, as syncd must (the floor of a client that checks every byte).
FLOORS = ["obstore_md5"]
SKIPS_DOTFILES = {"msc_server"}  # StorageClient.sync_from does
BACKLOG, WIDE = 2000, 100_000  # results marked before start; files in one result
PUSHED, PUSHED_FILES = 10, 200  # results sent to a store that pushes back, and their files
TIMEOUT = 240.0  # seconds any one upload may take here before it counts as hung


class Figures(NamedTuple):
    """One upload by one client, timed by this process's clock; what the link saw of it."""

    seconds: float
    cpu_s: float
    rss_mb: float
    in_flight: float = 0.0  # mean requests in flight through the link
    link_cpu_s: float = 0.0


class Case(NamedTuple):
    """Where the bytes go: loopback, or through the bench's link."""

    rtt_ms: int
    mbps: float  # the link's cap each way, MB/s; 0 for none

    @staticmethod
    def parse(spec: str) -> Case:
        if spec == "loopback":
            return Case(0, 0.0)
        rtt, _, cap = spec.removesuffix("MBps").partition("@")
        return Case(int(rtt.removesuffix("ms")), float(cap or 0))

    def __str__(self) -> str:
        if not self.rtt_ms and not self.mbps:
            return "loopback"
        return f"{self.rtt_ms}ms" + (f"@{self.mbps:g}MBps" if self.mbps else "")


@dataclass(frozen=True)
class Measurement:
    client: str
    profile: str
    server: str
    case: str
    rep: int
    figures: Figures
    verified: bool


class Link:
    """`bench/link.py` in front of a server, in a process of its own."""

    def __init__(self, server: S3Server, case: Case) -> None:
        command = [sys.executable, "-m", "bench.link", str(server.port), str(case.rtt_ms)]
        self.process = subprocess.Popen(
            [*command, str(case.mbps)],
            cwd=ROOT,
            text=True,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
        )
        assert self.process.stdout is not None and self.process.stdin is not None
        self.stdin: IO[str] = self.process.stdin
        self.stdout: IO[str] = self.process.stdout
        self.server = replace(server, port=int(self.stdout.readline().split()[1]))
        self.take()

    def take(self) -> dict[str, float]:
        """The link's figures since the last take."""
        self.stdin.write("\n")
        self.stdin.flush()
        figures: dict[str, float] = json.loads(self.stdout.readline())
        return figures

    def close(self) -> None:
        self.stdin.close()
        self.process.wait(30)


def manifest(tree: Path) -> dict[str, int]:
    return {
        p.relative_to(tree).as_posix(): p.stat().st_size for p in tree.rglob("*") if p.is_file()
    }


def warm(tree: Path) -> None:
    """Read the tree once, untimed: a daemon uploads files just written."""
    for path in tree.rglob("*"):
        if path.is_file():
            with open(path, "rb") as f:
                while f.read(1 << 20):
                    pass


def uploaded_by(client: str, tree: Path) -> dict[str, int]:
    """The files of `tree` that `client` uploads."""
    files = manifest(tree)
    if client in SKIPS_DOTFILES:
        return {k: v for k, v in files.items() if not k.rsplit("/", 1)[-1].startswith(".")}
    return files


def verified(server: S3Server, prefix: str, expected: dict[str, int]) -> bool:
    """True when the bucket holds exactly `expected` under `prefix`; the objects are deleted
    (untimed), or a full run would leave ~21 GB in rclone's folder and moto's memory."""
    s3 = server.client()
    pages = s3.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix)
    got = {o["Key"]: o["Size"] for page in pages for o in page.get("Contents", [])}
    keys = [{"Key": key} for key in got]
    for start in range(0, len(keys), 1000):
        s3.delete_objects(Bucket=BUCKET, Delete={"Objects": keys[start : start + 1000]})
    return {key[len(prefix) :]: size for key, size in got.items()} == expected


def write_files(folder: Path, files: dict[str, int]) -> None:
    for name, size in files.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(os.urandom(size))


def trees(profiles: list[str], scale: bool) -> Path:
    """The profiles' trees (made once), a one-file result and, for --scale, a 100,000-file
    result (made once)."""
    root = DATA / "trees"
    for profile in profiles:
        if not (root / profile / f"exec_{profile}").is_dir():
            generate = [sys.executable, str(SHARED / "gen_tree.py"), profile, "--out", str(root)]
            subprocess.run(generate, check=True)
    write_files(root / "one-file" / "exec_one-file", {"result.bin": 64 * 1024})
    if scale and not (root / "wide" / "complete").exists():
        write_files(
            root / "wide" / "exec_wide", {f"v{i % 100:02d}/{i}.bin": 1024 for i in range(WIDE)}
        )
        (root / "wide" / "complete").write_text("")
    return root


def process_figures(pid: int) -> tuple[float, float]:
    """CPU seconds and peak RSS (MB) of a running process."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    cpu = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    status = Path(f"/proc/{pid}/status").read_text().split("VmHWM:")[1]
    return cpu, int(status.split()[0]) / 1024


class Syncd:
    """The real daemon with JSON logs and a metrics textfile, for one measurement."""

    def __init__(
        self, work: Path, server: S3Server, outputs: Path, prefix: str, rust: bool
    ) -> None:
        name = prefix.strip("/").replace("/", "_")
        self.outputs, self.log, self.metrics = outputs, work / f"{name}.log", work / f"{name}.prom"
        self.config = work / f"{name}.yaml"
        storage = dict(
            enabled=True,
            bucket=BUCKET,
            prefix=prefix.rstrip("/"),
            endpoint_url=server.endpoint,
            access_key_id=KEY,
            secret_access_key=SECRET,
            use_transfer_acceleration=False,
            use_rust_client=rust,
            cloudfront_domain="https://d111111abcdef8.cloudfront.net",
            cloudfront_key_pair_id="KBENCH",
            cloudfront_private_key_path=str(work / "key.pem"),
        )
        daemon = dict(
            outputs_dir=str(outputs),
            state_dir=str(work / f"state-{name}"),
            log_format="json",
            metrics_file=str(self.metrics),
        )
        self.config.write_text(yaml.safe_dump({"object_storage": storage, "syncd": daemon}))

    def __enter__(self) -> Syncd:
        with open(self.log, "wb") as out:
            command = [str(BIN / "syncd"), "run", "--config", str(self.config)]
            self.process = subprocess.Popen(command, stdout=out, stderr=out)
        self.started = time.time()
        return self

    def __exit__(self, *_: object) -> None:
        self.process.send_signal(signal.SIGTERM)
        self.process.wait(60)

    def said(self, text: str) -> list[float]:
        """When (Unix seconds) it logged each message that holds `text`."""
        lines = self.log.read_text().splitlines()
        records = [json.loads(line)["record"] for line in lines if line.startswith("{")]
        return [r["time"]["timestamp"] for r in records if text in r["message"]]

    def messages(self, text: str) -> list[str]:
        """Every message it logged that holds `text`."""
        lines = self.log.read_text().splitlines()
        records = [json.loads(line)["record"] for line in lines if line.startswith("{")]
        return [r["message"] for r in records if text in r["message"]]

    def metric(self, name: str) -> float | None:
        text = self.metrics.read_text() if self.metrics.exists() else ""
        values = [line.split()[1] for line in text.splitlines() if line.startswith(f"{name} ")]
        return float(values[0]) if values else None

    def publish(self, exec_name: str) -> Figures:
        """Drop the result's marker and wait for its metadata to say s3."""
        marker, meta = self.outputs / f"{exec_name}.done", self.outputs / f"{exec_name}.json"
        wait_until(lambda: self.said("syncd watching"), timeout=60, what="syncd ready")
        cpu, _ = process_figures(self.process.pid)
        marker.with_name(f".{marker.name}.tmp").write_text("")
        started = time.monotonic()
        marker.with_name(f".{marker.name}.tmp").rename(marker)
        try:
            wait_until(
                lambda: meta.exists() and '"s3"' in meta.read_text(),
                timeout=TIMEOUT,
                interval=0.005,
                what="metadata rewritten",
            )
        except AssertionError:  # hung: the listing will not verify it; say where it hangs
            stack = [str(BIN / "py-spy"), "dump", "--locals", "--pid", str(self.process.pid)]
            with open(self.log.with_suffix(".stack"), "w") as out:
                subprocess.run(stack, stdout=out, stderr=out, timeout=120)
        seconds = time.monotonic() - started
        cpu_end, rss = process_figures(self.process.pid)
        return Figures(seconds, cpu_end - cpu, rss)


def unmark(tree: Path) -> None:
    """Remove a result's marker and metadata, so that the next publish starts afresh."""
    for suffix in (".done", ".json"):
        tree.with_name(tree.name + suffix).unlink(missing_ok=True)


def measure_syncd(work: Path, server: S3Server, tree: Path, prefix: str, rust: bool) -> Figures:
    unmark(tree)
    with Syncd(work, server, tree.parent, prefix, rust) as daemon:
        figures = daemon.publish(tree.name)
    unmark(tree)
    return figures


def measure_peer(client: str, server: S3Server, tree: Path, prefix: str, log: Path) -> Figures:
    """A raw client of ../shared/bench, built and ready before its clock starts."""
    env = dict(os.environ, BENCH_KEY=KEY, BENCH_SECRET=SECRET, PYTHONUNBUFFERED="1")
    command = [sys.executable, str(ROOT / "bench" / "peer.py"), client, server.endpoint]
    with open(log, "ab") as errors:
        process = subprocess.Popen(
            [*command, str(tree), prefix],
            env=env,
            text=True,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=errors,
        )
    # A raw client can hang for good (s3fs did once when rclone failed its PUTs): killed, it
    # closes its stdout and the run counts as not verified.
    timer = threading.Timer(TIMEOUT, process.kill)
    timer.start()
    assert process.stdin is not None and process.stdout is not None
    process.stdout.readline()  # ready
    started = time.monotonic()
    process.stdin.write("go\n")
    process.stdin.flush()
    report = process.stdout.readline()
    seconds = time.monotonic() - started
    process.stdin.close()
    process.wait()
    timer.cancel()
    # obstore now and then aborts at interpreter exit after its upload (field notes): the
    # report counts if it came; the listing verifies the upload.
    used = json.loads(report) if report.startswith("{") else {"cpu_s": 0.0, "rss_mb": 0.0}
    return Figures(seconds, used["cpu_s"], used["rss_mb"])


def measure_command(command: list[str], env: dict[str, str], log: Path) -> Figures:
    """A Go binary, timed from its start to its exit; /usr/bin/time says its CPU and peak RSS."""
    usage = log.with_suffix(".time")
    with open(log, "ab") as errors:
        started = time.monotonic()
        subprocess.run(
            ["/usr/bin/time", "-f", "%M %U %S", "-o", str(usage), *command],
            env=env,
            stdout=errors,
            stderr=errors,
            timeout=TIMEOUT,
        )
        seconds = time.monotonic() - started
    rss_kb, user, system = usage.read_text().split()[-3:]
    return Figures(seconds, float(user) + float(system), int(rss_kb) / 1024)


def s5cmd(server: S3Server, tree: Path, prefix: str) -> tuple[list[str], dict[str, str]]:
    """s5cmd at its defaults (256 workers)."""
    env = dict(os.environ, AWS_ACCESS_KEY_ID=KEY, AWS_SECRET_ACCESS_KEY=SECRET)
    command = [str(BIN / "s5cmd"), "--endpoint-url", server.endpoint, "--log", "error", "cp"]
    command += [f"{tree}/", f"s3://{BUCKET}/{prefix}{tree.name}/"]
    return command, dict(env, AWS_REGION="us-east-1")


def rclone(server: S3Server, tree: Path, prefix: str) -> tuple[list[str], dict[str, str]]:
    """rclone copy tuned for many files: 64 transfers, no checks of the destination, 8 MiB
    parts, 16 at once."""
    remote = {"TYPE": "s3", "PROVIDER": "Other", "ENDPOINT": server.endpoint, "REGION": "us-east-1"}
    remote |= {"ACCESS_KEY_ID": KEY, "SECRET_ACCESS_KEY": SECRET}
    env = dict(os.environ, **{f"RCLONE_CONFIG_BENCH_{k}": v for k, v in remote.items()})
    command = [str(BIN / "rclone"), "copy", str(tree), f"bench:{BUCKET}/{prefix}{tree.name}"]
    command += ["--transfers", "64", "--checkers", "64", "--no-check-dest"]
    command += ["--s3-no-check-bucket", "--s3-chunk-size", "8M", "--s3-upload-concurrency", "16"]
    return command, dict(env, RCLONE_CONFIG="/dev/null")


COMMANDS = {"s5cmd": s5cmd, "rclone_tuned": rclone}


def measure(work: Path, client: str, server: S3Server, tree: Path, prefix: str) -> Figures:
    warm(tree)
    if client in SYNCD_CLIENTS:
        return measure_syncd(work, server, tree, prefix, SYNCD_CLIENTS[client])
    if client in COMMANDS:
        command, env = COMMANDS[client](server, tree, prefix)
        return measure_command(command, env, work / f"{client}.log")
    return measure_peer(client, server, tree, prefix, work / f"{client}.log")


def overhead(work: Path, server: S3Server, tree: Path, prefix: str) -> float:
    """Seconds of a one-file result's marker-to-metadata time that are not its upload."""
    unmark(tree)
    with Syncd(work, server, tree.parent, prefix, rust=True) as daemon:
        seconds = daemon.publish(tree.name).seconds
        wait_until(
            lambda: daemon.metric("syncd_published_results_total") == 1,
            timeout=10,
            what="the metrics textfile",
        )
        upload = daemon.metric("syncd_upload_duration_seconds_sum") or 0.0
    unmark(tree)
    verified(server, f"{prefix}{tree.name}/", manifest(tree))
    return seconds - upload


def backlog(work: Path, server: S3Server, via: S3Server, prefix: str, label: str = "") -> str:
    """BACKLOG one-file results marked before the daemon starts (made anew), sent `via` a link
    or straight to `server`."""
    outputs = DATA / "backlog"
    shutil.rmtree(outputs, ignore_errors=True)
    names = [f"exec_{1769560000 + i}_{i:08x}" for i in range(BACKLOG)]
    write_files(outputs, {f"{name}/data.bin": 1024 for name in names})
    write_files(outputs, {f"{name}.done": 0 for name in names})
    with Syncd(work, via, outputs, f"{prefix}backlog/", rust=True) as daemon:
        wait_until(
            lambda: len(daemon.said("; recorded in ")) >= BACKLOG,
            timeout=5 * TIMEOUT,
            what=f"{BACKLOG} results recorded",
        )
        cpu, rss = process_figures(daemon.process.pid)
        first = min(daemon.said(": uploading ")) - daemon.started
        last = max(daemon.said("; recorded in ")) - daemon.started
    ok = verified(server, f"{prefix}backlog/", {f"{n}/data.bin": 1024 for n in names})
    where = server.name if via is server else f"{server.name} through the link ({label})"
    return (
        f"- {BACKLOG} one-file results marked before start -> {where}: first upload after "
        f"{first:.2f} s, all recorded after {last:.1f} s ({BACKLOG / last:.0f} results/s), cpu "
        f"{cpu:.1f} s, peak rss {rss:.0f} MB" + ("" if ok else " NOT VERIFIED")
    )


def pushback(work: Path, server: S3Server, prefix: str, rate: float, rust: bool) -> str:
    """PUSHED results of PUSHED_FILES small files each, marked before the daemon starts, to a
    store that answers 503 SlowDown to writes above `rate` a second (tests/pushback.py), as S3
    does to a prefix written too fast: how near the time that rate allows, how many refusals,
    how many files sent to the store more than once."""
    outputs = DATA / "pushback"
    shutil.rmtree(outputs, ignore_errors=True)
    names = [f"exec_{1769570000 + i}_{i:08x}" for i in range(PUSHED)]
    files = {f"results.zarr/t2m/{i}.0": 16 * 1024 for i in range(PUSHED_FILES)}
    write_files(outputs, {f"{name}/{rel}": size for name in names for rel, size in files.items()})
    write_files(outputs, {f"{name}.done": 0 for name in names})
    client = "syncd-obstore" if rust else "syncd-s3fs"
    with PushBack(server.port, rate) as front:
        via = replace(server, port=front.port)
        with Syncd(work, via, outputs, f"{prefix}pushback/{client}/", rust=rust) as daemon:
            wait_until(
                lambda: len(daemon.said("; recorded in ")) >= PUSHED,
                timeout=5 * TIMEOUT,
                what=f"{PUSHED} results recorded",
            )
            cpu, rss = process_figures(daemon.process.pid)
            last = max(daemon.said("; recorded in ")) - daemon.started
            narrowest = min(
                (int(m.split("at most ")[1].split()[0]) for m in daemon.messages("pushes back")),
                default=0,
            )
        refused, puts = front.refused, front.puts()
    expected = {f"{n}/{rel}": size for n in names for rel, size in files.items()}
    ok = verified(server, f"{prefix}pushback/{client}/", expected)
    floor = len(expected) / rate
    return (
        f"- {client}: {PUSHED} results of {PUSHED_FILES} files to a store taking {rate:g} "
        f"writes/s: all recorded after {last:.1f} s ({last / floor:.2f} x the {floor:.0f} s that "
        f"rate allows), {refused} requests refused, narrowest {narrowest} files in flight, "
        f"{sum(n > 1 for n in puts.values())} files sent to the store more than once, cpu "
        f"{cpu:.1f} s, peak rss {rss:.0f} MB" + ("" if ok else " NOT VERIFIED")
    )


def wide(work: Path, server: S3Server, prefix: str, tree: Path) -> str:
    """One result of WIDE files."""
    f = measure_syncd(work, server, tree, f"{prefix}wide/", rust=True)
    ok = verified(server, f"{prefix}wide/{tree.name}/", manifest(tree))
    return (
        f"- one result of {WIDE} files of 1 KiB -> {server.name}: recorded after "
        f"{f.seconds:.1f} s ({WIDE / f.seconds:.0f} files/s), cpu {f.cpu_s:.1f} s, peak rss "
        f"{f.rss_mb:.0f} MB" + ("" if ok else " NOT VERIFIED")
    )


def medians(measured: list[Measurement], key: tuple[str, str, str, str]) -> Figures | None:
    """Median figures of the verified runs of (client, profile, server, case)."""
    runs = [
        m.figures for m in measured if (m.client, m.profile, m.server, m.case) == key and m.verified
    ]
    if not runs:
        return None
    return Figures(*(statistics.median(c) for c in zip(*runs, strict=True)))


def best_peer(rows: dict[str, Figures]) -> float | None:
    return min((rows[c].seconds for c in PEERS if c in rows), default=None)


def table(measured: list[Measurement], profile: str, server: str, case: Case, tree: Path) -> str:
    """Medians of the verified runs, with the ratio to the fastest peer."""
    expected = manifest(tree)
    files, size = len(expected), sum(expected.values())
    rows = {
        client: figures
        for client in [*SYNCD_CLIENTS, *PEERS, *FLOORS]
        if (figures := medians(measured, (client, profile, server, str(case))))
    }
    best = best_peer(rows)
    lines = [
        f"\n### {profile} -> {server}, {case}: {files} files, {size / 1e6:.1f} MB\n",
        "| client | median s | MB/s | files/s | cpu s | peak rss MB | in flight | link cpu s "
        "| ratio to best peer |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for client, f in rows.items():
        ratio = f"{f.seconds / best:.2f}" if best else "-"
        lines.append(
            f"| {client} | {f.seconds:.2f} | {size / f.seconds / 1e6:.0f} | "
            f"{files / f.seconds:.0f} | {f.cpu_s:.2f} | {f.rss_mb:.0f} | {f.in_flight:.0f} | "
            f"{f.link_cpu_s:.2f} | {ratio} |"
        )
    return "\n".join(lines)


def summary(measured: list[Measurement], columns: list[tuple[str, str, str]]) -> str:
    """One table: every client's median seconds and ratio to the fastest peer, per column."""
    head = [f"{profile} {server} {case}" for profile, server, case in columns]
    lines = [
        "\n### every case: median s (ratio to the fastest peer)\n",
        "| client | " + " | ".join(head) + " |",
        "|---|" + "---:|" * len(columns),
    ]
    cells: dict[str, list[str]] = {c: [] for c in [*SYNCD_CLIENTS, *PEERS, *FLOORS]}
    for profile, server, case in columns:
        rows = {c: f for c in cells if (f := medians(measured, (c, profile, server, case)))}
        best = best_peer(rows)
        for client, column in cells.items():
            f = rows.get(client)
            column.append(f"{f.seconds:.2f} ({f.seconds / best:.2f})" if f and best else "-")
    lines += [f"| {client} | " + " | ".join(column) + " |" for client, column in cells.items()]
    return "\n".join(lines)


def upload(
    work: Path, client: str, server: S3Server, link: Link | None, tree: Path, prefix: str
) -> tuple[Figures, bool]:
    """One measured upload, through the link if there is one, verified by listing."""
    f = measure(work, client, link.server if link else server, tree, prefix)
    if link:
        seen = link.take()
        f = f._replace(in_flight=seen["in_flight"], link_cpu_s=seen["cpu_s"])
    return f, verified(server, f"{prefix}{tree.name}/", uploaded_by(client, tree))


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--profiles", default=",".join(PROFILES))
    parser.add_argument("--servers", default="rclone,moto")
    parser.add_argument("--links", default="loopback", help="e.g. loopback,40ms,40ms@40MBps")
    parser.add_argument("--rtt-ms", type=int, help="also through a link of this round trip")
    parser.add_argument("--link-mbps", type=float, default=0, help="...capped at this, each way")
    parser.add_argument("--clients", default=",".join([*SYNCD_CLIENTS, *PEERS, *FLOORS]))
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--scale", action="store_true", help="also: 2,000 results, 100,000 files")
    parser.add_argument(
        "--pushback", type=float, help="also: to a store taking this many writes/s (503 above)"
    )
    args = parser.parse_args()
    profiles, names = args.profiles.split(","), args.servers.split(",")
    cases = [Case.parse(spec) for spec in args.links.split(",")]
    if args.rtt_ms is not None:
        cases.append(Case(args.rtt_ms, args.link_mbps))
    root = trees(profiles, args.scale)
    run_id = datetime.now().strftime("%Y%m%dT%H%M%S")
    work = DATA / "runs" / run_id
    work.mkdir(parents=True)
    key = ["openssl", "genrsa", "-out", str(work / "key.pem"), "2048"]
    subprocess.run(key, check=True, capture_output=True)
    servers = {name: S3Server(name, work / name).start() for name in names}
    measured: list[Measurement] = []
    report: list[str] = []
    columns: list[tuple[str, str, str]] = []
    scaled: list[str] = []  # the backlog through each link
    try:
        for server in servers.values():
            server.client().create_bucket(Bucket=BUCKET)
        for case in cases:
            link = Link(servers[names[0]], case) if str(case) != "loopback" else None
            on = names if link is None else names[:1]
            columns += [(p, n, str(case)) for p in profiles for n in on]
            try:
                for rep in range(args.reps):
                    clients = args.clients.split(",")
                    clients = clients[rep % len(clients) :] + clients[: rep % len(clients)]
                    for profile in profiles:
                        tree = root / profile / f"exec_{profile}"
                        for name in on if rep % 2 == 0 else on[::-1]:
                            for client in clients:
                                prefix = f"{run_id}/{case}/{profile}/{name}/{client}/r{rep}/"
                                f, ok = upload(work, client, servers[name], link, tree, prefix)
                                measured.append(
                                    Measurement(client, profile, name, str(case), rep, f, ok)
                                )
                                print(
                                    f"r{rep} {case!s:12} {profile:10} {name:6} {client:16} "
                                    f"{f.seconds:7.2f} s cpu {f.cpu_s:6.2f} s "
                                    f"rss {f.rss_mb:6.0f} MB in flight {f.in_flight:5.1f} "
                                    f"{'ok' if ok else 'NOT VERIFIED'}",
                                    flush=True,
                                )
                report += [
                    table(measured, p, n, case, root / p / f"exec_{p}")
                    for p in profiles
                    for n in on
                ]
                if args.scale and link is not None:
                    prefix = f"{run_id}/{case}/"
                    scaled.append(backlog(work, servers[names[0]], link.server, prefix, str(case)))
            finally:
                if link is not None:
                    link.close()
        report.insert(0, summary(measured, columns))
        one = root / "one-file" / "exec_one-file"
        overheads = [
            overhead(work, servers[name], one, f"{run_id}/one-file/{name}/r{rep}/")
            for rep in range(max(args.reps, 3))
            for name in names
        ]
        if args.scale:
            first = servers[names[0]]
            scaled[:0] = [
                backlog(work, first, first, f"{run_id}/"),
                wide(work, first, f"{run_id}/", root / "wide" / "exec_wide"),
            ]
            report += ["\n### scale (syncd-obstore)\n", *scaled]
        if args.pushback:
            first = servers[names[0]]
            report += ["\n### a store that pushes back (503 SlowDown)\n"] + [
                pushback(work, first, f"{run_id}/", args.pushback, rust)
                for rust in SYNCD_CLIENTS.values()
            ]
        report.append(
            "\nsyncd overhead on a one-file result (marker dropped -> metadata written, minus "
            f"the upload itself): median {statistics.median(overheads) * 1000:.0f} ms over "
            f"{len(overheads)} runs"
        )
    finally:
        for server in servers.values():
            server.stop()
        shutil.rmtree(work / "rclone" / "root", ignore_errors=True)
        (work / "results.json").write_text(json.dumps([asdict(m) for m in measured], indent=1))
    print("\n".join(report))
    return 0 if all(m.verified for m in measured) else 1


if __name__ == "__main__":
    sys.exit(main())
