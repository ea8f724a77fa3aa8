"""The metadata rewrite: fields kept, missing files created, malformed files never touched."""

from __future__ import annotations

import json
import os
import stat
from pathlib import PurePosixPath

from syncd import metadata
from syncd.config import load_settings
from syncd.layout import Layout
from tests.conftest import md5

RECORDED = ("storage_type", "signed_url", "remote_path", "output_files")

EARTH2STUDIO = {
    "request_id": "exec_1769560728_10ed9d3c",
    "status": "completed",
    "completion_time": "2026-01-28T00:39:10",
    "execution_time_seconds": 12.5,
    "created_at": "2026-01-28T00:38:48",
    "peak_memory_usage": "2.1 GB",
    "device": "cuda:0",
    "parameters": {"start_time": ["2025-08-21T06:00:00"], "nsteps": 4},
    "output_files": [{"path": "exec_1769560728_10ed9d3c/results.zarr/.zgroup", "size": 24}],
    "storage_type": "server",
    "workflow_name": "deterministic_earth2_workflow",
    "workflow_type": "custom",
    "signed_url": None,
    "remote_path": None,
}


def test_every_existing_field_is_kept_and_the_four_are_set(moto_workspace):
    ws = moto_workspace
    ws.result("exec_1769560728_10ed9d3c", {"results.zarr/.zgroup": b"{}"}, metadata=EARTH2STUDIO)

    assert ws.sync("exec_1769560728_10ed9d3c").returncode == 0

    meta = ws.metadata("exec_1769560728_10ed9d3c")
    kept = {k: v for k, v in EARTH2STUDIO.items() if k not in RECORDED}
    assert {k: meta[k] for k in kept} == kept
    assert list(meta)[: len(EARTH2STUDIO)] == list(EARTH2STUDIO)  # order kept too
    assert meta["storage_type"] == "s3"
    assert meta["remote_path"] == "outputs/exec_1769560728_10ed9d3c"
    assert meta["signed_url"].startswith(
        "https://d111111abcdef8.cloudfront.net/outputs/exec_1769560728_10ed9d3c/*?Policy="
    )
    assert meta["output_files"] == [
        {"path": "exec_1769560728_10ed9d3c/results.zarr/.zgroup", "size": 2, "md5": md5(b"{}")}
    ]


def test_missing_metadata_is_created(moto_workspace):
    ws = moto_workspace
    ws.result("wf/exec_2_abcdef01", {"a.bin": b"abc"}, metadata=None)

    assert ws.sync("wf/exec_2_abcdef01").returncode == 0

    meta = ws.metadata("wf/exec_2_abcdef01")
    assert meta["request_id"] == "exec_2_abcdef01"
    assert meta["status"] == "completed"
    assert meta["storage_type"] == "s3"
    assert meta["remote_path"] == "outputs/wf/exec_2_abcdef01"
    assert meta["output_files"] == [
        {"path": "exec_2_abcdef01/a.bin", "size": 3, "md5": md5(b"abc")}
    ]


def test_malformed_metadata_is_left_byte_for_byte_and_named(moto_workspace):
    ws = moto_workspace
    for rel, text in {
        "exec_3_abcdef01": '{"request_id": "exec_3", "status": ',
        "exec_4_abcdef01": '["a", "list"]',
        "exec_5_abcdef01": "",
    }.items():
        ws.result(rel, {"a.bin": b"abc"}, metadata=text)
        before = ws.metadata_path(rel).read_bytes()

        done = ws.sync(rel)

        assert done.returncode == 1
        assert ws.metadata_path(rel).read_bytes() == before
        errors = [line for line in done.stderr.splitlines() if "ERROR" in line]
        assert len(errors) == 1
        assert f"metadata {ws.metadata_path(rel)} is not" in errors[0]
        assert "left as it is" in errors[0]
    assert ws.objects() == {}  # nothing uploaded for a result that cannot be recorded
    assert sorted(p.name for p in ws.outputs.iterdir() if p.name.startswith(".")) == []


def result_in(outputs):
    """The result exec_1 of an outputs dir, as the daemon's layout names it."""
    settings = load_settings(environ={"SYNCD_OUTPUTS_DIR": str(outputs)})[0]
    return Layout(settings).result(PurePosixPath("exec_1"))


def test_write_is_atomic_and_keeps_the_file_mode(tmp_path):
    path = tmp_path / "exec_1.json"
    path.write_text(json.dumps({"a": 1}))
    path.chmod(0o640)
    inode_before = path.stat().st_ino

    metadata.write_atomic(result_in(tmp_path), {"a": 1, "storage_type": "s3"})

    assert json.loads(path.read_text()) == {"a": 1, "storage_type": "s3"}
    assert stat.S_IMODE(path.stat().st_mode) == 0o640
    assert path.stat().st_ino != inode_before  # replaced by rename, not rewritten in place
    assert os.listdir(tmp_path) == ["exec_1.json"]


def test_a_failed_write_leaves_the_old_file_and_no_temp_file(tmp_path):
    path = tmp_path / "exec_1.json"
    path.write_text('{"a": 1}')

    class Unserialisable:
        pass

    try:
        metadata.write_atomic(result_in(tmp_path), {"a": Unserialisable()})
    except TypeError:
        pass
    else:
        raise AssertionError("expected a TypeError")
    assert path.read_text() == '{"a": 1}'
    assert os.listdir(tmp_path) == ["exec_1.json"]
