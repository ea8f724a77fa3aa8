"""A restart in the middle of a big file resumes its multipart upload: the parts the store holds
and that match the local bytes are not sent again; what nobody resumes is aborted. The smaller
files here go with s3fs, whose multipart uploads all resume; obstore's resume from 33 parts."""

from __future__ import annotations

import hashlib
import os
import re
import signal
from collections.abc import Callable

import pytest
from botocore.exceptions import ClientError

from tests.conftest import DaemonProcess, Workspace, status_of
from tests.proxy import Proxy
from tests.servers import wait_until

MiB = 1024 * 1024


def write_random(path: os.PathLike[str], size: int) -> str:
    """A file of `size` random bytes; returns its MD5."""
    digest = hashlib.md5()
    with open(path, "wb") as f:
        for _ in range(size // (64 * MiB)):
            piece = os.urandom(64 * MiB)
            digest.update(piece)
            f.write(piece)
        piece = os.urandom(size % (64 * MiB))
        digest.update(piece)
        f.write(piece)
    return digest.hexdigest()


def stored_md5(ws: Workspace, key: str) -> str:
    body = ws.server.client().get_object(Bucket=ws.bucket, Key=key)["Body"]
    digest = hashlib.md5()
    for piece in body.iter_chunks(8 * MiB):
        digest.update(piece)
    return digest.hexdigest()


def unfinished(ws: Workspace) -> list[str]:
    """Keys with a multipart upload the store still holds. rclone cannot list them (it
    answers NoSuchUpload): there the daemon's log says what it aborted."""
    try:
        answer = ws.server.client().list_multipart_uploads(Bucket=ws.bucket)
    except ClientError as exc:
        assert ws.server.name == "rclone", exc
        return []
    return [upload["Key"] for upload in answer.get("Uploads", [])]


def kept_bytes(log: str) -> int:
    found = re.findall(r"resumed its multipart upload: (\d+) of \d+ bytes were stored", log)
    assert len(found) == 1, log
    return int(found[0])


def interrupted(
    ws: Workspace, rel: str, rate: int, kill_at: int, meanwhile: Callable[[], object] = list
) -> tuple[DaemonProcess, int, int]:
    """Publish `rel` through a link of `rate` bytes/s; SIGKILL the daemon once `kill_at` bytes
    went, do `meanwhile`, start it again and wait for the result recorded. Returns the second
    daemon and the bytes sent before and after the kill."""
    ws.mark(rel)
    with Proxy(ws.server.port, rate=rate) as proxy:
        ws.settings["object_storage"]["endpoint_url"] = proxy.endpoint
        daemon = ws.daemon()
        wait_until(lambda: proxy.sent >= kill_at, timeout=300, what=f"{kill_at} bytes sent")
        os.killpg(daemon.process.pid, signal.SIGKILL)
        daemon.process.wait()
        before = proxy.sent
        meanwhile()
        again = ws.daemon()
        wait_until(lambda: ws.recorded(rel), timeout=300, what=f"{rel} recorded")
        assert again.terminate() == 0
    return again, before, proxy.sent - before


@pytest.mark.slow
def test_sigkill_at_60_percent_of_a_2_gib_file_sends_only_the_rest_on_restart(workspace):
    """With obstore, the default: a file of 256 parts goes as the s3fs adapter's multipart."""
    ws = workspace
    size = 2048 * MiB
    tree = ws.result("exec_1_abcdef01", {"forecast.json": b"{}"})
    md5 = write_random(tree / "forecast.nc", size)
    # A slow link, shared.
    again, sent_before, resent = interrupted(ws, "exec_1_abcdef01", 150_000_000, size * 6 // 10)
    # The rest of the file, and at most the parts that were in flight when it was killed.
    assert resent < size - sent_before + 4 * 8 * MiB, (resent, sent_before)
    assert kept_bytes(again.log()) >= sent_before - 4 * 8 * MiB
    entry = {f["path"]: f for f in ws.metadata("exec_1_abcdef01")["output_files"]}
    assert entry["exec_1_abcdef01/forecast.nc"]["md5"] == md5
    assert entry["exec_1_abcdef01/forecast.nc"]["size"] == size
    assert stored_md5(ws, "outputs/exec_1_abcdef01/forecast.nc") == md5
    assert unfinished(ws) == []


def test_a_file_whose_stored_parts_differ_from_it_is_uploaded_afresh(workspace):
    """The file changed after the kill: the parts the store holds are not the file's any more
    (and rclone cannot replace a part it has streamed to its backend)."""
    ws = workspace
    size = 96 * MiB
    ws.settings["object_storage"]["use_rust_client"] = False
    tree = ws.result("exec_2_abcdef02", {})
    write_random(tree / "forecast.nc", size)

    def flip_a_byte_of_the_first_part() -> None:  # stored already
        with open(tree / "forecast.nc", "r+b") as f:
            f.seek(1000)
            byte = f.read(1)
            f.seek(1000)
            f.write(bytes([byte[0] ^ 0xFF]))

    again, _, _ = interrupted(
        ws, "exec_2_abcdef02", 20_000_000, size // 2, flip_a_byte_of_the_first_part
    )
    local = hashlib.md5((tree / "forecast.nc").read_bytes()).hexdigest()
    assert stored_md5(ws, "outputs/exec_2_abcdef02/forecast.nc") == local
    assert ws.metadata("exec_2_abcdef02")["output_files"][0]["md5"] == local
    assert (
        "outputs/exec_2_abcdef02/forecast.nc: the store holds parts of an earlier upload that "
        "differ from the file; uploading it afresh" in again.log()
    )
    assert "resumed" not in again.log()
    assert unfinished(ws) == []


def test_an_upload_of_a_file_gone_from_the_tree_is_aborted_not_resumed(workspace):
    ws = workspace
    ws.settings["object_storage"]["use_rust_client"] = False
    tree = ws.result("exec_3_abcdef03", {"small.bin": b"s"})
    write_random(tree / "forecast.nc", 64 * MiB)
    # The workflow rewrote its result without the file meanwhile.
    again, _, _ = interrupted(
        ws, "exec_3_abcdef03", 10_000_000, 20 * MiB, (tree / "forecast.nc").unlink
    )
    assert "exec_3_abcdef03: aborted 1 unfinished multipart uploads" in again.log()
    assert "resumed" not in again.log()
    assert unfinished(ws) == []
    assert set(ws.objects()) == {"outputs/exec_3_abcdef03/small.bin"}


@pytest.mark.parametrize("change", ["part size", "aborted by a lifecycle rule"])
def test_an_upload_that_cannot_resume_is_sent_afresh(moto_workspace, change):
    ws = moto_workspace
    ws.settings["object_storage"]["use_rust_client"] = False
    tree = ws.result("exec_4_abcdef04", {})
    md5 = write_random(tree / "forecast.nc", 64 * MiB)

    def change_it() -> None:
        if change == "part size":
            ws.settings["object_storage"]["multipart_chunksize"] = 16 * MiB
            return
        s3 = ws.server.client()
        for upload in s3.list_multipart_uploads(Bucket=ws.bucket)["Uploads"]:
            s3.abort_multipart_upload(
                Bucket=ws.bucket, Key=upload["Key"], UploadId=upload["UploadId"]
            )

    again, _, _ = interrupted(ws, "exec_4_abcdef04", 10_000_000, 20 * MiB, change_it)
    assert "resumed" not in again.log()
    assert stored_md5(ws, "outputs/exec_4_abcdef04/forecast.nc") == md5
    assert unfinished(ws) == []


@pytest.mark.parametrize("ended_by", ["SIGTERM", "the store gone"])
def test_an_unfinished_syncd_sync_of_an_unmarked_result_is_left_to_syncd_sync(
    moto_workspace, ended_by
):
    """Nobody marked it, so no daemon takes it up: one running beside it says nothing of a
    marker removed and leaves the multipart upload that `syncd sync` run again resumes."""
    ws = moto_workspace
    ws.settings["object_storage"]["use_rust_client"] = False
    tree = ws.result("exec_1_abcdef01", {})
    md5 = write_random(tree / "forecast.nc", 64 * MiB)
    with Proxy(ws.server.port, rate=10_000_000) as slow:
        ws.settings["object_storage"]["endpoint_url"] = slow.endpoint
        sync = ws.sync_in_background("exec_1_abcdef01")
        wait_until(lambda: slow.sent >= 20 * MiB, timeout=120, what="parts of it sent")
        if ended_by == "SIGTERM":
            sync.send_signal(signal.SIGTERM)
    code = sync.wait(120)  # with the proxy gone, the store is too
    ws.settings["object_storage"]["endpoint_url"] = ws.server.endpoint
    ws.result("exec_2_abcdef02", {"a": b"a"})
    ws.mark("exec_2_abcdef02")
    daemon = ws.daemon()
    wait_until(lambda: ws.recorded("exec_2_abcdef02"), what="the daemon's first scan done")
    assert daemon.terminate() == 0

    assert code == (128 + signal.SIGTERM if ended_by == "SIGTERM" else 1)
    assert "exec_1_abcdef01" not in daemon.log()
    assert unfinished(ws) == ["outputs/exec_1_abcdef01/forecast.nc"]
    record = status_of(ws)["exec_1_abcdef01"]
    assert record["state"] == "forgotten"
    if ended_by == "SIGTERM":
        assert record["last_error"] == "syncd sync interrupted, no marker"
    else:  # and why it failed
        assert record["last_error"].startswith("syncd sync failed, no marker: upload of ")
    again = ws.sync("exec_1_abcdef01")
    assert again.returncode == 0, again.stderr
    assert kept_bytes(again.stderr) >= 10 * MiB
    assert stored_md5(ws, "outputs/exec_1_abcdef01/forecast.nc") == md5
    assert unfinished(ws) == []
