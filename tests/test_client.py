"""syncd.client as a scientist uses it: open results with xarray, through a CloudFront stand-in
that checks every signature, or from the server's outputs."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import numpy as np
import pytest
import requests
import xarray as xr

from syncd.client import (
    AccessError,
    ChecksumError,
    SignedHTTPFileSystem,
    create_cloudfront_mapper,
    download_result,
    file_url,
    open_dataset,
)
from syncd.policy import expiry
from tests.conftest import forecast

EXEC = "exec_1769560728_10ed9d3c"


@pytest.fixture
def published(moto_workspace, signing_key):
    """A real Zarr result, uploaded by syncd, behind a CloudFront stand-in."""
    ws = moto_workspace
    with ws.cloudfront(signing_key[1]) as cloudfront:
        tree = ws.result(f"wf/{EXEC}", {})
        forecast().to_zarr(
            tree / "results.zarr",
            consolidated=True,
            zarr_format=2,
            encoding={"t2m": {"chunks": (1, 16, 32)}},
        )
        assert ws.sync(f"wf/{EXEC}").returncode == 0
        yield ws, cloudfront, ws.metadata(f"wf/{EXEC}")


def test_open_dataset_over_the_signed_url_equals_the_local_copy(published):
    _, cloudfront, meta = published

    ds = open_dataset(meta)

    assert not [p for p in cloudfront.served if "/t2m/0." in p]  # no chunk read yet: lazy
    xr.testing.assert_identical(ds.load(), forecast())
    assert [p for p in cloudfront.served if "/t2m/0." in p]
    assert cloudfront.refusals == []


def test_mapper_as_in_the_seed(published):
    _, _, meta = published
    mapper = create_cloudfront_mapper(meta["signed_url"], zarr_path="results.zarr")
    ds = xr.open_zarr(mapper, consolidated=True)
    np.testing.assert_array_equal(ds["t2m"].values, forecast()["t2m"].values)


def test_download_result_takes_manifest_paths_or_paths_in_the_result(published):
    ws, _, meta = published
    local = ws.outputs / "wf" / EXEC / "results.zarr" / ".zmetadata"
    assert download_result(meta, f"{EXEC}/results.zarr/.zmetadata") == local.read_bytes()
    assert download_result(meta, "results.zarr/.zmetadata") == local.read_bytes()
    for entry in meta["output_files"][:5]:
        assert len(download_result(meta, entry["path"])) == entry["size"]


def test_a_file_damaged_in_the_bucket_is_refused_by_its_md5(published):
    ws, _, meta = published
    key = f"outputs/wf/{EXEC}/results.zarr/t2m/1.0.0"
    original = ws.objects(key)[key]
    damaged = bytes([original[0] ^ 0xFF]) + original[1:]  # same size, one byte flipped
    ws.server.client().put_object(Bucket=ws.bucket, Key=key, Body=damaged)

    with pytest.raises(ChecksumError, match=r"results\.zarr/t2m/1\.0\.0: the bytes read .* MD5"):
        download_result(meta, "results.zarr/t2m/1.0.0")
    ds = open_dataset(meta)
    with pytest.raises(ChecksumError, match=r"t2m/1\.0\.0"):
        ds.load()
    # The other files still read, each checked.
    assert (
        download_result(meta, "results.zarr/t2m/0.0.0")
        == ws.objects(key[:-5] + "0.0.0")[key[:-5] + "0.0.0"]
    )


def test_transient_errors_are_retried(published):
    _, cloudfront, meta = published
    cloudfront.fail_next = 2
    assert download_result(meta, "results.zarr/.zgroup") == b'{\n  "zarr_format": 2\n}'
    assert cloudfront.fail_next == 0


def test_a_missing_file_under_a_valid_url_is_file_not_found(published):
    _, _, meta = published
    with pytest.raises(FileNotFoundError):
        download_result(meta, "results.zarr/no-such-key")


def test_an_expired_url_says_it_expired(moto_workspace, signing_key):
    ws = moto_workspace
    ws.settings["object_storage"]["signed_url_expires_in"] = 1
    with ws.cloudfront(signing_key[1]) as cloudfront:
        ws.result(EXEC, {"results.zarr/.zgroup": b"{}"})
        assert ws.sync(EXEC).returncode == 0
        meta = ws.metadata(EXEC)
        expires = expiry(meta["signed_url"])
        while time.time() < expires:  # the URL's own expiry
            time.sleep(0.1)
        with pytest.raises(AccessError, match=r"^the signed URL expired at .*: fetch the result"):
            download_result(meta, "results.zarr/.zgroup")
    assert cloudfront.refusals == ["expired"]


def test_a_path_outside_the_url_says_it_is_not_covered(published):
    _, cloudfront, meta = published
    fs = SignedHTTPFileSystem(meta["signed_url"])
    other = meta["signed_url"].partition("?")[0].replace(EXEC, "exec_1769560729_ffffffff")
    with pytest.raises(AccessError, match=rf"^the signed URL covers .*/wf/{EXEC}/\*, not "):
        fs.cat_file(other.removesuffix("*") + "results.zarr/.zgroup")
    assert cloudfront.refusals[-1].endswith("is not covered by " + meta["signed_url"].split("?")[0])


def test_results_kept_on_the_server_open_the_same_way(moto_workspace):
    ws = moto_workspace
    tree = ws.result(f"wf/{EXEC}", {})
    forecast().to_zarr(tree / "results.zarr", consolidated=True, zarr_format=2)
    meta = {
        "request_id": EXEC,
        "status": "completed",
        "storage_type": "server",
        "workflow_name": "wf",
        "output_files": [
            {"path": f"{EXEC}/{p.relative_to(tree).as_posix()}", "size": p.stat().st_size}
            for p in sorted(tree.rglob("*"))
            if p.is_file()
        ],
    }

    xr.testing.assert_identical(open_dataset(meta, outputs=ws.outputs).load(), forecast())
    zgroup = (tree / "results.zarr" / ".zgroup").read_bytes()
    assert download_result(meta, f"{EXEC}/results.zarr/.zgroup", outputs=ws.outputs) == zgroup


# Characters that mean something in a URL, and letters beyond ASCII, in file and store names.
ODD_NAMES = [
    "a b.txt",
    "c#d.txt",
    "e?f.txt",
    "g%h.txt",
    "g%41.txt",
    "i+j.txt",
    "k&l.txt",
    "ünï.txt",
]
ODD_STORE = "forecast #1 ?&+% ü.zarr"
ODD_VARIABLE = "t2m #?&+%41 ü"


def odd_forecast() -> xr.Dataset:
    return forecast().rename({"t2m": ODD_VARIABLE})


def test_every_file_name_round_trips(moto_workspace, signing_key):
    ws = moto_workspace
    with ws.cloudfront(signing_key[1]) as cloudfront:
        tree = ws.result(f"wf/{EXEC}", {f"odd/{name}": name.encode() for name in ODD_NAMES})
        odd_forecast().to_zarr(tree / ODD_STORE, consolidated=True, zarr_format=3)
        assert ws.sync(f"wf/{EXEC}").returncode == 0
        meta = ws.metadata(f"wf/{EXEC}")
        by_url = {
            name: requests.get(file_url(meta["signed_url"], f"odd/{name}"), timeout=10).content
            for name in ODD_NAMES
        }
        downloaded = {name: download_result(meta, f"{EXEC}/odd/{name}") for name in ODD_NAMES}
        mapped = xr.open_zarr(create_cloudfront_mapper(meta["signed_url"], ODD_STORE)).load()
        opened = open_dataset(meta).load()

    expected = {name: name.encode() for name in ODD_NAMES}
    assert by_url == expected
    assert downloaded == expected
    xr.testing.assert_identical(mapped, odd_forecast())
    xr.testing.assert_identical(opened, odd_forecast())
    assert f"outputs/wf/{EXEC}/odd/c#d.txt" in ws.objects()
    assert cloudfront.refusals == []


# What `syncd[daemon]` installs and `syncd[client]` does not (pyyaml it does: zarr needs it).
DAEMON_PACKAGES = (
    "watchdog",
    "s3fs",
    "obstore",
    "cryptography",
    "pydantic",
    "pydantic_settings",
    "loguru",
    "prometheus_client",
    "botocore",
    "aiobotocore",
)
WITHOUT_DAEMON = f"import sys; sys.modules.update(dict.fromkeys({DAEMON_PACKAGES!r}))\n"


def test_a_reader_needs_none_of_the_daemons_packages(published):
    """Read over the signed URL in a process where the daemon's packages cannot be imported,
    as with `pip install syncd[client]`; the command says what it needs there."""
    ws, _, meta = published
    read = WITHOUT_DAEMON + (
        "import json, xarray\n"
        "from syncd.client import open_dataset\n"
        "print(float(open_dataset(json.loads(sys.argv[1]))['t2m'].sum()))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", read, json.dumps(meta)], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    assert float(done.stdout) == pytest.approx(float(forecast()["t2m"].sum()))

    command = WITHOUT_DAEMON + "from syncd.__main__ import run\nrun()\n"
    done = subprocess.run(
        [sys.executable, "-c", command, "status", "--config", str(ws.config)],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 1
    assert done.stderr.strip().endswith(
        "the daemon and its commands need pip install 'syncd[daemon]'"
    )
    assert done.stderr.startswith("syncd: error: ")
