"""gcpause.GcHold: the collector stays off from FREEZE to UNFREEZE, and comes back on its own."""

from __future__ import annotations

import asyncio
import gc

from durablecache.gcpause import GcHold
from durablecache.testing.waiting import wait_for_async


def test_a_hold_turns_the_collector_off_until_it_ends() -> None:
    async def main() -> None:
        hold = GcHold()
        hold.start(limit=30.0)
        assert not gc.isenabled()
        hold.end()
        assert gc.isenabled()
        hold.end()                      # a second end (abort path after success) changes nothing
        assert gc.isenabled()

    asyncio.run(main())


def test_nested_holds_leave_the_collector_to_the_owner_that_found_it_on() -> None:
    async def main() -> None:
        coordinator, proxy = GcHold(), GcHold()
        coordinator.start(limit=30.0)
        proxy.start(limit=30.0)
        proxy.end()                     # the proxy unfreezes first: the coordinator still holds
        assert not gc.isenabled()
        coordinator.end()
        assert gc.isenabled()

    asyncio.run(main())


def test_a_hold_nobody_ends_ends_itself_after_its_limit() -> None:
    async def main() -> None:
        hold = GcHold()
        hold.start(limit=0.05)          # a coordinator that vanished mid-freeze never unfreezes
        assert not gc.isenabled()
        await wait_for_async("the collector back on after the limit", gc.isenabled, 2)

    try:
        asyncio.run(main())
    finally:
        gc.enable()


def test_a_collector_the_process_turned_off_stays_off() -> None:
    async def main() -> None:
        gc.disable()
        hold = GcHold()
        hold.start(limit=30.0)
        hold.end()
        assert not gc.isenabled()

    try:
        asyncio.run(main())
    finally:
        gc.enable()
