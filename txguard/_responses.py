"""A web request's unit ends as its response's status says (pyramid_tm's commit veto).

One rule for every integration that sees the response (``txguard.asgi``, ``txguard.flask``):
a status below 400 commits, and 400 and above rolls back whatever the unit's
``rollback_for`` says, as does a request that ended without a response.

In both modes: a request's unit opened with ``mode="commit_as_you_go"`` lets the view
commit as it goes, and what is still pending when a successful response goes out is
committed too (``txguard.fastapi`` does the same when the endpoint returns). A 2xx sent
over work that was then discarded is what the integrations exist to prevent.
"""

from __future__ import annotations

from ._async import run_to_completion
from ._options import Mode
from ._transaction import Role
from ._unit import UnitOfWork

__all__ = ["ErrorStatus", "acommit", "aend_by_status", "aveto", "commit", "end_by_status", "veto"]


class ErrorStatus(BaseException):
    """Passed to a request's unit when its response has an error status, or there is none.

    Not an ``Exception``, so the unit rolls back whatever ``rollback_for`` selects (an
    exception that is not an ``Exception`` always rolls a unit back).
    """


def end_by_status(unit: UnitOfWork, status: int) -> None:
    """Commit ``unit`` below 400 (a failed COMMIT raises), else roll it back."""
    if status < 400:
        commit(unit)
    else:
        veto(unit, status)


async def aend_by_status(unit: UnitOfWork, status: int) -> None:
    """``end_by_status`` for an async unit."""
    if status < 400:
        await acommit(unit)
    else:
        await aveto(unit, status)


def _pending(unit: UnitOfWork) -> bool:
    return (
        unit.opts.mode is Mode.COMMIT_AS_YOU_GO
        and unit.role is Role.BEGINS
        and unit.transaction.sync_session.in_transaction()
    )


def commit(unit: UnitOfWork) -> None:
    """End a request's ``unit`` that succeeded: its work is committed, in either mode."""
    if _pending(unit):
        try:
            unit.session.commit()
        except BaseException as exc:
            unit.__exit__(type(exc), exc, exc.__traceback__)
            raise
    unit.__exit__(None, None, None)


async def acommit(unit: UnitOfWork) -> None:
    """``commit`` for an async unit."""
    if _pending(unit):
        try:
            await run_to_completion(unit.session.commit())  # as the unit's own COMMIT
        except BaseException as exc:
            await unit.__aexit__(type(exc), exc, exc.__traceback__)
            raise
    await unit.__aexit__(None, None, None)


def veto(unit: UnitOfWork, why: int | str) -> None:
    """Roll ``unit`` back: its response has the error status ``why``, or ``why`` says why none."""
    reason = ErrorStatus(why)
    unit.__exit__(ErrorStatus, reason, None)


async def aveto(unit: UnitOfWork, why: int | str) -> None:
    """``veto`` for an async unit."""
    reason = ErrorStatus(why)
    await unit.__aexit__(ErrorStatus, reason, None)
