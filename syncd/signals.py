"""The signals syncd answers, by what they mean to it, and what it does with one that comes
while it starts (the standard library only: the command sets these before it imports anything
else, so that no signal ends it unsaid)."""

from __future__ import annotations

import signal
from types import FrameType

# Signals that stop the daemon (the first lets uploads in flight finish, a second stops now).
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT)
# Signals whose default would end the daemon without a word; syncd has no use for them.
# (SIGXCPU is what a soft LimitCPU= sends; the hard limit's SIGKILL follows if it is reached.)
IGNORED_SIGNALS = (
    signal.SIGUSR1,
    signal.SIGUSR2,
    signal.SIGALRM,
    signal.SIGVTALRM,
    signal.SIGPROF,
    signal.SIGIO,
    signal.SIGPWR,
    signal.SIGSTKFLT,
    signal.SIGXCPU,
    *range(signal.SIGRTMIN, signal.SIGRTMAX + 1),
)


class Interrupted(KeyboardInterrupt):
    """A stop signal, raised where the program was, as Ctrl-C raises KeyboardInterrupt."""

    def __init__(self, sig: signal.Signals) -> None:
        super().__init__(sig.name)
        self.signal = sig


def interrupt(signum: int, frame: FrameType | None) -> None:
    raise Interrupted(signal.Signals(signum))


# A SIGHUP (reload) that came while syncd started, before it could reload: acted on once it can.
_hangups: list[int] = []


def hang_up_later(signum: int, frame: FrameType | None) -> None:
    _hangups.append(signum)


def hung_up_while_starting() -> bool:
    return bool(_hangups)


# Signals that mean the process itself is broken (a crash, a forbidden system call, a trap):
# it still ends, but with the Python stack of every thread in the log first.
FATAL_SIGNALS = (signal.SIGSYS, signal.SIGTRAP)
