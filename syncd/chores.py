"""The daemon's chores: short tasks run beside the workers (a rescan after lost events, a look
at a result marked again, a look back at an upload, the abort of an abandoned result's upload,
an offer when a timer fires).
Each logs its own failures; all are cancelled when the daemon stops, before the uploads end.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any


class Chores:
    def __init__(self) -> None:
        self.tasks: set[asyncio.Task[None]] = set()

    def start(self, work: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        """Run `work` beside the workers (it logs its own failures)."""
        task = asyncio.get_running_loop().create_task(work)
        self.tasks.add(task)  # the loop keeps only a weak reference to a task
        task.add_done_callback(self.tasks.discard)
        return task
