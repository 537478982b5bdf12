"""txguard.testing: rollback_after() on every backend, and capture_on_commit()."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import sqlalchemy as sa
from sqlalchemy.orm import Session

import txguard
from tests.conftest import AsyncDatabase
from tests.helpers import names
from tests.models import Base, Item
from txguard.testing import capture_on_commit, rollback_after


@pytest.fixture
def registry(engine: sa.Engine) -> txguard.SessionRegistry:
    return txguard.configure(engine)


def names_on(conn: sa.Connection) -> list[str]:
    """Return the item names visible on ``conn`` (inside the outer transaction)."""
    return sorted(conn.scalars(sa.select(Item.name)))


def add(name: str) -> None:
    txguard.current_session().add(Item(name=name))


# rollback_after(): what the code under test commits is gone afterwards.


def test_units_commit_inside_and_nothing_is_left_after(
    registry: txguard.SessionRegistry, engine: sa.Engine
) -> None:
    """Commits of units inside the block are visible in it and rolled back at its end."""
    with rollback_after(engine) as conn:
        with txguard.unit_of_work() as session:
            session.add(Item(name="a"))
        with txguard.unit_of_work() as session:
            session.add(Item(name="b"))
        assert names_on(conn) == ["a", "b"]
    assert names(engine) == []


def test_commit_as_you_go_commits_and_rollbacks_are_rolled_back(
    registry: txguard.SessionRegistry, engine: sa.Engine
) -> None:
    """session.commit() and session.rollback() act on savepoints: only the outer rollback is real."""
    with rollback_after(engine) as conn:
        with txguard.unit_of_work(mode="commit_as_you_go") as session:
            session.add(Item(name="a"))
            session.commit()
            session.add(Item(name="b"))
            session.flush()
            session.rollback()
            session.add(Item(name="c"))
            session.commit()
        assert names_on(conn) == ["a", "c"]
    assert names(engine) == []


def test_failed_unit_rolls_back_only_its_own_work(
    registry: txguard.SessionRegistry, engine: sa.Engine
) -> None:
    """A unit that fails rolls back to its savepoint; what committed before stays until the end."""
    with rollback_after(engine) as conn:
        with txguard.unit_of_work() as session:
            session.add(Item(name="a"))
        with pytest.raises(RuntimeError):
            with txguard.unit_of_work() as session:
                session.add(Item(name="b"))
                session.flush()
                raise RuntimeError
        assert names_on(conn) == ["a"]
    assert names(engine) == []


def test_nested_units_use_nested_savepoints(
    registry: txguard.SessionRegistry, engine: sa.Engine
) -> None:
    """propagation='nested' and begin_nested() nest savepoints inside the unit's own savepoint."""
    with rollback_after(engine) as conn:
        with txguard.unit_of_work() as session:
            session.add(Item(name="a"))
            with pytest.raises(RuntimeError):
                with txguard.unit_of_work(propagation="nested"):
                    add("b")
                    txguard.current_session().flush()
                    raise RuntimeError
            with txguard.unit_of_work(propagation="nested"):
                add("c")
            with session.begin_nested() as savepoint:
                session.add(Item(name="d"))
                session.flush()
                savepoint.rollback()
        assert names_on(conn) == ["a", "c"]
    assert names(engine) == []


def test_transactional_functions_join_the_outer_transaction(
    registry: txguard.SessionRegistry, engine: sa.Engine
) -> None:
    """@transactional functions (with requires_new inside) run on the block's connection."""

    @txguard.transactional(propagation="requires_new")
    def inner() -> None:
        add("inner")

    @txguard.transactional
    def outer() -> None:
        add("outer")
        inner()

    with rollback_after(engine) as conn:
        outer()
        assert names_on(conn) == ["inner", "outer"]
    assert names(engine) == []


def test_plain_session_joined_with_create_savepoint_is_rolled_back(engine: sa.Engine) -> None:
    """Code that makes its own Session on the yielded connection commits into the outer transaction."""
    with rollback_after(engine) as conn:
        with Session(bind=conn, join_transaction_mode="create_savepoint") as session:
            session.add(Item(name="a"))
            session.commit()
        assert names_on(conn) == ["a"]
    assert names(engine) == []


def test_on_commit_callbacks_run_when_a_unit_commits_inside(
    registry: txguard.SessionRegistry, engine: sa.Engine
) -> None:
    """A unit's commit inside the block still runs its on_commit callbacks."""
    seen: list[str] = []
    with rollback_after(engine):
        with txguard.unit_of_work():
            add("a")
            txguard.on_commit(lambda: seen.append("committed"))
        assert seen == ["committed"]


def test_an_exception_in_the_block_propagates_after_the_rollback(
    registry: txguard.SessionRegistry, engine: sa.Engine
) -> None:
    """An exception leaving the block is re-raised unchanged and the data is rolled back."""
    with pytest.raises(ZeroDivisionError):
        with rollback_after(engine):
            with txguard.unit_of_work():
                add("a")
            1 / 0
    assert names(engine) == []
    assert engine.pool.checkedout() == 0


def test_registry_is_restored_after_the_block(
    registry: txguard.SessionRegistry, engine: sa.Engine
) -> None:
    """After the block the registry's units use the engine again and commit for real."""
    with rollback_after(engine):
        with txguard.unit_of_work():
            add("a")
    with txguard.unit_of_work():
        add("b")
    assert names(engine) == ["b"]


def test_yields_a_connection_in_a_transaction_that_units_use(
    registry: txguard.SessionRegistry, engine: sa.Engine
) -> None:
    """The yielded Connection is in its outer transaction and is the bind of the units' sessions."""
    with rollback_after(engine) as conn:
        assert isinstance(conn, sa.Connection)
        assert conn.in_transaction()
        with txguard.unit_of_work() as session:
            assert session.bind is conn
    assert conn.closed
    assert engine.pool.checkedout() == 0


def test_commit_on_the_outer_connection_is_refused(engine: sa.Engine) -> None:
    """conn.commit() would end the outer transaction, so it raises DisciplineError."""
    with rollback_after(engine) as conn:
        conn.execute(sa.insert(Item).values(name="a"))
        with pytest.raises(txguard.DisciplineError, match="rollback_after"):
            conn.commit()
    assert names(engine) == []


def test_a_registry_can_be_passed_as_bind(engine: sa.Engine) -> None:
    """rollback_after(registry) binds that registry, configured as default or not."""
    registry = txguard.SessionRegistry(engine)
    with rollback_after(registry) as conn:
        with registry.unit_of_work() as session:
            session.add(Item(name="a"))
        assert names_on(conn) == ["a"]
    assert names(engine) == []


def test_bind_may_be_omitted_for_the_default_registry(
    registry: txguard.SessionRegistry, engine: sa.Engine
) -> None:
    """rollback_after() with no argument uses the default registry and its engine."""
    with rollback_after() as conn:
        with txguard.unit_of_work():
            add("a")
        assert names_on(conn) == ["a"]
    assert names(engine) == []


def test_default_registry_on_another_engine_is_not_bound(
    sqlite_engine: sa.Engine, tmp_path: Path
) -> None:
    """An Engine that the default registry does not use leaves the registry alone."""
    other = sa.create_engine(f"sqlite:///{tmp_path / 'other.db'}")
    Base.metadata.create_all(other)
    registry = txguard.configure(other)
    try:
        with rollback_after(sqlite_engine):
            with registry.unit_of_work() as session:
                assert session.bind is other
                session.add(Item(name="a"))
        assert names(other) == ["a"]
    finally:
        other.dispose()


def test_an_explicit_registry_is_bound_to_the_given_engine(engine: sa.Engine) -> None:
    """registry= names the registry to bind when bind is an Engine."""
    registry = txguard.SessionRegistry(engine)
    with rollback_after(engine, registry=registry) as conn:
        with registry.unit_of_work() as session:
            assert session.bind is conn


def test_a_wrong_bind_raises_configuration_error() -> None:
    """Anything but an Engine, AsyncEngine or registry is refused with a clear message."""
    with pytest.raises(txguard.ConfigurationError, match="needs an Engine"):
        rollback_after("sqlite://")


def test_without_a_default_registry_the_error_says_how_to_configure() -> None:
    """rollback_after() with nothing to bind explains how to configure txguard."""
    with pytest.raises(txguard.ConfigurationError, match="configure"):
        rollback_after()


def test_a_rollback_after_is_used_once(engine: sa.Engine) -> None:
    """Entering the same rollback_after() twice raises DisciplineError."""
    block = rollback_after(engine)
    with block:
        with pytest.raises(txguard.DisciplineError, match="already in use"):
            block.__enter__()


# Async.


async def test_async_units_commit_inside_and_nothing_is_left_after(async_db: AsyncDatabase) -> None:
    """`async with rollback_after(async_engine)` binds the async registry; its commits are rolled back."""
    from sqlalchemy.ext.asyncio import AsyncConnection

    txguard.configure(async_db.engine)
    async with rollback_after(async_db.engine) as conn:
        assert isinstance(conn, AsyncConnection)
        async with txguard.unit_of_work() as session:
            session.add(Item(name="a"))
        async with txguard.unit_of_work(mode="commit_as_you_go") as session:
            session.add(Item(name="b"))
            await session.commit()
        assert sorted(await conn.scalars(sa.select(Item.name))) == ["a", "b"]
    assert names(async_db.sync) == []


async def test_plain_with_on_an_async_engine_is_refused(async_db: AsyncDatabase) -> None:
    """A sync `with` on an AsyncEngine raises ConfigurationError naming `async with`."""
    with pytest.raises(txguard.ConfigurationError, match="async with"):
        with rollback_after(async_db.engine):
            pass


# capture_on_commit().


def test_capture_collects_callbacks_without_running_them(registry: txguard.SessionRegistry) -> None:
    """Callbacks of committed units are collected in order, and not run."""
    seen: list[str] = []

    def first() -> None:
        seen.append("first")

    def second() -> None:
        seen.append("second")

    with capture_on_commit() as callbacks:
        with txguard.unit_of_work():
            add("a")
            txguard.on_commit(first)
        with txguard.unit_of_work():
            txguard.on_commit(second)
        assert callbacks == [first, second]
    assert seen == []


def test_capture_with_execute_runs_them_at_exit(registry: txguard.SessionRegistry) -> None:
    """execute=True runs the collected callbacks, in order, when the block ends."""
    seen: list[str] = []
    with capture_on_commit(execute=True) as callbacks:
        with txguard.unit_of_work():
            txguard.on_commit(lambda: seen.append("a"))
            txguard.on_commit(lambda: seen.append("b"))
        assert seen == []
    assert seen == ["a", "b"]
    assert len(callbacks) == 2


def test_capture_skips_callbacks_of_rolled_back_units(registry: txguard.SessionRegistry) -> None:
    """A unit that rolls back contributes nothing, and on_rollback callbacks still run."""
    seen: list[str] = []
    with capture_on_commit() as callbacks:
        with pytest.raises(RuntimeError):
            with txguard.unit_of_work():
                txguard.on_commit(lambda: seen.append("commit"))
                txguard.on_rollback(lambda: seen.append("rollback"))
                raise RuntimeError
    assert callbacks == []
    assert seen == ["rollback"]


def test_capture_includes_on_commit_outside_a_transaction(registry: txguard.SessionRegistry) -> None:
    """on_commit outside any unit would run at once; inside the block it is collected instead."""
    seen: list[str] = []
    with capture_on_commit() as callbacks:
        txguard.on_commit(lambda: seen.append("now"))
    assert len(callbacks) == 1
    assert seen == []


def test_callbacks_registered_by_executed_callbacks_run_too(registry: txguard.SessionRegistry) -> None:
    """With execute=True a callback's own on_commit callbacks are collected and run in turn."""
    seen: list[str] = []

    def outer() -> None:
        seen.append("outer")
        with txguard.unit_of_work():
            txguard.on_commit(lambda: seen.append("inner"))

    with capture_on_commit(execute=True) as callbacks:
        with txguard.unit_of_work():
            txguard.on_commit(outer)
    assert seen == ["outer", "inner"]
    assert len(callbacks) == 2


def test_execute_logs_a_robust_callback_failure_and_goes_on(
    registry: txguard.SessionRegistry, caplog: pytest.LogCaptureFixture
) -> None:
    """A robust callback that fails under execute=True is logged; the next ones still run."""
    seen: list[str] = []
    with caplog.at_level(logging.ERROR, logger="txguard"):
        with capture_on_commit(execute=True):
            with txguard.unit_of_work():
                txguard.on_commit(lambda: 1 / 0, robust=True)
                txguard.on_commit(lambda: seen.append("after"))
    assert seen == ["after"]
    assert "on_commit callback" in caplog.text


def test_execute_propagates_a_failing_callback(registry: txguard.SessionRegistry) -> None:
    """A non-robust callback that fails under execute=True raises from the block's end."""
    with pytest.raises(ZeroDivisionError):
        with capture_on_commit(execute=True):
            with txguard.unit_of_work():
                txguard.on_commit(lambda: 1 / 0)


def test_execute_does_not_run_callbacks_when_the_block_raises(registry: txguard.SessionRegistry) -> None:
    """If the block raises, the collected callbacks are not run (as Django documents)."""
    seen: list[str] = []
    with pytest.raises(RuntimeError):
        with capture_on_commit(execute=True) as callbacks:
            with txguard.unit_of_work():
                txguard.on_commit(lambda: seen.append("a"))
            raise RuntimeError
    assert len(callbacks) == 1
    assert seen == []


def test_callbacks_run_normally_after_the_block(registry: txguard.SessionRegistry) -> None:
    """Once the block ends, on_commit runs callbacks after commits again."""
    seen: list[str] = []
    with capture_on_commit():
        pass
    with txguard.unit_of_work():
        txguard.on_commit(lambda: seen.append("a"))
    assert seen == ["a"]


def test_capture_inside_rollback_after(registry: txguard.SessionRegistry, engine: sa.Engine) -> None:
    """The two helpers combine: committed-then-rolled-back work, with its callbacks collected."""
    with rollback_after(engine), capture_on_commit() as callbacks:
        with txguard.unit_of_work():
            add("a")
            txguard.on_commit(lambda: None)
    assert len(callbacks) == 1
    assert names(engine) == []


def test_capture_execute_must_be_a_bool() -> None:
    """execute= accepts only True or False."""
    with pytest.raises(txguard.ConfigurationError, match="execute="):
        capture_on_commit(execute="yes")  # type: ignore[arg-type]


# The pytest fixture (its end-to-end behaviour is in test_pytest_plugin.py).


@pytest.fixture
def txguard_bind(engine: sa.Engine) -> txguard.SessionRegistry:
    return txguard.configure(engine)


def test_txguard_rollback_fixture_binds_the_txguard_bind_registry(
    txguard_rollback: sa.Connection, txguard_bind: txguard.SessionRegistry
) -> None:
    """txguard_rollback yields the outer Connection, which the txguard_bind registry's units use."""
    assert txguard_rollback.in_transaction()
    with txguard_bind.unit_of_work() as session:
        assert session.bind is txguard_rollback
        session.add(Item(name="a"))
    assert names_on(txguard_rollback) == ["a"]


def test_sessions_whose_class_picks_its_bind_join_the_block(engine: sa.Engine) -> None:
    """A session class whose get_bind() answers the engine (as Flask-SQLAlchemy's) gets the block's connection."""
    from sqlalchemy.orm import sessionmaker

    class Routing(Session):
        def get_bind(self, *args: object, **kwargs: object) -> sa.Engine:
            return engine

    registry = txguard.SessionRegistry(sessionmaker(engine, class_=Routing))
    with rollback_after(registry) as conn:
        with registry.unit_of_work() as session:
            assert session.get_bind() is conn
            session.add(Item(name="a"))
        assert names_on(conn) == ["a"]
    assert names(engine) == []
    with registry.unit_of_work() as session:
        assert session.get_bind() is engine
