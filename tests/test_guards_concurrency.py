"""The cross_thread, cross_task and long_transaction guards."""

from __future__ import annotations

import asyncio
import logging
import sys
import threading
import time
import warnings
from collections.abc import Callable, Iterator

import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from sqlalchemy.orm import Session

import txguard
import txguard._registry  # noqa: F401  (conftest's reset reaches for it; txguard loads lazily)
from tests.conftest import AsyncDatabase
from tests.helpers import names, once_inside, this_line
from tests.models import Item


@pytest.fixture(autouse=True)
def _uninstall() -> Iterator[None]:
    yield
    txguard.uninstall()


def where(line: int, function: str) -> str:
    """Name a line of this file as txguard's messages do."""
    code = sys._getframe(1).f_code
    return txguard._origin.describe_location(code.co_filename, line, function)


def in_thread(fn: Callable[[], object], name: str = "worker") -> BaseException | None:
    """Run ``fn`` in a new thread and return what it raised, if anything."""
    raised: list[BaseException] = []

    def run() -> None:
        try:
            fn()
        except BaseException as exc:
            raised.append(exc)

    thread = threading.Thread(target=run, name=name)
    thread.start()
    thread.join()
    return raised[0] if raised else None


def wait_for(condition: Callable[[], bool], timeout: float = 10.0) -> bool:
    """Poll ``condition`` until it holds or ``timeout`` seconds pass; return its last value."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


# cross_thread


def test_session_used_from_another_thread_warns(engine: sa.Engine) -> None:
    """A query from another thread while the owner flushes names both threads and the begin."""
    txguard.install(cross_thread="warn")
    session = Session(engine)
    line = this_line() + 1
    session.execute(sa.select(Item))
    errors: list[BaseException | None] = []
    once_inside(session, "before_flush", lambda: errors.append(
        in_thread(lambda: session.execute(sa.select(Item.id)), name="worker-1")
    ))
    session.add(Item(name="x"))
    with pytest.warns(txguard.CrossThreadWarning) as record:
        session.flush()
    session.close()
    assert errors[0] is None or isinstance(errors[0], sa.exc.DBAPIError)  # SQLite refuses, too
    message = str(record[0].message)
    assert "thread 'worker-1' while thread 'MainThread' is inside it" in message
    assert f"autobegun at {where(line, 'test_session_used_from_another_thread_warns')}" in message


def test_cross_thread_warning_points_at_the_other_threads_line(engine: sa.Engine) -> None:
    """The warning's line is the call made in the other thread."""
    txguard.install(cross_thread="warn")
    with Session(engine) as session, session.begin():
        session.execute(sa.select(Item))

        def use() -> None:
            session.add(Item(name="x"))
            use.line = this_line() + 1  # type: ignore[attr-defined]
            session.flush()

        once_inside(session, "do_orm_execute", lambda: in_thread(use))
        with pytest.warns(txguard.CrossThreadWarning) as record:
            session.execute(sa.select(Item.id))
        session.rollback()
    assert (record[0].filename, record[0].lineno) == (__file__, use.line)  # type: ignore[attr-defined]


def test_commit_from_another_thread_warns(engine: sa.Engine) -> None:
    """Committing a Session while the thread that began its transaction is inside it is caught."""
    txguard.install(cross_thread="warn")
    session = Session(engine)
    session.execute(sa.select(Item))
    errors: list[BaseException | None] = []
    once_inside(session, "do_orm_execute", lambda: errors.append(in_thread(session.commit)))
    with pytest.warns(txguard.CrossThreadWarning, match=r"ends its transaction \(commit"):
        session.execute(sa.select(Item.id))
    session.close()
    assert errors[0] is None or isinstance(errors[0], sa.exc.DBAPIError)


def test_cross_thread_error_raises_in_the_other_thread(engine: sa.Engine) -> None:
    """At "error" the other thread's call raises CrossThreadWarning."""
    txguard.install(cross_thread="error")
    errors: list[BaseException | None] = []
    with Session(engine) as session:
        session.execute(sa.select(Item))
        once_inside(session, "do_orm_execute", lambda: errors.append(
            in_thread(lambda: session.execute(sa.select(Item)))
        ))
        session.execute(sa.select(Item.id))
    assert isinstance(errors[0], txguard.CrossThreadWarning)


def test_session_handed_over_after_commit_is_fine(engine: sa.Engine) -> None:
    """A Session whose transaction ended may be used by another thread."""
    txguard.install(cross_thread="error")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with Session(engine) as session:
            session.execute(sa.select(Item))
            session.commit()

            def use() -> None:
                session.add(Item(name="x"))
                session.commit()

            assert in_thread(use) is None
    assert names(engine) == ["x"]


def test_session_per_thread_is_fine(engine: sa.Engine) -> None:
    """Threads that each use their own Session raise nothing."""
    txguard.install(cross_thread="error")

    def work(name: str) -> None:
        with Session(engine) as session, session.begin():
            session.add(Item(name=name))

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        errors = [in_thread(lambda n=n: work(n)) for n in ("a", "b")]  # type: ignore[misc]
    assert errors == [None, None]
    assert names(engine) == ["a", "b"]


async def test_to_thread_with_the_loops_session_warns(engine: sa.Engine) -> None:
    """asyncio.to_thread() copies the context but runs in another thread: overlap is caught."""
    txguard.install(cross_thread="warn")
    session = Session(engine)
    inside, done = threading.Event(), threading.Event()
    once_inside(session, "before_flush", lambda: (inside.set(), done.wait(30)))

    def other() -> None:
        inside.wait(30)
        try:
            session.execute(sa.select(Item.id))
        except sa.exc.DBAPIError:
            pass  # SQLite refuses to be used from another thread as well
        finally:
            done.set()

    session.add(Item(name="x"))
    with pytest.warns(txguard.CrossThreadWarning, match="asyncio_[0-9]+' while thread 'asyncio_"):
        await asyncio.gather(asyncio.to_thread(session.flush), asyncio.to_thread(other))
    session.close()


def test_cross_thread_off_reports_nothing(engine: sa.Engine) -> None:
    """With cross_thread="off" another thread's use is not checked."""
    txguard.install(cross_thread="off")
    errors: list[BaseException | None] = []
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with Session(engine) as session:
            session.execute(sa.select(Item))
            once_inside(session, "do_orm_execute", lambda: errors.append(
                in_thread(lambda: session.execute(sa.select(Item)))
            ))
            session.execute(sa.select(Item.id))
    assert errors[0] is None or isinstance(errors[0], sa.exc.DBAPIError)


# cross_task


async def test_async_session_used_by_a_child_task_warns(async_db: AsyncDatabase) -> None:
    """A child task using the AsyncSession of its parent's open transaction is caught."""
    txguard.install(cross_task="warn")
    async with AsyncSession(async_db.engine) as session:
        line = this_line() + 1
        await session.execute(sa.select(Item))
        child = asyncio.create_task(session.execute(sa.select(Item.id)), name="child")
        with pytest.warns(txguard.CrossTaskWarning) as record:
            await child
    message = str(record[0].message)
    assert "An AsyncSession runs a statement" in message
    assert "in task 'child'" in message
    assert f"autobegun at {where(line, 'test_async_session_used_by_a_child_task_warns')}" in message


async def test_unit_session_used_by_a_child_task_warns(async_db: AsyncDatabase) -> None:
    """current_session() in a child task reaches the parent's unit: that use is caught."""
    txguard.install(cross_task="error")
    registry = txguard.SessionRegistry(async_db.engine)

    async def child() -> None:
        await registry.current_session().execute(sa.select(Item))

    async with registry.unit_of_work():
        with pytest.raises(txguard.CrossTaskWarning, match="which is still running"):
            await asyncio.gather(child())


async def test_async_sessionmaker_begin_commits_in_its_cleanup_task(async_db: AsyncDatabase) -> None:
    """SQLAlchemy commits `async with sessionmaker.begin()` in a task of its own: not a misuse."""
    txguard.install(cross_task="error", cross_thread="error")
    factory = async_sessionmaker(async_db.engine)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        async with factory.begin() as session:
            session.add(Item(name="a"))
    assert names(async_db.sync) == ["a"]


async def test_wait_for_on_the_owners_session_is_fine(async_db: AsyncDatabase) -> None:
    """asyncio.wait_for() (a task of its own before 3.12) awaited by the owner is not a misuse."""
    txguard.install(cross_task="error")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        async with AsyncSession(async_db.engine) as session, session.begin():
            await asyncio.wait_for(session.execute(sa.select(Item)), timeout=30)


async def test_session_of_a_finished_task_is_handed_over(async_db: AsyncDatabase) -> None:
    """A transaction begun by a task that has finished (e.g. a fixture) passes to its user."""
    txguard.install(cross_task="error")
    session = AsyncSession(async_db.engine)

    async def setup() -> None:
        await session.execute(sa.select(Item))

    await asyncio.create_task(setup())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        await session.execute(sa.select(Item.id))
    await session.close()


async def test_cross_task_off_reports_nothing(async_db: AsyncDatabase) -> None:
    """With cross_task="off" another task's use is not checked."""
    txguard.install(cross_task="off")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        async with AsyncSession(async_db.engine) as session:
            await session.execute(sa.select(Item))
            await asyncio.create_task(session.execute(sa.select(Item.id)))


# long_transaction


def test_long_transaction_warns_while_still_open(engine: sa.Engine) -> None:
    """The sweep warns once about an open transaction older than the threshold."""
    txguard.install(long_transaction=0.05)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        with Session(engine) as session:
            line = this_line() + 1
            session.execute(sa.select(Item))
            seen = wait_for(lambda: any(
                issubclass(w.category, txguard.LongTransactionWarning) for w in record
            ))
            session.commit()
    assert seen
    [warning] = [w for w in record if issubclass(w.category, txguard.LongTransactionWarning)]
    message = str(warning.message)
    assert "is still open" in message and "(long_transaction=0.05 s)" in message
    assert f"autobegun at {where(line, 'test_long_transaction_warns_while_still_open')}" in message
    assert (warning.filename, warning.lineno) == (__file__, line)


def test_long_transaction_warns_once(engine: sa.Engine) -> None:
    """However long it stays open, a transaction is reported once."""
    txguard.install(long_transaction=0.02)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        with engine.connect() as conn:
            conn.execute(sa.text("SELECT 1"))
            wait_for(lambda: bool(record))
            time.sleep(0.2)  # several more sweeps pass while it stays open
            conn.rollback()
    assert len([w for w in record if issubclass(w.category, txguard.LongTransactionWarning)]) == 1


def test_long_connection_transaction_names_its_sql(engine: sa.Engine) -> None:
    """A Core connection's long transaction is reported with the SQL that began it."""
    txguard.install(long_transaction=0.05)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        with engine.connect() as conn:
            conn.execute(sa.insert(Item), {"name": "slow"})
            wait_for(lambda: bool(record))
            conn.commit()
    message = str(record[0].message)
    assert "A Connection's transaction" in message
    assert "by 'INSERT INTO txg_items (name) VALUES" in message
    assert "slow" not in message.split("by '")[1].split("'")[0]


def test_long_transaction_logs_when_it_ends(engine: sa.Engine, caplog: pytest.LogCaptureFixture) -> None:
    """When a long transaction finally ends, logger txguard says so at INFO."""
    txguard.install(long_transaction=0.05)
    caplog.set_level(logging.INFO, logger="txguard")
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        with Session(engine) as session:
            session.execute(sa.select(Item))
            wait_for(lambda: bool(record))
    ended = [r for r in caplog.records if r.name == "txguard" and "ended after" in r.getMessage()]
    assert len(ended) == 1 and ended[0].levelno == logging.INFO


def test_short_transactions_are_not_reported(engine: sa.Engine, caplog: pytest.LogCaptureFixture) -> None:
    """Transactions that end before the threshold produce no warning and no log."""
    txguard.install(long_transaction=30)
    caplog.set_level(logging.INFO, logger="txguard")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for name in ("a", "b"):
            with Session(engine) as session, session.begin():
                session.add(Item(name=name))
    assert [r for r in caplog.records if r.name == "txguard"] == []


def test_uninstall_stops_the_sweep() -> None:
    """uninstall() stops the background sweep thread."""
    txguard.install(long_transaction=0.05)
    txguard.uninstall()
    assert not any(t.name == "txguard-long-transactions" for t in threading.enumerate())


