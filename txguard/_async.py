"""Run asyncio work to its end even when the task awaiting it is cancelled.

A unit's COMMIT or ROLLBACK, the return of its connection to the pool and the callbacks
of a commit that went through must finish once they started: a cancelled request must
not leave a transaction open or a callback half run. These helpers shield that work and
hand the cancellation back to the caller, to raise once the work is done.
"""

from __future__ import annotations

import asyncio
from typing import Any

__all__ = ["completed", "run_to_completion"]


async def completed(awaitable: Any) -> tuple[asyncio.Future[Any], BaseException | None]:
    """Run ``awaitable`` to its end in its own task, shielded from the caller's cancellation.

    Return the finished task (its ``result()`` gives the outcome) and the CancelledError
    that the caller received meanwhile, if any, for the caller to raise when it is done.
    """
    task = asyncio.ensure_future(awaitable)
    cancelled: BaseException | None = None
    while True:
        try:
            await asyncio.shield(task)
        except asyncio.CancelledError as err:
            if not task.cancelled():  # the caller was cancelled, not the task
                cancelled = err
                continue
        except BaseException:
            pass  # the task holds it, for result()
        return task, cancelled


async def run_to_completion(awaitable: Any) -> Any:
    """Await ``awaitable`` in its own task, shielded; re-raise a cancellation after it ends."""
    task, cancelled = await completed(awaitable)
    if cancelled is not None:
        raise cancelled
    return task.result()
