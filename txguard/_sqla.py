"""Every private SQLAlchemy (and CPython) detail txguard reads, named once.

SQLAlchemy has no public API for these; each is read here, behind a function or constant
whose docstring says what it reads and why, and ``tests/test_sqla_internals.py`` has one
named test per detail, run on SQLAlchemy 2.0.x and 2.1.x: a release that changes one
fails that test instead of silently degrading a message. ``PRIVATE_NAMES`` lists the
private names, and a test checks that no other txguard module spells them.
Where a public equivalent exists, callers use it (``Session.get_transaction()``,
``Session.in_transaction()``, ``Connection.get_transaction()``,
``Connection.get_nested_transaction()``).
"""

from __future__ import annotations

import asyncio
import sys
from functools import partial
from types import CodeType, FrameType
from typing import TYPE_CHECKING, Any, Callable, Final, NoReturn

from sqlalchemy.engine import Connection
from sqlalchemy.orm import Session, SessionTransaction
from sqlalchemy.orm import session as orm_session
from sqlalchemy.orm.session import SessionTransactionState

if TYPE_CHECKING:
    from sqlalchemy.engine import NestedTransaction, Transaction

__all__ = [
    "DIALECT_EXECUTE_HOOKS", "adopt_transaction", "ENGINE_FILE", "PQTRANS_INERROR", "PRIVATE_NAMES",
    "RECONNECT_CODE", "SESSION_CONNECT_CODE", "SESSION_FILE", "async_session_of", "autobegin_statement",
    "beginning_refused",
    "enclosing_savepoint", "held_connections", "holds_connection", "is_session_connect",
    "live_sessions", "pool_connection", "pool_record", "queue_on_worker", "running_loop",
    "commit_state",
]

PRIVATE_NAMES: Final = (
    "_connections", "_state", "_previous_nested", "_sessions", "_connection_for_bind",
    "_revalidate_connection", "_connection_record", "_dbapi_connection",
    "_retrieve_proxy_for_target", "_execute_context", "_get_running_loop", "_tx",
    "_conn", "_autobegin_t",
)

SESSION_FILE: Final = SessionTransaction.__init__.__code__.co_filename
"""The file of SQLAlchemy's ORM session code: frames from it began a Session's transaction."""

ENGINE_FILE: Final = Connection.in_transaction.__code__.co_filename
"""The file of SQLAlchemy's Core connection code: frames from it autobegin a transaction."""

SESSION_CONNECT_CODE: Final = getattr(
    SessionTransaction._connection_for_bind, "__wrapped__", SessionTransaction._connection_for_bind
).__code__
"""The code of ``SessionTransaction._connection_for_bind`` (inside SQLAlchemy's state-check
wrapper), where a Session acquires its connection: compared by identity on hot paths."""

RECONNECT_CODE: Final = Connection._revalidate_connection.__code__
"""The code by which a Connection checks a new DBAPI connection out after an invalidation."""

DIALECT_EXECUTE_HOOKS: Final = ("do_execute", "do_execute_no_params", "do_executemany")
"""The dialect methods every statement runs through (the DBAPI ``cursor.execute*`` calls).

They are public dialect methods, but wrapping them per dialect instance is txguard's only
way to see a failed statement without a per-statement event dispatch."""

PQTRANS_INERROR: Final = 3
"""libpq's ``PQTRANS_INERROR``, as psycopg 3's and psycopg2's ``info.transaction_status``
report a transaction the server has aborted; SQLAlchemy has no flag for it."""


def live_sessions() -> list[Session]:
    """Return SQLAlchemy's live sessions, newest first (``orm.session._sessions``).

    No public API lists sessions; the registry maps ids to weak references, and
    ``valuerefs()`` copies it in one step while other threads may add sessions.
    """
    found = []
    for ref in reversed(orm_session._sessions.valuerefs()):
        session = ref()
        if session is not None:
            found.append(session)
    return found


def holds_connection(transaction: SessionTransaction, connection: Connection) -> bool:
    """Say whether a Session's transaction holds ``connection`` (``_connections`` keys).

    ``SessionTransaction`` has no public view of its connections."""
    return connection in transaction._connections


def held_connections(transaction: SessionTransaction) -> list[tuple[Connection, bool]]:
    """Return the connections a Session's transaction holds, each with whether the session
    opened it and will close it (``_connections`` values: conn, transaction,
    should_commit, autoclose); each appears once, though it is keyed by engine and by itself.
    """
    seen: list[tuple[Connection, bool]] = []
    for conn, _, _, autoclose in list(transaction._connections.values()):
        if all(conn is not other for other, _ in seen):
            seen.append((conn, autoclose))
    return seen


def beginning_refused(refuse: Callable[[Session], NoReturn]) -> dict[str, Any]:
    """Return the namespace of a Session subclass whose sessions call ``refuse(session)``
    instead of beginning any transaction (by overriding ``_autobegin_t``).

    Every transaction a Session begins with none in progress goes through that method:
    autobegin by a statement or ``connection()``, ``begin()``, ``add()``, a flush,
    ``commit()``. No event runs before a Session begins one (``after_transaction_create``
    runs after), and overriding it on the classes of live sessions would cost every
    ``add()`` and flush a call.
    """

    def _autobegin_t(self: Session, begin: bool = False) -> SessionTransaction:
        refuse(self)

    return {"_autobegin_t": _autobegin_t}


def commit_state(transaction: SessionTransaction) -> str:
    """Say how far a SessionTransaction got (``_state``, no public flag says): "committed"
    (every connection committed; its ``after_commit`` listeners run next), "closed" (ended:
    after those listeners, or after a two-phase PREPARE that failed) or "open"."""
    state = transaction._state
    if state is SessionTransactionState.COMMITTED:
        return "committed"
    if state is SessionTransactionState.CLOSED:
        return "closed"
    return "open"


def enclosing_savepoint(savepoint: NestedTransaction) -> NestedTransaction | None:
    """Return the savepoint enclosing ``savepoint`` (``_previous_nested``): Core keeps only
    the innermost public (``get_nested_transaction()``)."""
    return savepoint._previous_nested


def adopt_transaction(transaction: Transaction, cls: type[Transaction]) -> None:
    """Make ``transaction`` an instance of ``cls``, a subclass of its class that adds no
    slots (``__class__`` assignment, which CPython allows between classes of one layout).

    A Connection creates its transactions itself (``Connection.begin()``, an autobegin,
    ``begin_nested()``), and only their own ``commit()``, ``rollback()``, ``close()`` and
    ``__exit__`` run after they end: the ``commit`` and ``rollback`` events fire before
    the DBAPI call, also for a COMMIT that then fails, and inside SQLAlchemy's dispatch.
    """
    transaction.__class__ = cls


def is_session_connect(code: CodeType) -> bool:
    """Say whether ``code`` is ``SessionTransaction._connection_for_bind``, where a Session
    acquires its connection (no event says a Session, not user code, began it)."""
    return code is SESSION_CONNECT_CODE or (
        code.co_name == "_connection_for_bind" and code.co_filename == SESSION_FILE
    )


def pool_record(fairy: Any) -> Any:
    """Return the pool record of a checked-out connection (``_connection_record``), or None
    once it was returned or detached; the pool has no public accessor."""
    return fairy._connection_record


def pool_connection(connection: Connection) -> Any:
    """Return a Connection's pool connection (``_dbapi_connection``) without reconnecting:
    the public ``Connection.connection`` revalidates an invalidated one."""
    return getattr(connection, "_dbapi_connection", None)


def async_session_of(session: Session) -> Any:
    """Return the AsyncSession proxying ``session``, or None, without creating one
    (``AsyncSession._retrieve_proxy_for_target``); only named when asyncio is loaded."""
    module = sys.modules.get("sqlalchemy.ext.asyncio.session")
    if module is None:
        return None
    return module.AsyncSession._retrieve_proxy_for_target(session, regenerate=False)


def autobegin_statement(frame: FrameType | None) -> str | None:
    """Return the SQL that ``Connection._execute_context`` (its ``statement`` local) is
    about to run, if ``frame`` is that call; no event tells it without a per-statement
    dispatch."""
    if frame is None or frame.f_code.co_name != "_execute_context":
        return None
    statement = frame.f_locals.get("statement")
    if isinstance(statement, str):
        return statement
    text = getattr(statement, "string", None)  # a Compiled: the SQL with placeholders
    return text if isinstance(text, str) else None


def running_loop() -> asyncio.AbstractEventLoop | None:
    """Return the running event loop or None (CPython's ``asyncio._get_running_loop``):
    the public ``get_running_loop()`` raises instead, which costs more on hot paths."""
    return asyncio._get_running_loop()


def queue_on_worker(driver: Any, function: Callable[[Any], object]) -> bool:
    """Queue ``function(sqlite3_connection)`` on an aiosqlite connection's worker thread
    without waiting for it (``aiosqlite.Connection._tx`` and ``_conn``, which SQLAlchemy's
    aiosqlite adapter also uses directly); return False, having queued nothing, if
    ``driver`` has no such queue or is older than aiosqlite 0.22.1.

    The worker runs what is queued in order, so ``function`` runs before the next call
    anyone makes on the connection; its result and any error it raises are dropped."""
    queue = getattr(driver, "_tx", None)
    # Before aiosqlite 0.22.1 (which added stop(), the other caller that queues no future)
    # the worker fails on a call queued without a future, and stops.
    if queue is None or not hasattr(driver, "stop"):
        return False
    queue.put_nowait((None, partial(_on_sqlite_connection, function, driver)))
    return True


def _on_sqlite_connection(function: Callable[[Any], object], driver: Any) -> None:
    function(driver._conn)  # read on the worker: the call behind fails too if it is closed
