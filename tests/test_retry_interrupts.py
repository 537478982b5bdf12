"""Retries never run again a call that was interrupted, exited, closed or cancelled."""

from __future__ import annotations

import asyncio

import pytest
import sqlalchemy as sa

import txguard
from tests.conftest import AsyncDatabase
from tests.helpers import names
from tests.models import Item

INTERRUPTS = [KeyboardInterrupt, SystemExit, GeneratorExit]


def retry_everything(exc: BaseException) -> bool:
    return True


@pytest.mark.parametrize("interrupt", INTERRUPTS, ids=lambda t: t.__name__)
def test_interrupt_is_never_retried(engine: sa.Engine, interrupt: type[BaseException]) -> None:
    """A BaseException that is not an Exception propagates at once, even if retry_on says yes."""
    registry = txguard.SessionRegistry(engine)
    calls: list[int] = []

    @registry.transactional(retries=3, retry_on=retry_everything, backoff=0)
    def work() -> None:
        calls.append(1)
        registry.current_session().add(Item(name=f"attempt {len(calls)}"))
        registry.current_session().flush()
        raise interrupt

    with pytest.raises(interrupt):
        work()
    assert calls == [1]
    assert names(engine) == []


def test_interrupt_is_never_retried_by_type_either(engine: sa.Engine) -> None:
    """retry_on=BaseException selects every Exception, and still no interrupt."""
    registry = txguard.SessionRegistry(engine)
    calls: list[int] = []

    @registry.transactional(retries=3, retry_on=BaseException, backoff=0)
    def work() -> None:
        calls.append(1)
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        work()
    assert calls == [1]


def test_retry_on_is_not_asked_about_interrupts(engine: sa.Engine) -> None:
    """The retry_on predicate is never called with a KeyboardInterrupt."""
    registry = txguard.SessionRegistry(engine)
    asked: list[BaseException] = []

    def predicate(exc: BaseException) -> bool:
        asked.append(exc)
        return True

    @registry.transactional(retries=3, retry_on=predicate, backoff=0)
    def work() -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        work()
    assert asked == []


@pytest.mark.parametrize("interrupt", INTERRUPTS, ids=lambda t: t.__name__)
async def test_async_interrupt_is_never_retried(
    async_db: AsyncDatabase, interrupt: type[BaseException]
) -> None:
    """An async call ending in a BaseException that is not an Exception runs once and rolls back."""
    registry = txguard.SessionRegistry(async_db.engine)
    calls: list[int] = []

    @registry.transactional(retries=3, retry_on=retry_everything, backoff=0)
    async def work() -> None:
        calls.append(1)
        session = registry.current_session()
        session.add(Item(name=f"attempt {len(calls)}"))
        await session.flush()
        raise interrupt

    with pytest.raises(interrupt):
        await work()
    assert calls == [1]
    assert names(async_db.sync) == []


async def test_cancelled_task_is_not_retried(async_db: AsyncDatabase) -> None:
    """A task cancelled while its body awaits ends cancelled, after one attempt, with nothing written."""
    registry = txguard.SessionRegistry(async_db.engine)
    calls: list[int] = []
    waiting = asyncio.Event()

    @registry.transactional(retries=3, retry_on=retry_everything, backoff=0)
    async def work() -> None:
        calls.append(1)
        session = registry.current_session()
        session.add(Item(name=f"attempt {len(calls)}"))
        await session.flush()
        if len(calls) == 1:
            waiting.set()
            await asyncio.sleep(60)

    task = asyncio.ensure_future(work())
    await asyncio.wait_for(waiting.wait(), 10)
    task.cancel()
    await asyncio.wait([task], timeout=10)
    assert task.cancelled()
    assert calls == [1]
    assert names(async_db.sync) == []
