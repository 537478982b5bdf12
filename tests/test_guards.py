"""Guards (SPEC section 6): install()/uninstall(), mixed_begin, and the seeds' patterns."""

from __future__ import annotations

import gc
import importlib.machinery
import sys
import warnings
from collections.abc import Iterator

import pytest
import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.engine import Connection
from sqlalchemy.exc import InvalidRequestError
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.pool import Pool

import txguard
import txguard._registry  # noqa: F401  (conftest's reset reaches for it; txguard loads lazily)
from tests.conftest import AsyncDatabase
from tests.helpers import names, this_line
from tests.models import Item
from txguard import _guard_connections, _guard_sessions

STRICT = dict(
    mixed_begin="error", leaks="error", cross_thread="error", cross_task="error",
    long_transaction=600,
)
LISTENERS = [
    (Session, "after_transaction_create", _guard_sessions.on_transaction_create),
    (Session, "after_transaction_end", _guard_sessions.on_transaction_end),
    (Session, "do_orm_execute", _guard_sessions.on_orm_execute),
    (Session, "before_flush", _guard_sessions.on_before_flush),
    (Pool, "checkout", _guard_connections.on_checkout),
    (Pool, "checkin", _guard_connections.on_checkin),
    (Pool, "detach", _guard_connections.on_detach),
]
ORIGINAL_SESSION_BEGIN = Session.__dict__["begin"]
ORIGINAL_CONNECTION_BEGIN = Connection.__dict__["begin"]


@pytest.fixture(autouse=True)
def _uninstall() -> Iterator[None]:
    yield
    txguard.uninstall()


@pytest.fixture
def strict() -> Iterator[None]:
    """Install every guard at "error", turn every warning into an error, and check for leaks
    (of this test: what earlier tests left for the garbage collector is collected first)."""
    gc.collect()
    txguard.install(**STRICT)
    unraisable: list[BaseException | None] = []
    previous_hook = sys.unraisablehook
    sys.unraisablehook = lambda args: unraisable.append(args.exc_value)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            yield
            gc.collect()
    finally:
        sys.unraisablehook = previous_hook
    assert unraisable == []


def where(line: int, function: str) -> str:
    """Name a line of this file as txguard's messages do."""
    return txguard._origin.describe_location(sys._getframe(1).f_code.co_filename, line, function)


# install() and uninstall()


def test_install_attaches_listeners_and_wraps_begin() -> None:
    """install() listens on Session and Pool and wraps Session.begin and Connection.begin."""
    txguard.install()
    assert all(event.contains(target, name, fn) for target, name, fn in LISTENERS)
    assert Session.__dict__["begin"] is _guard_sessions.begin
    assert Connection.__dict__["begin"] is _guard_connections.begin


def test_uninstall_leaves_no_listener_behind() -> None:
    """uninstall() removes every listener install() attached."""
    txguard.install(long_transaction=30)
    txguard.uninstall()
    assert not any(event.contains(target, name, fn) for target, name, fn in LISTENERS)


def test_uninstall_restores_the_original_begin_methods() -> None:
    """uninstall() puts SQLAlchemy's own begin functions back into the class dictionaries."""
    txguard.install()
    txguard.uninstall()
    assert Session.__dict__["begin"] is ORIGINAL_SESSION_BEGIN
    assert Connection.__dict__["begin"] is ORIGINAL_CONNECTION_BEGIN


def test_uninstall_without_install_does_nothing() -> None:
    """uninstall() is harmless when nothing is installed."""
    txguard.uninstall()
    assert Session.__dict__["begin"] is ORIGINAL_SESSION_BEGIN


def test_install_twice_reports_a_misuse_once(sqlite_engine: sa.Engine) -> None:
    """install() is idempotent: a second call attaches nothing twice."""
    txguard.install()
    txguard.install()
    with Session(sqlite_engine) as session, session.begin():
        with pytest.warns(txguard.MixedBeginWarning) as record, pytest.raises(InvalidRequestError):
            session.begin()
    assert len(record) == 1


def test_a_warning_from_code_run_as_a_string_is_shown(sqlite_engine: sa.Engine) -> None:
    """Code compiled from a string whose module has a loader without sources (pytest-xdist's
    worker, `python -m` of a frozen module) still gets its warning, at its line."""
    txguard.install()
    code = compile("session.execute(sa.text('SELECT 1'))\nsession.begin()\n", "<string>", "exec")
    namespace = {"__name__": "__main__", "__loader__": importlib.machinery.BuiltinImporter, "sa": sa}
    with Session(sqlite_engine) as session:
        namespace["session"] = session
        with pytest.warns(txguard.MixedBeginWarning) as record, pytest.raises(InvalidRequestError):
            exec(code, namespace)
    assert (record[0].filename, record[0].lineno) == ("<string>", 2)


def test_install_again_changes_levels_in_place(sqlite_engine: sa.Engine) -> None:
    """A second install() with other levels replaces the first one's."""
    txguard.install(mixed_begin="warn")
    txguard.install(mixed_begin="error")
    with Session(sqlite_engine) as session, session.begin():
        with pytest.raises(txguard.MixedBeginError):
            session.begin()


def test_guard_off_attaches_nothing_for_it() -> None:
    """A guard set to "off" costs nothing: its listeners and wrappers are not attached."""
    txguard.install(mixed_begin="off", leaks="off", cross_thread="off", cross_task="off")
    assert not any(event.contains(target, name, fn) for target, name, fn in LISTENERS)
    assert Session.__dict__["begin"] is ORIGINAL_SESSION_BEGIN


@pytest.mark.parametrize("guard", ["mixed_begin", "leaks", "cross_thread", "cross_task"])
def test_install_refuses_an_unknown_level(guard: str) -> None:
    """A level other than "off", "warn" or "error" raises ConfigurationError naming them."""
    with pytest.raises(txguard.ConfigurationError, match="'off', 'warn', 'error'"):
        txguard.install(**{guard: "loud"})


@pytest.mark.parametrize("value", [0, -1, "10", True, float("nan")])
def test_install_refuses_a_bad_long_transaction_threshold(value: object) -> None:
    """long_transaction takes seconds > 0 or None."""
    with pytest.raises(txguard.ConfigurationError, match="long_transaction"):
        txguard.install(long_transaction=value)  # type: ignore[arg-type]


def test_bad_level_leaves_the_previous_installation(sqlite_engine: sa.Engine) -> None:
    """A refused install() changes nothing."""
    txguard.install(mixed_begin="error")
    with pytest.raises(txguard.ConfigurationError):
        txguard.install(mixed_begin="loud")
    with Session(sqlite_engine) as session, session.begin():
        with pytest.raises(txguard.MixedBeginError):
            session.begin()


def test_after_uninstall_sqlalchemy_raises_as_before(sqlite_engine: sa.Engine) -> None:
    """With the guards gone, a mixed begin gets SQLAlchemy's own error and no warning."""
    txguard.install(mixed_begin="error")
    txguard.uninstall()
    with Session(sqlite_engine) as session, session.begin():
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            with pytest.raises(InvalidRequestError, match="already begun") as info:
                session.begin()
    assert not isinstance(info.value, txguard.MixedBeginError)


def test_guards_cover_sessions_made_before_install(sqlite_engine: sa.Engine) -> None:
    """Sessions from a sessionmaker created before install() are guarded too."""
    factory = sessionmaker(sqlite_engine)
    txguard.install(mixed_begin="error")
    with factory() as session, session.begin():
        with pytest.raises(txguard.MixedBeginError):
            session.begin()


# mixed_begin on sessions


def test_session_begin_after_autobegin_warns_with_origin_and_sql(engine: sa.Engine) -> None:
    """session.begin() after an autobegun query names the query's line and its SQL."""
    txguard.install(mixed_begin="warn")
    with Session(engine) as session:
        line = this_line() + 1
        session.execute(sa.select(Item).where(Item.name == "x"))
        with pytest.warns(txguard.MixedBeginWarning) as record, pytest.raises(InvalidRequestError):
            session.begin()
    message = str(record[0].message)
    assert f"autobegun at {where(line, 'test_session_begin_after_autobegin_warns_with_origin_and_sql')}" in message
    assert "by 'SELECT txg_items.id, txg_items.name FROM txg_items WHERE txg_items.name = " in message
    assert "commit()" in message and "with session.begin():" in message


def test_session_begin_after_explicit_begin_says_so(engine: sa.Engine) -> None:
    """session.begin() twice names the first begin() and suggests begin_nested()."""
    txguard.install(mixed_begin="error")
    with Session(engine) as session:
        line = this_line() + 1
        session.begin()
        with pytest.raises(txguard.MixedBeginError) as info:
            session.begin()
    message = str(info.value)
    assert f"begun explicitly at {where(line, 'test_session_begin_after_explicit_begin_says_so')}" in message
    assert "begin_nested()" in message


def test_mixed_begin_warning_points_at_the_users_line(sqlite_engine: sa.Engine) -> None:
    """The warning's file and line are the caller's begin() call, not txguard's."""
    txguard.install(mixed_begin="warn")
    with Session(sqlite_engine) as session:
        session.execute(sa.text("SELECT 1"))
        with pytest.warns(txguard.MixedBeginWarning) as record, pytest.raises(InvalidRequestError):
            line = this_line() + 1
            session.begin()
    assert (record[0].filename, record[0].lineno) == (__file__, line)


def test_mixed_begin_warn_lets_sqlalchemy_raise(sqlite_engine: sa.Engine) -> None:
    """At "warn" the warning comes first, then SQLAlchemy's own InvalidRequestError."""
    txguard.install(mixed_begin="warn")
    with Session(sqlite_engine) as session, session.begin():
        with pytest.warns(txguard.MixedBeginWarning), pytest.raises(InvalidRequestError) as info:
            session.begin()
    assert "already begun" in str(info.value)


def test_mixed_begin_error_is_an_invalid_request_error(sqlite_engine: sa.Engine) -> None:
    """MixedBeginError is caught by existing `except InvalidRequestError` clauses."""
    txguard.install(mixed_begin="error")
    with Session(sqlite_engine) as session, session.begin():
        with pytest.raises(InvalidRequestError) as info:
            session.begin()
    assert isinstance(info.value, txguard.MixedBeginError)


def test_mixed_begin_never_quotes_parameter_values(engine: sa.Engine) -> None:
    """The autobegin's SQL is quoted with placeholders, never the bound values."""
    txguard.install(mixed_begin="error")
    with Session(engine) as session:
        session.execute(sa.text("SELECT :secret AS s"), {"secret": "hunter2-password"})
        session.execute(sa.select(Item).where(Item.name == "hunter2-name"))
        with pytest.raises(txguard.MixedBeginError) as info:
            session.begin()
    message = str(info.value)
    assert "SELECT :secret AS s" in message
    assert "hunter2" not in message


def test_session_autobegun_by_add_names_the_add(engine: sa.Engine) -> None:
    """A transaction autobegun by session.add() is traced to that line (no SQL ran yet)."""
    txguard.install(mixed_begin="error")
    with Session(engine) as session:
        line = this_line() + 1
        session.add(Item(name="a"))
        with pytest.raises(txguard.MixedBeginError) as info:
            session.begin()
    assert f"autobegun at {where(line, 'test_session_autobegun_by_add_names_the_add')}" in str(info.value)


def test_begin_nested_inside_a_transaction_is_not_mixed(engine: sa.Engine) -> None:
    """begin_nested() (a SAVEPOINT) inside an active transaction is correct use."""
    txguard.install(**STRICT)
    with Session(engine) as session, session.begin():
        session.add(Item(name="outer"))
        with session.begin_nested():
            session.add(Item(name="inner"))
    assert names(engine) == ["inner", "outer"]


async def test_async_session_begin_after_autobegin_is_caught(async_db: AsyncDatabase) -> None:
    """AsyncSession.begin() after an autobegun execute is caught on the sync side."""
    from sqlalchemy.ext.asyncio import AsyncSession

    txguard.install(mixed_begin="error")
    async with AsyncSession(async_db.engine) as session:
        line = this_line() + 1
        await session.execute(sa.text("SELECT 1"))
        with pytest.raises(txguard.MixedBeginError) as info:
            async with session.begin():
                pass
    assert f"autobegun at {where(line, 'test_async_session_begin_after_autobegin_is_caught')} by 'SELECT 1'" in str(info.value)


# mixed_begin on connections


def test_connection_begin_after_autobegin_warns_with_origin_and_sql(engine: sa.Engine) -> None:
    """conn.begin() after an autobegun execute names the execute's line and its SQL."""
    txguard.install(mixed_begin="warn")
    with engine.connect() as conn:
        line = this_line() + 1
        conn.execute(sa.insert(Item).values(name="x"))
        with pytest.warns(txguard.MixedBeginWarning) as record, pytest.raises(InvalidRequestError):
            conn.begin()
        conn.rollback()
    message = str(record[0].message)
    assert f"autobegun at {where(line, 'test_connection_begin_after_autobegin_warns_with_origin_and_sql')} by 'INSERT INTO txg_items (name) VALUES (" in message
    assert "conn.commit()" in message and "with conn.begin():" in message


def test_a_commit_as_you_go_blocks_autobegin_is_named_as_one(engine: sa.Engine) -> None:
    """The block's connection begins through txguard (its transactions tell the block how
    they end): the guard still sees the statement's autobegin behind it."""
    txguard.install(mixed_begin="warn")
    with txguard.connect(engine, mode="commit_as_you_go") as conn:
        line = this_line() + 1
        conn.execute(sa.insert(Item).values(name="x"))
        with pytest.warns(txguard.MixedBeginWarning) as record, pytest.raises(InvalidRequestError):
            conn.begin()
        conn.rollback()
    message = str(record[0].message)
    assert f"autobegun at {where(line, 'test_a_commit_as_you_go_blocks_autobegin_is_named_as_one')} by 'INSERT INTO txg_items (name) VALUES (" in message


def test_connection_begin_after_explicit_begin_says_so(engine: sa.Engine) -> None:
    """conn.begin() twice names the first begin()."""
    txguard.install(mixed_begin="error")
    with engine.connect() as conn:
        line = this_line() + 1
        conn.begin()
        with pytest.raises(txguard.MixedBeginError) as info:
            conn.begin()
    assert f"begun explicitly at {where(line, 'test_connection_begin_after_explicit_begin_says_so')}" in str(info.value)


def test_connection_begin_after_driver_sql_quotes_it(engine: sa.Engine) -> None:
    """An autobegin by exec_driver_sql() quotes that SQL."""
    txguard.install(mixed_begin="error")
    with engine.connect() as conn:
        conn.exec_driver_sql("SELECT 42")
        with pytest.raises(txguard.MixedBeginError, match="by 'SELECT 42'"):
            conn.begin()


def test_connection_mixed_begin_never_quotes_parameter_values(engine: sa.Engine) -> None:
    """A Connection's autobegin SQL keeps its placeholders and drops the values."""
    txguard.install(mixed_begin="error")
    with engine.connect() as conn:
        conn.execute(sa.insert(Item).values(name="hunter2-secret"))
        with pytest.raises(txguard.MixedBeginError) as info:
            conn.begin()
        conn.rollback()
    assert "INSERT INTO txg_items" in str(info.value)
    assert "hunter2" not in str(info.value)


def test_begin_on_a_sessions_connection_names_the_session(engine: sa.Engine) -> None:
    """conn.begin() on session.connection() says the Session owns the transaction."""
    txguard.install(mixed_begin="error")
    with Session(engine) as session:
        line = this_line() + 1
        conn = session.connection()
        with pytest.raises(txguard.MixedBeginError) as info:
            conn.begin()
    message = str(info.value)
    assert "Session that owns it" in message
    assert where(line, "test_begin_on_a_sessions_connection_names_the_session") in message


async def test_async_connection_begin_after_autobegin_is_caught(async_db: AsyncDatabase) -> None:
    """AsyncConnection.begin() after an autobegun execute is caught."""
    txguard.install(mixed_begin="error")
    async with async_db.engine.connect() as conn:
        line = this_line() + 1
        await conn.execute(sa.text("SELECT 1"))
        with pytest.raises(txguard.MixedBeginError) as info:
            await conn.begin()
    assert f"autobegun at {where(line, 'test_async_connection_begin_after_autobegin_is_caught')} by 'SELECT 1'" in str(info.value)


# The correct patterns of the seed documentation run clean under every guard at "error".


def test_seed_explicit_begin_with_context_manager(engine: sa.Engine, strict: None) -> None:
    """`with session.begin():` commits at the end of the block."""
    session = Session(engine)
    with session.begin():
        session.add(Item(name="a"))
        session.add(Item(name="b"))
    session.close()
    assert names(engine) == ["a", "b"]


def test_seed_explicit_begin_then_commit_or_rollback(engine: sa.Engine, strict: None) -> None:
    """session.begin() with an explicit commit(), and one with rollback() on error."""
    session = Session(engine)
    session.begin()
    try:
        session.add(Item(name="kept"))
        session.commit()
    except Exception:
        session.rollback()
        raise
    session.begin()
    try:
        session.add(Item(name="dropped"))
        raise ValueError("boom")
    except ValueError:
        session.rollback()
    session.close()
    assert names(engine) == ["kept"]


def test_seed_autobegin_then_commit(engine: sa.Engine, strict: None) -> None:
    """Autobegin, commit, autobegin again, flush, roll back (commit as you go)."""
    session = Session(engine)
    session.add(Item(name="a"))
    session.commit()
    session.execute(sa.select(Item))
    session.add_all([Item(name="b"), Item(name="c")])
    session.commit()
    session.add(Item(name="d"))
    session.flush()
    session.rollback()
    session.close()
    assert names(engine) == ["a", "b", "c"]


def test_seed_session_context_manager_with_commits(engine: sa.Engine, strict: None) -> None:
    """`with Session(engine) as session:` with commits; the last autobegun SELECT is discarded."""
    with Session(engine) as session:
        session.add(Item(name="a"))
        session.commit()
        session.add(Item(name="b"))
        session.flush()
        session.commit()
        session.execute(sa.select(Item))
    assert names(engine) == ["a", "b"]


def test_seed_sessionmaker_then_begin(engine: sa.Engine, strict: None) -> None:
    """sessionmaker() and `with session.begin():` inside `with Session() as session:`."""
    factory = sessionmaker(engine)
    with factory() as session:
        with session.begin():
            session.add(Item(name="a"))
    assert names(engine) == ["a"]


def test_seed_sessionmaker_begin(engine: sa.Engine, strict: None) -> None:
    """`with sessionmaker.begin() as session:` commits and closes."""
    factory = sessionmaker(engine)
    with factory.begin() as session:
        session.add(Item(name="a"))
    assert names(engine) == ["a"]


def test_seed_connection_commit_as_you_go(engine: sa.Engine, strict: None) -> None:
    """engine.connect(): execute, commit; execute, roll back; execute, commit."""
    with engine.connect() as conn:
        conn.execute(sa.insert(Item), {"name": "a"})
        conn.commit()
        conn.execute(sa.insert(Item), {"name": "b"})
        conn.rollback()
        conn.execute(sa.insert(Item), {"name": "c"})
        conn.commit()
    assert names(engine) == ["a", "c"]


def test_seed_connection_begin_after_commit(engine: sa.Engine, strict: None) -> None:
    """Begin once, then commit as you go, then begin once again, on one connection."""
    with engine.connect() as conn:
        with conn.begin():
            conn.execute(sa.insert(Item), {"name": "a"})
        conn.execute(sa.insert(Item), {"name": "b"})
        conn.commit()
        with conn.begin():
            conn.execute(sa.insert(Item), {"name": "c"})
    assert names(engine) == ["a", "b", "c"]


def test_seed_engine_begin(engine: sa.Engine, strict: None) -> None:
    """`with engine.begin() as conn:` commits and returns the connection."""
    with engine.begin() as conn:
        conn.execute(sa.insert(Item), {"name": "a"})
    assert names(engine) == ["a"]


def test_seed_session_lifecycle_with_close(engine: sa.Engine, strict: None) -> None:
    """Query, add, delete, commit, then begin() and commit again, then close (seed 1)."""
    session = Session(engine)
    session.execute(sa.select(Item)).all()
    session.add(Item(name="john"))
    session.commit()
    doomed = session.execute(sa.select(Item).filter_by(name="john")).scalar_one()
    session.delete(doomed)
    session.commit()
    session.begin()
    try:
        session.add(Item(name="jane"))
        session.commit()
    except Exception:
        session.rollback()
        raise
    session.close()
    assert names(engine) == ["jane"]


# txguard's own units never trip a guard.


def test_units_of_work_run_clean_under_every_guard(engine: sa.Engine, strict: None) -> None:
    """Begin-once, nested, requires-new and commit-as-you-go units raise no guard."""
    registry = txguard.SessionRegistry(engine)
    with registry.unit_of_work():
        with registry.unit_of_work(propagation="requires_new") as other:
            other.add(Item(name="c"))
    with registry.unit_of_work() as session:
        session.add(Item(name="a"))
        with registry.unit_of_work(propagation="nested") as inner:
            inner.add(Item(name="b"))
    with registry.unit_of_work(mode="commit_as_you_go") as session:
        session.add(Item(name="d"))
        session.commit()
    assert names(engine) == ["a", "b", "c", "d"]


def test_transactional_functions_run_clean_under_every_guard(engine: sa.Engine, strict: None) -> None:
    """@transactional functions raise no guard."""
    registry = txguard.SessionRegistry(engine)

    @registry.transactional
    def create(name: str) -> None:
        registry.current_session().add(Item(name=name))

    create("a")
    create("b")
    assert names(engine) == ["a", "b"]


def test_connect_units_run_clean_under_every_guard(engine: sa.Engine, strict: None) -> None:
    """txguard.connect() in both modes raises no guard."""
    with txguard.connect(engine) as conn:
        conn.execute(sa.insert(Item), {"name": "a"})
    with txguard.connect(engine, mode="commit_as_you_go") as conn:
        conn.execute(sa.insert(Item), {"name": "b"})
        conn.commit()
    assert names(engine) == ["a", "b"]


async def test_async_units_run_clean_under_every_guard(async_db: AsyncDatabase) -> None:
    """Async units, including their cleanup in a task of its own, raise no guard."""
    txguard.install(**STRICT)
    registry = txguard.SessionRegistry(async_db.engine)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        async with registry.unit_of_work() as session:
            session.add(Item(name="a"))
        async with registry.unit_of_work(mode="commit_as_you_go") as session:
            await session.execute(sa.select(Item))
            session.add(Item(name="b"))
            await session.commit()
        async with registry.unit_of_work(read_only=True) as session:
            rows = (await session.execute(sa.select(Item.name))).scalars().all()
    assert sorted(rows) == ["a", "b"]
