"""Scale: a tree of 100,000 files is published whole, with memory that stays bounded."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pytest

from tests.conftest import SYNCD

FILES = 100_000
RSS_LIMIT_MB = 400  # about 2.5 KB a file: the file list, the listing, the metadata it writes


@pytest.mark.slow
def test_100000_files_are_published_with_bounded_memory(rclone_workspace, tmp_path):
    ws = rclone_workspace
    tree = ws.outputs / "exec_1_abcdef01" / "results.zarr"
    for folder in range(100):
        (tree / f"v{folder}").mkdir(parents=True)
        for chunk in range(FILES // 100):
            (tree / f"v{folder}" / f"{chunk}.0").write_bytes(b"%d" % chunk)

    log = tmp_path / "sync.log"
    with open(log, "wb") as out:
        process = subprocess.Popen(
            [*SYNCD, "sync", "--config", str(ws.config), str(ws.outputs / "exec_1_abcdef01")],
            env=ws.env(),
            stdout=out,
            stderr=out,
        )
    peak_mb = 0.0
    while process.poll() is None:  # sample the high-water mark until it exits
        peak_mb = max(peak_mb, high_water_mb(process.pid))
        time.sleep(0.2)
    assert process.returncode == 0, log.read_text()
    assert 0 < peak_mb < RSS_LIMIT_MB, peak_mb

    recorded = ws.metadata("exec_1_abcdef01")["output_files"]
    assert len(recorded) == FILES
    assert (
        sum(f["size"] for f in recorded)
        == sum(len(b"%d" % chunk) for chunk in range(FILES // 100)) * 100
    )
    listed = sum(
        len(page.get("Contents", []))
        for page in ws.server.client()
        .get_paginator("list_objects_v2")
        .paginate(Bucket=ws.bucket, Prefix="outputs/exec_1_abcdef01/")
    )
    assert listed == FILES


def high_water_mb(pid: int) -> float:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return 0.0  # it just exited
    return next(
        (int(line.split()[1]) / 1024 for line in status.splitlines() if line.startswith("VmHWM:")),
        0.0,
    )
