"""CloudFront custom policies as text: how syncd writes one and how anyone reads back what a
signed URL covers and until when. The standard library alone: readers use it too."""

from __future__ import annotations

import base64
import json
from urllib.parse import parse_qs, urlsplit


def cloudfront_b64(data: bytes) -> str:
    """Base64 with CloudFront's substitutions (not the same as urlsafe_b64encode)."""
    return (
        base64.b64encode(data).decode("ascii").replace("+", "-").replace("=", "_").replace("/", "~")
    )


def policy(resource: str, expires: int) -> bytes:
    """The custom policy for `resource` until `expires` (Unix seconds), without whitespace."""
    statement = {"Resource": resource, "Condition": {"DateLessThan": {"AWS:EpochTime": expires}}}
    return json.dumps({"Statement": [statement]}, separators=(",", ":")).encode()


def expiry(signed_url: str) -> int | None:
    """The DateLessThan of a custom-policy signed URL, or None if it has none."""
    try:
        text = parse_qs(urlsplit(signed_url).query)["Policy"][0]
        decoded = base64.b64decode(text.replace("-", "+").replace("_", "=").replace("~", "/"))
        statement = json.loads(decoded)["Statement"][0]
        return int(statement["Condition"]["DateLessThan"]["AWS:EpochTime"])
    except (KeyError, IndexError, ValueError, TypeError, RecursionError):
        return None
