"""proxy/background.py: a background task is stopped even when it swallows a cancel."""

from __future__ import annotations

import asyncio

from proxy.background import stop


def test_a_task_that_swallows_cancellations_is_still_stopped():
    swallowed = []

    async def stubborn():
        while True:
            try:
                await asyncio.sleep(10)
            except asyncio.CancelledError:  # as a library turning it into its own error
                swallowed.append(1)
                if len(swallowed) > 2:
                    raise

    async def main():
        task = asyncio.create_task(stubborn())
        await asyncio.sleep(0)
        await asyncio.wait_for(stop(task), 5)
        return task

    task = asyncio.run(main())
    assert task.cancelled() and len(swallowed) == 3


def test_stop_takes_none_a_finished_task_and_a_failed_one():
    async def fails():
        raise RuntimeError("boom")

    async def main():
        await stop(None)
        done = asyncio.create_task(asyncio.sleep(0))
        failed = asyncio.create_task(fails())
        await asyncio.sleep(0.01)
        await stop(done)
        await stop(failed)  # its exception is dropped, not raised here
        return done.done() and failed.done()

    assert asyncio.run(main())
