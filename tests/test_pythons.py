"""syncd under the python3 a host ships, not only the one the tests run on: Debian 12's is
CPython 3.11.2, whose exception groups differ from later 3.11s in ways a user reads."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from tests.pushback import PushBack

ROOT = Path(__file__).resolve().parents[1]
DEBIAN_PYTHON = Path("/usr/bin/python3")


@pytest.fixture(scope="session")
def debian_syncd(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    """`syncd` in a venv of Debian's python3, installed as the README installs it."""
    venv = tmp_path_factory.mktemp("debian-python") / "venv"
    subprocess.run([str(DEBIAN_PYTHON), "-m", "venv", str(venv)], check=True)
    python = str(venv / "bin" / "python")
    install = [python, "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
    subprocess.run(
        [*install, "-c", str(ROOT / "constraints.txt"), "-e", f"{ROOT}[daemon]"],
        check=True,
        timeout=600,
    )
    return [python, "-m", "syncd"]


@pytest.mark.parametrize("rust", [True, False], ids=["obstore", "s3fs"])
def test_an_upload_that_fails_says_why_on_debians_python(moto_workspace, debian_syncd, rust):
    """One file the store keeps refusing: the line names it and the store's answer (CPython
    before 3.11.4 wrapped it in an ExceptionGroup: "unexpected error ExceptionGroup")."""
    ws = moto_workspace
    ws.result("exec_1_abcdef01", {f"{i}.bin": os.urandom(1024) for i in range(8)})
    with PushBack(ws.server.port, broken="3.bin", broken_times=100) as store:
        ws.settings["object_storage"]["endpoint_url"] = store.endpoint
        ws.settings["object_storage"]["use_rust_client"] = rust
        command = [*debian_syncd, "sync", "--config", str(ws.config)]
        done = subprocess.run(
            [*command, str(ws.outputs / "exec_1_abcdef01")],
            env=ws.env(),
            capture_output=True,
            text=True,
            timeout=180,
            cwd=ws.root,
        )

    assert done.returncode == 1, done.stderr
    assert (
        "exec_1_abcdef01: upload of outputs/exec_1_abcdef01/3.bin failed: InternalError"
        in done.stderr
    ), done.stderr
    assert "unexpected error" not in done.stderr
    assert ws.metadata("exec_1_abcdef01").get("storage_type") != "s3"
