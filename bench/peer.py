"""One peer client as a process the bench can time with its own clock: it builds the client,
says `ready`, uploads when it reads `go` on stdin, then says how much CPU and memory the upload
took, as one JSON line. The raw clients come from ../shared/bench/upload_bench.py; the
multi-storage-client ones are here:

- `msc_server`: as the Earth2Studio server uploads a result (earth2studio/serve/server/
  object_storage.py): an S3 profile with max_concurrency 16, 8 MiB parts and the Rust client,
  `StorageClient.sync_from` a local profile. It skips dotfiles (Zarr v2's `.zarray`...).
- `msc_best`: `StorageClient.upload_files` of every file, Rust client, 64 workers.
- `obstore_md5`: not a peer but a floor: obstore x 64 as ../shared/bench builds it, which also
  reads each file in Python and takes its MD5 before putting its bytes, as any client must that
  checks every byte it sends against the store's ETag and records its MD5 (syncd does both).

    python bench/peer.py <client> <endpoint> <tree> <prefix>
"""

from __future__ import annotations

import importlib.util
import json
import os
import resource
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

UPLOAD_BENCH = Path(__file__).resolve().parents[2] / "shared" / "bench" / "upload_bench.py"


def peak_rss_mb() -> float:
    # VmHWM, not ru_maxrss: the latter carries the forking parent's peak across exec.
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return 0.0


def msc(endpoint: str, bucket: str) -> Any:
    """A multi-storage-client S3 profile configured as the Earth2Studio server configures it."""
    import multistorageclient

    part = 8 * 1024 * 1024
    options = {
        "base_path": bucket,
        "region_name": "us-east-1",
        "multipart_threshold": part,
        "multipart_chunksize": part,
        "max_concurrency": 16,
        "endpoint_url": endpoint,
        # allow_http: the bench's servers speak plain HTTP; the server's S3 endpoint is HTTPS.
        "rust_client": {"multipart_chunksize": part, "max_concurrency": 16, "allow_http": True},
    }
    profile = {"profiles": {"e2s": {"storage_provider": {"type": "s3", "options": options}}}}
    config = multistorageclient.StorageClientConfig.from_dict(config_dict=profile, profile="e2s")
    return multistorageclient.StorageClient(config=config)


def build_msc(endpoint: str, tree: Path, prefix: str, *, server: bool) -> Callable[[], None]:
    import multistorageclient

    os.environ.update(AWS_ACCESS_KEY_ID=os.environ["BENCH_KEY"])
    os.environ.update(AWS_SECRET_ACCESS_KEY=os.environ["BENCH_SECRET"])
    target = msc(endpoint, "bench")
    remote = f"{prefix}{tree.name}"
    if server:
        posix = {"type": "file", "options": {"base_path": "/"}}
        local = {"profiles": {"local": {"storage_provider": posix}}}
        source = multistorageclient.StorageClient(
            config=multistorageclient.StorageClientConfig.from_dict(local, profile="local")
        )
        return lambda: target.sync_from(source, str(tree.absolute()), f"/{remote}")
    files = sorted(p for p in tree.rglob("*") if p.is_file())
    remotes = [f"{remote}/{p.relative_to(tree).as_posix()}" for p in files]
    return lambda: target.upload_files(remotes, [str(p) for p in files], max_workers=64)


def build_obstore_md5(bench: Any, endpoint: str, tree: Path, prefix: str) -> Callable[[], None]:
    import asyncio
    import hashlib

    import obstore
    from obstore.store import S3Store

    store = S3Store(
        bench.BUCKET,
        endpoint=endpoint,
        access_key_id=bench.KEY,
        secret_access_key=bench.SECRET,
        region=bench.REGION,
        virtual_hosted_style_request=False,
        client_options={"allow_http": True},
    )

    def read(path: Path) -> bytes:
        data = path.read_bytes()
        hashlib.md5(data).hexdigest()
        return data

    async def send() -> None:
        slots = asyncio.Semaphore(64)

        async def one(path: Path) -> None:
            async with slots:
                # As syncd: small files read on the loop, a thread costs more than the read.
                small = path.stat().st_size <= 256 * 1024
                data = read(path) if small else await asyncio.to_thread(read, path)
                await obstore.put_async(store, bench._key(prefix, tree, path), data)

        await asyncio.gather(*(one(path) for path in bench._files(tree)))

    return lambda: asyncio.run(send())


def build(client: str, endpoint: str, tree: Path, prefix: str) -> Callable[[], None]:
    if client in ("msc_server", "msc_best"):
        return build_msc(endpoint, tree, prefix, server=client == "msc_server")
    spec = importlib.util.spec_from_file_location("upload_bench", UPLOAD_BENCH)
    assert spec is not None and spec.loader is not None
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    if client == "obstore_md5":
        return build_obstore_md5(bench, endpoint, tree, prefix)
    builder, options, _ = bench.PY_CLIENTS[client]
    upload: Callable[[], None] = builder(endpoint, tree, prefix, **options)
    return upload


def main(client: str, endpoint: str, tree: str, prefix: str) -> None:
    upload = build(client, endpoint, Path(tree), prefix)
    print("ready", flush=True)
    sys.stdin.readline()
    before = resource.getrusage(resource.RUSAGE_SELF)
    upload()
    after = resource.getrusage(resource.RUSAGE_SELF)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    print(json.dumps({"cpu_s": cpu, "rss_mb": peak_rss_mb()}), flush=True)


if __name__ == "__main__":
    main(*sys.argv[1:5])
