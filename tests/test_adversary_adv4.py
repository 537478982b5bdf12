"""Adversarial shapes for today's callback changes (savepoints, threads, connect())."""

from __future__ import annotations

import asyncio
import contextvars
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, TypeVar

import pytest
import sqlalchemy as sa
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

import txguard
from tests.conftest import AsyncDatabase
from tests.helpers import names
from tests.models import Account, Item

T = TypeVar("T")


@pytest.fixture
def registry(engine: sa.Engine) -> txguard.SessionRegistry[Session]:
    return txguard.configure(engine)


def in_worker(fn: Callable[..., T], *args: Any) -> T:
    with ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(contextvars.copy_context().run, fn, *args).result()


def test_worker_on_commit_inside_a_raw_savepoint_that_rolls_back_is_dropped(
    registry: txguard.SessionRegistry[Session], engine: sa.Engine
) -> None:
    seen: list[str] = []
    with txguard.unit_of_work() as session:
        session.add(Item(name="kept"))
        with pytest.raises(RuntimeError), session.begin_nested():
            session.add(Item(name="undone"))
            in_worker(txguard.on_commit, lambda: seen.append("undone sent"))
            in_worker(txguard.on_rollback, lambda: seen.append("undone rolled back"))
            raise RuntimeError
        assert seen == []
    assert seen == ["undone rolled back"]
    assert names(engine) == ["kept"]


def test_three_deep_mixed(registry: txguard.SessionRegistry[Session], engine: sa.Engine) -> None:
    seen: list[str] = []
    with txguard.unit_of_work() as session:
        with session.begin_nested():  # s1 released
            txguard.on_commit(lambda: seen.append("s1"))
            with pytest.raises(RuntimeError), session.begin_nested():  # s2 rolled back
                txguard.on_commit(lambda: seen.append("s2"))
                with session.begin_nested():  # s3 released inside s2
                    txguard.on_commit(lambda: seen.append("s3"))
                    txguard.on_rollback(lambda: seen.append("s3 rb"))
                raise RuntimeError
            with session.begin_nested():
                txguard.on_commit(lambda: seen.append("s2b"))
    assert seen == ["s1", "s3 rb", "s2b"]  # registration order


def test_core_savepoint_on_session_connection(
    registry: txguard.SessionRegistry[Session], engine: sa.Engine
) -> None:
    seen: list[str] = []
    with txguard.unit_of_work() as session:
        conn = session.connection()
        with pytest.raises(RuntimeError), conn.begin_nested():
            conn.execute(sa.insert(Item.__table__).values(name="undone"))
            txguard.on_commit(lambda: seen.append("undone sent"))
            raise RuntimeError
        session.add(Item(name="kept"))
    assert names(engine) == ["kept"]
    assert seen == []


def test_rollback_in_commit_as_you_go_with_savepoints_open(
    registry: txguard.SessionRegistry[Session], engine: sa.Engine
) -> None:
    seen: list[str] = []
    with txguard.unit_of_work(mode="commit_as_you_go") as session:
        session.begin_nested()
        txguard.on_commit(lambda: seen.append("a"))
        txguard.on_rollback(lambda: seen.append("a rb"))
        session.begin_nested()
        txguard.on_commit(lambda: seen.append("b"))
        session.rollback()
        assert seen == ["a rb"]
        txguard.on_commit(lambda: seen.append("c"))
        session.add(Item(name="c"))
        session.commit()
    assert seen == ["a rb", "c"]


def test_savepoint_released_whose_flush_fails_at_commit(
    registry: txguard.SessionRegistry[Session], engine: sa.Engine
) -> None:
    with txguard.unit_of_work() as s:
        s.add(Account(id=1, balance=0))
    seen: list[str] = []
    with pytest.raises(IntegrityError):
        with txguard.unit_of_work() as session:
            with session.begin_nested():
                txguard.on_commit(lambda: seen.append("in sp"))
                txguard.on_rollback(lambda: seen.append("rb"))
            session.add(Account(id=1, balance=0))
    assert seen == ["rb"]


def test_nested_unit_savepoint_outer_rolls_back(registry: txguard.SessionRegistry[Session]) -> None:
    seen: list[str] = []
    with pytest.raises(RuntimeError), txguard.unit_of_work() as session:
        with txguard.unit_of_work(propagation="nested") as inner:
            with inner.begin_nested():
                txguard.on_commit(lambda: seen.append("x"))
                txguard.on_rollback(lambda: seen.append("x rb"))
        raise RuntimeError
    assert seen == ["x rb"]


def test_nested_unit_inside_raw_savepoint_rolled_back(registry: txguard.SessionRegistry[Session]) -> None:
    seen: list[str] = []
    with txguard.unit_of_work() as session:
        sp = session.begin_nested()
        with txguard.unit_of_work(propagation="nested"):
            txguard.on_commit(lambda: seen.append("x"))
        sp.rollback()
        txguard.on_commit(lambda: seen.append("y"))
    assert seen == ["y"]


def test_retry_attempt_callbacks(registry: txguard.SessionRegistry[Session], engine: sa.Engine) -> None:
    seen: list[str] = []
    attempts: list[int] = []
    from sqlalchemy.exc import OperationalError

    class Deadlock(Exception):
        pass

    @txguard.transactional(retries=2, retry_on=(Deadlock,), backoff=0)
    def work() -> None:
        session = txguard.current_session()
        attempts.append(1)
        n = len(attempts)
        with session.begin_nested():
            txguard.on_commit(lambda: seen.append(f"c{n}"))
            txguard.on_rollback(lambda: seen.append(f"r{n}"))
        if n == 1:
            raise Deadlock
    work()
    assert seen == ["c2"]  # a failed attempt's callbacks never run (tests/test_retry.py)


def test_capture_on_commit_with_dropped(registry: txguard.SessionRegistry[Session]) -> None:
    from txguard.testing import capture_on_commit
    with capture_on_commit() as captured:
        with txguard.unit_of_work() as session:
            with pytest.raises(RuntimeError), session.begin_nested():
                txguard.on_commit(lambda: None)
                raise RuntimeError
            txguard.on_commit(print)
    assert captured == [print]


async def test_async_to_thread_in_raw_savepoint(async_db: AsyncDatabase) -> None:
    registry = txguard.SessionRegistry(async_db.engine)
    seen: list[str] = []
    async with registry.unit_of_work() as session:
        session.add(Item(name="kept"))
        with pytest.raises(RuntimeError):
            async with session.begin_nested():
                session.add(Item(name="undone"))
                await asyncio.to_thread(txguard.on_commit, lambda: seen.append("undone"), registry=registry)
                txguard.on_commit(lambda: seen.append("own undone"), registry=registry)
                raise RuntimeError
        await asyncio.to_thread(txguard.on_commit, lambda: seen.append("kept"), registry=registry)
    assert seen == ["kept"]
    assert names(async_db.sync) == ["kept"]


def test_connect_begin_inside_commit_as_you_go_nested(
    registry: txguard.SessionRegistry[Session], engine: sa.Engine
) -> None:
    seen: list[str] = []
    with txguard.connect(engine, mode="commit_as_you_go") as conn:
        with conn.begin():
            sp1 = conn.begin_nested()
            txguard.on_commit(lambda: seen.append("sp1"))
            sp2 = conn.begin_nested()
            txguard.on_commit(lambda: seen.append("sp2"))
            sp2.commit()
            sp1.rollback()
            txguard.on_commit(lambda: seen.append("root"))
        assert seen == ["root"]
        with conn.begin():
            sp1 = conn.begin_nested()
            sp2 = conn.begin_nested()
            txguard.on_commit(lambda: seen.append("inner2"))
            sp1.rollback()   # outer rolled back while inner open
            txguard.on_commit(lambda: seen.append("root2"))
    assert seen == ["root", "root2"]


def test_non_robust_failure_in_savepoint_callbacks(registry: txguard.SessionRegistry[Session], engine: sa.Engine) -> None:
    seen: list[str] = []
    with pytest.raises(ZeroDivisionError):
        with txguard.unit_of_work() as session:
            session.add(Item(name="a"))
            with session.begin_nested():
                txguard.on_commit(lambda: 1 / 0)
            txguard.on_commit(lambda: seen.append("after"))
    assert names(engine) == ["a"]
    assert seen == []


def test_keyboard_interrupt_from_callback(registry: txguard.SessionRegistry[Session], engine: sa.Engine) -> None:
    def boom() -> None:
        raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        with txguard.unit_of_work() as session:
            session.add(Item(name="a"))
            with session.begin_nested():
                txguard.on_commit(boom)
    assert names(engine) == ["a"]


def test_core_savepoint_left_open_on_session_connection_commits_with_the_unit(
    registry: txguard.SessionRegistry[Session], engine: sa.Engine
) -> None:
    seen: list[object] = []
    with txguard.unit_of_work() as session:
        conn = session.connection()
        conn.begin_nested()
        conn.execute(sa.insert(Item.__table__).values(name="a"))
        txguard.on_commit(lambda: seen.append(names(engine)))
        session.begin_nested()
        txguard.on_commit(lambda: seen.append("session sp left open"))
    assert seen == [["a"], "session sp left open"]


def test_core_savepoint_released_on_session_connection_keeps_on_commit(
    registry: txguard.SessionRegistry[Session], engine: sa.Engine
) -> None:
    seen: list[object] = []
    with txguard.unit_of_work() as session:
        conn = session.connection()
        with conn.begin_nested():
            conn.execute(sa.insert(Item.__table__).values(name="a"))
            txguard.on_commit(lambda: seen.append(names(engine)))
            txguard.on_rollback(lambda: seen.append("rb"))
    assert seen == [["a"]]


def test_caught_failure_in_core_savepoint_on_session_connection_is_contained(
    registry: txguard.SessionRegistry[Session], engine: sa.Engine
) -> None:
    """A duplicate key caught in a Core savepoint the code rolled back: the unit commits."""
    seen: list[object] = []
    with txguard.unit_of_work() as session:
        session.add(Account(id=1, balance=0))
        session.flush()
        conn = session.connection()
        with pytest.raises(IntegrityError), conn.begin_nested():
            txguard.on_commit(lambda: seen.append("dup sent"))
            txguard.on_rollback(lambda: seen.append("dup undone"))
            conn.execute(sa.insert(Account.__table__).values(id=1, balance=0))
        txguard.on_commit(lambda: seen.append("kept"))
    assert seen == ["dup undone", "kept"]


async def test_async_core_savepoint_on_session_connection(async_db: AsyncDatabase) -> None:
    registry = txguard.SessionRegistry(async_db.engine)
    seen: list[str] = []
    async with registry.unit_of_work() as session:
        session.add(Item(name="kept"))
        conn = await session.connection()
        with pytest.raises(RuntimeError):
            async with conn.begin_nested():
                await conn.execute(sa.insert(Item.__table__).values(name="undone"))
                txguard.on_commit(lambda: seen.append("undone"), registry=registry)
                raise RuntimeError
        txguard.on_commit(lambda: seen.append("kept"), registry=registry)
    assert seen == ["kept"]
    assert names(async_db.sync) == ["kept"]
