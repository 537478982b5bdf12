"""Interrupts that arrive once COMMIT is under way: the commit's callbacks still run, then the interrupt propagates."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.orm import Session

import txguard
from tests.conftest import AsyncDatabase
from tests.helpers import names
from tests.models import Item


def cancel_during_commit(sync_engine: sa.Engine, task: asyncio.Task[Any]) -> None:
    """Cancel ``task`` when its connection is about to send COMMIT, so it arrives while COMMIT is awaited."""

    sent: list[bool] = []

    def cancel(conn: sa.Connection) -> None:
        if not sent:  # removing a listener while it runs breaks SQLAlchemy's dispatch
            sent.append(True)
            task.cancel()

    event.listen(sync_engine, "commit", cancel)


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
