"""`syncd run`: markers seen by watching, by the start-up scan and by the rescan; bad results
logged while the others are served; SIGTERM exits 0."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import time

import pytest

from tests.conftest import SYNCD, clean_env, only_error, status_of
from tests.servers import S3Server, wait_until


def test_marked_result_is_uploaded_and_recorded_by_the_running_daemon(workspace):
    ws = workspace
    daemon = ws.daemon()
    daemon.wait_log("syncd watching")
    tree = ws.result("wf/exec_1769560728_10ed9d3c")
    ws.result("wf/exec_1769560729_unmarked")

    ws.mark("wf/exec_1769560728_10ed9d3c")

    wait_until(lambda: ws.recorded("wf/exec_1769560728_10ed9d3c"), what="metadata recorded")
    expected = {
        f"outputs/wf/exec_1769560728_10ed9d3c/{p.relative_to(tree).as_posix()}": p.read_bytes()
        for p in tree.rglob("*")
        if p.is_file()
    }
    assert ws.objects() == expected  # nothing of the unmarked result
    assert daemon.terminate() == 0
    log = daemon.log()
    assert "exec_1769560728_10ed9d3c: uploaded 3 files" in log
    assert "MB/s" in log
    assert "syncd stopped; 0 results left for the next start" in log


def test_results_marked_while_down_are_found_at_start_and_recorded_ones_skipped(moto_workspace):
    ws = moto_workspace
    ws.result("exec_1_aaaaaaaa", {"a.txt": b"a"})
    ws.result("wf/exec_2_bbbbbbbb", {"b.txt": b"b"})
    ws.result(
        "exec_3_cccccccc",
        {"c.txt": b"c"},
        metadata={"storage_type": "s3", "remote_path": "outputs/exec_3_cccccccc"},
    )
    for rel in ("exec_1_aaaaaaaa", "wf/exec_2_bbbbbbbb", "exec_3_cccccccc"):
        ws.mark(rel)

    daemon = ws.daemon()

    wait_until(lambda: ws.recorded("exec_1_aaaaaaaa") and ws.recorded("wf/exec_2_bbbbbbbb"))
    assert ws.objects() == {
        "outputs/exec_1_aaaaaaaa/a.txt": b"a",
        "outputs/wf/exec_2_bbbbbbbb/b.txt": b"b",
    }
    assert daemon.terminate() == 0


def test_new_workflow_folder_is_watched(moto_workspace):
    ws = moto_workspace
    daemon = ws.daemon()
    daemon.wait_log("syncd watching")

    ws.result("new_workflow/exec_4_dddddddd", {"d.txt": b"d"})
    ws.mark("new_workflow/exec_4_dddddddd")

    wait_until(lambda: ws.recorded("new_workflow/exec_4_dddddddd"), what="metadata recorded")
    assert ws.objects() == {"outputs/new_workflow/exec_4_dddddddd/d.txt": b"d"}
    assert daemon.terminate() == 0


def test_many_results_at_once_are_all_recorded(moto_workspace):
    ws = moto_workspace
    ws.settings["syncd"]["parallel_results"] = 3
    daemon = ws.daemon()
    daemon.wait_log("syncd watching")
    rels = [f"wf{i % 2}/exec_{i}_abcdef{i:02d}" for i in range(8)]
    for rel in rels:
        ws.result(rel, {"x.bin": rel.encode()})
        ws.mark(rel)

    wait_until(lambda: all(ws.recorded(rel) for rel in rels), what="all 8 results recorded")
    assert ws.objects() == {f"outputs/{rel}/x.bin": rel.encode() for rel in rels}
    assert daemon.terminate() == 0


def test_bad_results_are_logged_while_the_others_are_served(moto_workspace):
    ws = moto_workspace
    daemon = ws.daemon()
    daemon.wait_log("syncd watching")
    ws.result("exec_5_eeeeeeee", {"x": b"x"}, metadata="{broken")
    ws.mark("exec_5_eeeeeeee")
    ws.mark("exec_6_ffffffff")  # a marker with no tree
    ws.result("exec_7_abcdef07", {"y": b"y"})
    ws.mark("exec_7_abcdef07")

    wait_until(lambda: ws.recorded("exec_7_abcdef07"), what="the good result recorded")
    log = daemon.wait_log("exec_6_ffffffff: marker")
    assert f"metadata {ws.metadata_path('exec_5_eeeeeeee')} is not valid JSON" in log
    assert (
        f"exec_6_ffffffff: marker {ws.outputs / 'exec_6_ffffffff.done'} has no result folder "
        f"{ws.outputs / 'exec_6_ffffffff'} yet; published as soon as the folder appears" in log
    )
    assert ws.metadata_path("exec_5_eeeeeeee").read_text() == "{broken"
    assert ws.objects() == {"outputs/exec_7_abcdef07/y": b"y"}
    assert daemon.process.poll() is None
    assert daemon.terminate() == 0


def test_rescan_uploads_what_failed_while_the_server_was_down(moto_workspace, tmp_path):
    ws = moto_workspace
    server = S3Server("moto", tmp_path / "late-moto")  # not started yet: connections refused
    ws.settings["object_storage"]["endpoint_url"] = server.endpoint
    ws.settings["object_storage"]["bucket"] = "late-bucket"
    ws.settings["syncd"]["rescan_interval"] = 0.5
    ws.result("exec_8_abcdef08", {"z.bin": b"zz"})
    ws.mark("exec_8_abcdef08")
    daemon = ws.daemon()
    daemon.wait_log("exec_8_abcdef08: upload of outputs/exec_8_abcdef08/z.bin failed")
    assert not ws.recorded("exec_8_abcdef08")

    server.start()
    try:
        server.client().create_bucket(Bucket="late-bucket")
        wait_until(lambda: ws.recorded("exec_8_abcdef08"), what="recorded after a rescan")
        assert server.objects("late-bucket") == {"outputs/exec_8_abcdef08/z.bin": b"zz"}
        assert daemon.terminate() == 0
    finally:
        server.stop()


def test_a_fixed_result_is_picked_up_by_the_slow_retry(moto_workspace, tmp_path):
    ws = moto_workspace
    ws.settings["syncd"]["retry_permanent_delay"] = 0.5
    ws.result("exec_9_abcdef09", {"z.bin": b"zz"}, metadata="not json yet")
    ws.mark("exec_9_abcdef09")
    daemon = ws.daemon()
    daemon.wait_log("is not valid JSON")

    ws.metadata_path("exec_9_abcdef09").write_text('{"request_id": "exec_9_abcdef09"}')

    wait_until(lambda: ws.recorded("exec_9_abcdef09"), what="recorded by a retry")
    assert ws.objects() == {"outputs/exec_9_abcdef09/z.bin": b"zz"}
    assert ws.metadata("exec_9_abcdef09")["request_id"] == "exec_9_abcdef09"
    assert daemon.terminate() == 0


@pytest.mark.parametrize("rust", [True, False], ids=["obstore", "s3fs"])
def test_sigterm_exits_0_every_time(moto_workspace, rust):
    ws = moto_workspace
    ws.settings["object_storage"]["use_rust_client"] = rust
    codes = []
    for i in range(4):
        rel = f"exec_{i}_abcdef0{i}"
        ws.result(rel, {"a.bin": b"a" * 1000})
        ws.mark(rel)
        daemon = ws.daemon()
        wait_until(lambda rel=rel: ws.recorded(rel), what=f"{rel} recorded")
        codes.append(daemon.terminate())
        assert "syncd stopped" in daemon.log()
    assert codes == [0, 0, 0, 0]


def test_missing_outputs_dir_is_a_clear_error(moto_workspace):
    ws = moto_workspace
    ws.settings["syncd"]["outputs_dir"] = str(ws.root / "nowhere")
    done = subprocess.run(
        [*SYNCD, "run", "--config", str(ws.config)],
        env=clean_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2
    assert done.stderr.splitlines()[-1] == (
        f"syncd: error: outputs_dir {ws.root / 'nowhere'} does not exist or is not a folder: "
        "create it or set syncd.outputs_dir (SYNCD_OUTPUTS_DIR)"
    )


def test_earth2studio_layout_end_to_end(moto_workspace):
    ws = moto_workspace
    ws.settings["syncd"]["metadata_file"] = "metadata_{workflow}:{exec}.json"
    rel = "deterministic_earth2_workflow/exec_1769560728_10ed9d3c"
    ws.result(rel, {"results.zarr/.zgroup": b"{}"}, metadata=None)
    meta_path = ws.outputs / "metadata_deterministic_earth2_workflow:exec_1769560728_10ed9d3c.json"
    meta_path.write_text('{"request_id": "exec_1769560728_10ed9d3c", "status": "completed"}')
    daemon = ws.daemon()
    daemon.wait_log("syncd watching")

    ws.mark(rel)

    wait_until(lambda: '"s3"' in meta_path.read_text(), what="Earth2Studio metadata recorded")
    assert ws.objects() == {f"outputs/{rel}/results.zarr/.zgroup": b"{}"}
    assert not (ws.outputs / f"{rel}.json").exists()
    assert daemon.terminate() == 0


def test_a_slow_retry_waits_in_the_journal_and_a_start_makes_it_due(moto_workspace):
    """The journal keeps when a failed result is tried next: rescans do not try it sooner, and
    a start (after a fix, say) tries it at once."""
    ws = moto_workspace
    ws.settings["syncd"]["retry_permanent_delay"] = 3600
    ws.settings["syncd"]["rescan_interval"] = 0.2
    ws.settings["syncd"]["metrics_file"] = str(ws.root / "syncd.prom")
    ws.result("exec_4_abcdef04", {"z.bin": b"zz"}, metadata="not json yet")
    ws.mark("exec_4_abcdef04")
    daemon = ws.daemon()
    daemon.wait_log("is not valid JSON")
    failed_at = time.time()
    prom = ws.root / "syncd.prom"
    # Ten rescans and more: still the one failed attempt.
    wait_until(
        lambda: prom.exists() and prom.stat().st_mtime > failed_at + 2, what="2 s of rescans"
    )
    assert 'syncd_failures_total{kind="input"} 1.0' in prom.read_text()
    assert "(retrying every 3600 s)" in only_error(daemon.log())
    record = status_of(ws)["exec_4_abcdef04"]
    assert (record["state"], record["attempts"]) == ("retrying", 1)
    assert record["next_try"] > time.time() + 3500
    assert daemon.terminate() == 0

    # Fixed while syncd is stopped: no event tells the next daemon, only the journal.
    ws.metadata_path("exec_4_abcdef04").write_text('{"request_id": "exec_4_abcdef04"}')
    again = ws.daemon()
    wait_until(lambda: ws.recorded("exec_4_abcdef04"), what="recorded at the start")
    assert ws.objects() == {"outputs/exec_4_abcdef04/z.bin": b"zz"}
    assert again.terminate() == 0


def test_sync_says_a_failure_once_without_promising_a_retry(moto_workspace):
    ws = moto_workspace
    ws.result("exec_5_abcdef05", {"z.bin": b"zz"}, metadata="not json yet")
    done = ws.sync("exec_5_abcdef05")
    assert done.returncode == 1
    line = only_error(done.stderr)
    assert "exec_5_abcdef05: " in line and "is not valid JSON" in line
    assert "retrying" not in line
    assert ws.objects() == {}


def test_a_restart_with_a_new_prefix_publishes_recorded_results_there(moto_workspace):
    """The journal's watch over recorded results lasts one run: a start looks at each result
    again under its own settings."""
    ws = moto_workspace
    ws.result("exec_6_abcdef06", {"z.bin": b"zz"})
    ws.mark("exec_6_abcdef06")
    daemon = ws.daemon()
    wait_until(lambda: ws.recorded("exec_6_abcdef06"), what="recorded under outputs/")
    assert daemon.terminate() == 0

    ws.settings["object_storage"]["prefix"] = "moved"
    again = ws.daemon()
    wait_until(
        lambda: ws.metadata("exec_6_abcdef06")["remote_path"] == "moved/exec_6_abcdef06",
        what="recorded under moved/",
    )
    assert ws.objects("moved/") == {"moved/exec_6_abcdef06/z.bin": b"zz"}
    assert again.terminate() == 0


def test_a_folder_named_like_a_marker_is_no_marker(moto_workspace):
    ws = moto_workspace
    ws.settings["syncd"]["rescan_interval"] = 0.5
    daemon = ws.daemon()
    daemon.wait_log("syncd watching")
    ws.result("exec_7_abcdef07", {"g": b"g"})
    (ws.outputs / "exec_7_abcdef07.done").mkdir()  # an event, and rescans, see it
    ws.result("exec_8_abcdef08", {"h": b"h"})
    ws.mark("exec_8_abcdef08")

    wait_until(lambda: ws.recorded("exec_8_abcdef08"))
    time.sleep(1.5)  # three rescans more
    assert daemon.terminate() == 0
    assert not ws.recorded("exec_7_abcdef07")
    assert set(ws.objects()) == {"outputs/exec_8_abcdef08/h"}


def test_status_into_a_closed_pipe_ends_quietly(moto_workspace):
    ws = moto_workspace
    for i in range(600):  # more JSON than a pipe holds
        ws.result(f"exec_{i}_abcdef", {"a": b"a"}, metadata=None)
        ws.mark(f"exec_{i}_abcdef")
    config = ws.config
    done = subprocess.run(
        f"{' '.join(SYNCD)} status --config {config} --json | head -c 1",
        shell=True,
        env=clean_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.stdout == "["
    assert "Traceback" not in done.stderr and "BrokenPipe" not in done.stderr


def test_a_state_another_version_wrote_is_looked_at_again(moto_workspace):
    """A row whose state this version does not know (a newer syncd's, then a downgrade):
    `syncd status` shows it pending, and the daemon publishes it as it would a pending one."""
    ws = moto_workspace
    ws.result("exec_1_abcdef01", {"a": b"a"})
    ws.mark("exec_1_abcdef01")
    (ws.root / "state").mkdir()
    db = sqlite3.connect(ws.root / "state" / "state.db")
    db.execute(
        "CREATE TABLE results (rel TEXT PRIMARY KEY, state TEXT NOT NULL, attempts INTEGER NOT "
        "NULL DEFAULT 0, last_error TEXT, permanent INTEGER NOT NULL DEFAULT 0, next_try REAL, "
        "files INTEGER, bytes INTEGER, updated REAL NOT NULL, uploaded TEXT)"
    )
    db.execute(
        "INSERT INTO results VALUES ('exec_1_abcdef01', 'paused', 0, NULL, 0, NULL, "
        "NULL, NULL, 0, NULL)"
    )
    db.commit()
    db.close()

    assert status_of(ws)["exec_1_abcdef01"]["state"] == "pending"
    daemon = ws.daemon()
    wait_until(lambda: ws.recorded("exec_1_abcdef01"), what="published")
    assert daemon.terminate() == 0
    assert "ERROR" not in daemon.log()
    assert status_of(ws)["exec_1_abcdef01"]["state"] == "done"


@pytest.mark.parametrize("lost", ["removed", "output_files edited"])
def test_a_published_record_removed_or_edited_is_written_again_and_said_so(moto_workspace, lost):
    ws = moto_workspace
    ws.settings["syncd"]["rescan_interval"] = 3600  # its event alone restores it
    ws.result("exec_9_abcdef09", {"a": b"a"})
    ws.mark("exec_9_abcdef09")
    daemon = ws.daemon()
    wait_until(lambda: ws.recorded("exec_9_abcdef09"))
    published = ws.metadata("exec_9_abcdef09")

    path = ws.metadata_path("exec_9_abcdef09")
    if lost == "removed":
        path.unlink()
    else:
        path.write_text(json.dumps({**published, "output_files": [], "note": "kept"}))
    daemon.wait_log("exec_9_abcdef09: its metadata")
    wait_until(lambda: path.exists() and ws.recorded("exec_9_abcdef09"))
    assert daemon.terminate() == 0
    now = ws.metadata("exec_9_abcdef09")
    assert now["output_files"] == published["output_files"]
    said = (
        "was removed while its marker stays"
        if lost == "removed"
        else "was written with its output_files changed"
    )
    assert f"{said}; restored the record (1 files in" in daemon.log()
    assert "written without syncd's record" not in daemon.log()
    assert daemon.log().count("exec_9_abcdef09: uploaded") == 1
    assert now.get("note") == (None if lost == "removed" else "kept")


def test_malformed_metadata_removed_gets_the_result_uploaded_at_once(moto_workspace):
    """Its error says: fix or remove it and the result is uploaded on the next scan."""
    ws = moto_workspace
    ws.settings["syncd"]["rescan_interval"] = 1
    ws.result("exec_8_abcdef08", {"a": b"a"}, metadata=None)
    ws.metadata_path("exec_8_abcdef08").write_text("{not json")
    ws.mark("exec_8_abcdef08")
    daemon = ws.daemon()
    daemon.wait_log("is not valid JSON")

    ws.metadata_path("exec_8_abcdef08").unlink()
    wait_until(lambda: ws.objects(), timeout=20, what="uploaded after the removal")
    assert daemon.terminate() == 0
    assert ws.objects() == {"outputs/exec_8_abcdef08/a": b"a"}
