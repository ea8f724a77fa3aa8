"""Run a command as the shipped unit runs syncd: as an unprivileged user (nobody), with /proc
mounted `hidepid=invisible` in a mount namespace of its own (the unit's ProtectProc=invisible:
other users' processes have no /proc entry, and signalling them answers EPERM)."""

from __future__ import annotations

import os
import shlex
import stat
import sys
from pathlib import Path

NOBODY = 65534

# The interpreter may live where nobody may not go (pyenv under /root, mode 700): inside the
# namespace, the folder that blocks the way is covered by an empty one that nobody may cross,
# with the way to the interpreter bound into it.
SCRIPT = """set -e
mount -t proc -o hidepid=invisible proc /proc
{reach}
exec setpriv --reuid={uid} --regid={uid} {groups} --inh-caps=-all -- "$@"
"""


def closed_folders(path: Path) -> list[Path]:
    """The folders on the way to `path` that other users may not cross, from the root down."""
    return [f for f in reversed(path.parents) if not os.stat(f).st_mode & stat.S_IXOTH]


def blocking_folder(path: Path) -> tuple[Path, Path] | None:
    """The first folder on the way to `path` that others may not cross, and its child on the
    way; None when the way is open."""
    closed = closed_folders(path)
    if not closed:
        return None
    return closed[0], closed[0] / path.relative_to(closed[0]).parts[0]


def as_unit_user(command: list[str], uid: int = NOBODY, groups: tuple[int, ...] = ()) -> list[str]:
    """`command`, run as the unit runs syncd (needs root to set up); `groups`: the user's
    supplementary groups (the group it shares with the server, say)."""
    reach = ""
    blocked = blocking_folder(Path(os.path.realpath(sys.executable)))
    if blocked is not None:
        folder, child = blocked
        hold = "/mnt/interpreter"  # on a tmpfs of the namespace's own: nothing made outside
        reach = "\n".join(
            [
                f"mount -t tmpfs tmpfs /mnt && mkdir {hold}",
                f"mount --bind {shlex.quote(str(child))} {hold}",
                f"mount -t tmpfs -o mode=0711 tmpfs {shlex.quote(str(folder))}",
                f"mkdir {shlex.quote(str(child))} && mount --bind {hold} {shlex.quote(str(child))}",
            ]
        )
    member = f"--groups={','.join(map(str, groups))}" if groups else "--clear-groups"
    script = SCRIPT.format(reach=reach, uid=uid, groups=member)
    return ["unshare", "--mount", "--propagation", "private", "sh", "-c", script, "unit", *command]
