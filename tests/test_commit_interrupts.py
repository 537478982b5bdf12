"""Interrupts that arrive once COMMIT is under way: the commit's callbacks still run, then the interrupt propagates."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.orm import Session, sessionmaker

import txguard
from tests.conftest import AsyncDatabase
from tests.helpers import names
from tests.models import Item


def cancel_during(sync_engine: sa.Engine, what: str, task: asyncio.Task[Any]) -> None:
    """Cancel ``task`` when its connection is about to send COMMIT or ROLLBACK (``what``), so
    the cancellation arrives while the driver awaits it."""
    sent: list[bool] = []

    def cancel(conn: sa.Connection) -> None:
        if not sent:  # removing a listener while it runs breaks SQLAlchemy's dispatch
            sent.append(True)
            task.cancel()

    event.listen(sync_engine, what, cancel)


def cancel_during_commit(sync_engine: sa.Engine, task: asyncio.Task[Any]) -> None:
    cancel_during(sync_engine, "commit", task)


async def test_cancel_during_commit_runs_on_commit_callbacks(async_db: AsyncDatabase) -> None:
    """A task cancelled while its unit's COMMIT is in flight commits, runs its on_commit callbacks in order, then is cancelled."""
    registry = txguard.SessionRegistry(async_db.engine)
    seen: list[str] = []

    async def work() -> None:
        async with registry.unit_of_work() as session:
            session.add(Item(name="a"))
            registry.on_commit(lambda: seen.append("first"))
            registry.on_commit(lambda: seen.append("second"))
            registry.on_rollback(lambda: seen.append("rolled back"))
            cancel_during_commit(async_db.engine.sync_engine, task)
        seen.append("after the block")

    task = asyncio.ensure_future(work())
    with pytest.raises(asyncio.CancelledError):
        await task
    assert names(async_db.sync) == ["a"]
    assert seen == ["first", "second"]


async def test_cancelling_every_task_during_commit_still_commits(async_db: AsyncDatabase) -> None:
    """Cancelling every task while a unit's COMMIT is in flight (as the shutdown of
    asyncio.run does) cancels the unit's task, not the settling work: it commits, runs its
    on_commit callbacks and gives its connection back, then the task is cancelled."""
    registry = txguard.SessionRegistry(async_db.engine)
    seen: list[str] = []
    test_task = asyncio.current_task()
    sent: list[bool] = []

    def cancel_every_task(conn: sa.Connection) -> None:
        if not sent:
            sent.append(True)
            for other in asyncio.all_tasks():
                if other is not test_task:
                    other.cancel()

    async def work() -> None:
        async with registry.unit_of_work() as session:
            session.add(Item(name="a"))
            registry.on_commit(lambda: seen.append("committed"))
            event.listen(async_db.engine.sync_engine, "commit", cancel_every_task)
        seen.append("after the block")

    task = asyncio.ensure_future(work())
    with pytest.raises(asyncio.CancelledError):
        await task
    assert names(async_db.sync) == ["a"]
    assert seen == ["committed"]
    assert async_db.engine.sync_engine.pool.checkedout() == 0


async def test_cancel_during_commit_of_a_transactional_function(async_db: AsyncDatabase) -> None:
    """An @transactional coroutine cancelled during its COMMIT runs its on_commit callbacks, then is cancelled."""
    registry = txguard.SessionRegistry(async_db.engine)
    seen: list[str] = []

    @registry.transactional
    async def create() -> None:
        txguard.current_session(registry).add(Item(name="a"))
        registry.on_commit(lambda: seen.append("committed"))
        cancel_during_commit(async_db.engine.sync_engine, task)

    task = asyncio.ensure_future(create())
    with pytest.raises(asyncio.CancelledError):
        await task
    assert names(async_db.sync) == ["a"]
    assert seen == ["committed"]


async def test_cancel_during_commit_of_a_connect_unit_still_warns(async_db: AsyncDatabase) -> None:
    """An async connect() unit cancelled while it settles still commits and cancels the task."""
    seen: list[str] = []

    async def work() -> None:
        async with txguard.connect(async_db.engine) as conn:
            await conn.execute(sa.insert(Item).values(name="a"))
            cancel_during_commit(async_db.engine.sync_engine, task)
        seen.append("after the block")

    task = asyncio.ensure_future(work())
    with pytest.raises(asyncio.CancelledError):
        await task
    assert names(async_db.sync) == ["a"]
    assert seen == []


async def test_commit_as_you_go_connect_unit_cancelled_while_it_rolls_back_still_warns(
    async_db: AsyncDatabase,
) -> None:
    """A commit-as-you-go connect() unit cancelled while it discards writes warns about them, then is cancelled."""

    async def work() -> None:
        async with txguard.connect(async_db.engine, mode="commit_as_you_go") as conn:
            await conn.execute(sa.insert(Item).values(name="a"))
            cancel_during(async_db.engine.sync_engine, "rollback", task)

    task = asyncio.ensure_future(work())
    with pytest.warns(txguard.UncommittedWorkWarning, match="uncommitted writes"):
        with pytest.raises(asyncio.CancelledError):
            await task
    assert names(async_db.sync) == []


async def test_cancel_while_an_async_callback_runs_runs_the_rest(async_db: AsyncDatabase) -> None:
    """A cancellation that arrives while an async callback is awaited lets it and the later callbacks finish, then propagates."""
    registry = txguard.SessionRegistry(async_db.engine)
    seen: list[str] = []

    async def slow() -> None:
        task.cancel()
        await asyncio.sleep(0.01)
        seen.append("slow")

    async def work() -> None:
        async with registry.unit_of_work() as session:
            session.add(Item(name="a"))
            registry.on_commit(slow)
            registry.on_commit(lambda: seen.append("sync"))
        seen.append("after the block")

    task = asyncio.ensure_future(work())
    with pytest.raises(asyncio.CancelledError):
        await task
    assert seen == ["slow", "sync"]
    assert names(async_db.sync) == ["a"]


@pytest.fixture
def maker(engine: sa.Engine) -> sessionmaker[Session]:
    """A sessionmaker of its own, so that session listeners on it stay in the test."""
    return sessionmaker(engine)


def fail_after_commit(maker: sessionmaker[Session], error: BaseException) -> None:
    """Raise ``error`` from the after_commit listener of the first session that commits."""
    sent: list[bool] = []

    def after_commit(session: Session) -> None:
        if not sent:
            sent.append(True)
            raise error

    event.listen(maker, "after_commit", after_commit)


def test_keyboard_interrupt_after_commit_runs_on_commit_callbacks(maker: sessionmaker[Session], engine: sa.Engine) -> None:
    """A KeyboardInterrupt raised after COMMIT succeeded runs the on_commit callbacks, never the on_rollback ones, then propagates."""
    registry = txguard.SessionRegistry(maker)
    seen: list[str] = []
    fail_after_commit(maker, KeyboardInterrupt())
    with pytest.raises(KeyboardInterrupt):
        with registry.unit_of_work() as session:
            session.add(Item(name="a"))
            registry.on_commit(lambda: seen.append("first"))
            registry.on_rollback(lambda: seen.append("rolled back"))
            registry.on_commit(lambda: seen.append("second"))
    assert names(engine) == ["a"]
    assert seen == ["first", "second"]
    assert engine.pool.checkedout() == 0


def test_failing_after_commit_listener_is_not_reported_as_a_rollback(
    maker: sessionmaker[Session], engine: sa.Engine, caplog: pytest.LogCaptureFixture
) -> None:
    """An after_commit listener's error propagates after the on_commit callbacks ran; a failing one is logged, not raised over it."""
    registry = txguard.SessionRegistry(maker)
    seen: list[str] = []
    fail_after_commit(maker, LookupError("broker down"))
    with pytest.raises(LookupError, match="broker down"):
        with registry.unit_of_work() as session:
            session.add(Item(name="a"))
            registry.on_commit(lambda: 1 / 0)
            registry.on_commit(lambda: seen.append("committed"))
            registry.on_rollback(lambda: seen.append("rolled back"))
    assert names(engine) == ["a"]
    assert seen == ["committed"]
    assert "on_commit callback" in caplog.text
    assert "rolling back" not in caplog.text


def test_keyboard_interrupt_after_commit_of_a_transactional_function(
    maker: sessionmaker[Session], engine: sa.Engine
) -> None:
    """A @transactional function interrupted after its COMMIT runs its on_commit callbacks and is not run again."""
    registry = txguard.SessionRegistry(maker)
    seen: list[str] = []
    fail_after_commit(maker, KeyboardInterrupt())

    @registry.transactional
    def create() -> None:
        seen.append("run")
        txguard.current_session(registry).add(Item(name="a"))
        registry.on_commit(lambda: seen.append("committed"))

    with pytest.raises(KeyboardInterrupt):
        create()
    assert names(engine) == ["a"]
    assert seen == ["run", "committed"]


async def test_cancel_during_commit_awaits_async_callbacks(async_db: AsyncDatabase) -> None:
    """A task cancelled during COMMIT still awaits its async on_commit callbacks, in order with the sync ones."""
    registry = txguard.SessionRegistry(async_db.engine)
    seen: list[str] = []

    async def notify() -> None:
        await asyncio.sleep(0)
        seen.append("async")

    async def work() -> None:
        async with registry.unit_of_work() as session:
            session.add(Item(name="a"))
            registry.on_commit(lambda: seen.append("sync"))
            registry.on_commit(notify)
            cancel_during_commit(async_db.engine.sync_engine, task)

    task = asyncio.ensure_future(work())
    with pytest.raises(asyncio.CancelledError):
        await task
    assert seen == ["sync", "async"]
    assert names(async_db.sync) == ["a"]


def test_commit_as_you_go_commit_interrupted_after_commit_runs_on_commit_callbacks(
    maker: sessionmaker[Session], engine: sa.Engine
) -> None:
    """session.commit() interrupted after COMMIT succeeded runs the on_commit callbacks, never the on_rollback ones."""
    registry = txguard.SessionRegistry(maker)
    seen: list[str] = []
    fail_after_commit(maker, KeyboardInterrupt())
    with pytest.raises(KeyboardInterrupt):
        with registry.unit_of_work(mode="commit_as_you_go") as session:
            session.add(Item(name="a"))
            registry.on_commit(lambda: seen.append("committed"))
            registry.on_rollback(lambda: seen.append("rolled back"))
            session.commit()
    assert names(engine) == ["a"]
    assert seen == ["committed"]
    assert engine.pool.checkedout() == 0
