"""A unit's transaction moves only along the declared transitions of ``TransactionState``."""

from __future__ import annotations

import pytest
import sqlalchemy as sa

import txguard
from txguard._origin import Origin
from txguard._transaction import TRANSITIONS, TransactionState, transition

S = TransactionState
WHERE = Origin(None)
# In the members' order: a frozenset's order, and so the test ids, differ between processes.
LEGAL = [(old, new) for old in S for new in S if new in TRANSITIONS[old]]
ILLEGAL = [(old, new) for old in S for new in S if new not in TRANSITIONS[old]]


@pytest.fixture
def registry(sqlite_engine: sa.Engine) -> txguard.SessionRegistry:
    return txguard.SessionRegistry(sqlite_engine)


@pytest.mark.parametrize(("old", "new"), LEGAL, ids=[f"{o.value}-{n.value}" for o, n in LEGAL])
def test_a_declared_transition_is_taken(old: TransactionState, new: TransactionState) -> None:
    """Each declared move returns the new state."""
    assert transition(old, new, WHERE) is new


@pytest.mark.parametrize(("old", "new"), ILLEGAL, ids=[f"{o.value}-{n.value}" for o, n in ILLEGAL])
def test_an_undeclared_transition_is_refused(old: TransactionState, new: TransactionState) -> None:
    """Every other move raises DisciplineError naming both states."""
    message = f"is '{old.value}' and cannot become '{new.value}'"
    with pytest.raises(txguard.DisciplineError, match=message):
        transition(old, new, WHERE)


def test_a_doomed_transaction_cannot_commit() -> None:
    """ROLLBACK_ONLY may only become ROLLED_BACK: a commit is refused, saying what it may become."""
    with pytest.raises(txguard.DisciplineError, match="may become rolled_back"):
        transition(S.ROLLBACK_ONLY, S.COMMITTED, WHERE)


def test_a_transaction_in_doubt_is_final() -> None:
    """After a COMMIT whose outcome is unknown nothing follows, and the message says so."""
    with pytest.raises(txguard.DisciplineError, match="nothing: it is final"):
        transition(S.IN_DOUBT, S.ACTIVE, WHERE)


def test_a_joined_unit_that_fails_dooms_the_owner_transaction(
    registry: txguard.SessionRegistry,
) -> None:
    """A caught failure of a joined unit leaves the owner's transaction ROLLBACK_ONLY."""
    with pytest.raises(txguard.UnexpectedRollbackError):
        with registry.unit_of_work():
            try:
                with registry.unit_of_work():
                    raise KeyError("inner")
            except KeyError:
                pass
            owner = registry.current_unit()
            assert owner is not None and owner.transaction.state is S.ROLLBACK_ONLY


def test_a_unit_that_commits_ends_committed(registry: txguard.SessionRegistry) -> None:
    """A begin-once unit that commits leaves its transaction COMMITTED."""
    unit = registry.unit_of_work()
    with unit:
        pass
    assert unit.transaction.state is S.COMMITTED


def test_a_unit_that_raises_ends_rolled_back(registry: txguard.SessionRegistry) -> None:
    """A begin-once unit left by an exception leaves its transaction ROLLED_BACK."""
    unit = registry.unit_of_work()
    with pytest.raises(KeyError):
        with unit:
            raise KeyError("k")
    assert unit.transaction.state is S.ROLLED_BACK
