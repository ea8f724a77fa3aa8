"""What an operator watches: the Prometheus endpoint and textfile, and systemd's STATUS= line,
read from the real daemon while results flow and fail."""

from __future__ import annotations

import itertools
import json
import os
import re
import socket
import sqlite3
import time

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from tests.proxy import Proxy
from tests.servers import free_port, wait_until

FAMILIES = {
    "syncd_results",
    "syncd_oldest_unpublished_age_seconds",
    "syncd_last_publish_timestamp_seconds",
    "syncd_published_results",
    "syncd_published_files",
    "syncd_published_bytes",
    "syncd_failures",
    "syncd_upload_duration_seconds",
    "syncd_records_restored",
    "syncd_signed_urls_renewed",
    "syncd_lost_event_rescans",
    "syncd_outputs_free_bytes",
}


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of an exposition, parsed by prometheus_client, by name and labels."""
    found = {}
    families = list(text_string_to_metric_families(text))
    assert {f.name for f in families} >= FAMILIES, sorted(f.name for f in families)
    for family in families:
        for sample in family.samples:
            found[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return found


def value(found: dict, name: str, **labels: str) -> float:
    return found[(name, tuple(sorted(labels.items())))]


def scrape(address: str) -> dict:
    answer = requests.get(f"http://{address}/metrics", timeout=10)
    assert answer.status_code == 200
    assert answer.headers["Content-Type"].startswith("text/plain")
    return samples(answer.text)


def test_metrics_while_results_flow_and_fail(moto_workspace, tmp_path):
    ws = moto_workspace
    address = f"127.0.0.1:{free_port()}"
    prom = tmp_path / "textfile" / "syncd.prom"
    prom.parent.mkdir()
    ws.settings["syncd"].update(
        metrics_address=address, metrics_file=str(prom), resign_fraction=0.5
    )
    ws.settings["object_storage"]["signed_url_expires_in"] = 4  # renewed every 2 s
    ws.result("exec_1_abcdef01", {"a": b"a" * 1000, "b/c": b"c" * 24})
    ws.result("exec_2_abcdef02", {"x": b"x"}, metadata="{broken")
    an_hour_ago = time.time() - 3600
    os.utime(ws.mark("exec_2_abcdef02"), (an_hour_ago, an_hour_ago))
    started = time.time()

    daemon = ws.daemon()
    wait_until(lambda: prom.exists(), what="the textfile")
    ws.mark("exec_1_abcdef01")
    wait_until(lambda: ws.recorded("exec_1_abcdef01"))
    # The textfile is replaced whole: every read of it while the daemon writes parses.
    reads = 0
    while reads < 300 or value(samples(prom.read_text()), "syncd_signed_urls_renewed_total") < 1:
        samples(prom.read_text())
        reads += 1
    found = wait_until(
        lambda: (
            (s := scrape(address))
            and value(s, "syncd_results", state="retrying") == 1
            and value(s, "syncd_results", state="done") == 1
            and s
        ),
        what="one result done and one retrying",
    )
    assert value(found, "syncd_published_results_total") == 1
    assert value(found, "syncd_published_files_total") == 2
    assert value(found, "syncd_published_bytes_total") == 1024
    assert value(found, "syncd_upload_duration_seconds_count") == 1
    assert started <= value(found, "syncd_last_publish_timestamp_seconds") <= time.time()
    # The broken one was finished an hour ago and is still not published.
    assert value(found, "syncd_oldest_unpublished_age_seconds") >= 3600
    assert value(found, "syncd_failures_total", kind="input") >= 1
    assert value(found, "syncd_failures_total", kind="transient") == 0
    assert value(found, "syncd_signed_urls_renewed_total") >= 1
    assert value(found, "syncd_lost_event_rescans_total") == 0
    free = os.statvfs(ws.outputs)
    assert abs(value(found, "syncd_outputs_free_bytes") - free.f_bavail * free.f_frsize) < 2**30
    assert value(found, "process_resident_memory_bytes") > 0

    assert daemon.terminate() == 0
    with pytest.raises(requests.ConnectionError):
        requests.get(f"http://{address}/metrics", timeout=5)  # stopped with the daemon
    last = samples(prom.read_text())
    assert value(last, "syncd_published_results_total") == 1
    # node_exporter has process_* of its own, and refuses a textfile that names them again.
    assert {name for name, _ in last} == {name for name, _ in found if name.startswith("syncd_")}
    assert not [p for p in prom.parent.iterdir() if p != prom]  # no temp file left


def test_metrics_settings_that_cannot_work_stop_the_start(moto_workspace, tmp_path):
    ws = moto_workspace
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        ws.settings["syncd"]["metrics_address"] = f"127.0.0.1:{port}"
        done = ws.syncd("run", "--config", str(ws.config), timeout=60)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1] == (
        f"syncd: error: syncd.metrics_address 127.0.0.1:{port}: cannot listen (Address already "
        "in use); choose a free port or an address of this host"
    )

    ws.settings["syncd"]["metrics_address"] = "9464"
    done = ws.syncd("run", "--config", str(ws.config), timeout=60)
    assert done.returncode == 2
    assert "metrics_address" in done.stderr and "must be host:port" in done.stderr

    del ws.settings["syncd"]["metrics_address"]
    ws.settings["syncd"]["metrics_file"] = str(tmp_path / "missing" / "syncd.prom")
    for command in ("run", "check"):  # check finds it without starting
        done = ws.syncd(command, "--config", str(ws.config), timeout=60)
        assert done.returncode == 2
        assert "metrics not written" not in done.stderr  # the one line says it all
        assert done.stderr.strip().splitlines()[-1] == (
            f"syncd: error: syncd.metrics_file {tmp_path}/missing/syncd.prom: cannot write it "
            "(No such file or directory); create its folder or make it writable for syncd"
        )
    del ws.settings["syncd"]["metrics_file"]
    ws.settings["syncd"]["metrics_address"] = "no-such-host.invalid:9464"
    checked = ws.syncd("check", "--config", str(ws.config), timeout=60)
    assert checked.returncode == 2
    assert (
        checked.stderr.strip()
        .splitlines()[-1]
        .startswith(
            "syncd: error: syncd.metrics_address no-such-host.invalid:9464: cannot listen ("
        )
    )
    del ws.settings["syncd"]["metrics_address"]

    ws.settings["syncd"]["metrics_file"] = str(tmp_path / "syncd.txt")
    done = ws.syncd("run", "--config", str(ws.config), timeout=60)
    assert done.returncode == 2
    assert "must be a *.prom file" in done.stderr


def test_a_full_disk_under_the_textfile_is_one_warning_and_the_daemon_goes_on(
    moto_workspace, tmpfs
):
    ws = moto_workspace
    textfile = tmpfs.mount(ws.root / "textfile", size="64k")
    ws.settings["syncd"]["metrics_file"] = str(textfile / "syncd.prom")
    daemon = ws.daemon()
    wait_until(lambda: (textfile / "syncd.prom").exists())
    (textfile / "syncd.prom").unlink()
    filler = tmpfs.fill(textfile)

    daemon.wait_log("metrics not written: ")
    ws.result("exec_1_abcdef01", {"a": b"a"})
    ws.mark("exec_1_abcdef01")
    wait_until(lambda: ws.recorded("exec_1_abcdef01"))
    filler.unlink()
    daemon.wait_log(f"metrics written to {textfile / 'syncd.prom'} again")
    assert daemon.terminate() == 0
    assert daemon.log().count("metrics not written: ") == 1
    assert value(samples((textfile / "syncd.prom").read_text()), "syncd_published_results_total")


def test_status_line_says_what_is_happening(moto_workspace, notify_socket):
    ws = moto_workspace

    def status(predicate) -> str:
        notify_socket.receive(
            lambda _: bool(notify_socket.statuses()) and predicate(notify_socket.statuses()[-1])
        )
        return notify_socket.statuses()[-1]

    daemon = ws.daemon(env=ws.env(NOTIFY_SOCKET=notify_socket.address))
    status(lambda s: s == "idle; nothing published since start")
    ws.result("exec_2_abcdef02", {"x": b"x"}, metadata="{broken")
    ws.mark("exec_2_abcdef02")
    status(lambda s: s.startswith("1 failing;"))
    ws.result("exec_1_abcdef01", {"a": b"a"})
    ws.mark("exec_1_abcdef01")
    line = status(lambda s: "last published" in s)
    assert line.startswith("1 failing; last published exec_1_abcdef01 ")
    assert daemon.terminate() == 0
    # Sent when it changes, at most once a second.
    statuses = notify_socket.statuses()
    assert all(a != b for a, b in itertools.pairwise(statuses))


def test_an_upload_shows_its_bytes_and_rate_in_status_and_the_status_line(
    moto_workspace, notify_socket
):
    """Through a link of 2 MB/s, a 24 MB result of 96 files is seen part way: `syncd status`
    and the STATUS= line give the bytes the store acknowledged of the total, and a rate near
    the link's (files in flight count once acknowledged, so it lags a little)."""
    ws = moto_workspace
    with Proxy(ws.server.port, rate=2_000_000) as proxy:
        ws.settings["object_storage"]["endpoint_url"] = proxy.endpoint
        ws.settings["object_storage"]["max_concurrency"] = 1  # 2 MB in flight, not the tree
        ws.result("exec_1_abcdef01", {f"c/{i}": os.urandom(250_000) for i in range(96)})
        daemon = ws.daemon(env=ws.env(NOTIFY_SOCKET=notify_socket.address))
        daemon.wait_log("syncd watching")
        ws.mark("exec_1_abcdef01")

        def latest() -> str:
            return (notify_socket.statuses() or [""])[-1]

        def sent() -> int:
            match = re.search(r"\((\d+)/24 MB", latest())
            return int(match[1]) if match else 0

        notify_socket.receive(lambda _: sent() >= 8 or "last published" in latest())
        assert re.fullmatch(
            r"1 uploading \(\d+/24 MB, (1\.\d|2\.[0-4]) MB/s\); nothing published since start",
            latest(),
        ), latest()
        table = ws.syncd("status", "--config", str(ws.config))
        assert table.returncode == 0, table.stderr
        header, row, summary = table.stdout.splitlines()
        assert header.split() == [
            "RESULT",
            "STATE",
            "ATTEMPTS",
            "PROGRESS",
            "NEXT",
            "TRY",
            "LAST",
            "ERROR",
        ]
        assert re.fullmatch(
            r"exec_1_abcdef01  uploading  0 +\d+/24 MB (1\.\d|2\.[0-4]) MB/s +- +-", row
        ), row
        assert summary == "1 results: 1 uploading"
        (record,) = json.loads(ws.syncd("status", "--config", str(ws.config), "--json").stdout)
        assert record["state"] == "uploading" and record["bytes"] == 24_000_000
        assert 0 < record["sent"] < 24_000_000 and 1.0e6 < record["rate"] < 2.5e6
        wait_until(lambda: ws.recorded("exec_1_abcdef01"), timeout=60, what="published")
        assert daemon.terminate() == 0  # though the notify socket is read no more
    (record,) = json.loads(ws.syncd("status", "--config", str(ws.config), "--json").stdout)
    assert (record["state"], record["sent"], record["rate"]) == ("done", None, None)


def test_a_lock_held_on_the_journal_does_not_hold_up_the_progress(moto_workspace, notify_socket):
    """Another process holding the state file's write lock (a `syncd sync` recording, an
    operator's sqlite3) while an upload runs: the daemon goes on saying how far it is."""
    ws = moto_workspace
    with Proxy(ws.server.port, rate=1_000_000) as proxy:
        ws.settings["object_storage"]["endpoint_url"] = proxy.endpoint
        ws.settings["object_storage"]["max_concurrency"] = 1
        ws.result("exec_1_abcdef01", {f"c/{i}": os.urandom(250_000) for i in range(40)})
        daemon = ws.daemon(env=ws.env(NOTIFY_SOCKET=notify_socket.address))
        daemon.wait_log("syncd watching")
        ws.mark("exec_1_abcdef01")
        notify_socket.receive(
            lambda _: re.search(
                r"uploading \([1-9]\d*/10 MB", (notify_socket.statuses() or [""])[-1]
            )
        )

        lock = sqlite3.connect(ws.root / "state" / "state.db", isolation_level=None)
        lock.execute("BEGIN IMMEDIATE")
        before = len(notify_socket.statuses())
        held = time.monotonic()
        notify_socket.receive(lambda _: time.monotonic() > held + 4)
        lock.execute("ROLLBACK")
        lock.close()

        assert len(notify_socket.statuses()) - before >= 3  # one a second, lock or not
        wait_until(lambda: ws.recorded("exec_1_abcdef01"), timeout=60, what="published")
    assert daemon.terminate() == 0
