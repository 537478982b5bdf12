"""No diagnostic txguard produces (error, warning, note, leak report, log line) quotes a bound
parameter value: every path that quotes SQL runs here with a secret-looking parameter."""

from __future__ import annotations

import asyncio
import gc
import logging
import threading
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.exc import DBAPIError, IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession, create_async_engine
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

import txguard
from tests.helpers import once_inside
from tests.models import Item
from tests.reliability.faults import Side, own_id, run_after_kill

SECRET = "s3cr3t-Hunter2-t0ken"
FRAGMENT = "Hunter2"  # a cut-off quote must not show part of it either


def _pending(call: Callable[[], object]) -> bool:
    try:
        call()
    except NotImplementedError:
        return True
    return False


needs_guards = pytest.mark.skipif(
    _pending(txguard.uninstall),
    reason="txguard.install() is still a placeholder (SPEC section 6, issue 3)",
)
needs_leaks = pytest.mark.skipif(
    not hasattr(txguard.LeakDetector, "check"),
    reason="txguard.LeakDetector is still a placeholder (SPEC section 7, issue 4)",
)


class SecretBase(DeclarativeBase):
    pass


class Secret(SecretBase):
    __tablename__ = "txg_secrets"

    token: Mapped[str] = mapped_column(sa.String(100), primary_key=True)


def assert_clean(text: str) -> None:
    assert FRAGMENT not in text, f"a parameter value leaked into: {text!r}"


@pytest.fixture
def secrets(engine: sa.Engine) -> Iterator[sa.Engine]:
    """Yield the engine with a table whose primary key already holds SECRET."""
    SecretBase.metadata.drop_all(engine)
    SecretBase.metadata.create_all(engine)
    with engine.begin() as conn:
        conn.execute(sa.insert(Secret).values(token=SECRET))
    yield engine
    SecretBase.metadata.drop_all(engine)


@pytest.fixture
def guards() -> Iterator[Callable[..., None]]:
    """Yield txguard.install; uninstall whatever the test installed."""
    try:
        yield txguard.install
    finally:
        txguard.uninstall()


def _driver_sql(conn: sa.Connection) -> None:
    placeholder = "?" if conn.dialect.paramstyle == "qmark" else "%s"
    conn.exec_driver_sql(f"INSERT INTO txg_items (name) VALUES ({placeholder})", (SECRET,))


# Each way of writing a statement with a value in it; all must be quoted without the value.
WRITES: dict[str, Callable[[Any], object]] = {
    "text": lambda c: c.execute(sa.text("INSERT INTO txg_items (name) VALUES (:n)"), {"n": SECRET}),
    "core": lambda c: c.execute(sa.insert(Item).values(name=SECRET)),
    "executemany": lambda c: c.execute(sa.insert(Item), [{"name": SECRET}, {"name": SECRET}]),
    "literal_execute": lambda c: c.execute(
        sa.update(Item)
        .where(Item.name == sa.bindparam("n", SECRET, literal_execute=True))
        .values(name="x")
    ),
    "in": lambda c: c.execute(sa.delete(Item).where(Item.name.in_([SECRET, "other"]))),
}
CONNECTION_WRITES = {**WRITES, "driver_sql": _driver_sql}


# Core paths: unit and connect() warnings, errors, notes and log lines.


@pytest.mark.parametrize("write", CONNECTION_WRITES)
def test_connect_uncommitted_warning_quotes_sql_without_values(engine: sa.Engine, write: str) -> None:
    """connect(mode='commit_as_you_go') names the first discarded write by its SQL, not its values."""
    with pytest.warns(txguard.UncommittedWorkWarning) as record:
        with txguard.connect(engine, mode="commit_as_you_go") as conn:
            CONNECTION_WRITES[write](conn)
    message = str(record[0].message)
    assert "the first, '" in message or 'the first, "' in message  # it does quote the SQL
    assert_clean(message)


def test_session_uncommitted_warning_has_no_values(engine: sa.Engine) -> None:
    """A commit-as-you-go unit's UncommittedWorkWarning says where, never what was written."""
    registry = txguard.SessionRegistry(engine)
    with pytest.warns(txguard.UncommittedWorkWarning) as record:
        with registry.unit_of_work(mode="commit_as_you_go") as session:
            session.add(Item(name=SECRET))
            session.flush()
            session.execute(sa.update(Item).values(name=SECRET))
    assert_clean(str(record[0].message))


@pytest.mark.parametrize("write", WRITES)
def test_read_only_error_quotes_sql_without_values(engine: sa.Engine, write: str) -> None:
    """ReadOnlyTransactionError quotes the refused statement with placeholders only."""
    registry = txguard.SessionRegistry(engine)
    with pytest.raises(txguard.ReadOnlyTransactionError) as info:
        with registry.unit_of_work(read_only=True) as session:
            WRITES[write](session)
    assert "tried to execute a write" in str(info.value)
    assert_clean(str(info.value))


def test_read_only_flush_error_has_no_values(engine: sa.Engine) -> None:
    """A read-only unit refusing a flush counts the objects and quotes none of their values."""
    registry = txguard.SessionRegistry(engine)
    with pytest.raises(txguard.ReadOnlyTransactionError) as info:
        with registry.unit_of_work(read_only=True) as session:
            session.add(Item(name=SECRET))
            session.flush()
    assert_clean(str(info.value))


def test_unexpected_rollback_error_describes_the_cause_without_values(secrets: sa.Engine) -> None:
    """UnexpectedRollbackError names the caught database error, not the values it echoes."""
    registry = txguard.SessionRegistry(secrets)
    with pytest.raises(txguard.UnexpectedRollbackError) as info:
        with registry.unit_of_work():
            try:
                with registry.unit_of_work() as joined:
                    joined.execute(sa.insert(Secret).values(token=SECRET))
            except IntegrityError:
                pass
    assert isinstance(info.value.__cause__, IntegrityError)
    assert_clean(str(info.value))


def test_unexpected_rollback_after_pending_rollback_has_no_values(secrets: sa.Engine) -> None:
    """A PendingRollbackError cause (which repeats the flush error) is not quoted with its values."""
    registry = txguard.SessionRegistry(secrets)
    with pytest.raises(txguard.UnexpectedRollbackError) as info:
        with registry.unit_of_work():
            try:
                with registry.unit_of_work() as joined:
                    joined.add(Secret(token=SECRET))
                    try:
                        joined.flush()
                    except IntegrityError:
                        pass
                    joined.execute(sa.select(1))
            except sa.exc.PendingRollbackError:
                pass
    assert_clean(str(info.value))


@pytest.mark.parametrize("backend", ["postgresql", "mariadb"], indirect=True)
def test_retry_notes_have_no_values(engine: sa.Engine, backend: str) -> None:
    """The notes a retrying unit adds to the error it gives up on quote no values."""
    registry = txguard.SessionRegistry(engine)
    side = Side(backend)
    calls: list[int] = []

    @registry.transactional(retries=1, backoff=0)
    def work() -> None:
        calls.append(1)
        session = registry.current_session()
        session.execute(sa.insert(Item).values(name=SECRET))
        if len(calls) == 1:
            run_after_kill(session, side)
        session.execute(sa.text("SELECT :token"), {"token": SECRET})
        raise ValueError("not retried")

    try:
        with pytest.raises(ValueError) as info:
            work()
    finally:
        side.close()
    notes = "\n".join(info.value.__notes__)
    assert "gave up after 2 attempts" in notes
    assert_clean(notes)


@pytest.mark.parametrize("backend", ["postgresql", "mariadb"], indirect=True)
def test_commit_unknown_note_has_no_values(engine: sa.Engine, backend: str) -> None:
    """The note on an error raised while COMMIT was in flight quotes no values."""
    registry = txguard.SessionRegistry(engine)
    side = Side(backend)
    server_ids: list[int] = []

    def kill_at_commit(conn: sa.Connection) -> None:
        side.kill(server_ids[-1])

    @registry.transactional(retries=2, backoff=0)
    def work() -> None:
        session = registry.current_session()
        server_ids.append(own_id(session))
        session.execute(sa.insert(Item).values(name=SECRET))

    sa.event.listen(engine, "commit", kill_at_commit)
    try:
        with pytest.raises(DBAPIError) as info:
            work()
    finally:
        sa.event.remove(engine, "commit", kill_at_commit)
        side.close()
    notes = "\n".join(info.value.__notes__)
    assert "unknown" in notes
    assert_clean(notes)


@pytest.mark.parametrize("backend", ["postgresql", "mariadb"], indirect=True)
def test_rollback_failure_log_has_no_values(
    secrets: sa.Engine, backend: str, caplog: pytest.LogCaptureFixture
) -> None:
    """When rolling back after an error fails too, the log line names both errors, no values."""
    registry = txguard.SessionRegistry(secrets)
    side = Side(backend)
    caplog.set_level(logging.WARNING, logger="txguard")
    try:
        with pytest.raises(IntegrityError), registry.unit_of_work() as session:
            server_id = own_id(session)
            try:
                session.execute(sa.insert(Secret).values(token=SECRET))
            except IntegrityError:
                side.kill(server_id)  # the rollback that follows fails on a dead connection
                raise
    finally:
        side.close()
    assert_clean(caplog.text)
    assert "rolling back after IntegrityError" in caplog.text


def test_robust_callback_log_line_has_no_values(
    secrets: sa.Engine, caplog: pytest.LogCaptureFixture
) -> None:
    """The log line for a failed robust callback names the callback, not the values of its error."""
    registry = txguard.SessionRegistry(secrets)
    caplog.set_level(logging.ERROR, logger="txguard")

    def notify() -> None:
        with secrets.begin() as conn:
            conn.execute(sa.insert(Secret).values(token=SECRET))

    with registry.unit_of_work():
        txguard.on_commit(notify, robust=True, registry=registry)
    (record,) = caplog.records
    assert "notify" in record.getMessage()
    assert_clean(record.getMessage())


# Guards (SPEC section 6): mixed begin, cross-thread, cross-task, long transaction, leaks.


SESSION_WRITES = {k: v for k, v in WRITES.items() if k != "executemany"}


@needs_guards
@pytest.mark.parametrize("level", ["warn", "error"])
@pytest.mark.parametrize("write", SESSION_WRITES)
def test_mixed_begin_on_a_session_quotes_sql_without_values(
    engine: sa.Engine, guards: Callable[..., None], level: str, write: str
) -> None:
    """The mixed-begin report names the SQL that autobegan the transaction, never its values."""
    guards(mixed_begin=level)
    with Session(engine) as session:
        SESSION_WRITES[write](session)
        if level == "error":
            with pytest.raises(txguard.MixedBeginError) as info:
                session.begin()
            message = str(info.value)
        else:
            with pytest.warns(txguard.MixedBeginWarning) as record, pytest.raises(
                sa.exc.InvalidRequestError
            ):
                session.begin()
            message = str(record[0].message)
    assert "autobegun" in message
    assert_clean(message)


@needs_guards
@pytest.mark.parametrize("level", ["warn", "error"])
@pytest.mark.parametrize("write", CONNECTION_WRITES)
def test_mixed_begin_on_a_connection_quotes_sql_without_values(
    engine: sa.Engine, guards: Callable[..., None], level: str, write: str
) -> None:
    """The same holds for a Connection autobegun by a statement with values."""
    guards(mixed_begin=level)
    with engine.connect() as conn:
        CONNECTION_WRITES[write](conn)
        if level == "error":
            with pytest.raises(txguard.MixedBeginError) as info:
                conn.begin()
            message = str(info.value)
        else:
            with pytest.warns(txguard.MixedBeginWarning) as record, pytest.raises(
                sa.exc.InvalidRequestError
            ):
                conn.begin()
            message = str(record[0].message)
        conn.rollback()
    assert "autobegun" in message
    assert_clean(message)


@needs_guards
def test_cross_thread_warning_has_no_values(engine: sa.Engine, guards: Callable[..., None]) -> None:
    """CrossThreadWarning describes the transaction by its SQL, never its values."""
    guards(cross_thread="warn")
    with Session(engine) as session, warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        session.execute(sa.insert(Item).values(name=SECRET))
        thread = threading.Thread(target=lambda: session.execute(sa.select(Item.id)))
        once_inside(session, "do_orm_execute", lambda: (thread.start(), thread.join(30)))
        session.execute(sa.select(Item.name))  # the other thread runs while this one is inside
        session.rollback()
    messages = [str(w.message) for w in record if issubclass(w.category, txguard.CrossThreadWarning)]
    assert messages
    for message in messages:
        assert_clean(message)


@needs_guards
async def test_cross_task_warning_has_no_values(tmp_path: Any, guards: Callable[..., None]) -> None:
    """CrossTaskWarning describes the transaction by its SQL, never its values."""
    engine = create_async_engine(f"sqlite+aiosqlite:///{tmp_path / 'task.db'}")
    async with engine.begin() as conn:
        await conn.run_sync(Item.metadata.create_all)
    guards(cross_task="warn")
    used = asyncio.Event()
    try:
        with warnings.catch_warnings(record=True) as record:
            warnings.simplefilter("always")
            async with AsyncSession(engine) as session:
                await session.execute(sa.insert(Item).values(name=SECRET))

                async def other_task() -> None:
                    await session.execute(sa.select(Item.id))
                    used.set()

                task = asyncio.get_running_loop().create_task(other_task())
                await asyncio.wait_for(used.wait(), 30)
                await task
                await session.rollback()
    finally:
        await engine.dispose()
    messages = [str(w.message) for w in record if issubclass(w.category, txguard.CrossTaskWarning)]
    assert messages
    for message in messages:
        assert_clean(message)


@needs_guards
def test_long_transaction_warning_and_log_have_no_values(
    engine: sa.Engine, guards: Callable[..., None], caplog: pytest.LogCaptureFixture
) -> None:
    """LongTransactionWarning and the INFO line at its end quote the SQL, never its values."""
    caplog.set_level(logging.INFO, logger="txguard")
    guards(long_transaction=0.05)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        with Session(engine) as session:
            session.execute(sa.insert(Item).values(name=SECRET))
            for _ in range(1000):  # the sweep warns from its own thread; wait for it (bounded)
                if any(issubclass(w.category, txguard.LongTransactionWarning) for w in record):
                    break
                threading.Event().wait(0.01)
            session.commit()
    messages = [str(w.message) for w in record if issubclass(w.category, txguard.LongTransactionWarning)]
    assert messages
    for message in messages:
        assert_clean(message)
    assert "ended after" in caplog.text
    assert_clean(caplog.text)


@needs_guards
def test_leaked_session_warning_has_no_values(engine: sa.Engine, guards: Callable[..., None]) -> None:
    """LeakedSessionWarning describes the lost transaction by its SQL, never its values."""
    guards(leaks="warn")
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        session = Session(engine)
        session.execute(sa.insert(Item).values(name=SECRET))
        del session
        gc.collect()
    messages = [str(w.message) for w in record if issubclass(w.category, txguard.LeakedSessionWarning)]
    assert messages
    for message in messages:
        assert_clean(message)


@needs_guards
def test_leaked_connection_warning_has_no_values(engine: sa.Engine, guards: Callable[..., None]) -> None:
    """LeakedConnectionWarning describes the connection's last transaction without values."""
    guards(leaks="warn")
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        conn = engine.connect()
        conn.execute(sa.insert(Item).values(name=SECRET))
        del conn
        gc.collect()
    messages = [
        str(w.message) for w in record if issubclass(w.category, txguard.LeakedConnectionWarning)
    ]
    assert messages
    for message in messages:
        assert_clean(message)


# Leak detector (SPEC section 7).


@needs_leaks
def test_leak_report_has_no_values(engine: sa.Engine) -> None:
    """LeakError and each Leak name where a resource was opened, never what it ran."""
    detector = txguard.LeakDetector()
    with detector:
        session = Session(engine)
        session.execute(sa.insert(Item).values(name=SECRET))
        conn = engine.connect()
        conn.execute(sa.text("SELECT :token"), {"token": SECRET})
        try:
            with pytest.raises(txguard.LeakError) as info:
                detector.check()
        finally:
            conn.close()
            session.close()
    assert len(info.value.leaks) >= 2
    assert_clean(str(info.value))
    for leak in info.value.leaks:
        assert_clean(f"{leak}\n{leak!r}")


# What the user passes in (issue 13, section 5): URLs, engines, callbacks, exceptions.


URL = f"postgresql+psycopg://app:{SECRET}@db.example/app"
URL_CALLS: dict[str, Callable[[], object]] = {
    "SessionRegistry": lambda: txguard.SessionRegistry(URL),  # type: ignore[arg-type]
    "configure": lambda: txguard.configure(URL),  # type: ignore[arg-type]
    "connect": lambda: txguard.connect(URL),
    "rollback_after": lambda: txguard.testing.rollback_after(URL),
}


@pytest.mark.parametrize("call", URL_CALLS)
def test_url_string_instead_of_an_engine_is_named_by_type(call: str) -> None:
    """A URL string passed where an engine belongs is called "a str", never echoed, with the fix."""
    import txguard.testing  # noqa: F401 - the rollback_after case

    with pytest.raises(txguard.ConfigurationError) as info:
        URL_CALLS[call]()
    message = str(info.value)
    assert "a str" in message
    assert "create_engine(url)" in message
    assert_clean(message)


def test_engine_with_a_password_in_its_query_string_is_shown_without_it() -> None:
    """A registry's repr, and messages quoting it, show the engine's URL without its query."""
    engine = sa.create_engine(f"postgresql+psycopg://app@db.example/app?password={SECRET}")
    registry = txguard.SessionRegistry(engine)
    assert "Engine(postgresql+psycopg://app@db.example/app)" in repr(registry)
    assert_clean(repr(registry))
    with pytest.raises(txguard.ConfigurationError) as info:
        asyncio.run(registry.unit_of_work().__aenter__())
    assert "hands out sync Sessions" in str(info.value)
    assert_clean(str(info.value))


def test_sessionmaker_info_is_not_shown_by_the_registry() -> None:
    """A registry on a sessionmaker names its engine, not the options (info=) it holds."""
    from sqlalchemy.orm import sessionmaker

    maker = sessionmaker(sa.create_engine("sqlite://"), info={"api_token": SECRET})
    registry = txguard.SessionRegistry(maker)
    assert "sessionmaker(bind=Engine(sqlite://))" in repr(registry)
    assert_clean(repr(registry))


def test_raw_cursor_driver_error_is_named_without_its_text(secrets: sa.Engine, backend: str) -> None:
    """A driver error from a raw DBAPI cursor, which SQLAlchemy never wraps, is named by class."""
    registry = txguard.SessionRegistry(secrets)
    with pytest.raises(txguard.UnexpectedRollbackError) as info:
        with registry.unit_of_work():
            try:
                with registry.unit_of_work() as joined:
                    cursor = joined.connection().connection.cursor()
                    cursor.execute(f"INSERT INTO txg_secrets (token) VALUES ('{SECRET}')")
            except Exception:
                pass
    cause = info.value.__cause__
    assert cause is not None and not isinstance(cause, sa.exc.SQLAlchemyError)
    if backend != "sqlite":
        assert FRAGMENT in str(cause)  # the driver does echo the value...
    assert type(cause).__name__ in str(info.value)
    assert_clean(str(info.value))  # ...txguard does not


@pytest.mark.parametrize("backend", ["postgresql"], indirect=True)
def test_raw_cursor_driver_error_is_named_with_its_sqlstate(secrets: sa.Engine, backend: str) -> None:
    """Where the driver reports a SQLSTATE (psycopg), the message names it: a code, not a value."""
    registry = txguard.SessionRegistry(secrets)
    with pytest.raises(txguard.UnexpectedRollbackError) as info:
        with registry.unit_of_work():
            try:
                with registry.unit_of_work() as joined:
                    cursor = joined.connection().connection.cursor()
                    cursor.execute(f"INSERT INTO txg_secrets (token) VALUES ('{SECRET}')")
            except Exception:
                pass
    assert "UniqueViolation (SQLSTATE 23505)" in str(info.value)


def test_application_exception_text_is_not_quoted(sqlite_engine: sa.Engine) -> None:
    """UnexpectedRollbackError names a caught application exception by its type only."""
    registry = txguard.SessionRegistry(sqlite_engine)
    with pytest.raises(txguard.UnexpectedRollbackError) as info:
        with registry.unit_of_work():
            try:
                with registry.unit_of_work():
                    raise PermissionError(f"token {SECRET} was revoked")
            except PermissionError:
                pass
    assert "with PermissionError, which was caught" in str(info.value)
    assert_clean(str(info.value))


def _notify(token: str) -> None:
    raise RuntimeError("the mail server is down")


def test_failing_partial_callback_is_logged_by_its_function_name(
    sqlite_engine: sa.Engine, caplog: pytest.LogCaptureFixture
) -> None:
    """A robust callback that fails is logged by its function's name, not the partial's repr."""
    import functools

    registry = txguard.SessionRegistry(sqlite_engine)
    caplog.set_level(logging.ERROR, logger="txguard")
    with registry.unit_of_work():
        txguard.on_commit(functools.partial(_notify, token=SECRET), robust=True, registry=registry)
    (record,) = caplog.records
    assert "tests.test_no_secrets._notify" in record.getMessage()
    assert_clean(record.getMessage())


def test_failing_rollback_callback_is_logged_by_its_name(
    sqlite_engine: sa.Engine, caplog: pytest.LogCaptureFixture
) -> None:
    """An on_rollback callback failing while an error is in flight is logged by name too."""
    import functools

    registry = txguard.SessionRegistry(sqlite_engine)
    caplog.set_level(logging.ERROR, logger="txguard")
    with pytest.raises(KeyError), registry.unit_of_work():
        txguard.on_rollback(functools.partial(_notify, token=SECRET), registry=registry)
        raise KeyError("boom")
    (record,) = caplog.records
    assert "on_rollback callback tests.test_no_secrets._notify failed" in record.getMessage()
    assert_clean(record.getMessage())


def test_captured_callback_failure_is_logged_by_its_name(caplog: pytest.LogCaptureFixture) -> None:
    """capture_on_commit(execute=True) logs a failing robust callback by name as well."""
    import functools

    from txguard.testing import capture_on_commit

    caplog.set_level(logging.ERROR, logger="txguard")
    with capture_on_commit(execute=True):
        txguard.on_commit(
            functools.partial(_notify, token=SECRET),
            robust=True,
            registry=txguard.SessionRegistry(sa.create_engine("sqlite://")),
        )
    (record,) = caplog.records
    assert "tests.test_no_secrets._notify" in record.getMessage()
    assert_clean(record.getMessage())


OBJECT_OPTIONS: dict[str, Callable[[], object]] = {
    "registry": lambda: txguard.unit_of_work(registry=URL),  # type: ignore[arg-type]
    "rollback_for": lambda: txguard.unit_of_work(rollback_for=ValueError(SECRET)),  # type: ignore[arg-type]
    "retry_on": lambda: txguard.transactional(retry_on=SECRET),
    "backoff": lambda: txguard.transactional(backoff=SECRET),  # type: ignore[arg-type]
    "on_commit": lambda: txguard.on_commit(URL),  # type: ignore[arg-type]
    "connect registry": lambda: txguard.connect(sa.create_engine("sqlite://"), registry=URL),  # type: ignore[arg-type]
}


@pytest.mark.parametrize("call", OBJECT_OPTIONS)
def test_refused_option_values_are_named_by_type(call: str) -> None:
    """An option refused because it is an object of the wrong kind is named by its type."""
    with pytest.raises(txguard.ConfigurationError) as info:
        OBJECT_OPTIONS[call]()
    assert_clean(str(info.value))


class _Webhook:
    def __init__(self, secret: str) -> None:
        self.secret = secret

    def __repr__(self) -> str:
        return f"_Webhook(secret={self.secret!r})"

    def __call__(self) -> None:
        raise RuntimeError("the hook is down")


def test_failing_callable_object_is_logged_by_its_class_name(
    sqlite_engine: sa.Engine, caplog: pytest.LogCaptureFixture
) -> None:
    """A callable object that fails as a callback is logged by its class, not its own repr."""
    registry = txguard.SessionRegistry(sqlite_engine)
    caplog.set_level(logging.ERROR, logger="txguard")
    with registry.unit_of_work():
        txguard.on_commit(_Webhook(SECRET), robust=True, registry=registry)
    (record,) = caplog.records
    assert "tests.test_no_secrets._Webhook" in record.getMessage()
    assert_clean(record.getMessage())


def test_url_object_instead_of_an_engine_is_named_by_type() -> None:
    """A sqlalchemy URL object (whose repr keeps its query string) is named by type too."""
    url = sa.engine.make_url(f"postgresql+psycopg://app@db.example/app?password={SECRET}")
    with pytest.raises(txguard.ConfigurationError) as info:
        txguard.SessionRegistry(url)  # type: ignore[arg-type]
    assert "on a URL;" in str(info.value)
    assert_clean(str(info.value))
