"""syncd: moves finished Earth2Studio results to S3 and records CloudFront signed URLs.

`syncd.mark_finished(path)` marks a result folder finished (the standard library only).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from syncd.marker import mark_finished

__all__ = ["mark_finished"]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    # Imported when used: the command imports this package before it sets its signal
    # dispositions, and must get there at once.
    if name == "mark_finished":
        from syncd.marker import mark_finished

        return mark_finished
    raise AttributeError(f"module 'syncd' has no attribute {name!r}")
