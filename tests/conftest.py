"""Fixtures: real S3 servers on loopback, a CloudFront key pair, and a workspace that drives the
real `syncd` command in a subprocess."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from syncd.policy import expiry
from tests.cloudfront import CloudFrontStandIn
from tests.servers import KEY, SECRET, S3Server, wait_until
from tests.unit import NOBODY, as_unit_user

SYNCD = [sys.executable, "-m", "syncd"]
KEY_PAIR_ID = "KTESTKEYPAIR1"
OWN_ENV = ("AWS_", "OBJECT_STORAGE_", "CLOUDFRONT_", "SYNCD_")


@pytest.fixture(scope="session")
def servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, S3Server]]:
    root = tmp_path_factory.mktemp("servers")
    started = {name: S3Server(name, root / name).start() for name in ("moto", "rclone")}
    yield started
    for server in started.values():
        server.stop()


@pytest.fixture(params=["moto", "rclone"])
def server(request: pytest.FixtureRequest, servers: dict[str, S3Server]) -> S3Server:
    return servers[request.param]


@pytest.fixture
def moto(servers: dict[str, S3Server]) -> S3Server:
    return servers["moto"]


@pytest.fixture(scope="session")
def signing_key(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, rsa.RSAPrivateKey]:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    path = tmp_path_factory.mktemp("keys") / "cloudfront-private-key.pem"
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.TraditionalOpenSSL,
            serialization.NoEncryption(),
        )
    )
    return path, key


def clean_env(**extra: str) -> dict[str, str]:
    """The test process's environment without any setting syncd reads, plus `extra`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(OWN_ENV)}
    env.update(extra)
    return env


class DaemonProcess:
    """`syncd run` in the background, its stderr in a file; `config` is its config file."""

    def __init__(self, args: list[str], env: dict[str, str], log: Path, config: Path) -> None:
        self.log_path = log
        self.config = config
        with open(log, "wb") as out:
            self.process = subprocess.Popen(
                args, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_log(self, text: str, timeout: float = 60) -> str:
        def seen() -> bool:
            if self.process.poll() is not None and text not in self.log():
                raise AssertionError(f"syncd exited {self.process.returncode}:\n{self.log()}")
            return text in self.log()

        wait_until(seen, timeout, what=f"{text!r} in the daemon's log")
        return self.log()

    def terminate(self, timeout: float = 30) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()
            raise AssertionError(f"syncd did not stop on SIGTERM:\n{self.log()}") from None


class Workspace:
    """An outputs dir, a fresh bucket on one server, a config file, and ways to run syncd."""

    def __init__(self, root: Path, server: S3Server, key_path: Path) -> None:
        self.root = root
        self.outputs = root / "outputs"
        self.outputs.mkdir()
        self.server = server
        self.bucket = server.new_bucket()
        self.key_path = key_path
        self.daemons: list[DaemonProcess] = []
        self.configs = 0
        self.settings: dict[str, dict[str, Any]] = {
            "object_storage": {
                "enabled": True,
                "bucket": self.bucket,
                "endpoint_url": server.endpoint,
                "access_key_id": KEY,
                "secret_access_key": SECRET,
                "use_transfer_acceleration": False,
                "cloudfront_domain": "https://d111111abcdef8.cloudfront.net",
                "cloudfront_key_pair_id": KEY_PAIR_ID,
                "cloudfront_private_key_path": str(key_path),
            },
            "syncd": {
                "outputs_dir": str(self.outputs),
                "state_dir": str(root / "state"),
                "rescan_interval": 60,
            },
        }

    @property
    def config(self) -> Path:
        """The settings as they are now, in a file of their own (a daemon started earlier
        may not have read its file yet)."""
        self.configs += 1
        path = self.root / f"config-{self.configs}.yaml"
        path.write_text(yaml.safe_dump(self.settings))
        return path

    def result(self, rel: str, files: dict[str, bytes] | None = None, metadata: Any = ...) -> Path:
        """Write an exec tree (and, unless metadata=None, its metadata JSON) under outputs."""
        tree = self.outputs / rel
        files = (
            files
            if files is not None
            else {
                "results.zarr/.zgroup": b'{"zarr_format": 2}',
                "results.zarr/t2m/.zarray": b'{"chunks": [1, 4]}',
                "results.zarr/t2m/0.0": os.urandom(70_000),
            }
        )
        for name, data in files.items():
            (tree / name).parent.mkdir(parents=True, exist_ok=True)
            (tree / name).write_bytes(data)
        tree.mkdir(parents=True, exist_ok=True)
        if metadata is ...:
            metadata = {"request_id": tree.name, "status": "completed", "storage_type": "server"}
        if metadata is not None:
            path = self.metadata_path(rel)
            path.write_text(metadata if isinstance(metadata, str) else json.dumps(metadata))
            if isinstance(metadata, str):
                # Text given as it is is a broken file; one that just changed counts as still
                # being written, so make it one that has been broken for an hour.
                an_hour_ago = time.time() - 3600
                os.utime(path, (an_hour_ago, an_hour_ago))
        return tree

    def mark(self, rel: str) -> Path:
        """Drop the completion marker by rename, as workflows do."""
        marker = self.outputs / f"{rel}.done"
        tmp = marker.parent / f".{marker.name}.tmp"
        tmp.write_text("")
        os.rename(tmp, marker)
        return marker

    def metadata_path(self, rel: str) -> Path:
        """Where syncd reads and writes the result's metadata, as configured."""
        template = self.settings["syncd"].get("metadata_file", "{exec_path}.json")
        workflow, _, name = rel.rpartition("/")
        return self.outputs / template.format(exec=name, exec_path=rel, workflow=workflow)

    def metadata(self, rel: str) -> dict[str, Any]:
        return json.loads(self.metadata_path(rel).read_text())

    def renewed_url(self, rel: str, first_expiry: int, timeout: float = 20) -> str:
        """The result's signed URL once the daemon renewed it past `first_expiry`, given once
        that first URL has expired."""
        wait_until(
            lambda: expiry(self.metadata(rel)["signed_url"]) > first_expiry,
            timeout=timeout,
            what=f"{rel}'s URL renewed",
        )
        renewed: str = self.metadata(rel)["signed_url"]
        while time.time() < first_expiry + 0.5:  # the first URL's own expiry
            time.sleep(0.1)
        return renewed

    def recorded(self, rel: str) -> bool:
        try:
            return self.metadata(rel).get("storage_type") == "s3"
        except (FileNotFoundError, json.JSONDecodeError):
            return False

    def objects(self, prefix: str = "") -> dict[str, bytes]:
        return self.server.objects(self.bucket, prefix)

    def env(self, **extra: str) -> dict[str, str]:
        return clean_env(**extra)

    def syncd(
        self,
        *args: str,
        env: dict[str, str] | None = None,
        timeout: float = 180,
        as_unit: bool = False,
        groups: tuple[int, ...] = (),
    ):
        """`syncd ARGS`; with as_unit=True as the shipped unit runs it (tests/unit.py), in
        `groups` besides its own."""
        command = [*SYNCD, *args]
        return subprocess.run(
            as_unit_user(command, groups=groups) if as_unit else command,
            env=env or self.env(),
            capture_output=True,
            text=True,
            timeout=timeout,
            cwd=self.root,
        )

    def sync(self, *rels: str, env: dict[str, str] | None = None):
        return self.syncd(
            "sync", "--config", str(self.config), *(str(self.outputs / r) for r in rels), env=env
        )

    def sync_in_background(self, *rels: str) -> subprocess.Popen:
        """`syncd sync` of these results, left running; its output in .communicate()."""
        return subprocess.Popen(
            [*SYNCD, "sync", "--config", str(self.config), *(str(self.outputs / r) for r in rels)],
            env=self.env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=self.root,
        )

    def daemon(
        self, env: dict[str, str] | None = None, journal: bool = False, as_unit: bool = False
    ) -> DaemonProcess:
        """`syncd run`; with journal=True its stderr looks to it like systemd's journal stream,
        with as_unit=True it runs as the shipped unit runs it (tests/unit.py)."""
        log = self.root / f"daemon-{len(self.daemons)}.log"
        env = env or self.env()
        if journal:
            log.touch()
            env["JOURNAL_STREAM"] = f"{log.stat().st_dev}:{log.stat().st_ino}"
        config = self.config
        command = [*SYNCD, "run", "--config", str(config)]
        process = DaemonProcess(as_unit_user(command) if as_unit else command, env, log, config)
        self.daemons.append(process)
        return process

    def cloudfront(self, key: rsa.RSAPrivateKey) -> CloudFrontStandIn:
        """A CloudFront stand-in in front of this bucket; syncd signs URLs for its domain."""
        stand_in = CloudFrontStandIn(
            self.server.client(), self.bucket, KEY_PAIR_ID, key.public_key()
        )
        self.settings["object_storage"]["cloudfront_domain"] = stand_in.domain
        return stand_in

    def kill_daemons(self) -> None:
        for daemon in self.daemons:
            if daemon.process.poll() is None:
                os.killpg(daemon.process.pid, signal.SIGKILL)
                daemon.process.wait()


@pytest.fixture
def workspace(tmp_path: Path, server: S3Server, signing_key) -> Iterator[Workspace]:
    """A workspace on each of the two servers."""
    ws = Workspace(tmp_path, server, signing_key[0])
    yield ws
    ws.kill_daemons()


@pytest.fixture
def rclone_workspace(tmp_path: Path, servers, signing_key) -> Iterator[Workspace]:
    """A workspace on rclone only: unlike moto, it checks access keys."""
    ws = Workspace(tmp_path, servers["rclone"], signing_key[0])
    yield ws
    ws.kill_daemons()


@pytest.fixture
def moto_workspace(tmp_path: Path, moto: S3Server, signing_key) -> Iterator[Workspace]:
    """A workspace on moto only, for behaviour that does not depend on the server."""
    ws = Workspace(tmp_path, moto, signing_key[0])
    yield ws
    ws.kill_daemons()


@pytest.fixture
def unit_workspace(moto: S3Server, signing_key) -> Iterator[Workspace]:
    """A moto workspace that the shipped unit's user (nobody) can use as the install makes it:
    it owns outputs_dir and state_dir, and reads the config and the key."""
    root = Path(tempfile.mkdtemp(prefix="syncd-unit-"))
    root.chmod(0o755)  # pytest's own folders are root's alone
    key = root / "cloudfront-private-key.pem"
    key.write_bytes(signing_key[0].read_bytes())
    key.chmod(0o644)
    ws = Workspace(root, moto, key)
    (root / "state").mkdir()
    for folder in (ws.outputs, root / "state"):
        os.chown(folder, NOBODY, NOBODY)
    yield ws
    ws.kill_daemons()
    shutil.rmtree(root)


class Tmpfs:
    """A small tmpfs mounted for one test (a real full disk), always unmounted after it."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.mounted: list[Path] = []

    def mount(self, path: Path, size: str = "1m") -> Path:
        path.mkdir(parents=True, exist_ok=True)
        done = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
            capture_output=True,
            text=True,
        )
        if done.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here (needs root): {done.stderr.strip()}")
        self.mounted.append(path)
        return path

    def read_only(self, path: Path) -> None:
        subprocess.run(["mount", "-o", "remount,ro", str(path)], check=True)

    def fill(self, path: Path) -> Path:
        """Fill the filesystem of `path` with one file; remove that file to free it."""
        filler = path / ".filler"
        with open(filler, "wb", buffering=0) as f:  # unbuffered: nothing left for close
            for size in (65536, 4096, 1):  # to the last byte
                try:
                    while True:
                        f.write(b"\0" * size)
                except OSError:
                    pass
        return filler

    def unmount_all(self) -> None:
        for path in reversed(self.mounted):
            subprocess.run(["umount", "-l", str(path)], capture_output=True)


@pytest.fixture
def tmpfs(tmp_path: Path) -> Iterator[Tmpfs]:
    mounts = Tmpfs(tmp_path)
    yield mounts
    mounts.unmount_all()


def forecast() -> Any:
    """A small forecast as a model writes it, for results opened with xarray."""
    import numpy as np
    import xarray as xr

    rng = np.random.default_rng(0)
    return xr.Dataset(
        {"t2m": (("lead_time", "lat", "lon"), rng.random((3, 16, 32), dtype=np.float32))},
        coords={
            "lead_time": np.arange(3) * 6,
            "lat": np.linspace(-90, 90, 16),
            "lon": np.linspace(0, 360, 32, endpoint=False),
        },
    )


class NotifySocket:
    """systemd's notify socket, as the daemon sees it under a Type=notify unit."""

    def __init__(self, path: Path) -> None:
        self.address = str(path)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.address)
        self.sock.settimeout(30)
        self.messages: list[str] = []  # each datagram, as received

    def receive(self, done: Any) -> None:
        """Receive until `done(messages)` holds (or fail after 30 s without a message)."""
        while not done(self.messages):
            self.messages.append(self.sock.recv(4096).decode())

    def statuses(self) -> list[str]:
        """Every STATUS= value received, in order."""
        return [
            line.removeprefix("STATUS=")
            for message in self.messages
            for line in message.splitlines()
            if line.startswith("STATUS=")
        ]


@pytest.fixture
def notify_socket(tmp_path: Path) -> Iterator[NotifySocket]:
    notify = NotifySocket(tmp_path / "notify.sock")
    yield notify
    notify.sock.close()


def md5(data: bytes) -> str:
    """An `output_files` entry's checksum of `data`."""
    return hashlib.md5(data).hexdigest()


def status_of(ws: Workspace) -> dict[str, dict]:
    """`syncd status --json` by result."""
    done = ws.syncd("status", "--config", str(ws.config), "--json")
    assert done.returncode == 0, done.stderr
    return {r["rel"]: r for r in json.loads(done.stdout)}


def only_error(log: str) -> str:
    """The one ERROR line of a log (a failure a person must fix is logged once)."""
    errors = [line for line in log.splitlines() if " ERROR " in line]
    assert len(errors) == 1, errors
    return errors[0]
