"""Retries of ``@transactional``: the classifier on real errors, and what a retry may and may not do."""

from __future__ import annotations

import asyncio
import inspect
import itertools
import math
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.exc import DBAPIError, InvalidRequestError, OperationalError
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine
from sqlalchemy.orm import Session

import txguard
from tests.backends import require
from tests.models import Base, Item
from tests.reliability.faults import (
    DRIVERS,
    DeadlockPeer,
    Side,
    bound_lock_waits,
    driver_module,
    driver_url,
    lock_wait_timeout,
    own_id,
    reset_accounts,
    run_after_kill,
    serialization_failure,
    statement_timeout,
)
from txguard._retry import BACKOFF_CAP, backoff_delay

PG_DRIVERS = ["psycopg", "psycopg2", "asyncpg", "psycopg_async"]
MARIADB_DRIVERS = ["pymysql", "aiomysql"]
ALL_DRIVERS = PG_DRIVERS + MARIADB_DRIVERS
RETRY_DRIVERS = ["psycopg", "asyncpg", "pymysql", "aiomysql"]


class Conflict(Exception):
    """A made-up transient error, retried through ``retry_on``."""


# Fixtures: one engine per driver, with a registry, and the side connections of conflicts.


@dataclass
class Db:
    driver: str
    backend: str
    engine: Any
    registry: txguard.SessionRegistry
    side: Side
    is_async: bool
    attempts: list[int] = field(default_factory=list)

    def balances(self) -> dict[int, int]:
        return dict(self.side.run("SELECT id, balance FROM txg_accounts ORDER BY id"))

    def items(self) -> list[str]:
        return [row[0] for row in self.side.run("SELECT name FROM txg_items ORDER BY id")]

    def transactional(self, body: Callable[[Session, int], Any], **options: Any) -> Any:
        """Decorate ``body(session, attempt)`` in this registry's flavour (sync or async)."""
        registry, attempts = self.registry, self.attempts
        counter = itertools.count(1)
        if self.is_async:

            @registry.transactional(**options)
            async def work() -> Any:
                attempt = next(counter)
                attempts.append(attempt)
                return await registry.current_session().run_sync(body, attempt)

            return work

        @registry.transactional(**options)
        def work_sync() -> Any:
            attempt = next(counter)
            attempts.append(attempt)
            return body(registry.current_session(), attempt)

        return work_sync


async def call(fn: Callable[[], Any]) -> Any:
    """Call a sync or async function and return its result."""
    result = fn()
    if inspect.isawaitable(result):
        result = await result
    return result


def _skip_unless_available(driver: str) -> None:
    require(DRIVERS[driver][0])
    module = driver_module(driver)
    if module is not None:
        pytest.importorskip(module)


@pytest.fixture
async def db(request: pytest.FixtureRequest) -> AsyncIterator[Db]:
    """Yield an engine of the requested driver with accounts 1 and 2 at balance 0."""
    driver: str = request.param
    _skip_unless_available(driver)
    backend, _, is_async = DRIVERS[driver]
    side = Side(backend)
    Base.metadata.create_all(side.engine)  # each time: a concurrent test session may drop them
    reset_accounts(side.engine, {1: 0, 2: 0})
    engine: Any = (create_async_engine if is_async else sa.create_engine)(driver_url(driver))
    sa.event.listen(engine.sync_engine if is_async else engine, "connect", bound_lock_waits)
    registry = txguard.SessionRegistry(engine)
    try:
        yield Db(driver, backend, engine, registry, side, is_async)
        sync_engine = engine.sync_engine if is_async else engine
        assert sync_engine.pool.checkedout() == 0, "a connection was left checked out"
    finally:
        if is_async:
            await engine.dispose()
        else:
            engine.dispose()
        side.close()


def drivers(*names: str) -> Any:
    return pytest.mark.parametrize("db", names, indirect=True)


async def provoke(db: Db, fault: Callable[[Any], None], isolation_level: str | None = None) -> DBAPIError:
    """Run ``fault`` on a plain connection of ``db`` in a transaction; return what it raised."""
    engine = db.engine
    error: DBAPIError | None = None
    if isinstance(engine, AsyncEngine):
        async with engine.connect() as aconn:
            if isolation_level:
                await aconn.execution_options(isolation_level=isolation_level)
            await aconn.begin()
            try:
                await aconn.run_sync(fault)
            except DBAPIError as exc:
                error = exc
            finally:
                await aconn.rollback()
    else:
        with engine.connect() as conn:
            if isolation_level:
                conn.execution_options(isolation_level=isolation_level)
            conn.begin()
            try:
                fault(conn)
            except DBAPIError as exc:
                error = exc
            finally:
                conn.rollback()
    if error is None:
        pytest.fail("the fault did not raise a database error")
    return error


# The classifier, on errors raised by the real servers through each driver.


@drivers(*PG_DRIVERS)
async def test_serialization_failure_is_retryable(db: Db) -> None:
    """A PostgreSQL serialization failure (SQLSTATE 40001) is retryable through every driver."""
    error = await provoke(db, lambda c: serialization_failure(c, db.side), "REPEATABLE READ")
    assert txguard.is_retryable(error)


@drivers(*ALL_DRIVERS)
async def test_deadlock_is_retryable(db: Db) -> None:
    """A deadlock (PostgreSQL 40P01, MariaDB 1213) is retryable through every driver."""
    with DeadlockPeer(db.side) as peer:
        error = await provoke(db, peer.provoke)
    assert "deadlock" in str(error.orig).lower()
    assert txguard.is_retryable(error)


@drivers(*MARIADB_DRIVERS)
async def test_lock_wait_timeout_is_retryable(db: Db) -> None:
    """MariaDB's lock wait timeout (1205, SQLSTATE HY000 in PyMySQL) is retryable."""
    error = await provoke(db, lambda c: lock_wait_timeout(c, db.side))
    assert error.orig.args[0] == 1205
    assert txguard.is_retryable(error)


@drivers(*ALL_DRIVERS)
async def test_killed_connection_is_retryable(db: Db) -> None:
    """A connection the server ended (pg_terminate_backend, KILL) is retryable through every driver."""
    error = await provoke(db, lambda c: run_after_kill(c, db.side))
    assert error.connection_invalidated
    assert txguard.is_retryable(error)


@drivers(*ALL_DRIVERS)
async def test_unique_violation_is_not_retryable(db: Db) -> None:
    """A constraint violation is a real error: running it again cannot help."""
    error = await provoke(
        db, lambda c: c.execute(sa.text("INSERT INTO txg_accounts (id, balance) VALUES (1, 0)"))
    )
    assert isinstance(error, sa.exc.IntegrityError)
    assert not txguard.is_retryable(error)


@drivers(*ALL_DRIVERS)
async def test_statement_timeout_is_not_retryable(db: Db) -> None:
    """A statement timeout is an OperationalError that is not retried: not every OperationalError is."""
    error = await provoke(db, statement_timeout)
    if db.driver != "asyncpg":  # asyncpg's adapter raises a plain DBAPIError subclass
        assert isinstance(error, OperationalError)
    assert not txguard.is_retryable(error)


def test_sqlite_database_is_locked_is_not_retryable(tmp_path: Any) -> None:
    """SQLite's busy error is an OperationalError outside the SPEC's list: not retried by default."""
    engine = sa.create_engine(f"sqlite:///{tmp_path / 'busy.db'}", connect_args={"timeout": 0})
    txguard.SessionRegistry(engine)  # installs txguard's BEGIN recipe on the engine
    Base.metadata.create_all(engine)
    try:
        with engine.begin() as writer:
            writer.execute(sa.insert(Item).values(name="holds the write lock"))
            with pytest.raises(OperationalError, match="locked") as info, engine.begin() as other:
                other.execute(sa.insert(Item).values(name="waits"))
    finally:
        engine.dispose()
    assert not txguard.is_retryable(info.value)


@pytest.mark.parametrize(
    "error",
    [
        ValueError("40001"),
        InvalidRequestError("deadlock"),
        txguard.UnexpectedRollbackError("rolled back"),
        TimeoutError(),
    ],
    ids=lambda e: type(e).__name__,
)
def test_errors_outside_the_database_are_not_retryable(error: BaseException) -> None:
    """Only errors the database reported (or a lost connection) are retryable."""
    assert not txguard.is_retryable(error)


# Retrying: each real fault is retried in a fresh session and applied once.


@drivers("psycopg", "psycopg2", "asyncpg", "psycopg_async")
async def test_serialization_failure_is_retried_and_applied_once(db: Db) -> None:
    """A unit that loses a SERIALIZABLE conflict runs again and its write lands exactly once."""

    def body(session: Session, attempt: int) -> None:
        if attempt == 1:
            serialization_failure(session, db.side)
        session.execute(sa.text("UPDATE txg_accounts SET balance = balance + 1 WHERE id = 1"))

    await call(db.transactional(body, isolation_level="SERIALIZABLE", retries=2, backoff=0))
    assert db.attempts == [1, 2]
    assert db.balances() == {1: 1, 2: 0}


@drivers(*RETRY_DRIVERS)
async def test_each_attempt_gets_a_fresh_session(db: Db) -> None:
    """A retried attempt never reuses the session of the attempt that failed."""
    sessions: list[Session] = []

    def body(session: Session, attempt: int) -> None:
        sessions.append(session)
        if attempt == 1:
            run_after_kill(session, db.side)

    await call(db.transactional(body, retries=1, backoff=0))
    assert len(sessions) == 2 and sessions[0] is not sessions[1]


@drivers(*RETRY_DRIVERS)
async def test_deadlock_is_retried_and_both_writes_applied_once(db: Db) -> None:
    """The deadlock victim runs again once the peer is gone, and its writes land once."""
    with DeadlockPeer(db.side) as peer:

        def body(session: Session, attempt: int) -> None:
            if attempt == 1:
                peer.provoke(session)
            else:
                peer.finished()
            session.execute(sa.text("UPDATE txg_accounts SET balance = balance + 1"))

        await call(db.transactional(body, retries=2, backoff=0))
    assert db.attempts == [1, 2]
    assert db.balances() == {1: 1, 2: 1}


@drivers(*MARIADB_DRIVERS)
async def test_lock_wait_timeout_retry_rolls_back_the_whole_transaction(db: Db) -> None:
    """After a 1205 (which undoes one statement only) nothing of the failed attempt survives."""

    def body(session: Session, attempt: int) -> None:
        session.add(Item(name=f"attempt {attempt}"))
        session.flush()
        if attempt == 1:
            lock_wait_timeout(session, db.side)

    await call(db.transactional(body, retries=1, backoff=0))
    assert db.items() == ["attempt 2"]


@drivers(*RETRY_DRIVERS)
async def test_connection_killed_before_commit_is_retried(db: Db) -> None:
    """A unit whose connection the server ended before COMMIT runs again on a new connection."""

    def body(session: Session, attempt: int) -> None:
        session.add(Item(name=f"attempt {attempt}"))
        session.flush()
        if attempt == 1:
            run_after_kill(session, db.side)

    await call(db.transactional(body, retries=1, backoff=0))
    assert db.items() == ["attempt 2"]


@drivers(*RETRY_DRIVERS)
async def test_connection_lost_during_commit_is_not_retried(db: Db) -> None:
    """When the connection dies while COMMIT is in flight the outcome is unknown: no retry, a note."""
    server_ids: list[int] = []

    def kill_at_commit(conn: sa.Connection) -> None:
        db.side.kill(server_ids[-1])

    def body(session: Session, attempt: int) -> None:
        server_ids.append(own_id(session))
        session.add(Item(name=f"attempt {attempt}"))

    sync_engine = db.engine.sync_engine if db.is_async else db.engine
    sa.event.listen(sync_engine, "commit", kill_at_commit)
    try:
        with pytest.raises(DBAPIError) as info:
            await call(db.transactional(body, retries=3, backoff=0))
    finally:
        sa.event.remove(sync_engine, "commit", kill_at_commit)
    assert db.attempts == [1]
    assert info.value.connection_invalidated
    assert any("whether the transaction committed is unknown" in n for n in info.value.__notes__)


@drivers("psycopg", "asyncpg")
async def test_serialization_failure_at_commit_is_retried(db: Db) -> None:
    """A 40001 raised by COMMIT itself is a rollback the server declared, so it is retried."""
    finished: list[int] = []

    def body(session: Session, attempt: int) -> None:
        session.execute(sa.text("SELECT balance FROM txg_accounts WHERE id = 1")).all()
        session.execute(sa.text("UPDATE txg_accounts SET balance = balance + 1 WHERE id = 2"))
        if attempt == 1:
            db.side.write_skew(read_id=2, write_id=1)
        finished.append(attempt)

    await call(db.transactional(body, isolation_level="SERIALIZABLE", retries=1, backoff=0))
    assert finished == [1, 2]  # attempt 1 got to the end of its body: it failed at COMMIT
    assert db.balances() == {1: 10, 2: 1}  # the other transaction, then this one, once


@drivers(*RETRY_DRIVERS)
async def test_callbacks_of_a_failed_attempt_never_run(db: Db) -> None:
    """Only the on_commit callbacks of the attempt that committed run; the failed one's never do."""
    ran: list[str] = []

    def body(session: Session, attempt: int) -> None:
        txguard.on_commit(lambda: ran.append(f"commit {attempt}"), registry=db.registry)
        txguard.on_rollback(lambda: ran.append(f"rollback {attempt}"), registry=db.registry)
        session.execute(sa.text("SELECT 1"))
        if attempt == 1:
            run_after_kill(session, db.side)

    await call(db.transactional(body, retries=1, backoff=0))
    assert ran == ["commit 2"]


@drivers("psycopg", "asyncpg", "pymysql", "aiomysql")
async def test_real_conflict_gives_up_after_retries_with_a_note(db: Db) -> None:
    """A conflict on every attempt raises the last error, noting how many attempts were made."""

    def body(session: Session, attempt: int) -> None:
        run_after_kill(session, db.side)

    with pytest.raises(DBAPIError) as info:
        await call(db.transactional(body, retries=2, backoff=0))
    assert db.attempts == [1, 2, 3]
    assert txguard.is_retryable(info.value)
    assert any("gave up after 3 attempts (retries=2)" in n for n in info.value.__notes__)


@drivers("psycopg", "aiomysql")
async def test_retries_zero_runs_once(db: Db) -> None:
    """The default retries=0 never runs a unit again, even for a retryable error."""

    def body(session: Session, attempt: int) -> None:
        run_after_kill(session, db.side)

    with pytest.raises(DBAPIError) as info:
        await call(db.transactional(body))
    assert db.attempts == [1]
    assert not getattr(info.value, "__notes__", [])


# Who retries: only the unit that begins the transaction.


def test_joined_unit_never_retries(engine: sa.Engine) -> None:
    """A @transactional function joining an active unit leaves the retry to that unit's owner."""
    registry = txguard.SessionRegistry(engine)
    calls: list[int] = []

    @registry.transactional(retries=3, retry_on=Conflict, backoff=0)
    def inner() -> None:
        calls.append(1)
        raise Conflict

    with pytest.raises(Conflict) as info, registry.unit_of_work():
        inner()
    assert calls == [1]
    assert any("only the unit that begins a transaction retries" in n for n in info.value.__notes__)


def test_owner_retries_the_whole_call_when_a_joined_unit_fails(engine: sa.Engine) -> None:
    """A conflict in a joined unit reruns the owner's whole function, joined calls included."""
    registry = txguard.SessionRegistry(engine)
    calls: list[str] = []

    @registry.transactional
    def inner(attempt: int) -> None:
        calls.append(f"inner {attempt}")
        registry.current_session().add(Item(name=f"inner {attempt}"))
        if attempt == 1:
            raise Conflict

    @registry.transactional(retries=2, retry_on=Conflict, backoff=0)
    def outer() -> None:
        attempt = len([c for c in calls if c.startswith("outer")]) + 1
        calls.append(f"outer {attempt}")
        registry.current_session().add(Item(name=f"outer {attempt}"))
        inner(attempt)

    outer()
    assert calls == ["outer 1", "inner 1", "outer 2", "inner 2"]
    with Session(engine) as session:
        assert sorted(session.scalars(sa.select(Item.name))) == ["inner 2", "outer 2"]


def test_requires_new_unit_retries_on_its_own(engine: sa.Engine) -> None:
    """A requires_new function retries its own transaction; the suspended outer one is untouched."""
    registry = txguard.SessionRegistry(engine)
    calls: list[int] = []

    @registry.transactional(propagation="requires_new", retries=1, retry_on=Conflict, backoff=0)
    def audit() -> None:
        calls.append(1)
        registry.current_session().add(Item(name=f"audit {len(calls)}"))
        if len(calls) == 1:
            raise Conflict

    with registry.unit_of_work() as session:
        session.add(Item(name="outer"))
        audit()
    assert calls == [1, 1]
    with Session(engine) as session:
        assert sorted(session.scalars(sa.select(Item.name))) == ["audit 2", "outer"]


def test_nested_unit_never_retries(engine: sa.Engine) -> None:
    """A savepoint unit cannot undo what the server rolled back: it leaves the retry to its owner."""
    registry = txguard.SessionRegistry(engine)
    calls: list[str] = []

    @registry.transactional(propagation="nested", retries=3, retry_on=Conflict, backoff=0)
    def step() -> None:
        calls.append("step")
        raise Conflict

    @registry.transactional(retries=1, retry_on=Conflict, backoff=0)
    def owner() -> None:
        calls.append("owner")
        step()

    with pytest.raises(Conflict):
        owner()
    assert calls == ["owner", "step", "owner", "step"]


def test_commit_as_you_go_unit_refuses_retries(engine: sa.Engine) -> None:
    """A commit-as-you-go unit may have committed part of its work, so retries= is refused."""
    registry = txguard.SessionRegistry(engine)
    with pytest.raises(txguard.ConfigurationError, match="retries=3 would never apply"):
        registry.transactional(mode="commit_as_you_go", retries=3, retry_on=Conflict, backoff=0)


@drivers("psycopg", "pymysql")
async def test_deadlock_in_a_nested_unit_is_retried_by_the_owner(db: Db) -> None:
    """A deadlock inside a savepoint unit reaches the owner as a deadlock, and the owner retries."""
    registry = db.registry
    with DeadlockPeer(db.side) as peer:

        def body(session: Session, attempt: int) -> None:
            session.add(Item(name=f"owner {attempt}"))
            with registry.unit_of_work(propagation="nested") as nested:
                if attempt == 1:
                    peer.provoke(nested)

        await call(db.transactional(body, retries=1, backoff=0))
    assert db.attempts == [1, 2]
    assert db.items() == ["owner 2"]


@drivers("pymysql")
async def test_owner_catching_a_nested_deadlock_commits_nothing(db: Db) -> None:
    """MariaDB ends the whole transaction on a deadlock: an owner that catches it must not commit."""
    registry = db.registry
    with DeadlockPeer(db.side) as peer, pytest.raises(txguard.UnexpectedRollbackError) as info:
        with registry.unit_of_work() as session:
            session.add(Item(name="before"))
            session.flush()
            try:
                with registry.unit_of_work(propagation="nested") as nested:
                    peer.provoke(nested)
            except DBAPIError:
                pass
            session.add(Item(name="after"))
    assert txguard.is_retryable(info.value.__cause__)  # type: ignore[arg-type]
    assert db.items() == []


@drivers("psycopg", "pymysql")
async def test_retryable_error_rolls_back_despite_no_rollback_for(db: Db) -> None:
    """no_rollback_for cannot commit a transaction the server already rolled back."""
    ran: list[str] = []
    with DeadlockPeer(db.side) as peer, pytest.raises(DBAPIError):
        with db.registry.unit_of_work(no_rollback_for=DBAPIError) as session:
            session.add(Item(name="doomed"))
            session.flush()
            txguard.on_commit(lambda: ran.append("committed"), registry=db.registry)
            peer.provoke(session)
    assert ran == []
    assert db.items() == []


@drivers("psycopg")
async def test_joined_unit_with_no_rollback_for_still_dooms_the_transaction(db: Db) -> None:
    """A joined unit that hits a serialization failure marks the transaction rollback-only anyway."""
    registry = db.registry
    with pytest.raises(txguard.UnexpectedRollbackError):
        with registry.unit_of_work(isolation_level="SERIALIZABLE") as session:
            session.add(Item(name="doomed"))
            try:
                with registry.unit_of_work(no_rollback_for=DBAPIError) as joined:
                    serialization_failure(joined, db.side)
            except DBAPIError:
                pass
    assert db.items() == []


# Options: retry_on, backoff, notes.


def test_retry_on_exception_types_adds_to_the_classifier(sqlite_engine: sa.Engine) -> None:
    """retry_on=(types) retries those exceptions as well as the database's own."""
    registry = txguard.SessionRegistry(sqlite_engine)
    calls: list[int] = []

    @registry.transactional(retries=2, retry_on=(KeyError, Conflict), backoff=0)
    def work() -> int:
        calls.append(1)
        if len(calls) < 3:
            raise (KeyError if len(calls) == 1 else Conflict)("transient")
        return len(calls)

    assert work() == 3


def test_retry_on_predicate_decides_for_other_errors(sqlite_engine: sa.Engine) -> None:
    """retry_on=predicate is asked about errors the classifier does not retry."""
    registry = txguard.SessionRegistry(sqlite_engine)
    seen: list[BaseException] = []

    def transient(exc: BaseException) -> bool:
        seen.append(exc)
        return isinstance(exc, Conflict) and "again" in str(exc)

    @registry.transactional(retries=5, retry_on=transient, backoff=0)
    def work() -> None:
        raise Conflict("again" if len(seen) < 2 else "final")

    with pytest.raises(Conflict, match="final"):
        work()
    assert len(seen) == 3


def test_retry_predicate_error_keeps_the_original_in_the_traceback(sqlite_engine: sa.Engine) -> None:
    """A retry_on predicate that raises shows the error it was asked about as its context."""
    registry = txguard.SessionRegistry(sqlite_engine)

    def broken(exc: BaseException) -> bool:
        raise RuntimeError("bug in predicate")

    @registry.transactional(retries=1, retry_on=broken)
    def work() -> None:
        raise Conflict("original")

    with pytest.raises(RuntimeError) as info:
        work()
    assert isinstance(info.value.__context__, Conflict)


def test_non_retryable_error_after_a_retry_notes_the_attempts(sqlite_engine: sa.Engine) -> None:
    """An error that is not retried, raised by a later attempt, says how many attempts ran."""
    registry = txguard.SessionRegistry(sqlite_engine)
    calls: list[int] = []

    @registry.transactional(retries=3, retry_on=Conflict, backoff=0)
    def work() -> None:
        calls.append(1)
        raise Conflict if len(calls) == 1 else ValueError("bad input")

    with pytest.raises(ValueError) as info:
        work()
    assert calls == [1, 1]
    assert any("gave up after 2 attempts" in n for n in info.value.__notes__)


def test_backoff_function_gets_the_attempt_number(sqlite_engine: sa.Engine) -> None:
    """A backoff function is called with 1, 2, ... after each failed attempt."""
    registry = txguard.SessionRegistry(sqlite_engine)
    asked: list[int] = []

    def backoff(attempt: int) -> float:
        asked.append(attempt)
        return 0.0

    @registry.transactional(retries=3, retry_on=Conflict, backoff=backoff)
    def work() -> None:
        raise Conflict

    with pytest.raises(Conflict):
        work()
    assert asked == [1, 2, 3]


@pytest.mark.parametrize("value", [-1, math.nan, math.inf, "0.1", None])
def test_backoff_function_returning_a_bad_value_is_refused(
    sqlite_engine: sa.Engine, value: object
) -> None:
    """A backoff function must return seconds >= 0; anything else raises ConfigurationError."""
    registry = txguard.SessionRegistry(sqlite_engine)

    @registry.transactional(retries=1, retry_on=Conflict, backoff=lambda attempt: value)
    def work() -> None:
        raise Conflict

    with pytest.raises(txguard.ConfigurationError, match="finite number of seconds"):
        work()


@pytest.mark.parametrize("base", [0.0, 0.01, 0.05, 1.0, 5.0])
def test_default_backoff_is_full_jitter_under_the_cap(base: float) -> None:
    """The pause after attempt n is drawn from [0, min(cap, base * 2**(n-1))]."""
    cap = max(BACKOFF_CAP, base)
    for attempt in range(1, 40):
        ceiling = min(cap, base * 2 ** (attempt - 1))
        delays = [backoff_delay(base, attempt) for _ in range(50)]
        assert all(0.0 <= d <= ceiling for d in delays)
    assert 0.0 <= backoff_delay(base, 10**6) <= cap  # no float overflow on long runs


async def test_async_retry_backoff_can_be_cancelled(tmp_path: Any) -> None:
    """Cancelling a task while it waits to retry ends it at once, with no further attempt."""
    engine = create_async_engine(f"sqlite+aiosqlite:///{tmp_path / 'cancel.db'}")
    registry = txguard.SessionRegistry(engine)
    calls: list[int] = []
    failed = asyncio.Event()

    @registry.transactional(retries=5, retry_on=Conflict, backoff=lambda attempt: 60.0)
    async def work() -> None:
        calls.append(1)
        await registry.current_session().execute(sa.text("SELECT 1"))
        failed.set()
        raise Conflict

    task = asyncio.ensure_future(work())
    await asyncio.wait_for(failed.wait(), 10)
    await asyncio.sleep(0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(task, 10)
    assert calls == [1]
    assert engine.sync_engine.pool.checkedout() == 0
    await engine.dispose()


async def test_async_callbacks_of_a_failed_attempt_never_run(tmp_path: Any) -> None:
    """An async unit that is retried runs only the on_commit callbacks of its last attempt."""
    engine = create_async_engine(f"sqlite+aiosqlite:///{tmp_path / 'callbacks.db'}")
    registry = txguard.SessionRegistry(engine)
    calls: list[int] = []
    ran: list[int] = []

    @registry.transactional(retries=2, retry_on=Conflict, backoff=0)
    async def work() -> None:
        calls.append(1)
        attempt = len(calls)
        txguard.on_commit(lambda: ran.append(attempt), registry=registry)
        await registry.current_session().execute(sa.text("SELECT 1"))
        if attempt < 3:
            raise Conflict

    await work()
    assert ran == [3]
    await engine.dispose()
