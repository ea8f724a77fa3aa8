"""Slow and broken links, through a proxy on 127.0.0.1 in front of a real server: a slow uplink
never fails a request that is still moving bytes, a dropped connection is retried."""

from __future__ import annotations

import os

import pytest

from tests.proxy import Proxy

MiB = 1024 * 1024


@pytest.mark.slow
@pytest.mark.parametrize(
    ("rust", "files", "size"),
    [
        # obstore: 8 MiB parts, six requests in flight share 1 MB/s: ~50 s each, beyond
        # obstore's default 30 s whole-request timeout.
        (True, 3, 12 * MiB),
        # s3fs: four single PUTs of 15 MiB share 1 MB/s: ~63 s each, longer than botocore's
        # 60 s read timeout (which only counts while it waits for the answer).
        (False, 4, 15 * MiB),
    ],
    ids=["obstore", "s3fs"],
)
def test_a_slow_uplink_still_publishes_large_files(moto_workspace, rust, files, size):
    ws = moto_workspace
    data = {f"results.zarr/t2m/{i}.0.0": os.urandom(size) for i in range(files)}
    ws.result("exec_1_abcdef01", data)
    with Proxy(ws.server.port, rate=1_000_000) as proxy:
        ws.settings["object_storage"]["endpoint_url"] = proxy.endpoint
        ws.settings["object_storage"]["use_rust_client"] = rust

        done = ws.sync("exec_1_abcdef01")

    assert done.returncode == 0, done.stderr
    assert proxy.sent >= files * size
    assert ws.objects() == {f"outputs/exec_1_abcdef01/{k}": v for k, v in data.items()}
    assert ws.recorded("exec_1_abcdef01")


def test_a_connection_dropped_mid_upload_is_retried(moto_workspace):
    ws = moto_workspace
    ws.settings["syncd"]["retry_min_delay"] = 0.2
    data = {"a.bin": os.urandom(3 * MiB)}
    ws.result("exec_2_abcdef02", data)
    ws.mark("exec_2_abcdef02")
    with Proxy(ws.server.port, drop_after=MiB) as proxy:
        ws.settings["object_storage"]["endpoint_url"] = proxy.endpoint
        daemon = ws.daemon()
        daemon.wait_log("exec_2_abcdef02: upload of outputs/exec_2_abcdef02/a.bin failed")
        proxy.drop_after = None  # the link comes back

        daemon.wait_log("exec_2_abcdef02: uploaded 1 files", timeout=60)
        assert daemon.terminate() == 0
    assert ws.objects() == {"outputs/exec_2_abcdef02/a.bin": data["a.bin"]}


@pytest.mark.parametrize("rust", [True, False], ids=["obstore", "s3fs"])
def test_a_distant_link_carries_eight_files_per_unit_of_max_concurrency(moto_workspace, rust):
    """Over a link of long round trips small files are bound by how many are in flight: as many
    as the server's own uploader keeps at the default (8 x 16), and never more."""
    ws = moto_workspace
    ws.settings["object_storage"]["max_concurrency"] = 2
    ws.settings["object_storage"]["use_rust_client"] = rust
    data = {f"results.zarr/t2m/{i}.0.0": os.urandom(1024) for i in range(40)}
    ws.result("exec_3_abcdef03", data)
    with Proxy(ws.server.port, rtt=0.2) as proxy:
        ws.settings["object_storage"]["endpoint_url"] = proxy.endpoint

        done = ws.sync("exec_3_abcdef03")

    assert done.returncode == 0, done.stderr
    assert ws.objects() == {f"outputs/exec_3_abcdef03/{k}": v for k, v in data.items()}
    _, peak = proxy.requests.take()
    assert peak == 16
