"""SQLite on the stock drivers (pysqlite, aiosqlite): BEGIN and SAVEPOINT must mean what they say."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, create_async_engine
from sqlalchemy.orm import Session

import txguard
from txguard._sqlite import uses_sqlite_recipe
from tests.helpers import names
from tests.models import Base, Item


@pytest.fixture
def fresh_engine(tmp_path: Path) -> sa.Engine:
    engine = sa.create_engine(f"sqlite:///{tmp_path / 'fresh.db'}")
    Base.metadata.create_all(engine)
    return engine


def _release_then_roll_back(engine: sa.Engine) -> None:
    with Session(engine) as session:
        session.begin()
        with session.begin_nested():
            session.add(Item(name="released"))
        session.rollback()


def test_plain_pysqlite_commits_a_released_savepoint(fresh_engine: sa.Engine) -> None:
    """Without the recipe, RELEASE SAVEPOINT commits on its own (the bug txguard fixes)."""
    _release_then_roll_back(fresh_engine)
    assert names(fresh_engine) == ["released"]


def test_an_outer_rollback_undoes_a_released_savepoint(fresh_engine: sa.Engine) -> None:
    """Once txguard is given the engine, an outer rollback undoes a released savepoint."""
    txguard.SessionRegistry(fresh_engine)
    _release_then_roll_back(fresh_engine)
    assert names(fresh_engine) == []


def test_nested_unit_is_undone_by_the_outer_rollback(fresh_engine: sa.Engine) -> None:
    """A released propagation='nested' unit is undone when its owner rolls back."""
    registry = txguard.SessionRegistry(fresh_engine)
    with pytest.raises(RuntimeError):
        with registry.unit_of_work():
            with registry.unit_of_work(propagation="nested") as session:
                session.add(Item(name="released"))
            raise RuntimeError
    assert names(fresh_engine) == []


def test_connections_pooled_before_txguard_are_fixed(fresh_engine: sa.Engine) -> None:
    """Connections already in the pool when txguard sees the engine get BEGIN too."""
    with fresh_engine.connect() as conn:
        conn.execute(sa.text("SELECT 1"))
    assert fresh_engine.pool.checkedin() == 1
    txguard.SessionRegistry(fresh_engine)
    _release_then_roll_back(fresh_engine)
    assert names(fresh_engine) == []


def test_the_recipe_is_installed_once(fresh_engine: sa.Engine) -> None:
    """Building several registries on one engine installs the recipe once."""
    txguard.SessionRegistry(fresh_engine)
    txguard.configure(fresh_engine)
    assert uses_sqlite_recipe(fresh_engine)
    with fresh_engine.begin() as conn:
        conn.execute(sa.insert(Item).values(name="a"))
    assert names(fresh_engine) == ["a"]


def test_autocommit_connections_get_no_begin(fresh_engine: sa.Engine) -> None:
    """An AUTOCOMMIT connection keeps autocommitting; the recipe emits no BEGIN for it."""
    txguard.SessionRegistry(fresh_engine)
    with fresh_engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.execute(sa.insert(Item).values(name="auto"))
        conn.rollback()
    assert names(fresh_engine) == ["auto"]


def test_other_dialects_are_left_alone(engine: sa.Engine, backend: str) -> None:
    """Only SQLite engines get the recipe."""
    txguard.SessionRegistry(engine)
    assert uses_sqlite_recipe(engine) is (backend == "sqlite")


def test_the_recipe_adds_no_connection_events(fresh_engine: sa.Engine) -> None:
    """No ConnectionEvents listener: one would make SQLAlchemy dispatch around every statement."""
    txguard.SessionRegistry(fresh_engine)
    for name in ("begin", "before_execute", "before_cursor_execute", "commit", "rollback"):
        assert len(getattr(fresh_engine.dispatch, name)) == 0, name
    assert not fresh_engine._has_events


def test_a_returned_autocommit_connection_begins_again(fresh_engine: sa.Engine) -> None:
    """After an AUTOCOMMIT checkout the pool resets the connection, and BEGIN comes back."""
    txguard.SessionRegistry(fresh_engine)
    with fresh_engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.execute(sa.text("SELECT 1"))
    assert fresh_engine.pool.checkedin() == 1
    _release_then_roll_back(fresh_engine)
    assert names(fresh_engine) == []


def _write_from_another_connection(path: Path, name: str) -> None:
    """Insert ``name`` through a connection of its own that does not wait for locks."""
    other = sa.create_engine(f"sqlite:///{path}", connect_args={"timeout": 0})
    try:
        with other.begin() as conn:
            conn.execute(sa.insert(Item).values(name=name))
    finally:
        other.dispose()


def test_the_drivers_begin_mode_is_honoured(tmp_path: Path) -> None:
    """isolation_level='IMMEDIATE' on the driver gives BEGIN IMMEDIATE: the write lock at once."""
    path = tmp_path / "immediate.db"
    engine = sa.create_engine(
        f"sqlite:///{path}", connect_args={"isolation_level": "IMMEDIATE", "timeout": 0}
    )
    Base.metadata.create_all(engine)
    registry = txguard.SessionRegistry(engine)
    with registry.unit_of_work() as session:
        session.execute(sa.text("SELECT 1"))  # reads only, yet holds the write lock
        with pytest.raises(sa.exc.OperationalError, match="database is locked"):
            _write_from_another_connection(path, "blocked")
    _write_from_another_connection(path, "after")
    assert names(engine) == ["after"]
    engine.dispose()


def test_an_applications_own_begin_recipe_still_works(fresh_engine: sa.Engine) -> None:
    """SQLAlchemy's documented event recipe on the same engine: one BEGIN, savepoints correct."""

    @sa.event.listens_for(fresh_engine, "connect")
    def _no_driver_begin(dbapi_connection: Any, record: Any) -> None:
        dbapi_connection.isolation_level = None

    @sa.event.listens_for(fresh_engine, "begin")
    def _begin(conn: sa.Connection) -> None:
        conn.exec_driver_sql("BEGIN")

    txguard.SessionRegistry(fresh_engine)
    _release_then_roll_back(fresh_engine)
    assert names(fresh_engine) == []
    with fresh_engine.begin() as conn:
        conn.execute(sa.insert(Item).values(name="kept"))
    assert names(fresh_engine) == ["kept"]


@pytest.fixture
async def fresh_async_engine(fresh_engine: sa.Engine) -> AsyncIterator[AsyncEngine]:
    engine = create_async_engine(fresh_engine.url.set(drivername="sqlite+aiosqlite"))
    yield engine
    await engine.dispose()


async def test_aiosqlite_outer_rollback_undoes_a_released_savepoint(
    fresh_engine: sa.Engine, fresh_async_engine: AsyncEngine
) -> None:
    """On aiosqlite too, an outer rollback undoes a released savepoint once txguard has the engine."""
    txguard.SessionRegistry(fresh_async_engine)
    async with AsyncSession(fresh_async_engine) as session:
        await session.begin()
        async with session.begin_nested():
            session.add(Item(name="released"))
        await session.rollback()
    assert names(fresh_engine) == []


async def test_aiosqlite_deferred_begin_waits_for_no_round_trip(
    fresh_async_engine: AsyncEngine, caplog: pytest.LogCaptureFixture
) -> None:
    """A deferred BEGIN on aiosqlite is queued on the worker thread, not awaited: it runs
    first, in the round trip of the statement after it."""
    aiosqlite = pytest.importorskip("aiosqlite")
    if not hasattr(aiosqlite.Connection, "stop"):
        pytest.skip("before aiosqlite 0.22.1 BEGIN takes a round trip (a call needs a future)")
    txguard.SessionRegistry(fresh_async_engine)
    async with fresh_async_engine.connect() as conn:
        loop_turns: list[str] = []
        asyncio.get_running_loop().call_soon(loop_turns.append, "a turn of the loop")
        with caplog.at_level(logging.DEBUG, logger="aiosqlite"):
            await conn.begin()
            assert loop_turns == []  # begin() never waited on the worker
            await conn.execute(sa.text("SELECT 1"))
        worker_calls = [r.getMessage() for r in caplog.records if r.getMessage().startswith("executing")]
        assert "_begin" in worker_calls[0]
        assert await conn.run_sync(_driver_in_transaction)
        await conn.rollback()


def _immediate_engines(path: Path) -> tuple[sa.Engine, AsyncEngine]:
    """A sync engine that made the tables, and a txguard aiosqlite engine that begins IMMEDIATE."""
    sync = sa.create_engine(f"sqlite:///{path}")
    Base.metadata.create_all(sync)
    engine = create_async_engine(
        f"sqlite+aiosqlite:///{path}", connect_args={"isolation_level": "IMMEDIATE", "timeout": 0}
    )
    txguard.SessionRegistry(engine)
    return sync, engine


async def test_aiosqlite_immediate_begin_on_a_locked_database_raises(tmp_path: Path) -> None:
    """BEGIN IMMEDIATE on aiosqlite is awaited: a write lock held elsewhere fails the begin."""
    path = tmp_path / "locked.db"
    sync, engine = _immediate_engines(path)
    with sync.connect() as holder:
        holder.exec_driver_sql("BEGIN IMMEDIATE")
        async with engine.connect() as conn:
            with pytest.raises(sa.exc.OperationalError, match="database is locked"):
                await conn.begin()
        holder.rollback()
    await engine.dispose()
    sync.dispose()


def _driver_in_transaction(conn: sa.Connection) -> bool:
    return bool(conn.connection.dbapi_connection.driver_connection.in_transaction)  # type: ignore[union-attr]


async def test_aiosqlite_honours_the_drivers_begin_mode(tmp_path: Path) -> None:
    """isolation_level='IMMEDIATE' on aiosqlite gives BEGIN IMMEDIATE: the write lock at once."""
    path = tmp_path / "immediate.db"
    sync, engine = _immediate_engines(path)
    async with engine.begin() as conn:
        await conn.execute(sa.text("SELECT 1"))  # reads only, yet holds the write lock
        with pytest.raises(sa.exc.OperationalError, match="database is locked"):
            _write_from_another_connection(path, "blocked")
    await engine.dispose()
    _write_from_another_connection(path, "after")
    assert names(sync) == ["after"]
    sync.dispose()


async def test_aiosqlite_autocommit_connections_get_no_begin(
    fresh_engine: sa.Engine, fresh_async_engine: AsyncEngine
) -> None:
    """An AUTOCOMMIT aiosqlite connection keeps autocommitting; the recipe emits no BEGIN for it."""
    txguard.SessionRegistry(fresh_async_engine)
    async with fresh_async_engine.connect() as conn:
        auto = await conn.execution_options(isolation_level="AUTOCOMMIT")
        await auto.execute(sa.insert(Item).values(name="auto"))
        await auto.rollback()
    assert names(fresh_engine) == ["auto"]

