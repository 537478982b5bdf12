"""Server-side timeouts, deadlocks and interrupts inside units, on real servers (SPEC §2, §3)."""

from __future__ import annotations

import signal
import sys
import threading
from collections.abc import Callable, Iterator
from types import FrameType
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.exc import DBAPIError, OperationalError

import txguard
from tests.backends import SYNC_URLS, require
from tests.models import Account, Item

SLEEP_PG = sa.text("SELECT pg_sleep(30)")


@pytest.fixture
def pg(engine: sa.Engine, backend: str) -> sa.Engine:
    """The PostgreSQL engine (other backends are skipped: the shape is PostgreSQL's)."""
    if backend != "postgresql":
        pytest.skip("a PostgreSQL server setting")
    return engine


@pytest.fixture
def server(engine: sa.Engine, backend: str) -> sa.Engine:
    """The engine of a server backend (SQLite has no row locks to deadlock on)."""
    if backend == "sqlite":
        pytest.skip("needs row locks")
    return engine


def names(engine: sa.Engine) -> list[str]:
    with engine.connect() as conn:
        return list(conn.scalars(sa.select(Item.name).order_by(Item.name)))


def in_two_threads(run: Callable[..., None], first: tuple[Any, ...], second: tuple[Any, ...]) -> None:
    """Run ``run(*first)`` and ``run(*second)`` in two threads at once; wait for both."""
    threads = [threading.Thread(target=run, args=first), threading.Thread(target=run, args=second)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def statement_timeout(session: sa.orm.Session) -> None:
    """Make the next statement of ``session`` hit statement_timeout at once."""
    session.execute(sa.text("SET LOCAL statement_timeout = 1"))
    session.execute(sa.text("SELECT pg_sleep(1)"))


# PostgreSQL statement_timeout / lock_timeout.


def test_caught_statement_timeout_dooms_the_unit(pg: sa.Engine) -> None:
    """A statement_timeout the code catches still rolls the unit back at its exit."""
    txguard.configure(pg)
    with pytest.raises(txguard.UnexpectedRollbackError):
        with txguard.unit_of_work() as session:
            session.add(Item(name="lost"))
            session.flush()
            try:
                statement_timeout(session)
            except OperationalError:
                pass
    assert names(pg) == []
    assert pg.pool.checkedout() == 0


def test_uncaught_statement_timeout_rolls_back_and_surfaces(pg: sa.Engine) -> None:
    """An uncaught statement_timeout leaves the unit as itself, rolled back, pool intact."""
    txguard.configure(pg)
    with pytest.raises(OperationalError) as info:
        with txguard.unit_of_work() as session:
            session.add(Item(name="lost"))
            session.flush()
            statement_timeout(session)
    assert info.value.orig.sqlstate == "57014"  # type: ignore[union-attr]
    assert names(pg) == []
    assert pg.pool.checkedout() == 0


def test_statement_timeout_caught_by_the_owner_of_a_joined_unit_dooms_it(pg: sa.Engine) -> None:
    """A timeout escaping a REQUIRED join and caught by the owner makes the owner raise."""
    txguard.configure(pg)

    @txguard.transactional
    def slow() -> None:
        txguard.current_session().add(Item(name="inner"))
        statement_timeout(txguard.current_session())

    with pytest.raises(txguard.UnexpectedRollbackError) as info:
        with txguard.unit_of_work() as session:
            session.add(Item(name="outer"))
            try:
                slow()
            except OperationalError:
                pass
    assert isinstance(info.value.__cause__, OperationalError)
    assert names(pg) == []


def test_statement_timeout_caught_in_a_nested_unit_is_contained(pg: sa.Engine) -> None:
    """A timeout inside a nested unit rolls back its savepoint only; the owner commits."""
    txguard.configure(pg)
    with txguard.unit_of_work() as session:
        session.add(Item(name="outer"))
        session.flush()
        try:
            with txguard.unit_of_work(propagation="nested") as inner:
                inner.add(Item(name="inner"))
                inner.flush()
                statement_timeout(inner)
        except OperationalError:
            pass
        session.add(Item(name="after"))
    assert names(pg) == ["after", "outer"]


def test_statement_timeout_is_not_retried(pg: sa.Engine) -> None:
    """retries= does not run a call again after a statement_timeout: it is not transient."""
    txguard.configure(pg)
    calls: list[int] = []

    @txguard.transactional(retries=3, backoff=0)
    def slow() -> None:
        calls.append(1)
        statement_timeout(txguard.current_session())

    with pytest.raises(OperationalError):
        slow()
    assert calls == [1]
    assert pg.pool.checkedout() == 0


def test_statement_timeout_is_retried_when_retry_on_selects_it(pg: sa.Engine) -> None:
    """retry_on that selects QueryCanceled runs the call again, in a fresh transaction."""
    txguard.configure(pg)
    calls: list[int] = []

    def canceled(exc: BaseException) -> bool:
        return isinstance(exc, DBAPIError) and getattr(exc.orig, "sqlstate", None) == "57014"

    @txguard.transactional(retries=2, backoff=0, retry_on=canceled)
    def slow_once() -> None:
        calls.append(1)
        txguard.current_session().add(Item(name=f"try{len(calls)}"))
        txguard.current_session().flush()
        if len(calls) == 1:
            statement_timeout(txguard.current_session())

    slow_once()
    assert calls == [1, 1]
    assert names(pg) == ["try2"]


def _lock_row(engine: sa.Engine) -> tuple[sa.Connection, Callable[[], None]]:
    conn = engine.connect()
    conn.begin()
    conn.execute(sa.select(Account).where(Account.id == 1).with_for_update())

    def release() -> None:
        conn.rollback()
        conn.close()

    return conn, release


@pytest.fixture
def accounts(server: sa.Engine) -> sa.Engine:
    with server.begin() as conn:
        conn.execute(sa.insert(Account), [{"id": 1, "balance": 100}, {"id": 2, "balance": 100}])
    return server


def test_caught_lock_timeout_dooms_the_unit(accounts: sa.Engine, backend: str) -> None:
    """A lock wait timeout the code catches (PostgreSQL 55P03, MariaDB 1205) dooms the unit."""
    txguard.configure(accounts)
    _, release = _lock_row(accounts)
    try:
        with pytest.raises(txguard.UnexpectedRollbackError):
            with txguard.unit_of_work() as session:
                session.add(Item(name="lost"))
                session.flush()
                if backend == "postgresql":
                    session.execute(sa.text("SET LOCAL lock_timeout = 1"))
                    update = "UPDATE txg_accounts SET balance = 0 WHERE id = 1"
                else:  # not SET SESSION: the pooled connection would keep a 1 s lock wait
                    update = (
                        "SET STATEMENT innodb_lock_wait_timeout=1 FOR "
                        "UPDATE txg_accounts SET balance = 0 WHERE id = 1"
                    )
                try:
                    session.execute(sa.text(update))
                except OperationalError:
                    pass
    finally:
        release()
    assert names(accounts) == []
    assert accounts.pool.checkedout() == 0


# Real deadlocks: two threads, two rows, opposite order.


def _deadlock_pair(
    engine: sa.Engine, retries: int
) -> tuple[list[BaseException], list[int], list[int]]:
    """Run two transfers that lock the two accounts in opposite order; return what failed."""
    registry = txguard.SessionRegistry(engine)
    barrier = threading.Barrier(2, timeout=20)
    errors: list[BaseException] = []
    attempts = {1: 0, 2: 0}

    @txguard.transactional(retries=retries, backoff=0, registry=registry)
    def transfer(first: int, second: int) -> None:
        attempts[first] += 1
        session = registry.current_session()
        session.execute(
            sa.update(Account).where(Account.id == first).values(balance=Account.balance - 10)
        )
        if attempts[first] == 1:
            barrier.wait()
        session.execute(
            sa.update(Account).where(Account.id == second).values(balance=Account.balance + 10)
        )

    def run(first: int, second: int) -> None:
        try:
            transfer(first, second)
        except BaseException as exc:
            errors.append(exc)

    in_two_threads(run, (1, 2), (2, 1))
    with engine.connect() as conn:
        balances = list(conn.scalars(sa.select(Account.balance).order_by(Account.id)))
    return errors, balances, [attempts[1], attempts[2]]


def test_deadlock_victim_retries_and_both_transfers_apply(accounts: sa.Engine) -> None:
    """The deadlock victim's @transactional(retries=3) runs again; both transfers apply once."""
    errors, balances, attempts = _deadlock_pair(accounts, retries=3)
    assert errors == []
    assert balances == [100, 100]
    assert sorted(attempts) == [1, 2]
    assert accounts.pool.checkedout() == 0


def test_deadlock_without_retries_fails_the_victim_only(accounts: sa.Engine) -> None:
    """Without retries the victim's deadlock surfaces and only the survivor's transfer applies."""
    errors, balances, attempts = _deadlock_pair(accounts, retries=0)
    assert len(errors) == 1 and txguard.is_retryable(errors[0])
    assert sorted(balances) == [90, 110]
    assert attempts == [1, 1]


def test_caught_deadlock_dooms_the_unit(accounts: sa.Engine) -> None:
    """A deadlock the victim's code catches still rolls its unit back with an error."""
    registry = txguard.SessionRegistry(accounts)
    barrier = threading.Barrier(2, timeout=20)
    outcomes: dict[int, BaseException | None] = {}

    def run(first: int, second: int) -> None:
        try:
            with registry.unit_of_work() as session:
                session.execute(sa.update(Account).where(Account.id == first).values(balance=0))
                barrier.wait()
                try:
                    session.execute(
                        sa.update(Account).where(Account.id == second).values(balance=0)
                    )
                except OperationalError:
                    session.add(Item(name=f"victim{first}"))
            outcomes[first] = None
        except BaseException as exc:
            outcomes[first] = exc

    in_two_threads(run, (1, 2), (2, 1))
    failed = [exc for exc in outcomes.values() if exc is not None]
    assert len(failed) == 1
    assert isinstance(failed[0], txguard.UnexpectedRollbackError)
    assert names(accounts) == []
    assert accounts.pool.checkedout() == 0


# KeyboardInterrupt while a statement runs.


@pytest.fixture
def sigint_raises() -> Iterator[None]:
    """Make SIGINT raise KeyboardInterrupt for the test, as in a terminal.

    A run started as a background job of a non-interactive shell (``make test &``, some CI
    runners) inherits SIGINT ignored, and Python then installs no handler: the interrupt
    the test sends would be lost and pg_sleep(30) would run to its end.
    """
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


def _interrupt_when_sleeping(engine: sa.Engine, main: int) -> threading.Thread:
    """Start a thread that sends SIGINT to ``main`` once a pg_sleep is running on the server."""
    watcher = sa.create_engine(SYNC_URLS["postgresql"], poolclass=sa.pool.NullPool)
    query = sa.text(
        "SELECT count(*) FROM pg_stat_activity WHERE query LIKE 'SELECT pg_sleep(30)%' "
        "AND state = 'active' AND datname = current_database()"  # not another run's sleep
    )

    def watch() -> None:
        try:
            with watcher.connect() as conn:
                for _ in range(2000):
                    if conn.execute(query).scalar():
                        signal.pthread_kill(main, signal.SIGINT)
                        return
                    conn.rollback()
                    threading.Event().wait(0.01)
        finally:
            watcher.dispose()

    thread = threading.Thread(target=watch)
    thread.start()
    return thread


def test_keyboard_interrupt_during_a_statement_rolls_back_and_frees_the_connection(
    pg: sa.Engine, sigint_raises: None
) -> None:
    """Ctrl-C while pg_sleep runs ends the unit rolled back; the next unit works."""
    require("postgresql")
    txguard.configure(pg)
    watcher = _interrupt_when_sleeping(pg, threading.main_thread().ident or 0)
    try:
        with pytest.raises(KeyboardInterrupt):
            with txguard.unit_of_work() as session:
                session.add(Item(name="lost"))
                session.flush()
                session.execute(SLEEP_PG)
    finally:
        watcher.join()
    assert pg.pool.checkedout() == 0
    assert names(pg) == []
    with txguard.unit_of_work() as session:
        session.add(Item(name="next"))
    assert names(pg) == ["next"]


def test_keyboard_interrupt_before_the_dbapi_commit_commits_nothing(engine: sa.Engine) -> None:
    """An interrupt raised as COMMIT is about to be sent leaves nothing committed."""
    txguard.configure(engine)

    def interrupt(conn: sa.Connection) -> None:
        raise KeyboardInterrupt

    sa.event.listen(engine, "commit", interrupt)
    try:
        with pytest.raises(KeyboardInterrupt):
            with txguard.unit_of_work() as session:
                session.add(Item(name="lost"))
    finally:
        sa.event.remove(engine, "commit", interrupt)
    assert engine.pool.checkedout() == 0
    assert names(engine) == []
    with txguard.unit_of_work() as session:
        session.add(Item(name="next"))
    assert names(engine) == ["next"]


def test_keyboard_interrupt_before_commit_is_not_retried(engine: sa.Engine) -> None:
    """An interrupt at COMMIT of a function with retries= ends it after one attempt."""
    txguard.configure(engine)
    calls: list[int] = []

    def interrupt(conn: sa.Connection) -> None:
        raise KeyboardInterrupt

    @txguard.transactional(retries=3, backoff=0, retry_on=lambda exc: True)
    def work() -> None:
        calls.append(1)
        txguard.current_session().add(Item(name="lost"))

    sa.event.listen(engine, "commit", interrupt)
    try:
        with pytest.raises(KeyboardInterrupt):
            work()
    finally:
        sa.event.remove(engine, "commit", interrupt)
    assert calls == [1]
    assert names(engine) == []


def test_keyboard_interrupt_in_a_retrying_function_during_a_statement_is_not_retried(
    pg: sa.Engine, sigint_raises: None
) -> None:
    """Ctrl-C while a statement of @transactional(retries=3) runs ends the call at once."""
    txguard.configure(pg)
    calls: list[int] = []

    @txguard.transactional(retries=3, backoff=0)
    def slow() -> None:
        calls.append(1)
        txguard.current_session().execute(SLEEP_PG)

    watcher = _interrupt_when_sleeping(pg, threading.main_thread().ident or 0)
    try:
        with pytest.raises(KeyboardInterrupt):
            slow()
    finally:
        watcher.join()
    assert calls == [1]
    assert pg.pool.checkedout() == 0


def test_commit_as_you_go_commit_after_a_caught_timeout_raises_and_rollback_clears(
    pg: sa.Engine,
) -> None:
    """In commit-as-you-go, commit() after a caught timeout raises; rollback() lets work go on."""
    txguard.configure(pg)
    with txguard.unit_of_work(mode="commit_as_you_go") as session:
        session.add(Item(name="lost"))
        session.flush()
        try:
            statement_timeout(session)
        except OperationalError:
            pass
        with pytest.raises(txguard.UnexpectedRollbackError):
            session.commit()
        session.add(Item(name="kept"))
        session.commit()
    assert names(pg) == ["kept"]


def test_caught_max_statement_time_dooms_the_unit_on_mariadb(engine: sa.Engine, backend: str) -> None:
    """A MariaDB max_statement_time interruption the code catches dooms the unit."""
    if backend != "mariadb":
        pytest.skip("a MariaDB server setting")
    txguard.configure(engine)
    with pytest.raises(txguard.UnexpectedRollbackError):
        with txguard.unit_of_work() as session:
            session.add(Item(name="lost"))
            session.flush()
            try:
                session.execute(sa.text("SET STATEMENT max_statement_time=0.001 FOR SELECT SLEEP(2)"))
            except OperationalError:
                pass
            else:
                pytest.skip("SLEEP() returned 1 instead of raising on this server")
    assert names(engine) == []


def _deadlock_in_nested(engine: sa.Engine, catch: bool) -> dict[int, BaseException | None]:
    """Two units deadlock inside nested units; return each unit's outcome."""
    registry = txguard.SessionRegistry(engine)
    barrier = threading.Barrier(2, timeout=20)
    outcomes: dict[int, BaseException | None] = {}

    def run(first: int, second: int) -> None:
        try:
            with registry.unit_of_work() as session:
                session.add(Item(name=f"outer{first}"))
                session.flush()
                try:
                    with registry.unit_of_work(propagation="nested") as inner:
                        inner.execute(sa.update(Account).where(Account.id == first).values(balance=0))
                        barrier.wait()
                        inner.execute(sa.update(Account).where(Account.id == second).values(balance=0))
                except OperationalError:
                    if not catch:
                        raise
            outcomes[first] = None
        except BaseException as exc:
            outcomes[first] = exc

    in_two_threads(run, (1, 2), (2, 1))
    return outcomes


def test_deadlock_caught_around_a_nested_unit(accounts: sa.Engine, backend: str) -> None:
    """A deadlock caught around a nested unit: contained on PostgreSQL, dooms on MariaDB."""
    outcomes = _deadlock_in_nested(accounts, catch=True)
    failed = [exc for exc in outcomes.values() if exc is not None]
    if backend == "postgresql":
        assert failed == []
        assert names(accounts) == ["outer1", "outer2"]
    else:
        assert len(failed) == 1
        assert isinstance(failed[0], (txguard.UnexpectedRollbackError, OperationalError))
        assert len(names(accounts)) == 1
    assert accounts.pool.checkedout() == 0


def test_deadlock_through_a_nested_unit_is_retried_by_the_owner(accounts: sa.Engine) -> None:
    """A deadlock escaping a nested unit makes the owning @transactional(retries=) run again."""
    registry = txguard.SessionRegistry(accounts)
    barrier = threading.Barrier(2, timeout=20)
    attempts = {1: 0, 2: 0}
    errors: list[BaseException] = []

    @txguard.transactional(retries=3, backoff=0, registry=registry)
    def transfer(first: int, second: int) -> None:
        attempts[first] += 1
        registry.current_session().add(Item(name=f"outer{first}"))
        with registry.unit_of_work(propagation="nested") as inner:
            inner.execute(sa.update(Account).where(Account.id == first).values(balance=Account.balance - 10))
            if attempts[first] == 1:
                barrier.wait()
            inner.execute(sa.update(Account).where(Account.id == second).values(balance=Account.balance + 10))

    def run(first: int, second: int) -> None:
        try:
            transfer(first, second)
        except BaseException as exc:
            errors.append(exc)

    in_two_threads(run, (1, 2), (2, 1))
    assert errors == []
    assert names(accounts) == ["outer1", "outer2"]
    with accounts.connect() as conn:
        assert list(conn.scalars(sa.select(Account.balance).order_by(Account.id))) == [100, 100]


def test_serialization_failure_at_commit_is_retried(pg: sa.Engine) -> None:
    """A SERIALIZABLE write skew that PostgreSQL refuses at COMMIT (40001) is run again."""
    registry = txguard.SessionRegistry(pg)
    barrier = threading.Barrier(2, timeout=20)
    attempts: dict[str, int] = {"a": 0, "b": 0}
    errors: list[BaseException] = []

    @txguard.transactional(retries=3, backoff=0, isolation_level="SERIALIZABLE", registry=registry)
    def add_if_few(name: str) -> None:
        attempts[name] += 1
        session = registry.current_session()
        count = session.scalar(sa.select(sa.func.count()).select_from(Item))
        if attempts[name] == 1:
            barrier.wait()
        session.add(Item(name=f"{name}{count}"))
        session.flush()
        if attempts[name] == 1:
            barrier.wait()

    def run(name: str) -> None:
        try:
            add_if_few(name)
        except BaseException as exc:
            errors.append(exc)

    in_two_threads(run, ("a",), ("b",))
    assert errors == []
    # One of the two commits first; the other is refused and run again, which PostgreSQL
    # may refuse once more under load (seen once on 3.10): the data is what counts.
    assert min(attempts.values()) == 1 and max(attempts.values()) >= 2
    assert sorted(n[1] for n in names(pg)) == ["0", "1"]


def test_keyboard_interrupt_as_the_unit_starts_to_settle_frees_the_connection(
    sqlite_engine: sa.Engine,
) -> None:
    """Ctrl-C arriving at the first line of the unit's settling still closes its session."""
    registry = txguard.SessionRegistry(sqlite_engine)
    previous = sys.gettrace()  # coverage's tracer, which the rest of the run needs back

    def tracer(frame: FrameType, event: str, arg: Any) -> Any:
        if frame.f_code.co_name == "settle" and event == "line":
            sys.settrace(previous)
            raise KeyboardInterrupt
        return tracer

    try:
        with registry.unit_of_work() as session:
            session.add(Item(name="lost"))
            session.flush()
            sys.settrace(tracer)
    except KeyboardInterrupt:
        pass
    finally:
        sys.settrace(previous)
    left_open = sqlite_engine.pool.checkedout()
    if left_open:  # let the leaked session go before the next test
        sa.orm.Session.close(session)
    assert left_open == 0
