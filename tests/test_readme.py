"""The README's first command: the demo runs syncd's main job end to end on this machine."""

from __future__ import annotations

import subprocess
from pathlib import Path

from tests.conftest import clean_env

ROOT = Path(__file__).resolve().parents[1]


def test_demo_uploads_records_and_signs(tmp_path):
    done = subprocess.run(
        [str(ROOT / "scripts" / "demo.sh")],
        env=clean_env(DEMO_DIR=str(tmp_path / "demo")),
        capture_output=True,
        text=True,
        timeout=300,
    )

    assert done.returncode == 0, done.stdout + done.stderr
    assert "== syncd stopped on SIGTERM with exit code 0" in done.stdout
    assert "== bucket copy is byte-identical to the local tree" in done.stdout
    assert '"storage_type": "s3"' in done.stdout
    assert "\n1 results: 1 done\n" in done.stdout
    assert "== signed URL verified with the public key: covers https://" in done.stdout
    assert "exec_1769560728_10ed9d3c: uploaded 4 files, 524460 bytes" in done.stderr
    assert processes_mentioning(str(tmp_path / "demo")) == []  # servers and daemon stopped


def processes_mentioning(text: str) -> list[str]:
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            args = cmdline.read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue  # the process ended while we looked
        if text in args:
            found.append(args)
    return found
