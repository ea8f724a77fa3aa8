"""Logging: loguru to stderr, as plain text lines or one JSON object per line."""

from __future__ import annotations

import sys

from loguru import logger

from syncd.config import Daemon

TEXT_FORMAT = "{time:YYYY-MM-DD HH:mm:ss.SSS} {level: <7} {message}"


def configure(daemon: Daemon) -> None:
    logger.remove()
    if daemon.log_format == "json":
        logger.add(sys.stderr, level=daemon.log_level, serialize=True)
    else:
        logger.add(sys.stderr, level=daemon.log_level, format=TEXT_FORMAT, colorize=False)
