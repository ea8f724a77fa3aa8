"""`syncd sync` against real servers: the bytes in the bucket and the metadata it records."""

from __future__ import annotations

import json
import os
import re
import subprocess

import pytest

from tests.cloudfront import file_url, verify
from tests.conftest import SYNCD, md5
from tests.servers import wait_until

MiB = 1024 * 1024


@pytest.mark.parametrize("rust", [True, False], ids=["obstore", "s3fs"])
def test_every_file_lands_byte_for_byte_with_each_client(workspace, signing_key, rust):
    files = {
        "results.zarr/.zgroup": b'{"zarr_format": 2}',
        "results.zarr/.zmetadata": b'{"metadata": {}}',
        "results.zarr/t2m/.zarray": b'{"chunks": [1, 721, 1440]}',
        "results.zarr/t2m/0.0.0": os.urandom(300_000),
        "results.zarr/t2m/1.0.0": os.urandom(12 * MiB),  # multipart with 8 MiB parts
        "results.zarr/u10m/0.0.0": b"",
        "run.json": b"{}",
    }
    workspace.settings["object_storage"]["use_rust_client"] = rust
    tree = workspace.result("wf/exec_1769560728_10ed9d3c", files)

    done = workspace.sync("wf/exec_1769560728_10ed9d3c")

    assert done.returncode == 0, done.stderr
    prefix = "outputs/wf/exec_1769560728_10ed9d3c/"
    assert workspace.objects() == {prefix + name: data for name, data in files.items()}
    assert f"-> s3://{workspace.bucket}/{prefix.rstrip('/')}" in done.stdout
    meta = workspace.metadata("wf/exec_1769560728_10ed9d3c")
    assert meta["storage_type"] == "s3"
    assert meta["remote_path"] == "outputs/wf/exec_1769560728_10ed9d3c"
    assert sorted(meta["output_files"], key=lambda f: f["path"]) == sorted(
        (
            {"path": f"{tree.name}/{name}", "size": len(data), "md5": md5(data)}
            for name, data in files.items()
        ),
        key=lambda f: f["path"],
    )
    public = {"KTESTKEYPAIR1": signing_key[1].public_key()}
    policy = verify(file_url(meta["signed_url"], "results.zarr/.zgroup"), public)
    assert policy["Statement"][0]["Resource"] == (
        "https://d111111abcdef8.cloudfront.net/outputs/wf/exec_1769560728_10ed9d3c/*"
    )


@pytest.mark.parametrize("rust", [True, False], ids=["obstore", "s3fs"])
def test_multipart_above_multipart_chunksize_with_either_client(moto_workspace, rust):
    """As the README says: one PutObject up to `multipart_chunksize`, parts above it (moto's
    ETag of a multipart upload ends in -<parts>)."""
    ws = moto_workspace
    ws.settings["object_storage"]["use_rust_client"] = rust
    one_part, two_parts = os.urandom(8 * MiB), os.urandom(8 * MiB + 1)
    ws.result("exec_1_aaaaaaaa", {"one.bin": one_part, "two.bin": two_parts})

    done = ws.sync("exec_1_aaaaaaaa")

    assert done.returncode == 0, done.stderr
    client = ws.server.client()
    etags = {
        name: client.head_object(Bucket=ws.bucket, Key=f"outputs/exec_1_aaaaaaaa/{name}")["ETag"]
        for name in ("one.bin", "two.bin")
    }
    assert etags["one.bin"].strip('"') == md5(one_part)
    assert etags["two.bin"].strip('"').endswith("-2")
    assert ws.objects() == {
        "outputs/exec_1_aaaaaaaa/one.bin": one_part,
        "outputs/exec_1_aaaaaaaa/two.bin": two_parts,
    }


@pytest.mark.parametrize("rust", [True, False], ids=["obstore", "s3fs"])
def test_a_user_and_password_in_endpoint_url_work_with_either_client(moto_workspace, rust):
    ws = moto_workspace
    ws.settings["object_storage"]["use_rust_client"] = rust
    ws.settings["object_storage"]["endpoint_url"] = (
        f"http://operator:hunter2@127.0.0.1:{ws.server.port}"
    )
    ws.result("exec_1_aaaaaaaa", {"a.bin": b"a"})

    done = ws.sync("exec_1_aaaaaaaa")

    assert done.returncode == 0, done.stderr
    assert ws.objects() == {"outputs/exec_1_aaaaaaaa/a.bin": b"a"}
    assert "hunter2" not in done.stdout + done.stderr


def test_marker_metadata_and_outside_symlinks_are_not_uploaded(moto_workspace, tmp_path):
    ws = moto_workspace
    secret = tmp_path / "host-secret.txt"
    secret.write_text("not part of any result")
    tree = ws.result("exec_1_aaaaaaaa", {"data/a.bin": b"a" * 10})
    (tree / "data" / "leak.txt").symlink_to(secret)
    (tree / "data" / "etc").symlink_to("/etc", target_is_directory=True)
    (tree / "data" / "again.bin").symlink_to(tree / "data" / "a.bin")
    (tree / "data" / "gone.bin").symlink_to(tmp_path / "nothing")
    ws.mark("exec_1_aaaaaaaa")

    done = ws.sync("exec_1_aaaaaaaa")

    assert done.returncode == 0, done.stderr
    assert ws.objects() == {
        "outputs/exec_1_aaaaaaaa/data/a.bin": b"a" * 10,
        "outputs/exec_1_aaaaaaaa/data/again.bin": b"a" * 10,
    }
    assert done.stderr.count("skipping symlink data/leak.txt that leads outside the tree") == 1
    assert done.stderr.count("skipping symlink data/gone.bin that leads nowhere") == 1
    assert done.stderr.count("skipping symlinked folder") == 1  # said once, not at each read


def test_what_a_published_tree_skips_is_said_once_not_at_every_look_again(moto_workspace, tmp_path):
    ws = moto_workspace
    secret = tmp_path / "host-secret.txt"
    secret.write_text("not part of any result")
    tree = ws.result("exec_1_aaaaaaaa", {"data/a.bin": b"a"})
    (tree / "data" / "leak.txt").symlink_to(secret)
    ws.mark("exec_1_aaaaaaaa")
    daemon = ws.daemon()
    wait_until(lambda: ws.recorded("exec_1_aaaaaaaa"))

    ws.mark("exec_1_aaaaaaaa")  # marked again: compared with what was published
    daemon.wait_log("exec_1_aaaaaaaa: marked again; already published and unchanged")
    assert daemon.terminate() == 0
    assert daemon.log().count("skipping symlink data/leak.txt that leads outside the tree") == 1


def test_an_event_of_the_marking_that_was_published_is_not_marked_again(moto_workspace):
    ws = moto_workspace
    ws.result("exec_2_aaaaaaaa", {"a": b"a"})
    marker = ws.mark("exec_2_aaaaaaaa")
    daemon = ws.daemon()
    daemon.wait_log("exec_2_aaaaaaaa: uploaded")  # said once the journal has it recorded

    with open(marker, "a"):  # closed after writing, as inotify says; the marker as it was
        pass
    ws.result("exec_3_aaaaaaaa", {"b": b"b"})
    ws.mark("exec_3_aaaaaaaa")
    daemon.wait_log("exec_3_aaaaaaaa: uploaded")  # heard after the event above
    ws.mark("exec_2_aaaaaaaa")  # marked again
    wait_until(lambda: "marked again" in daemon.log().split("exec_3_aaaaaaaa: uploaded")[1])
    assert daemon.terminate() == 0
    assert daemon.log().count("marked again") == 1
    assert "exec_2_aaaaaaaa: marked again; already published and unchanged" in daemon.log()


@pytest.mark.parametrize(
    ("prefix", "rel", "remote_path"),
    [
        ("/team/results/", "exec_2_bbbbbbbb", "team/results/exec_2_bbbbbbbb"),
        ("", "wf/exec_3_cccccccc", "wf/exec_3_cccccccc"),  # the bucket root
    ],
)
def test_prefix_and_exec_path_make_the_remote_path(moto_workspace, prefix, rel, remote_path):
    ws = moto_workspace
    ws.settings["object_storage"]["prefix"] = prefix
    ws.result(rel, {"x.txt": b"x"})

    done = ws.sync(rel)

    assert done.returncode == 0, done.stderr
    assert ws.objects() == {f"{remote_path}/x.txt": b"x"}
    assert ws.metadata(rel)["remote_path"] == remote_path


def test_unreachable_bucket_fails_and_leaves_metadata_alone(moto_workspace):
    ws = moto_workspace
    ws.settings["object_storage"]["bucket"] = "no-such-bucket-syncd"
    ws.result("exec_4_dddddddd", {"x.txt": b"x"})
    before = ws.metadata_path("exec_4_dddddddd").read_bytes()

    done = ws.sync("exec_4_dddddddd")

    assert done.returncode == 1
    assert "exec_4_dddddddd: upload of outputs/exec_4_dddddddd/x.txt failed" in done.stderr
    assert "Traceback" not in done.stderr
    assert ws.metadata_path("exec_4_dddddddd").read_bytes() == before


def test_sync_refuses_a_folder_outside_outputs_dir(moto_workspace, tmp_path):
    elsewhere = tmp_path / "elsewhere" / "exec_5_eeeeeeee"
    elsewhere.mkdir(parents=True)

    done = moto_workspace.syncd("sync", "--config", str(moto_workspace.config), str(elsewhere))

    assert done.returncode == 2
    assert done.stderr.strip() == (
        f"syncd: error: {elsewhere} is not under outputs_dir {moto_workspace.outputs}: "
        "set syncd.outputs_dir (SYNCD_OUTPUTS_DIR or --outputs-dir)"
    )
    assert moto_workspace.objects() == {}


def test_one_failed_result_does_not_stop_the_others(moto_workspace):
    ws = moto_workspace
    ws.result("exec_6_ffffffff", {"x.txt": b"x"}, metadata="{not json")
    ws.result("exec_7_abcdef01", {"y.txt": b"y"})

    done = ws.sync("exec_6_ffffffff", "exec_7_abcdef01")

    assert done.returncode == 1
    assert ws.objects() == {"outputs/exec_7_abcdef01/y.txt": b"y"}
    assert ws.recorded("exec_7_abcdef01")


def test_acceleration_with_a_custom_endpoint_is_ignored_with_one_warning(moto_workspace):
    ws = moto_workspace
    ws.settings["object_storage"]["use_transfer_acceleration"] = True
    ws.result("exec_8_abcdef08", {"x.txt": b"x"})

    done = ws.sync("exec_8_abcdef08")

    assert done.returncode == 0, done.stderr
    assert ws.objects() == {"outputs/exec_8_abcdef08/x.txt": b"x"}
    warning = (
        f"WARNING use_transfer_acceleration is ignored with endpoint_url {ws.server.endpoint}: "
        "acceleration exists only on AWS S3 itself"
    )
    assert done.stderr.count(warning) == 1


def test_json_logs_are_one_object_per_line_and_never_hold_a_secret(moto_workspace):
    ws = moto_workspace
    ws.settings["syncd"]["log_format"] = "json"
    ws.settings["object_storage"]["session_token"] = "very-secret-token"
    ws.result("exec_9_abcdef09", {"x.txt": b"x"})

    done = ws.syncd(
        "sync",
        "--config",
        str(ws.config),
        str(ws.outputs / "exec_9_abcdef09"),
        "--log-level",
        "debug",
    )

    assert done.returncode == 0, done.stderr
    records = [json.loads(line) for line in done.stderr.splitlines()]
    messages = [r["record"]["message"] for r in records]
    assert any(m.startswith("exec_9_abcdef09: uploaded 1 files, 1 bytes") for m in messages)
    for secret in ("syncdtestsecret", "very-secret-token", "PRIVATE KEY"):
        assert secret not in done.stderr + done.stdout


@pytest.mark.parametrize("journal", [False, True], ids=["json", "journald"])
def test_library_records_go_through_syncds_own_sink(moto_workspace, journal):
    """aiobotocore logs where it found credentials (INFO, through the standard logging module):
    the line is in syncd's format, at DEBUG, named by its logger."""
    ws = moto_workspace
    credentials = ws.root / "aws-credentials"
    storage = ws.settings["object_storage"]
    credentials.write_text(
        f"[default]\naws_access_key_id = {storage.pop('access_key_id')}\n"
        f"aws_secret_access_key = {storage.pop('secret_access_key')}\n"
    )
    storage["use_rust_client"] = False
    ws.settings["syncd"]["log_level"] = "DEBUG"
    if not journal:
        ws.settings["syncd"]["log_format"] = "json"
    ws.result("exec_1_abcdef01", {"a": b"a"})
    ws.mark("exec_1_abcdef01")

    daemon = ws.daemon(env=ws.env(AWS_SHARED_CREDENTIALS_FILE=str(credentials)), journal=journal)
    wait_until(lambda: ws.recorded("exec_1_abcdef01"))
    assert daemon.terminate() == 0

    found = "aiobotocore.credentials: Found credentials in shared credentials file"
    if journal:
        lines = daemon.log().splitlines()
        assert all(re.match(r"<[0-7]>", line) for line in lines), lines
        assert any(line.startswith(f"<7>{found}") for line in lines), lines
    else:
        records = [json.loads(line)["record"] for line in daemon.log().splitlines()]
        library = [r for r in records if r["message"].startswith(found)]
        assert [r["level"]["name"] for r in library] == ["DEBUG"]


def test_many_files_in_flight_fit_a_low_limit_of_open_files(moto_workspace):
    """systemd's soft limit is 1,024 descriptors; max_concurrency 128 asks for 1,024 files in
    flight. Where the hard limit is that low too, fewer go at once rather than none."""
    ws = moto_workspace
    ws.settings["object_storage"]["max_concurrency"] = 128
    ws.result("exec_5_abcdef05", {f"c/{i}": b"x" * 100 for i in range(1500)})

    done = subprocess.run(
        [
            "prlimit",
            "--nofile=1024:1024",
            *SYNCD,
            "sync",
            "--config",
            str(ws.config),
            str(ws.outputs / "exec_5_abcdef05"),
        ],
        env=ws.env(),
        capture_output=True,
        text=True,
        timeout=300,
    )

    assert done.returncode == 0, done.stderr[-2000:]
    assert len(ws.objects()) == 1500
