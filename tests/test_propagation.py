"""Propagation: what a unit does when another one is active (SPEC section 2), on every backend."""

from __future__ import annotations

import pytest
import sqlalchemy as sa

import txguard
from tests.helpers import names, this_line
from tests.models import Item


@pytest.fixture
def registry(engine: sa.Engine) -> txguard.SessionRegistry:
    return txguard.configure(engine)


def add(name: str) -> None:
    txguard.current_session().add(Item(name=name))


def test_required_joins_the_active_unit(registry: txguard.SessionRegistry, engine: sa.Engine) -> None:
    """REQUIRED inside a unit uses the same session and transaction."""
    with txguard.unit_of_work() as outer:
        with txguard.unit_of_work(propagation="required") as inner:
            assert inner is outer
            add("a")
    assert names(engine) == ["a"]


def test_required_begins_when_none_is_active(registry: txguard.SessionRegistry, engine: sa.Engine) -> None:
    """REQUIRED with no active unit begins a transaction of its own."""
    with txguard.unit_of_work(propagation=txguard.Propagation.REQUIRED):
        add("a")
    assert names(engine) == ["a"]


def test_a_failed_joined_unit_dooms_the_owner(registry: txguard.SessionRegistry, engine: sa.Engine) -> None:
    """A joined unit that fails marks the transaction rollback-only; the owner's commit raises."""
    with pytest.raises(txguard.UnexpectedRollbackError) as info:
        with txguard.unit_of_work():
            add("outer")
            try:
                with txguard.unit_of_work():
                    add("inner")
                    line = this_line() + 1
                    raise LookupError("no such row")
            except LookupError:
                pass
    assert names(engine) == []
    error = info.value
    assert isinstance(error.__cause__, LookupError)
    assert f"test_propagation.py:{line}" in str(error)
    assert "with LookupError, which was caught" in str(error)  # its type, never its text
    assert "no such row" not in str(error)


def test_a_failure_propagating_through_joined_units_rolls_back_once(
    registry: txguard.SessionRegistry, engine: sa.Engine
) -> None:
    """When the failure reaches the owner too, the owner rolls back and re-raises it."""
    with pytest.raises(LookupError):
        with txguard.unit_of_work():
            add("outer")
            with txguard.unit_of_work():
                raise LookupError
    assert names(engine) == []


def test_requires_new_suspends_and_restores(registry: txguard.SessionRegistry, engine: sa.Engine) -> None:
    """REQUIRES_NEW gets its own session and commits on its own; the outer unit is restored."""
    with pytest.raises(RuntimeError):
        with txguard.unit_of_work() as outer:
            with txguard.unit_of_work(propagation="requires_new") as inner:
                assert inner is not outer
                assert txguard.current_session() is inner
                add("audit")
            assert txguard.current_session() is outer
            add("work")
            outer.flush()
            raise RuntimeError
    assert names(engine) == ["audit"]


def test_nested_rolls_back_to_its_savepoint_only(registry: txguard.SessionRegistry, engine: sa.Engine) -> None:
    """A failed NESTED unit undoes its savepoint; the owner goes on and commits."""
    with txguard.unit_of_work() as outer:
        add("kept")
        with pytest.raises(ValueError):
            with txguard.unit_of_work(propagation="nested") as inner:
                assert inner is outer
                add("undone")
                outer.flush()
                raise ValueError
        add("after")
    assert names(engine) == ["after", "kept"]


def test_released_savepoint_is_undone_by_the_outer_rollback(
    registry: txguard.SessionRegistry, engine: sa.Engine
) -> None:
    """Work of a released savepoint is rolled back with its outer transaction (pysqlite too)."""
    with pytest.raises(RuntimeError):
        with txguard.unit_of_work() as outer:
            with txguard.unit_of_work(propagation="nested"):
                add("released")
            outer.flush()
            raise RuntimeError
    assert names(engine) == []


def test_nested_without_an_active_unit_begins_one(registry: txguard.SessionRegistry, engine: sa.Engine) -> None:
    """NESTED with no active unit begins a transaction of its own."""
    with txguard.unit_of_work(propagation="nested"):
        add("a")
    assert names(engine) == ["a"]


def test_a_doomed_savepoint_raises_at_its_own_exit(
    registry: txguard.SessionRegistry, engine: sa.Engine
) -> None:
    """A joined failure swallowed inside a NESTED unit dooms the savepoint, not the owner."""
    with txguard.unit_of_work():
        add("kept")
        with pytest.raises(txguard.UnexpectedRollbackError):
            with txguard.unit_of_work(propagation="nested"):
                add("undone")
                try:
                    with txguard.unit_of_work():
                        raise KeyError
                except KeyError:
                    pass
    assert names(engine) == ["kept"]


def test_mandatory_joins_or_raises(registry: txguard.SessionRegistry) -> None:
    """MANDATORY joins an active unit and raises TransactionRequiredError without one."""
    with pytest.raises(txguard.TransactionRequiredError, match="unit_of_work"):
        with txguard.unit_of_work(propagation="mandatory"):
            pass
    with txguard.unit_of_work() as outer:
        with txguard.unit_of_work(propagation="mandatory") as inner:
            assert inner is outer


def test_never_refuses_an_active_unit(registry: txguard.SessionRegistry) -> None:
    """NEVER raises TransactionNotAllowedError inside a unit and runs without one outside."""
    with txguard.unit_of_work(propagation="never") as session:
        assert session is None
        with pytest.raises(txguard.TransactionRequiredError):
            txguard.current_session()
    with txguard.unit_of_work():
        with pytest.raises(txguard.TransactionNotAllowedError, match="not_supported"):
            with txguard.unit_of_work(propagation="never"):
                pass


def test_supports_joins_an_active_unit(registry: txguard.SessionRegistry) -> None:
    """SUPPORTS inside a unit joins it."""
    with txguard.unit_of_work() as outer:
        with txguard.unit_of_work(propagation="supports") as inner:
            assert inner is outer


def test_supports_without_a_unit_is_commit_as_you_go(
    registry: txguard.SessionRegistry, engine: sa.Engine
) -> None:
    """SUPPORTS with no active unit gives a commit-as-you-go session for the call."""
    with txguard.unit_of_work(propagation="supports") as session:
        add("a")
        session.commit()
    with pytest.warns(txguard.UncommittedWorkWarning):
        with txguard.unit_of_work(propagation="supports"):
            add("lost")
    assert names(engine) == ["a"]


def test_required_inside_a_non_transactional_unit_begins_a_transaction(
    registry: txguard.SessionRegistry, engine: sa.Engine
) -> None:
    """REQUIRED under SUPPORTS-without-a-transaction begins a real transaction and commits it."""
    with txguard.unit_of_work(propagation="supports") as outer:
        with txguard.unit_of_work() as inner:
            assert inner is not outer
            add("a")
    assert names(engine) == ["a"]


def test_not_supported_suspends_the_active_unit(
    registry: txguard.SessionRegistry, engine: sa.Engine
) -> None:
    """NOT_SUPPORTED runs in its own commit-as-you-go session and restores the outer unit."""
    with txguard.unit_of_work() as outer:
        with txguard.unit_of_work(propagation="not_supported") as inner:
            assert inner is not outer
            add("independent")
            inner.commit()
        assert txguard.current_session() is outer
    assert names(engine) == ["independent"]


def test_commit_inside_a_joined_begin_once_unit_raises(
    registry: txguard.SessionRegistry, engine: sa.Engine
) -> None:
    """A begin-once unit that joined a commit-as-you-go unit may not commit it."""
    with txguard.unit_of_work(mode="commit_as_you_go") as session:
        with pytest.raises(txguard.DisciplineError, match="only that unit commits"):
            with txguard.unit_of_work():
                add("a")
                session.commit()
        session.rollback()
    assert names(engine) == []


def test_commit_inside_a_joined_begin_once_transactional_call_raises(
    registry: txguard.SessionRegistry, engine: sa.Engine
) -> None:
    """A begin-once @transactional call that joined a commit-as-you-go unit may not commit it."""

    @txguard.transactional
    def commits() -> None:
        add("a")
        txguard.current_session().commit()

    with txguard.unit_of_work(mode="commit_as_you_go") as session:
        with pytest.raises(txguard.DisciplineError, match="only that unit commits"):
            commits()
        session.rollback()
    assert names(engine) == []


def test_commit_inside_a_joined_commit_as_you_go_transactional_call_commits(
    registry: txguard.SessionRegistry, engine: sa.Engine
) -> None:
    """A commit-as-you-go @transactional call that joined a commit-as-you-go unit may commit its work."""

    @txguard.transactional(mode="commit_as_you_go")
    def commits() -> None:
        add("a")
        txguard.current_session().commit()

    with txguard.unit_of_work(mode="commit_as_you_go"):
        commits()
    assert names(engine) == ["a"]


def test_commit_inside_a_savepoint_unit_raises(registry: txguard.SessionRegistry) -> None:
    """session.commit() inside a NESTED unit of a commit-as-you-go unit raises."""
    with txguard.unit_of_work(mode="commit_as_you_go") as session:
        with pytest.raises(txguard.DisciplineError, match="savepoint"):
            with txguard.unit_of_work(propagation="nested"):
                session.commit()


def test_commit_as_you_go_owner_commit_of_a_doomed_transaction_raises(
    registry: txguard.SessionRegistry, engine: sa.Engine
) -> None:
    """In a commit-as-you-go unit, commit() after a swallowed joined failure rolls back and raises."""
    with txguard.unit_of_work(mode="commit_as_you_go") as session:
        add("lost")
        try:
            with txguard.unit_of_work():
                raise KeyError
        except KeyError:
            pass
        with pytest.raises(txguard.UnexpectedRollbackError):
            session.commit()
        add("b")
        session.commit()
    assert names(engine) == ["b"]


def test_current_session_follows_the_stack(registry: txguard.SessionRegistry) -> None:
    """current_session() and in_transaction() follow units as they open and close."""
    assert not txguard.in_transaction()
    with txguard.unit_of_work() as outer:
        assert txguard.in_transaction()
        with txguard.unit_of_work(propagation="requires_new") as inner:
            assert txguard.current_session() is inner
        assert txguard.current_session() is outer
    assert not txguard.in_transaction()
    with pytest.raises(txguard.TransactionRequiredError):
        txguard.current_session()
