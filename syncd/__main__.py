"""The `syncd` command (and `python -m syncd`): the command line, or one line saying what to
install when the daemon's packages are missing (a reader's `syncd[client]` has none of them)."""

from __future__ import annotations

import signal
import sys


def run() -> None:
    # Before anything slow: an unused signal in the first moments must not end syncd unsaid
    # (the daemon says each one once it runs).
    from syncd.signals import IGNORED_SIGNALS

    for sig in IGNORED_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
    try:
        from syncd.cli import main
    except ModuleNotFoundError as exc:
        if (exc.name or "syncd").partition(".")[0] == "syncd":
            raise  # a broken install of syncd itself, not a missing extra
        sys.exit(
            f"syncd: error: {exc.name} is not installed: the daemon and its commands need "
            "pip install 'syncd[daemon]'"
        )
    main()


if __name__ == "__main__":
    run()
