"""Nobody loses a result: delete_local_after_upload deletes only what the bucket holds, the
signed prefix serves exactly output_files, metadata cannot be put inside the tree, and one bad
metadata value never stops the renewal of the others' URLs."""

from __future__ import annotations

import json
import os
import time

import requests

from syncd.policy import expiry
from tests.cloudfront import file_url
from tests.conftest import status_of
from tests.proxy import Proxy
from tests.servers import wait_until

MiB = 1024 * 1024


def test_a_file_written_after_the_upload_blocks_the_local_deletion(moto_workspace):
    ws = moto_workspace
    ws.settings["syncd"]["delete_local_after_upload"] = True
    ws.settings["syncd"]["retry_min_delay"] = 0.2
    tree = ws.result("exec_1_abcdef01", {"a.bin": os.urandom(1000)})
    ws.mark("exec_1_abcdef01")
    late = os.urandom(2000)
    # Listings pass a slow link, so the file lands after the upload, before the deletion.
    with Proxy(ws.server.port, delay_listings=3.0) as proxy:
        ws.settings["object_storage"]["endpoint_url"] = proxy.endpoint
        daemon = ws.daemon()
        wait_until(lambda: ws.objects(), what="the first upload in the bucket")

        (tree / "late.bin").write_bytes(late)

        wait_until(lambda: ws.recorded("exec_1_abcdef01"), timeout=60)
        assert daemon.terminate() == 0
    assert "files appeared or changed after the upload; the local tree is kept" in daemon.log()
    assert ws.objects()["outputs/exec_1_abcdef01/late.bin"] == late
    assert sorted(f["path"] for f in ws.metadata("exec_1_abcdef01")["output_files"]) == [
        "exec_1_abcdef01/a.bin",
        "exec_1_abcdef01/late.bin",
    ]
    assert not tree.exists()


def test_a_metadata_file_inside_the_result_tree_is_refused_at_start(moto_workspace):
    ws = moto_workspace
    ws.settings["syncd"]["metadata_file"] = "{exec_path}/metadata.json"

    done = ws.syncd("run", "--config", str(ws.config))

    assert done.returncode == 2
    assert done.stderr.splitlines()[-1] == (
        "syncd: error: invalid setting syncd.metadata_file (in "
        f"{ws.root / 'config-1.yaml'}) = '{{exec_path}}/metadata.json': puts the metadata "
        "inside the result tree, where it would be uploaded as part of the result: put it "
        "beside the tree, e.g. {exec_path}.json"
    )


def test_objects_an_earlier_attempt_left_are_removed_before_recording(moto_workspace):
    ws = moto_workspace
    ws.result("exec_2_abcdef02", {"kept.bin": b"kept"})
    s3 = ws.server.client()
    # A killed daemon uploaded a file the workflow has since removed from the tree.
    s3.put_object(Bucket=ws.bucket, Key="outputs/exec_2_abcdef02/removed.bin", Body=b"old")
    s3.put_object(Bucket=ws.bucket, Key="outputs/exec_2_abcdef02_other/x", Body=b"other")
    claim = ws.outputs / ".syncd-claims" / "exec_2_abcdef02.1"
    claim.parent.mkdir()
    claim.write_text('{"owner": "deadhost:4242:0badc0de"}')
    os.utime(claim, (time.time() - 3600, time.time() - 3600))
    ws.mark("exec_2_abcdef02")

    daemon = ws.daemon()

    wait_until(lambda: ws.recorded("exec_2_abcdef02"))
    assert daemon.terminate() == 0
    assert ws.objects() == {
        "outputs/exec_2_abcdef02/kept.bin": b"kept",
        "outputs/exec_2_abcdef02_other/x": b"other",  # another prefix: not this result's
    }
    assert "deleted 1 objects an earlier attempt left that are not in the tree" in daemon.log()


def test_a_bad_metadata_value_never_stops_the_renewal_of_the_others(moto_workspace):
    ws = moto_workspace
    ws.settings["object_storage"]["signed_url_expires_in"] = 4
    ws.settings["syncd"]["resign_fraction"] = 0.5  # renew with 2 s left
    for rel in ("exec_3_abcdef03", "exec_4_abcdef04"):
        ws.result(rel, {"a": b"a"})
        ws.mark(rel)
    daemon = ws.daemon()
    wait_until(lambda: ws.recorded("exec_3_abcdef03") and ws.recorded("exec_4_abcdef04"))
    bad = ws.metadata("exec_3_abcdef03")
    text = json.dumps(bad)[:-1] + ', "note": "\\ud800"}'  # a lone surrogate, as JSON allows
    ws.metadata_path("exec_3_abcdef03").write_text(text)
    urls = {rel: ws.metadata(rel)["signed_url"] for rel in ("exec_3_abcdef03", "exec_4_abcdef04")}

    def renewed_twice(rel: str) -> bool:
        return daemon.log().count(f"{rel}: signed URL renewed until") >= 2

    wait_until(lambda: renewed_twice("exec_4_abcdef04"), timeout=20, what="renewals go on")
    wait_until(lambda: renewed_twice("exec_3_abcdef03"), timeout=20, what="the bad one too")
    assert daemon.terminate() == 0
    assert ws.metadata("exec_3_abcdef03")["note"] == "\ud800"
    assert ws.metadata("exec_3_abcdef03")["signed_url"] != urls["exec_3_abcdef03"]
    assert ws.metadata("exec_4_abcdef04")["signed_url"] != urls["exec_4_abcdef04"]


def test_nothing_is_done_after_syncd_says_it_stopped(moto_workspace):
    """A stop in the middle of renewing signed URLs: the rewrite begun ends, and only then
    does syncd say it stopped."""
    ws = moto_workspace
    ws.settings["object_storage"]["signed_url_expires_in"] = 4
    ws.settings["syncd"]["resign_fraction"] = 0.5  # renew with 2 s left: every second
    rels = [f"exec_{i}_abcdef{i:02d}" for i in range(10, 210)]
    for rel in rels:
        ws.result(rel, {"a": b"a"})
        ws.mark(rel)
    daemon = ws.daemon()
    wait_until(lambda: all(ws.recorded(rel) for rel in rels), timeout=120)
    wait_until(lambda: "signed URL renewed" in daemon.log(), interval=0.001, what="renewing")
    assert daemon.terminate() == 0

    lines = daemon.log().splitlines()
    assert "syncd stopped;" in lines[-1]


def test_status_and_sync_never_print_a_traceback(moto_workspace):
    ws = moto_workspace
    state = ws.root / "state"
    state.mkdir()
    (state / "state.db").write_bytes(b"garbage" * 1000)
    for command in (["status"], ["status", "--json"]):
        done = ws.syncd(*command, "--config", str(ws.config))
        assert "Traceback" not in done.stderr
        assert done.returncode == 1
        assert done.stderr.startswith(f"syncd: error: state database {state / 'state.db'}: ")
    ws.result("exec_5_abcdef05", {"a": b"a"})
    done = ws.sync("exec_5_abcdef05")
    assert "Traceback" not in done.stderr


def test_a_recorded_result_marked_again_after_a_change_is_said_never_republished(moto_workspace):
    ws = moto_workspace
    chunk = os.urandom(5000)
    tree = ws.result("exec_6_abcdef06", {"t2m/0.0": chunk, "t2m/.zarray": b"{}"})
    ws.mark("exec_6_abcdef06")
    daemon = ws.daemon()
    wait_until(lambda: ws.recorded("exec_6_abcdef06"))
    published = ws.metadata_path("exec_6_abcdef06").read_bytes()
    ws.mark("exec_6_abcdef06")
    daemon.wait_log("already published and unchanged")

    (tree / "t2m/0.0").write_bytes(os.urandom(5000))  # the same size, other bytes
    ws.mark("exec_6_abcdef06")
    daemon.wait_log("marked again, but")
    (tree / "t2m/0.0").write_bytes(chunk)
    (tree / "t2m/1.0").write_bytes(b"appended")
    ws.mark("exec_6_abcdef06")
    daemon.wait_log("files were added")

    assert daemon.terminate() == 0
    said = [line for line in daemon.log().splitlines() if "marked again" in line]
    assert [line.split(" ", 3)[2] for line in said] == ["INFO", "WARNING", "WARNING"]
    assert said[0].endswith("exec_6_abcdef06: marked again; already published and unchanged")
    assert said[1].endswith(
        "exec_6_abcdef06: marked again, but t2m/0.0 changed since the result was published to "
        "outputs/exec_6_abcdef06, and readers and CDNs may keep the published bytes for a year "
        "(Cache-Control: immutable), so they are never replaced under the same name: publish "
        "the new tree as a new result (copy the folder to a new exec_* name); it stays as "
        "published"
    )
    assert said[2].endswith(
        "exec_6_abcdef06: marked again, and 1 files were added or rewritten (Zarr metadata) "
        "since it was published to outputs/exec_6_abcdef06; it stays as published: "
        f"`syncd sync {tree}` publishes the change"
    )
    assert ws.objects()["outputs/exec_6_abcdef06/t2m/0.0"] == chunk
    assert "outputs/exec_6_abcdef06/t2m/1.0" not in ws.objects()
    assert ws.metadata_path("exec_6_abcdef06").read_bytes() == published


def test_the_server_finishing_a_result_published_early_says_what_it_added(moto_workspace):
    """Beside the server: a result published by hand while it ran, then written to, then
    finished by the server (metadata `completed`, without syncd's record): the record comes
    back as published, and the files it lacks are said, never recorded as if published."""
    ws = moto_workspace
    ws.settings["syncd"]["completion"] = "metadata"
    ws.settings["syncd"]["metadata_file"] = "metadata_{workflow}:{exec}.json"
    running = {"request_id": "exec_7_abcdef07", "status": "running"}
    tree = ws.result("wf/exec_7_abcdef07", {"t2m/0.0": b"early"}, metadata=running)
    assert ws.sync("wf/exec_7_abcdef07").returncode == 0
    daemon = ws.daemon()
    daemon.wait_log("syncd watching")

    (tree / "t2m/1.0").write_bytes(b"late")
    ws.metadata_path("wf/exec_7_abcdef07").write_text(
        json.dumps({"request_id": "exec_7_abcdef07", "status": "completed", "new": "field"})
    )
    daemon.wait_log("files were added")

    assert daemon.terminate() == 0
    (said,) = [line for line in daemon.log().splitlines() if "written again" in line]
    assert said.split(" ", 3)[2] == "WARNING"
    assert said.endswith(
        "exec_7_abcdef07: its metadata was written again, and 1 files were added or rewritten "
        "(Zarr metadata) since it was published to outputs/wf/exec_7_abcdef07; it stays as "
        f"published: `syncd sync {tree}` publishes the change"
    )
    recorded = ws.metadata("wf/exec_7_abcdef07")
    assert [f["path"] for f in recorded["output_files"]] == ["exec_7_abcdef07/t2m/0.0"]
    assert recorded["new"] == "field"
    assert set(ws.objects()) == {"outputs/wf/exec_7_abcdef07/t2m/0.0"}


def test_sync_publishes_a_change_sends_nothing_for_none_and_never_replaces_a_chunk(moto_workspace):
    ws = moto_workspace
    chunk = os.urandom(5000)
    tree = ws.result("exec_7_abcdef07", {"t2m/0.0": chunk, "t2m/.zarray": b"{}"})
    assert ws.sync("exec_7_abcdef07").returncode == 0
    s3 = ws.server.client()
    s3.delete_object(Bucket=ws.bucket, Key="outputs/exec_7_abcdef07/t2m/.zarray")

    unchanged = ws.sync("exec_7_abcdef07")  # nothing to send: the bucket is not looked at
    assert unchanged.returncode == 0
    assert (
        "exec_7_abcdef07: already published to outputs/exec_7_abcdef07 and unchanged since; "
        "nothing sent (`syncd sync --force` sends it again)" in unchanged.stderr
    )
    assert "outputs/exec_7_abcdef07/t2m/.zarray" not in ws.objects()
    assert ws.syncd("sync", "--force", "--config", str(ws.config), str(tree)).returncode == 0
    assert ws.objects()["outputs/exec_7_abcdef07/t2m/.zarray"] == b"{}"

    (tree / "t2m/1.0").write_bytes(b"appended")
    (tree / "t2m/.zarray").write_bytes(b'{"shape": [2]}')
    assert ws.sync("exec_7_abcdef07").returncode == 0
    assert ws.objects()["outputs/exec_7_abcdef07/t2m/1.0"] == b"appended"
    paths = [f["path"] for f in ws.metadata("exec_7_abcdef07")["output_files"]]
    assert "exec_7_abcdef07/t2m/1.0" in paths

    (tree / "t2m/1.0").unlink()  # lost locally: the bucket holds the only copy
    lost = ws.sync("exec_7_abcdef07")
    assert lost.returncode == 1
    assert lost.stderr.splitlines()[-1].endswith(
        "exec_7_abcdef07: t2m/1.0 were published to outputs/exec_7_abcdef07 and are not in the "
        "tree any more, and syncd never deletes a published file: restore them, or publish the "
        "new tree as a new result (copy the folder to a new exec_* name)"
    )
    assert ws.objects()["outputs/exec_7_abcdef07/t2m/1.0"] == b"appended"
    (tree / "t2m/1.0").write_bytes(b"appended")

    (tree / "t2m/0.0").write_bytes(os.urandom(4000))
    for args in ((), ("--force",)):
        refused = ws.syncd("sync", *args, "--config", str(ws.config), str(tree))
        assert refused.returncode == 1
        assert refused.stderr.splitlines()[-1].endswith(
            "exec_7_abcdef07: t2m/0.0 changed since the result was published to "
            "outputs/exec_7_abcdef07, and readers and CDNs may keep the published bytes for a "
            "year (Cache-Control: immutable), so they are never replaced under the same name: "
            "publish the new tree as a new result (copy the folder to a new exec_* name)"
        )
    assert ws.objects()["outputs/exec_7_abcdef07/t2m/0.0"] == chunk
    assert status_of(ws)["exec_7_abcdef07"]["state"] == "done"  # still published as it was


def test_a_tree_that_cannot_be_removed_after_publishing_is_said_not_failed(moto_workspace, tmpfs):
    ws = moto_workspace
    ws.settings["syncd"]["delete_local_after_upload"] = True
    tree = ws.result("exec_8_abcdef08", {"a.bin": b"a"})
    mounted = tmpfs.mount(tree / "ro", size="1m")
    (mounted / "b.bin").write_bytes(b"b")
    tmpfs.read_only(mounted)
    aside = ws.outputs / ".exec_8_abcdef08.deleting"
    tmpfs.mounted.append(aside / "ro")  # where the mount is once the tree is moved aside

    done = ws.sync("exec_8_abcdef08")

    assert done.returncode == 0, done.stderr
    assert ws.recorded("exec_8_abcdef08")
    assert set(ws.objects()) == {
        "outputs/exec_8_abcdef08/a.bin",
        "outputs/exec_8_abcdef08/ro/b.bin",
    }
    assert (
        f"exec_8_abcdef08: published, but the local tree moved aside to {aside} cannot be "
        "removed (Read-only file system): remove it by hand (delete_local_after_upload)"
        in done.stderr
    )


def test_a_tree_that_is_a_mount_point_is_recorded_and_kept(moto_workspace, tmpfs):
    ws = moto_workspace
    ws.settings["syncd"]["delete_local_after_upload"] = True
    tree = tmpfs.mount(ws.outputs / "exec_6_abcdef06", size="1m")
    ws.result("exec_6_abcdef06", {"a.bin": b"a"})
    ws.mark("exec_6_abcdef06")

    daemon = ws.daemon()
    wait_until(lambda: ws.recorded("exec_6_abcdef06"), what="recorded")
    assert daemon.terminate() == 0

    assert ws.objects() == {"outputs/exec_6_abcdef06/a.bin": b"a"}
    assert (tree / "a.bin").read_bytes() == b"a"
    assert (
        f"exec_6_abcdef06: published, but its local tree {tree} is a mount point and cannot be "
        "moved aside to be removed: unmount it and remove it by hand (delete_local_after_upload)"
        in daemon.log()
    )
    assert "retrying" not in daemon.log()


def test_a_prefix_change_keeps_the_records_of_trees_deleted_after_publishing(moto_workspace):
    ws = moto_workspace
    ws.settings["syncd"]["delete_local_after_upload"] = True
    ws.result("wf/exec_9_abcdef09", {"f": b"f"})
    assert ws.sync("wf/exec_9_abcdef09").returncode == 0  # the tree is gone now
    ws.mark("wf/exec_9_abcdef09")
    published = ws.metadata_path("wf/exec_9_abcdef09").read_bytes()

    ws.settings["object_storage"]["prefix"] = "migrated"
    moved = ws.daemon()
    moved.wait_log("so it stays there")
    assert moved.terminate() == 0
    assert ws.metadata_path("wf/exec_9_abcdef09").read_bytes() == published
    assert "has no result folder" not in moved.log()

    ws.settings["object_storage"]["prefix"] = "outputs"  # back; the server writes its own view
    back = ws.daemon()
    back.wait_log("syncd watching")
    ws.metadata_path("wf/exec_9_abcdef09").write_text(
        json.dumps({"request_id": "exec_9_abcdef09", "status": "completed", "storage_type": "x"})
    )
    wait_until(lambda: ws.recorded("wf/exec_9_abcdef09"), what="the record restored")
    assert back.terminate() == 0
    assert ws.metadata("wf/exec_9_abcdef09")["remote_path"] == "outputs/wf/exec_9_abcdef09"
    assert "restored the record (1 files in outputs/wf/exec_9_abcdef09)" in back.log()


def test_a_record_that_stays_under_an_earlier_prefix_keeps_a_url_that_serves(
    moto_workspace, signing_key
):
    ws = moto_workspace
    ws.settings["syncd"]["delete_local_after_upload"] = True
    ws.settings["object_storage"]["signed_url_expires_in"] = 4
    ws.settings["syncd"]["resign_fraction"] = 0.5  # renew with 2 s left
    with ws.cloudfront(signing_key[1]) as cloudfront:
        ws.result("exec_8_abcdef08", {"a.txt": b"a"})
        assert ws.sync("exec_8_abcdef08").returncode == 0  # the tree is gone now
        ws.mark("exec_8_abcdef08")
        first = ws.metadata("exec_8_abcdef08")["signed_url"]
        first_expiry = expiry(first)
        assert first_expiry is not None

        ws.settings["object_storage"]["prefix"] = "migrated"
        moved = ws.daemon()
        moved.wait_log("so it stays there")
        renewed = ws.renewed_url("exec_8_abcdef08", first_expiry)
        served = requests.get(file_url(renewed, "a.txt"), timeout=10)
        assert moved.terminate() == 0

    assert served.status_code == 200 and served.content == b"a"
    assert cloudfront.refusals == []
    meta = ws.metadata("exec_8_abcdef08")
    assert meta["remote_path"] == "outputs/exec_8_abcdef08"
    assert "exec_8_abcdef08: signed URL renewed until" in moved.log()
    assert ws.objects("migrated/") == {}


def test_a_prefix_changed_and_changed_back_never_overwrites_what_was_published_there(
    moto_workspace,
):
    """Published under p1, rewritten locally, published anew under p2: back at p1 the bucket
    keeps p1's bytes (immutable) and the metadata gets p1's record back."""
    ws = moto_workspace
    ws.settings["object_storage"]["prefix"] = "p1"
    ws.result("exec_4_abcdef04", {"t2m/0": b"first"})
    ws.mark("exec_4_abcdef04")
    first = ws.daemon()
    wait_until(lambda: ws.recorded("exec_4_abcdef04"), what="recorded under p1/")
    assert first.terminate() == 0
    published = ws.metadata("exec_4_abcdef04")["output_files"]
    chunk = ws.outputs / "exec_4_abcdef04" / "t2m" / "0"
    chunk.write_bytes(b"other")
    before = (ws.outputs / "exec_4_abcdef04.done").stat().st_mtime - 60
    os.utime(chunk, (before, before))  # not a writer still at it: published at once

    ws.settings["object_storage"]["prefix"] = "p2"
    second = ws.daemon()
    wait_until(
        lambda: ws.metadata("exec_4_abcdef04")["remote_path"] == "p2/exec_4_abcdef04",
        what="published anew under p2/",
    )
    assert second.terminate() == 0

    ws.settings["object_storage"]["prefix"] = "p1"
    back = ws.daemon()
    wait_until(
        lambda: ws.metadata("exec_4_abcdef04")["remote_path"] == "p1/exec_4_abcdef04",
        what="p1's record restored",
    )
    back.wait_log("restored the record it made under this prefix (1 files in p1/exec_4_abcdef04)")
    assert back.terminate() == 0
    assert ws.objects("p1/") == {"p1/exec_4_abcdef04/t2m/0": b"first"}
    assert ws.objects("p2/") == {"p2/exec_4_abcdef04/t2m/0": b"other"}
    assert ws.metadata("exec_4_abcdef04")["output_files"] == published
    assert "uploaded" not in back.log()


def test_a_prefix_that_comes_back_after_the_tree_was_deleted_gets_its_record_back(
    moto_workspace,
):
    ws = moto_workspace
    ws.settings["object_storage"]["prefix"] = "p1"
    ws.result("exec_5_abcdef05", {"a": b"a"})
    ws.mark("exec_5_abcdef05")
    first = ws.daemon()
    wait_until(lambda: ws.recorded("exec_5_abcdef05"), what="recorded under p1/")
    assert first.terminate() == 0

    ws.settings["object_storage"]["prefix"] = "p2"
    ws.settings["syncd"]["delete_local_after_upload"] = True
    second = ws.daemon()
    wait_until(
        lambda: (
            ws.metadata("exec_5_abcdef05")["remote_path"] == "p2/exec_5_abcdef05"
            and not (ws.outputs / "exec_5_abcdef05").exists()
        ),
        what="published anew under p2/ and the tree deleted",
    )
    assert second.terminate() == 0

    ws.settings["object_storage"]["prefix"] = "p1"
    back = ws.daemon()
    wait_until(
        lambda: ws.metadata("exec_5_abcdef05")["remote_path"] == "p1/exec_5_abcdef05",
        what="p1's record restored",
    )
    assert back.terminate() == 0
    assert "restored the record it made under this prefix (1 files in p1/exec_5_abcdef05)" in (
        back.log()
    )
    assert ws.objects("p1/") == {"p1/exec_5_abcdef05/a": b"a"}
