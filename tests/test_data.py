"""Nobody loses a result: delete_local_after_upload deletes only what the bucket holds, the
signed prefix serves exactly output_files, metadata cannot be put inside the tree, and one bad
metadata value never stops the renewal of the others' URLs."""

from __future__ import annotations

import json
import os
import time

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
