"""Logging: loguru to stderr, as plain text lines or one JSON object per line.

Under systemd (stderr is the journal stream) each line starts with its syslog priority,
`<3>` for errors and `<4>` for warnings, so `journalctl -p warning -u syncd` finds problems;
journald adds the time itself.

Records of the standard `logging` module (botocore, s3fs, asyncio, watchdog, ...) go through the
same sink, named by their logger: a library's warnings and errors keep their level, its
chatter (INFO) shows at DEBUG, and below INFO nothing is taken from it. watchdog's records are
all chatter: `watch` turns what they mean into syncd's own lines (lost events, a watcher that
stopped), and watchdog logs races it recovers from (an emitter stopped mid-read) as errors.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import TYPE_CHECKING, Any

from loguru import logger

from syncd.config import DaemonSettings
from syncd.errors import printable, redact

if TYPE_CHECKING:
    from loguru import Record

# Libraries whose records syncd reports in its own words: shown at DEBUG only.
TRANSLATED = ("watchdog",)
TEXT_FORMAT = "{time:YYYY-MM-DD HH:mm:ss.SSS} {level: <7} {message}"
SYSLOG_PRIORITY = {
    "TRACE": 7,
    "DEBUG": 7,
    "INFO": 6,
    "SUCCESS": 5,
    "WARNING": 4,
    "ERROR": 3,
    "CRITICAL": 2,
}


def one_line(record: Record) -> None:
    # A name from the disk may hold a newline or bytes that are not UTF-8: escaped, so one
    # event is always one line.
    record["message"] = printable(record["message"])


def configure(daemon: DaemonSettings) -> None:
    logger.remove()
    logger.configure(patcher=one_line)
    if daemon.log_format == "json":
        logger.add(to_stderr, level=daemon.log_level, serialize=True)
    elif stderr_is_journal():
        logger.add(to_journal, level=daemon.log_level, format="{message}")
    else:
        logger.add(to_stderr, level=daemon.log_level, format=TEXT_FORMAT, colorize=False)
    # botocore's DEBUG records dump every request with its signed headers: never wanted.
    threshold = logging.INFO if daemon.log_level == "DEBUG" else logging.WARNING
    logging.basicConfig(handlers=[ToLoguru()], level=threshold, force=True)
    logging.captureWarnings(True)


def plain(level: str, message: str, log_format: str) -> None:
    """A line of the command itself, without a time: why it ends (`syncd: error: ...`), also
    when its settings could not be read and the log is not set up. One JSON object with
    log_format json; under systemd with its priority (`journalctl -p err` must show why syncd
    did not start); else as it is."""
    if log_format == "json":
        logger.remove()
        logger.add(to_stderr, level=level, serialize=True)
        logger.log(level, "{}", message)
    elif stderr_is_journal():
        sys.stderr.write(f"<{SYSLOG_PRIORITY[level]}>{redact(message)}\n")
    else:
        sys.stderr.write(f"{redact(message)}\n")
    sys.stderr.flush()


class ToLoguru(logging.Handler):
    """A standard `logging` record, as a line of syncd's own log."""

    def emit(self, record: logging.LogRecord) -> None:
        level = record.levelname if record.levelno >= logging.WARNING else "DEBUG"
        if record.name.split(".")[0] in TRANSLATED:
            level = "DEBUG"
        elif level not in SYSLOG_PRIORITY:  # a library's own level name
            level = "ERROR" if record.levelno >= logging.ERROR else "WARNING"
        try:
            message = record.getMessage()
        except Exception:  # a library's bad format arguments must not lose the line
            message = f"{record.msg!r} {record.args!r}"
        logger.opt(exception=record.exc_info).log(level, "{}: {}", record.name, message)


def to_stderr(message: Any) -> None:
    # Every line as written, tracebacks and library records included: no URL credentials.
    sys.stderr.write(redact(str(message)))
    sys.stderr.flush()


def to_journal(message: Any) -> None:
    priority = SYSLOG_PRIORITY.get(message.record["level"].name, 6)
    lines = redact(str(message)).splitlines()
    sys.stderr.write("".join(f"<{priority}>{line}\n" for line in lines))
    sys.stderr.flush()


def stderr_is_journal() -> bool:
    """systemd sets JOURNAL_STREAM to the device and inode of the stream it connected."""
    expected = os.environ.get("JOURNAL_STREAM", "")
    try:
        info = os.fstat(sys.stderr.fileno())
    except (OSError, ValueError):
        return False
    return expected == f"{info.st_dev}:{info.st_ino}"
