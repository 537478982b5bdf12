"""A web request's unit ends as its response's status says (pyramid_tm's commit veto).

One rule for every integration that sees the response (``txguard.asgi``, ``txguard.flask``):
a status below 400 commits, and 400 and above rolls back whatever the unit's
``rollback_for`` says, as does a request that ended without a response.
"""

from __future__ import annotations

from ._unit import UnitOfWork

__all__ = ["ErrorStatus", "aend_by_status", "aveto", "end_by_status", "veto"]


class ErrorStatus(BaseException):
    """Passed to a request's unit when its response has an error status, or there is none.

    Not an ``Exception``, so the unit rolls back whatever ``rollback_for`` selects (an
    exception that is not an ``Exception`` always rolls a unit back).
    """


def end_by_status(unit: UnitOfWork, status: int) -> None:
    """Commit ``unit`` below 400 (a failed COMMIT raises), else roll it back."""
    if status < 400:
        unit.__exit__(None, None, None)
    else:
        veto(unit, status)


async def aend_by_status(unit: UnitOfWork, status: int) -> None:
    """``end_by_status`` for an async unit."""
    if status < 400:
        await unit.__aexit__(None, None, None)
    else:
        await aveto(unit, status)


def veto(unit: UnitOfWork, why: int | str) -> None:
    """Roll ``unit`` back: its response has the error status ``why``, or ``why`` says why none."""
    reason = ErrorStatus(why)
    unit.__exit__(ErrorStatus, reason, None)


async def aveto(unit: UnitOfWork, why: int | str) -> None:
    """``veto`` for an async unit."""
    reason = ErrorStatus(why)
    await unit.__aexit__(ErrorStatus, reason, None)
