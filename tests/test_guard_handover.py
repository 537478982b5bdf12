"""cross_thread and cross_task report concurrent use, never a hand-over (SPEC section 6).

The shapes are those of web frameworks: FastAPI's sync ``get_db`` dependency runs its
setup, the endpoint and its cleanup in three worker threads one after another, and its
async dependencies with ``yield`` (an ``@asynccontextmanager``, entered on an
``AsyncExitStack``) close their AsyncSession in SQLAlchemy's shielded cleanup task.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
import threading
import time
import warnings
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from sqlalchemy.orm import Session, sessionmaker

import txguard
import txguard._registry  # noqa: F401  (conftest's reset reaches for it; txguard loads lazily)
from tests.conftest import AsyncDatabase
from tests.helpers import names, once_inside, this_line
from tests.models import Item


@pytest.fixture(autouse=True)
def _uninstall() -> Iterator[None]:
    yield
    txguard.uninstall()


@pytest.fixture
def strict() -> Iterator[None]:
    """Every guard at "error", and any warning at all an error."""
    txguard.install(mixed_begin="error", leaks="warn", cross_thread="error", cross_task="error")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        yield


def where(line: int, function: str) -> str:
    """Name a line of this file as txguard's messages do."""
    code = sys._getframe(1).f_code
    return txguard._origin.describe_location(code.co_filename, line, function)


def in_thread(fn: Callable[[], Any], name: str = "worker") -> Any:
    """Run ``fn`` in a new thread; return its result, or raise what it raised."""
    outcome: list[Any] = []

    def run() -> None:
        try:
            outcome.append((True, fn()))
        except BaseException as exc:
            outcome.append((False, exc))

    thread = threading.Thread(target=run, name=name)
    thread.start()
    thread.join()
    ok, value = outcome[0]
    if not ok:
        raise value
    return value


# cross_thread: hand-over between threads


def test_fastapi_sync_get_db_in_three_threads_is_silent(engine: sa.Engine, strict: None) -> None:
    """Setup, endpoint (commit, then refresh) and cleanup in three threads, one after another."""
    SessionLocal = sessionmaker(engine)

    def get_db() -> Iterator[Session]:
        db = SessionLocal()
        try:
            yield db
        finally:
            db.close()

    dependency = get_db()
    db = in_thread(lambda: next(dependency), name="AnyIO worker thread 1")

    def endpoint() -> str:
        item = Item(name="a")
        db.add(item)
        db.commit()
        db.refresh(item)  # autobegins a transaction that the cleanup thread ends
        return item.name

    assert in_thread(endpoint, name="AnyIO worker thread 2") == "a"
    in_thread(lambda: next(dependency, None), name="AnyIO worker thread 3")
    assert names(engine) == ["a"]


def test_read_handed_over_and_closed_in_another_thread_is_silent(
    engine: sa.Engine, strict: None
) -> None:
    """A transaction autobegun by a read in one thread may be closed by the next one."""
    session = Session(engine)
    assert in_thread(lambda: session.scalars(sa.select(Item.name)).all()) == []
    in_thread(session.close, name="cleanup")


def test_statement_while_another_thread_flushes_is_caught(engine: sa.Engine) -> None:
    """A statement from a thread while the thread owning the Session is inside its flush."""
    txguard.install(cross_thread="error")
    with Session(engine) as session:
        session.execute(sa.select(Item))
        raised: list[BaseException] = []

        def other() -> None:
            try:
                in_thread(lambda: session.execute(sa.select(Item.id)), name="worker-1")
            except BaseException as exc:
                raised.append(exc)

        once_inside(session, "before_flush", other)
        session.add(Item(name="x"))
        session.flush()
        session.rollback()
    assert len(raised) == 1 and isinstance(raised[0], txguard.CrossThreadWarning)
    message = str(raised[0])
    assert "runs a statement" in message
    assert "in thread 'worker-1' while thread 'MainThread' is inside it" in message
    assert names(engine) == []


def test_commit_while_the_owner_runs_a_statement_is_caught(engine: sa.Engine) -> None:
    """Another thread's commit while the owning thread is in the middle of a statement."""
    txguard.install(cross_thread="error")
    raised: list[BaseException] = []
    with Session(engine) as session:

        def commit() -> None:
            try:
                in_thread(session.commit, name="worker-2")
            except BaseException as exc:
                raised.append(exc)

        line = this_line() + 1
        session.execute(sa.select(Item))
        once_inside(session, "do_orm_execute", commit)
        session.execute(sa.select(Item.id))
    assert len(raised) == 1 and isinstance(raised[0], txguard.CrossThreadWarning)
    message = str(raised[0])
    assert "ends its transaction (commit, rollback or close)" in message
    function = "test_commit_while_the_owner_runs_a_statement_is_caught"
    assert f"autobegun at {where(line, function)}" in message


def test_concurrent_use_warns_at_the_other_threads_line(engine: sa.Engine) -> None:
    """At "warn" the warning points at the call made in the other thread."""
    txguard.install(cross_thread="warn")
    lines: list[int] = []

    def use(session: Session) -> None:
        lines.append(this_line() + 1)
        session.execute(sa.select(Item.id))

    with Session(engine) as session, session.begin():
        once_inside(session, "before_flush", lambda: in_thread(lambda: use(session)))
        session.add(Item(name="x"))
        with pytest.warns(txguard.CrossThreadWarning) as record:
            session.flush()
        session.rollback()
    assert [(w.filename, w.lineno) for w in record] == [(__file__, lines[0])]


async def test_to_thread_hand_over_of_the_loops_session_is_silent(
    engine: sa.Engine, strict: None
) -> None:
    """asyncio.to_thread() with a Session the loop's thread is not using is a hand-over."""
    session = Session(engine)
    session.add(Item(name="a"))
    session.flush()
    await asyncio.to_thread(session.commit)
    assert await asyncio.to_thread(lambda: session.scalars(sa.select(Item.name)).all()) == ["a"]
    session.close()


def test_uninstall_restores_the_watched_session_methods() -> None:
    """uninstall() puts back every Session method the cross_thread guard wrapped."""
    originals = {name: Session.__dict__[name] for name in vars(Session) if callable(vars(Session)[name])}
    txguard.install(cross_thread="warn")
    assert Session.__dict__["execute"] is not originals["execute"]
    txguard.uninstall()
    assert {name: Session.__dict__[name] for name in originals} == originals


# cross_task: SQLAlchemy's (and txguard's) own cleanup tasks, awaited by the owner


async def test_async_session_in_an_asynccontextmanager_closes_silently(
    async_db: AsyncDatabase, strict: None
) -> None:
    """`async with AsyncSession` inside an @asynccontextmanager: its shielded close is silent."""
    factory = async_sessionmaker(async_db.engine)

    @contextlib.asynccontextmanager
    async def get_session() -> AsyncIterator[AsyncSession]:
        async with factory() as session:
            yield session

    async with get_session() as session:
        session.add(Item(name="a"))
        await session.commit()
        assert (await session.scalars(sa.select(Item.name))).all() == ["a"]


async def test_fastapi_style_exit_stack_dependency_closes_silently(
    async_db: AsyncDatabase, strict: None
) -> None:
    """An async generator dependency entered on an AsyncExitStack, as FastAPI does."""
    factory = async_sessionmaker(async_db.engine)

    async def get_session() -> AsyncIterator[AsyncSession]:
        async with factory() as session:
            yield session

    async with contextlib.AsyncExitStack() as stack:
        session = await stack.enter_async_context(
            contextlib.asynccontextmanager(get_session)()
        )
        await session.execute(sa.select(Item))
    assert not session.in_transaction()


async def test_unit_of_work_in_an_asynccontextmanager_settles_silently(
    async_db: AsyncDatabase, strict: None
) -> None:
    """txguard's own `async with unit_of_work()` as a dependency with yield commits silently."""
    registry = txguard.SessionRegistry(async_db.engine)

    @contextlib.asynccontextmanager
    async def unit() -> AsyncIterator[Any]:
        async with registry.unit_of_work() as session:
            yield session

    async with contextlib.AsyncExitStack() as stack:
        session = await stack.enter_async_context(unit())
        session.add(Item(name="a"))
    assert names(async_db.sync) == ["a"]


async def test_gather_inside_an_asynccontextmanager_is_still_caught(async_db: AsyncDatabase) -> None:
    """Two child tasks on the session of a dependency with yield are concurrent use."""
    txguard.install(cross_task="error")
    factory = async_sessionmaker(async_db.engine)

    @contextlib.asynccontextmanager
    async def get_session() -> AsyncIterator[AsyncSession]:
        async with factory() as session:
            yield session

    async with get_session() as session:
        await session.execute(sa.select(Item))

        async def query() -> None:
            await session.execute(sa.select(Item.id))

        with pytest.raises(txguard.CrossTaskWarning, match="which is still running"):
            await asyncio.gather(query(), query())


# The guards take a unit's transaction origin from the unit


def test_guards_name_the_with_line_of_a_units_transaction(engine: sa.Engine) -> None:
    """A begin-once unit's transaction is described at the unit's `with` line."""
    txguard.install(long_transaction=0.05)
    registry = txguard.SessionRegistry(engine)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        line = this_line() + 1
        with registry.unit_of_work() as session:
            session.execute(sa.select(Item))
            deadline = time.monotonic() + 10
            while not record and time.monotonic() < deadline:
                time.sleep(0.01)
    function = "test_guards_name_the_with_line_of_a_units_transaction"
    assert f"begun explicitly at {where(line, function)} in thread" in str(record[0].message)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork()")
def test_forked_child_does_not_see_the_parents_threads_inside(sqlite_engine: sa.Engine) -> None:
    """After fork() only the forking thread exists: a thread that was inside is not."""
    txguard.install(cross_thread="error")
    session = Session(sqlite_engine)
    inside, release = threading.Event(), threading.Event()
    once_inside(session, "do_orm_execute", lambda: (inside.set(), release.wait(30)))
    worker = threading.Thread(target=lambda: session.execute(sa.select(Item.id)))
    worker.start()
    try:
        assert inside.wait(30)
        pid = os.fork()
        if pid == 0:  # the child: close() must not find the parent's worker inside
            try:
                session.close()
            except BaseException:
                os._exit(1)
            os._exit(0)
        _, status = os.waitpid(pid, 0)
    finally:
        release.set()
        worker.join()
        session.close()
    assert os.waitstatus_to_exitcode(status) == 0
