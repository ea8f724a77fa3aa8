"""Beside an unmodified Earth2Studio server: results it finishes without a marker, its names
and config file, its later rewrites of the metadata, and its own client (earth2studio 0.19.0
from PyPI) reading what syncd published."""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

import pytest
import requests
import xarray as xr
from earth2studio.serve.client.client import Earth2StudioClient
from earth2studio.serve.client.fsspec_utils import create_cloudfront_mapper
from earth2studio.serve.client.models import InferenceRequestResults, StorageType

from syncd.client import open_dataset
from syncd.policy import expiry
from tests.cloudfront import file_url, verify
from tests.conftest import (
    KEY_PAIR_ID,
    SYNCD,
    DaemonProcess,
    Workspace,
    forecast,
    md5,
    status_of,
)
from tests.servers import KEY, SECRET, wait_until
from tests.test_config import SERVER_CONFIG, pem

WORKFLOW = "deterministic_earth2_workflow"
EXEC = "exec_1769560728_10ed9d3c"
REL = f"{WORKFLOW}/{EXEC}"
SERVER_LAYOUT = "metadata_{workflow}:{exec}.json"


class Server:
    """Writes results as the Earth2Studio server does (`process_finalize_metadata`): the tree
    first, then `metadata_<workflow>:<exec>.json` with a plain open("w") and json.dump(indent=2)
    (here in two writes with a pause between, so a reader can find half a file), and later,
    maybe, the same file again with its own view (storage_type "server")."""

    def __init__(self, ws: Workspace) -> None:
        self.ws = ws

    def tree(self, rel: str, zarr_format: int | None = None) -> Path:
        """The tree: a real Zarr store of a forecast, or a few plain files."""
        if zarr_format is None:
            return self.ws.result(rel, metadata=None)
        tree = self.ws.result(rel, {}, metadata=None)
        forecast().to_zarr(
            tree / "results.zarr",
            consolidated=True,
            zarr_format=zarr_format,
            encoding={"t2m": {"chunks": (1, 16, 32)}},
        )
        return tree

    def document(self, rel: str, status: str = "completed", **extra: Any) -> dict[str, Any]:
        workflow, _, name = rel.rpartition("/")
        tree = self.ws.outputs / rel
        files = sorted(p for p in tree.rglob("*") if p.is_file()) if tree.is_dir() else []
        return {
            "request_id": f"{workflow}:{name}",
            "status": status,
            "completion_time": "2026-12-04T12:00:00+00:00",
            "execution_time_seconds": 12.5,
            "created_at": "2026-12-04T11:59:47+00:00",
            "peak_memory_usage": "3.2 GB",
            "device": "cuda:0",
            "parameters": {"start_time": ["2025-08-21T06:00:00"], "nsteps": 2},
            "output_files": [
                {"path": f"{name}/{p.relative_to(tree).as_posix()}", "size": p.stat().st_size}
                for p in files
            ],
            "storage_type": "server",
            **extra,
        }

    def write(self, rel: str, document: dict[str, Any], pause: float = 0.3) -> None:
        text = json.dumps(document, indent=2)
        with open(self.ws.metadata_path(rel), "w") as f:
            f.write(text[: len(text) // 2])
            f.flush()
            time.sleep(pause)  # the server's own pace, not a wait for syncd
            f.write(text[len(text) // 2 :])

    def finish(self, rel: str, zarr_format: int | None = None) -> Path:
        tree = self.tree(rel, zarr_format)
        self.write(rel, self.document(rel))
        return tree


@pytest.fixture
def beside(moto_workspace) -> Workspace:
    """A workspace laid out as the server lays out its outputs, completion by metadata."""
    ws = moto_workspace
    ws.settings["syncd"].update(completion="metadata", metadata_file=SERVER_LAYOUT)
    return ws


def local_files(tree: Path) -> dict[str, bytes]:
    return {p.relative_to(tree).as_posix(): p.read_bytes() for p in tree.rglob("*") if p.is_file()}


def warnings_and_errors(log: str) -> list[str]:
    return [line for line in log.splitlines() if " WARNING " in line or " ERROR " in line]


@pytest.mark.parametrize("rust", [True, False], ids=["obstore", "s3fs"])
def test_a_result_the_server_finishes_is_published_without_a_marker(workspace, signing_key, rust):
    ws = workspace
    ws.settings["object_storage"]["use_rust_client"] = rust
    ws.settings["syncd"].update(
        completion="metadata", metadata_file=SERVER_LAYOUT, log_level="DEBUG"
    )
    server = Server(ws)
    daemon = ws.daemon()
    daemon.wait_log("syncd watching")
    tree = server.tree(REL)
    server.write(REL, server.document(REL, status="running"))
    daemon.wait_log(f"{EXEC}: not finished: its metadata says status 'running'")
    assert ws.objects() == {}

    server.write(REL, server.document(REL), pause=0.5)

    wait_until(lambda: ws.recorded(REL), what="the result recorded")
    assert daemon.terminate() == 0
    assert ws.objects() == {
        f"outputs/{REL}/{path}": data for path, data in local_files(tree).items()
    }
    meta = ws.metadata(REL)
    server_view = server.document(REL)
    for field in ("request_id", "status", "completion_time", "parameters", "device"):
        assert meta[field] == server_view[field]
    assert meta["storage_type"] == "s3"
    assert meta["remote_path"] == f"outputs/{REL}"
    # The server's own entries, each with the MD5 of the bytes syncd sent.
    local = local_files(tree)
    assert [{"path": f["path"], "size": f["size"]} for f in meta["output_files"]] == server_view[
        "output_files"
    ]
    assert all(f["md5"] == md5(local[f["path"].split("/", 1)[1]]) for f in meta["output_files"])
    policy = verify(
        file_url(meta["signed_url"], "results.zarr/.zgroup"),
        {KEY_PAIR_ID: signing_key[1].public_key()},
    )
    assert policy["Statement"][0]["Resource"].endswith(f"/outputs/{REL}/*")
    assert warnings_and_errors(daemon.log()) == []
    assert "forgotten" not in daemon.log()  # "running", then half a file: both quietly
    assert not list(ws.outputs.glob("*.done"))


@pytest.mark.parametrize("completion", ["metadata", "marker"])
@pytest.mark.parametrize("delete_local", [False, True], ids=["kept", "deleted"])
def test_the_servers_rewrite_is_restored_without_uploading_again(
    moto_workspace, signing_key, completion, delete_local
):
    ws = moto_workspace
    ws.settings["syncd"].update(
        completion=completion, metadata_file=SERVER_LAYOUT, delete_local_after_upload=delete_local
    )
    server = Server(ws)
    with ws.cloudfront(signing_key[1]) as cloudfront:
        daemon = ws.daemon()
        daemon.wait_log("syncd watching")
        tree = server.finish(REL)
        files = local_files(tree)
        if completion == "marker":
            ws.mark(REL)
        wait_until(lambda: ws.recorded(REL), what="the result recorded")
        recorded = ws.metadata(REL)
        if delete_local:
            wait_until(lambda: not tree.exists(), what="the local tree deleted")

        # The server writes its own view again: no record, and a field it added since.
        server.write(REL, server.document(REL, zip_created_at="2026-12-04T12:00:05+00:00"))

        wait_until(
            lambda: ws.recorded(REL) and "zip_created_at" in ws.metadata(REL),
            timeout=10,
            what="the record restored beside the server's new field",
        )
        meta = ws.metadata(REL)
        served = requests.get(file_url(meta["signed_url"], "results.zarr/.zgroup"), timeout=10)
        assert daemon.terminate() == 0

    assert served.content == files["results.zarr/.zgroup"]
    assert cloudfront.refusals == []
    assert meta["remote_path"] == recorded["remote_path"] == f"outputs/{REL}"
    assert meta["output_files"] == recorded["output_files"]
    assert meta["zip_created_at"] == "2026-12-04T12:00:05+00:00"
    assert meta["request_id"] == f"{WORKFLOW}:{EXEC}"
    assert ws.objects() == {f"outputs/{REL}/{path}": data for path, data in files.items()}
    assert tree.exists() is not delete_local
    log = daemon.log()
    assert log.count(f"{EXEC}: uploading ") == 1
    assert log.count(f"{EXEC}: its metadata {ws.metadata_path(REL)} was written without") == 1
    assert warnings_and_errors(log) == []


def rewritten_while_stopped(ws: Workspace) -> dict[str, Any]:
    """Publish a result (its tree deleted after upload), stop syncd, and let the server write
    its own view of the metadata; returns the metadata as syncd had recorded it."""
    ws.settings["syncd"]["delete_local_after_upload"] = True
    server = Server(ws)
    tree = server.finish(REL)
    first = ws.daemon()
    wait_until(lambda: ws.recorded(REL) and not tree.exists(), what="recorded, tree deleted")
    recorded = ws.metadata(REL)
    assert first.terminate() == 0
    server.write(REL, server.document(REL))  # its own view, listing no files: the tree is gone
    assert not ws.recorded(REL)
    return recorded


def test_a_rewrite_while_syncd_is_stopped_is_restored_at_start(beside):
    ws = beside
    recorded = rewritten_while_stopped(ws)

    second = ws.daemon()

    wait_until(lambda: ws.recorded(REL), what="the record restored after the restart")
    assert status_of(ws)[REL]["state"] == "done"
    assert second.terminate() == 0
    assert ws.metadata(REL)["output_files"] == recorded["output_files"]
    assert f"{EXEC}: uploading" not in second.log()
    assert f"{EXEC}: its metadata" in second.log()


def test_a_restore_on_a_full_disk_keeps_the_record_until_there_is_room(beside, tmpfs):
    ws = beside
    tmpfs.mount(ws.outputs, size="2m")
    recorded = rewritten_while_stopped(ws)
    filler = tmpfs.fill(ws.outputs)

    second = ws.daemon()
    second.wait_log("its filesystem is full: free space; syncd resumes by itself")
    assert not ws.recorded(REL)
    filler.unlink()

    wait_until(lambda: ws.recorded(REL), what="the record restored once there is room")
    assert second.terminate() == 0
    assert ws.metadata(REL)["output_files"] == recorded["output_files"]
    assert f"{EXEC}: uploading" not in second.log()


def test_a_result_completed_while_syncd_was_stopped_is_published_at_start(beside):
    ws = beside
    ws.settings["syncd"]["log_level"] = "DEBUG"
    server = Server(ws)
    tree = server.tree(REL)
    server.write(REL, server.document(REL, status="running"))
    first = ws.daemon()
    first.wait_log(f"{EXEC}: not finished")
    assert first.terminate() == 0

    server.write(REL, server.document(REL))
    second = ws.daemon()

    wait_until(lambda: ws.recorded(REL), what="published by the start-up scan")
    assert second.terminate() == 0
    assert ws.objects() == {
        f"outputs/{REL}/{path}": data for path, data in local_files(tree).items()
    }


def test_metadata_that_stays_broken_is_one_error_naming_it(beside):
    ws = beside
    server = Server(ws)
    server.tree(REL)
    path = ws.metadata_path(REL)
    path.write_text('{"status": "completed", "request_id": ')  # a writer that died midway
    an_hour_ago = time.time() - 3600
    os.utime(path, (an_hour_ago, an_hour_ago))
    daemon = ws.daemon()

    daemon.wait_log("is not valid JSON")
    assert daemon.terminate() == 0
    errors = warnings_and_errors(daemon.log())
    assert len(errors) == 1
    assert f"{EXEC}: metadata {path} is not valid JSON (" in errors[0]
    assert errors[0].endswith(
        "fix or remove it and the result is uploaded on the next scan (retrying every 900 s)"
    )
    assert path.read_text() == '{"status": "completed", "request_id": '
    assert ws.objects() == {}


def test_the_servers_own_config_file_and_names_alone(rclone_workspace, signing_key, tmp_path):
    ws = rclone_workspace
    config = tmp_path / "conf" / "config.yaml"
    config.parent.mkdir()
    shutil.copy(SERVER_CONFIG, config)
    server = Server(ws)
    ws.settings["syncd"]["metadata_file"] = SERVER_LAYOUT  # where the Server writes
    with ws.cloudfront(signing_key[1]) as cloudfront:
        env = ws.env(
            OBJECT_STORAGE_ENABLED="true",
            OBJECT_STORAGE_TYPE="s3",
            OBJECT_STORAGE_BUCKET=ws.bucket,
            OBJECT_STORAGE_ENDPOINT_URL=ws.server.endpoint,
            OBJECT_STORAGE_ACCESS_KEY_ID=KEY,
            OBJECT_STORAGE_SECRET_ACCESS_KEY=SECRET,
            OBJECT_STORAGE_TRANSFER_ACCELERATION="false",
            CLOUDFRONT_DOMAIN=cloudfront.domain,
            CLOUDFRONT_KEY_PAIR_ID=KEY_PAIR_ID,
            CLOUDFRONT_PRIVATE_KEY=pem(signing_key[1]),
            SIGNED_URL_EXPIRES_IN="600",
            SYNCD_OUTPUTS_DIR=str(ws.outputs),
            SYNCD_STATE_DIR=str(tmp_path / "state"),
            SYNCD_COMPLETION="metadata",
            SYNCD_METADATA_FILE=SERVER_LAYOUT,
        )
        daemon = DaemonProcess(
            [*SYNCD, "run", "--config", str(config)], env, tmp_path / "daemon.log", config
        )
        ws.daemons.append(daemon)
        tree = server.finish(REL)
        wait_until(lambda: ws.recorded(REL), what="the result recorded")
        meta = ws.metadata(REL)
        served = requests.get(file_url(meta["signed_url"], "results.zarr/t2m/0.0"), timeout=10)
        assert daemon.terminate() == 0

    assert served.status_code == 200
    assert served.content == (tree / "results.zarr/t2m/0.0").read_bytes()
    assert abs(expiry(meta["signed_url"]) - time.time() - 600) < 30
    assert warnings_and_errors(daemon.log()) == []
    assert "PRIVATE KEY" not in daemon.log()


@pytest.mark.parametrize("zarr_format", [2, 3])
def test_the_earth2studio_client_reads_what_syncd_published(beside, signing_key, zarr_format):
    ws = beside
    server = Server(ws)
    with ws.cloudfront(signing_key[1]) as cloudfront:
        ws.daemon()
        tree = server.finish(REL, zarr_format=zarr_format)
        wait_until(lambda: ws.recorded(REL), what="the result recorded")

        result = InferenceRequestResults.from_dict(ws.metadata(REL))
        client = Earth2StudioClient("http://127.0.0.1:9", workflow_name=WORKFLOW)
        downloaded = {
            entry.path: client.download_result(result, entry.path).getvalue()
            for entry in result.output_files
        }
        assert result.signed_url is not None
        mapper = create_cloudfront_mapper(result.signed_url, zarr_path="results.zarr")
        dataset = xr.open_zarr(mapper, consolidated=True).load()
        by_syncd_client = open_dataset(ws.metadata(REL)).load()

    assert result.storage_type == StorageType.S3
    assert result.status.value == "completed"
    assert downloaded == {f"{EXEC}/{path}": data for path, data in local_files(tree).items()}
    assert len(downloaded) >= 3
    xr.testing.assert_identical(dataset, forecast())
    xr.testing.assert_identical(by_syncd_client, forecast())
    assert cloudfront.refusals == []


def test_polling_sees_the_server_finish_and_rewrite(beside):
    ws = beside
    ws.settings["syncd"].update(watch="poll", poll_interval=0.2)
    server = Server(ws)
    daemon = ws.daemon()
    daemon.wait_log("syncd watching")
    server.finish(REL)
    wait_until(lambda: ws.recorded(REL), what="recorded, seen by polling")

    server.write(REL, server.document(REL, zip_created_at="2026-12-04T12:00:05+00:00"))

    wait_until(
        lambda: ws.recorded(REL) and "zip_created_at" in ws.metadata(REL),
        timeout=10,
        what="the record restored, seen by polling",
    )
    assert daemon.terminate() == 0
    assert daemon.log().count(f"{EXEC}: uploading ") == 1
