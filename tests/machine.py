"""A throwaway copy of this machine, for following an install as root line by line: the root
filesystem under an overlay in a mount namespace of its own, so that useradd, /etc, /opt,
/outputs and /var/lib change only the copy, which is gone when the script ends. It shares the
network with the tests (their S3 servers on 127.0.0.1)."""

from __future__ import annotations

import os
import shlex
import sys
from pathlib import Path

from tests.unit import closed_folders

ENTER = """set -e
mount -t tmpfs tmpfs "$1"
mkdir "$1/upper" "$1/work" "$1/root"
mount -t overlay overlay -o lowerdir=/,upperdir="$1/upper",workdir="$1/work" "$1/root"
for folder in /proc /dev /sys {binds}; do
  mkdir -p "$1/root$folder" && mount --rbind "$folder" "$1/root$folder"
done
exec chroot "$1/root" /bin/bash -c "$2"
"""

# This machine has no sudo: as far as the README uses it (`sudo [-u USER] [VAR=value...]
# COMMAND...`), run by root, it is setpriv with the user's groups.
SUDO = """#!/bin/sh
user=root
if [ "$1" = "-u" ]; then user="$2"; shift 2; fi
exec setpriv --reuid="$user" --regid="$(id -g "$user")" --init-groups env "$@"
"""


def preparation() -> str:
    """Shell lines that make the copy what the README expects of a machine: a `sudo`, and a
    Python every user may run (a system Python is; a pyenv one under /root is not)."""
    interpreter = Path(os.path.realpath(sys.executable))
    lines = [f"chmod o+x {shlex.quote(str(folder))}" for folder in closed_folders(interpreter)]
    lines.append(
        "command -v sudo >/dev/null || "
        f"{{ printf %s {shlex.quote(SUDO)} > /usr/local/bin/sudo; chmod 755 /usr/local/bin/sudo; }}"
    )
    return "\n".join(lines)


def on_a_copy(script: str, scratch: Path, binds: tuple[Path, ...] = ()) -> list[str]:
    """The command that runs bash `script` as root on a copy of this machine; `scratch` is an
    empty folder the copy is mounted under, `binds` folders shared with the real machine."""
    folders = " ".join(shlex.quote(str(folder)) for folder in binds)
    enter = ENTER.format(binds=folders)
    full = f"set -euo pipefail\n{preparation()}\n{script}"
    return [
        "unshare", "--mount", "--propagation", "private",
        "sh", "-c", enter, "machine", str(scratch), full,
    ]  # fmt: skip
