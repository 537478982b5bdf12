"""Propagation: what a new unit does, given the unit already active (SPEC §2, as in Spring).

``plan`` is the table, one row per value; the unit module carries the plan out. A unit is
*active* for propagation when it runs in a transaction (a ``supports`` or
``not_supported`` unit outside any transaction runs in a commit-as-you-go session
without one, which only ``supports`` joins).
"""

from __future__ import annotations

import enum
from typing import TYPE_CHECKING, Final

from ._errors import DisciplineError, TransactionNotAllowedError, TransactionRequiredError
from ._options import Propagation

if TYPE_CHECKING:
    from ._origin import Origin

__all__ = ["Plan", "plan"]


class Plan(enum.Enum):
    """What opening a unit does."""

    JOIN = "join"  # run in the active unit's transaction (same session)
    BEGIN = "begin"  # begin a transaction in a new session (the active one, if any, waits)
    SAVEPOINT = "savepoint"  # SAVEPOINT in the active unit's session
    NO_TRANSACTION = "no_transaction"  # a commit-as-you-go session for the call
    NO_UNIT = "no_unit"  # run the block without any unit


# Module constants, not ``Propagation.REQUIRED`` on the hot path: see _unit.
_REQUIRED: Final = Propagation.REQUIRED
_REQUIRES_NEW: Final = Propagation.REQUIRES_NEW
_NESTED: Final = Propagation.NESTED
_MANDATORY: Final = Propagation.MANDATORY
_NEVER: Final = Propagation.NEVER
_SUPPORTS: Final = Propagation.SUPPORTS
_PLAN_JOIN: Final = Plan.JOIN
_PLAN_BEGIN: Final = Plan.BEGIN
_PLAN_SAVEPOINT: Final = Plan.SAVEPOINT
_PLAN_NO_TRANSACTION: Final = Plan.NO_TRANSACTION
_PLAN_NO_UNIT: Final = Plan.NO_UNIT


def plan(
    propagation: Propagation,
    durable: bool,
    where: Origin,
    active: Origin | None,
    current: Origin | None,
) -> Plan:
    """Return what a unit opened at ``where`` does, or raise the error its options call for.

    ``active`` is where the unit running in a transaction was opened, ``current`` where
    the current unit was opened even if it runs in none (None: there is no such unit).
    """
    if durable and active is not None:
        raise DisciplineError(
            f"A durable unit (opened at {where}) must be the outermost, but the unit opened "
            f"at {active} is active. Call it outside any unit, or drop durable=True."
        )
    if propagation is _REQUIRED:
        return _PLAN_JOIN if active is not None else _PLAN_BEGIN
    if propagation is _REQUIRES_NEW:
        return _PLAN_BEGIN
    if propagation is _NESTED:
        return _PLAN_SAVEPOINT if active is not None else _PLAN_BEGIN
    if propagation is _MANDATORY:
        if active is not None:
            return _PLAN_JOIN
        raise TransactionRequiredError(
            f"The unit opened at {where} has propagation='mandatory' but no unit of work "
            "is active. Call it inside `with txguard.unit_of_work():` or from an "
            "@txguard.transactional function, or use propagation='required'."
        )
    if propagation is _NEVER:
        if active is None:
            return _PLAN_NO_UNIT
        raise TransactionNotAllowedError(
            f"The unit opened at {where} has propagation='never' but the unit opened at "
            f"{active} is active. Call it outside any unit, or use "
            "propagation='not_supported' to suspend the active one."
        )
    if propagation is _SUPPORTS:
        return _PLAN_JOIN if current is not None else _PLAN_NO_TRANSACTION
    return _PLAN_NO_TRANSACTION  # not_supported
