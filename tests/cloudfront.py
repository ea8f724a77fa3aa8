"""An independent check of CloudFront signed URLs, and a CloudFront stand-in built on it.

`verify` does what CloudFront does with a custom-policy URL: decode the policy, verify its
RSA-SHA1 signature with the public key of the named key pair, check the expiry, and match the
requested URL against the policy's Resource (`*` any run of characters, `?` one character).
`CloudFrontStandIn` serves objects from a real S3 server only for URLs that pass.
"""

from __future__ import annotations

import base64
import json
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlsplit

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa


class Forbidden(Exception):
    """CloudFront would answer 403."""


def unb64(text: str) -> bytes:
    return base64.b64decode(text.replace("-", "+").replace("_", "=").replace("~", "/"))


def resource_matches(pattern: str, url: str) -> bool:
    regex = "".join(".*" if c == "*" else "." if c == "?" else re.escape(c) for c in pattern)
    return re.fullmatch(regex, url, flags=re.DOTALL) is not None


def verify(url: str, keys: dict[str, rsa.RSAPublicKey], now: float | None = None) -> dict:
    """The decoded policy of a valid URL for `url`'s own path; Forbidden otherwise."""
    parts = urlsplit(url)
    query = parse_qs(parts.query, keep_blank_values=True)
    try:
        policy_b64 = query["Policy"][0]
        signature = unb64(query["Signature"][0])
        key_pair_id = query["Key-Pair-Id"][0]
    except KeyError as exc:
        raise Forbidden(f"missing {exc.args[0]}") from None
    if key_pair_id not in keys:
        raise Forbidden(f"unknown key pair {key_pair_id}")
    policy_bytes = unb64(policy_b64)
    try:
        keys[key_pair_id].verify(signature, policy_bytes, padding.PKCS1v15(), hashes.SHA1())
    except InvalidSignature:
        raise Forbidden("signature does not match the policy") from None
    if re.search(rb"\s", policy_bytes):
        raise Forbidden("policy contains whitespace")
    policy = json.loads(policy_bytes)
    (statement,) = policy["Statement"]
    expires = statement["Condition"]["DateLessThan"]["AWS:EpochTime"]
    if not isinstance(expires, int):
        raise Forbidden("AWS:EpochTime is not an integer")
    if (time.time() if now is None else now) >= expires:
        raise Forbidden("expired")
    requested = f"{parts.scheme}://{parts.netloc}{parts.path}"
    if not resource_matches(statement["Resource"], requested):
        raise Forbidden(f"{requested} is not covered by {statement['Resource']}")
    return policy


def file_url(signed_url: str, path: str) -> str:
    """The URL of one file under a wildcard signed URL, as the seed's client builds it."""
    base, query = signed_url.split("?", 1)
    return f"{base.removesuffix('/*')}/{path}?{query}"


class CloudFrontStandIn:
    """Serves `s3://bucket/<path>` at `http://127.0.0.1:PORT/<path>` for valid signed URLs."""

    def __init__(self, s3_client, bucket: str, key_pair_id: str, public_key: rsa.RSAPublicKey):
        stand_in = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                if stand_in.fail_next > 0:  # a transient CloudFront error
                    stand_in.fail_next -= 1
                    self.reply(503, b"service unavailable")
                    return
                url = f"{stand_in.domain}{self.path}"
                try:
                    verify(url, stand_in.keys)
                except Forbidden as exc:
                    stand_in.refusals.append(str(exc))
                    self.reply(403, str(exc).encode())
                    return
                key = unquote(urlsplit(self.path).path.lstrip("/"))
                try:
                    body = s3_client.get_object(Bucket=bucket, Key=key)["Body"].read()
                except s3_client.exceptions.NoSuchKey:
                    self.reply(404, b"not found")
                    return
                stand_in.served.append(key)
                self.reply(200, body)

            def do_HEAD(self) -> None:
                self.do_GET()

            def reply(self, status: int, body: bytes) -> None:
                self.send_response(status)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        self.keys = {key_pair_id: public_key}
        self.refusals: list[str] = []
        self.fail_next = 0
        self.served: list[str] = []
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.domain = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> CloudFrontStandIn:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()
