"""CloudFront custom policies as text: how syncd writes one and how anyone reads back what a
signed URL covers and until when. The standard library alone: readers use it too."""

from __future__ import annotations

import base64
import json
from typing import Any
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
        return int(statement(signed_url)["Condition"]["DateLessThan"]["AWS:EpochTime"])
    except (KeyError, IndexError, ValueError, TypeError, RecursionError):
        return None


def resource(signed_url: str) -> str | None:
    """The Resource a custom-policy signed URL covers, or None if it has none."""
    try:
        covered = statement(signed_url)["Resource"]
    except (KeyError, IndexError, ValueError, TypeError, RecursionError):
        return None
    return covered if isinstance(covered, str) else None


def statement(signed_url: str) -> dict[str, Any]:
    """The policy statement of a custom-policy signed URL (KeyError, ValueError, TypeError or
    IndexError when it has none)."""
    text = parse_qs(urlsplit(signed_url).query)["Policy"][0]
    decoded = base64.b64decode(text.replace("-", "+").replace("_", "=").replace("~", "/"))
    found: dict[str, Any] = json.loads(decoded)["Statement"][0]
    return found
