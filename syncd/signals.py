"""The signals syncd answers, by what they mean to it (the standard library only: the command
ignores the unused ones before it imports anything else, so that none ends it unsaid)."""

from __future__ import annotations

import signal

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
# Signals that mean the process itself is broken (a crash, a forbidden system call, a trap):
# it still ends, but with the Python stack of every thread in the log first.
FATAL_SIGNALS = (signal.SIGSYS, signal.SIGTRAP)
