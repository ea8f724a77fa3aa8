"""Faults against real servers: nothing marked is lost, nothing half-written is left.

Each test drives the real daemon: retries and their state, kill -9 mid-upload, SIGTERM with
uploads in flight, two daemons on one outputs dir, files changing during an upload.
"""

from __future__ import annotations

import collections
import itertools
import json
import math
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.conftest import status_of
from tests.proxy import Proxy
from tests.pushback import PushBack
from tests.readme import as_quoted, log_example
from tests.servers import S3Server, free_port, wait_until

MiB = 1024 * 1024
BIG = 160 * MiB  # long enough on loopback to act while it is in flight


def big_result(ws, rel: str) -> bytes:
    data = os.urandom(MiB) * (BIG // MiB)
    ws.result(rel, {"results.zarr/t2m/0.0.0": data, "results.zarr/.zgroup": b"{}"})
    return data


def multipart_in_flight(ws) -> bool:
    return bool(ws.server.client().list_multipart_uploads(Bucket=ws.bucket).get("Uploads"))


def parts_stored(ws) -> int:
    """Parts the store holds of the multipart upload in flight."""
    s3 = ws.server.client()
    uploads = s3.list_multipart_uploads(Bucket=ws.bucket).get("Uploads", [])
    if not uploads:
        return 0
    upload = {"Key": uploads[0]["Key"], "UploadId": uploads[0]["UploadId"]}
    return len(s3.list_parts(Bucket=ws.bucket, **upload).get("Parts", []))


def seconds(line: str) -> float:
    """The time of a log line."""
    stamp = time.strptime(line[:19], "%Y-%m-%d %H:%M:%S")
    return time.mktime(stamp) + float(line[19:23])


def status(ws) -> dict[str, dict]:
    done = ws.syncd("status", "--config", str(ws.config), "--json")
    assert done.returncode == 0, done.stderr
    return {r["rel"]: r for r in json.loads(done.stdout)}


def test_permanent_failure_is_logged_once_with_its_remedy_and_shown_by_status(moto_workspace):
    ws = moto_workspace
    ws.settings["object_storage"]["bucket"] = "no-such-bucket-syncd"
    ws.settings["syncd"]["retry_permanent_delay"] = 0.2
    ws.result("exec_1_abcdef01", {"a": b"a"})
    ws.mark("exec_1_abcdef01")
    daemon = ws.daemon()

    wait_until(lambda: status(ws).get("exec_1_abcdef01", {}).get("attempts", 0) >= 3)
    assert daemon.terminate() == 0

    errors = [line for line in daemon.log().splitlines() if " ERROR " in line]
    assert len(errors) == 1, errors
    assert "NoSuchBucket" in errors[0]
    assert "check that object_storage.bucket and region are correct" in errors[0]
    record = status(ws)["exec_1_abcdef01"]  # read after the daemon stopped: it persisted
    assert record["state"] == "retrying"
    assert record["permanent"] is True
    assert "NoSuchBucket" in record["last_error"]
    assert record["next_try"] > 0


def test_transient_failures_retry_within_seconds_and_status_shows_done(moto_workspace, tmp_path):
    ws = moto_workspace
    server = S3Server("moto", tmp_path / "late-moto")  # not running: connection refused
    ws.settings["object_storage"]["endpoint_url"] = server.endpoint
    ws.settings["object_storage"]["bucket"] = "late-bucket"
    ws.result("exec_2_abcdef02", {"b": b"bb"})
    ws.result("exec_3_abcdef03", {"c": b"c"})  # marked later, never failed
    ws.mark("exec_2_abcdef02")
    daemon = ws.daemon()
    daemon.wait_log("(attempt 2; retrying in")
    table = ws.syncd("status", "--config", str(ws.config)).stdout
    assert "exec_2_abcdef02  retrying" in table

    server.start()
    try:
        server.client().create_bucket(Bucket="late-bucket")
        wait_until(lambda: ws.recorded("exec_2_abcdef02"), what="recorded after retries")
        ws.mark("exec_3_abcdef03")
        wait_until(lambda: ws.recorded("exec_3_abcdef03"))
        assert daemon.terminate() == 0
    finally:
        server.stop()
    lines = daemon.log().splitlines()
    failed = next(i for i, line in enumerate(lines) if "(attempt 1;" in line)
    retried = next(line for line in lines[failed:] if "exec_2_abcdef02: uploading" in line)
    assert seconds(retried) - seconds(lines[failed]) <= 2.5  # the first retry within seconds
    records = status(ws)
    assert records["exec_2_abcdef02"]["state"] == "done"
    assert records["exec_2_abcdef02"]["files"] == 1
    assert records["exec_3_abcdef03"]["attempts"] == 0


def test_a_full_state_dir_backs_off_like_any_failure_and_is_said_once_a_retry(
    moto_workspace, tmpfs
):
    """The journal cannot keep a failure: its backoff still grows, one line per retry."""
    ws = moto_workspace
    state = tmpfs.mount(ws.root / "full-state", size="1m")
    ws.settings["syncd"]["state_dir"] = str(state)
    ws.result("exec_2_abcdef02", {"b": b"bb"})
    daemon = ws.daemon()
    daemon.wait_log("syncd watching")
    filler = tmpfs.fill(state)
    ws.mark("exec_2_abcdef02")

    daemon.wait_log("(attempt 3; retrying in", timeout=30)
    filler.unlink()
    wait_until(lambda: ws.recorded("exec_2_abcdef02"), timeout=60, what="recorded once freed")
    assert daemon.terminate() == 0
    full = [line for line in daemon.log().splitlines() if "database or disk is full" in line]
    assert full and len(full) == len([line for line in full if "(attempt " in line])


def test_a_small_state_dir_holds_the_journal_of_many_results(moto_workspace, tmpfs):
    """The state's write-ahead log stays small: SQLite's own bound (4 MB) would fill a 1 MiB
    state_dir after some dozens of results."""
    ws = moto_workspace
    state = tmpfs.mount(ws.root / "small-state", size="1m")
    ws.settings["syncd"]["state_dir"] = str(state)
    rels = [f"exec_{i}_abcdef{i:02x}" for i in range(10, 90)]
    for rel in rels:
        ws.result(rel, {"a": b"a"})
        ws.mark(rel)

    daemon = ws.daemon()
    wait_until(lambda: all(ws.recorded(rel) for rel in rels), timeout=120, what="all recorded")
    assert daemon.terminate() == 0

    assert "full" not in daemon.log()


def test_status_shows_pending_results_before_any_daemon_ran(moto_workspace):
    ws = moto_workspace
    ws.result("exec_4_abcdef04", {"a": b"a"})
    ws.mark("exec_4_abcdef04")
    done = ws.syncd("status", "--config", str(ws.config))
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[1].split() == ["exec_4_abcdef04", "pending", "0", "-", "-", "-"]
    assert done.stdout.splitlines()[-1] == "1 results: 1 pending"
    state = ws.root / "state" / "state.db"  # the workspace's state_dir: no daemon kept it yet
    assert done.stderr.endswith(
        f"WARNING no state file {state} yet: results are shown as the disk alone says (failures "
        "and retries are not); if the daemon runs, this is not its state_dir: run syncd status "
        "with its settings (sudo /opt/syncd/systemd/syncd-as-unit status)\n"
    ), done.stderr


@pytest.mark.parametrize("rust", [True, False], ids=["obstore", "s3fs"])
def test_kill_9_mid_upload_then_restart_loses_nothing_and_leaves_no_parts(moto_workspace, rust):
    ws = moto_workspace
    ws.settings["object_storage"]["use_rust_client"] = rust
    data = big_result(ws, "exec_5_abcdef05")
    before = ws.metadata_path("exec_5_abcdef05").read_bytes()
    ws.mark("exec_5_abcdef05")
    daemon = ws.daemon()
    wait_until(lambda: parts_stored(ws), what="parts of a multipart upload stored")
    assert status_of(ws)["exec_5_abcdef05"]["state"] == "uploading"

    os.killpg(daemon.process.pid, signal.SIGKILL)
    daemon.process.wait()
    assert ws.metadata_path("exec_5_abcdef05").read_bytes() == before  # old file, whole
    assert status_of(ws)["exec_5_abcdef05"]["state"] == "pending"  # nobody uploads it now

    again = ws.daemon()
    wait_until(lambda: ws.recorded("exec_5_abcdef05"), timeout=120, what="recorded after restart")
    assert again.terminate() == 0
    assert ws.objects()["outputs/exec_5_abcdef05/results.zarr/t2m/0.0.0"] == data
    assert not multipart_in_flight(ws)
    if rust:  # 20 parts: obstore's own multipart, which cannot resume
        assert "aborted 1 unfinished multipart uploads" in again.log()
    else:
        assert "results.zarr/t2m/0.0.0: resumed its multipart upload" in again.log()


def test_a_result_removed_while_syncd_was_down_is_forgotten_and_its_parts_aborted(
    moto_workspace,
):
    ws = moto_workspace
    big_result(ws, "exec_6_abcdef06")
    ws.mark("exec_6_abcdef06")
    daemon = ws.daemon()
    wait_until(lambda: parts_stored(ws), what="parts of a multipart upload stored")
    os.killpg(daemon.process.pid, signal.SIGKILL)
    daemon.process.wait()

    shutil.rmtree(ws.outputs / "exec_6_abcdef06")  # its writer took it back meanwhile
    (ws.outputs / "exec_6_abcdef06.done").unlink()
    ws.metadata_path("exec_6_abcdef06").unlink()
    again = ws.daemon()
    again.wait_log("exec_6_abcdef06: its marker was removed; forgotten")
    wait_until(lambda: not multipart_in_flight(ws), what="its parts aborted")

    assert again.terminate() == 0
    assert status(ws)["exec_6_abcdef06"]["state"] == "forgotten"


def test_sigterm_lets_the_upload_in_flight_finish(moto_workspace):
    ws = moto_workspace
    data = big_result(ws, "exec_6_abcdef06")
    ws.mark("exec_6_abcdef06")
    daemon = ws.daemon()
    wait_until(lambda: multipart_in_flight(ws), what="a multipart upload in flight")

    daemon.process.send_signal(signal.SIGTERM)

    assert daemon.process.wait(60) == 0
    assert ws.recorded("exec_6_abcdef06")
    assert ws.objects()["outputs/exec_6_abcdef06/results.zarr/t2m/0.0.0"] == data
    assert "waiting up to 30 s for 1 results being uploaded" in daemon.log()


def test_second_signal_stops_at_once_and_the_next_start_finishes(moto_workspace):
    ws = moto_workspace
    ws.settings["syncd"]["stop_grace"] = 50
    big_result(ws, "exec_7_abcdef07")
    ws.mark("exec_7_abcdef07")
    daemon = ws.daemon()
    wait_until(lambda: multipart_in_flight(ws), what="a multipart upload in flight")

    started = time.monotonic()
    daemon.process.send_signal(signal.SIGTERM)
    daemon.wait_log("waiting up to 50 s")
    daemon.process.send_signal(signal.SIGINT)
    code = daemon.process.wait(30)

    assert code == 0
    assert time.monotonic() - started < 20
    assert not ws.recorded("exec_7_abcdef07")
    assert "syncd stopped; 1 results left for the next start" in daemon.log()
    assert status(ws)["exec_7_abcdef07"]["state"] == "pending"  # nobody uploads it now
    again = ws.daemon()
    wait_until(lambda: ws.recorded("exec_7_abcdef07"), timeout=120)
    assert again.terminate() == 0
    assert not multipart_in_flight(ws)


def test_two_daemons_on_one_outputs_dir_publish_each_result_once(moto_workspace):
    ws = moto_workspace
    ws.settings["syncd"]["rescan_interval"] = 0.5
    rels = [f"wf{i % 3}/exec_{i}_abcdef{i:02d}" for i in range(20)]
    for rel in rels:
        ws.result(rel, {"x.bin": os.urandom(2000), "y.bin": rel.encode()})
    first = ws.daemon()
    ws.settings["syncd"]["state_dir"] = str(ws.root / "state-2")
    second = ws.daemon()
    first.wait_log("syncd watching")
    second.wait_log("syncd watching")

    for rel in rels:
        ws.mark(rel)

    wait_until(lambda: all(ws.recorded(rel) for rel in rels), timeout=120)
    assert first.terminate() == 0
    assert second.terminate() == 0
    uploads = [
        line.split(": uploaded")[0].split()[-1]
        for log in (first.log(), second.log())
        for line in log.splitlines()
        if ": uploaded " in line
    ]
    assert sorted(uploads) == sorted(rel.split("/")[1] for rel in rels)  # each exactly once
    assert len(ws.objects()) == 40
    leftovers = [p.name for p in ws.outputs.rglob(".syncd-claims/*")]
    assert leftovers == []


def test_two_daemons_with_other_prefixes_never_take_turns_at_one_metadata_file(moto_workspace):
    """A bucket migration: two daemons with different prefixes on one outputs dir. Whichever
    records a result first owns its metadata; the other says so once and leaves it alone, also
    when the server writes its own view again."""
    ws = moto_workspace
    ws.settings["syncd"]["rescan_interval"] = 0.5
    rel = "wf/exec_1_abcdef01"
    ws.result(rel, {"a": b"a"})
    daemons = {}
    for prefix in ("old", "new"):
        ws.settings["object_storage"]["prefix"] = prefix
        ws.settings["syncd"]["state_dir"] = str(ws.root / f"state-{prefix}")
        daemons[prefix] = ws.daemon()
        daemons[prefix].wait_log("syncd watching")
    path = ws.metadata_path(rel)

    def settled() -> tuple[int, int]:
        """The record's file once it holds one, then a few rescans of both daemons later."""
        wait_until(lambda: ws.recorded(rel), what="recorded")
        before = (path.stat().st_ino, path.stat().st_mtime_ns)
        time.sleep(2)  # four rescans each: nothing may be written meanwhile
        assert (path.stat().st_ino, path.stat().st_mtime_ns) == before
        return before

    ws.mark(rel)
    settled()
    winner = ws.metadata(rel)["remote_path"].split("/")[0]
    loser = "new" if winner == "old" else "old"
    path.write_text(json.dumps({"request_id": rel, "status": "completed", "storage_type": "x"}))
    settled()

    assert all(daemon.terminate() == 0 for daemon in daemons.values())
    assert ws.metadata(rel)["remote_path"] == f"{winner}/{rel}"
    assert set(ws.objects()) == {f"{winner}/{rel}/a"}
    said = [line for line in daemons[loser].log().splitlines() if "left as it is" in line]
    assert len(said) == 1, said
    assert said[0].endswith(
        f"exec_1_abcdef01: its metadata {path} records {winner}/{rel}, not {loser}/{rel} "
        "(another syncd's prefix, the server's own upload, or another result's file); "
        f"left as it is: `syncd sync {ws.outputs / rel}` publishes it to {loser}/{rel}"
    )
    ws.settings["object_storage"]["prefix"] = loser
    ws.settings["syncd"]["state_dir"] = str(ws.root / f"state-{loser}")
    assert status(ws)[rel]["state"] == "elsewhere"


def test_a_dead_daemons_claim_is_taken_over(moto_workspace):
    ws = moto_workspace
    ws.settings["syncd"]["claim_timeout"] = 10
    ws.result("exec_8_abcdef08", {"a": b"a"})
    claim = ws.outputs / ".syncd-claims" / "exec_8_abcdef08.1"
    claim.parent.mkdir()
    claim.write_text('{"owner": "deadhost:4242:0badc0de"}')
    stale = time.time() - 3600
    os.utime(claim, (stale, stale))
    ws.mark("exec_8_abcdef08")

    daemon = ws.daemon()

    wait_until(lambda: ws.recorded("exec_8_abcdef08"))
    assert daemon.terminate() == 0
    assert not claim.parent.exists()  # released, and the empty folder removed


def test_a_live_claim_is_respected_by_sync(moto_workspace):
    ws = moto_workspace
    ws.result("exec_9_abcdef09", {"a": b"a"})
    claim = ws.outputs / ".syncd-claims" / "exec_9_abcdef09.1"
    claim.parent.mkdir()
    claim.write_text('{"owner": "otherhost:7:cafe0001"}')

    done = ws.sync("exec_9_abcdef09")

    assert done.returncode == 1
    assert (
        "exec_9_abcdef09: being published by otherhost:7:cafe0001 right now; try again when "
        "it is done" in done.stderr
    )
    assert ws.objects() == {}


def test_a_file_that_changes_during_the_upload_is_uploaded_again(moto_workspace):
    ws = moto_workspace
    ws.settings["syncd"]["retry_min_delay"] = 0.2
    big_result(ws, "exec_10_abcdef10")
    small = ws.outputs / "exec_10_abcdef10" / "results.zarr" / ".zgroup"
    ws.mark("exec_10_abcdef10")
    daemon = ws.daemon()
    wait_until(lambda: multipart_in_flight(ws), what="a multipart upload in flight")

    small.write_bytes(b'{"zarr_format": 2}')

    wait_until(lambda: ws.recorded("exec_10_abcdef10"), timeout=120)
    assert daemon.terminate() == 0
    assert "files changed while they were uploaded" in daemon.log()
    assert ws.objects()["outputs/exec_10_abcdef10/results.zarr/.zgroup"] == b'{"zarr_format": 2}'
    sizes = {f["path"]: f["size"] for f in ws.metadata("exec_10_abcdef10")["output_files"]}
    assert sizes["exec_10_abcdef10/results.zarr/.zgroup"] == len(b'{"zarr_format": 2}')


def test_an_empty_tree_is_recorded_with_no_files(moto_workspace):
    ws = moto_workspace
    ws.result("exec_11_abcdef11", {})
    ws.mark("exec_11_abcdef11")
    daemon = ws.daemon()
    wait_until(lambda: ws.recorded("exec_11_abcdef11"))
    assert daemon.terminate() == 0
    assert ws.metadata("exec_11_abcdef11")["output_files"] == []
    assert "exec_11_abcdef11: the result folder is empty" in daemon.log()


def test_unreadable_metadata_is_named_and_the_others_are_served(moto_workspace):
    ws = moto_workspace
    ws.result("exec_12_abcdef12", {"a": b"a"}, metadata=None)
    ws.metadata_path("exec_12_abcdef12").mkdir()  # exists, cannot be read as a file
    ws.result("exec_13_abcdef13", {"b": b"b"})
    for rel in ("exec_12_abcdef12", "exec_13_abcdef13"):
        ws.mark(rel)
    daemon = ws.daemon()
    wait_until(lambda: ws.recorded("exec_13_abcdef13"))
    log = daemon.wait_log(f"reading metadata {ws.metadata_path('exec_12_abcdef12')} failed")
    assert daemon.terminate() == 0
    assert "(Is a directory): it is a folder where a file belongs (retrying every 900 s)" in log
    assert ws.objects() == {"outputs/exec_13_abcdef13/b": b"b"}


def test_polling_mode_finds_markers(moto_workspace):
    ws = moto_workspace
    ws.settings["syncd"]["watch"] = "poll"
    ws.settings["syncd"]["poll_interval"] = 0.2
    daemon = ws.daemon()
    daemon.wait_log("(polling)")
    ws.result("nfs_workflow/exec_14_abcdef14", {"a": b"a"})
    ws.mark("nfs_workflow/exec_14_abcdef14")
    wait_until(lambda: ws.recorded("nfs_workflow/exec_14_abcdef14"))
    assert daemon.terminate() == 0


def test_inotify_overflow_is_answered_with_a_rescan(moto_workspace):
    ws = moto_workspace
    limit = Path("/proc/sys/fs/inotify/max_queued_events")
    if not os.access(limit, os.W_OK):
        pytest.skip("lowering the inotify queue needs root")
    original = limit.read_text()
    try:
        limit.write_text("8")  # only for inotify instances made from now on: the daemon's
        daemon = ws.daemon()
        daemon.wait_log("syncd watching")
    finally:
        limit.write_text(original)
    for i in range(2000):  # far more events than the queue holds, faster than it is read
        (ws.outputs / f"noise-{i}").write_text("")
    ws.result("exec_15_abcdef15", {"a": b"a"})
    ws.mark("exec_15_abcdef15")

    wait_until(lambda: ws.recorded("exec_15_abcdef15"))
    assert daemon.terminate() == 0
    quoted = log_example("the inotify event queue overflowed")
    assert quoted in as_quoted(daemon.log(), ws.outputs)  # as the README quotes it


def test_server_stopped_mid_upload_then_started_again(moto_workspace, tmp_path):
    ws = moto_workspace
    server = S3Server("rclone", tmp_path / "rclone").start()  # keeps its objects on disk
    try:
        ws.server = server
        ws.bucket = server.new_bucket()
        ws.settings["object_storage"]["endpoint_url"] = server.endpoint
        ws.settings["object_storage"]["bucket"] = ws.bucket
        ws.settings["syncd"]["retry_min_delay"] = 0.2
        data = big_result(ws, "exec_16_abcdef16")
        ws.mark("exec_16_abcdef16")
        daemon = ws.daemon()
        daemon.wait_log("exec_16_abcdef16: uploading")

        server.stop()
        daemon.wait_log("(attempt 1; retrying in")
        server.start()

        wait_until(lambda: ws.recorded("exec_16_abcdef16"), timeout=120)
        assert daemon.terminate() == 0
        assert ws.objects()["outputs/exec_16_abcdef16/results.zarr/t2m/0.0.0"] == data
    finally:
        server.stop()


def test_inotify_watch_limit_falls_back_to_polling(moto_workspace):
    ws = moto_workspace
    ws.settings["syncd"]["poll_interval"] = 0.2
    limit = Path("/proc/sys/fs/inotify/max_user_watches")
    if not os.access(limit, os.W_OK):
        pytest.skip("lowering the inotify watch limit needs root")
    original = limit.read_text()
    try:
        limit.write_text("0")  # no watch at all for new inotify instances
        daemon = ws.daemon()
        daemon.wait_log("syncd watching")
    finally:
        limit.write_text(original)
    ws.result("exec_17_abcdef17", {"a": b"a"})
    ws.mark("exec_17_abcdef17")

    wait_until(lambda: ws.recorded("exec_17_abcdef17"))
    assert daemon.terminate() == 0
    log = daemon.log()
    assert f"inotify cannot watch {ws.outputs} (" in log
    assert "polling every 0.2 s instead" in log
    assert "(polling)" in log


def test_wrong_credentials_are_a_permanent_error_with_the_remedy(rclone_workspace):
    ws = rclone_workspace
    ws.settings["object_storage"]["access_key_id"] = "AKIAWRONGKEY"
    ws.result("exec_18_abcdef18", {"a": b"a"})

    done = ws.sync("exec_18_abcdef18")

    assert done.returncode == 1
    errors = [line for line in done.stderr.splitlines() if " ERROR " in line]
    assert len(errors) == 1
    assert errors[0].endswith(
        "exec_18_abcdef18: upload of outputs/exec_18_abcdef18/a failed: InvalidAccessKeyId: "
        "The Access Key Id you provided does not exist in our records: check the credentials: "
        "access_key_id, secret_access_key, session_token, or the instance role"
    )
    assert "WARNING" not in done.stderr.replace("WARNING CloudFront", "")
    record = status(ws)["exec_18_abcdef18"]
    assert record["permanent"] is True
    assert record["last_error"].startswith("syncd sync failed, no marker: upload of ")


def synced_never_answered(
    ws, rel: str, **faults: bool
) -> tuple[subprocess.CompletedProcess, float]:
    """`syncd sync rel` through a proxy whose `faults` leave requests unanswered: what it did
    and the seconds it took."""
    with Proxy(ws.server.port, **faults) as proxy:
        ws.settings["object_storage"]["endpoint_url"] = proxy.endpoint
        started = time.monotonic()
        done = ws.sync(rel)
        took = time.monotonic() - started
        assert proxy.swallowed >= 1
    return done, took


@pytest.mark.parametrize("rust", [True, False], ids=["obstore", "s3fs"])
def test_a_store_that_takes_an_upload_and_never_answers_is_given_up_in_a_minute(
    moto_workspace, rust
):
    """Each PUT is taken, body and all, and never answered, not even with "100 Continue" (which
    botocore asks for): the README's bound for a request that carries a file's bytes, a minute
    plus those bytes at 16 kB/s, ends it, whichever client."""
    ws = moto_workspace
    ws.result("exec_5_abcdef05", {"a.bin": os.urandom(16384)})
    ws.settings["object_storage"]["use_rust_client"] = rust
    done, took = synced_never_answered(ws, "exec_5_abcdef05", swallow_puts=True)

    assert done.returncode == 1, done.stderr
    assert (
        "exec_5_abcdef05: upload of outputs/exec_5_abcdef05/a.bin failed: no answer within 61 s"
        in done.stderr
    )
    assert 61 <= took < 75
    assert ws.metadata("exec_5_abcdef05").get("storage_type") != "s3"


@pytest.mark.slow
def test_a_store_that_answers_no_request_is_said_to_within_its_timeouts(moto_workspace):
    """A retry first cleans up what the failed attempt left: that listing, unanswered, is
    given up after one try's timeouts too, not held through every retry of the client."""
    ws = moto_workspace
    ws.result("exec_5_abcdef05", {"a.bin": b"abc"})
    ws.settings["object_storage"]["endpoint_url"] = f"http://127.0.0.1:{free_port()}"
    assert ws.sync("exec_5_abcdef05").returncode == 1  # nobody listens: an attempt failed
    done, took = synced_never_answered(ws, "exec_5_abcdef05", hang=True)

    assert done.returncode == 1, done.stderr
    assert (
        "exec_5_abcdef05: listing multipart uploads under outputs/exec_5_abcdef05/ failed: no "
        "answer within 130 s: the store takes requests but does not answer them" in done.stderr
    )
    assert 130 <= took < 150
    assert ws.objects() == {}


@pytest.mark.parametrize("rust", [True, False], ids=["obstore", "s3fs"])
def test_a_store_that_pushes_back_gets_each_file_once_and_every_result_in_time(
    moto_workspace, rust
):
    """The store answers 503 SlowDown to writes above 40 a second, as S3 does to a prefix
    written too fast: syncd sends fewer at once, never sends a file the store acknowledged
    again, and records every result in about the time that rate allows."""
    ws = moto_workspace
    ws.settings["syncd"]["retry_min_delay"] = 0.5
    names = [f"exec_6_abcdef{i:02d}" for i in range(4)]
    for name in names:
        ws.result(name, {f"results.zarr/t2m/{i}.0": os.urandom(2048) for i in range(100)})
    with PushBack(ws.server.port, rate=40) as store:
        ws.settings["object_storage"]["endpoint_url"] = store.endpoint
        ws.settings["object_storage"]["use_rust_client"] = rust
        daemon = ws.daemon()
        started = time.monotonic()
        for name in names:
            ws.mark(name)
        wait_until(
            lambda: all(ws.recorded(n) for n in names), timeout=120, what="every result recorded"
        )
        took = time.monotonic() - started
        assert daemon.terminate() == 0
        refused, puts = store.refused, store.puts()

    assert refused > 0  # it did push back
    assert len(puts) == 400 and set(puts.values()) == {1}, puts.most_common(3)
    assert took < 400 / 40 * 3
    for name in names:
        assert len(ws.metadata(name)["output_files"]) == 100
    said = [
        int(line.split("at most ")[1].split()[0])
        for line in daemon.log().splitlines()
        if "pushes back" in line
    ]
    assert said and all(a > b for a, b in itertools.pairwise(said))  # each new low, once


@pytest.mark.parametrize("rust", [True, False], ids=["obstore", "s3fs"])
def test_a_store_that_refuses_every_write_gets_ever_fewer(moto_workspace, rust):
    """The store answers SlowDown to every write: once one file at a time is still refused, the
    next file waits a pause that doubles, so the writes a second fall (before: one file after
    another, 8-10 writes a second for minutes); once it takes writes again, all go through."""
    ws = moto_workspace
    ws.settings["syncd"]["retry_min_delay"] = 0.5
    ws.settings["syncd"]["retry_max_delay"] = 1
    files = {f"results.zarr/t2m/{i}.0": os.urandom(1024) for i in range(20)}
    ws.result("exec_8_abcdef08", files)
    with PushBack(ws.server.port, rate=0) as store:
        ws.settings["object_storage"]["endpoint_url"] = store.endpoint
        ws.settings["object_storage"]["use_rust_client"] = rust
        daemon = ws.daemon()
        ws.mark("exec_8_abcdef08")
        daemon.wait_log("at most 1 file in flight now", timeout=60)
        at_one = store.refused
        time.sleep(20)  # the measure: the writes refused in these 20 s at one file in flight
        refused = store.refused - at_one
        store.rate = math.inf
        wait_until(lambda: ws.recorded("exec_8_abcdef08"), timeout=120, what="the result recorded")
        assert daemon.terminate() == 0

    assert refused < 60, refused  # about 6 files of a client's 4 tries, not 160-200 writes
    assert ws.objects() == {f"outputs/exec_8_abcdef08/{k}": v for k, v in files.items()}


@pytest.mark.parametrize("rust", [True, False], ids=["obstore", "s3fs"])
def test_the_next_attempt_sends_only_what_the_store_has_not_acknowledged(moto_workspace, rust):
    """One file's writes fail with 500 past every retry of the client's: the attempt fails,
    and the next ones send that file alone, not the 19 the store had acknowledged."""
    ws = moto_workspace
    ws.settings["syncd"]["retry_min_delay"] = 0.2
    files = {f"results.zarr/t2m/{i}.0": os.urandom(4096) for i in range(20)}
    ws.result("exec_7_abcdef07", files)
    with PushBack(ws.server.port, broken="t2m/7.0", broken_times=12) as store:
        ws.settings["object_storage"]["endpoint_url"] = store.endpoint
        ws.settings["object_storage"]["use_rust_client"] = rust
        daemon = ws.daemon()
        ws.mark("exec_7_abcdef07")
        wait_until(lambda: ws.recorded("exec_7_abcdef07"), timeout=120, what="the result recorded")
        assert daemon.terminate() == 0
        puts = store.puts()

    assert ws.objects() == {f"outputs/exec_7_abcdef07/{k}": v for k, v in files.items()}
    assert len(puts) == 20 and set(puts.values()) == {1}, puts.most_common(3)
    log = daemon.log()
    assert "exec_7_abcdef07: upload of outputs/exec_7_abcdef07/results.zarr/t2m/7.0 failed" in log
    assert (
        "exec_7_abcdef07: 19 files the store acknowledged in an earlier attempt are not sent again"
        in log
    )


@pytest.mark.parametrize(
    ("answer", "said"),
    [
        (
            (403, "RequestTimeTooSkewed"),
            "failed: RequestTimeTooSkewed: RequestTimeTooSkewed (tests/pushback.py): this host's "
            "clock is off: set it right (NTP: timedatectl set-ntp true)",
        ),
        (
            (200, ""),
            "failed: s3://",
        ),
    ],
    ids=["clock-skew", "no-etag"],
)
@pytest.mark.parametrize("rust", [True, False], ids=["obstore", "s3fs"])
def test_a_store_answer_only_a_person_can_fix_says_what_to_fix(moto_workspace, answer, said, rust):
    """A front that answers every PUT so (s3fs takes an empty 200 for a stored object, obstore
    needs an ETag to go on); the result is not recorded, and the line names the remedy."""
    ws = moto_workspace
    ws.result("exec_9_abcdef09", {"a.bin": os.urandom(4096)})
    with PushBack(ws.server.port, broken="a.bin", broken_times=100, broken_answer=answer) as store:
        ws.settings["object_storage"]["endpoint_url"] = store.endpoint
        ws.settings["object_storage"]["use_rust_client"] = rust
        done = ws.sync("exec_9_abcdef09")

    assert done.returncode == 1, done.stderr
    assert f"exec_9_abcdef09: upload of outputs/exec_9_abcdef09/a.bin {said}" in done.stderr
    if answer[0] == 200:
        assert (
            "us-east-1) acknowledged it without an ETag, which no S3 store does: check that "
            "endpoint_url is the store's S3 API" in done.stderr
        )
    assert ws.objects() == {}
    assert ws.metadata("exec_9_abcdef09").get("storage_type") != "s3"


@pytest.mark.parametrize("rust", [True, False], ids=["obstore", "s3fs"])
def test_a_store_that_pages_a_listing_forever_is_a_failure_not_a_hang(moto_workspace, rust):
    """With delete_local_after_upload the bucket is listed before the tree goes; a store whose
    listing always has a next page, the first again, is named in one failure."""
    ws = moto_workspace
    ws.settings["syncd"]["delete_local_after_upload"] = True
    files = {f"t2m/{i}.0": os.urandom(1024) for i in range(4)}
    ws.result("exec_10_abcdef10", files)
    with Proxy(ws.server.port, endless_listings=True) as proxy:
        ws.settings["object_storage"]["endpoint_url"] = proxy.endpoint
        ws.settings["object_storage"]["use_rust_client"] = rust
        done = ws.sync("exec_10_abcdef10")
        listings = proxy.listings

    assert done.returncode == 1, done.stderr
    assert (
        "exec_10_abcdef10: listing outputs/exec_10_abcdef10/ failed: the store pages through the "
        "same listing again and again" in done.stderr
    )
    assert listings <= 251  # obstore hands out 1,000 keys at a time: 250 pages of 4
    assert (ws.outputs / "exec_10_abcdef10" / "t2m" / "0.0").read_bytes() == files["t2m/0.0"]


def test_a_bucket_that_lists_all_but_one_file_gets_that_file_again_not_the_tree(moto_workspace):
    """With delete_local_after_upload the bucket must list every file before the tree goes; one
    that keeps leaving one out gets that file again at each attempt, and only that one."""
    ws = moto_workspace
    ws.settings["syncd"]["delete_local_after_upload"] = True
    ws.settings["syncd"]["retry_min_delay"] = 0.2
    files = {f"t2m/{i}.0": os.urandom(1024) for i in range(12)}
    ws.result("exec_11_abcdef11", files)
    puts: collections.Counter[str] = collections.Counter()

    def count(number: int, upstream: bool, data: bytes) -> None:
        if upstream and data.startswith(b"PUT "):
            puts[data.split(b" ", 2)[1].decode()] += 1

    with Proxy(ws.server.port, hide_in_listings="t2m/3.0", observer=count) as proxy:
        ws.settings["object_storage"]["endpoint_url"] = proxy.endpoint
        daemon = ws.daemon()
        ws.mark("exec_11_abcdef11")
        wait_until(
            lambda: (
                daemon.log().count("(first: outputs/exec_11_abcdef11/t2m/3.0); sending them") >= 2
            ),
            what="two attempts after the first",
        )
        assert daemon.terminate() == 0

    assert {key.rsplit("/", 1)[-1] for key, n in puts.items() if n > 1} == {"3.0"}
    assert len(puts) == 12
    assert (ws.outputs / "exec_11_abcdef11" / "t2m" / "0.0").exists()  # the tree is kept
    assert (
        "after upload the bucket lacks 1 of 12 files or holds other sizes (first: "
        "outputs/exec_11_abcdef11/t2m/3.0, 1024 bytes locally, absent from the bucket); the "
        "local tree is kept and they are sent again" in daemon.log()
    )


def test_a_claim_its_folder_kept_from_removal_holds_back_no_retry_of_its_own_daemon(
    moto_workspace, tmpfs
):
    """The workflow folder goes read-only mid-upload: the record and the claim's removal fail;
    once it is writable again the daemon's next try proceeds at once, not claim_timeout
    later, and the claim it could not remove is said."""
    ws = moto_workspace
    ws.settings["syncd"]["retry_permanent_delay"] = 1
    ws.settings["syncd"]["claim_timeout"] = 300
    folder = tmpfs.mount(ws.outputs / "wf", size="16m")
    ws.result("wf/exec_1_abcdef01", {"big.bin": os.urandom(4 * MiB)})
    ws.mark("wf/exec_1_abcdef01")
    with Proxy(ws.server.port, rate=1_000_000) as slow:
        ws.settings["object_storage"]["endpoint_url"] = slow.endpoint
        daemon = ws.daemon()
        wait_until(lambda: slow.sent > MiB, what="the upload on its way")
        tmpfs.read_only(folder)
        daemon.wait_log("cannot remove its claim", timeout=60)
        subprocess.run(["mount", "-o", "remount,rw", str(folder)], check=True)
        wait_until(lambda: ws.recorded("wf/exec_1_abcdef01"), timeout=60, what="recorded")
    assert daemon.terminate() == 0
    claims = folder / ".syncd-claims"
    assert not claims.exists() or not any(claims.iterdir())
