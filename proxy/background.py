"""Stopping a background task for sure.

`task.cancel(); await task` waits forever when the task swallows the
cancellation: redis-py, cancelled in the middle of a command, can turn the
CancelledError into a connection error, which a loop that outlives Redis
outages catches and goes on. Seen under load as a gateway whose Redis state
never finished closing (tests/test_plugins_unit.py, the garbage-collector test
beside `python -m load.bench`). `stop` cancels again until the task is done.
"""

from __future__ import annotations

import asyncio
import contextlib

RETRY_S = 0.1


async def stop(task: asyncio.Task | None) -> None:
    """Cancel `task` and wait until it has ended, cancelling it again every
    `RETRY_S` while it runs on; its exception, if any, is dropped."""
    if task is None:
        return
    while not task.done():
        task.cancel()
        await asyncio.wait({task}, timeout=RETRY_S)
    with contextlib.suppress(asyncio.CancelledError, Exception):
        task.result()
