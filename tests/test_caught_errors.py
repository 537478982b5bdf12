"""A caught database error dooms its transaction, on every backend, sync and async (SPEC §2)."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.exc import DBAPIError, IntegrityError
from sqlalchemy.orm import Session

import txguard
from tests.conftest import AsyncDatabase
from tests.helpers import SEED_ID, names, this_line
from tests.models import Item

SECRET = "tok_live_7f3a9c2e41"  # a bound value that must never reach a txguard message
TAKEN = SEED_ID  # the id the seed row holds
DUPLICATE = sa.text("INSERT INTO txg_items (id, name) VALUES (:id, :name)")
DUPLICATE_SQL = "INSERT INTO txg_items (id, name) VALUES"


@pytest.fixture
def seeded(engine: sa.Engine) -> Iterator[sa.Engine]:
    """Yield the backend's engine with the row a duplicate insert collides with."""
    seed(engine)
    yield engine


@pytest.fixture
def registry(seeded: sa.Engine) -> txguard.SessionRegistry:
    return txguard.configure(seeded)


def seed(engine: sa.Engine) -> None:
    with engine.begin() as conn:
        conn.execute(sa.insert(Item).values(id=TAKEN, name="seed"))


def fail(executor: Any) -> None:
    """Run a statement that fails with a duplicate key, and swallow the error."""
    try:
        executor.execute(DUPLICATE, {"id": TAKEN, "name": SECRET})
    except IntegrityError:
        pass


# Begin-once units.


def test_caught_statement_error_makes_the_unit_raise(
    registry: txguard.SessionRegistry, seeded: sa.Engine
) -> None:
    """A unit whose code caught a failed statement rolls back and raises at its exit."""
    with pytest.raises(txguard.UnexpectedRollbackError):
        with txguard.unit_of_work() as session:
            session.add(Item(name="lost"))
            session.flush()
            fail(session)
    assert names(seeded) == ["seed"]


def test_the_error_names_the_failed_line_and_sql_and_chains_the_cause(
    registry: txguard.SessionRegistry,
) -> None:
    """The message names the failed line, its SQL and the fix; __cause__ is the error."""
    with pytest.raises(txguard.UnexpectedRollbackError) as info:
        with txguard.unit_of_work() as session:
            try:
                line = this_line() + 1
                session.execute(DUPLICATE, {"id": TAKEN, "name": SECRET})
            except IntegrityError:
                pass
    message = str(info.value)
    assert f"test_caught_errors.py:{line}" in message
    assert DUPLICATE_SQL in message
    assert "propagation='nested'" in message
    assert isinstance(info.value.__cause__, IntegrityError)


def test_the_error_quotes_no_parameter_values(registry: txguard.SessionRegistry) -> None:
    """The message names the statement, never the values bound to it."""
    with pytest.raises(txguard.UnexpectedRollbackError) as info:
        with txguard.unit_of_work() as session:
            fail(session)
    assert SECRET not in str(info.value)
    assert str(TAKEN) not in str(info.value)


def test_a_caught_flush_error_names_its_statement(registry: txguard.SessionRegistry) -> None:
    """A failed ORM flush that was caught is reported with the INSERT it ran."""
    with pytest.raises(txguard.UnexpectedRollbackError) as info:
        with txguard.unit_of_work() as session:
            session.add(Item(id=TAKEN, name=SECRET))
            try:
                line = this_line() + 1
                session.flush()
            except IntegrityError:
                pass
    message = str(info.value)
    assert f"test_caught_errors.py:{line}" in message
    assert "INSERT INTO txg_items" in message
    assert SECRET not in message


def test_on_commit_does_not_run_and_on_rollback_does(registry: txguard.SessionRegistry) -> None:
    """After a caught failure the unit's on_commit callbacks are dropped and on_rollback ones run."""
    ran: list[str] = []
    with pytest.raises(txguard.UnexpectedRollbackError):
        with txguard.unit_of_work() as session:
            txguard.on_commit(lambda: ran.append("commit"))
            txguard.on_rollback(lambda: ran.append("rollback"))
            fail(session)
    assert ran == ["rollback"]


def test_a_joined_unit_shares_the_owners_mark(
    registry: txguard.SessionRegistry, seeded: sa.Engine
) -> None:
    """A statement that failed in a joined unit, caught there, dooms the owner's transaction."""
    with pytest.raises(txguard.UnexpectedRollbackError):
        with txguard.unit_of_work() as session:
            session.add(Item(name="lost"))
            with txguard.unit_of_work() as joined:
                fail(joined)
    assert names(seeded) == ["seed"]


def test_an_error_through_the_sessions_connection_counts(
    registry: txguard.SessionRegistry, seeded: sa.Engine
) -> None:
    """A Core statement run on session.connection() that fails dooms the unit too."""
    with pytest.raises(txguard.UnexpectedRollbackError):
        with txguard.unit_of_work() as session:
            session.add(Item(name="lost"))
            session.flush()
            fail(session.connection())
    assert names(seeded) == ["seed"]


def test_a_failure_where_the_unit_is_not_current_still_dooms_it(
    registry: txguard.SessionRegistry, seeded: sa.Engine
) -> None:
    """A unit's session failing in a worker thread, where no unit is current, dooms the unit."""
    with pytest.raises(txguard.UnexpectedRollbackError):
        with txguard.unit_of_work() as session:
            session.add(Item(name="lost"))
            session.flush()
            with ThreadPoolExecutor(1) as pool:
                pool.submit(fail, session).result()
    assert names(seeded) == ["seed"]


def test_a_requires_new_unit_keeps_its_own_mark(
    registry: txguard.SessionRegistry, seeded: sa.Engine
) -> None:
    """A caught failure in a requires_new unit dooms that unit, not the suspended one."""
    with txguard.unit_of_work() as session:
        session.add(Item(name="kept"))
        with pytest.raises(txguard.UnexpectedRollbackError):
            with txguard.unit_of_work(propagation="requires_new") as inner:
                inner.add(Item(name="lost"))
                fail(inner)
    assert names(seeded) == ["kept", "seed"]


def test_sessions_txguard_did_not_open_are_unaffected(
    registry: txguard.SessionRegistry, seeded: sa.Engine
) -> None:
    """A plain Session on the same engine commits after a caught failure, as SQLAlchemy does."""
    with Session(seeded) as session:
        session.add(Item(name="plain"))
        session.flush()
        savepoint = session.begin_nested()
        fail(session)
        savepoint.rollback()
        session.commit()
    assert names(seeded) == ["plain", "seed"]


def test_no_rollback_for_cannot_commit_after_a_failed_statement(
    registry: txguard.SessionRegistry, seeded: sa.Engine
) -> None:
    """A database error selected by no_rollback_for still rolls back: it doomed the transaction."""
    with pytest.raises(IntegrityError):
        with txguard.unit_of_work(no_rollback_for=IntegrityError) as session:
            session.add(Item(name="lost"))
            session.flush()
            session.execute(DUPLICATE, {"id": TAKEN, "name": SECRET})
    assert names(seeded) == ["seed"]


# Savepoints.


def test_a_failed_nested_unit_contains_the_error(
    registry: txguard.SessionRegistry, seeded: sa.Engine
) -> None:
    """An error that leaves a nested unit rolls its savepoint back; the owner commits the rest."""
    with txguard.unit_of_work() as session:
        session.add(Item(name="kept"))
        try:
            with txguard.unit_of_work(propagation="nested") as nested:
                nested.execute(DUPLICATE, {"id": TAKEN, "name": SECRET})
        except IntegrityError:
            pass
    assert names(seeded) == ["kept", "seed"]


def test_a_rolled_back_begin_nested_contains_the_error(
    registry: txguard.SessionRegistry, seeded: sa.Engine
) -> None:
    """A session.begin_nested() savepoint rolled back after the failure contains it."""
    with txguard.unit_of_work() as session:
        session.add(Item(name="kept"))
        try:
            with session.begin_nested():
                session.execute(DUPLICATE, {"id": TAKEN, "name": SECRET})
        except IntegrityError:
            pass
    assert names(seeded) == ["kept", "seed"]


def test_a_nested_unit_that_caught_an_error_raises_at_its_exit(
    registry: txguard.SessionRegistry, seeded: sa.Engine
) -> None:
    """A nested unit whose body swallowed a failure rolls its savepoint back and raises."""
    with txguard.unit_of_work() as session:
        session.add(Item(name="kept"))
        with pytest.raises(txguard.UnexpectedRollbackError, match="savepoint unit"):
            with txguard.unit_of_work(propagation="nested") as nested:
                nested.add(Item(name="undone"))
                nested.flush()
                fail(nested)
    assert names(seeded) == ["kept", "seed"]


@pytest.mark.parametrize("backend", ["sqlite", "mariadb"], indirect=True)
def test_a_failure_before_a_savepoint_is_not_its_own(
    registry: txguard.SessionRegistry, seeded: sa.Engine
) -> None:
    """A nested unit opened after a caught failure releases; the owner raises for the failure.

    (PostgreSQL refuses every statement after the failure, the SAVEPOINT too.)
    """
    with pytest.raises(txguard.UnexpectedRollbackError, match="The unit opened at"):
        with txguard.unit_of_work() as session:
            fail(session)
            with txguard.unit_of_work(propagation="nested") as nested:
                nested.add(Item(name="lost"))
    assert names(seeded) == ["seed"]


@pytest.mark.parametrize("backend", ["sqlite", "mariadb"], indirect=True)
def test_a_released_savepoint_passes_the_mark_to_its_parent(
    registry: txguard.SessionRegistry, seeded: sa.Engine
) -> None:
    """A begin_nested() block that swallowed a failure and released leaves the unit doomed.

    (PostgreSQL refuses the RELEASE itself, the savepoint being aborted.)
    """
    with pytest.raises(txguard.UnexpectedRollbackError):
        with txguard.unit_of_work() as session:
            session.add(Item(name="lost"))
            with session.begin_nested():
                fail(session)
    assert names(seeded) == ["seed"]


def test_rolling_back_an_outer_savepoint_contains_an_inner_failure(
    registry: txguard.SessionRegistry, seeded: sa.Engine
) -> None:
    """A failure in a savepoint is contained by rolling back any savepoint around it."""
    with txguard.unit_of_work() as session:
        session.add(Item(name="kept"))
        outer = session.begin_nested()
        inner = session.begin_nested()
        fail(session)
        inner.rollback()
        fail(session)  # in the outer savepoint, now the innermost
        outer.rollback()
    assert names(seeded) == ["kept", "seed"]


# Commit-as-you-go units.


def test_commit_as_you_go_commit_after_a_caught_error_raises(
    registry: txguard.SessionRegistry, seeded: sa.Engine
) -> None:
    """session.commit() after a caught failure rolls back and raises UnexpectedRollbackError."""
    with txguard.unit_of_work(mode="commit_as_you_go") as session:
        session.add(Item(name="lost"))
        session.flush()
        fail(session)
        with pytest.raises(txguard.UnexpectedRollbackError, match="session.commit"):
            session.commit()
    assert names(seeded) == ["seed"]


def test_commit_as_you_go_rollback_clears_the_mark(
    registry: txguard.SessionRegistry, seeded: sa.Engine
) -> None:
    """session.rollback() clears a caught failure; the next transaction commits."""
    with txguard.unit_of_work(mode="commit_as_you_go") as session:
        fail(session)
        session.rollback()
        session.add(Item(name="kept"))
        session.commit()
    assert names(seeded) == ["kept", "seed"]


def test_commit_as_you_go_refused_commit_clears_the_mark(
    registry: txguard.SessionRegistry, seeded: sa.Engine
) -> None:
    """After a refused commit the session starts afresh and its next commit goes through."""
    with txguard.unit_of_work(mode="commit_as_you_go") as session:
        fail(session)
        with pytest.raises(txguard.UnexpectedRollbackError):
            session.commit()
        session.add(Item(name="kept"))
        session.commit()
    assert names(seeded) == ["kept", "seed"]


# connect() units.


def test_connect_begin_once_raises_after_a_caught_error(seeded: sa.Engine) -> None:
    """A begin-once connection whose code caught a failed statement rolls back and raises."""
    with pytest.raises(txguard.UnexpectedRollbackError) as info:
        with txguard.connect(seeded) as conn:
            conn.execute(sa.insert(Item), {"name": "lost"})
            try:
                line = this_line() + 1
                conn.execute(DUPLICATE, {"id": TAKEN, "name": SECRET})
            except IntegrityError:
                pass
    assert f"test_caught_errors.py:{line}" in str(info.value)
    assert SECRET not in str(info.value)
    assert names(seeded) == ["seed"]


def test_connect_commit_as_you_go_commit_raises_and_rollback_clears(seeded: sa.Engine) -> None:
    """conn.commit() after a caught failure raises; conn.rollback() clears it for the next one."""
    with txguard.connect(seeded, mode="commit_as_you_go") as conn:
        conn.execute(sa.insert(Item), {"name": "lost"})
        fail(conn)
        with pytest.raises(txguard.UnexpectedRollbackError, match="conn.commit"):
            conn.commit()
        fail(conn)
        conn.rollback()
        conn.execute(sa.insert(Item), {"name": "kept"})
        conn.commit()
    assert names(seeded) == ["kept", "seed"]


def test_connect_rolled_back_savepoint_contains_the_error(seeded: sa.Engine) -> None:
    """A Core savepoint rolled back after the failure contains it; the connection commits."""
    with txguard.connect(seeded) as conn:
        conn.execute(sa.insert(Item), {"name": "kept"})
        try:
            with conn.begin_nested():
                conn.execute(DUPLICATE, {"id": TAKEN, "name": SECRET})
        except IntegrityError:
            pass
    assert names(seeded) == ["kept", "seed"]


# PostgreSQL: COMMIT answered by ROLLBACK.


@pytest.mark.parametrize("driver", ["psycopg", "psycopg2"])
@pytest.mark.parametrize("backend", ["postgresql"], indirect=True)
def test_postgresql_refuses_to_commit_an_aborted_transaction(
    seeded: sa.Engine, driver: str
) -> None:
    """An error on a raw DBAPI cursor, unseen by SQLAlchemy, makes the unit raise, not lose work."""
    engine = sa.create_engine(seeded.url.set(drivername=f"postgresql+{driver}"))
    registry = txguard.SessionRegistry(engine)
    ran: list[str] = []
    try:
        with pytest.raises(txguard.UnexpectedRollbackError, match="aborted"):
            with registry.unit_of_work() as session:
                session.add(Item(name="lost"))
                session.flush()
                registry.on_commit(lambda: ran.append("commit"))
                cursor = session.connection().connection.cursor()
                try:
                    cursor.execute("SELECT 1/0")
                except engine.dialect.dbapi.Error:  # type: ignore[union-attr]
                    pass
    finally:
        engine.dispose()
    assert ran == []
    assert names(seeded) == ["seed"]


@pytest.mark.parametrize("backend", ["postgresql"], indirect=True)
def test_postgresql_commit_as_you_go_refuses_an_aborted_transaction(seeded: sa.Engine) -> None:
    """session.commit() of an aborted transaction raises and rolls back; the session goes on."""
    registry = txguard.SessionRegistry(seeded)
    with registry.unit_of_work(mode="commit_as_you_go") as session:
        session.add(Item(name="lost"))
        session.flush()
        cursor = session.connection().connection.cursor()
        try:
            cursor.execute("SELECT 1/0")
        except seeded.dialect.dbapi.Error:  # type: ignore[union-attr]
            pass
        with pytest.raises(txguard.UnexpectedRollbackError, match="aborted"):
            session.commit()
        session.add(Item(name="kept"))
        session.commit()
    assert names(seeded) == ["kept", "seed"]


# Async units.


@pytest.fixture
async def async_registry(async_db: AsyncDatabase) -> txguard.SessionRegistry:
    seed(async_db.sync)
    return txguard.configure(async_db.engine)


async def test_async_caught_statement_error_makes_the_unit_raise(
    async_registry: txguard.SessionRegistry, async_db: AsyncDatabase
) -> None:
    """An async unit whose code caught a failed statement rolls back and raises at its exit."""
    ran: list[str] = []
    with pytest.raises(txguard.UnexpectedRollbackError) as info:
        async with txguard.unit_of_work() as session:
            session.add(Item(name="lost"))
            await session.flush()
            txguard.on_commit(lambda: ran.append("commit"))
            try:
                line = this_line() + 1
                await session.execute(DUPLICATE, {"id": TAKEN, "name": SECRET})
            except DBAPIError:
                pass
    assert f"test_caught_errors.py:{line}" in str(info.value)
    assert SECRET not in str(info.value)
    assert ran == []
    assert names(async_db.sync) == ["seed"]


async def test_async_failed_nested_unit_contains_the_error(
    async_registry: txguard.SessionRegistry, async_db: AsyncDatabase
) -> None:
    """An error that leaves an async nested unit is contained; the owner commits the rest."""
    async with txguard.unit_of_work() as session:
        session.add(Item(name="kept"))
        try:
            async with txguard.unit_of_work(propagation="nested") as nested:
                await nested.execute(DUPLICATE, {"id": TAKEN, "name": SECRET})
        except DBAPIError:
            pass
    assert names(async_db.sync) == ["kept", "seed"]


async def test_async_commit_as_you_go_commit_raises_and_rollback_clears(
    async_registry: txguard.SessionRegistry, async_db: AsyncDatabase
) -> None:
    """An async commit-as-you-go commit() after a caught failure raises; rollback() clears."""
    async with txguard.unit_of_work(mode="commit_as_you_go") as session:
        session.add(Item(name="lost"))
        await session.flush()
        try:
            await session.execute(DUPLICATE, {"id": TAKEN, "name": SECRET})
        except DBAPIError:
            pass
        with pytest.raises(txguard.UnexpectedRollbackError):
            await session.commit()
        session.add(Item(name="kept"))
        await session.commit()
    assert names(async_db.sync) == ["kept", "seed"]


async def test_async_connect_raises_after_a_caught_error(async_db: AsyncDatabase) -> None:
    """An async begin-once connection whose code caught a failed statement raises at its exit."""
    seed(async_db.sync)
    with pytest.raises(txguard.UnexpectedRollbackError):
        async with txguard.connect(async_db.engine) as conn:
            await conn.execute(sa.insert(Item), {"name": "lost"})
            try:
                await conn.execute(DUPLICATE, {"id": TAKEN, "name": SECRET})
            except DBAPIError:
                pass
    assert names(async_db.sync) == ["seed"]


@pytest.mark.parametrize("backend", ["postgresql"], indirect=True)
async def test_async_psycopg_refuses_to_commit_an_aborted_transaction(seeded: sa.Engine) -> None:
    """With psycopg async, an error on the raw driver connection makes the unit raise."""
    from sqlalchemy.ext.asyncio import create_async_engine

    engine = create_async_engine(seeded.url.set(drivername="postgresql+psycopg_async"))
    registry = txguard.SessionRegistry(engine)
    try:
        with pytest.raises(txguard.UnexpectedRollbackError, match="aborted"):
            async with registry.unit_of_work() as session:
                session.add(Item(name="lost"))
                await session.flush()
                connection = await session.connection()
                raw = await connection.get_raw_connection()
                try:
                    await raw.driver_connection.execute("SELECT 1/0")
                except Exception:  # psycopg's DivisionByZero, unseen by SQLAlchemy
                    pass
    finally:
        await engine.dispose()
    assert names(seeded) == ["seed"]
