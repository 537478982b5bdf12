"""Shapes real code produces against the layered core: propagation, callbacks, states, engines."""

from __future__ import annotations

import contextvars
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

import txguard
from tests.conftest import AsyncDatabase
from tests.helpers import SEED_ID
from tests.models import Item

TAKEN = SEED_ID


def names(engine: sa.Engine) -> list[str]:
    with engine.connect() as conn:
        return list(conn.scalars(sa.select(Item.name).order_by(Item.name)))


def seed(engine: sa.Engine) -> None:
    with engine.begin() as conn:
        conn.execute(sa.insert(Item).values(id=TAKEN, name="seed"))


def fail(session: Session) -> None:
    """Run a statement that fails with a duplicate key, and swallow the error."""
    try:
        session.execute(sa.insert(Item).values(id=TAKEN, name="dup"))
    except IntegrityError:
        pass


# Propagation x error shapes.


def test_requires_new_inside_a_doomed_unit_commits_on_its_own(engine: sa.Engine) -> None:
    """A requires_new unit opened after the outer unit was doomed commits its own work."""
    if engine.dialect.name == "sqlite":
        pytest.skip("SQLite lets one writer at a time: the outer unit holds the lock")
    seed(engine)
    txguard.configure(engine)
    with pytest.raises(txguard.UnexpectedRollbackError):
        with txguard.unit_of_work() as session:
            session.add(Item(name="outer"))
            session.flush()
            fail(session)
            with txguard.unit_of_work(propagation="requires_new") as inner:
                inner.add(Item(name="inner"))
    assert names(engine) == ["inner", "seed"]


def test_required_join_of_a_doomed_unit_is_doomed_too(engine: sa.Engine) -> None:
    """A REQUIRED unit that joins a doomed transaction cannot rescue it."""
    seed(engine)
    txguard.configure(engine)
    with pytest.raises(txguard.UnexpectedRollbackError):
        with txguard.unit_of_work() as session:
            fail(session)
            with txguard.unit_of_work() as inner:
                inner.add(Item(name="inner"))
    assert names(engine) == ["seed"]


def test_nested_inside_a_doomed_unit_cannot_rescue_it(engine: sa.Engine) -> None:
    """A savepoint taken after a caught failure does not clear the outer unit's doom."""
    seed(engine)
    txguard.configure(engine)
    with pytest.raises(txguard.UnexpectedRollbackError):
        with txguard.unit_of_work() as session:
            fail(session)
            if engine.dialect.name == "postgresql":
                return  # PostgreSQL refuses SAVEPOINT in an aborted transaction: shape done
            with txguard.unit_of_work(propagation="nested") as inner:
                inner.add(Item(name="inner"))
    assert names(engine) == ["seed"]


def test_mandatory_in_a_worker_thread_with_a_copied_context_is_refused(
    engine: sa.Engine,
) -> None:
    """A thread running in a copy of the context does not join the caller's unit."""
    txguard.configure(engine)

    @txguard.transactional(propagation="mandatory")
    def worker() -> None:
        txguard.current_session().add(Item(name="worker"))

    with txguard.unit_of_work() as session:
        session.add(Item(name="outer"))
        ctx = contextvars.copy_context()
        with ThreadPoolExecutor(1) as pool:
            future = pool.submit(ctx.run, worker)
            with pytest.raises(txguard.TransactionRequiredError):
                future.result()
    assert names(engine) == ["outer"]


def test_required_in_a_worker_thread_with_a_copied_context_begins_its_own(
    engine: sa.Engine,
) -> None:
    """A REQUIRED unit in a copied context's thread runs in its own session and commits."""
    txguard.configure(engine)
    seen: list[Session] = []

    @txguard.transactional
    def worker() -> None:
        seen.append(txguard.current_session())
        txguard.current_session().add(Item(name="worker"))

    with txguard.unit_of_work() as session:
        with ThreadPoolExecutor(1) as pool:
            pool.submit(contextvars.copy_context().run, worker).result()
        assert seen[0] is not session
        assert txguard.current_session() is session
    assert names(engine) == ["worker"]


def test_never_inside_an_on_commit_callback_runs_without_a_unit(engine: sa.Engine) -> None:
    """An on_commit callback runs outside the committed unit, so propagation='never' is fine."""
    txguard.configure(engine)
    ran: list[bool] = []

    @txguard.transactional(propagation="never")
    def notify() -> None:
        ran.append(txguard.in_transaction())

    with txguard.unit_of_work() as session:
        session.add(Item(name="x"))
        txguard.on_commit(notify)
    assert ran == [False]


def test_a_unit_opened_in_on_commit_begins_and_commits_its_own_transaction(
    engine: sa.Engine,
) -> None:
    """A unit opened in an on_commit callback commits, and its own callbacks run."""
    txguard.configure(engine)
    order: list[str] = []

    def audit() -> None:
        with txguard.unit_of_work() as session:
            session.add(Item(name="audit"))
            txguard.on_commit(lambda: order.append("audit committed"))
        order.append("audit done")

    with txguard.unit_of_work() as session:
        session.add(Item(name="x"))
        txguard.on_commit(audit)
    assert order == ["audit committed", "audit done"]
    assert names(engine) == ["audit", "x"]


def test_a_unit_opened_in_on_rollback_commits_its_own_transaction(engine: sa.Engine) -> None:
    """A unit opened in an on_rollback callback records the failure durably."""
    txguard.configure(engine)

    def record() -> None:
        with txguard.unit_of_work() as session:
            session.add(Item(name="failure recorded"))

    with pytest.raises(RuntimeError):
        with txguard.unit_of_work() as session:
            session.add(Item(name="lost"))
            txguard.on_rollback(record)
            raise RuntimeError("boom")
    assert names(engine) == ["failure recorded"]


def test_a_unit_opened_in_on_commit_after_a_commit_as_you_go_commit_commits(
    engine: sa.Engine,
) -> None:
    """A unit opened in the on_commit callback of session.commit() commits its own work."""
    txguard.configure(engine)

    def audit() -> None:
        with txguard.unit_of_work() as session:
            session.add(Item(name="audit"))

    with txguard.unit_of_work(mode="commit_as_you_go") as session:
        session.add(Item(name="x"))
        txguard.on_commit(audit)
        session.commit()
    assert names(engine) == ["audit", "x"]


def test_never_in_on_commit_after_a_commit_as_you_go_commit_runs_without_a_unit(
    engine: sa.Engine,
) -> None:
    """The on_commit callback of session.commit() runs after the transaction it reports."""
    txguard.configure(engine)
    ran: list[bool] = []

    @txguard.transactional(propagation="never")
    def notify() -> None:
        ran.append(True)

    with txguard.unit_of_work(mode="commit_as_you_go") as session:
        session.add(Item(name="x"))
        txguard.on_commit(notify)
        session.commit()
    assert ran == [True]


async def test_async_not_supported_inside_an_async_unit_suspends_it(
    async_db: AsyncDatabase,
) -> None:
    """not_supported inside an async unit runs in another session with no transaction."""
    registry = txguard.SessionRegistry(async_db.engine)
    async with registry.unit_of_work() as outer:
        outer.add(Item(name="outer"))
        async with registry.unit_of_work(propagation="not_supported") as inner:
            assert inner is not outer
            assert not registry.in_transaction()
            await inner.execute(sa.select(1))
        assert registry.current_session() is outer
    with async_db.sync.connect() as conn:
        assert list(conn.scalars(sa.select(Item.name))) == ["outer"]


async def test_async_unit_opened_in_on_commit_commits(async_db: AsyncDatabase) -> None:
    """An async on_commit callback that opens an async unit commits its own work."""
    registry = txguard.SessionRegistry(async_db.engine)

    async def audit() -> None:
        async with registry.unit_of_work() as session:
            session.add(Item(name="audit"))

    async with registry.unit_of_work() as session:
        session.add(Item(name="x"))
        registry.on_commit(audit)
    with async_db.sync.connect() as conn:
        assert sorted(conn.scalars(sa.select(Item.name))) == ["audit", "x"]


async def test_async_unit_opened_in_on_commit_of_a_commit_as_you_go_commit_commits(
    async_db: AsyncDatabase,
) -> None:
    """An async unit opened in the on_commit callback of ``await session.commit()`` commits."""
    registry = txguard.SessionRegistry(async_db.engine)

    async def audit() -> None:
        async with registry.unit_of_work() as session:
            session.add(Item(name="audit"))

    async with registry.unit_of_work(mode="commit_as_you_go") as session:
        session.add(Item(name="x"))
        registry.on_commit(audit)
        await session.commit()
    with async_db.sync.connect() as conn:
        assert sorted(conn.scalars(sa.select(Item.name))) == ["audit", "x"]


async def test_async_unit_opened_in_on_rollback_commits(async_db: AsyncDatabase) -> None:
    """An async on_rollback callback that opens an async unit commits its own work."""
    registry = txguard.SessionRegistry(async_db.engine)

    async def record() -> None:
        async with registry.unit_of_work() as session:
            session.add(Item(name="failure recorded"))

    with pytest.raises(RuntimeError):
        async with registry.unit_of_work() as session:
            session.add(Item(name="lost"))
            registry.on_rollback(record)
            raise RuntimeError("boom")
    with async_db.sync.connect() as conn:
        assert list(conn.scalars(sa.select(Item.name))) == ["failure recorded"]


# State moves reachable from user code.


def test_commit_after_a_failed_flush_in_commit_as_you_go_names_the_flush(
    engine: sa.Engine,
) -> None:
    """session.commit() after a caught flush failure raises the caught-error message."""
    seed(engine)
    txguard.configure(engine)
    with txguard.unit_of_work(mode="commit_as_you_go") as session:
        session.add(Item(id=TAKEN, name="dup"))
        with pytest.raises(IntegrityError):
            session.flush()
        with pytest.raises(txguard.UnexpectedRollbackError) as info:
            session.commit()
        assert "cannot become" not in str(info.value)
        session.add(Item(name="later"))
        session.commit()
    assert names(engine) == ["later", "seed"]


def test_a_failed_commit_in_commit_as_you_go_lets_the_session_go_on(engine: sa.Engine) -> None:
    """A commit whose flush fails, then rollback, then new work: the unit commits it."""
    seed(engine)
    txguard.configure(engine)
    with txguard.unit_of_work(mode="commit_as_you_go") as session:
        session.add(Item(id=TAKEN, name="dup"))
        with pytest.raises(IntegrityError):
            session.commit()
        session.rollback()
        session.add(Item(name="later"))
        session.commit()
    assert names(engine) == ["later", "seed"]


def test_commit_twice_after_a_failed_commit_never_says_state(engine: sa.Engine) -> None:
    """Retrying session.commit() after its flush failed gives a user error, not a state error."""
    seed(engine)
    txguard.configure(engine)
    with txguard.unit_of_work(mode="commit_as_you_go") as session:
        session.add(Item(id=TAKEN, name="dup"))
        with pytest.raises(IntegrityError):
            session.commit()
        with pytest.raises(Exception) as info:
            session.commit()
        assert "cannot become" not in str(info.value)
        session.rollback()
    assert names(engine) == ["seed"]


def test_rollback_in_on_commit_of_a_commit_as_you_go_commit(engine: sa.Engine) -> None:
    """session.rollback() in an on_commit callback of session.commit() leaves the data."""
    txguard.configure(engine)
    with txguard.unit_of_work(mode="commit_as_you_go") as session:
        session.add(Item(name="x"))
        txguard.on_commit(session.rollback)
        session.commit()
        session.add(Item(name="y"))
        session.commit()
    assert names(engine) == ["x", "y"]


def test_rollback_of_the_ended_session_in_on_commit_is_a_clear_error_or_nothing(
    engine: sa.Engine,
) -> None:
    """Calling the ended unit's session.rollback() from on_commit never claims the unit runs."""
    txguard.configure(engine)
    errors: list[BaseException] = []

    def late() -> None:
        try:
            session.rollback()
        except BaseException as exc:
            errors.append(exc)

    with txguard.unit_of_work() as session:
        session.add(Item(name="x"))
        txguard.on_commit(late)
    assert names(engine) == ["x"]
    assert all("inside the begin-once unit" not in str(e) for e in errors), errors


def test_close_inside_a_begin_once_unit_is_refused_and_the_unit_commits(
    engine: sa.Engine,
) -> None:
    """session.close() inside a begin-once unit raises; the unit still commits."""
    txguard.configure(engine)
    with txguard.unit_of_work() as session:
        session.add(Item(name="x"))
        with pytest.raises(txguard.DisciplineError):
            session.close()
    assert names(engine) == ["x"]


def test_close_inside_a_commit_as_you_go_unit_discards_and_goes_on(engine: sa.Engine) -> None:
    """session.close() in commit-as-you-go discards pending work; later work commits."""
    txguard.configure(engine)
    with txguard.unit_of_work(mode="commit_as_you_go") as session:
        session.add(Item(name="discarded"))
        session.flush()
        session.close()
        session.add(Item(name="kept"))
        session.commit()
    assert names(engine) == ["kept"]
    assert engine.pool.checkedout() == 0


def test_on_commit_error_in_commit_as_you_go_keeps_the_data_and_the_session(
    engine: sa.Engine,
) -> None:
    """A failing on_commit of session.commit() propagates; data stays, the session goes on."""
    txguard.configure(engine)

    def broken() -> None:
        raise LookupError("callback")

    with txguard.unit_of_work(mode="commit_as_you_go") as session:
        session.add(Item(name="x"))
        txguard.on_commit(broken)
        with pytest.raises(LookupError):
            session.commit()
        session.add(Item(name="y"))
        session.commit()
    assert names(engine) == ["x", "y"]


def test_robust_on_commit_error_runs_the_next_callbacks(
    engine: sa.Engine, caplog: pytest.LogCaptureFixture
) -> None:
    """robust=True logs a failing callback and runs the ones after it."""
    txguard.configure(engine)
    ran: list[str] = []

    def broken() -> None:
        raise LookupError("callback")

    with txguard.unit_of_work() as session:
        session.add(Item(name="x"))
        txguard.on_commit(broken, robust=True)
        txguard.on_commit(lambda: ran.append("next"))
    assert ran == ["next"]
    assert any(r.levelname == "ERROR" for r in caplog.records)


def test_on_commit_error_of_a_transactional_with_retries_is_not_retried(
    engine: sa.Engine,
) -> None:
    """An on_commit failure of a retrying function surfaces once; the data is committed once."""
    txguard.configure(engine)
    calls: list[int] = []

    @txguard.transactional(retries=3, backoff=0, retry_on=lambda exc: True)
    def work() -> None:
        calls.append(1)
        txguard.current_session().add(Item(name="x"))
        txguard.on_commit(lambda: (_ for _ in ()).throw(LookupError("callback")))

    with pytest.raises(LookupError):
        work()
    assert calls == [1]
    assert names(engine) == ["x"]


def test_exit_of_a_joined_unit_after_the_owner_ended_is_a_discipline_error(
    engine: sa.Engine,
) -> None:
    """Exiting a joined unit after its owner ended says which units, not which states."""
    txguard.configure(engine)
    outer = txguard.unit_of_work()
    inner = txguard.unit_of_work()
    outer.__enter__()
    inner.__enter__()
    with pytest.raises(txguard.DisciplineError) as info:
        outer.__exit__(None, None, None)
    assert "cannot become" not in str(info.value)
    try:
        inner.__exit__(RuntimeError, RuntimeError("late"), None)
    except txguard.DisciplineError as exc:
        assert "cannot become" not in str(exc)
    except RuntimeError:
        pass
    assert engine.pool.checkedout() == 0


# Engines configured unusually.


def _engine_like(engine: sa.Engine, **kwargs: Any) -> sa.Engine:
    return sa.create_engine(engine.url, **kwargs)


@pytest.mark.parametrize(
    "kwargs",
    [{"poolclass": sa.pool.NullPool}, {"pool_pre_ping": True}],
    ids=["NullPool", "pre_ping"],
)
def test_unusual_pools_commit_roll_back_and_doom(engine: sa.Engine, kwargs: dict[str, Any]) -> None:
    """NullPool and pool_pre_ping engines commit, roll back and doom as the default pool."""
    if engine.dialect.name == "sqlite":
        pytest.skip("file SQLite behaves alike; the servers are the point")
    seed(engine)
    other = _engine_like(engine, **kwargs)
    try:
        registry = txguard.SessionRegistry(other)
        with registry.unit_of_work() as session:
            session.add(Item(name="kept"))
        with pytest.raises(RuntimeError):
            with registry.unit_of_work() as session:
                session.add(Item(name="lost"))
                raise RuntimeError
        with pytest.raises(txguard.UnexpectedRollbackError):
            with registry.unit_of_work() as session:
                fail(session)
        assert names(engine) == ["kept", "seed"]
        assert other.pool.checkedout() == 0 if hasattr(other.pool, "checkedout") else True
    finally:
        other.dispose()


def test_serializable_engine_joins_a_unit_asking_for_serializable(engine: sa.Engine) -> None:
    """On a SERIALIZABLE engine a join asking for SERIALIZABLE is the same level, not an error."""
    if engine.dialect.name == "sqlite":
        pytest.skip("SQLite has its own isolation levels")
    other = _engine_like(engine, isolation_level="SERIALIZABLE")
    try:
        registry = txguard.SessionRegistry(other)
        with registry.unit_of_work() as session:
            session.add(Item(name="outer"))
            with registry.unit_of_work(isolation_level="SERIALIZABLE") as inner:
                inner.add(Item(name="inner"))
        assert names(engine) == ["inner", "outer"]
    finally:
        other.dispose()


def test_serializable_engine_unit_may_ask_for_read_committed(engine: sa.Engine) -> None:
    """A unit's isolation_level overrides a SERIALIZABLE engine for its own transaction."""
    if engine.dialect.name == "sqlite":
        pytest.skip("SQLite has its own isolation levels")
    other = _engine_like(engine, isolation_level="SERIALIZABLE")
    try:
        registry = txguard.SessionRegistry(other)
        with registry.unit_of_work(isolation_level="READ COMMITTED") as session:
            level = session.connection().get_isolation_level()
        assert level == "READ COMMITTED"
        with registry.unit_of_work() as session:
            assert session.connection().get_isolation_level() == "SERIALIZABLE"
    finally:
        other.dispose()


def test_schema_translate_map_engine_works_in_units(engine: sa.Engine) -> None:
    """An engine with schema_translate_map commits and dooms in units as any other."""
    seed(engine)
    other = engine.execution_options(schema_translate_map={None: None})
    registry = txguard.SessionRegistry(other)
    with registry.unit_of_work() as session:
        session.add(Item(name="kept"))
    with pytest.raises(txguard.UnexpectedRollbackError):
        with registry.unit_of_work() as session:
            fail(session)
    assert names(engine) == ["kept", "seed"]


def test_session_bound_to_a_connection_with_rollback_after(engine: sa.Engine) -> None:
    """A registry on a sessionmaker bound to one connection rolls everything back at the end."""
    with engine.connect() as conn:
        outer = conn.begin()
        maker = sa.orm.sessionmaker(bind=conn, join_transaction_mode="create_savepoint")
        registry = txguard.SessionRegistry(maker)
        with registry.unit_of_work() as session:
            session.add(Item(name="inside"))
        with registry.unit_of_work() as session:
            assert session.scalars(sa.select(Item.name)).all() == ["inside"]
        outer.rollback()
    assert names(engine) == []


# The user ending a transaction the unit owns, from inside.


def test_rollback_inside_a_savepoint_unit_of_a_commit_as_you_go_unit_is_refused(
    engine: sa.Engine,
) -> None:
    """session.rollback() inside a nested unit raises DisciplineError, as commit() does."""
    txguard.configure(engine)
    with txguard.unit_of_work(mode="commit_as_you_go") as session:
        session.add(Item(name="before"))
        session.commit()
        with pytest.raises(txguard.DisciplineError, match="savepoint unit"):
            with txguard.unit_of_work(propagation="nested") as inner:
                inner.add(Item(name="in savepoint"))
                inner.flush()
                session.rollback()
        session.add(Item(name="after"))
        session.commit()
    assert names(engine) == ["after", "before"]


def test_rollback_inside_a_joined_begin_once_unit_is_refused(engine: sa.Engine) -> None:
    """session.rollback() inside a begin-once unit that joined commit-as-you-go raises."""
    txguard.configure(engine)
    with txguard.unit_of_work(mode="commit_as_you_go") as session:
        with pytest.raises(txguard.DisciplineError, match="only that unit commits or rolls back"):
            with txguard.unit_of_work() as joined:
                joined.add(Item(name="joined"))
                joined.flush()
                session.rollback()
        session.rollback()
    assert names(engine) == []


@pytest.mark.parametrize("end", ["commit", "rollback"])
def test_ending_the_transaction_through_get_transaction_is_a_discipline_error(
    engine: sa.Engine, end: str
) -> None:
    """session.get_transaction().commit()/rollback() in a begin-once unit is named at exit."""
    txguard.configure(engine)
    with pytest.raises(txguard.DisciplineError, match="was ended inside its block"):
        with txguard.unit_of_work() as session:
            session.add(Item(name="x"))
            session.flush()
            transaction = session.get_transaction()
            assert transaction is not None
            getattr(transaction, end)()
            session.add(Item(name="after"))
    assert names(engine) == (["x"] if end == "commit" else [])
    assert engine.pool.checkedout() == 0


@pytest.mark.parametrize("end", ["commit", "rollback"])
def test_callbacks_do_not_run_after_the_transaction_was_ended_through_get_transaction(
    engine: sa.Engine, end: str
) -> None:
    """txguard cannot tell whether the user's own end committed, so neither hook runs.

    Running on_rollback after a commit that went through (or on_commit after a rollback)
    would tell the hooks a lie; the error says the callbacks were dropped.
    """
    txguard.configure(engine)
    ran: list[str] = []
    with pytest.raises(txguard.DisciplineError, match="callbacks were not run") as caught:
        with txguard.unit_of_work() as session:
            txguard.on_commit(lambda: ran.append("commit"))
            txguard.on_rollback(lambda: ran.append("rollback"))
            session.add(Item(name="x"))
            session.flush()
            transaction = session.get_transaction()
            assert transaction is not None
            getattr(transaction, end)()
    assert ran == []
    assert "on_commit" in str(caught.value)
    assert names(engine) == (["x"] if end == "commit" else [])
    assert engine.pool.checkedout() == 0
