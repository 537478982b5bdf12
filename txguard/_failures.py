"""Caught database errors: a statement that fails inside a unit dooms its transaction.

PostgreSQL aborts a transaction at its first failed statement and answers the COMMIT that
follows with ROLLBACK; MySQL/MariaDB and SQLite undo the failed statement only, so a COMMIT
keeps the work around it. Either way, code that catches the error and carries on would see
its unit "commit" work that is gone, or half done. So each DBAPI error raised on a
connection that a unit holds is recorded on the unit (where, which SQL, and the savepoints
it ran in), and the unit refuses to commit while a record is live. Rolling back one of
those savepoints contains the failure and drops its record; releasing one leaves the
record to the savepoint or transaction around it.

Nothing of this runs while statements succeed: a dialect-level ``handle_error`` listener
runs only when one fails, and finds the unit through the pooled connection, which a unit's
session registers when it acquires it (``after_begin``) and ``connect()`` when it opens it.
On PostgreSQL with psycopg 3 or psycopg2, the dialect's ``do_commit`` also refuses to COMMIT
a unit's transaction that the server reports as aborted, as pgjdbc does: that catches a
failure SQLAlchemy never saw, such as one on a raw DBAPI cursor.
"""

from __future__ import annotations

import weakref
from typing import TYPE_CHECKING, Any, Callable, Final, Protocol

from sqlalchemy import event

from ._errors import UnexpectedRollbackError
from ._origin import Origin, capture, shorten_sql

if TYPE_CHECKING:
    from sqlalchemy import Engine
    from sqlalchemy.engine import Connection, ExceptionContext
    from sqlalchemy.engine.interfaces import DBAPIConnection
    from sqlalchemy.orm import Session, SessionTransaction

__all__ = [
    "Failure",
    "Holder",
    "contain",
    "first_failure",
    "install_failure_tracking",
    "connection_savepoints",
    "own_connection",
    "session_savepoints",
    "track_session",
]

# A unit's pooled connection (one per checkout) -> the root unit, or the holder of a
# connect() block. Weak keys: a connection that is garbage goes back to the pool as before.
_owners: weakref.WeakKeyDictionary[Any, Holder] = weakref.WeakKeyDictionary()
_installed: weakref.WeakSet[Any] = weakref.WeakSet()  # dialects with the listener
_INERROR: Final = 3  # libpq's PQTRANS_INERROR, as psycopg 3 and psycopg2 report it
_STATUS_DRIVERS: Final = ("psycopg", "psycopg2")  # psycopg 3 (sync and async), psycopg2


class Holder(Protocol):
    """What keeps a transaction's failures: a root unit, or a ``connect()`` block's holder."""

    failures: list[Failure] | tuple[Failure, ...]

    @property
    def where(self) -> Origin: ...

    def savepoints(self, connection: Connection) -> tuple[object, ...]:
        """The savepoints a statement failing now on ``connection`` runs in, innermost first."""
        ...


class Failure:
    """A statement that failed in a unit's transaction, and the savepoints it ran in."""

    __slots__ = ("cause", "site", "sql", "savepoints")

    def __init__(
        self, cause: BaseException, site: Origin, sql: str | None, savepoints: tuple[object, ...]
    ) -> None:
        self.cause = cause
        self.site = site
        self.sql = sql
        self.savepoints = savepoints  # innermost first; rolling back any of them contains it


def track_session(session: Session, transaction: SessionTransaction, connection: Connection) -> None:
    """Register the connection a unit's session acquired (``SessionEvents.after_begin``)."""
    unit = session._txguard_unit  # type: ignore[attr-defined]  # None outside its unit
    if unit is not None:
        _owners[connection.connection] = unit


def own_connection(connection: Connection, holder: Holder) -> None:
    """Register the connection of a ``connect()`` block; ``holder`` keeps its failures."""
    dialect = connection.dialect
    if dialect not in _installed:
        install_failure_tracking(connection.engine)
    _owners[connection.connection] = holder


def install_failure_tracking(engine: Engine) -> None:
    """Listen for failed statements on ``engine``'s dialect (idempotent; every dialect)."""
    dialect = engine.dialect
    if dialect in _installed:
        return
    event.listen(engine, "handle_error", _statement_failed)
    if dialect.name == "postgresql" and dialect.driver in _STATUS_DRIVERS:
        dialect.do_commit = _RefuseAbortedCommit(dialect)  # type: ignore[method-assign]
    _installed.add(dialect)


def _statement_failed(context: ExceptionContext) -> None:
    """Record a DBAPI error raised on a unit's connection (``DialectEvents.handle_error``)."""
    cause = context.sqlalchemy_exception
    connection = context.connection
    if cause is None or connection is None or connection.closed or connection.invalidated:
        return
    holder = _owners.get(connection.connection)
    if holder is None:
        return
    compiled = getattr(context.execution_context, "compiled", None)
    # The compiled SQL, not context.statement: that has literal_execute values rendered in.
    sql = compiled.string if compiled is not None else context.statement
    savepoints = holder.savepoints(connection)
    failure = Failure(cause, capture(1), shorten_sql(sql) if sql else None, savepoints)
    holder.failures = [*holder.failures, failure]


def session_savepoints(session: Session) -> tuple[SessionTransaction, ...]:
    """The session's savepoints, innermost first; watch them for rollbacks if there are any."""
    chain = []
    transaction = session.get_nested_transaction()
    while transaction is not None:
        if transaction.nested:
            chain.append(transaction)
        transaction = transaction.parent
    if chain and not event.contains(session, "after_soft_rollback", _session_rolled_back):
        event.listen(session, "after_soft_rollback", _session_rolled_back)
    return tuple(chain)


def _session_rolled_back(session: Session, previous: SessionTransaction) -> None:
    """Drop the failures that the savepoint just rolled back contained.

    ``previous`` is the transaction ``rollback()`` was called on; what the database rolled
    back is the nearest savepoint (or the root) at or above it, as SQLAlchemy's rollback of
    a flush's subtransaction rolls back the savepoint it runs in.
    """
    boundary: SessionTransaction | None = previous
    while boundary is not None and not boundary.nested:
        boundary = boundary.parent
    unit = session._txguard_unit  # type: ignore[attr-defined]
    if boundary is not None and unit is not None:
        contain(unit, boundary)


def connection_savepoints(connection: Connection) -> tuple[object, ...]:
    """The Core savepoints of ``connection``, innermost first; watch them for rollbacks."""
    chain = []
    savepoint = connection.get_nested_transaction()
    while savepoint is not None:
        chain.append(savepoint)
        savepoint = savepoint._previous_nested  # the only record of the enclosing ones
    if chain and not event.contains(connection, "rollback_savepoint", _savepoint_rolled_back):
        event.listen(connection, "rollback_savepoint", _savepoint_rolled_back)
    return tuple(chain)


def _savepoint_rolled_back(connection: Connection, name: str, context: object) -> None:
    """Drop the failures contained by the savepoint being rolled back (the innermost)."""
    holder = _owners.get(connection.connection)
    if holder is not None:
        contain(holder, connection.get_nested_transaction())


def contain(holder: Holder, savepoint: object) -> None:
    """Forget the failures that ran inside ``savepoint``, which has been rolled back."""
    if holder.failures:
        holder.failures = [f for f in holder.failures if savepoint not in f.savepoints]


def first_failure(holder: Holder, savepoint: object = None) -> Failure | None:
    """Return the earliest live failure of ``holder`` (inside ``savepoint`` if given)."""
    for failure in holder.failures:
        if savepoint is None or savepoint in failure.savepoints:
            return failure
    return None


class _RefuseAbortedCommit:
    """A PostgreSQL dialect's ``do_commit`` that will not COMMIT a unit's aborted transaction.

    The server answers that COMMIT with ROLLBACK, and neither driver raises. This rolls
    back instead and raises ``UnexpectedRollbackError``; other connections commit as before.
    """

    __slots__ = ("commit", "rollback")

    def __init__(self, dialect: Any) -> None:
        self.commit: Callable[[DBAPIConnection], None] = dialect.do_commit
        self.rollback: Callable[[DBAPIConnection], None] = dialect.do_rollback

    def __call__(self, dbapi_connection: Any) -> None:
        holder = _owners.get(dbapi_connection)
        if holder is not None:
            info = getattr(dbapi_connection.driver_connection, "info", None)
            if getattr(info, "transaction_status", None) == _INERROR:
                self.rollback(dbapi_connection)
                raise UnexpectedRollbackError(
                    f"The unit opened at {holder.where} could not commit: PostgreSQL had "
                    "aborted its transaction after a statement failed that SQLAlchemy did not "
                    "run (one on a raw DBAPI cursor?), and would have answered COMMIT with "
                    "ROLLBACK. The transaction has been rolled back. Run statements through "
                    "the session or connection, and run one that may fail in its own "
                    "savepoint (propagation='nested')."
                )
        self.commit(dbapi_connection)
