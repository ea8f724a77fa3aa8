"""syncd end to end against raw S3 clients, measured in the same run on the same trees.

    .venv/bin/python bench/run.py                        # 3 profiles x 2 servers x 3 reps
    .venv/bin/python bench/run.py --reps 1 --profiles mixed --servers rclone   # a quick look
    .venv/bin/python bench/run.py --scale           # also 2,000 marked results, 100,000 files

Trees come from ../shared/bench/gen_tree.py (small-many, large-few, mixed). rclone serve s3
and moto start on 127.0.0.1. Before each upload the tree is read once, untimed, as the
baseline does. Per repetition, interleaved: syncd (the real daemon, marker dropped ->
metadata rewritten) with each client, and the raw clients (obstore with 64
concurrent puts, s3fs's default put, s5cmd) through ../shared/bench/upload_bench.py. Every
upload is verified by listing. Printed per profile and server: median seconds, MB/s,
files/s, CPU seconds, peak RSS, and the ratio to the best raw client; then syncd's own
overhead on a one-file result (marker seen -> upload starts, upload done -> metadata written).
With --scale, into the first server: 2,000 one-file results already marked when the daemon
starts (seconds to the first upload and to all recorded), and one result of 100,000 files.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
from datetime import datetime
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "bench"
DATA = ROOT / "bench" / "data"
sys.path.insert(0, str(ROOT))

from tests.servers import KEY, SECRET, S3Server, wait_until  # noqa: E402

BIN = Path(sys.executable).parent
BUCKET = "bench"  # the raw-client bench's own bucket name
PROFILES = ["small-many", "large-few", "mixed"]
SYNCD_CLIENTS = {"syncd-obstore": True, "syncd-s3fs": False}
RAW_CLIENTS = ["obstore_async64", "s3fs_default", "s5cmd"]
BACKLOG = 2000  # results marked before the daemon starts
WIDE = 100_000  # files in one result
RAW_TIMEOUT = 300  # seconds; the slowest raw upload here takes ~15


def manifest(tree: Path) -> dict[str, int]:
    return {
        p.relative_to(tree).as_posix(): p.stat().st_size for p in tree.rglob("*") if p.is_file()
    }


def listed(server: S3Server, prefix: str) -> dict[str, int]:
    pages = server.client().get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix)
    return {o["Key"][len(prefix) :]: o["Size"] for page in pages for o in page.get("Contents", [])}


def warm(tree: Path) -> None:
    """Read the tree once, untimed: a daemon uploads files just written, still in the page
    cache (the raw-client baseline does the same)."""
    for path in tree.rglob("*"):
        if path.is_file():
            with open(path, "rb") as f:
                while f.read(1 << 20):
                    pass


def delete(server: S3Server, keys: list[str]) -> None:
    """Remove a measured upload (untimed): a full run would otherwise leave ~21 GB in
    rclone's folder and in moto's memory."""
    s3 = server.client()
    for start in range(0, len(keys), 1000):
        batch = [{"Key": key} for key in keys[start : start + 1000]]
        s3.delete_objects(Bucket=BUCKET, Delete={"Objects": batch, "Quiet": True})


def proc_cpu(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def proc_hwm_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return 0.0


def write_config(
    server: S3Server, outputs: Path, prefix: str, rust: bool, work: Path, **daemon: object
) -> Path:
    config = work / f"{prefix.replace('/', '_')}.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "object_storage": {
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
                    "cloudfront_private_key_path": str(work / "key.pem"),
                },
                "syncd": {
                    "outputs_dir": str(outputs),
                    "state_dir": str(work / f"state-{prefix.replace('/', '_')}"),
                    **daemon,
                },
            }
        )
    )
    return config


def start_syncd(config: Path, log: Path) -> subprocess.Popen:
    with open(log, "wb") as out:
        return subprocess.Popen(
            [str(BIN / "syncd"), "run", "--config", str(config)],
            stdout=out,
            stderr=out,
            start_new_session=True,
        )


def run_syncd(
    server: S3Server, outputs: Path, exec_name: str, prefix: str, rust: bool, work: Path
) -> dict:
    """The real daemon: start it, drop the marker, wait for the metadata to say s3."""
    config = write_config(server, outputs, prefix, rust, work)
    marker, meta = outputs / f"{exec_name}.done", outputs / f"{exec_name}.json"
    marker.unlink(missing_ok=True)
    meta.unlink(missing_ok=True)
    log = work / "syncd.log"
    daemon = start_syncd(config, log)
    try:
        wait_until(lambda: "syncd watching" in log.read_text(), timeout=60, what="syncd ready")
        cpu0 = proc_cpu(daemon.pid)
        tmp = outputs / f".{exec_name}.done.tmp"
        tmp.write_text("")
        started = time.perf_counter()
        os.rename(tmp, marker)
        wait_until(
            lambda: meta.exists() and '"s3"' in meta.read_text(),
            timeout=600,
            interval=0.005,
            what="metadata rewritten",
        )
        seconds = time.perf_counter() - started
        cpu = proc_cpu(daemon.pid) - cpu0
        rss = proc_hwm_mb(daemon.pid)
    finally:
        daemon.send_signal(signal.SIGTERM)
        daemon.wait(60)
    text = log.read_text()
    upload = re.search(r"uploaded \d+ files, \d+ bytes in ([0-9.]+) s", text)
    marker.unlink(missing_ok=True)
    return {
        "seconds": seconds,
        "cpu_s": cpu,
        "rss_mb": rss,
        "upload_s": float(upload.group(1)) if upload else None,
    }


def run_backlog(server: S3Server, work: Path, prefix: str, count: int) -> dict:
    """`count` one-file results already marked when the daemon starts: seconds until the
    first upload starts and until all are recorded, and the daemon's peak RSS."""
    outputs = DATA / "backlog"
    shutil.rmtree(outputs, ignore_errors=True)
    for i in range(count):
        name = f"exec_{1769560000 + i}_{i:08x}"
        (outputs / name).mkdir(parents=True)
        (outputs / name / "data.bin").write_bytes(os.urandom(1024))
        (outputs / f"{name}.done").write_text("")
    log = work / "backlog.log"
    started = time.perf_counter()
    daemon = start_syncd(write_config(server, outputs, prefix, True, work), log)
    try:
        wait_until(lambda: " uploading " in log.read_text(), timeout=60, what="first upload")
        first = time.perf_counter() - started
        wait_until(
            lambda: log.read_text().count("; recorded in ") >= count,
            timeout=600,
            what=f"{count} results recorded",
        )
        seconds = time.perf_counter() - started
        cpu, rss = proc_cpu(daemon.pid), proc_hwm_mb(daemon.pid)
    finally:
        daemon.send_signal(signal.SIGTERM)
        daemon.wait(60)
    recorded = sum(
        json.loads(meta.read_text()).get("storage_type") == "s3" for meta in outputs.glob("*.json")
    )
    keys = listed(server, prefix)
    delete(server, [prefix + key for key in keys])
    return {
        "first_s": first,
        "seconds": seconds,
        "cpu_s": cpu,
        "rss_mb": rss,
        "verified": recorded == count and len(keys) == count,
    }


def wide_tree(files: int) -> Path:
    """One result of `files` 1 KiB files in 100 folders, made once."""
    outputs = DATA / "trees" / "wide"
    tree = outputs / "exec_wide"
    if not (outputs / "complete").exists():
        shutil.rmtree(outputs, ignore_errors=True)
        for i in range(files):
            folder = tree / f"v{i % 100:02d}"
            folder.mkdir(parents=True, exist_ok=True)
            (folder / f"{i}.bin").write_bytes(os.urandom(1024))
        (outputs / "complete").write_text("")
    return outputs


def run_raw(client: str, server: S3Server, tree: Path, prefix: str) -> dict:
    env = dict(
        os.environ,
        BENCH_KEY=KEY,
        BENCH_SECRET=SECRET,
        AWS_ACCESS_KEY_ID=KEY,
        AWS_SECRET_ACCESS_KEY=SECRET,
        AWS_REGION="us-east-1",
        PYTHONUNBUFFERED="1",  # the report is out before an abort at exit can lose it
    )
    if client == "s5cmd":
        cmd = [
            str(BIN / "s5cmd"),
            "--endpoint-url",
            server.endpoint,
            "--log",
            "error",
            "cp",
            f"{tree}/",
            f"s3://{BUCKET}/{prefix}{tree.name}/",
        ]
    else:
        cmd = [
            sys.executable,
            str(SHARED / "upload_bench.py"),
            "worker",
            "--client",
            client,
            "--endpoint",
            server.endpoint,
            "--src",
            str(tree),
            "--prefix",
            prefix,
        ]
    started = time.perf_counter()
    process = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    # A raw client can hang for good when rclone fails its PUTs (s3fs did once): stop it, and
    # let the listing count the run as not verified.
    timer = threading.Timer(RAW_TIMEOUT, process.kill)
    timer.start()
    _, status, usage = os.wait4(process.pid, 0)
    timer.cancel()
    wall = time.perf_counter() - started
    out, err = process.stdout.read().decode(), process.stderr.read().decode()
    code = os.waitstatus_to_exitcode(status)
    measured = {
        "seconds": wall,
        "cpu_s": usage.ru_utime + usage.ru_stime,
        "rss_mb": usage.ru_maxrss / 1024,
    }
    if client == "s5cmd":
        if code != 0:
            print(f"{client} exited {code}: {err[-300:]}", flush=True)
        return measured
    # obstore now and then aborts at interpreter exit after its upload finished (field
    # notes): the worker's report counts if it was printed; the listing verifies the upload.
    lines = out.strip().splitlines()
    if not lines:
        print(f"{client} exited {code} without a report: {err[-300:]}", flush=True)
        return measured
    report = json.loads(lines[-1])
    return {"seconds": report["upload_s"], "cpu_s": report["cpu_s"], "rss_mb": report["rss_mb"]}


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--profiles", default=",".join(PROFILES))
    parser.add_argument("--servers", default="rclone,moto")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument(
        "--scale",
        action="store_true",
        help="also: 2,000 results marked before start, and one 100,000-file result",
    )
    args = parser.parse_args()
    profiles = [p for p in args.profiles.split(",") if p]
    servers_wanted = args.servers.split(",")

    trees_root = DATA / "trees"
    for profile in profiles:
        if not (trees_root / profile / f"exec_{profile}").is_dir():
            subprocess.run(
                [sys.executable, str(SHARED / "gen_tree.py"), profile, "--out", str(trees_root)],
                check=True,
            )
    one_file = trees_root / "one-file"
    (one_file / "exec_one-file").mkdir(parents=True, exist_ok=True)
    (one_file / "exec_one-file" / "result.bin").write_bytes(os.urandom(64 * 1024))

    run_id = datetime.now().strftime("%Y%m%dT%H%M%S")
    work = DATA / "runs" / run_id
    work.mkdir(parents=True)
    subprocess.run(
        ["openssl", "genrsa", "-out", str(work / "key.pem"), "2048"],
        check=True,
        capture_output=True,
    )
    servers = {name: S3Server(name, work / name).start() for name in servers_wanted}
    results: list[dict] = []
    try:
        for server in servers.values():
            server.client().create_bucket(Bucket=BUCKET)
        for rep in range(args.reps):
            for profile in profiles:
                outputs = trees_root / profile
                tree = outputs / f"exec_{profile}"
                expected = manifest(tree)
                clients = list(SYNCD_CLIENTS) + RAW_CLIENTS
                clients = clients[rep % len(clients) :] + clients[: rep % len(clients)]
                for name in servers_wanted if rep % 2 == 0 else servers_wanted[::-1]:
                    server = servers[name]
                    for client in clients:
                        prefix = f"{run_id}/{profile}/{name}/{client}/r{rep}/"
                        warm(tree)
                        if client in SYNCD_CLIENTS:
                            record = run_syncd(
                                server, outputs, tree.name, prefix, SYNCD_CLIENTS[client], work
                            )
                        else:
                            record = run_raw(client, server, tree, prefix)
                        got = listed(server, f"{prefix}{tree.name}/")
                        delete(server, [f"{prefix}{tree.name}/{rel}" for rel in got])
                        record.update(
                            profile=profile,
                            server=name,
                            client=client,
                            rep=rep,
                            verified=got == expected,
                        )
                        results.append(record)
                        print(
                            f"r{rep} {profile:10} {name:6} {client:16} {record['seconds']:7.2f} s "
                            f"cpu {record['cpu_s']:6.2f} s rss {record['rss_mb']:6.0f} MB "
                            f"{'ok' if record['verified'] else 'NOT VERIFIED'}",
                            flush=True,
                        )
        overhead = []
        for rep in range(max(args.reps, 3)):
            for name in servers_wanted:
                record = run_syncd(
                    servers[name],
                    one_file,
                    "exec_one-file",
                    f"{run_id}/one-file/{name}/r{rep}/",
                    True,
                    work,
                )
                overhead.append(record["seconds"] - (record["upload_s"] or 0))
        scale = []
        if args.scale:
            server = servers[servers_wanted[0]]
            backlog = run_backlog(server, work, f"{run_id}/backlog/", BACKLOG)
            scale.append(
                f"- {BACKLOG} one-file results marked before start -> {server.name}: first "
                f"upload after {backlog['first_s']:.2f} s, all recorded after "
                f"{backlog['seconds']:.1f} s ({BACKLOG / backlog['seconds']:.0f} results/s), "
                f"cpu {backlog['cpu_s']:.1f} s, peak rss {backlog['rss_mb']:.0f} MB"
                + ("" if backlog["verified"] else " NOT VERIFIED")
            )
            outputs = wide_tree(WIDE)
            prefix = f"{run_id}/wide/"
            wide = run_syncd(server, outputs, "exec_wide", prefix, True, work)
            got = listed(server, f"{prefix}exec_wide/")
            wide["verified"] = got == manifest(outputs / "exec_wide")
            delete(server, [f"{prefix}exec_wide/{rel}" for rel in got])
            scale.append(
                f"- one result of {WIDE} files of 1 KiB -> {server.name}: recorded after "
                f"{wide['seconds']:.1f} s ({WIDE / wide['seconds']:.0f} files/s), cpu "
                f"{wide['cpu_s']:.1f} s, peak rss {wide['rss_mb']:.0f} MB"
                + ("" if wide["verified"] else " NOT VERIFIED")
            )
            at = {"server": server.name, "client": "syncd-obstore", "rep": 0}
            results += [backlog | at | {"profile": "backlog"}, wide | at | {"profile": "wide"}]
    finally:
        for server in servers.values():
            server.stop()
        shutil.rmtree(work / "rclone" / "root", ignore_errors=True)
    (work / "results.json").write_text(json.dumps(results, indent=1))
    print(summary(results, profiles, servers_wanted, expected_sizes(trees_root, profiles)))
    if scale:
        print("\n### scale (syncd-obstore)\n\n" + "\n".join(scale))
    print(
        f"\nsyncd overhead on a one-file result (marker dropped -> metadata written, minus the "
        f"upload itself): median {statistics.median(overhead) * 1000:.0f} ms "
        f"over {len(overhead)} runs"
    )
    return 0 if all(r["verified"] for r in results) else 1


def expected_sizes(trees_root: Path, profiles: list[str]) -> dict[str, tuple[int, int]]:
    return {
        p: (len(m := manifest(trees_root / p / f"exec_{p}")), sum(m.values())) for p in profiles
    }


def summary(
    results: list[dict], profiles: list[str], servers: list[str], sizes: dict[str, tuple[int, int]]
) -> str:
    lines = []
    for profile in profiles:
        files, size = sizes[profile]
        for server in servers:
            rows = {}
            for client in list(SYNCD_CLIENTS) + RAW_CLIENTS:
                runs = [
                    r
                    for r in results
                    if (r["profile"], r["server"], r["client"]) == (profile, server, client)
                    and r["verified"]
                ]
                if runs:
                    rows[client] = {
                        k: statistics.median(r[k] for r in runs)
                        for k in ("seconds", "cpu_s", "rss_mb")
                    }
            if not rows:
                continue
            best_raw = min((rows[c]["seconds"] for c in RAW_CLIENTS if c in rows), default=None)
            lines.append(f"\n### {profile} -> {server}: {files} files, {size / 1e6:.1f} MB\n")
            lines.append(
                "| client | median s | MB/s | files/s | cpu s | peak rss MB | ratio to best raw |"
            )
            lines.append("|---|---:|---:|---:|---:|---:|---:|")
            for client, row in rows.items():
                ratio = f"{row['seconds'] / best_raw:.2f}" if best_raw else "-"
                lines.append(
                    f"| {client} | {row['seconds']:.2f} | {size / row['seconds'] / 1e6:.0f} | "
                    f"{files / row['seconds']:.0f} | {row['cpu_s']:.2f} | "
                    f"{row['rss_mb']:.0f} | {ratio} |"
                )
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
