"""Signed URLs: equal to botocore's CloudFrontSigner, verified with the public key, and served
by a CloudFront stand-in only when valid, unexpired and in scope."""

from __future__ import annotations

import base64
import datetime as dt
import json
import time

import pytest
import requests
from botocore.signers import CloudFrontSigner
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from syncd.policy import cloudfront_b64
from syncd.signing import UrlSigner
from tests.cloudfront import Forbidden, file_url, verify

DOMAIN = "https://d30anq61ot046p.cloudfront.net"


@pytest.fixture
def signer(signing_key) -> UrlSigner:
    return UrlSigner(DOMAIN, "KUCQGLNFR6UH1", signing_key[1])


def test_url_equals_botocore_cloudfront_signer(signer, signing_key):
    now = 1769560728
    ours = signer.sign("outputs/exec_1769560728_10ed9d3c", 3600, now=now)

    reference = CloudFrontSigner(
        "KUCQGLNFR6UH1",
        lambda message: signing_key[1].sign(message, padding.PKCS1v15(), hashes.SHA1()),
    )
    resource = f"{DOMAIN}/outputs/exec_1769560728_10ed9d3c/*"
    policy = reference.build_policy(resource, dt.datetime.fromtimestamp(now + 3600, dt.UTC))
    assert ours == reference.generate_presigned_url(resource, policy=policy)


def test_policy_is_the_documented_custom_policy(signer, signing_key):
    url = signer.sign("outputs/wf/exec_1_abcdef01", 600, now=1_000_000)

    base, query = url.split("?")
    params = dict(p.split("=", 1) for p in query.split("&"))
    assert base == f"{DOMAIN}/outputs/wf/exec_1_abcdef01/*"
    assert list(params) == ["Policy", "Signature", "Key-Pair-Id"]
    assert params["Key-Pair-Id"] == "KUCQGLNFR6UH1"
    policy = base64.b64decode(
        params["Policy"].replace("-", "+").replace("_", "=").replace("~", "/")
    )
    assert policy == (
        b'{"Statement":[{"Resource":"' + base.encode() + b'","Condition":'
        b'{"DateLessThan":{"AWS:EpochTime":1000600}}}]}'
    )
    assert not set("+=/") & set(params["Signature"] + params["Policy"])


def test_cloudfront_base64_alphabet():
    assert cloudfront_b64(b"\xfb\xff\xfe") == "-~~-"
    assert cloudfront_b64(b"a") == "YQ__"


def test_independent_verifier_accepts_in_scope_and_refuses_the_rest(signer, signing_key):
    keys = {"KUCQGLNFR6UH1": signing_key[1].public_key()}
    now = time.time()
    url = signer.sign("outputs/exec_1_abcdef01", 60, now=now)

    assert verify(file_url(url, "results.zarr/t2m/0.0.0"), keys, now=now)
    with pytest.raises(Forbidden, match="expired"):
        verify(file_url(url, "results.zarr/.zgroup"), keys, now=now + 61)
    with pytest.raises(Forbidden, match="not covered"):
        verify(file_url(url, "x").replace("exec_1_abcdef01", "exec_2_abcdef02"), keys, now=now)
    other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    with pytest.raises(Forbidden, match="signature"):
        verify(file_url(url, "x"), {"KUCQGLNFR6UH1": other.public_key()}, now=now)
    tampered = url.replace("Policy=", "Policy=" + cloudfront_b64(json.dumps({"x": 1}).encode()))
    with pytest.raises(Forbidden):
        verify(file_url(tampered, "x"), keys, now=now)


def test_stand_in_serves_uploaded_files_only_for_valid_urls(moto_workspace, signing_key):
    ws = moto_workspace
    with ws.cloudfront(signing_key[1]) as cloudfront:
        ws.result("wf/exec_1769560728_10ed9d3c", {"results.zarr/.zgroup": b'{"zarr_format":2}'})
        ws.result("wf/exec_1769560729_20ed9d3c", {"results.zarr/.zgroup": b"other result"})
        assert ws.sync("wf/exec_1769560728_10ed9d3c", "wf/exec_1769560729_20ed9d3c").returncode == 0
        url = ws.metadata("wf/exec_1769560728_10ed9d3c")["signed_url"]

        ok = requests.get(file_url(url, "results.zarr/.zgroup"), timeout=10)
        other = file_url(url, "results.zarr/.zgroup").replace("10ed9d3c/", "20ed9d3c/", 1)
        out_of_scope = requests.get(other, timeout=10)
        unsigned = requests.get(url.split("?")[0].removesuffix("*") + "results.zarr/.zgroup")

    assert ok.status_code == 200
    assert ok.content == b'{"zarr_format":2}'
    assert out_of_scope.status_code == 403
    assert unsigned.status_code == 403
    assert cloudfront.refusals[0].endswith(
        f"is not covered by {cloudfront.domain}/outputs/wf/exec_1769560728_10ed9d3c/*"
    )


def test_expired_url_is_refused_by_the_stand_in(moto_workspace, signing_key):
    ws = moto_workspace
    ws.settings["object_storage"]["signed_url_expires_in"] = 1
    with ws.cloudfront(signing_key[1]) as cloudfront:
        ws.result("exec_1_abcdef01", {"a.txt": b"a"})
        assert ws.sync("exec_1_abcdef01").returncode == 0
        url = ws.metadata("exec_1_abcdef01")["signed_url"]
        policy = verify(file_url(url, "a.txt"), cloudfront.keys, now=0)
        expiry = policy["Statement"][0]["Condition"]["DateLessThan"]["AWS:EpochTime"]
        while time.time() < expiry:  # the URL's own expiry is the condition we wait for
            time.sleep(0.1)
        response = requests.get(file_url(url, "a.txt"), timeout=10)

    assert response.status_code == 403
    assert cloudfront.refusals == ["expired"]


def test_without_cloudfront_the_upload_happens_with_a_null_url(moto_workspace):
    ws = moto_workspace
    for key in ("cloudfront_domain", "cloudfront_key_pair_id", "cloudfront_private_key_path"):
        del ws.settings["object_storage"][key]
    ws.result("exec_1_abcdef01", {"a.txt": b"a"})

    done = ws.sync("exec_1_abcdef01")

    assert done.returncode == 0, done.stderr
    assert ws.objects() == {"outputs/exec_1_abcdef01/a.txt": b"a"}
    meta = ws.metadata("exec_1_abcdef01")
    assert meta["storage_type"] == "s3"
    assert meta["signed_url"] is None
    assert done.stderr.count("CloudFront is not configured") == 1
