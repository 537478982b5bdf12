"""``_propagation.plan`` is SPEC §2's propagation table: one row per value, two columns."""

from __future__ import annotations

import pytest

import txguard
from txguard._origin import Origin
from txguard._propagation import Plan, plan

HERE = Origin(())
OUTER = Origin(())

# propagation: (an active unit exists, none exists), as the SPEC's table reads
TABLE = {
    txguard.Propagation.REQUIRED: (Plan.JOIN, Plan.BEGIN),
    txguard.Propagation.REQUIRES_NEW: (Plan.BEGIN, Plan.BEGIN),
    txguard.Propagation.NESTED: (Plan.SAVEPOINT, Plan.BEGIN),
    txguard.Propagation.MANDATORY: (Plan.JOIN, txguard.TransactionRequiredError),
    txguard.Propagation.NEVER: (txguard.TransactionNotAllowedError, Plan.NO_UNIT),
    txguard.Propagation.SUPPORTS: (Plan.JOIN, Plan.NO_TRANSACTION),
    txguard.Propagation.NOT_SUPPORTED: (Plan.NO_TRANSACTION, Plan.NO_TRANSACTION),
}


CELLS = [
    (propagation, active, expected)
    for propagation, row in TABLE.items()
    for active, expected in zip((True, False), row)
]


@pytest.mark.parametrize(
    ("propagation", "active", "expected"),
    CELLS,
    ids=[f"{p.value}-{'active' if a else 'none'}" for p, a, _ in CELLS],
)
def test_plan_follows_the_table(
    propagation: txguard.Propagation, active: bool, expected: Plan | type[Exception]
) -> None:
    """Each propagation value, with a unit active or none, plans (or refuses) as the SPEC's table says."""
    outer = OUTER if active else None
    if isinstance(expected, Plan):
        assert plan(propagation, False, HERE, outer, outer) is expected
    else:
        with pytest.raises(expected):
            plan(propagation, False, HERE, outer, outer)


def test_the_table_covers_every_propagation_value() -> None:
    """Every Propagation member has a row."""
    assert set(TABLE) == set(txguard.Propagation)


def test_supports_joins_a_current_unit_that_runs_in_no_transaction() -> None:
    """`supports` inside a unit running without a transaction shares that unit's session."""
    assert plan(txguard.Propagation.SUPPORTS, False, HERE, None, OUTER) is Plan.JOIN


def test_a_durable_unit_inside_an_active_one_is_refused() -> None:
    """durable=True with an active unit raises DisciplineError whatever the propagation."""
    with pytest.raises(txguard.DisciplineError, match="must be the outermost"):
        plan(txguard.Propagation.REQUIRES_NEW, True, HERE, OUTER, OUTER)
