"""Async callbacks: awaited after an async unit's commit, in order; refused, never dropped, where nothing can await them."""

from __future__ import annotations

import asyncio
import inspect
import logging
from collections.abc import Coroutine
from typing import Any

import pytest
import sqlalchemy as sa

import txguard
from tests.conftest import AsyncDatabase
from tests.helpers import names
from tests.models import Item
from txguard.testing import capture_on_commit


@pytest.fixture
def registry(async_db: AsyncDatabase) -> txguard.SessionRegistry:
    return txguard.configure(async_db.engine)


def recorder(seen: list[str], name: str) -> Any:
    """Return an async callback that yields to the event loop, then records ``name``."""

    async def record() -> None:
        await asyncio.sleep(0)
        seen.append(name)

    return record


class _Awaitable:
    """An awaitable that is neither a coroutine nor a future (it has ``__await__`` only)."""

    def __init__(self, seen: list[str]) -> None:
        self.seen = seen

    def __await__(self) -> Any:
        yield from asyncio.sleep(0).__await__()
        self.seen.append("awaitable")


async def test_mixed_callbacks_run_in_registration_order(
    registry: txguard.SessionRegistry, async_db: AsyncDatabase
) -> None:
    """Sync callbacks, async functions, lambdas returning coroutines or other awaitables run after the commit, in registration order."""
    seen: list[str] = []
    async with txguard.unit_of_work() as session:
        session.add(Item(name="a"))
        txguard.on_commit(lambda: seen.append("sync 1"))
        txguard.on_commit(recorder(seen, "async 1"))
        txguard.on_commit(lambda: recorder(seen, "lambda")())
        txguard.on_commit(lambda: _Awaitable(seen))
        txguard.on_commit(lambda: seen.append("sync 2"))
        assert seen == []
    assert seen == ["sync 1", "async 1", "lambda", "awaitable", "sync 2"]
    assert names(async_db.sync) == ["a"]


async def test_async_callbacks_run_after_the_unit_left_the_stack(
    registry: txguard.SessionRegistry, async_db: AsyncDatabase
) -> None:
    """An async callback sees the committed data and opens units of its own, which begin new transactions."""
    seen: list[object] = []

    async def after() -> None:
        seen.append(txguard.in_transaction())
        async with txguard.unit_of_work() as session:
            seen.append(sorted(await session.scalars(sa.select(Item.name))))
            session.add(Item(name="b"))

    async with txguard.unit_of_work() as session:
        session.add(Item(name="a"))
        txguard.on_commit(after)
    assert seen == [False, ["a"]]
    assert names(async_db.sync) == ["a", "b"]


async def test_robust_async_callback_failure_is_logged(
    registry: txguard.SessionRegistry, async_db: AsyncDatabase, caplog: pytest.LogCaptureFixture
) -> None:
    """A failing robust async callback is logged at ERROR and the later callbacks still run."""
    seen: list[str] = []

    async def fails() -> None:
        raise LookupError("broker down")

    with caplog.at_level(logging.ERROR, logger="txguard"):
        async with txguard.unit_of_work() as session:
            session.add(Item(name="a"))
            txguard.on_commit(fails, robust=True)
            txguard.on_commit(recorder(seen, "after"))
    assert seen == ["after"]
    assert "on_commit callback" in caplog.text and "LookupError" in caplog.text
    assert names(async_db.sync) == ["a"]


async def test_async_callback_failure_propagates_after_the_commit(
    registry: txguard.SessionRegistry, async_db: AsyncDatabase
) -> None:
    """A failing async callback's exception propagates after the commit; the data stays committed and later callbacks do not run."""
    seen: list[str] = []

    async def fails() -> None:
        raise LookupError("broker down")

    with pytest.raises(LookupError, match="broker down"):
        async with txguard.unit_of_work() as session:
            session.add(Item(name="a"))
            txguard.on_commit(fails)
            txguard.on_commit(recorder(seen, "after"))
    assert seen == []
    assert names(async_db.sync) == ["a"]


async def test_async_on_rollback_runs_after_a_rollback(
    registry: txguard.SessionRegistry, async_db: AsyncDatabase
) -> None:
    """An async on_rollback callback is awaited after the rollback; async on_commit ones are dropped."""
    seen: list[str] = []
    with pytest.raises(RuntimeError):
        async with txguard.unit_of_work() as session:
            session.add(Item(name="a"))
            txguard.on_commit(recorder(seen, "commit"))
            txguard.on_rollback(recorder(seen, "rollback"))
            raise RuntimeError
    assert seen == ["rollback"]
    assert names(async_db.sync) == []


async def test_commit_as_you_go_awaits_async_callbacks_at_each_commit(
    registry: txguard.SessionRegistry, async_db: AsyncDatabase
) -> None:
    """`await session.commit()` in a commit-as-you-go unit awaits the async callbacks before it returns."""
    seen: list[str] = []
    async with txguard.unit_of_work(mode="commit_as_you_go") as session:
        session.add(Item(name="a"))
        txguard.on_commit(recorder(seen, "first commit"))
        await session.commit()
        assert seen == ["first commit"]
        session.add(Item(name="b"))
        txguard.on_rollback(recorder(seen, "rollback"))
        await session.rollback()
        assert seen == ["first commit", "rollback"]
    assert names(async_db.sync) == ["a"]


async def test_transactional_functions_await_async_callbacks(
    registry: txguard.SessionRegistry, async_db: AsyncDatabase
) -> None:
    """An @transactional coroutine's async callbacks are awaited before the call returns."""
    seen: list[str] = []

    @txguard.transactional
    async def create() -> None:
        txguard.current_session().add(Item(name="a"))
        txguard.on_commit(recorder(seen, "committed"))

    await create()
    assert seen == ["committed"]
    assert names(async_db.sync) == ["a"]


async def test_a_returned_task_is_left_to_run_on_its_own(
    registry: txguard.SessionRegistry, async_db: AsyncDatabase
) -> None:
    """A callback that starts a task (the fire-and-forget pattern) does not make the unit wait for it."""
    release = asyncio.Event()

    async def waits() -> None:
        await release.wait()

    started: list[asyncio.Task[None]] = []
    async with txguard.unit_of_work() as session:
        session.add(Item(name="a"))
        txguard.on_commit(lambda: started.append(asyncio.get_running_loop().create_task(waits())) or started[-1])
    assert not started[0].done()
    release.set()
    await started[0]


async def test_coroutine_outside_a_unit_is_refused_and_closed(registry: txguard.SessionRegistry) -> None:
    """on_commit outside any unit runs the callback at once, from sync code: a coroutine it returns is closed and refused."""
    made: list[Coroutine[Any, Any, None]] = []

    async def send() -> None:
        return None

    with pytest.raises(txguard.ConfigurationError, match="await the coroutine yourself"):
        txguard.on_commit(lambda: made.append(send()) or made[-1])
    assert inspect.getcoroutinestate(made[0]) == inspect.CORO_CLOSED


async def test_a_coroutine_object_is_refused(registry: txguard.SessionRegistry) -> None:
    """Passing the coroutine instead of the function is refused, naming the function to pass, and the coroutine is closed."""

    async def send_email() -> None:
        return None

    coroutine = send_email()
    with pytest.raises(txguard.ConfigurationError, match=r"not the coroutine it returned.*send_email"):
        txguard.on_commit(coroutine)  # type: ignore[arg-type]
    assert inspect.getcoroutinestate(coroutine) == inspect.CORO_CLOSED


async def test_async_capture_on_commit_awaits_async_callbacks(
    registry: txguard.SessionRegistry, async_db: AsyncDatabase
) -> None:
    """`async with capture_on_commit(execute=True)` captures async callbacks and awaits them in order at its end."""
    seen: list[str] = []
    notify = recorder(seen, "async")
    async with capture_on_commit(execute=True) as callbacks:
        async with txguard.unit_of_work() as session:
            session.add(Item(name="a"))
            txguard.on_commit(notify)
            txguard.on_commit(lambda: seen.append("sync"))
        assert seen == []
        assert callbacks[0] is notify
    assert seen == ["async", "sync"]


async def test_sync_capture_on_commit_refuses_async_callbacks(
    registry: txguard.SessionRegistry, async_db: AsyncDatabase
) -> None:
    """A plain `with capture_on_commit(execute=True)` cannot await an async callback: it raises, naming `async with`."""
    with pytest.raises(txguard.ConfigurationError, match="async with capture_on_commit"):
        with capture_on_commit(execute=True):
            async with txguard.unit_of_work():
                txguard.on_commit(recorder([], "never"))


# Sync units: nothing can await there.


@pytest.fixture
def sync_registry(engine: sa.Engine) -> txguard.SessionRegistry:
    return txguard.SessionRegistry(engine)


def test_sync_units_refuse_coroutine_functions(sync_registry: txguard.SessionRegistry) -> None:
    """Registering an async def function in a sync unit raises ConfigurationError naming the fix."""

    async def send() -> None:
        return None

    with sync_registry.unit_of_work():
        with pytest.raises(txguard.ConfigurationError, match="are sync: nothing would await it"):
            sync_registry.on_commit(send)
        with pytest.raises(txguard.ConfigurationError, match="are sync"):
            sync_registry.on_rollback(send)


def test_sync_unit_refuses_a_returned_coroutine_after_the_commit(
    sync_registry: txguard.SessionRegistry, engine: sa.Engine
) -> None:
    """A callback returning a coroutine in a sync unit raises ConfigurationError after the commit; the coroutine is closed, the data committed."""
    made: list[Coroutine[Any, Any, None]] = []

    async def send() -> None:
        return None

    with pytest.raises(txguard.ConfigurationError, match="returned a coroutine where nothing can await it"):
        with sync_registry.unit_of_work() as session:
            session.add(Item(name="a"))
            sync_registry.on_commit(lambda: made.append(send()) or made[-1])
    assert inspect.getcoroutinestate(made[0]) == inspect.CORO_CLOSED
    assert names(engine) == ["a"]


def test_sync_unit_logs_a_robust_callback_returning_a_coroutine(
    sync_registry: txguard.SessionRegistry, caplog: pytest.LogCaptureFixture
) -> None:
    """A robust callback that returns a coroutine in a sync unit is logged as failed, and the others run."""
    seen: list[str] = []

    async def send() -> None:
        return None

    with sync_registry.unit_of_work():
        sync_registry.on_commit(lambda: send(), robust=True)
        sync_registry.on_commit(lambda: seen.append("after"))
    assert seen == ["after"]
    assert "returned a coroutine" in caplog.text
