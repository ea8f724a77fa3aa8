"""syncd end to end against raw S3 clients, measured in the same run on the same trees.

    .venv/bin/python -m bench.run                      # 3 profiles x 2 servers x 3 reps
    .venv/bin/python -m bench.run --reps 1 --profiles mixed --servers rclone   # a quick look
    .venv/bin/python -m bench.run --scale              # also 2,000 marked results, 100,000 files

Trees come from ../shared/bench/gen_tree.py; rclone serve s3 and moto start on 127.0.0.1. Per
repetition, interleaved, each tree read once untimed before each upload: syncd (the real
daemon) with each client, and the raw clients (obstore with 64 puts in flight, s3fs's default
put, s5cmd). Every upload is verified by listing, then deleted. One clock, this process's, from
the moment a client is told to go to the moment its work is done: syncd from the marker's
rename to its metadata saying s3; a raw client, built by `bench/peer.py`, from `go` on its stdin
to its report; s5cmd (a Go binary, it starts in milliseconds) from its start to its exit. CPU
and peak RSS are each process's own; syncd's other figures come from its JSON log and metrics.
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
from dataclasses import asdict, dataclass
from datetime import datetime
from pathlib import Path
from typing import NamedTuple

import yaml

from tests.servers import KEY, SECRET, S3Server, wait_until

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "bench"
DATA = ROOT / "bench" / "data"
BIN = Path(sys.executable).parent
BUCKET = "bench"  # the raw-client bench's own bucket name
PROFILES = ["small-many", "large-few", "mixed"]
SYNCD_CLIENTS = {"syncd-obstore": True, "syncd-s3fs": False}  # name: use_rust_client
RAW_CLIENTS = ["obstore_async64", "s3fs_default", "s5cmd"]  # as ../shared/bench names them
BACKLOG, WIDE = 2000, 100_000  # results marked before start; files in one result
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
    result (made once) and BACKLOG marked one-file results (made anew)."""
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
    if scale:
        shutil.rmtree(DATA / "backlog", ignore_errors=True)
        names = [f"exec_{1769560000 + i}_{i:08x}" for i in range(BACKLOG)]
        write_files(DATA / "backlog", {f"{name}/data.bin": 1024 for name in names})
        write_files(DATA / "backlog", {f"{name}.done": 0 for name in names})
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
        wait_until(
            lambda: meta.exists() and '"s3"' in meta.read_text(),
            timeout=TIMEOUT,
            interval=0.005,
            what="metadata rewritten",
        )
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


def measure_s5cmd(server: S3Server, tree: Path, prefix: str, log: Path) -> Figures:
    env = dict(
        os.environ, AWS_ACCESS_KEY_ID=KEY, AWS_SECRET_ACCESS_KEY=SECRET, AWS_REGION="us-east-1"
    )
    command = [str(BIN / "s5cmd"), "--endpoint-url", server.endpoint, "--log", "error", "cp"]
    command += [f"{tree}/", f"s3://{BUCKET}/{prefix}{tree.name}/"]
    usage = log.with_suffix(".time")  # /usr/bin/time: the command's own CPU and peak RSS
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


def measure(work: Path, client: str, server: S3Server, tree: Path, prefix: str) -> Figures:
    warm(tree)
    if client in SYNCD_CLIENTS:
        return measure_syncd(work, server, tree, prefix, SYNCD_CLIENTS[client])
    if client == "s5cmd":
        return measure_s5cmd(server, tree, prefix, work / "s5cmd.log")
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


def scale(work: Path, server: S3Server, prefix: str, wide: Path) -> list[str]:
    """BACKLOG one-file results marked before the daemon starts; one result of WIDE files."""
    outputs = DATA / "backlog"
    with Syncd(work, server, outputs, f"{prefix}backlog/", rust=True) as daemon:
        wait_until(
            lambda: len(daemon.said("; recorded in ")) >= BACKLOG,
            timeout=TIMEOUT,
            what=f"{BACKLOG} results recorded",
        )
        cpu, rss = process_figures(daemon.process.pid)
        first = min(daemon.said(": uploading ")) - daemon.started
        last = max(daemon.said("; recorded in ")) - daemon.started
    expected = {f"{m.stem}/data.bin": 1024 for m in outputs.glob("*.done")}
    ok = verified(server, f"{prefix}backlog/", expected)
    f = measure_syncd(work, server, wide, f"{prefix}wide/", rust=True)
    wide_ok = verified(server, f"{prefix}wide/{wide.name}/", manifest(wide))
    return [
        "\n### scale (syncd-obstore)\n",
        f"- {BACKLOG} one-file results marked before start -> {server.name}: first upload after "
        f"{first:.2f} s, all recorded after {last:.1f} s ({BACKLOG / last:.0f} results/s), cpu "
        f"{cpu:.1f} s, peak rss {rss:.0f} MB" + ("" if ok else " NOT VERIFIED"),
        f"- one result of {WIDE} files of 1 KiB -> {server.name}: recorded after "
        f"{f.seconds:.1f} s ({WIDE / f.seconds:.0f} files/s), cpu {f.cpu_s:.1f} s, peak rss "
        f"{f.rss_mb:.0f} MB" + ("" if wide_ok else " NOT VERIFIED"),
    ]


def table(measured: list[Measurement], profile: str, server: str, tree: Path) -> str:
    """Medians of the verified runs, with the ratio to the best raw client."""
    expected = manifest(tree)
    files, size = len(expected), sum(expected.values())
    rows: dict[str, Figures] = {}
    for client in [*SYNCD_CLIENTS, *RAW_CLIENTS]:
        key = (client, profile, server)
        runs = [
            m.figures for m in measured if (m.client, m.profile, m.server) == key and m.verified
        ]
        if runs:
            rows[client] = Figures(*(statistics.median(c) for c in zip(*runs, strict=True)))
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


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--profiles", default=",".join(PROFILES))
    parser.add_argument("--servers", default="rclone,moto")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--scale", action="store_true", help="also: 2,000 results, 100,000 files")
    args = parser.parse_args()
    profiles, names = args.profiles.split(","), args.servers.split(",")
    root = trees(profiles, args.scale)
    run_id = datetime.now().strftime("%Y%m%dT%H%M%S")
    work = DATA / "runs" / run_id
    work.mkdir(parents=True)
    key = ["openssl", "genrsa", "-out", str(work / "key.pem"), "2048"]
    subprocess.run(key, check=True, capture_output=True)
    servers = {name: S3Server(name, work / name).start() for name in names}
    measured: list[Measurement] = []
    report: list[str] = []
    try:
        for server in servers.values():
            server.client().create_bucket(Bucket=BUCKET)
        for rep in range(args.reps):
            clients = [*SYNCD_CLIENTS, *RAW_CLIENTS]
            clients = clients[rep % len(clients) :] + clients[: rep % len(clients)]
            for profile in profiles:
                tree = root / profile / f"exec_{profile}"
                for name in names if rep % 2 == 0 else names[::-1]:
                    for client in clients:
                        prefix = f"{run_id}/{profile}/{name}/{client}/r{rep}/"
                        f = measure(work, client, servers[name], tree, prefix)
                        ok = verified(servers[name], f"{prefix}{tree.name}/", manifest(tree))
                        measured.append(Measurement(client, profile, name, rep, f, ok))
                        print(
                            f"r{rep} {profile:10} {name:6} {client:16} {f.seconds:7.2f} s "
                            f"cpu {f.cpu_s:6.2f} s rss {f.rss_mb:6.0f} MB "
                            f"{'ok' if ok else 'NOT VERIFIED'}",
                            flush=True,
                        )
        one = root / "one-file" / "exec_one-file"
        overheads = [
            overhead(work, servers[name], one, f"{run_id}/one-file/{name}/r{rep}/")
            for rep in range(max(args.reps, 3))
            for name in names
        ]
        report = [table(measured, p, s, root / p / f"exec_{p}") for p in profiles for s in names]
        if args.scale:
            report += scale(work, servers[names[0]], f"{run_id}/", root / "wide" / "exec_wide")
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
