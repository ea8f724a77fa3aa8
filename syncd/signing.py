"""CloudFront signed URLs: a custom policy with a wildcard over a result's prefix.

The policy is `{"Statement":[{"Resource":"<domain>/<remote_path>/*","Condition":
{"DateLessThan":{"AWS:EpochTime":<expiry>}}}]}` without whitespace, signed RSA-SHA1 PKCS#1
v1.5, in CloudFront's base64 alphabet. The output equals botocore's `CloudFrontSigner`.
"""

from __future__ import annotations

import time
from pathlib import Path
from urllib.parse import quote

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from loguru import logger

from syncd.config import ConfigError, ObjectStorage, read_file
from syncd.policy import cloudfront_b64, policy

KEY_TEXT = "object_storage.cloudfront_private_key (CLOUDFRONT_PRIVATE_KEY)"


def load_private_key(path: Path) -> rsa.RSAPrivateKey:
    """The RSA key at `path`, or a ConfigError naming the path and the remedy."""
    setting = "object_storage.cloudfront_private_key_path (CLOUDFRONT_PRIVATE_KEY_PATH)"
    pem = read_file(path, "CloudFront private key", f"fix {setting}")
    return parse_private_key(pem, f"CloudFront private key {path}")


def parse_private_key(pem: bytes, what: str) -> rsa.RSAPrivateKey:
    """An RSA key from PEM bytes; `what` names where they came from (never the bytes)."""
    if b"\\n" in pem and b"\n" not in pem.strip():  # a PEM put in one line of an env file
        pem = pem.replace(b"\\n", b"\n")
    try:
        key = serialization.load_pem_private_key(pem.strip() + b"\n", password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        raise ConfigError(
            f"{what} is not an unencrypted PEM private key: "
            "create one with `openssl genrsa -out cloudfront-private-key.pem 2048`"
        ) from None
    if not isinstance(key, rsa.RSAPrivateKey):
        raise ConfigError(
            f"{what} is not an RSA key: CloudFront signs with RSA; "
            "create one with `openssl genrsa -out cloudfront-private-key.pem 2048`"
        )
    return key


def private_key(storage: ObjectStorage) -> rsa.RSAPrivateKey:
    """The signing key: the seed's key file, else the server's PEM text; when both are set, the
    file wins, with one warning if the text holds another key (or none)."""
    text = storage.cloudfront_private_key
    what = f"the PEM text in {KEY_TEXT}"
    if storage.cloudfront_private_key_path is None:
        assert text is not None
        return parse_private_key(text.get_secret_value().encode(), what)
    key = load_private_key(storage.cloudfront_private_key_path)
    if text is not None:
        try:
            same = parse_private_key(text.get_secret_value().encode(), what).private_numbers()
        except ConfigError:
            same = None
        if same != key.private_numbers():
            logger.warning(
                "cloudfront_private_key_path and cloudfront_private_key hold different keys; "
                "signing with the file {} (cloudfront_private_key_path)",
                storage.cloudfront_private_key_path,
            )
    return key


class UrlSigner:
    """Signs URLs for one CloudFront distribution with one key pair."""

    def __init__(self, domain: str, key_pair_id: str, private_key: rsa.RSAPrivateKey) -> None:
        self.domain = domain.rstrip("/")
        self.key_pair_id = key_pair_id
        self.private_key = private_key

    @classmethod
    def from_settings(cls, storage: ObjectStorage) -> UrlSigner | None:
        """None when CloudFront is not configured (validation guarantees all or nothing)."""
        if not storage.signs_urls:
            return None
        assert storage.cloudfront_key_pair_id
        return cls(
            storage.cloudfront_domain or "", storage.cloudfront_key_pair_id, private_key(storage)
        )

    def same_key(self, other: UrlSigner) -> bool:
        return self.private_key.public_key().public_numbers() == (
            other.private_key.public_key().public_numbers()
        )

    def resource(self, remote_path: str) -> str:
        """The wildcard Resource covering every object under `remote_path`."""
        return f"{self.domain}/{quote(remote_path.strip('/'), safe='/')}/*"

    def sign(self, remote_path: str, expires_in: int, now: float | None = None) -> str:
        resource = self.resource(remote_path)
        expires = int(now if now is not None else time.time()) + expires_in
        document = policy(resource, expires)
        signature = self.private_key.sign(document, padding.PKCS1v15(), hashes.SHA1())
        return (
            f"{resource}?Policy={cloudfront_b64(document)}&Signature={cloudfront_b64(signature)}"
            f"&Key-Pair-Id={self.key_pair_id}"
        )
