"""What readers of the metadata see: URLs renewed before they expire, syncd sign, results
removed locally but still served, and progress for a person running syncd sync."""

from __future__ import annotations

import json
import os
import pty
import subprocess
import time

import pytest
import requests

from syncd.policy import expiry
from tests.cloudfront import file_url, verify
from tests.conftest import KEY_PAIR_ID, SYNCD, md5
from tests.servers import wait_until


def test_the_running_daemon_renews_a_url_close_to_expiry(moto_workspace, signing_key):
    ws = moto_workspace
    ws.settings["object_storage"]["signed_url_expires_in"] = 4
    ws.settings["syncd"]["resign_fraction"] = 0.5  # renew with 2 s left
    with ws.cloudfront(signing_key[1]) as cloudfront:
        ws.result("exec_1_abcdef01", {"a.txt": b"a"})
        ws.mark("exec_1_abcdef01")
        daemon = ws.daemon()
        wait_until(lambda: ws.recorded("exec_1_abcdef01"))
        first = ws.metadata("exec_1_abcdef01")["signed_url"]
        first_expiry = expiry(first)
        assert first_expiry is not None

        renewed = ws.renewed_url("exec_1_abcdef01", first_expiry, timeout=10)
        old = requests.get(file_url(first, "a.txt"), timeout=10)
        new = requests.get(file_url(renewed, "a.txt"), timeout=10)
        assert daemon.terminate() == 0

    assert old.status_code == 403
    assert new.status_code == 200
    assert new.content == b"a"
    assert cloudfront.refusals == ["expired"]
    assert "exec_1_abcdef01: signed URL renewed until" in daemon.log()
    meta = ws.metadata("exec_1_abcdef01")
    assert meta["storage_type"] == "s3"
    assert meta["output_files"] == [{"path": "exec_1_abcdef01/a.txt", "size": 1, "md5": md5(b"a")}]


@pytest.mark.parametrize("written", [12345, "another result's URL"])
def test_a_signed_url_written_over_is_signed_anew(moto_workspace, signing_key, written):
    """syncd owns the record it made: a signed_url someone wrote over (not a string, or a URL
    for another result) is signed anew for this result on the next look, quietly."""
    ws = moto_workspace
    ws.settings["syncd"]["rescan_interval"] = 1  # URLs are looked at once a rescan at most
    with ws.cloudfront(signing_key[1]) as cloudfront:
        for name in ("exec_1_abcdef01", "exec_2_abcdef02"):
            ws.result(name, {"a.txt": name.encode()})
            ws.mark(name)
        daemon = ws.daemon()
        wait_until(lambda: ws.recorded("exec_1_abcdef01") and ws.recorded("exec_2_abcdef02"))
        meta = ws.metadata("exec_1_abcdef01")
        other = ws.metadata("exec_2_abcdef02")["signed_url"]
        meta["signed_url"] = other if isinstance(written, str) else written
        ws.metadata_path("exec_1_abcdef01").write_text(json.dumps(meta))

        def signed_anew() -> str | None:
            url = ws.metadata("exec_1_abcdef01")["signed_url"]
            return url if isinstance(url, str) and url != other else None

        url = wait_until(signed_anew, timeout=30, what="the URL signed anew")
        served = requests.get(file_url(url, "a.txt"), timeout=10)
        assert daemon.terminate() == 0

    assert served.status_code == 200 and served.content == b"exec_1_abcdef01"
    assert cloudfront.refusals == []
    assert "cannot renew" not in daemon.log() and "unexpected error" not in daemon.log()


def test_sign_prints_a_fresh_url_for_a_folder_or_a_remote_path(moto_workspace, signing_key):
    ws = moto_workspace
    ws.result("wf/exec_2_abcdef02", {"a.txt": b"a"})
    keys = {KEY_PAIR_ID: signing_key[1].public_key()}

    by_folder = ws.syncd(
        "sign", "--config", str(ws.config), str(ws.outputs / "wf" / "exec_2_abcdef02")
    )
    by_path = ws.syncd(
        "sign", "--config", str(ws.config), "outputs/wf/exec_2_abcdef02", "--expires-in", "60"
    )

    assert by_folder.returncode == 0, by_folder.stderr
    assert by_path.returncode == 0, by_path.stderr
    now = time.time()
    for done, lifetime in ((by_folder, 3600), (by_path, 60)):
        url = done.stdout.strip()
        policy = verify(file_url(url, "a.txt"), keys)
        statement = policy["Statement"][0]
        assert statement["Resource"] == (
            "https://d111111abcdef8.cloudfront.net/outputs/wf/exec_2_abcdef02/*"
        )
        assert abs(statement["Condition"]["DateLessThan"]["AWS:EpochTime"] - now - lifetime) < 5


def test_sign_refuses_a_bad_lifetime_and_a_missing_cloudfront(moto_workspace):
    ws = moto_workspace
    for lifetime in ("0", "315360001"):
        bad = ws.syncd("sign", "--config", str(ws.config), "outputs/x", "--expires-in", lifetime)
        assert bad.returncode == 2
        assert (
            "--expires-in: must be a whole number of seconds from 1 to 315360000 (10 years), "
            f"got '{lifetime}'" in bad.stderr
        )
    for key in ("cloudfront_domain", "cloudfront_key_pair_id", "cloudfront_private_key_path"):
        del ws.settings["object_storage"][key]
    unsigned = ws.syncd("sign", "--config", str(ws.config), "outputs/x")
    assert unsigned.returncode == 2
    assert unsigned.stderr.startswith("syncd: error: CloudFront is not configured")


def test_delete_local_after_upload_keeps_the_metadata_and_the_url_serves(
    moto_workspace, signing_key
):
    ws = moto_workspace
    ws.settings["syncd"]["delete_local_after_upload"] = True
    with ws.cloudfront(signing_key[1]):
        tree = ws.result("exec_3_abcdef03", {"results.zarr/.zgroup": b'{"zarr_format": 2}'})
        ws.mark("exec_3_abcdef03")
        daemon = ws.daemon()
        wait_until(lambda: ws.recorded("exec_3_abcdef03") and not tree.exists())
        response = requests.get(
            file_url(ws.metadata("exec_3_abcdef03")["signed_url"], "results.zarr/.zgroup"),
            timeout=10,
        )
        assert daemon.terminate() == 0

    assert response.content == b'{"zarr_format": 2}'
    assert sorted(p.name for p in ws.outputs.iterdir()) == [
        "exec_3_abcdef03.done",
        "exec_3_abcdef03.json",
    ]
    assert ws.metadata("exec_3_abcdef03")["output_files"] == [
        {
            "path": "exec_3_abcdef03/results.zarr/.zgroup",
            "size": 18,
            "md5": md5(b'{"zarr_format": 2}'),
        }
    ]


def test_sync_shows_plain_progress_lines_when_not_on_a_terminal(moto_workspace):
    ws = moto_workspace
    ws.result("exec_4_abcdef04", {f"c/{i}": os.urandom(1000) for i in range(20)})

    done = ws.sync("exec_4_abcdef04")

    assert done.returncode == 0, done.stderr
    lines = [line for line in done.stderr.splitlines() if line.startswith("exec_4_abcdef04: ")]
    assert lines[-1].startswith("exec_4_abcdef04: 100% (20/20 files, 0.0/0.0 MB")
    assert 2 <= len(lines) <= 11
    assert "\r" not in done.stderr


def test_sync_draws_a_bar_on_a_terminal(moto_workspace):
    ws = moto_workspace
    ws.result("exec_5_abcdef05", {f"c/{i}": os.urandom(1000) for i in range(20)})
    leader, follower = pty.openpty()
    try:
        process = subprocess.Popen(
            [*SYNCD, "sync", "--config", str(ws.config), str(ws.outputs / "exec_5_abcdef05")],
            env=ws.env(),
            stdout=subprocess.DEVNULL,
            stderr=follower,
        )
        os.close(follower)
        output = b""
        while True:
            try:
                chunk = os.read(leader, 4096)
            except OSError:  # the terminal closed: syncd exited
                break
            if not chunk:
                break
            output += chunk
        assert process.wait(60) == 0
    finally:
        os.close(leader)
    text = output.decode()
    assert "\rexec_5_abcdef05 [" + "#" * 30 + "] 100% 20/20 files" in text
