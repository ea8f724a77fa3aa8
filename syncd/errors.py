"""Every failure syncd meets, in one taxonomy: what kind it is and the one line that says what
to do about it.

- `transient`: fixes itself; retried with capped exponential backoff (a store that is down or
  slow, a full disk, a locked database, a tree still being written).
- `operator`: a person must fix something outside the result (credentials, bucket, region,
  permissions, a read-only filesystem); logged once, retried every retry_permanent_delay.
- `input`: this result's own files or metadata are unusable (a malformed metadata file, a file
  name no store accepts); logged once, retried every retry_permanent_delay in case its writer
  fixes it.

Each failure is translated once, at the edge where it happens: `store_error` for the object
store clients, `os_error` for the filesystem, `state_error` for SQLite. `classify` is the last
resort for anything else, so no task ever ends on an exception it did not expect.
"""

from __future__ import annotations

import errno
import re
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from enum import StrEnum
from pathlib import Path


class Kind(StrEnum):
    TRANSIENT = "transient"
    OPERATOR = "operator"
    INPUT = "input"


class SyncdError(Exception):
    """A failure worded for the person who reads it: one line, what failed and what to do.
    Credentials in a URL never reach it (they would be logged, kept in the state, shown)."""

    def __init__(self, message: str, kind: Kind = Kind.TRANSIENT, code: str | None = None) -> None:
        super().__init__(redact(message))
        self.kind = kind
        self.code = code  # its short name: the S3 error code, or syncd's own (BeingWritten)

    @property
    def permanent(self) -> bool:
        """True when retrying alone cannot fix it."""
        return self.kind is not Kind.TRANSIENT

    @property
    def throttled(self) -> bool:
        """The store refused a request for the rate of them (S3's 503 SlowDown): fewer at once
        fixes it, not a wait for the whole result."""
        return self.code in THROTTLING


# The user and password of a URL (`http://user:pass@host`), as endpoint_url may hold them.
USERINFO = re.compile(r"\b([a-zA-Z][a-zA-Z0-9+.-]*://)[^/@\s]+@")


def redact(text: str) -> str:
    """`text` with the credentials of any URL in it replaced by <redacted>."""
    return USERINFO.sub(r"\1<redacted>@", text)


class BeingWritten(SyncdError):
    """Its writer is still at it (metadata that does not parse yet, files written after the
    result's signal): not a failure; looked at again in `retry_in` seconds, quietly."""

    def __init__(self, message: str, retry_in: float) -> None:
        super().__init__(message, Kind.TRANSIENT, "BeingWritten")
        self.retry_in = retry_in


def printable(text: str) -> str:
    """`text` with control characters and undecodable bytes escaped, so that a name from the
    disk can never split a log line or hide what it is."""
    if text.isprintable() and not SURROGATE.search(text):
        return text
    out = []
    for char in text:
        code = ord(char)
        if 0xDC80 <= code <= 0xDCFF:  # a byte that is not UTF-8, as os.fsdecode keeps it
            out.append(f"\\x{code - 0xDC00:02x}")
        elif char.isprintable() and not 0xD800 <= code <= 0xDFFF:
            out.append(char)
        else:
            out.append(char.encode("unicode_escape", "backslashreplace").decode("ascii"))
    return "".join(out)


SURROGATE = re.compile("[\ud800-\udfff]")

# S3 error codes that say "too many requests": S3's for a prefix written too fast, and what
# S3-compatible stores answer for the same.
THROTTLING = frozenset(
    {
        "SlowDown",
        "Throttling",
        "ThrottlingException",
        "TooManyRequests",
        "RequestLimitExceeded",
        "ServiceUnavailable",
    }
)

# S3 error codes a retry cannot fix, with the remedy (the seed's Troubleshooting section).
CHECK_CREDENTIALS = (
    "check the credentials: access_key_id, secret_access_key, session_token, or the instance role"
)
CHECK_PERMISSIONS = "verify the IAM credentials have s3:PutObject and s3:ListBucket on the bucket"
CHECK_BUCKET = "check that object_storage.bucket and region are correct"
STORE_REMEDIES = {
    "AccessDenied": CHECK_PERMISSIONS,
    "AllAccessDisabled": CHECK_PERMISSIONS,
    "AccountProblem": CHECK_PERMISSIONS,
    "InvalidAccessKeyId": CHECK_CREDENTIALS,
    "SignatureDoesNotMatch": CHECK_CREDENTIALS,
    "ExpiredToken": CHECK_CREDENTIALS,
    "InvalidToken": CHECK_CREDENTIALS,
    "NoSuchBucket": CHECK_BUCKET,
    "InvalidBucketName": CHECK_BUCKET,
    "PermanentRedirect": CHECK_BUCKET,
    "AuthorizationHeaderMalformed": CHECK_BUCKET,
    "InvalidRequest": "the bucket refuses this kind of request (its message says why): check the "
    "bucket's settings",
    "RequestTimeTooSkewed": "this host's clock is off: set it right (NTP: timedatectl "
    "set-ntp true)",
}
# What AWS answers on the accelerate endpoint for a bucket without acceleration (InvalidRequest:
# "S3 Transfer Acceleration is not configured on this bucket"); acceleration is on by default.
ACCELERATION_OFF = "Transfer Acceleration is not configured"
ENABLE_ACCELERATION = (
    "enable Transfer Acceleration on the bucket (aws s3api put-bucket-accelerate-configuration "
    "--bucket BUCKET --accelerate-configuration Status=Enabled) or set "
    "object_storage.use_transfer_acceleration: false (OBJECT_STORAGE_TRANSFER_ACCELERATION=false)"
)


def store_error(exc: BaseException, action: str) -> SyncdError:
    """A client's exception (botocore, s3fs or obstore) as one line with its S3 code."""
    text = str(exc).strip() or type(exc).__name__
    code = message = None
    for cause in (exc, exc.__cause__, exc.__context__):
        error = getattr(cause, "response", {}) or {}
        if isinstance(error, dict) and error.get("Error", {}).get("Code"):
            code, message = error["Error"]["Code"], error["Error"].get("Message")
            break
    else:  # obstore carries the S3 error document in its message
        found = re.search(r"<Code>([^<]+)</Code>", text)
        if found:
            code = found.group(1)
            message = (re.search(r"<Message>([^<]+)</Message>", text) or found).group(1)
    summary = printable(f"{code}: {message}" if code else text.splitlines()[0])
    remedy = STORE_REMEDIES.get(code or "")
    if ACCELERATION_OFF in (message or ""):
        remedy = ENABLE_ACCELERATION
    if remedy is None and type(exc).__name__ in ("PermissionDeniedError", "UnauthenticatedError"):
        remedy = CHECK_CREDENTIALS
    if remedy is None:
        return SyncdError(f"{action} failed: {summary}", Kind.TRANSIENT, code)
    return SyncdError(f"{action} failed: {summary.rstrip('.')}: {remedy}", Kind.OPERATOR, code)


@contextmanager
def store_errors(action: str) -> Iterator[None]:
    """Translate a client's exception into the taxonomy, once; local read errors pass through."""
    try:
        yield
    except SyncdError:
        raise  # already in the taxonomy's words (the file changed while it was read)
    except Exception as exc:
        # obstore raises FileNotFoundError for a missing bucket, but without a file name.
        if isinstance(exc, OSError) and exc.filename is not None:
            raise
        raise store_error(exc, action) from exc


def damaged(key: str, stored: str, sent: str) -> SyncdError:
    """The store holds other bytes under `key` than syncd sent (MD5s in hex)."""
    return SyncdError(
        f"upload of {key} failed: the store holds other bytes than were sent (MD5 {stored}, "
        f"sent {sent}): damaged on the way; sending it again"
    )


# What to do about a filesystem error, by errno: (kind, remedy).
OS_REMEDIES: dict[int, tuple[Kind, str]] = {
    errno.ENOSPC: (Kind.TRANSIENT, "its filesystem is full: free space; syncd resumes by itself"),
    errno.EDQUOT: (Kind.TRANSIENT, "the quota is used up: free space; syncd resumes by itself"),
    errno.EACCES: (Kind.OPERATOR, "give the syncd user access to it (owner, group or mode)"),
    errno.EPERM: (Kind.OPERATOR, "give the syncd user access to it (owner, group or mode)"),
    errno.EROFS: (
        Kind.OPERATOR,
        "its filesystem is read-only: mount it read-write (and list it in the unit's "
        "ReadWritePaths=)",
    ),
    errno.ELOOP: (Kind.INPUT, "it is a symlink, and syncd never follows one there"),
    errno.ENOTDIR: (Kind.INPUT, "a part of the path is a file where a folder belongs"),
    errno.EISDIR: (Kind.INPUT, "it is a folder where a file belongs"),
    errno.ENAMETOOLONG: (Kind.INPUT, "its name is longer than the filesystem allows"),
}


def os_error(exc: OSError, action: str, path: Path | str | None = None) -> SyncdError:
    """A filesystem error as `<action> <path> failed (<reason>): <remedy>`."""
    where = path if path is not None else exc.filename
    subject = f"{action} {printable(str(where))}" if where is not None else action
    reason = exc.strerror or type(exc).__name__
    kind, remedy = OS_REMEDIES.get(exc.errno or 0, (Kind.TRANSIENT, "retrying"))
    return SyncdError(f"{subject} failed ({reason}): {remedy}", kind)


def state_error(exc: sqlite3.Error, path: Path) -> SyncdError:
    """A SQLite error of the state database."""
    text = str(exc)
    if "locked" in text or "busy" in text:
        return SyncdError(
            f"state database {path} is locked by another process: stop whatever holds it "
            "(another syncd with the same state_dir?); retrying",
            Kind.TRANSIENT,
        )
    if "disk is full" in text or "disk I/O" in text:
        return SyncdError(f"state database {path}: {text}: free space; retrying", Kind.TRANSIENT)
    return SyncdError(
        f"state database {path}: {text}: check state_dir and its filesystem", Kind.OPERATOR
    )


def first_failure(
    group: BaseExceptionGroup[BaseException], kind: type[BaseException] = SyncdError
) -> BaseException:
    """What a TaskGroup's failure is to say: its first leaf when every leaf is a `kind`, else
    the whole group (a bug, raised with every traceback). Not `except*`: CPython before 3.11.4
    wraps what such a handler raises in another group (gh-103590); Debian 12 ships 3.11.2."""
    if group.subgroup(lambda exc: not isinstance(exc, (kind, BaseExceptionGroup))):
        return group
    first: BaseException = group
    while isinstance(first, BaseExceptionGroup):
        first = first.exceptions[0]
    return first


def classify(exc: BaseException) -> SyncdError:
    """Any exception as a SyncdError: an OSError by its errno, anything else as a transient
    failure that names the exception (a bug: it is logged, retried and shown)."""
    if isinstance(exc, SyncdError):
        return exc
    if isinstance(exc, OSError):
        return os_error(exc, "a file operation")
    detail = printable(str(exc).splitlines()[0]) if str(exc).strip() else ""
    name = type(exc).__name__
    return SyncdError(f"unexpected error {name}{f': {detail}' if detail else ''}")
