"""on_commit / on_rollback: after the outermost transaction, savepoint-aware, in order."""

from __future__ import annotations

import logging

import pytest
import sqlalchemy as sa

import txguard
from tests.helpers import names
from tests.models import Item


@pytest.fixture
def registry(engine: sa.Engine) -> txguard.SessionRegistry:
    return txguard.configure(engine)


def test_on_commit_runs_after_commit_in_order(registry: txguard.SessionRegistry, engine: sa.Engine) -> None:
    """Callbacks run after the commit, in registration order, outside the unit."""
    seen: list[object] = []
    with txguard.unit_of_work() as session:
        session.add(Item(name="a"))
        txguard.on_commit(lambda: seen.append(("first", names(engine), txguard.in_transaction())))
        txguard.on_commit(lambda: seen.append("second"))
        assert seen == []
    assert seen == [("first", ["a"], False), "second"]


def test_on_commit_is_dropped_on_rollback(registry: txguard.SessionRegistry) -> None:
    """A rolled-back unit runs its on_rollback callbacks and none of its on_commit ones."""
    seen: list[str] = []
    with pytest.raises(RuntimeError):
        with txguard.unit_of_work():
            txguard.on_commit(lambda: seen.append("commit"))
            txguard.on_rollback(lambda: seen.append("rollback"))
            raise RuntimeError
    assert seen == ["rollback"]


def test_on_commit_outside_a_transaction_runs_at_once(registry: txguard.SessionRegistry) -> None:
    """Outside any unit on_commit runs the callback immediately; on_rollback never runs."""
    seen: list[str] = []
    txguard.on_commit(lambda: seen.append("now"))
    txguard.on_rollback(lambda: seen.append("never"))
    assert seen == ["now"]


def test_joined_units_wait_for_the_outermost_commit(registry: txguard.SessionRegistry) -> None:
    """A callback registered in a joined unit runs when the owner commits."""
    seen: list[str] = []
    with txguard.unit_of_work():
        with txguard.unit_of_work():
            txguard.on_commit(lambda: seen.append("inner"))
        assert seen == []
    assert seen == ["inner"]


def test_savepoint_rollback_drops_its_callbacks(registry: txguard.SessionRegistry) -> None:
    """on_commit callbacks of a rolled-back savepoint never run; a released one's run at commit."""
    seen: list[str] = []
    with txguard.unit_of_work():
        with pytest.raises(KeyError):
            with txguard.unit_of_work(propagation="nested"):
                txguard.on_commit(lambda: seen.append("undone"))
                txguard.on_rollback(lambda: seen.append("undone-rollback"))
                raise KeyError
        with txguard.unit_of_work(propagation="nested"):
            txguard.on_commit(lambda: seen.append("released"))
    assert seen == ["undone-rollback", "released"]


def test_a_unit_opened_in_a_callback_begins_a_new_transaction(
    registry: txguard.SessionRegistry, engine: sa.Engine
) -> None:
    """Callbacks run after the unit left the stack: a unit inside one commits on its own."""
    seen: list[str] = []

    def follow_up() -> None:
        with txguard.unit_of_work() as session:
            session.add(Item(name="follow-up"))
            txguard.on_commit(lambda: seen.append("nested callback"))

    with txguard.unit_of_work() as session:
        session.add(Item(name="a"))
        txguard.on_commit(follow_up)
    assert names(engine) == ["a", "follow-up"]
    assert seen == ["nested callback"]


def test_failing_callback_propagates_after_commit(registry: txguard.SessionRegistry, engine: sa.Engine) -> None:
    """Without robust, a callback's exception reaches the caller; data stays committed, later callbacks skip."""
    seen: list[str] = []

    def boom() -> None:
        raise ValueError("callback failed")

    with pytest.raises(ValueError, match="callback failed"):
        with txguard.unit_of_work() as session:
            session.add(Item(name="a"))
            txguard.on_commit(boom)
            txguard.on_commit(lambda: seen.append("later"))
    assert names(engine) == ["a"]
    assert seen == []


def test_robust_callback_failure_is_logged(
    registry: txguard.SessionRegistry, caplog: pytest.LogCaptureFixture
) -> None:
    """robust=True logs the exception on logger txguard at ERROR and runs the rest."""
    seen: list[str] = []

    def boom() -> None:
        raise ValueError("callback failed")

    with caplog.at_level(logging.ERROR, logger="txguard"):
        with txguard.unit_of_work():
            txguard.on_commit(boom, robust=True)
            txguard.on_commit(lambda: seen.append("later"))
    assert seen == ["later"]
    assert any(r.name == "txguard" and r.exc_info for r in caplog.records)


def test_commit_as_you_go_runs_callbacks_at_each_commit(registry: txguard.SessionRegistry) -> None:
    """In a commit-as-you-go unit callbacks run after session.commit() or session.rollback()."""
    seen: list[str] = []
    with txguard.unit_of_work(mode="commit_as_you_go") as session:
        session.add(Item(name="a"))
        txguard.on_commit(lambda: seen.append("first commit"))
        session.commit()
        assert seen == ["first commit"]
        session.add(Item(name="b"))
        txguard.on_rollback(lambda: seen.append("rolled back"))
        txguard.on_commit(lambda: seen.append("never"))
        session.rollback()
    assert seen == ["first commit", "rolled back"]


@pytest.mark.parametrize("bad", [None, 42, "print"])
def test_non_callables_are_refused(registry: txguard.SessionRegistry, bad: object) -> None:
    """Registering something that cannot be called raises ConfigurationError at once."""
    with pytest.raises(txguard.ConfigurationError, match="callable"):
        txguard.on_commit(bad)  # type: ignore[arg-type]
    with pytest.raises(txguard.ConfigurationError, match="callable"):
        txguard.on_rollback(bad)  # type: ignore[arg-type]


def test_coroutine_functions_are_refused(registry: txguard.SessionRegistry) -> None:
    """A coroutine function would never be awaited, so it is refused with the fix."""

    async def send() -> None:
        return None

    with pytest.raises(txguard.ConfigurationError, match="create_task"):
        txguard.on_commit(send)
