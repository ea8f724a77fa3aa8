"""Signals and clocks: `systemctl reload` (SIGHUP) changes what can change live without
dropping the uploads in flight, every signal that would end the daemon is said, `syncd sync`
says what ended it, and a wall clock stepped back holds no retry back."""

from __future__ import annotations

import importlib.util
import os
import signal
from pathlib import Path

import pytest
import yaml

from tests.proxy import Proxy
from tests.servers import free_port, wait_until

MiB = 1024 * 1024


def test_reload_changes_live_settings_names_the_rest_and_drops_no_upload(
    moto_workspace, notify_socket
):
    ws = moto_workspace
    ws.result("exec_1_abcdef01", {"big.bin": os.urandom(6 * MiB)})
    ws.mark("exec_1_abcdef01")
    with Proxy(ws.server.port, rate=2_000_000) as slow:
        ws.settings["object_storage"]["endpoint_url"] = slow.endpoint
        daemon = ws.daemon(env=ws.env(NOTIFY_SOCKET=notify_socket.address))
        notify_socket.receive(lambda got: any(m.startswith("READY=1") for m in got))
        wait_until(lambda: slow.sent > MiB, what="the upload on its way")

        ws.settings["syncd"]["retry_max_delay"] = 7
        ws.settings["syncd"]["log_level"] = "DEBUG"
        ws.settings["object_storage"]["prefix"] = "moved"
        daemon.config.write_text(yaml.safe_dump(ws.settings))
        daemon.process.send_signal(signal.SIGHUP)

        daemon.wait_log("settings reloaded")
        wait_until(lambda: ws.recorded("exec_1_abcdef01"), timeout=60)
    assert daemon.terminate() == 0

    log = daemon.log()
    assert "settings reloaded: syncd.retry_max_delay, syncd.log_level" in log
    assert (
        "object_storage.prefix changed, which takes a restart (systemctl restart syncd); "
        "running on with the value it had" in log
    )
    assert log.count("exec_1_abcdef01: uploading") == 1  # the upload in flight went on
    assert set(ws.objects()) == {"outputs/exec_1_abcdef01/big.bin"}

    def ready_again(got: list[str]) -> bool:
        reloading = [i for i, m in enumerate(got) if m.startswith("RELOADING=1")]
        return bool(reloading) and any(m.startswith("READY=1") for m in got[reloading[0] :])

    notify_socket.receive(ready_again)  # systemd's `reload` returns once it is READY again


def test_a_reload_with_bad_settings_changes_nothing_and_stray_signals_are_said(moto_workspace):
    ws = moto_workspace
    daemon = ws.daemon()
    daemon.wait_log("syncd watching")

    daemon.config.write_text("object_storage: [not, a, mapping")
    daemon.process.send_signal(signal.SIGHUP)
    daemon.wait_log("reload failed")
    daemon.config.write_text("")  # emptied by a config tool that failed: a start refuses it
    daemon.process.send_signal(signal.SIGHUP)
    wait_until(lambda: daemon.log().count("reload failed") == 2, what="the second reload")
    for sig in (signal.SIGUSR1, signal.SIGXCPU, signal.SIGSTKFLT):  # LimitCPU= sends SIGXCPU
        daemon.process.send_signal(sig)
        daemon.wait_log(f"{sig.name} received")
    ws.result("exec_2_abcdef02", {"a": b"a"})
    ws.mark("exec_2_abcdef02")
    wait_until(lambda: ws.recorded("exec_2_abcdef02"), what="still publishing")

    assert daemon.terminate() == 0
    log = daemon.log()
    assert (
        f"reload failed, the settings stay as they were: config file {daemon.config} is not "
        "valid YAML" in log
    )
    assert (
        "reload failed, the settings stay as they were: object storage is disabled, so syncd "
        "has nothing to do: set object_storage.enabled: true or OBJECT_STORAGE_ENABLED=true" in log
    )
    assert "settings reloaded" not in log
    assert (
        "SIGUSR1 received: syncd has no use for it and goes on (SIGTERM stops it, SIGHUP "
        "reloads its settings)" in log
    )
    assert "SIGTERM received: stopping" in log


def test_sync_says_which_signal_ended_it(moto_workspace):
    ws = moto_workspace
    ws.result("exec_3_abcdef03", {"big.bin": os.urandom(4 * MiB)})
    with Proxy(ws.server.port, rate=500_000) as slow:
        ws.settings["object_storage"]["endpoint_url"] = slow.endpoint
        sync = ws.sync_in_background("exec_3_abcdef03")
        wait_until(lambda: slow.sent > MiB, what="the upload on its way")
        sync.send_signal(signal.SIGTERM)
        stderr = sync.communicate(timeout=60)[1]

    assert sync.returncode == 128 + signal.SIGTERM
    assert stderr.splitlines()[-1] == (
        "syncd: interrupted by SIGTERM; results not yet recorded are published by the daemon if "
        "they are marked, or by syncd sync again"
    )
    assert not ws.recorded("exec_3_abcdef03")


def faketime(timestamp_file: Path) -> dict[str, str]:
    """What makes a process read its wall clock through libfaketime, stepped by writing an
    offset such as -3600 into `timestamp_file`; its monotonic clocks stay real."""
    spec = importlib.util.find_spec("libfaketime")
    assert spec is not None and spec.submodule_search_locations
    library = Path(spec.submodule_search_locations[0]) / "vendor/libfaketime/src/libfaketime.so.1"
    timestamp_file.write_text("+0\n")
    return {
        "LD_PRELOAD": str(library),
        "FAKETIME_TIMESTAMP_FILE": str(timestamp_file),
        "FAKETIME_NO_CACHE": "1",
        "FAKETIME_DONT_FAKE_MONOTONIC": "1",
    }


def test_a_wall_clock_stepped_back_an_hour_holds_no_retry_back(moto_workspace, tmp_path):
    ws = moto_workspace
    ws.settings["syncd"]["retry_min_delay"] = 1
    ws.settings["syncd"]["retry_max_delay"] = 2
    port = free_port()  # the store is down: nothing listens here yet
    ws.settings["object_storage"]["endpoint_url"] = f"http://127.0.0.1:{port}"
    ws.result("exec_4_abcdef04", {"a": b"a"})
    ws.mark("exec_4_abcdef04")
    clock = tmp_path / "faketime"
    daemon = ws.daemon(env=ws.env(**faketime(clock)))
    daemon.wait_log("(attempt 1;")

    clock.write_text("-3600\n")  # an NTP step, an operator's `date -s`
    with Proxy(ws.server.port, port=port):  # the store is back
        wait_until(lambda: ws.recorded("exec_4_abcdef04"), timeout=30, what="retried in seconds")
    assert daemon.terminate() == 0


def while_starting(pid: int) -> None:
    """Wait until the command has set its first dispositions (SIGUSR1 ignored, SIGHUP and
    SIGTERM caught), long before its imports end and it can act on a signal itself."""

    def dispositions_set() -> bool:
        status = Path(f"/proc/{pid}/status").read_text()
        masks = dict(line.split(":") for line in status.splitlines() if line.startswith("Sig"))
        ignored, caught = int(masks["SigIgn"], 16), int(masks["SigCgt"], 16)
        return all(
            mask >> (sig - 1) & 1
            for mask, sig in (
                (ignored, signal.SIGUSR1),
                (caught, signal.SIGHUP),
                (caught, signal.SIGTERM),
            )
        )

    wait_until(dispositions_set, interval=0.001, what="syncd's first signal dispositions")


def test_a_reload_or_a_stop_while_syncd_starts_is_done_once_it_can(moto_workspace):
    ws = moto_workspace
    ws.result("exec_6_abcdef06", {"a": b"a"})
    ws.mark("exec_6_abcdef06")
    reloaded = ws.daemon()
    while_starting(reloaded.process.pid)
    reloaded.process.send_signal(signal.SIGHUP)
    stopped = ws.daemon()
    while_starting(stopped.process.pid)
    stopped.process.send_signal(signal.SIGTERM)
    synced = ws.sync_in_background("exec_6_abcdef06")
    while_starting(synced.pid)
    synced.send_signal(signal.SIGHUP)

    assert stopped.process.wait(60) == 0
    assert stopped.log().splitlines()[-1].endswith("SIGTERM received: stopping")
    assert "syncd watching" not in stopped.log()
    assert synced.wait(60) == 128 + signal.SIGHUP
    assert synced.communicate()[1].splitlines()[-1].startswith("syncd: interrupted by SIGHUP")
    wait_until(lambda: ws.recorded("exec_6_abcdef06"), what="published all the same")
    reloaded.wait_log("settings reloaded")
    assert reloaded.terminate() == 0
    assert "SIGHUP" not in reloaded.log()


def test_a_stray_signal_while_syncd_starts_does_not_end_it(moto_workspace):
    ws = moto_workspace
    ws.result("exec_5_abcdef05", {"a": b"a"})
    ws.mark("exec_5_abcdef05")
    daemon = ws.daemon()
    while_starting(daemon.process.pid)  # still importing: before the daemon's own handlers
    daemon.process.send_signal(signal.SIGUSR1)

    wait_until(lambda: ws.recorded("exec_5_abcdef05"), what="published all the same")
    assert daemon.terminate() == 0


def test_a_key_replaced_in_its_file_is_named_by_the_reload_and_signs_from_then_on(
    moto_workspace, signing_key
):
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    from tests.cloudfront import file_url, verify
    from tests.conftest import KEY_PAIR_ID

    ws = moto_workspace
    key_file = ws.root / "cloudfront.pem"
    key_file.write_bytes(signing_key[0].read_bytes())
    ws.settings["object_storage"]["cloudfront_private_key_path"] = str(key_file)
    daemon = ws.daemon()
    daemon.wait_log("syncd watching")

    new = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    key_file.write_bytes(
        new.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.TraditionalOpenSSL,
            serialization.NoEncryption(),
        )
    )
    daemon.process.send_signal(signal.SIGHUP)
    daemon.wait_log("settings reloaded: the CloudFront private key (replaced in its file)")
    ws.result("exec_7_abcdef07", {"a": b"a"})
    ws.mark("exec_7_abcdef07")
    wait_until(lambda: ws.recorded("exec_7_abcdef07"))
    assert daemon.terminate() == 0

    url = ws.metadata("exec_7_abcdef07")["signed_url"]
    assert verify(file_url(url, "a"), {KEY_PAIR_ID: new.public_key()})


@pytest.mark.parametrize("first", [signal.SIGTERM, signal.SIGHUP])
def test_a_reload_asked_while_stopping_is_said_not_done(moto_workspace, first):
    """Both signals pending at once are delivered lowest number first (SIGHUP), whichever was
    sent first."""
    ws = moto_workspace
    daemon = ws.daemon()
    daemon.wait_log("syncd watching")

    daemon.process.send_signal(first)
    daemon.process.send_signal(signal.SIGHUP if first == signal.SIGTERM else signal.SIGTERM)

    assert daemon.process.wait(30) == 0
    said = "SIGHUP received while stopping: no reload; a start reads the settings"
    assert daemon.log().count(said) == 1
    assert "settings reloaded" not in daemon.log()
