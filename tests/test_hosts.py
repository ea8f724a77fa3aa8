"""Hosts and workflows that do odd things: junk where claims go, two daemons that look alike,
folders syncd cannot write, a full disk, a locked or corrupt state database, names no store
takes, markers that come early or go away, an outputs dir that is replaced. Each time the
daemon says what is wrong in one line, keeps serving the other results, and resumes by itself
once the cause is gone."""

from __future__ import annotations

import json
import os
import re
import socket
import sqlite3
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import PurePosixPath

import pytest

from syncd import claims
from syncd.config import load_settings
from syncd.layout import Layout, Result
from tests.conftest import only_error, status_of
from tests.servers import wait_until

MiB = 1024 * 1024


def test_a_file_where_the_claims_folder_goes_is_named_and_the_others_are_served(moto_workspace):
    ws = moto_workspace
    ws.settings["syncd"]["parallel_results"] = 1  # one dead worker would stop everything
    ws.settings["syncd"]["retry_permanent_delay"] = 0.5
    (ws.outputs / ".syncd-claims").write_text("not a folder")
    ws.result("exec_1_abcdef01", {"a": b"a"})
    ws.result("wf/exec_2_abcdef02", {"b": b"b"})
    ws.mark("exec_1_abcdef01")
    ws.mark("wf/exec_2_abcdef02")
    daemon = ws.daemon()

    wait_until(lambda: ws.recorded("wf/exec_2_abcdef02"), what="the other result recorded")
    daemon.wait_log(f"{ws.outputs / '.syncd-claims'} is not a folder")
    (ws.outputs / ".syncd-claims").unlink()
    wait_until(lambda: ws.recorded("exec_1_abcdef01"), what="recorded once it was removed")
    assert daemon.terminate() == 0
    assert only_error(daemon.log()).endswith(
        f"exec_1_abcdef01: {ws.outputs / '.syncd-claims'} is not a folder, and syncd keeps its "
        "claims there: remove it (retrying every 0 s)"
    )


def test_junk_in_the_claims_folder_and_a_claim_from_the_future_do_not_hold_a_result(
    moto_workspace,
):
    ws = moto_workspace
    ws.settings["syncd"]["claim_timeout"] = 10
    claims = ws.outputs / ".syncd-claims"
    claims.mkdir()
    (claims / "README").write_text("left by someone")
    (claims / "exec_3_abcdef03.x").write_text("")
    (claims / "exec_3_abcdef03.7").mkdir()  # a folder with a claim's name
    garbage = claims / "exec_3_abcdef03.2"
    garbage.write_bytes(b"\x00garbage")
    future = time.time() + 86400  # a clock a day ahead wrote it
    os.utime(garbage, (future, future))
    ws.result("exec_3_abcdef03", {"c": b"c"})
    ws.mark("exec_3_abcdef03")

    daemon = ws.daemon()

    wait_until(lambda: ws.recorded("exec_3_abcdef03"), what="recorded despite the junk")
    assert daemon.terminate() == 0
    assert sorted(p.name for p in claims.iterdir()) == [
        "README",
        "exec_3_abcdef03.7",
        "exec_3_abcdef03.x",
    ]


def test_a_live_claim_of_a_lookalike_daemon_in_another_container_is_respected(moto_workspace):
    ws = moto_workspace
    ws.settings["syncd"]["log_level"] = "DEBUG"
    ws.result("exec_4_abcdef04", {"d": b"d"})
    daemon = ws.daemon()
    daemon.wait_log("syncd watching")
    claims = ws.outputs / ".syncd-claims"
    claims.mkdir()
    pid = daemon.process.pid  # the same hostname and pid, another pid namespace
    (claims / "exec_4_abcdef04.1").write_text(
        json.dumps(
            {
                "owner": f"{socket.gethostname()}:{pid}:0therrun",
                "host": socket.gethostname(),
                "pid": pid,
                "pidns": "pid:[4026599999]",
                "instance": "0therrun",
            }
        )
    )

    ws.mark("exec_4_abcdef04")
    daemon.wait_log(f"exec_4_abcdef04: being published by {socket.gethostname()}:{pid}:0therrun")
    assert daemon.terminate() == 0
    assert ws.objects() == {}
    assert not ws.recorded("exec_4_abcdef04")


def test_a_read_only_workflow_folder_is_named_and_the_others_are_served(moto_workspace, tmpfs):
    ws = moto_workspace
    readonly = ws.outputs / "ro_workflow"
    tmpfs.mount(readonly)
    ws.result("ro_workflow/exec_5_abcdef05", {"e": b"e"}, metadata=None)
    ws.mark("ro_workflow/exec_5_abcdef05")
    tmpfs.read_only(readonly)
    ws.result("wf/exec_6_abcdef06", {"f": b"f"})
    ws.mark("wf/exec_6_abcdef06")
    daemon = ws.daemon()

    wait_until(lambda: ws.recorded("wf/exec_6_abcdef06"))
    log = daemon.wait_log(f"claiming the result in {readonly / '.syncd-claims'} failed")
    assert daemon.terminate() == 0
    assert "(Read-only file system): its filesystem is read-only: mount it read-write" in log
    assert set(ws.objects()) == {"outputs/wf/exec_6_abcdef06/f"}


def test_a_full_outputs_filesystem_resumes_by_itself_and_leaves_nothing_behind(
    moto_workspace, tmpfs
):
    ws = moto_workspace
    ws.settings["syncd"]["retry_max_delay"] = 1
    tmpfs.mount(ws.outputs, size="2m")
    ws.result("exec_7_abcdef07", {"g": b"g" * 1000})
    before = ws.metadata_path("exec_7_abcdef07").read_bytes()
    filler = tmpfs.fill(ws.outputs)
    ws.mark("exec_7_abcdef07")
    daemon = ws.daemon()
    daemon.wait_log("its filesystem is full: free space; syncd resumes by itself")
    daemon.wait_log("(attempt 3;")
    assert ws.metadata_path("exec_7_abcdef07").read_bytes() == before
    leftovers = [p.name for p in ws.outputs.rglob("*") if p.name.startswith(".") and p != filler]
    assert leftovers == []

    filler.unlink()

    wait_until(lambda: ws.recorded("exec_7_abcdef07"), what="recorded once space was freed")
    assert daemon.terminate() == 0
    assert [p.name for p in ws.outputs.rglob(".*")] == []  # no claim, no temp file


@pytest.mark.parametrize("lost", [False, True], ids=["kept", "lost-since"])
def test_a_full_disk_while_recording_does_not_upload_again(moto_workspace, tmpfs, lost):
    """The upload is remembered, and recorded once the disk has room; if the bucket lost an
    object meanwhile, the tree is sent again rather than recorded without it."""
    ws = moto_workspace
    ws.settings["syncd"]["retry_max_delay"] = 1
    ws.settings["syncd"]["metadata_file"] = "meta/{exec_path}.json"
    meta = tmpfs.mount(ws.outputs / "meta", size="1m")
    ws.result("exec_8_abcdef08", {"h.bin": os.urandom(MiB)}, metadata=None)
    filler = tmpfs.fill(meta)
    ws.mark("exec_8_abcdef08")
    daemon = ws.daemon()
    daemon.wait_log("writing metadata")
    daemon.wait_log("(attempt 3;")
    if lost:
        ws.server.client().delete_object(Bucket=ws.bucket, Key="outputs/exec_8_abcdef08/h.bin")

    filler.unlink()

    wait_until(lambda: (meta / "exec_8_abcdef08.json").exists(), what="recorded after all")
    assert daemon.terminate() == 0
    log = daemon.log()
    if lost:
        assert log.count("exec_8_abcdef08: uploading 1 files") == 2
        assert (
            "exec_8_abcdef08: the bucket lacks 1 of the 1 files an earlier attempt uploaded "
            "(first: outputs/exec_8_abcdef08/h.bin); sending them again" in log
        )
        assert len(ws.objects()["outputs/exec_8_abcdef08/h.bin"]) == MiB
    else:
        assert log.count("exec_8_abcdef08: uploading 1 files") == 1
        assert "exec_8_abcdef08: already uploaded by an earlier attempt; recording it" in log
        assert (
            "exec_8_abcdef08: 1 files, 1048576 bytes uploaded to outputs/exec_8_abcdef08 by an "
            "earlier attempt; recorded in" in log
        )
    assert json.loads((meta / "exec_8_abcdef08.json").read_text())["storage_type"] == "s3"
    assert [p.name for p in meta.iterdir()] == ["exec_8_abcdef08.json"]


def test_what_a_killed_daemon_left_is_cleaned_up_at_the_next_start(moto_workspace):
    ws = moto_workspace
    ws.settings["syncd"]["delete_local_after_upload"] = True
    temp = ws.outputs / ".exec_9_abcdef09.json.k2j3h4g5.syncd.tmp"
    temp.write_text('{"half": ')
    # Recorded, then killed while its tree was being deleted.
    ws.result("wf/exec_10_abcdef10", {"i": b"i"})
    ws.mark("wf/exec_10_abcdef10")
    assert ws.sync("wf/exec_10_abcdef10").returncode == 0
    ws.result("wf/.exec_10_abcdef10.deleting", {"i": b"i"}, metadata=None)
    # Killed after moving its tree aside, before recording: it must come back, not go.
    ws.result("exec_11_abcdef11", {"j": b"j"})
    ws.mark("exec_11_abcdef11")
    (ws.outputs / "exec_11_abcdef11").rename(ws.outputs / ".exec_11_abcdef11.deleting")

    daemon = ws.daemon()

    wait_until(lambda: ws.recorded("exec_11_abcdef11"), what="the moved tree put back, published")
    assert daemon.terminate() == 0
    assert not temp.exists()
    assert not (ws.outputs / "wf" / ".exec_10_abcdef10.deleting").exists()
    assert ws.objects("outputs/exec_11_abcdef11/") == {"outputs/exec_11_abcdef11/j": b"j"}


def test_a_folder_named_like_a_tree_left_aside_is_kept_without_delete_local(moto_workspace):
    ws = moto_workspace
    ws.result("exec_12_abcdef12", {"i": b"i"})
    assert ws.sync("exec_12_abcdef12").returncode == 0
    notes = ws.result(".exec_12_abcdef12.deleting", {"notes.txt": b"mine"}, metadata=None)

    daemon = ws.daemon()
    daemon.wait_log("delete_local_after_upload is off")
    assert daemon.terminate() == 0
    assert (notes / "notes.txt").read_bytes() == b"mine"


def test_a_state_database_locked_too_long_is_a_transient_error(moto_workspace):
    ws = moto_workspace
    ws.settings["syncd"]["retry_max_delay"] = 1
    ws.settings["syncd"]["rescan_interval"] = 3600  # the retry alone publishes it
    daemon = ws.daemon()
    daemon.wait_log("syncd watching")
    lock = sqlite3.connect(ws.root / "state" / "state.db", isolation_level=None)
    lock.execute("BEGIN EXCLUSIVE")
    ws.result("exec_12_abcdef12", {"k": b"k"})
    ws.mark("exec_12_abcdef12")
    daemon.wait_log("is locked by another process", timeout=60)
    # Held until the journal could not keep the retry's time either.
    wait_until(lambda: daemon.log().count("is locked by another process") >= 2, timeout=60)

    lock.execute("ROLLBACK")
    lock.close()

    wait_until(lambda: ws.recorded("exec_12_abcdef12"), timeout=30, what="recorded after")
    assert daemon.terminate() == 0
    assert status_of(ws)["exec_12_abcdef12"]["state"] == "done"


def test_a_daemon_started_while_its_state_file_is_locked_waits_for_it(moto_workspace):
    ws = moto_workspace
    first = ws.daemon()  # the state file made
    first.wait_log("syncd watching")
    assert first.terminate() == 0
    lock = sqlite3.connect(ws.root / "state" / "state.db", isolation_level=None)
    lock.execute("BEGIN EXCLUSIVE")
    ws.result("exec_13_abcdef13", {"k": b"k"})
    ws.mark("exec_13_abcdef13")

    daemon = ws.daemon()
    daemon.wait_log("is locked by another process", timeout=60)
    lock.execute("ROLLBACK")
    lock.close()

    wait_until(lambda: ws.recorded("exec_13_abcdef13"), timeout=60, what="recorded after")
    assert daemon.terminate() == 0
    assert daemon.log().count("is locked by another process") == 1


def test_a_state_file_removed_under_the_daemon_is_said_and_starves_the_watchdog(
    moto_workspace, notify_socket
):
    ws = moto_workspace
    daemon = ws.daemon(env=ws.env(NOTIFY_SOCKET=notify_socket.address, WATCHDOG_USEC="4000000"))
    notify_socket.receive(lambda got: "WATCHDOG=1" in got)
    state = ws.root / "state" / "state.db"

    for extra in ("", "-wal", "-shm"):
        state.with_name(f"state.db{extra}").unlink(missing_ok=True)

    daemon.wait_log("syncd is not healthy")
    assert daemon.terminate() == 0
    assert (
        f"syncd is not healthy: its state file {state} was removed or replaced while it runs, "
        "so what it keeps goes to a file nobody sees: restart syncd; no longer feeding the "
        "watchdog" in daemon.log()
    )


def test_a_corrupt_state_database_is_moved_aside_and_rebuilt(moto_workspace):
    ws = moto_workspace
    state = ws.root / "state"
    state.mkdir()
    (state / "state.db").write_bytes(b"this is not a database" * 100)
    ws.result("exec_13_abcdef13", {"l": b"l"})
    ws.mark("exec_13_abcdef13")

    daemon = ws.daemon()

    wait_until(lambda: ws.recorded("exec_13_abcdef13"))
    assert daemon.terminate() == 0
    warnings = [line for line in daemon.log().splitlines() if "is corrupt" in line]
    assert len(warnings) == 1
    assert "the metadata files are the record, so nothing published is lost" in warnings[0]
    assert len(list(state.glob("state.db.corrupt-*"))) == 1
    assert status_of(ws)["exec_13_abcdef13"]["state"] == "done"


def test_a_state_database_on_a_full_disk_is_not_taken_for_a_corrupt_one(moto_workspace, tmpfs):
    ws = moto_workspace
    state = tmpfs.mount(ws.root / "state")
    ws.result("exec_20_abcdef20", {"p": b"p"})
    assert ws.sync("exec_20_abcdef20").returncode == 0  # the state file exists and is sound
    tmpfs.fill(state)

    done = ws.syncd("run", "--config", str(ws.config))

    assert done.returncode == 2
    last = done.stderr.splitlines()[-1]
    assert last.startswith(f"syncd: error: state_dir {state}: cannot open {state / 'state.db'} (")
    assert "(disk I/O error)" in last or "(database or disk is full)" in last
    assert list(state.glob("state.db.corrupt-*")) == []


def test_names_no_store_takes_are_named_safely_on_one_line(moto_workspace):
    ws = moto_workspace
    tree = ws.result("exec_14_abcdef14", {"good.bin": b"1"})
    (tree / os.fsdecode(b"bad\xff.bin")).write_bytes(b"2")

    done = ws.sync("exec_14_abcdef14")

    assert done.returncode == 1
    assert "Traceback" not in done.stderr
    assert only_error(done.stderr).endswith(
        f"exec_14_abcdef14: file {tree}/bad\\xff.bin cannot be uploaded: its path is not valid "
        "UTF-8, which S3 keys must be: rename it (the result is published once it is fixed)"
    )
    assert ws.objects() == {}

    os.unlink(tree / os.fsdecode(b"bad\xff.bin"))
    (tree / "new\nline.bin").write_bytes(b"3")
    done = ws.sync("exec_14_abcdef14")
    assert done.returncode == 1
    assert f"file {tree}/new\\nline.bin cannot be uploaded: its path holds control" in (
        only_error(done.stderr)
    )

    os.unlink(tree / "new\nline.bin")
    deep = tree / ("d" * 250) / ("e" * 250) / ("f" * 250) / ("g" * 250)
    deep.mkdir(parents=True)
    (deep / "h.bin").write_bytes(b"4")
    done = ws.sync("exec_14_abcdef14")
    assert done.returncode == 1
    assert "bytes, above S3's limit of 1024: rename it" in done.stderr

    tabbed = ws.result("exec_19_ab\tcd", {"a": b"5"})  # the result folder's own name
    done = ws.sync("exec_19_ab\tcd")
    assert done.returncode == 2  # no result syncd can publish, as a path outside outputs_dir
    assert done.stderr.splitlines()[-1] == (
        f"syncd: error: result folder {ws.outputs}/exec_19_ab\\tcd cannot be uploaded: its name "
        "holds control characters: rename the folder (the result is published once it is fixed)"
    )
    assert tabbed.is_dir()
    assert ws.objects() == {}


def test_a_prefix_that_cannot_make_a_key_is_refused_by_check(moto_workspace):
    ws = moto_workspace
    for prefix in ("a//b", "..", "./x", "results/../x"):
        ws.settings["object_storage"]["prefix"] = prefix
        done = ws.syncd("check", "--config", str(ws.config))
        assert done.returncode == 2, prefix
        assert done.stderr.splitlines()[-1].startswith(
            f"syncd: error: invalid setting object_storage.prefix (in {ws.root}"
        )
        assert "must be names separated by single slashes, without '.' or '..' parts" in (
            done.stderr
        )


def test_a_marker_that_comes_before_its_folder_is_published_when_the_folder_appears(
    moto_workspace,
):
    ws = moto_workspace
    ws.settings["syncd"]["retry_max_delay"] = 3600  # only the folder's arrival can help
    ws.settings["syncd"]["retry_min_delay"] = 3600
    (ws.outputs / "wf").mkdir()
    daemon = ws.daemon()
    daemon.wait_log("syncd watching")
    ws.mark("wf/exec_15_abcdef15")
    daemon.wait_log("has no result folder")
    staging = ws.result("wf/.staging", {"m": b"m"}, metadata=None)
    ws.metadata_path("wf/exec_15_abcdef15").write_text("{}")

    staging.rename(ws.outputs / "wf" / "exec_15_abcdef15")  # the folder's final rename

    # Its file was written after the marker: published once the tree was left alone for 30 s.
    wait_until(lambda: ws.recorded("wf/exec_15_abcdef15"), timeout=45, what="published")
    assert daemon.terminate() == 0
    assert ws.objects() == {"outputs/wf/exec_15_abcdef15/m": b"m"}


def test_a_folder_filled_after_its_marker_is_never_published_half(moto_workspace):
    ws = moto_workspace
    ws.settings["syncd"]["retry_min_delay"] = 3600  # only the quiet tree can help
    ws.settings["syncd"]["retry_max_delay"] = 3600
    (ws.outputs / "wf").mkdir()
    daemon = ws.daemon()
    daemon.wait_log("syncd watching")
    ws.mark("wf/exec_16_abcdef16")
    daemon.wait_log("has no result folder")

    tree = ws.outputs / "wf" / "exec_16_abcdef16"
    tree.mkdir()  # empty at first: its folder is newer than its marker
    time.sleep(1)
    (tree / "results.zarr").mkdir()
    for chunk in (".zgroup", "0.0", "1.0", "2.0"):  # a writer that dropped its marker first
        time.sleep(1)
        (tree / "results.zarr" / chunk).write_bytes(chunk.encode())

    wait_until(lambda: ws.recorded("wf/exec_16_abcdef16"), timeout=60, what="published")
    assert daemon.terminate() == 0
    paths = [f["path"] for f in ws.metadata("wf/exec_16_abcdef16")["output_files"]]
    assert len(paths) == 4, paths
    assert len(ws.objects()) == 4
    assert "the result folder is empty" not in daemon.log()


def test_files_written_after_a_result_was_published_are_said(moto_workspace):
    ws = moto_workspace
    daemon = ws.daemon()
    daemon.wait_log("syncd watching")
    tree = ws.result("exec_17_abcdef17", {"c1": b"1"})
    ws.mark("exec_17_abcdef17")  # too early: three more files are still to come
    wait_until(lambda: ws.recorded("exec_17_abcdef17"), what="published with one file")
    for name in ("c2", "c3", "c4"):
        (tree / name).write_bytes(name.encode())

    daemon.wait_log("written to after it was published", timeout=60)
    assert daemon.terminate() == 0
    assert (
        "exec_17_abcdef17: written to after it was published, and 3 files were added or "
        "rewritten (Zarr metadata) since it was published to outputs/exec_17_abcdef17; it stays "
        f"as published: `syncd sync {tree}` publishes the change" in daemon.log()
    )


def test_a_marker_removed_while_its_result_waits_forgets_the_result(moto_workspace):
    ws = moto_workspace
    ws.result("exec_16_abcdef16", {"n": b"n"}, metadata="{broken")
    marker = ws.mark("exec_16_abcdef16")
    daemon = ws.daemon()
    daemon.wait_log("is not valid JSON")
    assert status_of(ws)["exec_16_abcdef16"]["state"] == "retrying"

    marker.unlink()

    wait_until(
        lambda: status_of(ws).get("exec_16_abcdef16", {}).get("state") == "forgotten",
        timeout=10,
        what="status says the result is forgotten",
    )
    table = ws.syncd("status", "--config", str(ws.config)).stdout
    row = next(line for line in table.splitlines() if line.startswith("exec_16_abcdef16"))
    assert row.split() == ["exec_16_abcdef16", "forgotten", "0", "-", "-", "marker", "removed"]
    assert daemon.terminate() == 0
    assert "exec_16_abcdef16: its marker was removed; forgotten" in daemon.log()


def test_an_outputs_dir_removed_and_made_again_is_watched_again(moto_workspace):
    ws = moto_workspace
    daemon = ws.daemon()
    daemon.wait_log("syncd watching")
    os.rename(ws.outputs, ws.root / "outputs-old")
    ws.outputs.mkdir()

    daemon.wait_log("was replaced or remounted; watching it again", timeout=10)
    ws.result("new_wf/exec_17_abcdef17", {"o": b"o"})
    ws.mark("new_wf/exec_17_abcdef17")

    wait_until(lambda: ws.recorded("new_wf/exec_17_abcdef17"), timeout=10, what="recorded")
    assert daemon.terminate() == 0
    assert daemon.log().count("was replaced or remounted") == 1


def test_an_old_marker_without_its_folder_is_an_error_logged_once(moto_workspace):
    ws = moto_workspace
    ws.settings["syncd"]["retry_permanent_delay"] = 0.3
    marker = ws.mark("exec_18_abcdef18")
    an_hour_ago = time.time() - 3600
    os.utime(marker, (an_hour_ago, an_hour_ago))
    daemon = ws.daemon()

    wait_until(lambda: status_of(ws).get("exec_18_abcdef18", {}).get("attempts", 0) >= 3)
    assert daemon.terminate() == 0
    assert only_error(daemon.log()).endswith(
        f"exec_18_abcdef18: marker {marker} has no result folder {ws.outputs / 'exec_18_abcdef18'}"
        ": restore the folder or remove the marker (retrying every 0 s)"
    )
    assert "WARNING" not in daemon.log()


@pytest.fixture
def deep_chain():
    """Makes a chain of folders under a path, and always removes it: pathlib's and shutil's
    (and pytest's own clean-up) would recurse past Python's limit."""
    made: list = []

    def make(top, depth: int):
        made.append(top / "d")
        for _ in range(depth - 1):
            made.append(made[-1] / "d")
        for folder in made:
            folder.mkdir()
        return made[-1]

    yield make
    for folder in reversed(made):
        for entry in folder.iterdir():
            if not entry.is_dir():
                entry.unlink()
        folder.rmdir()


def test_a_tree_too_deep_and_metadata_nested_too_deep_are_named_once(moto_workspace, deep_chain):
    ws = moto_workspace
    ws.settings["syncd"]["retry_min_delay"] = 0.1
    deep = ws.result("exec_1_abcdef01", {"a": b"a"})
    (deep_chain(deep, 1500) / "bottom").write_bytes(b"b")
    ws.result("exec_2_abcdef02", {"b": b"b"}, metadata="[" * 200_000)
    ws.result("exec_3_abcdef03", {"c": b"c"})
    for rel in ("exec_1_abcdef01", "exec_2_abcdef02", "exec_3_abcdef03"):
        ws.mark(rel)

    daemon = ws.daemon()
    wait_until(lambda: ws.recorded("exec_3_abcdef03"), what="the others served")
    daemon.wait_log("exec_1_abcdef01: folder")
    daemon.wait_log("exec_2_abcdef02: metadata")
    assert daemon.terminate() == 0

    log = daemon.log()
    problems = [line for line in log.splitlines() if " ERROR " in line or " WARNING " in line]
    assert len(problems) == 2, problems
    assert (
        f"exec_1_abcdef01: folder {deep / '/'.join(['d'] * 129)} lies more than 128 folders deep "
        "in the result, deeper than syncd walks: flatten the tree (the result is published once "
        "it is fixed) (retrying every 900 s)" in log
    )
    assert (
        f"exec_2_abcdef02: metadata {ws.metadata_path('exec_2_abcdef02')} nests its values "
        "deeper than a JSON reader follows; left as it is" in log
    )
    assert set(ws.objects()) == {"outputs/exec_3_abcdef03/c"}


def test_a_hard_link_to_another_users_file_outside_the_tree_is_never_uploaded(moto_workspace):
    ws = moto_workspace
    secret = ws.root / "someone-elses.key"
    secret.write_bytes(b"a key of another user")
    os.chown(secret, 4321, 4321)
    tree = ws.result("exec_4_abcdef04", {"a": b"a"})
    os.link(secret, tree / "copied-by-link")
    os.symlink("copied-by-link", tree / "alias")  # a symlink is no second name of the file
    mine = ws.root / "shared-mask.bin"
    mine.write_bytes(b"a mask every result shares")
    ws.result("exec_5_abcdef05", {"b": b"b"})
    os.link(mine, ws.outputs / "exec_5_abcdef05" / "mask.bin")  # its owner's own file

    refused = ws.sync("exec_4_abcdef04")
    shared = ws.sync("exec_5_abcdef05")

    assert refused.returncode == 1
    assert refused.stderr.splitlines()[-1].endswith(
        f"exec_4_abcdef04: file {tree / 'copied-by-link'} has a hard link outside the result "
        "folder and another owner than the folder: syncd uploads only the result's own files: "
        "replace it with a copy (the result is published once it is fixed)"
    )
    assert shared.returncode == 0, shared.stderr
    assert ws.objects() == {
        "outputs/exec_5_abcdef05/b": b"b",
        "outputs/exec_5_abcdef05/mask.bin": b"a mask every result shares",
    }


def test_syncds_own_moves_of_a_tree_never_hurry_its_retries(moto_workspace, tmpfs):
    ws = moto_workspace
    ws.settings["syncd"]["delete_local_after_upload"] = True  # moves the tree aside and back
    ws.settings["syncd"]["retry_min_delay"] = 8
    ws.settings["syncd"]["retry_max_delay"] = 8
    ws.settings["syncd"]["metadata_file"] = "meta/{exec_path}.json"
    meta = tmpfs.mount(ws.outputs / "meta", size="1m")
    ws.result("exec_9_abcdef09", {"i": b"i"}, metadata=None)
    filler = tmpfs.fill(meta)
    ws.mark("exec_9_abcdef09")
    daemon = ws.daemon()
    daemon.wait_log("(attempt 1;")
    time.sleep(3)  # within the first backoff (4 to 8 s): no other attempt
    failures = daemon.log().count("exec_9_abcdef09: writing metadata")

    filler.unlink()
    wait_until(lambda: (meta / "exec_9_abcdef09.json").exists(), timeout=30, what="recorded")
    assert daemon.terminate() == 0
    assert failures == 1, daemon.log()
    assert not (ws.outputs / "exec_9_abcdef09").exists()


def test_a_number_too_long_in_metadata_and_odd_claim_names_are_said_once(moto_workspace):
    ws = moto_workspace
    ws.settings["syncd"]["retry_min_delay"] = 0.1
    ws.result("exec_10_abcdef10", {"a": b"a"}, metadata='{"x": ' + "9" * 5000 + "}")
    ws.result("exec_11_abcdef11", {"b": b"b"})
    claims = ws.outputs / ".syncd-claims"
    claims.mkdir()
    (claims / "exec_11_abcdef11.\u00b2").write_text("")  # a digit to str.isdigit, not to int()
    for rel in ("exec_10_abcdef10", "exec_11_abcdef11"):
        ws.mark(rel)

    daemon = ws.daemon()
    wait_until(lambda: ws.recorded("exec_11_abcdef11"), what="the odd claim name left alone")
    daemon.wait_log("exec_10_abcdef10: metadata")
    time.sleep(1)  # ten fast retries, were it transient
    assert daemon.terminate() == 0

    problems = [line for line in daemon.log().splitlines() if "exec_10_abcdef10: metadata" in line]
    assert len(problems) == 1, problems
    assert " ERROR " in problems[0] and "is not valid JSON" in problems[0]
    assert (claims / "exec_11_abcdef11.\u00b2").exists()


@pytest.mark.parametrize(
    ("number", "why"),
    [
        ("1e400", "the number 1e400 is beyond what JSON readers can hold"),
        ("NaN", "NaN is not a JSON value"),
    ],
)
def test_a_number_json_cannot_carry_is_left_as_it_is_not_written_back(moto_workspace, number, why):
    """Python reads 1e400 as inf and NaN as nan; written back they would be Infinity and NaN,
    which no strict JSON reader takes: the file is left, nothing is sent."""
    ws = moto_workspace
    text = '{"status": "completed", "value": ' + number + "}"
    ws.result("exec_12_abcdef12", {"a": b"a"}, metadata=text)

    done = ws.sync("exec_12_abcdef12")

    assert done.returncode == 1
    assert (
        f"exec_12_abcdef12: metadata {ws.metadata_path('exec_12_abcdef12')} is not valid JSON "
        f"({why}); left as it is" in done.stderr
    )
    assert ws.metadata_path("exec_12_abcdef12").read_text() == text
    assert ws.objects() == {}


def test_sync_of_a_tree_written_after_its_marker_says_when_to_run_it_again(moto_workspace):
    ws = moto_workspace
    tree = ws.result("exec_13_abcdef13", {"a": b"a"})
    marker = ws.mark("exec_13_abcdef13")
    an_hour_ago = time.time() - 3600
    os.utime(marker, (an_hour_ago, an_hour_ago))
    (tree / "b").write_bytes(b"b")  # its writer is still at it

    done = ws.sync("exec_13_abcdef13")

    assert done.returncode == 1
    assert re.search(
        r"exec_13_abcdef13: b was written \d s ago, after its marker: its writer may still be at "
        r"it; published once the tree has been left alone for 30 s \(by the daemon, or by syncd "
        r"sync run again then\)",
        done.stderr,
    )
    assert ws.objects() == {}


def test_result_names_no_key_can_hold_are_said_once_and_the_others_are_served(
    moto_workspace, notify_socket
):
    """Workflows name their folders: one that is not UTF-8 (a workflow's or a result's), or
    an empty result whose name holds a newline, never stops the daemon, never reaches the
    journal, and never splits what it tells systemd."""
    ws = moto_workspace
    workflow = ws.outputs / os.fsdecode(b"wf\xff")
    (workflow / "exec_1_abcdef01").mkdir(parents=True)
    (workflow / "exec_1_abcdef01.done").touch()
    (ws.outputs / os.fsdecode(b"exec_2_\xff")).mkdir()
    (ws.outputs / os.fsdecode(b"exec_2_\xff.done")).touch()
    ws.settings["syncd"]["rescan_interval"] = 0.5
    daemon = ws.daemon(env=ws.env(NOTIFY_SOCKET=notify_socket.address))
    daemon.wait_log("syncd watching")
    (ws.outputs / "exec_3_\nWATCHDOG=trigger").mkdir()
    (ws.outputs / "exec_3_\nWATCHDOG=trigger.done").touch()
    ws.result("exec_4_abcdef04", {"a": b"a"})
    ws.mark("exec_4_abcdef04")

    wait_until(lambda: ws.recorded("exec_4_abcdef04"), what="the good result published")
    daemon.wait_log("exec_3_\\nWATCHDOG=trigger cannot be uploaded")
    notify_socket.receive(
        lambda _: "last published exec_4_abcdef04" in "".join(notify_socket.statuses())
    )
    time.sleep(1.5)  # three rescans more: each is said once still

    assert daemon.terminate() == 0
    log = daemon.log()
    for name in ("wf\\xff/exec_1_abcdef01", "exec_2_\\xff", "exec_3_\\nWATCHDOG=trigger"):
        assert log.count(f"ERROR   result folder {ws.outputs}/{name} cannot be uploaded: ") == 1
    assert "not healthy" not in log and "Traceback" not in log
    fields = [line for message in notify_socket.messages for line in message.splitlines()]
    assert {field.partition("=")[0] for field in fields} <= {
        "READY",
        "STATUS",
        "STOPPING",
        "WATCHDOG",
    }
    assert {field for field in fields if field.startswith("WATCHDOG")} == {"WATCHDOG=1"}
    assert list(ws.objects()) == ["outputs/exec_4_abcdef04/a"]
    assert [r["rel"] for r in status_of(ws).values()] == ["exec_4_abcdef04"]


def test_claims_taken_and_released_at_once_never_fail_for_their_shared_folder(tmp_path):
    """Each release removes the claims folder once it is empty, while other workers make it
    again for their own claims: none of them may fail for it."""
    settings = load_settings(flags={"syncd": {"outputs_dir": str(tmp_path)}}, environ={})[0]
    layout = Layout(settings)
    results = [layout.result(PurePosixPath(f"exec_{i}_abcdef{i:02x}")) for i in range(16)]
    failures: list[BaseException] = []

    def claim_often(result: Result) -> None:
        for _ in range(300):
            try:
                claim = claims.try_claim(result, 60)
                assert isinstance(claim, claims.Claim)
                claim.release()
            except BaseException as exc:
                failures.append(exc)
                return

    with ThreadPoolExecutor(len(results)) as pool:
        list(pool.map(claim_often, results))

    assert failures == []
