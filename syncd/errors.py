"""Every failure syncd meets, in one taxonomy: what kind it is and the one line that says what
to do about it.

- `TransientError`: fixes itself; retried with capped exponential backoff (a store that is down
  or slow, a full disk, a locked database). Among them `Throttled` (the store pushes back),
  `Unanswered` (it takes requests and never answers), `TreeChanged` (files changed while they
  were sent) and `BeingWritten` (its writer is at it).
- `OperatorError`: a person must fix something outside the result (credentials, bucket, region,
  permissions, a read-only filesystem); logged once, retried every retry_permanent_delay.
- `InputError`: this result's own files or metadata are unusable (a malformed metadata file, a
  file name no store accepts); logged once, retried every retry_permanent_delay in case its
  writer fixes it.

Each failure is translated once, at the edge where it happens: each storage adapter finds the
S3 error in its client's exceptions by their type and `store_error` says what it means,
`os_error` for the filesystem, `state_error` for SQLite. `classify` is the last resort for
anything else, so no task ever ends on an exception it did not expect.
"""

from __future__ import annotations

import errno
import re
import sqlite3
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from enum import StrEnum
from pathlib import Path
from typing import ClassVar


class Kind(StrEnum):
    TRANSIENT = "transient"
    OPERATOR = "operator"
    INPUT = "input"


class SyncdError(Exception):
    """A failure worded for the person who reads it: one line, what failed and what to do.
    Credentials in a URL never reach it (they would be logged, kept in the state, shown).
    Its class says its kind; `code` is the store's own name for it (the S3 error code), if any."""

    kind: ClassVar[Kind] = Kind.TRANSIENT

    def __init__(self, message: str, code: str | None = None) -> None:
        super().__init__(redact(message))
        self.code = code

    @property
    def permanent(self) -> bool:
        """True when retrying alone cannot fix it."""
        return self.kind is not Kind.TRANSIENT


class TransientError(SyncdError):
    """Fixes itself: retried with capped exponential backoff."""

    kind = Kind.TRANSIENT


class OperatorError(SyncdError):
    """A person must fix something outside the result; retried every retry_permanent_delay."""

    kind = Kind.OPERATOR


class InputError(SyncdError):
    """The result's own files or metadata are unusable; retried every retry_permanent_delay."""

    kind = Kind.INPUT


class Throttled(TransientError):
    """The store refused a request for the rate of them (S3's 503 SlowDown): fewer at once
    fixes it, not a wait for the whole result."""


class TreeChanged(TransientError):
    """The result's files changed while they were uploaded or after: tried again once the tree
    is quiet."""


class Unanswered(TransientError):
    """The store took a request and did not answer it in time. What is best effort (the
    clean-up of unfinished uploads) does not pass over it: the upload would hang the same."""


# The user and password of a URL (`http://user:pass@host`), as endpoint_url may hold them.
USERINFO = re.compile(r"\b([a-zA-Z][a-zA-Z0-9+.-]*://)[^/@\s]+@")


def redact(text: str) -> str:
    """`text` with the credentials of any URL in it replaced by <redacted>."""
    return USERINFO.sub(r"\1<redacted>@", text)


class BeingWritten(TransientError):
    """Its writer is still at it (metadata that does not parse yet, files written after the
    result's signal): not a failure; looked at again in `retry_in` seconds, quietly."""

    def __init__(self, message: str, retry_in: float) -> None:
        super().__init__(message)
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


def store_error(
    exc: BaseException,
    action: str,
    code: str | None = None,
    message: str | None = None,
    unauthenticated: bool = False,
) -> SyncdError:
    """What a client's exception means, as one line: `code` and `message` are the S3 error the
    adapter found in it (by its type), `unauthenticated` that the client refused the
    credentials before any answer."""
    text = str(exc).strip() or type(exc).__name__
    if not code:  # an S3 error document in the client's words (obstore carries it so)
        found = re.search(r"<Code>([^<]+)</Code>", text)
        if found:
            code = found.group(1)
            message = (re.search(r"<Message>([^<]+)</Message>", text) or found).group(1)
    summary = printable(f"{code}: {message}" if code else text.splitlines()[0])
    remedy = STORE_REMEDIES.get(code or "")
    if ACCELERATION_OFF in (message or ""):
        remedy = ENABLE_ACCELERATION
    if remedy is None and unauthenticated:
        remedy = CHECK_CREDENTIALS
    if remedy is not None:
        return OperatorError(f"{action} failed: {summary.rstrip('.')}: {remedy}", code)
    transient = Throttled if code in THROTTLING else TransientError
    return transient(f"{action} failed: {summary}", code)


@contextmanager
def store_errors(action: str, translate: Callable[[Exception, str], SyncdError]) -> Iterator[None]:
    """Translate a client's exception into the taxonomy, once, with its adapter's `translate`;
    local read errors pass through."""
    try:
        yield
    except SyncdError:
        raise  # already in the taxonomy's words (the file changed while it was read)
    except Exception as exc:
        # obstore raises FileNotFoundError for a missing bucket, but without a file name.
        if isinstance(exc, OSError) and exc.filename is not None:
            raise
        raise translate(exc, action) from exc


def damaged(key: str, stored: str, sent: str) -> SyncdError:
    """The store holds other bytes under `key` than syncd sent (MD5s in hex)."""
    return TransientError(
        f"upload of {key} failed: the store holds other bytes than were sent (MD5 {stored}, "
        f"sent {sent}): damaged on the way; sending it again"
    )


# What to do about a filesystem error, by errno: (kind, remedy).
OS_REMEDIES: dict[int, tuple[type[SyncdError], str]] = {
    errno.ENOSPC: (TransientError, "its filesystem is full: free space; syncd resumes by itself"),
    errno.EDQUOT: (TransientError, "the quota is used up: free space; syncd resumes by itself"),
    errno.EACCES: (OperatorError, "give the syncd user access to it (owner, group or mode)"),
    errno.EPERM: (OperatorError, "give the syncd user access to it (owner, group or mode)"),
    errno.EROFS: (
        OperatorError,
        "its filesystem is read-only: mount it read-write (and list it in the unit's "
        "ReadWritePaths=)",
    ),
    errno.ELOOP: (InputError, "it is a symlink, and syncd never follows one there"),
    errno.ENOTDIR: (InputError, "a part of the path is a file where a folder belongs"),
    errno.EISDIR: (InputError, "it is a folder where a file belongs"),
    errno.ENAMETOOLONG: (InputError, "its name is longer than the filesystem allows"),
}


def os_error(exc: OSError, action: str, path: Path | str | None = None) -> SyncdError:
    """A filesystem error as `<action> <path> failed (<reason>): <remedy>`."""
    where = path if path is not None else exc.filename
    subject = f"{action} {printable(str(where))}" if where is not None else action
    reason = exc.strerror or type(exc).__name__
    error, remedy = OS_REMEDIES.get(exc.errno or 0, (TransientError, "retrying"))
    return error(f"{subject} failed ({reason}): {remedy}")


def state_error(exc: sqlite3.Error, path: Path) -> SyncdError:
    """A SQLite error of the state database."""
    text = str(exc)
    if "locked" in text or "busy" in text:
        return TransientError(
            f"state database {path} is locked by another process: stop whatever holds it "
            "(another syncd with the same state_dir?); retrying"
        )
    if "disk is full" in text or "disk I/O" in text:
        return TransientError(f"state database {path}: {text}: free space; retrying")
    return OperatorError(f"state database {path}: {text}: check state_dir and its filesystem")


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
    return TransientError(f"unexpected error {name}{f': {detail}' if detail else ''}")
