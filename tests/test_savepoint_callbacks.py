"""on_commit / on_rollback inside the user's own savepoints (``Session.begin_nested()``).

SPEC §4: callbacks registered inside a savepoint that rolls back are dropped, whichever API
opened the savepoint; an on_rollback callback registered there runs when the outermost
transaction ends, whatever its outcome (its work is gone either way).
"""

from __future__ import annotations

import pytest
import sqlalchemy as sa
from sqlalchemy.exc import IntegrityError

import txguard
from tests.conftest import AsyncDatabase
from tests.helpers import names
from tests.models import Item


@pytest.fixture
def registry(engine: sa.Engine) -> txguard.SessionRegistry:
    return txguard.configure(engine)


def test_a_rolled_back_savepoint_drops_its_on_commit(
    registry: txguard.SessionRegistry, engine: sa.Engine
) -> None:
    seen: list[object] = []
    with txguard.unit_of_work() as session:
        session.add(Item(name="kept"))
        try:
            with session.begin_nested():
                session.add(Item(name="undone"))
                txguard.on_commit(lambda: seen.append("undone"))
                raise RuntimeError
        except RuntimeError:
            pass
        txguard.on_commit(lambda: seen.append(("kept", names(engine))))
    assert seen == [("kept", ["kept"])]


def test_a_released_savepoint_keeps_its_on_commit(registry: txguard.SessionRegistry) -> None:
    seen: list[str] = []
    with txguard.unit_of_work() as session:
        with session.begin_nested():
            txguard.on_commit(lambda: seen.append("inside"))
        txguard.on_commit(lambda: seen.append("after"))
        assert seen == []
    assert seen == ["inside", "after"]


def test_a_savepoint_rolled_back_without_with(registry: txguard.SessionRegistry) -> None:
    seen: list[str] = []
    with txguard.unit_of_work() as session:
        savepoint = session.begin_nested()
        txguard.on_commit(lambda: seen.append("undone"))
        txguard.on_rollback(lambda: seen.append("its work is gone"))
        savepoint.rollback()
        txguard.on_commit(lambda: seen.append("kept"))
    assert seen == ["its work is gone", "kept"]


def test_a_released_savepoint_inside_one_rolled_back(registry: txguard.SessionRegistry) -> None:
    seen: list[str] = []
    with txguard.unit_of_work() as session:
        outer = session.begin_nested()
        with session.begin_nested():
            txguard.on_commit(lambda: seen.append("inner"))
        inner_again = session.begin_nested()
        txguard.on_commit(lambda: seen.append("still open when the outer rolls back"))
        outer.rollback()
        assert not inner_again.is_active
        txguard.on_commit(lambda: seen.append("kept"))
    assert seen == ["kept"]


def test_a_savepoint_a_failed_flush_rolled_back(
    registry: txguard.SessionRegistry, engine: sa.Engine
) -> None:
    """The common shape: try an insert in a savepoint, catch the duplicate, carry on."""
    seen: list[str] = []
    with txguard.unit_of_work() as session:
        session.add(Item(id=1, name="first"))
        session.flush()
        try:
            with session.begin_nested():
                txguard.on_commit(lambda: seen.append("duplicate"))
                session.add(Item(id=1, name="duplicate"))
        except IntegrityError:
            pass
        txguard.on_commit(lambda: seen.append("first"))
    assert seen == ["first"]
    assert names(engine) == ["first"]


def test_on_rollback_of_a_rolled_back_savepoint_runs_once_when_the_unit_rolls_back(
    registry: txguard.SessionRegistry,
) -> None:
    seen: list[str] = []
    with pytest.raises(KeyError):
        with txguard.unit_of_work() as session:
            savepoint = session.begin_nested()
            txguard.on_rollback(lambda: seen.append("savepoint"))
            savepoint.rollback()
            txguard.on_rollback(lambda: seen.append("unit"))
            raise KeyError
    assert seen == ["savepoint", "unit"]


def test_a_raw_savepoint_inside_a_nested_unit(registry: txguard.SessionRegistry) -> None:
    seen: list[str] = []
    with txguard.unit_of_work() as session:
        with txguard.unit_of_work(propagation="nested"):
            savepoint = session.begin_nested()
            txguard.on_commit(lambda: seen.append("undone"))
            savepoint.rollback()
            txguard.on_commit(lambda: seen.append("in the nested unit"))
        with pytest.raises(ValueError):
            with txguard.unit_of_work(propagation="nested"):
                with session.begin_nested():
                    txguard.on_commit(lambda: seen.append("released in a rolled-back unit"))
                raise ValueError
    assert seen == ["in the nested unit"]


def test_a_savepoint_in_a_commit_as_you_go_unit(registry: txguard.SessionRegistry) -> None:
    seen: list[str] = []
    with txguard.unit_of_work(mode="commit_as_you_go") as session:
        session.add(Item(name="a"))
        savepoint = session.begin_nested()
        txguard.on_commit(lambda: seen.append("undone"))
        savepoint.rollback()
        txguard.on_commit(lambda: seen.append("first commit"))
        session.commit()
        assert seen == ["first commit"]
        with session.begin_nested():
            txguard.on_commit(lambda: seen.append("second commit"))
        session.commit()
    assert seen == ["first commit", "second commit"]


def test_a_savepoint_outlived_by_its_session_transaction(registry: txguard.SessionRegistry) -> None:
    """The savepoint a callback was registered in rolled back in an earlier transaction of
    a commit-as-you-go unit; a callback of the next transaction is not affected."""
    seen: list[str] = []
    with txguard.unit_of_work(mode="commit_as_you_go") as session:
        session.begin_nested().rollback()
        session.commit()
        with session.begin_nested():
            txguard.on_commit(lambda: seen.append("next"))
        session.commit()
    assert seen == ["next"]


async def test_async_savepoints(async_db: AsyncDatabase) -> None:
    registry = txguard.SessionRegistry(async_db.engine)
    seen: list[str] = []

    async def later() -> None:
        seen.append("awaited")

    async with registry.unit_of_work() as session:
        try:
            async with session.begin_nested():
                txguard.on_commit(later, registry=registry)
                raise RuntimeError
        except RuntimeError:
            pass
        async with session.begin_nested():
            txguard.on_commit(lambda: seen.append("released"), registry=registry)
    assert seen == ["released"]


def test_a_unit_that_follows_its_context(registry: txguard.SessionRegistry) -> None:
    """A framework's request unit (FastAPI's, the ASGI middleware's) registers its callbacks
    as any thread holding its context may: the savepoint still drops them."""
    from txguard._unit import follow_context

    seen: list[str] = []
    with txguard.unit_of_work() as session:
        unit = registry.current_unit()
        assert unit is not None
        follow_context(unit)
        savepoint = session.begin_nested()
        txguard.on_commit(lambda: seen.append("undone"))
        txguard.on_rollback(lambda: seen.append("its work is gone"))
        savepoint.rollback()
        txguard.on_commit(lambda: seen.append("kept"))
    assert seen == ["its work is gone", "kept"]
