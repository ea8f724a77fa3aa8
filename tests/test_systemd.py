"""Running under systemd: the unit file, sd_notify, journald priorities, credentials."""

from __future__ import annotations

import os
import re
import shutil
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import KEY_PAIR_ID, status_of
from tests.proxy import Proxy
from tests.servers import SECRET, wait_until
from tests.unit import NOBODY

MiB = 1024 * 1024

UNIT = Path(__file__).resolve().parents[1] / "systemd" / "syncd.service"
needs_systemd_analyze = pytest.mark.skipif(
    shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed"
)


def installed_unit(tmp_path: Path) -> Path:
    """The unit as installed, pointing at this checkout's syncd."""
    unit = tmp_path / "syncd.service"
    syncd = Path(sys.executable).parent / "syncd"
    unit.write_text(UNIT.read_text().replace("/opt/syncd/.venv/bin/syncd", str(syncd)))
    return unit


@needs_systemd_analyze
def test_unit_file_verifies(tmp_path):
    done = subprocess.run(
        ["systemd-analyze", "verify", str(installed_unit(tmp_path))],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert done.stderr.strip() == ""


@needs_systemd_analyze
def test_unit_file_is_hardened(tmp_path):
    done = subprocess.run(
        ["systemd-analyze", "security", "--offline=true", str(installed_unit(tmp_path))],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    level = re.search(r"Overall exposure level for syncd\.service: ([0-9.]+)", done.stdout)
    assert level is not None, done.stdout
    assert float(level.group(1)) <= 3.0


def test_unit_file_has_what_an_operator_relies_on():
    text = UNIT.read_text()
    for line in [
        "Type=notify",
        "WatchdogSec=",
        "Restart=on-failure",
        "ExecReload=/bin/kill -HUP $MAINPID",
        "User=syncd",
        "EnvironmentFile=-/etc/syncd/env",
        "LoadCredential=cloudfront_private_key:",
        "ProtectSystem=strict",
        "ReadWritePaths=/outputs",
        "StateDirectory=syncd",
    ]:
        assert re.search(rf"^{re.escape(line)}", text, re.MULTILINE), line
    timeout = int(re.search(r"^TimeoutStopSec=(\d+)s", text, re.MULTILINE).group(1))
    from syncd.config import DaemonSettings

    assert DaemonSettings().stop_grace < timeout


def test_daemon_notifies_ready_watchdog_and_stopping(moto_workspace, notify_socket):
    ws = moto_workspace
    messages = notify_socket.messages

    def receive(text: str, count: int = 1) -> None:
        notify_socket.receive(lambda got: sum(m.startswith(text) for m in got) >= count)

    daemon = ws.daemon(env=ws.env(NOTIFY_SOCKET=notify_socket.address, WATCHDOG_USEC="200000"))
    receive("READY=1")
    ws.result("exec_1_abcdef01", {"a": b"a"})
    ws.mark("exec_1_abcdef01")
    wait_until(lambda: ws.recorded("exec_1_abcdef01"))
    receive("WATCHDOG=1", count=sum(m == "WATCHDOG=1" for m in messages) + 3)
    assert daemon.terminate() == 0
    receive("STOPPING=1")
    assert messages[0].startswith("READY=1\nSTATUS=watching ")


def test_the_watchdog_is_fed_while_another_process_holds_the_state_file(
    moto_workspace, notify_socket
):
    """A write to the state waits up to 10 s for another process's lock, on the journal's
    own thread: the daemon goes on meanwhile, and systemd's watchdog does not kill it."""
    ws = moto_workspace
    messages = notify_socket.messages

    def pings() -> int:
        return sum(m == "WATCHDOG=1" for m in messages)

    daemon = ws.daemon(env=ws.env(NOTIFY_SOCKET=notify_socket.address, WATCHDOG_USEC="4000000"))
    notify_socket.receive(lambda got: any(m.startswith("READY=1") for m in got))
    lock = sqlite3.connect(ws.root / "state" / "state.db", isolation_level=None)
    lock.execute("BEGIN EXCLUSIVE")
    ws.result("exec_1_abcdef01", {"a": b"a"})
    ws.mark("exec_1_abcdef01")  # its attempt's first write waits for the lock
    before = pings()

    notify_socket.receive(lambda _: pings() >= before + 3)  # one every 2 s
    waited = daemon.log()
    lock.execute("ROLLBACK")
    lock.close()

    wait_until(lambda: ws.recorded("exec_1_abcdef01"), timeout=60, what="recorded after")
    assert daemon.terminate() == 0
    assert "is locked by another process" not in waited  # still in its first wait


def test_journald_lines_carry_syslog_priorities(moto_workspace):
    ws = moto_workspace
    ws.settings["object_storage"]["use_transfer_acceleration"] = True  # ignored: a warning
    ws.result("exec_1_abcdef01", {"a": b"a"}, metadata="{broken")
    ws.mark("exec_1_abcdef01")

    daemon = ws.daemon(journal=True)
    daemon.wait_log("is not valid JSON")
    assert daemon.terminate() == 0

    lines = daemon.log().splitlines()
    assert all(re.match(r"<[0-7]>", line) for line in lines), lines
    assert any(line.startswith("<6>syncd watching ") for line in lines)
    assert any(line.startswith("<4>use_transfer_acceleration is ignored") for line in lines)
    assert any(line.startswith("<3>exec_1_abcdef01: metadata ") for line in lines)


@pytest.mark.parametrize("wrong", ["a setting", "outputs_dir"])
def test_why_syncd_did_not_start_is_an_error_in_the_journal(moto_workspace, wrong):
    ws = moto_workspace
    if wrong == "a setting":  # said before the log is set up
        ws.settings["syncd"]["max_bandwidth"] = "fast"
    else:  # said once it is
        ws.settings["syncd"]["outputs_dir"] = str(ws.root / "nowhere")
    daemon = ws.daemon(journal=True)

    assert daemon.process.wait(60) == 2
    lines = daemon.log().splitlines()
    assert all(re.match(r"<[0-7]>", line) for line in lines), lines
    (error,) = [line for line in lines if "error" in line]
    assert error.startswith("<3>syncd: error: ")
    assert ("max_bandwidth" if wrong == "a setting" else "nowhere") in error


def test_secrets_come_from_systemd_credentials(moto_workspace, signing_key, tmp_path):
    ws = moto_workspace
    credentials = tmp_path / "credentials"
    credentials.mkdir()
    (credentials / "secret_access_key").write_text(SECRET + "\n")
    (credentials / "cloudfront_private_key").write_bytes(signing_key[0].read_bytes())
    del ws.settings["object_storage"]["secret_access_key"]
    del ws.settings["object_storage"]["cloudfront_private_key_path"]
    ws.result("exec_1_abcdef01", {"a": b"a"})

    done = ws.sync("exec_1_abcdef01", env=ws.env(CREDENTIALS_DIRECTORY=str(credentials)))

    assert done.returncode == 0, done.stderr
    assert ws.objects() == {"outputs/exec_1_abcdef01/a": b"a"}
    url = ws.metadata("exec_1_abcdef01")["signed_url"]
    assert f"Key-Pair-Id={KEY_PAIR_ID}" in url
    assert SECRET not in done.stdout + done.stderr


def test_a_claim_of_another_users_live_process_holds_in_the_units_sandbox(unit_workspace):
    """ProtectProc=invisible hides other users' processes from the daemon: an admin's
    `sudo syncd sync` in progress keeps its claim, and the daemon neither publishes the result
    too nor cleans up under it."""
    ws = unit_workspace
    ws.settings["syncd"]["log_level"] = "DEBUG"
    ws.result("exec_1_abcdef01", {"big.bin": os.urandom(8 * MiB), "a": b"a"})
    ws.mark("exec_1_abcdef01")
    with Proxy(ws.server.port, rate=1_000_000) as slow:
        ws.settings["object_storage"]["endpoint_url"] = slow.endpoint
        admin = ws.sync_in_background("exec_1_abcdef01")
        wait_until(lambda: list(ws.outputs.glob(".syncd-claims/exec_1_abcdef01.*")))
        ws.settings["object_storage"]["endpoint_url"] = ws.server.endpoint
        daemon = ws.daemon(as_unit=True)

        daemon.wait_log("exec_1_abcdef01: being published by")
        output = admin.communicate(timeout=120)

    assert admin.returncode == 0, output
    wait_until(lambda: ws.recorded("exec_1_abcdef01"))
    assert daemon.terminate() == 0
    assert "exec_1_abcdef01: uploading" not in daemon.log()
    assert ws.objects()["outputs/exec_1_abcdef01/a"] == b"a"


def test_a_workflow_folder_the_units_user_cannot_list_is_said_once(unit_workspace):
    ws = unit_workspace
    ws.settings["syncd"]["rescan_interval"] = 0.5
    ws.result("closed/exec_1_abcdef01", {"a": b"a"})
    ws.mark("closed/exec_1_abcdef01")
    (ws.outputs / "closed").chmod(0o700)  # root's alone, as a workflow with umask 077 makes it
    ws.result("open/exec_2_abcdef02", {"b": b"b"})
    ws.mark("open/exec_2_abcdef02")
    for path in (ws.outputs / "open").rglob("*"):
        os.chown(path, NOBODY, NOBODY)
    os.chown(ws.outputs / "open", NOBODY, NOBODY)

    daemon = ws.daemon(as_unit=True)
    wait_until(lambda: ws.recorded("open/exec_2_abcdef02"), what="the other result published")
    time.sleep(3)  # six rescans more: still said once
    assert daemon.terminate() == 0

    said = [line for line in daemon.log().splitlines() if "cannot list" in line]
    assert len(said) == 1, said
    assert said[0].endswith(
        f"ERROR   cannot list {ws.outputs / 'closed'} (Permission denied): give the syncd user "
        "read and search access to it; until then the results in it are not seen"
    )


def test_a_result_in_a_folder_that_became_unlistable_is_not_forgotten(unit_workspace):
    """Its marker is not seen, but not gone either: the result waits, it is not forgotten."""
    ws = unit_workspace
    ws.settings["syncd"]["rescan_interval"] = 0.5
    rel = "closed/exec_1_abcdef01"
    ws.result(rel, {"a": b"a"})
    ws.mark(rel)  # in root's folder, where the unit's user cannot make its claim: retrying
    daemon = ws.daemon(as_unit=True)
    wait_until(lambda: status_of(ws).get(rel, {}).get("state") == "retrying", what="retrying")
    (ws.outputs / "closed").chmod(0o700)
    ws.result("open/exec_2_abcdef02", {"b": b"b"})
    for path in [ws.outputs / "open", *(ws.outputs / "open").rglob("*")]:
        os.chown(path, NOBODY, NOBODY)
    ws.mark("open/exec_2_abcdef02")
    wait_until(lambda: ws.recorded("open/exec_2_abcdef02"), what="the other result published")
    time.sleep(3)  # six rescans more
    assert daemon.terminate() == 0

    assert "cannot list" in daemon.log()
    assert "forgotten" not in daemon.log()
    assert status_of(ws)[rel]["state"] == "retrying"


def test_status_says_when_its_user_cannot_read_the_state(unit_workspace):
    ws = unit_workspace
    closed = ws.root / "root-state"
    closed.mkdir(mode=0o700)
    (closed / "state.db").write_bytes(b"")
    ws.settings["syncd"]["state_dir"] = str(closed)
    unreadable = ws.syncd("status", "--config", str(ws.config), as_unit=True)
    ws.settings["syncd"]["state_dir"] = str(ws.root / "config-1.yaml")  # a file
    not_a_folder = ws.syncd("status", "--config", str(ws.config))

    assert unreadable.returncode == 2
    assert unreadable.stderr.splitlines() == [
        f"syncd: error: state_dir {closed} cannot be read (Permission denied): run syncd status "
        "as the daemon's user (sudo /opt/syncd/systemd/syncd-as-unit status), or fix state_dir"
    ]
    assert not_a_folder.returncode == 2
    assert not_a_folder.stderr.splitlines() == [
        f"syncd: error: state_dir {ws.root / 'config-1.yaml'} is not a folder: set "
        "syncd.state_dir (SYNCD_STATE_DIR) to a folder this user may write, or remove what is "
        "in its place"
    ]


def test_syncd_keeps_the_group_it_shares_with_the_server_on_metadata(unit_workspace):
    """As the README installs it: outputs_dir in the server's group, which syncd's user is a
    member of; the server's metadata file stays writable by the server after syncd's rewrite."""
    ws = unit_workspace
    shared = 4400
    os.chown(ws.outputs, NOBODY, shared)
    ws.outputs.chmod(0o2775)
    ws.result("exec_1_abcdef01", {"a": b"a"})
    path = ws.metadata_path("exec_1_abcdef01")
    os.chown(path, 4321, shared)  # the server's user
    path.chmod(0o664)

    done = ws.syncd(
        "sync",
        "--config",
        str(ws.config),
        str(ws.outputs / "exec_1_abcdef01"),
        as_unit=True,
        groups=(shared,),
    )

    assert done.returncode == 0, done.stderr
    info = path.stat()
    assert (info.st_gid, info.st_mode & 0o777) == (shared, 0o664)
    assert ws.recorded("exec_1_abcdef01")


def test_the_install_check_as_the_units_user_says_what_it_cannot_read(unit_workspace):
    ws = unit_workspace
    credentials = ws.root / "credentials"  # as the install makes it: root's, mode 700
    credentials.mkdir(mode=0o700)
    (credentials / "secret_access_key").write_text("secret")

    done = ws.syncd(
        "check",
        "--config",
        str(ws.config),
        env=ws.env(CREDENTIALS_DIRECTORY=str(credentials)),
        as_unit=True,
    )

    assert done.returncode == 2
    assert done.stderr.splitlines() == [
        f"syncd: error: $CREDENTIALS_DIRECTORY {credentials} cannot be read by this user: run "
        "as the unit's user with its credentials, or let this user read the folder"
    ]
