"""on_commit / on_rollback inside a ``txguard.connect()`` block, and in a task that outlived
its unit: a callback follows the transaction it was registered in, never runs before its
COMMIT, and never runs for work that was rolled back."""

from __future__ import annotations

import asyncio

import pytest
import sqlalchemy as sa

import txguard
from tests.conftest import AsyncDatabase
from tests.helpers import names
from tests.models import Item


@pytest.fixture
def registry(engine: sa.Engine) -> txguard.SessionRegistry[sa.orm.Session]:
    return txguard.configure(engine)


def test_a_begin_once_block_runs_on_commit_after_its_commit(
    registry: txguard.SessionRegistry[sa.orm.Session], engine: sa.Engine
) -> None:
    """The callback runs once the row is committed (another connection reads it), not when
    it is registered, and outside the block (no transaction of the callback's own)."""
    seen: list[object] = []
    with txguard.connect() as conn:
        conn.execute(sa.insert(Item).values(name="a"))
        txguard.on_commit(lambda: seen.append(names(engine)))
        txguard.on_rollback(lambda: seen.append("rolled back"))
        assert seen == []
    assert seen == [["a"]]


def test_a_begin_once_block_that_rolls_back_drops_on_commit(
    registry: txguard.SessionRegistry[sa.orm.Session], engine: sa.Engine
) -> None:
    seen: list[str] = []
    with pytest.raises(RuntimeError), txguard.connect() as conn:
        conn.execute(sa.insert(Item).values(name="a"))
        txguard.on_commit(lambda: seen.append("committed"))
        txguard.on_rollback(lambda: seen.append("rolled back"))
        raise RuntimeError("payment declined")
    assert seen == ["rolled back"]
    assert names(engine) == []


def test_a_block_whose_commit_fails_drops_on_commit(
    registry: txguard.SessionRegistry[sa.orm.Session], engine: sa.Engine
) -> None:
    """A caught statement failure makes the block's COMMIT a rollback: nothing runs for it."""
    with engine.begin() as conn:
        conn.execute(sa.insert(Item).values(id=1, name="taken"))
    seen: list[str] = []
    with pytest.raises(txguard.UnexpectedRollbackError), txguard.connect() as conn:
        txguard.on_commit(lambda: seen.append("committed"))
        try:
            conn.execute(sa.insert(Item).values(id=1, name="again"))
        except sa.exc.IntegrityError:
            pass  # caught: the block can no longer commit
    assert seen == []


def test_commit_as_you_go_block_runs_callbacks_at_each_commit(
    registry: txguard.SessionRegistry[sa.orm.Session], engine: sa.Engine
) -> None:
    """As a commit-as-you-go unit: conn.commit() runs what was registered before it,
    conn.rollback() and the block's end without a commit drop it."""
    seen: list[str] = []
    with txguard.connect(mode="commit_as_you_go") as conn:
        conn.execute(sa.insert(Item).values(name="a"))
        txguard.on_commit(lambda: seen.append("first"))
        conn.commit()
        assert seen == ["first"]
        conn.execute(sa.insert(Item).values(name="b"))
        txguard.on_commit(lambda: seen.append("undone"))
        txguard.on_rollback(lambda: seen.append("rollback"))
        conn.rollback()
        assert seen == ["first", "rollback"]
        txguard.on_commit(lambda: seen.append("never committed"))
    assert seen == ["first", "rollback"]
    assert names(engine) == ["a"]


def test_the_innermost_of_a_unit_and_a_block_keeps_the_callback(
    registry: txguard.SessionRegistry[sa.orm.Session],
) -> None:
    """A block inside a unit keeps its callbacks for its own COMMIT; a unit opened inside a
    block (its own transaction) keeps its own; the unit around both gets the rest."""
    seen: list[str] = []
    with txguard.unit_of_work():
        with txguard.connect():
            txguard.on_commit(lambda: seen.append("block in unit"))
        assert seen == ["block in unit"]
        with txguard.connect():
            with txguard.unit_of_work(propagation="requires_new"):
                txguard.on_commit(lambda: seen.append("unit in block"))
            assert seen[-1] == "unit in block"
            txguard.on_commit(lambda: seen.append("block"))
        txguard.on_commit(lambda: seen.append("unit"))
        assert seen[-1] == "block"
    assert seen == ["block in unit", "unit in block", "block", "unit"]


def test_a_callback_that_opens_a_block_begins_a_new_transaction(
    registry: txguard.SessionRegistry[sa.orm.Session], engine: sa.Engine
) -> None:
    """Callbacks run after the block has left the context: a block opened in one commits on
    its own, and its callbacks run at its own end."""
    seen: list[object] = []

    def audit() -> None:
        with txguard.connect() as conn:
            conn.execute(sa.insert(Item).values(name="audit"))
            txguard.on_commit(lambda: seen.append(names(engine)))

    with txguard.connect() as conn:
        conn.execute(sa.insert(Item).values(name="a"))
        txguard.on_commit(audit)
    assert seen == [["a", "audit"]]


async def test_an_async_block_awaits_async_callbacks_after_its_commit(
    async_db: AsyncDatabase,
) -> None:
    registry = txguard.SessionRegistry(async_db.engine)
    seen: list[object] = []

    async def notify() -> None:
        await asyncio.sleep(0)
        seen.append(names(async_db.sync))

    async with txguard.connect(registry=registry) as conn:
        await conn.execute(sa.insert(Item).values(name="a"))
        txguard.on_commit(notify, registry=registry)
        assert seen == []
    assert seen == [["a"]]
    with pytest.raises(RuntimeError):
        async with txguard.connect(registry=registry) as conn:
            await conn.execute(sa.insert(Item).values(name="b"))
            txguard.on_commit(notify, registry=registry)
            raise RuntimeError
    assert seen == [["a"]]


async def test_a_task_started_in_a_unit_that_rolled_back_registers_nothing_later(
    async_db: AsyncDatabase,
) -> None:
    """A fire-and-forget task of a unit that failed calls on_commit after the unit ended:
    the callback is dropped, as it would have been had the task registered it in time. A
    task of a unit that committed runs it at once."""
    registry = txguard.SessionRegistry(async_db.engine)
    seen: list[str] = []

    async def notify_later(label: str) -> None:
        await asyncio.sleep(0.05)
        txguard.on_commit(lambda: seen.append(label), registry=registry)

    tasks = []
    with pytest.raises(RuntimeError):
        async with txguard.unit_of_work(registry=registry) as session:
            session.add(Item(name="declined"))
            tasks.append(asyncio.create_task(notify_later("after rollback")))
            raise RuntimeError("payment declined")
    async with txguard.unit_of_work(registry=registry) as session:
        session.add(Item(name="paid"))
        tasks.append(asyncio.create_task(notify_later("after commit")))
    await asyncio.gather(*tasks)
    assert seen == ["after commit"]
    assert names(async_db.sync) == ["paid"]


def test_a_block_ended_in_another_context_no_longer_keeps_callbacks(
    registry: txguard.SessionRegistry[sa.orm.Session],
) -> None:
    """A block entered in one context and ended in another (a generator closed elsewhere)
    stays in the first one, ended: on_commit() there runs at once, outside any transaction,
    instead of joining a block whose callbacks have already been taken."""
    import contextvars

    seen: list[str] = []
    began, ended = contextvars.copy_context(), contextvars.copy_context()
    block = txguard.connect()
    began.run(block.__enter__)
    ended.run(block.__exit__, None, None, None)
    began.run(txguard.on_commit, lambda: seen.append("at once"))
    assert seen == ["at once"]
