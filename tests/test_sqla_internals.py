"""Each private SQLAlchemy/CPython detail txguard reads (``txguard/_sqla.py``) still holds.

One test per detail, on SQLite memory, so that a SQLAlchemy release that changes one fails
the test named for it instead of silently degrading a message. Run on 2.0.x and 2.1.x.
"""

from __future__ import annotations

import asyncio
import re
import sqlite3
import sys
import threading
from typing import Any, NoReturn
from pathlib import Path

import pytest
import sqlalchemy as sa
from sqlalchemy.engine import NestedTransaction, RootTransaction
from sqlalchemy.orm import Session, SessionTransaction

from tests.models import Item
from txguard import _sqla

PACKAGE = Path(_sqla.__file__).parent


@pytest.fixture
def engine() -> sa.Engine:
    return sa.create_engine("sqlite://")


def test_live_sessions_lists_a_new_session_first(engine: sa.Engine) -> None:
    """``orm.session._sessions`` still holds every live Session, newest last."""
    older, newer = Session(engine), Session(engine)
    found = _sqla.live_sessions()
    assert found.index(newer) < found.index(older)


def test_held_connections_are_the_transactions_connections(engine: sa.Engine) -> None:
    """``SessionTransaction._connections`` still maps to (conn, transaction, should_commit, autoclose)."""
    with Session(engine) as session:
        connection = session.connection()
        transaction = session.get_transaction()
        assert transaction is not None
        assert _sqla.held_connections(transaction) == [(connection, True)]
        assert _sqla.holds_connection(transaction, connection)


def test_a_session_bound_to_a_connection_does_not_close_it(engine: sa.Engine) -> None:
    """The autoclose flag is False for a connection the Session was given."""
    with engine.connect() as connection, Session(bind=connection) as session:
        session.execute(sa.text("select 1"))
        transaction = session.get_transaction()
        assert transaction is not None
        assert [autoclose for _, autoclose in _sqla.held_connections(transaction)] == [False]


def test_beginning_refused_stops_every_way_a_session_begins(engine: sa.Engine) -> None:
    """``Session._autobegin_t`` is still where a statement, ``connection()``, ``begin()``,
    ``add()``, a flush and ``commit()`` begin a transaction when none is in progress."""

    class Refused(Exception):
        pass

    def refuse(session: Session) -> NoReturn:
        raise Refused(session)

    sealed = type("Sealed", (Session,), _sqla.beginning_refused(refuse))
    uses = [
        lambda s: s.execute(sa.text("select 1")), lambda s: s.scalar(sa.select(Item.id)),
        lambda s: s.connection(), lambda s: s.begin(), lambda s: s.add(Item(name="a")),
        lambda s: s.commit(), lambda s: s.begin_nested(),
    ]
    for use in uses:
        session = sealed(engine)
        with pytest.raises(Refused):
            use(session)
        assert session.get_transaction() is None
    session = sealed(engine)
    session.flush()  # nothing to flush begins nothing
    session.rollback()
    session.close()


def test_commit_state_tells_a_commit_went_through(engine: sa.Engine) -> None:
    """``SessionTransaction._state`` is still a SessionTransactionState: "open" before the
    COMMIT, "committed" in an ``after_commit`` listener, "closed" once it has ended."""
    session = Session(engine)
    session.begin()
    transaction = session.get_transaction()
    assert transaction is not None
    assert _sqla.commit_state(transaction) == "open"
    seen: list[str] = []
    sa.event.listen(session, "after_commit", lambda s: seen.append(_sqla.commit_state(transaction)))
    session.commit()
    assert seen == ["committed"]
    assert _sqla.commit_state(transaction) == "closed"


def test_enclosing_savepoint_links_nested_savepoints(engine: sa.Engine) -> None:
    """``NestedTransaction._previous_nested`` still links a savepoint to the enclosing one."""
    with engine.connect() as connection:
        outer = connection.begin_nested()
        inner = connection.begin_nested()
        assert _sqla.enclosing_savepoint(inner) is outer
        assert _sqla.enclosing_savepoint(outer) is None


def test_adopted_transactions_end_through_their_own_methods(engine: sa.Engine) -> None:
    """A RootTransaction or NestedTransaction still takes a slot-less subclass, and every
    way SQLAlchemy ends one calls that subclass's commit(), rollback(), close(), __exit__."""
    calls: list[str] = []

    class Root(RootTransaction):
        __slots__ = ()

        def commit(self) -> None:
            calls.append("commit")
            super().commit()

        def rollback(self) -> None:
            calls.append("rollback")
            super().rollback()

        def close(self) -> None:
            calls.append("close")
            super().close()

        def __exit__(self, *exc: Any) -> None:
            calls.append("exit")
            super().__exit__(*exc)

    class Savepoint(NestedTransaction):
        __slots__ = ()

        def rollback(self) -> None:
            calls.append("savepoint rollback")
            super().rollback()

    connection = engine.connect()
    _sqla.adopt_transaction(connection.begin(), Root)
    assert isinstance(connection.get_transaction(), Root)
    connection.commit()
    _sqla.adopt_transaction(connection.begin(), Root)
    connection.rollback()
    transaction = connection.begin()
    _sqla.adopt_transaction(transaction, Root)  # before `with` looks its __exit__ up
    with transaction:
        savepoint = connection.begin_nested()
        _sqla.adopt_transaction(savepoint, Savepoint)
        savepoint.rollback()
    _sqla.adopt_transaction(connection.begin(), Root)
    connection.close()
    assert calls == ["commit", "rollback", "savepoint rollback", "exit", "commit", "close"]


def test_session_connect_code_is_where_a_session_acquires_its_connection(
    engine: sa.Engine,
) -> None:
    """``SessionTransaction._connection_for_bind`` is still the frame that checks out."""
    seen: list[bool] = []

    @sa.event.listens_for(engine, "engine_connect")
    def look(connection: sa.Connection) -> None:
        frame = sys._getframe(1)
        while frame is not None and not _sqla.is_session_connect(frame.f_code):
            frame = frame.f_back  # type: ignore[assignment]
        seen.append(frame is not None and frame.f_code is _sqla.SESSION_CONNECT_CODE)

    with Session(engine) as session:
        session.execute(sa.text("select 1"))
    assert seen == [True]


def test_session_and_engine_files_are_sqlalchemys() -> None:
    """The files named for session and engine code are SQLAlchemy's orm/session.py and engine/base.py."""
    assert Path(_sqla.SESSION_FILE).parts[-2:] == ("orm", "session.py")
    assert Path(_sqla.ENGINE_FILE).parts[-2:] == ("engine", "base.py")


def test_reconnect_code_is_a_connection_method() -> None:
    """``Connection._revalidate_connection`` still exists in the engine's file."""
    assert _sqla.RECONNECT_CODE.co_filename == _sqla.ENGINE_FILE


def test_pool_record_goes_when_the_connection_is_returned(engine: sa.Engine) -> None:
    """``_ConnectionFairy._connection_record`` is set while checked out, None after."""
    connection = engine.connect()
    fairy = _sqla.pool_connection(connection)
    assert fairy is connection.connection
    assert _sqla.pool_record(fairy) is not None
    connection.close()
    assert _sqla.pool_record(fairy) is None


def test_async_session_of_finds_the_proxy(engine: sa.Engine) -> None:
    """``AsyncSession._retrieve_proxy_for_target`` still finds an AsyncSession's proxy."""
    ext = pytest.importorskip("sqlalchemy.ext.asyncio")
    proxied = ext.AsyncSession(ext.create_async_engine("sqlite+aiosqlite://"))
    assert _sqla.async_session_of(proxied.sync_session) is proxied
    assert _sqla.async_session_of(Session(engine)) is None


def test_autobegin_statement_is_read_from_execute_context(engine: sa.Engine) -> None:
    """``Connection._execute_context``'s ``statement`` local still holds the SQL at autobegin."""
    seen: list[str | None] = []

    @sa.event.listens_for(engine, "begin")
    def look(connection: sa.Connection) -> None:
        frame = sys._getframe(1)
        while frame is not None and frame.f_code.co_name != "_execute_context":
            frame = frame.f_back  # type: ignore[assignment]
        seen.append(_sqla.autobegin_statement(frame))

    with engine.connect() as connection:
        connection.execute(sa.text("select 42"))
    assert seen == ["select 42"]


def test_dialect_execute_hooks_exist(engine: sa.Engine) -> None:
    """The dialect still runs statements through ``do_execute*`` methods."""
    assert all(callable(getattr(engine.dialect, name)) for name in _sqla.DIALECT_EXECUTE_HOOKS)


def test_pqtrans_inerror_is_psycopgs_failed_status() -> None:
    """psycopg reports an aborted transaction as ``TransactionStatus.INERROR`` == 3."""
    psycopg = pytest.importorskip("psycopg")
    assert psycopg.pq.TransactionStatus.INERROR == _sqla.PQTRANS_INERROR


def test_running_loop_is_none_outside_and_the_loop_inside() -> None:
    """CPython's ``asyncio._get_running_loop`` returns None outside a loop, the loop inside."""
    assert _sqla.running_loop() is None

    async def inside() -> bool:
        return _sqla.running_loop() is asyncio.get_running_loop()

    assert asyncio.run(inside())


def test_queue_on_worker_runs_on_aiosqlites_worker_in_order() -> None:
    """aiosqlite's ``Connection._tx`` queue and ``_conn`` still run a queued call on the
    worker thread, before the calls queued after it."""
    aiosqlite = pytest.importorskip("aiosqlite")
    if not hasattr(aiosqlite.Connection, "stop"):
        pytest.skip("before aiosqlite 0.22.1 nothing is queued (a call needs a future)")
    ran: list[tuple[bool, int]] = []

    async def main() -> int:
        async with aiosqlite.connect(":memory:") as connection:
            caller = threading.get_ident()

            def first(sqlite_connection: sqlite3.Connection) -> None:
                ran.append((isinstance(sqlite_connection, sqlite3.Connection),
                            threading.get_ident() - caller))
                sqlite_connection.execute("CREATE TABLE t (x)")

            assert _sqla.queue_on_worker(connection, first)
            async with connection.execute("SELECT count(*) FROM t") as cursor:
                (count,) = await cursor.fetchone()
            return int(count)

    assert asyncio.run(main()) == 0
    assert len(ran) == 1 and ran[0][0] and ran[0][1] != 0
    assert not _sqla.queue_on_worker(object(), lambda connection: None)


def test_sqlalchemy_generated_code_is_named_by_its_module() -> None:
    """SQLAlchemy's generated wrappers have a ``<...>`` file name and a SQLAlchemy module."""
    code = SessionTransaction._connection_for_bind.__code__  # the state-check wrapper
    assert code.co_filename.startswith("<") or code.co_filename == _sqla.SESSION_FILE


def test_no_other_module_names_a_private_detail() -> None:
    """Only ``_sqla.py`` spells the private SQLAlchemy/CPython names it lists."""
    pattern = re.compile(r"\w\.(%s)\b" % "|".join(_sqla.PRIVATE_NAMES))  # not `from ._x`
    found = [
        f"{path.name}:{number}"
        for path in sorted(PACKAGE.glob("*.py"))
        if path.name != "_sqla.py"
        for number, line in enumerate(path.read_text().splitlines(), 1)
        if pattern.search(line.split("#")[0]) and not line.lstrip().startswith(("from ", "import "))
    ]
    assert found == []
