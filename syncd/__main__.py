"""The `syncd` command (and `python -m syncd`): the command line, or one line saying what to
install when the daemon's packages are missing (a reader's `syncd[client]` has none of them)."""

from __future__ import annotations

import signal
import sys


def run() -> None:
    # Before anything slow: no signal in the first moments may end syncd unsaid. Unused ones
    # are ignored (the daemon says each one once it runs), a stop is said, a reload waits.
    from syncd.signals import (
        IGNORED_SIGNALS,
        STOP_SIGNALS,
        Interrupted,
        hang_up_later,
        interrupt,
    )

    for sig in IGNORED_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
    for sig in STOP_SIGNALS:
        signal.signal(sig, interrupt)
    signal.signal(signal.SIGHUP, hang_up_later)
    try:
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
    except Interrupted as exc:  # before the command could say it in its own words
        if sys.argv[1:2] == ["run"]:  # nothing was taken on yet: a clean stop
            print(f"{exc.signal.name} received: stopping", file=sys.stderr)
            sys.exit(0)
        print(f"syncd: interrupted by {exc.signal.name}", file=sys.stderr)
        sys.exit(128 + exc.signal)


if __name__ == "__main__":
    run()
