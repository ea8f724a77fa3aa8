"""syncd end to end against raw S3 clients, measured in the same run on the same trees.

    .venv/bin/python -m bench.run                      # 3 profiles x 2 servers x 3 reps
    .venv/bin/python -m bench.run --reps 1 --profiles mixed --servers rclone   # a quick look
    .venv/bin/python -m bench.run --scale              # also 2,000 marked results, 100,000 files

Trees come from ../shared/bench/gen_tree.py (small-many, large-few, mixed); rclone serve s3 and
moto start on 127.0.0.1. Per repetition, interleaved, each tree read once untimed before each
upload (a daemon uploads files just written): syncd, the real daemon, with each client, and the
raw clients (obstore with 64 puts in flight, s3fs's default put, s5cmd). Every upload is
verified by listing, then deleted.

One clock for every client, this process's monotonic one, started when the client is told to
go: syncd from the marker's rename to its metadata saying s3 (the daemon is running and
ready); a raw client from `go` on its stdin to its report (built and ready, `bench/peer.py`);
s5cmd, a Go binary that starts in milliseconds, from its start to its exit. CPU and peak RSS
are each process's own. Printed per profile and server: median seconds, MB/s, files/s, CPU
seconds, peak RSS and the ratio to the best raw client; then syncd's own overhead on a one-file
result (its metrics' upload time taken from the marker-to-metadata time). With --scale, into
the first server: 2,000 one-file results marked before the daemon starts, and one result of
100,000 files of 1 KiB.
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
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, NamedTuple

import yaml

from tests.servers import KEY, SECRET, S3Server, wait_until

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "bench"
DATA = ROOT / "bench" / "data"
BIN = Path(sys.executable).parent
BUCKET = "bench"  # the raw-client bench's own bucket name
PROFILES = ["small-many", "large-few", "mixed"]
SYNCD_CLIENTS = {"syncd-obstore": True, "syncd-s3fs": False}  # name: use_rust_client
PEERS = ["obstore_async64", "s3fs_default"]  # ../shared/bench/upload_bench.py's names
RAW_CLIENTS = [*PEERS, "s5cmd"]
BACKLOG = 2000  # results marked before the daemon starts
WIDE = 100_000  # files in one result
TIMEOUT = 600.0  # seconds any one upload may take here before it counts as hung


class Figures(NamedTuple):
    """One upload by one client, timed by this process's clock."""

    seconds: float
    cpu_s: float
    rss_mb: float


@dataclass(frozen=True)
class Measurement:
    client: str
    profile: str
    server: str
    rep: int
    figures: Figures
    verified: bool


@dataclass(frozen=True)
class Run:
    """Where this run keeps its files, and the servers it uploads to."""

    id: str
    work: Path
    servers: dict[str, S3Server]


# --- trees and the bucket ---------------------------------------------------------------


def manifest(tree: Path) -> dict[str, int]:
    return {
        p.relative_to(tree).as_posix(): p.stat().st_size for p in tree.rglob("*") if p.is_file()
    }


def warm(tree: Path) -> None:
    for path in tree.rglob("*"):
        if path.is_file():
            with open(path, "rb") as f:
                while f.read(1 << 20):
                    pass


def verified(server: S3Server, prefix: str, expected: dict[str, int]) -> bool:
    """True when the bucket holds exactly `expected` under `prefix`; the objects are deleted
    (untimed), or a full run would leave ~21 GB in rclone's folder and moto's memory."""
    s3 = server.client()
    pages = s3.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix)
    got = {o["Key"]: o["Size"] for page in pages for o in page.get("Contents", [])}
    keys = sorted(got)
    for start in range(0, len(keys), 1000):
        batch = [{"Key": key} for key in keys[start : start + 1000]]
        s3.delete_objects(Bucket=BUCKET, Delete={"Objects": batch, "Quiet": True})
    return {key[len(prefix) :]: size for key, size in got.items()} == expected


def trees(profiles: list[str]) -> Path:
    root = DATA / "trees"
    for profile in profiles:
        if not (root / profile / f"exec_{profile}").is_dir():
            subprocess.run(
                [sys.executable, str(SHARED / "gen_tree.py"), profile, "--out", str(root)],
                check=True,
            )
    one = root / "one-file" / "exec_one-file"
    one.mkdir(parents=True, exist_ok=True)
    (one / "result.bin").write_bytes(os.urandom(64 * 1024))
    return root


def wide_tree(files: int) -> Path:
    """One result of `files` 1 KiB files in 100 folders, made once."""
    outputs = DATA / "trees" / "wide"
    if not (outputs / "complete").exists():
        shutil.rmtree(outputs, ignore_errors=True)
        for i in range(files):
            folder = outputs / "exec_wide" / f"v{i % 100:02d}"
            folder.mkdir(parents=True, exist_ok=True)
            (folder / f"{i}.bin").write_bytes(os.urandom(1024))
        (outputs / "complete").write_text("")
    return outputs


def backlog_outputs(count: int) -> Path:
    outputs = DATA / "backlog"
    shutil.rmtree(outputs, ignore_errors=True)
    for i in range(count):
        name = f"exec_{1769560000 + i}_{i:08x}"
        (outputs / name).mkdir(parents=True)
        (outputs / name / "data.bin").write_bytes(os.urandom(1024))
        (outputs / f"{name}.done").write_text("")
    return outputs


# --- syncd ------------------------------------------------------------------------------


class Syncd:
    """The real daemon, JSON logs and a metrics textfile on, for one measurement."""

    def __init__(self, run: Run, server: S3Server, outputs: Path, prefix: str, rust: bool) -> None:
        name = prefix.strip("/").replace("/", "_")
        self.log = run.work / f"{name}.log"
        self.metrics = run.work / f"{name}.prom"
        self.config = run.work / f"{name}.yaml"
        storage = {
            "enabled": True,
            "bucket": BUCKET,
            "prefix": prefix.rstrip("/"),
            "endpoint_url": server.endpoint,
            "access_key_id": KEY,
            "secret_access_key": SECRET,
            "use_transfer_acceleration": False,
            "use_rust_client": rust,
            "cloudfront_domain": "https://d111111abcdef8.cloudfront.net",
            "cloudfront_key_pair_id": "KBENCH",
            "cloudfront_private_key_path": str(run.work / "key.pem"),
        }
        daemon = {
            "outputs_dir": str(outputs),
            "state_dir": str(run.work / f"state-{name}"),
            "log_format": "json",
            "metrics_file": str(self.metrics),
        }
        self.config.write_text(yaml.safe_dump({"object_storage": storage, "syncd": daemon}))

    def __enter__(self) -> Syncd:
        with open(self.log, "wb") as out:
            self.process = subprocess.Popen(
                [str(BIN / "syncd"), "run", "--config", str(self.config)],
                stdout=out,
                stderr=out,
                start_new_session=True,
            )
        self.started = time.time()
        return self

    def __exit__(self, *_: object) -> None:
        self.process.send_signal(signal.SIGTERM)
        self.process.wait(60)

    def records(self) -> Iterator[dict[str, Any]]:
        """Its log records: message and time (Unix seconds)."""
        for line in self.log.read_text().splitlines():
            if line.startswith("{"):
                record = json.loads(line)["record"]
                yield {"message": record["message"], "time": record["time"]["timestamp"]}

    def said(self, text: str) -> list[float]:
        """When it logged each message that holds `text`."""
        return [r["time"] for r in self.records() if text in r["message"]]

    def ready(self) -> None:
        wait_until(lambda: self.said("syncd watching"), timeout=60, what="syncd ready")

    def metric(self, name: str) -> float | None:
        if not self.metrics.exists():
            return None
        for line in self.metrics.read_text().splitlines():
            if line.startswith(f"{name} "):
                return float(line.split()[1])
        return None

    def cpu_s(self) -> float:
        fields = Path(f"/proc/{self.process.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def rss_mb(self) -> float:
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
        return 0.0


def publish(daemon: Syncd, outputs: Path, exec_name: str) -> Figures:
    """Drop the marker and wait for the metadata to say s3."""
    marker, meta = outputs / f"{exec_name}.done", outputs / f"{exec_name}.json"
    daemon.ready()
    cpu = daemon.cpu_s()
    (outputs / f".{exec_name}.done.tmp").write_text("")
    started = time.monotonic()
    os.rename(outputs / f".{exec_name}.done.tmp", marker)
    wait_until(
        lambda: meta.exists() and '"s3"' in meta.read_text(),
        timeout=TIMEOUT,
        interval=0.005,
        what="metadata rewritten",
    )
    return Figures(time.monotonic() - started, daemon.cpu_s() - cpu, daemon.rss_mb())


def clean(outputs: Path, exec_name: str) -> None:
    for name in (f"{exec_name}.done", f"{exec_name}.json"):
        (outputs / name).unlink(missing_ok=True)


def measure_syncd(run: Run, server: S3Server, tree: Path, prefix: str, rust: bool) -> Figures:
    clean(tree.parent, tree.name)
    with Syncd(run, server, tree.parent, prefix, rust) as daemon:
        figures = publish(daemon, tree.parent, tree.name)
    clean(tree.parent, tree.name)
    return figures


def overhead(run: Run, server: S3Server, tree: Path, prefix: str) -> float:
    """Seconds of a one-file result's marker-to-metadata time that are not its upload."""
    clean(tree.parent, tree.name)
    with Syncd(run, server, tree.parent, prefix, rust=True) as daemon:
        seconds = publish(daemon, tree.parent, tree.name).seconds
        wait_until(
            lambda: daemon.metric("syncd_published_results_total") == 1,
            timeout=10,
            what="the metrics textfile",
        )
        upload = daemon.metric("syncd_upload_duration_seconds_sum") or 0.0
    clean(tree.parent, tree.name)
    verified(server, f"{prefix}{tree.name}/", manifest(tree))
    return seconds - upload


# --- raw clients ------------------------------------------------------------------------


def measure_peer(client: str, server: S3Server, tree: Path, prefix: str, log: Path) -> Figures:
    """A raw client of ../shared/bench, built and ready before its clock starts."""
    env = dict(os.environ, BENCH_KEY=KEY, BENCH_SECRET=SECRET, PYTHONUNBUFFERED="1")
    command = [sys.executable, str(ROOT / "bench" / "peer.py"), client, server.endpoint]
    with open(log, "ab") as errors:
        process = subprocess.Popen(
            [*command, str(tree), prefix],
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=errors,
            text=True,
        )
    # A raw client can hang for good (s3fs did once when rclone failed its PUTs): killed, it
    # closes its stdout and the run counts as not verified.
    timer = threading.Timer(TIMEOUT, process.kill)
    timer.start()
    try:
        assert process.stdin is not None and process.stdout is not None
        process.stdout.readline()  # ready
        started = time.monotonic()
        process.stdin.write("go\n")
        process.stdin.flush()
        report = process.stdout.readline()
        seconds = time.monotonic() - started
        process.stdin.close()
        process.wait()
    finally:
        timer.cancel()
    # obstore now and then aborts at interpreter exit after its upload (field notes): the
    # report counts if it came; the listing verifies the upload.
    used = json.loads(report) if report.startswith("{") else {"cpu_s": 0.0, "rss_mb": 0.0}
    return Figures(seconds, used["cpu_s"], used["rss_mb"])


def measure_s5cmd(server: S3Server, tree: Path, prefix: str, log: Path) -> Figures:
    env = dict(os.environ, AWS_ACCESS_KEY_ID=KEY, AWS_SECRET_ACCESS_KEY=SECRET)
    env["AWS_REGION"] = "us-east-1"
    usage = log.with_suffix(".time")
    command = [str(BIN / "s5cmd"), "--endpoint-url", server.endpoint, "--log", "error", "cp"]
    command += [f"{tree}/", f"s3://{BUCKET}/{prefix}{tree.name}/"]
    with open(log, "ab") as errors:
        started = time.monotonic()
        # /usr/bin/time: the command's own CPU and peak RSS, not this process's.
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


def measure(run: Run, client: str, server: S3Server, tree: Path, prefix: str) -> Figures:
    warm(tree)
    if client in SYNCD_CLIENTS:
        return measure_syncd(run, server, tree, prefix, SYNCD_CLIENTS[client])
    if client == "s5cmd":
        return measure_s5cmd(server, tree, prefix, run.work / "s5cmd.log")
    return measure_peer(client, server, tree, prefix, run.work / f"{client}.log")


# --- scale ------------------------------------------------------------------------------


def backlog(run: Run, server: S3Server, count: int) -> str:
    """`count` one-file results marked before the daemon starts."""
    outputs, prefix = backlog_outputs(count), f"{run.id}/backlog/"
    with Syncd(run, server, outputs, prefix, rust=True) as daemon:
        wait_until(
            lambda: len(daemon.said("; recorded in ")) >= count,
            timeout=TIMEOUT,
            what=f"{count} results recorded",
        )
        cpu, rss = daemon.cpu_s(), daemon.rss_mb()
        first = min(daemon.said(": uploading ")) - daemon.started
        last = max(daemon.said("; recorded in ")) - daemon.started
    expected = {f"{m.stem}/data.bin": 1024 for m in outputs.glob("*.done")}
    ok = verified(server, prefix, expected)
    return (
        f"- {count} one-file results marked before start -> {server.name}: first upload after "
        f"{first:.2f} s, all recorded after {last:.1f} s ({count / last:.0f} results/s), cpu "
        f"{cpu:.1f} s, peak rss {rss:.0f} MB" + ("" if ok else " NOT VERIFIED")
    )


def wide(run: Run, server: S3Server, files: int) -> str:
    """One result of `files` small files."""
    tree = wide_tree(files) / "exec_wide"
    prefix = f"{run.id}/wide/"
    f = measure_syncd(run, server, tree, prefix, rust=True)
    ok = verified(server, f"{prefix}exec_wide/", manifest(tree))
    return (
        f"- one result of {files} files of 1 KiB -> {server.name}: recorded after "
        f"{f.seconds:.1f} s ({files / f.seconds:.0f} files/s), cpu {f.cpu_s:.1f} s, peak rss "
        f"{f.rss_mb:.0f} MB" + ("" if ok else " NOT VERIFIED")
    )


# --- the table --------------------------------------------------------------------------


def table(measured: list[Measurement], profile: str, server: str, tree: Path) -> str:
    """Medians of the verified runs, with the ratio to the best raw client."""
    expected = manifest(tree)
    files, size = len(expected), sum(expected.values())
    rows: dict[str, Figures] = {}
    for client in [*SYNCD_CLIENTS, *RAW_CLIENTS]:
        runs = [
            m.figures
            for m in measured
            if (m.profile, m.server, m.client) == (profile, server, client) and m.verified
        ]
        if runs:
            columns = zip(*runs, strict=True)
            rows[client] = Figures(*(statistics.median(column) for column in columns))
    best = min((rows[c].seconds for c in RAW_CLIENTS if c in rows), default=None)
    lines = [
        f"\n### {profile} -> {server}: {files} files, {size / 1e6:.1f} MB\n",
        "| client | median s | MB/s | files/s | cpu s | peak rss MB | ratio to best raw |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for client, (seconds, cpu, rss) in rows.items():
        ratio = f"{seconds / best:.2f}" if best else "-"
        lines.append(
            f"| {client} | {seconds:.2f} | {size / seconds / 1e6:.0f} | {files / seconds:.0f} | "
            f"{cpu:.2f} | {rss:.0f} | {ratio} |"
        )
    return "\n".join(lines)


# --- the run ----------------------------------------------------------------------------


def start(servers: list[str]) -> Run:
    run_id = datetime.now().strftime("%Y%m%dT%H%M%S")
    work = DATA / "runs" / run_id
    work.mkdir(parents=True)
    subprocess.run(
        ["openssl", "genrsa", "-out", str(work / "key.pem"), "2048"],
        check=True,
        capture_output=True,
    )
    started = {name: S3Server(name, work / name).start() for name in servers}
    for server in started.values():
        server.client().create_bucket(Bucket=BUCKET)
    return Run(run_id, work, started)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--profiles", default=",".join(PROFILES))
    parser.add_argument("--servers", default="rclone,moto")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument(
        "--scale", action="store_true", help="also: 2,000 marked results, a 100,000-file result"
    )
    args = parser.parse_args()
    profiles = [p for p in args.profiles.split(",") if p]
    names = [s for s in args.servers.split(",") if s]
    root = trees(profiles)
    run = start(names)
    measured: list[Measurement] = []
    report: list[str] = []
    try:
        for rep in range(args.reps):
            clients = [*SYNCD_CLIENTS, *RAW_CLIENTS]
            clients = clients[rep % len(clients) :] + clients[: rep % len(clients)]
            for profile in profiles:
                tree = root / profile / f"exec_{profile}"
                for name in names if rep % 2 == 0 else names[::-1]:
                    for client in clients:
                        prefix = f"{run.id}/{profile}/{name}/{client}/r{rep}/"
                        f = measure(run, client, run.servers[name], tree, prefix)
                        ok = verified(run.servers[name], f"{prefix}{tree.name}/", manifest(tree))
                        measured.append(Measurement(client, profile, name, rep, f, ok))
                        print(
                            f"r{rep} {profile:10} {name:6} {client:16} {f.seconds:7.2f} s "
                            f"cpu {f.cpu_s:6.2f} s rss {f.rss_mb:6.0f} MB "
                            f"{'ok' if ok else 'NOT VERIFIED'}",
                            flush=True,
                        )
        one = root / "one-file" / "exec_one-file"
        overheads = [
            overhead(run, run.servers[name], one, f"{run.id}/one-file/{name}/r{rep}/")
            for rep in range(max(args.reps, 3))
            for name in names
        ]
        for profile in profiles:
            for name in names:
                report.append(table(measured, profile, name, root / profile / f"exec_{profile}"))
        if args.scale:
            server = run.servers[names[0]]
            report += [
                "\n### scale (syncd-obstore)\n",
                backlog(run, server, BACKLOG),
                wide(run, server, WIDE),
            ]
        report.append(
            "\nsyncd overhead on a one-file result (marker dropped -> metadata written, minus "
            f"the upload itself): median {statistics.median(overheads) * 1000:.0f} ms over "
            f"{len(overheads)} runs"
        )
    finally:
        for server in run.servers.values():
            server.stop()
        shutil.rmtree(run.work / "rclone" / "root", ignore_errors=True)
        (run.work / "results.json").write_text(json.dumps([asdict(m) for m in measured], indent=1))
    print("\n".join(report))
    return 0 if all(m.verified for m in measured) else 1


if __name__ == "__main__":
    sys.exit(main())
