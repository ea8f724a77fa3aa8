"""`syncd.max_bandwidth`: every upload together sends at most the cap, as the wire sees it (a
byte-counting proxy between syncd and the store), with both clients; a reload changes it; its
relay reaches nothing but the store."""

from __future__ import annotations

import asyncio
import os
import shlex
import signal
import subprocess
import threading
import time

import pytest
import yaml

from syncd.config import DaemonSettings, ObjectStorage
from syncd.storage.relay import Relay
from tests import accelerate
from tests.conftest import SYNCD, clean_env
from tests.proxy import Proxy
from tests.servers import free_port, wait_until

MiB = 1024 * 1024


class Wire:
    """What a proxy forwards towards the store: when, and how many bytes."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.pieces: list[tuple[float, int]] = []

    def __call__(self, connection: int, upstream: bool, data: bytes) -> None:
        if upstream:
            with self.lock:
                self.pieces.append((time.monotonic(), len(data)))

    def rate(self) -> float:
        """Bytes a second from the first piece to the last."""
        with self.lock:
            (start, _), (end, _) = self.pieces[0], self.pieces[-1]
            return sum(size for _, size in self.pieces) / (end - start)

    def clear(self) -> None:
        with self.lock:
            self.pieces.clear()


@pytest.mark.parametrize("rust", [True, False], ids=["obstore", "s3fs"])
def test_a_100_mb_upload_goes_at_the_cap_as_the_wire_sees_it(moto_workspace, rust):
    ws = moto_workspace
    wire = Wire()
    with Proxy(ws.server.port, observer=wire) as proxy:
        ws.settings["object_storage"]["endpoint_url"] = proxy.endpoint
        ws.settings["object_storage"]["use_rust_client"] = rust
        ws.settings["syncd"]["max_bandwidth"] = "20M"
        # Files of multipart uploads (8 MiB parts), first, and of one PutObject: 100 MiB.
        files = {f"c/0-large-{i}": os.urandom(10 * MiB) for i in range(2)}
        files |= {f"c/1-small-{i}": os.urandom(2 * MiB) for i in range(40)}
        ws.result("exec_1_abcdef01", files)
        ws.mark("exec_1_abcdef01")

        done = ws.sync("exec_1_abcdef01")

        assert done.returncode == 0, done.stderr
        assert len(ws.objects()) == 42
        assert 0.9 * 20 * MiB < wire.rate() <= 1.1 * 20 * MiB, wire.rate() / MiB


def test_a_reload_changes_the_cap_and_turning_it_off_takes_a_restart(moto_workspace):
    ws = moto_workspace
    wire = Wire()
    with Proxy(ws.server.port, observer=wire) as proxy:
        ws.settings["object_storage"]["endpoint_url"] = proxy.endpoint
        ws.settings["syncd"]["max_bandwidth"] = 4 * MiB
        daemon = ws.daemon()
        daemon.wait_log("syncd watching")
        assert "sending at most 4 MiB/s" in daemon.log()
        ws.result("exec_1_abcdef01", {f"c/{i}": os.urandom(2 * MiB) for i in range(8)})
        ws.mark("exec_1_abcdef01")
        wait_until(lambda: ws.recorded("exec_1_abcdef01"), timeout=60, what="published")
        assert 0.9 * 4 * MiB < wire.rate() <= 1.1 * 4 * MiB, wire.rate() / MiB

        ws.settings["syncd"]["max_bandwidth"] = "16MiB"
        daemon.config.write_text(yaml.safe_dump(ws.settings))
        daemon.process.send_signal(signal.SIGHUP)
        daemon.wait_log("settings reloaded: syncd.max_bandwidth")
        wire.clear()
        ws.result("exec_2_abcdef02", {f"c/{i}": os.urandom(4 * MiB) for i in range(8)})
        ws.mark("exec_2_abcdef02")
        wait_until(lambda: ws.recorded("exec_2_abcdef02"), timeout=60, what="published")
        assert 0.9 * 16 * MiB < wire.rate() <= 1.1 * 16 * MiB, wire.rate() / MiB

        del ws.settings["syncd"]["max_bandwidth"]
        daemon.config.write_text(yaml.safe_dump(ws.settings))
        daemon.process.send_signal(signal.SIGHUP)
        daemon.wait_log(
            "syncd.max_bandwidth changed, which takes a restart (systemctl restart syncd); "
            "running on with the value it had"
        )
        assert daemon.terminate() == 0


@pytest.mark.parametrize(
    ("given", "meant"),
    [
        ("41943040", 41943040),
        ("40M", 40 * MiB),
        ("40MiB", 40 * MiB),
        ("40 MB/s", 40 * MiB),
        ("1.5G", 1536 * MiB),
        ("512k", 512 * 1024),
        ("32K", 32 * 1024),
    ],
)
def test_the_cap_reads_as_operators_write_it(given, meant):
    assert DaemonSettings(max_bandwidth=given).max_bandwidth == meant


@pytest.mark.parametrize(
    ("given", "error"),
    [
        (
            "40Mb/s",
            "must be bytes per second: a number, or one with K, M or G (1024-based), "
            "e.g. 41943040, 40M or 40MiB (not bits: 40Mbit/s is 5M)",
        ),
        (
            "16K",
            "must be at least 32768 (32K: the parts of one file at the slowest rate a "
            "request may go) and at most 1099511627776 (1024G), or unset for no cap",
        ),
        ("-1", "must be bytes per second"),
        ("9" * 400 + ".5", "must be bytes per second"),
        (str(2**41), "must be at least 32768"),
    ],
)
def test_a_cap_that_cannot_work_is_one_line_naming_it(moto_workspace, given, error):
    ws = moto_workspace
    done = ws.syncd("check", "--config", str(ws.config), env=ws.env(SYNCD_MAX_BANDWIDTH=given))
    assert done.returncode == 2
    assert done.stderr.startswith(
        f"syncd: error: invalid setting syncd.max_bandwidth (from $SYNCD_MAX_BANDWIDTH) = "
        f"{given!r}: {error}"
    ), done.stderr
    assert len(done.stderr.splitlines()) == 1


def test_syncd_check_shows_the_cap(moto_workspace):
    ws = moto_workspace
    done = ws.syncd("check", "--config", str(ws.config), env=ws.env(SYNCD_MAX_BANDWIDTH="40M"))
    assert done.returncode == 0, done.stderr
    assert "# bandwidth: at most 40 MiB/s for every upload together" in done.stdout
    assert yaml.safe_load(done.stdout)["syncd"]["max_bandwidth"] == 40 * MiB


def test_the_relay_reaches_only_the_store():
    """Another process on the host cannot use the relay to send anything elsewhere."""

    async def ask(relay: Relay, request: bytes) -> bytes:
        port = int(relay.url.rsplit(":", 1)[1])
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(request)
        answer = await reader.readline()
        writer.close()
        return answer

    async def run() -> list[bytes]:
        storage = ObjectStorage(endpoint_url="http://127.0.0.1:9", bucket="b")
        relay = Relay(storage, DaemonSettings(max_bandwidth="1M"))
        await relay.start()
        try:
            return [
                await ask(relay, b"CONNECT example.com:443 HTTP/1.1\r\n\r\n"),
                await ask(relay, b"GET http://127.0.0.1:22/ HTTP/1.1\r\nHost: x\r\n\r\n"),
                await ask(relay, b"CONNECT 127.0.0.1:9 HTTP/1.1\r\n\r\n"),
                await ask(relay, b"CONNECT 127.0.0.1:9 HTTP/1.1\r\n"),  # and no more
            ]
        finally:
            await relay.close()

    refused, elsewhere, down, silent = asyncio.run(run())
    assert refused == elsewhere == b"HTTP/1.1 403 Forbidden\r\n"
    assert down == b"HTTP/1.1 502 Bad Gateway\r\n"  # the store's own port, where nothing listens
    assert silent == b""  # closed after 10 s without a whole head

    async def at_aws() -> list[bytes]:
        """AWS's hosts are many people's servers: only the bucket's S3 hosts and STS."""
        relay = Relay(ObjectStorage(bucket="results", region="eu-west-1"), DaemonSettings())
        await relay.start()
        try:
            return [
                await ask(relay, f"CONNECT {host}:443 HTTP/1.1\r\n\r\n".encode())
                for host in (
                    "other-bucket.s3.amazonaws.com",
                    "ec2-203-0-113-5.compute-1.amazonaws.com",
                    "results.s3.eu-west-1.amazonaws.com.evil.example",
                )
            ]
        finally:
            await relay.close()

    assert asyncio.run(at_aws()) == [b"HTTP/1.1 403 Forbidden\r\n"] * 3


@pytest.mark.parametrize("rust", [True, False], ids=["obstore", "s3fs"])
def test_a_capped_upload_to_aws_goes_through_a_tls_tunnel(tmp_path, rust):
    """At AWS's defaults (the accelerate endpoint over HTTPS, tests/accelerate.py) the relay
    tunnels TLS: the store's own answer reaches syncd, worded as without a cap."""
    result, config = accelerate.at_aws_defaults(tmp_path, rust, max_bandwidth="1M")
    sync = [*SYNCD, "sync", "--config", str(config), "--log-level", "DEBUG", str(result)]
    folder = tmp_path / "aws"
    folder.mkdir()

    done = subprocess.run(
        accelerate.reach("results", folder, shlex.join(sync)),
        env=clean_env(AWS_ACCESS_KEY_ID="AKIA0", AWS_SECRET_ACCESS_KEY="s"),
        capture_output=True,
        text=True,
        timeout=120,
    )

    assert done.returncode == 1, done.stdout + done.stderr
    assert "bandwidth relay: a tunnel to results.s3-accelerate.amazonaws.com:443" in done.stderr
    assert done.stderr.splitlines()[-1].endswith(
        "exec_1_aaaaaaaa: upload of outputs/exec_1_aaaaaaaa/a.bin failed: InvalidRequest: "
        f"{accelerate.MESSAGE}: enable Transfer Acceleration on the bucket (aws s3api "
        "put-bucket-accelerate-configuration --bucket BUCKET --accelerate-configuration "
        "Status=Enabled) or set object_storage.use_transfer_acceleration: false "
        "(OBJECT_STORAGE_TRANSFER_ACCELERATION=false)"
    )


@pytest.mark.parametrize("rust", [True, False], ids=["obstore", "s3fs"])
def test_a_store_that_is_down_behind_the_relay_is_said_as_such(moto_workspace, rust):
    ws = moto_workspace
    port = free_port()  # nothing listens here
    ws.settings["object_storage"]["endpoint_url"] = f"http://127.0.0.1:{port}"
    ws.settings["object_storage"]["use_rust_client"] = rust
    ws.settings["syncd"]["max_bandwidth"] = "1M"
    ws.result("exec_1_abcdef01", {"a": b"a"})

    done = ws.sync("exec_1_abcdef01")

    assert done.returncode == 1
    assert done.stderr.splitlines()[-1].endswith(
        "exec_1_abcdef01: upload of outputs/exec_1_abcdef01/a failed: Unreachable: the store at "
        f"127.0.0.1:{port} cannot be reached (Connection refused)"
    )


def test_a_cap_beside_a_proxy_of_the_environment_is_refused(moto_workspace):
    """The relay connects straight to the store: it must not go around the host's proxy."""
    ws = moto_workspace
    ws.settings["syncd"]["max_bandwidth"] = "40M"
    ws.result("exec_1_abcdef01", {"a": b"a"})
    error = (
        "syncd: error: syncd.max_bandwidth cannot work with $HTTPS_PROXY set: syncd's relay "
        "would reach the store without that proxy; unset max_bandwidth (and cap the rate at the "
        "proxy) or unset HTTPS_PROXY\n"
    )
    env = ws.env(HTTPS_PROXY="http://127.0.0.1:9")

    check = ws.syncd("check", "--config", str(ws.config), env=env)
    sync = ws.sync("exec_1_abcdef01", env=env)

    assert (check.returncode, check.stderr) == (2, error)
    assert sync.returncode == 2 and sync.stderr.endswith(error)
    assert ws.objects() == {}


def test_a_stop_during_a_capped_upload_is_clean_and_the_result_resumes(moto_workspace):
    ws = moto_workspace
    with Proxy(ws.server.port) as proxy:
        ws.settings["object_storage"]["endpoint_url"] = proxy.endpoint
        ws.settings["syncd"]["max_bandwidth"] = "64K"
        ws.settings["syncd"]["stop_grace"] = 1
        ws.result("exec_1_abcdef01", {"big": os.urandom(3 * MiB), "small": b"s"})
        daemon = ws.daemon()
        daemon.wait_log("syncd watching")
        ws.mark("exec_1_abcdef01")
        wait_until(lambda: proxy.sent > 100_000, what="the capped upload under way")

        assert daemon.terminate() == 0
        assert (
            daemon.log()
            .splitlines()[-1]
            .endswith("syncd stopped; 1 results left for the next start")
        )
        assert "ERROR" not in daemon.log() and "Traceback" not in daemon.log()

        ws.settings["syncd"]["max_bandwidth"] = "8M"
        again = ws.daemon()
        wait_until(lambda: ws.recorded("exec_1_abcdef01"), timeout=60, what="published")
        assert again.terminate() == 0


@pytest.mark.parametrize("rust", [True, False], ids=["obstore", "s3fs"])
def test_a_request_given_up_never_reaches_the_store_later(moto_workspace, rust):
    """At a low cap a client hands a whole file to the kernel long before the relay sends it.
    An attempt given up (here: a file gone while others were on their way) cuts its requests
    at once: the old bytes of a file rewritten since never land after the new ones."""
    ws = moto_workspace
    with Proxy(ws.server.port) as proxy:
        ws.settings["object_storage"]["endpoint_url"] = proxy.endpoint
        ws.settings["object_storage"]["use_rust_client"] = rust
        ws.settings["syncd"]["max_bandwidth"] = "64K"  # two files in flight
        # b takes 48 s at the cap: longer than the retry waits for the tree to be quiet.
        tree = ws.result("exec_1_abcdef01", {"a": os.urandom(100_000), "b": os.urandom(3 * MiB)})
        (tree / "c").write_bytes(b"c")  # waits for a slot behind a and b
        daemon = ws.daemon()
        daemon.wait_log("syncd watching")
        ws.mark("exec_1_abcdef01")
        wait_until(lambda: proxy.sent > 50_000, what="a and b on their way")

        (tree / "c").unlink()
        new = os.urandom(100_000)
        (tree / "b").write_bytes(new)
        wait_until(lambda: ws.recorded("exec_1_abcdef01"), timeout=90, what="published")

        def quiet() -> bool:  # nothing more goes to the store for 2 s
            before = proxy.sent
            time.sleep(2)
            return proxy.sent == before

        wait_until(quiet, timeout=90, what="the link quiet")
        assert ws.objects()["outputs/exec_1_abcdef01/b"] == new
        assert daemon.terminate() == 0
