"""The bytes a reader gets are the bytes the model wrote: every request that carries a file's
bytes carries a checksum of them, a store that verifies it refuses a byte flipped on the way,
objects carry the headers readers and CloudFront need, and a Zarr store's metadata documents
reach the bucket only after every chunk of the result. Seen from the server's side, through a
proxy on 127.0.0.1 that reads each request."""

from __future__ import annotations

import os

import pytest

from tests.conftest import md5
from tests.proxy import Proxy
from tests.recorder import HttpRecorder
from tests.servers import wait_until

MiB = 1024 * 1024
ZARR_DOCS = {".zgroup", ".zattrs", ".zarray", ".zmetadata", "zarr.json"}


def result_files() -> dict[str, bytes]:
    """A Zarr v2 store and a v3 one, and a netCDF file sent in three parts."""
    return {
        "results.zarr/.zgroup": b'{"zarr_format": 2}',
        "results.zarr/.zattrs": b"{}",
        "results.zarr/.zmetadata": b'{"metadata": {}, "zarr_consolidated_format": 1}',
        "results.zarr/t2m/.zarray": b'{"chunks": [1, 4]}',
        **{f"results.zarr/t2m/{i}.0": os.urandom(200_000 + i) for i in range(12)},
        "v3.zarr/zarr.json": b'{"zarr_format": 3, "node_type": "group"}',
        "v3.zarr/u10/zarr.json": b'{"zarr_format": 3, "node_type": "array"}',
        **{f"v3.zarr/u10/c/{i}/0": os.urandom(50_000) for i in range(6)},
        "forecast.nc": os.urandom(20 * MiB),
    }


@pytest.mark.parametrize("rust", [True, False], ids=["obstore", "s3fs"])
def test_every_request_with_bytes_carries_their_checksum_and_docs_go_last(workspace, rust):
    ws = workspace
    files = result_files()
    ws.result("exec_1_abcdef01", files)
    recorder = HttpRecorder()
    with Proxy(ws.server.port, observer=recorder) as proxy:
        ws.settings["object_storage"]["endpoint_url"] = proxy.endpoint
        ws.settings["object_storage"]["use_rust_client"] = rust
        done = ws.sync("exec_1_abcdef01")
    assert done.returncode == 0, done.stderr
    assert "ETags that are not MD5s" not in done.stderr  # both servers' ETags are checked

    uploads = recorder.uploads()
    assert {r.key for r in uploads} == {f"outputs/exec_1_abcdef01/{k}" for k in files}
    assert [e for r in uploads if (e := r.checksum_error()) is not None] == []
    header = "x-amz-checksum-sha256" if rust else "content-md5"
    assert all(header in r.headers for r in uploads)
    parts = [r for r in uploads if r.key.endswith("forecast.nc")]
    assert len(parts) == 3 and all("partNumber=" in r.query for r in parts)

    # Every metadata document starts only once every other file was acknowledged (for the
    # netCDF file: its CompleteMultipartUpload).
    writes = [r for r in recorder.requests if r.method in ("PUT", "POST")]
    docs = [r for r in writes if r.key.rsplit("/", 1)[-1] in ZARR_DOCS]
    data = [r for r in writes if r.key.rsplit("/", 1)[-1] not in ZARR_DOCS]
    assert len(docs) == 6
    assert all(r.answered_at is not None for r in data)
    assert min(r.started_at for r in docs) > max(r.answered_at for r in data)

    # What the bucket holds, and what readers are told.
    assert ws.objects() == {f"outputs/exec_1_abcdef01/{k}": v for k, v in files.items()}
    entries = {e["path"]: e["md5"] for e in ws.metadata("exec_1_abcdef01")["output_files"]}
    assert entries == {f"exec_1_abcdef01/{k}": md5(v) for k, v in files.items()}
    s3 = ws.server.client()

    def head(rel: str) -> tuple[str, str]:
        answer = s3.head_object(Bucket=ws.bucket, Key=f"outputs/exec_1_abcdef01/{rel}")
        return answer["ContentType"], answer.get("CacheControl", "")

    immutable = "public, max-age=31536000, immutable"
    assert head("results.zarr/.zmetadata") == ("application/json", "no-cache")
    assert head("v3.zarr/u10/zarr.json") == ("application/json", "no-cache")
    assert head("results.zarr/t2m/3.0") == ("application/octet-stream", immutable)
    assert head("v3.zarr/u10/c/2/0") == ("application/octet-stream", immutable)
    assert head("forecast.nc") == ("application/x-netcdf", immutable)


@pytest.mark.parametrize("rust", [True, False], ids=["obstore", "s3fs"])
def test_a_byte_flipped_on_the_way_is_refused_and_sent_again(rclone_workspace, rust):
    """rclone verifies Content-MD5 (BadDigest); the first connection flips one byte of what it
    carries, well inside the first file's body."""
    ws = rclone_workspace
    ws.settings["syncd"]["retry_min_delay"] = 0.2
    data = os.urandom(MiB)
    ws.result("exec_2_abcdef02", {"a.bin": data})
    ws.mark("exec_2_abcdef02")
    with Proxy(ws.server.port, corrupt_at=300_000, corrupt_connections=1) as proxy:
        ws.settings["object_storage"]["endpoint_url"] = proxy.endpoint
        ws.settings["object_storage"]["use_rust_client"] = rust
        daemon = ws.daemon()
        wait_until(lambda: ws.recorded("exec_2_abcdef02"), what="the result recorded")
        assert daemon.terminate() == 0

    assert ws.objects() == {"outputs/exec_2_abcdef02/a.bin": data}
    assert ws.metadata("exec_2_abcdef02")["output_files"] == [
        {"path": "exec_2_abcdef02/a.bin", "size": MiB, "md5": md5(data)}
    ]
    log = daemon.log()
    refused = "BadDigest" if not rust else "the store holds other bytes than were sent"
    assert f"exec_2_abcdef02: upload of outputs/exec_2_abcdef02/a.bin failed: {refused}" in log
    assert "exec_2_abcdef02: uploaded 1 files" in log


@pytest.mark.parametrize("size", [MiB, 20 * MiB], ids=["one-put", "multipart"])
@pytest.mark.parametrize("rust", [True, False], ids=["obstore", "s3fs"])
def test_a_byte_flipped_on_the_way_to_a_store_that_checks_nothing_is_never_recorded(
    moto_workspace, rust, size
):
    """moto verifies no checksum and stores what it gets: the ETag it answers (a PUT's, or a
    multipart upload's, made of its parts' MD5s) differs from what syncd sent, so the file is
    sent again and the bucket ends with the model's bytes."""
    ws = moto_workspace
    ws.settings["syncd"]["retry_min_delay"] = 0.2
    data = os.urandom(size)
    ws.result("exec_4_abcdef04", {"a.bin": data})
    ws.mark("exec_4_abcdef04")
    # Connection 0 is the start-up probe's (a listing); the first upload rides on it or on 1.
    with Proxy(ws.server.port, corrupt_at=600_000, corrupt_connections=2) as proxy:
        ws.settings["object_storage"]["endpoint_url"] = proxy.endpoint
        ws.settings["object_storage"]["use_rust_client"] = rust
        daemon = ws.daemon()
        wait_until(lambda: ws.recorded("exec_4_abcdef04"), what="the result recorded")
        assert daemon.terminate() == 0

    assert ws.objects() == {"outputs/exec_4_abcdef04/a.bin": data}
    assert ws.metadata("exec_4_abcdef04")["output_files"] == [
        {"path": "exec_4_abcdef04/a.bin", "size": size, "md5": md5(data)}
    ]
    log = daemon.log()
    assert (
        "exec_4_abcdef04: upload of outputs/exec_4_abcdef04/a.bin failed: the store holds other "
        "bytes than were sent" in log
    )


def test_a_store_whose_etags_are_not_md5s_is_found_out_once(moto_workspace):
    """An encrypting store answers ETags that are not the MD5 of the bytes: obstore's uploads
    read the first object back, find the bytes right, and stop comparing ETags."""
    ws = moto_workspace
    # Single PUTs: this proxy's lies would also break CompleteMultipartUpload, unlike a store's.
    files = {"a.bin": os.urandom(MiB), "b.bin": os.urandom(2 * MiB), "c.bin": b"c"}
    ws.result("exec_3_abcdef03", files)
    with Proxy(ws.server.port, lie_etags=True) as proxy:
        ws.settings["object_storage"]["endpoint_url"] = proxy.endpoint
        done = ws.sync("exec_3_abcdef03")

    assert done.returncode == 0, done.stderr
    assert done.stderr.count("answers ETags that are not MD5s") == 1
    assert ws.objects() == {f"outputs/exec_3_abcdef03/{k}": v for k, v in files.items()}


@pytest.mark.parametrize("rust", [True, False], ids=["obstore", "s3fs"])
def test_one_odd_etag_never_turns_the_checks_off(moto_workspace, rust):
    """One answer's ETag garbled on the way (the bytes stored are right) is read back and let
    be; a byte flipped in a later upload is still found and sent again, not recorded."""
    ws = moto_workspace
    ws.settings["syncd"]["retry_min_delay"] = 0.2
    first, later = os.urandom(4096), os.urandom(4096)
    ws.result("exec_5_abcdef05", {"a.bin": first})
    ws.result("exec_6_abcdef06", {"b.bin": later})
    with Proxy(ws.server.port, lie_etags=1) as proxy:
        ws.settings["object_storage"]["endpoint_url"] = proxy.endpoint
        ws.settings["object_storage"]["use_rust_client"] = rust
        daemon = ws.daemon()
        ws.mark("exec_5_abcdef05")
        wait_until(lambda: ws.recorded("exec_5_abcdef05"), what="the first result recorded")
        proxy.flip_puts = 1
        ws.mark("exec_6_abcdef06")
        wait_until(lambda: ws.recorded("exec_6_abcdef06"), what="the second result recorded")
        assert daemon.terminate() == 0

    assert ws.objects() == {
        "outputs/exec_5_abcdef05/a.bin": first,
        "outputs/exec_6_abcdef06/b.bin": later,
    }
    log = daemon.log()
    assert (
        "exec_6_abcdef06: upload of outputs/exec_6_abcdef06/b.bin failed: the store holds other "
        "bytes than were sent" in log
    ), log
    assert "not MD5s" not in log


@pytest.mark.parametrize("size", [1000, 20 * MiB], ids=["one-put", "multipart"])
@pytest.mark.parametrize("rust", [True, False], ids=["obstore", "s3fs"])
def test_a_file_cut_short_while_it_is_read_is_never_stored(moto_workspace, rust, size):
    """A file holds fewer bytes than were listed (truncated between listing and reading): the
    client stops with the tree's `changed` error, and no object is left under its key."""
    import asyncio

    from syncd.config import ObjectStorage
    from syncd.errors import SyncdError
    from syncd.objects import headers_for
    from syncd.storage import Body, open_store

    ws = moto_workspace
    path = ws.root / "short.bin"
    path.write_bytes(os.urandom(size - 1))
    storage = ObjectStorage(**{**ws.settings["object_storage"], "use_rust_client": rust})

    async def put() -> None:
        store = open_store(storage, None)
        try:
            body = Body(path, size, lambda: SyncdError("files changed while they were uploaded"))
            await store.put(body, "outputs/short.bin", headers_for("short.bin"))
        finally:
            await store.close()

    with pytest.raises(SyncdError, match="files changed while they were uploaded"):
        asyncio.run(put())
    assert ws.objects() == {}
