"""Nothing that is not a result's file ever leaves the host: symlinked result and workflow
folders are never followed, a file swapped while the tree uploads is never read from outside
it, a metadata file that is a symlink is neither written through nor replaced."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import time

import pytest

from tests.conftest import SYNCD
from tests.proxy import Proxy
from tests.servers import free_port, wait_until

MiB = 1024 * 1024
SECRET = b"AWS_SECRET_ACCESS_KEY=the-service-credentials"


def secret_folder(tmp_path):
    folder = tmp_path / "etc-syncd"
    folder.mkdir()
    (folder / "credentials").write_bytes(SECRET)
    return folder


def leaked(ws) -> bool:
    return any(SECRET in data for data in ws.objects().values())


def test_a_result_folder_that_is_a_symlink_is_never_followed(moto_workspace, tmp_path):
    ws = moto_workspace
    (ws.outputs / "exec_1_abcdef01").symlink_to(secret_folder(tmp_path))
    ws.metadata_path("exec_1_abcdef01").write_text("{}")
    ws.mark("exec_1_abcdef01")
    ws.result("exec_2_abcdef02", {"a": b"a"})
    ws.mark("exec_2_abcdef02")
    daemon = ws.daemon()

    wait_until(lambda: ws.recorded("exec_2_abcdef02"))
    log = daemon.wait_log("exec_1_abcdef01: result folder")
    assert daemon.terminate() == 0
    assert (
        f"exec_1_abcdef01: result folder {ws.outputs / 'exec_1_abcdef01'} is a symlink; syncd "
        "never follows one: move the folder itself there (retrying every 900 s)" in log
    )
    assert not leaked(ws)
    assert not ws.recorded("exec_1_abcdef01")


def test_a_workflow_folder_that_is_a_symlink_is_never_followed(moto_workspace, tmp_path):
    ws = moto_workspace
    elsewhere = tmp_path / "elsewhere"
    (elsewhere / "exec_3_abcdef03").mkdir(parents=True)
    (elsewhere / "exec_3_abcdef03" / "credentials").write_bytes(SECRET)
    (elsewhere / "exec_3_abcdef03.done").write_text("")
    (ws.outputs / "wf").symlink_to(elsewhere)
    before = sorted(elsewhere.rglob("*"))

    daemon = ws.daemon()
    log = daemon.wait_log("is a symlink; syncd never follows one, so its results")
    done = ws.sync("wf/exec_3_abcdef03")

    assert daemon.terminate() == 0
    assert log.count(f"workflow folder {ws.outputs / 'wf'} is a symlink") == 1
    assert done.returncode == 2  # no result syncd publishes, named before anything is done
    assert f"workflow folder {ws.outputs / 'wf'} is a symlink; syncd never follows one" in (
        done.stderr
    )
    assert ws.objects() == {}
    assert sorted(elsewhere.rglob("*")) == before  # no claim, no metadata written there


def test_nothing_is_written_through_a_metadata_folder_that_is_a_symlink(moto_workspace, tmp_path):
    ws = moto_workspace
    ws.settings["syncd"]["metadata_file"] = "meta/{exec_path}.json"
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (ws.outputs / "meta").symlink_to(elsewhere)
    ws.result("exec_1_abcdef01", {"a": b"a"}, metadata=None)

    done = ws.sync("exec_1_abcdef01")

    assert done.returncode == 1
    assert done.stderr.splitlines()[-1].endswith(
        f"exec_1_abcdef01: metadata {ws.outputs / 'meta' / 'exec_1_abcdef01.json'}: folder "
        f"{ws.outputs / 'meta'} is a symlink; syncd never follows one: move the folder itself "
        "there"
    )
    assert list(elsewhere.iterdir()) == []
    assert ws.objects() == {}


@pytest.mark.parametrize("swap", ["symlink", "fifo"])
def test_a_file_swapped_during_the_upload_is_never_read(moto_workspace, tmp_path, swap):
    ws = moto_workspace
    # a.bin holds the whole upload buffer while it goes: z.txt waits for it.
    ws.settings["syncd"]["upload_buffer"] = 5 * MiB
    ws.settings["syncd"]["retry_min_delay"] = 0.2
    secret = secret_folder(tmp_path) / "credentials"
    tree = ws.result("exec_4_abcdef04", {"a.bin": os.urandom(5 * MiB), "z.txt": b"zzz"})
    ws.mark("exec_4_abcdef04")
    with Proxy(ws.server.port, rate=2_000_000) as proxy:
        ws.settings["object_storage"]["endpoint_url"] = proxy.endpoint
        daemon = ws.daemon()
        wait_until(lambda: proxy.sent > MiB, what="a.bin on its way")

        os.unlink(tree / "z.txt")  # swapped between the listing and the read
        if swap == "symlink":
            os.symlink(secret, tree / "z.txt")
        else:  # opening it for reading would wait for a writer forever
            os.mkfifo(tree / "z.txt")

        wait_until(lambda: ws.recorded("exec_4_abcdef04"), timeout=60)
        assert daemon.terminate() == 0
    assert not leaked(ws)
    assert set(ws.objects()) == {"outputs/exec_4_abcdef04/a.bin"}
    assert [f["path"] for f in ws.metadata("exec_4_abcdef04")["output_files"]] == [
        "exec_4_abcdef04/a.bin"
    ]


def test_a_metadata_file_that_is_a_symlink_is_neither_written_through_nor_replaced(
    moto_workspace, tmp_path
):
    ws = moto_workspace
    victim = tmp_path / "victim.json"
    victim.write_text('{"owner": "someone else"}')
    ws.result("exec_5_abcdef05", {"a": b"a"}, metadata=None)
    ws.metadata_path("exec_5_abcdef05").symlink_to(victim)

    done = ws.sync("exec_5_abcdef05")

    assert done.returncode == 1
    assert (
        f"exec_5_abcdef05: metadata {ws.metadata_path('exec_5_abcdef05')} is a symlink; left as "
        "it is: syncd never writes through one or replaces it" in done.stderr
    )
    assert ws.metadata_path("exec_5_abcdef05").is_symlink()
    assert victim.read_text() == '{"owner": "someone else"}'
    assert ws.objects() == {}


def test_the_rewrite_keeps_the_metadata_files_owner_and_group(moto_workspace):
    ws = moto_workspace
    ws.result("exec_6_abcdef06", {"a": b"a"})
    path = ws.metadata_path("exec_6_abcdef06")
    os.chown(path, 4321, 4322)  # the server's user, not syncd's
    path.chmod(0o660)

    assert ws.sync("exec_6_abcdef06").returncode == 0

    info = path.stat()
    assert (info.st_uid, info.st_gid, info.st_mode & 0o777) == (4321, 4322, 0o660)
    assert json.loads(path.read_text())["storage_type"] == "s3"


def test_a_metadata_file_made_anew_belongs_to_its_folders_owner(moto_workspace):
    """A root `syncd sync` of a result without metadata: the file it makes is the owner's of
    the folder it is in (the server's), not root's."""
    ws = moto_workspace
    tree = ws.result("wf/exec_6_abcdef06", {"a": b"a"}, metadata=None)
    os.chown(tree.parent, 4321, 4322)

    assert ws.sync("wf/exec_6_abcdef06").returncode == 0

    info = ws.metadata_path("wf/exec_6_abcdef06").stat()
    assert (info.st_uid, info.st_gid, info.st_mode & 0o777) == (4321, 4322, 0o644)


def test_status_never_prints_a_folder_names_terminal_escapes(moto_workspace):
    ws = moto_workspace
    name = "exec_1_\x1b]0;owned\x07\x1b[2J"  # a window title, then clear the screen
    ws.result(name, {"a": b"a"}, metadata=None)
    ws.mark(name)

    done = ws.syncd("status", "--config", str(ws.config))

    assert done.returncode == 0, done.stderr
    assert "\x1b" not in done.stdout + done.stderr and "\x07" not in done.stdout + done.stderr
    # No key can hold that name: it is said so (escaped), and never taken for a result.
    assert done.stdout.splitlines()[-1] == "0 results: none marked"
    assert done.stderr.splitlines()[-1].endswith(
        f"result folder {ws.outputs}/exec_1_\\x1b]0;owned\\x07\\x1b[2J cannot be uploaded: its "
        "name holds control characters: rename the folder (the result is published once it is "
        "fixed)"
    )


def test_credentials_in_endpoint_url_are_never_shown(moto_workspace):
    ws = moto_workspace
    ws.settings["syncd"]["retry_min_delay"] = 0.2
    closed = free_port()  # refused: every request fails with the URL in its error
    ws.settings["object_storage"]["endpoint_url"] = f"http://operator:hunter2@127.0.0.1:{closed}"
    ws.result("exec_2_abcdef02", {"a": b"a"})
    ws.mark("exec_2_abcdef02")

    checked = ws.syncd("check", "--config", str(ws.config))
    synced = ws.sync("exec_2_abcdef02")
    daemon = ws.daemon()
    daemon.wait_log("(attempt 2;")
    assert daemon.terminate() == 0
    status = ws.syncd("status", "--config", str(ws.config), "--json")

    assert checked.returncode == 1 and synced.returncode == 1
    assert f"http://<redacted>@127.0.0.1:{closed}" in checked.stdout
    assert f"(http://<redacted>@127.0.0.1:{closed}, us-east-1)" in daemon.log()
    assert "exec_2_abcdef02" in status.stdout
    shown = checked.stdout + checked.stderr + synced.stderr + daemon.log() + status.stdout
    assert "hunter2" not in shown


def test_sign_signs_only_a_results_remote_path(moto_workspace):
    ws = moto_workspace
    ws.result("wf/exec_3_abcdef03", {"a": b"a"})

    for target in ("../exec_3_abcdef03", "/etc/passwd", "outputs/x/exec_3/y", "outputs/../exec_3"):
        refused = ws.syncd("sign", "--config", str(ws.config), target)
        assert refused.returncode == 2, target
        assert refused.stderr.splitlines() == [
            f"syncd: error: {target} is neither a result folder nor a result's remote_path: "
            f"give {ws.outputs}/[<workflow>/]exec_* or outputs/[<workflow>/]exec_*"
        ]
    outside = ws.syncd("sign", "--config", str(ws.config), str(ws.root))
    assert outside.returncode == 2
    assert "is not under outputs_dir" in outside.stderr
    ws.result("exec_4_abcdef04", {"a": b"a"})
    shutil.rmtree(ws.outputs / "exec_4_abcdef04")  # delete_local_after_upload: the metadata stays
    no_metadata = ws.outputs / "exec_5_abcdef05"  # neither a tree nor metadata
    refused = ws.syncd("sign", "--config", str(ws.config), str(no_metadata))
    assert refused.returncode == 2
    assert f"{no_metadata} is neither a result folder nor a result's remote_path" in refused.stderr
    gone = ws.syncd("sign", "--config", str(ws.config), str(ws.outputs / "exec_4_abcdef04"))
    relative = subprocess.run(  # from outputs_dir: no remote_path reads so
        [*SYNCD, "sign", "--config", str(ws.config), "exec_4_abcdef04"],
        env=ws.env(),
        cwd=ws.outputs,
        capture_output=True,
        text=True,
        timeout=60,
    )
    for done in (gone, relative):
        assert done.returncode == 0, done.stderr
        assert done.stdout.startswith(
            "https://d111111abcdef8.cloudfront.net/outputs/exec_4_abcdef04/*?Policy="
        )
    for target in ("outputs/wf/exec_3_abcdef03", str(ws.outputs / "wf/exec_3_abcdef03")):
        signed = ws.syncd("sign", "--config", str(ws.config), target)
        assert signed.returncode == 0, signed.stderr
        assert signed.stdout.startswith(
            "https://d111111abcdef8.cloudfront.net/outputs/wf/exec_3_abcdef03/*?Policy="
        )


def test_check_against_a_store_that_never_answers_says_what_it_waits_for(moto_workspace):
    ws = moto_workspace
    with socket.socket() as silent:  # accepts connections, never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(16)
        port = silent.getsockname()[1]
        ws.settings["object_storage"]["endpoint_url"] = f"http://127.0.0.1:{port}"
        started = time.monotonic()
        done = ws.syncd("check", "--config", str(ws.config), timeout=60)
        took = time.monotonic() - started

    assert done.returncode == 1
    assert f"# bucket: reaching s3://{ws.bucket} (http://127.0.0.1:{port}, us-east-1) via " in (
        done.stdout
    )
    assert "(for 20 s at most)..." in done.stdout
    assert done.stderr.splitlines()[-1].endswith(
        "did not answer within 20 s: check endpoint_url and that the store is up and reachable "
        "from here"
    )
    assert took < 40


def test_a_state_database_that_is_a_symlink_is_never_opened(moto_workspace, tmp_path):
    """The state folder's owner could otherwise make a root `syncd sync` create or change any
    file through it."""
    ws = moto_workspace
    state = ws.root / "state"
    state.mkdir()
    target = tmp_path / "root-only" / "planted"
    target.parent.mkdir(mode=0o700)
    (state / "state.db").symlink_to(target)
    ws.result("exec_9_abcdef09", {"a": b"a"})

    done = ws.sync("exec_9_abcdef09")

    assert done.returncode == 2
    assert done.stderr.splitlines() == [
        f"syncd: error: state database {state / 'state.db'} is a symlink, which syncd never "
        "opens: remove it (state_dir must hold the files themselves)"
    ]
    assert not target.exists()
