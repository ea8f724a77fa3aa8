"""The bound every result uploading at once shares: transfers in flight and bytes held."""

from __future__ import annotations

import asyncio

from syncd.budget import TransferBudget


async def _run(budget: TransferBudget, amounts: list[int]) -> tuple[int, int]:
    """Hold each amount for a moment, all at once; return the most transfers and bytes seen."""
    peak_active = peak_used = 0

    async def one(amount: int) -> None:
        nonlocal peak_active, peak_used
        async with budget.hold(amount):
            peak_active = max(peak_active, budget.active)
            peak_used = max(peak_used, budget.used)
            await asyncio.sleep(0)  # let the others try to enter while this one holds
            await asyncio.sleep(0)

    await asyncio.wait_for(asyncio.gather(*(one(a) for a in amounts)), timeout=5)
    assert (budget.active, budget.used) == (0, 0)
    return peak_active, peak_used


def test_no_more_transfers_in_flight_than_allowed() -> None:
    assert asyncio.run(_run(TransferBudget(lambda: 3, 1000), [1] * 20)) == (3, 3)


def test_bytes_held_stay_within_the_limit() -> None:
    peak_active, peak_used = asyncio.run(_run(TransferBudget(lambda: 16, 10), [6] * 5))
    assert (peak_active, peak_used) == (1, 6)


def test_a_file_larger_than_the_limit_still_goes_alone() -> None:
    assert asyncio.run(_run(TransferBudget(lambda: 16, 10), [50, 50, 1])) == (1, 10)
