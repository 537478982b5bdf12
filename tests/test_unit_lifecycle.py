"""Units that end in another thread, context or order still settle, and stay no one's current unit."""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import sys
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import pytest
import sqlalchemy as sa
from sqlalchemy.orm import Session

import txguard
from tests.conftest import AsyncDatabase
from tests.helpers import names, this_line
from tests.models import Item
from txguard import _unit

T = TypeVar("T")


@pytest.fixture
def registry(engine: sa.Engine) -> txguard.SessionRegistry:
    return txguard.configure(engine)


def in_worker(fn: Callable[..., T], *args: Any) -> T:
    """Run ``fn`` in a new worker thread, in a copy of the caller's context (as asyncio.to_thread)."""
    with ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(contextvars.copy_context().run, fn, *args).result()


def add(name: str) -> None:
    txguard.current_session().add(Item(name=name))


def get_db() -> Iterator[Session]:
    """A FastAPI-style `def` dependency with yield."""
    with txguard.unit_of_work() as session:
        yield session


# Thread-pool generator dependencies: enter and exit each in its own copy of the context.


def test_dependency_entered_and_exited_in_different_worker_contexts_commits(
    registry: txguard.SessionRegistry, engine: sa.Engine
) -> None:
    """A unit entered in one worker thread's context copy and exited in another's commits and returns its connection."""
    dependency = contextlib.contextmanager(get_db)()
    session = in_worker(dependency.__enter__)
    session.add(Item(name="a"))
    in_worker(dependency.__exit__, None, None, None)
    assert names(engine) == ["a"]
    assert engine.pool.checkedout() == 0


def test_dependency_exited_with_an_error_in_another_worker_context_rolls_back(
    registry: txguard.SessionRegistry, engine: sa.Engine
) -> None:
    """The endpoint's exception thrown into the dependency in another worker context rolls the unit back."""
    dependency = contextlib.contextmanager(get_db)()
    session = in_worker(dependency.__enter__)
    session.add(Item(name="a"))
    session.flush()
    error = RuntimeError("the endpoint failed")
    assert in_worker(dependency.__exit__, RuntimeError, error, None) is False  # not suppressed
    assert names(engine) == []
    assert engine.pool.checkedout() == 0


def test_unit_exited_in_another_thread_commits_and_is_not_current_after(
    registry: txguard.SessionRegistry, engine: sa.Engine
) -> None:
    """A unit exited by another thread commits, and its own thread's later units begin their own transaction."""
    unit = txguard.unit_of_work()
    session = unit.__enter__()
    session.add(Item(name="a"))
    with ThreadPoolExecutor(max_workers=1) as pool:
        pool.submit(unit.__exit__, None, None, None).result()
    assert names(engine) == ["a"]
    assert not txguard.in_transaction()
    with pytest.raises(txguard.TransactionRequiredError):
        txguard.current_session()
    with txguard.unit_of_work() as later:
        assert later is not session
        later.add(Item(name="b"))
    assert names(engine) == ["a", "b"]
    assert engine.pool.checkedout() == 0


def test_unit_exited_in_a_copy_of_its_context_is_not_current_in_the_original(
    registry: txguard.SessionRegistry, engine: sa.Engine
) -> None:
    """A unit exited in a copy of the context it was entered in settles, and the original context's next unit is new."""
    unit = txguard.unit_of_work()
    session = unit.__enter__()
    session.add(Item(name="a"))
    contextvars.copy_context().run(unit.__exit__, None, None, None)
    assert names(engine) == ["a"]
    with txguard.unit_of_work() as later:
        later.add(Item(name="b"))
    assert names(engine) == ["a", "b"]


# Out-of-order exits.


@pytest.mark.parametrize("propagation", ["required", "requires_new", "nested"])
def test_out_of_order_exit_rolls_back_and_names_both_units(
    registry: txguard.SessionRegistry, engine: sa.Engine, propagation: str
) -> None:
    """Closing the outer ExitStack before the inner one raises DisciplineError naming both units and commits nothing."""
    outer, inner = contextlib.ExitStack(), contextlib.ExitStack()
    outer_line = this_line() + 1
    outer.enter_context(txguard.unit_of_work()).add(Item(name="outer"))
    inner_line = this_line() + 1
    inner.enter_context(txguard.unit_of_work(propagation=propagation)).add(Item(name="inner"))
    txguard.current_session().flush()
    with pytest.raises(txguard.DisciplineError) as info:
        outer.close()
    message = str(info.value)
    assert f"opened at tests/test_unit_lifecycle.py:{outer_line} in " in message
    assert f"tests/test_unit_lifecycle.py:{inner_line} in " in message
    assert "innermost first" in message
    with pytest.raises(txguard.DisciplineError):
        inner.close()
    assert names(engine) == []
    assert engine.pool.checkedout() == 0


def test_out_of_order_exit_leaves_the_next_unit_working(
    registry: txguard.SessionRegistry, engine: sa.Engine
) -> None:
    """After an out-of-order exit, the next unit begins its own transaction and commits."""
    outer, inner = txguard.unit_of_work(), txguard.unit_of_work()
    outer.__enter__()
    inner.__enter__()
    with pytest.raises(txguard.DisciplineError):
        outer.__exit__(None, None, None)
    assert not txguard.in_transaction()
    with txguard.unit_of_work() as session:
        session.add(Item(name="next"))
    assert names(engine) == ["next"]
    assert engine.pool.checkedout() == 0


def test_unit_left_open_by_an_out_of_order_exit_says_so_at_its_own_exit(
    registry: txguard.SessionRegistry, engine: sa.Engine
) -> None:
    """The inner unit's later normal exit raises DisciplineError: its work was rolled back, not committed."""
    outer, inner = txguard.unit_of_work(), txguard.unit_of_work(propagation="requires_new")
    outer.__enter__()
    line = this_line() + 1
    inner.__enter__().add(Item(name="inner"))
    with pytest.raises(txguard.DisciplineError):
        outer.__exit__(None, None, None)
    with pytest.raises(txguard.DisciplineError, match=rf"opened at [^ ]*:{line} in .* was rolled back"):
        inner.__exit__(None, None, None)
    assert names(engine) == []


def test_unit_left_open_by_an_out_of_order_exit_lets_its_own_exception_through(
    registry: txguard.SessionRegistry, engine: sa.Engine
) -> None:
    """An exception leaving the orphaned inner unit's block propagates unchanged."""
    outer, inner = txguard.unit_of_work(), txguard.unit_of_work()
    outer.__enter__()
    inner.__enter__()
    with pytest.raises(txguard.DisciplineError):
        outer.__exit__(None, None, None)
    error = KeyError("k")
    assert inner.__exit__(KeyError, error, None) is None
    with pytest.raises(txguard.DisciplineError, match="exited twice"):
        inner.__exit__(None, None, None)


def test_transactional_function_leaving_a_unit_open_rolls_back(
    registry: txguard.SessionRegistry, engine: sa.Engine
) -> None:
    """A @transactional function returning with a unit open inside it raises DisciplineError; nothing commits."""
    stack = contextlib.ExitStack()

    @txguard.transactional
    def leaky() -> None:
        add("outer")
        stack.enter_context(txguard.unit_of_work(propagation="requires_new")).add(Item(name="inner"))

    with pytest.raises(txguard.DisciplineError, match="innermost first"):
        leaky()
    with pytest.raises(txguard.DisciplineError, match="was rolled back"):
        stack.close()
    assert names(engine) == []
    assert engine.pool.checkedout() == 0


@pytest.mark.parametrize("raises", [False, True])
def test_joined_transactional_function_leaving_a_unit_open_rolls_back(
    registry: txguard.SessionRegistry, engine: sa.Engine, raises: bool
) -> None:
    """A joined @transactional call returning (or raising) with a unit open inside it raises DisciplineError naming it; nothing commits."""
    stack = contextlib.ExitStack()
    line = this_line() + 2

    @txguard.transactional
    def leaky() -> None:
        stack.enter_context(txguard.unit_of_work(propagation="requires_new")).add(Item(name="inner"))
        if raises:
            raise KeyError("k")

    with pytest.raises(txguard.UnexpectedRollbackError):
        with txguard.unit_of_work() as session:
            session.add(Item(name="outer"))
            with pytest.raises(txguard.DisciplineError, match=rf":{line} in leaky\(\) ended before"):
                leaky()
            assert txguard.current_session() is session
    with pytest.raises(txguard.DisciplineError, match="was rolled back"):
        stack.close()
    assert names(engine) == []
    assert engine.pool.checkedout() == 0


# One block at a time.


def test_connect_object_entered_while_its_block_runs_is_refused(engine: sa.Engine) -> None:
    """Entering a txguard.connect() object inside its own block raises DisciplineError, and the block's work commits."""
    block = txguard.connect(engine)
    with block as conn:
        conn.execute(sa.insert(Item).values(name="outer"))
        with pytest.raises(txguard.DisciplineError, match="already in use"):
            block.__enter__()
        conn.execute(sa.insert(Item).values(name="after"))
    assert names(engine) == ["after", "outer"]
    assert engine.pool.checkedout() == 0


def test_unit_object_entered_while_its_block_runs_is_refused(
    registry: txguard.SessionRegistry, engine: sa.Engine
) -> None:
    """Entering a unit_of_work() object inside its own block raises DisciplineError, and the block's work commits."""
    unit = txguard.unit_of_work()
    with unit as session:
        session.add(Item(name="a"))
        with pytest.raises(txguard.DisciplineError, match="already in use"):
            unit.__enter__()
    assert names(engine) == ["a"]


# A unit belongs to the thread that opened it.


def test_worker_thread_with_a_copied_context_sees_no_current_unit(
    registry: txguard.SessionRegistry, engine: sa.Engine
) -> None:
    """In a worker thread running in a copy of the caller's context there is no current session."""

    def worker() -> bool:
        with pytest.raises(txguard.TransactionRequiredError):
            txguard.current_session()
        return txguard.in_transaction()

    with txguard.unit_of_work() as session:
        session.add(Item(name="a"))
        assert in_worker(worker) is False
        assert txguard.current_session() is session
    assert names(engine) == ["a"]


def test_worker_thread_with_a_copied_context_begins_its_own_transaction(
    registry: txguard.SessionRegistry, engine: sa.Engine
) -> None:
    """A unit opened in the worker thread commits on its own, whatever the caller's unit does."""

    def worker() -> Session:
        with txguard.unit_of_work() as session:
            session.add(Item(name="worker"))
            return session

    with pytest.raises(RuntimeError):
        with txguard.unit_of_work() as session:
            session.add(Item(name="caller"))
            assert in_worker(worker) is not session
            raise RuntimeError
    assert names(engine) == ["worker"]
    assert engine.pool.checkedout() == 0


def test_transactional_function_in_a_worker_thread_runs_in_its_own_unit(
    registry: txguard.SessionRegistry, engine: sa.Engine
) -> None:
    """A @transactional function called in a worker thread with a copied context gets its own session and commit."""

    @txguard.transactional
    def worker() -> Session:
        add("worker")
        return txguard.current_session()  # type: ignore[no-any-return]

    with txguard.unit_of_work() as session:
        session.add(Item(name="caller"))
        assert in_worker(worker) is not session
        assert names(engine) == ["worker"]
    assert names(engine) == ["caller", "worker"]


async def test_asyncio_to_thread_does_not_join_the_callers_sync_unit(
    registry: txguard.SessionRegistry, engine: sa.Engine
) -> None:
    """asyncio.to_thread copies the context, but the worker thread opens its own unit."""

    def worker() -> Session:
        with txguard.unit_of_work() as session:
            session.add(Item(name="worker"))
            return session

    with txguard.unit_of_work() as session:
        assert await asyncio.to_thread(worker) is not session
        assert names(engine) == ["worker"]


def test_adopted_unit_is_current_in_the_adopting_thread(
    registry: txguard.SessionRegistry, engine: sa.Engine
) -> None:
    """The internal hand-over makes the worker thread join the unit (a framework's explicit hand-over)."""

    def worker() -> None:
        unit = registry._var.get()
        assert unit is not None
        _unit.adopt(unit)
        add("worker")

    with txguard.unit_of_work() as session:
        in_worker(worker)
        assert session.new
    assert names(engine) == ["worker"]


# Async generators finalised by the event loop.


@pytest.fixture
def async_registry(async_db: AsyncDatabase) -> txguard.SessionRegistry:
    return txguard.configure(async_db.engine)


def item_rows(
    closed: asyncio.Event, registry: txguard.SessionRegistry | None = None
) -> AsyncIterator[int]:
    async def rows() -> AsyncIterator[int]:
        try:
            async with txguard.unit_of_work(registry=registry) as session:
                session.add(Item(name="generator"))
                await session.flush()
                yield 1
                yield 2
        finally:
            closed.set()

    return rows()


async def assert_a_later_unit_commits_on_its_own(async_db: AsyncDatabase) -> None:
    assert not txguard.in_transaction()
    with pytest.raises(txguard.TransactionRequiredError):
        txguard.current_session()
    async with txguard.unit_of_work() as session:
        session.add(Item(name="later"))
    assert names(async_db.sync) == ["later"]


async def test_abandoned_async_generator_settles_in_its_finaliser_task(
    async_registry: txguard.SessionRegistry, async_db: AsyncDatabase
) -> None:
    """An async generator dropped after `break` rolls back when the loop finalises it, and leaves no current unit."""
    closed = asyncio.Event()
    async for _ in item_rows(closed):
        break
    await asyncio.wait_for(closed.wait(), 10)
    await assert_a_later_unit_commits_on_its_own(async_db)


def abandon_a_generator_until_loop_shutdown(url: sa.URL) -> tuple[int, list[str]]:
    """Abandon a generator's unit in a new event loop, and shut the loop's generators down
    as asyncio.run() does; return the connections left checked out and what a later unit
    of the consumer's context sees and commits."""
    from sqlalchemy.ext.asyncio import create_async_engine

    loop = asyncio.new_event_loop()
    engine = create_async_engine(url)
    registry = txguard.SessionRegistry(engine)
    consumer = contextvars.copy_context()
    kept = []

    async def consume() -> None:
        rows = item_rows(asyncio.Event(), registry)
        kept.append(rows)
        async for _ in rows:
            break

    async def later() -> list[str]:
        seen = [f"in_transaction={registry.in_transaction()}"]
        async with registry.unit_of_work() as session:
            session.add(Item(name="later"))
        return seen

    try:
        loop.run_until_complete(loop.create_task(consume(), context=consumer))
        loop.run_until_complete(loop.shutdown_asyncgens())
        checked_out = engine.sync_engine.pool.checkedout()  # type: ignore[attr-defined]
        seen = loop.run_until_complete(loop.create_task(later(), context=consumer))
        loop.run_until_complete(engine.dispose())
    finally:
        loop.close()
    return checked_out, seen


@pytest.mark.skipif(sys.version_info < (3, 11), reason="create_task(context=) needs Python 3.11: "
                    "two tasks sharing one context is what the test checks")
async def test_async_generator_closed_by_shutdown_asyncgens_settles(async_db: AsyncDatabase) -> None:
    """loop.shutdown_asyncgens() rolls an abandoned generator's unit back, and its consumer's context keeps none."""
    url = async_db.engine.url
    checked_out, seen = await asyncio.to_thread(abandon_a_generator_until_loop_shutdown, url)
    assert checked_out == 0
    assert seen == ["in_transaction=False"]
    assert names(async_db.sync) == ["later"]


async def test_async_out_of_order_exit_rolls_back_and_names_both_units(
    async_registry: txguard.SessionRegistry, async_db: AsyncDatabase
) -> None:
    """Closing the outer AsyncExitStack first raises DisciplineError and commits nothing."""
    outer, inner = contextlib.AsyncExitStack(), contextlib.AsyncExitStack()
    outer_line = this_line() + 1
    (await outer.enter_async_context(txguard.unit_of_work())).add(Item(name="outer"))
    inner_line = this_line() + 1
    session = await inner.enter_async_context(txguard.unit_of_work(propagation="requires_new"))
    session.add(Item(name="inner"))
    await session.flush()
    with pytest.raises(txguard.DisciplineError, match=rf":{outer_line} in .* ended before .*:{inner_line} in "):
        await outer.aclose()
    with pytest.raises(txguard.DisciplineError, match="was rolled back"):
        await inner.aclose()
    await assert_a_later_unit_commits_on_its_own(async_db)


async def test_async_joined_transactional_function_leaving_a_unit_open_rolls_back(
    async_registry: txguard.SessionRegistry, async_db: AsyncDatabase
) -> None:
    """A joined async @transactional call returning with a unit open inside it raises DisciplineError naming it."""
    stack = contextlib.AsyncExitStack()
    line = this_line() + 2

    @txguard.transactional
    async def leaky() -> None:
        (await stack.enter_async_context(txguard.unit_of_work(propagation="requires_new"))).add(
            Item(name="inner")
        )

    with pytest.raises(txguard.UnexpectedRollbackError):
        async with txguard.unit_of_work() as session:
            session.add(Item(name="outer"))
            with pytest.raises(txguard.DisciplineError, match=rf":{line} in leaky\(\) ended before"):
                await leaky()
    with pytest.raises(txguard.DisciplineError, match="was rolled back"):
        await stack.aclose()
    await assert_a_later_unit_commits_on_its_own(async_db)


async def test_async_connect_object_entered_while_its_block_runs_is_refused(
    async_db: AsyncDatabase,
) -> None:
    """Entering an async txguard.connect() object inside its own block raises DisciplineError."""
    block = txguard.connect(async_db.engine)
    async with block as conn:
        await conn.execute(sa.insert(Item).values(name="outer"))
        with pytest.raises(txguard.DisciplineError, match="already in use"):
            await block.__aenter__()
    assert names(async_db.sync) == ["outer"]


async def test_unit_that_joined_an_abandoned_generators_unit_raises_when_it_ends_first(
    async_registry: txguard.SessionRegistry, async_db: AsyncDatabase
) -> None:
    """A unit that joined a generator's unit before the loop closed it raises DisciplineError; nothing commits."""
    closed = asyncio.Event()
    async for _ in item_rows(closed):
        break
    line = this_line() + 2
    with pytest.raises(txguard.DisciplineError, match=rf":{line} in .* ran in the transaction"):
        async with txguard.unit_of_work() as session:
            await asyncio.wait_for(closed.wait(), 10)
            session.add(Item(name="lost"))
            await session.flush()
    await assert_a_later_unit_commits_on_its_own(async_db)
