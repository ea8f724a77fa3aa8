"""syncd.client as a scientist uses it: open results with xarray, through a CloudFront stand-in
that checks every signature, or from the server's outputs."""

from __future__ import annotations

import time

import numpy as np
import pytest
import xarray as xr

from syncd.client import (
    AccessError,
    SignedHTTPFileSystem,
    create_cloudfront_mapper,
    download_result,
    open_dataset,
)
from syncd.signing import expiry

EXEC = "exec_1769560728_10ed9d3c"


def forecast() -> xr.Dataset:
    rng = np.random.default_rng(0)
    return xr.Dataset(
        {"t2m": (("lead_time", "lat", "lon"), rng.random((3, 16, 32), dtype=np.float32))},
        coords={
            "lead_time": np.arange(3) * 6,
            "lat": np.linspace(-90, 90, 16),
            "lon": np.linspace(0, 360, 32, endpoint=False),
        },
    )


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
