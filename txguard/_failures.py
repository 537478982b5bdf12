"""Caught database errors: a statement that fails inside a unit dooms its transaction.

PostgreSQL aborts a transaction at its first failed statement and answers the COMMIT that
follows with ROLLBACK; MySQL/MariaDB and SQLite undo the failed statement only, so a COMMIT
keeps the work around it. Either way, code that catches the error and carries on would see
its unit "commit" work that is gone, or half done. So each DBAPI error raised by a
statement on a connection that a unit holds is recorded on the unit (where, which SQL,
and the savepoints it ran in), and the unit refuses to commit while a record is live.
Rolling back one of those savepoints contains the failure and drops its record; releasing
one leaves the record to the savepoint or transaction around it.

The record is made by the dialect's ``do_execute``, ``do_execute_no_params`` and
``do_executemany``, wrapped here (the hooks SQLAlchemy runs a statement through), and the
unit is looked up only when a statement fails. SQLAlchemy's ``handle_error`` event would
be the documented hook, but a dialect-level listener makes every statement of the engine
iterate the dialect's empty ``do_execute*`` listener collections: measured with
callgrind, ~2,400 instructions per successful statement (0.4% of a ``SELECT 1`` unit),
against ~500 for the wrapper. A connection's session is not linked to it in SQLAlchemy,
and registering each one as it is acquired (``after_begin``) cost another ~6,500
instructions per unit, so a failure searches SQLAlchemy's registry of live sessions.

A failure SQLAlchemy never saw (one on a raw DBAPI cursor) is caught on PostgreSQL with
psycopg 3 and psycopg2: before a unit commits, the driver's transaction status says
whether the server aborted the transaction, as pgjdbc checks the COMMIT's reply.

The private SQLAlchemy state this needs (the registry of live sessions, the connections of
a session's transaction, the savepoint around a savepoint) is read here and nowhere else.
"""

from __future__ import annotations

import weakref
from typing import TYPE_CHECKING, Any, Callable, Final, Protocol

from sqlalchemy import event
from sqlalchemy.engine import Connection, ExecutionContext, NestedTransaction
from sqlalchemy.exc import DBAPIError

from ._errors import DisciplineError, UnexpectedRollbackError
from ._options import Mode
from ._origin import Origin, capture, shorten_sql
from ._statements import ENDS_FIRST, ends_transaction
from ._sqla import (
    DIALECT_EXECUTE_HOOKS,
    PQTRANS_INERROR,
    adopt_transaction,
    enclosing_savepoint,
    held_connections,
    holds_connection,
    live_sessions,
)

if TYPE_CHECKING:
    from sqlalchemy import Engine
    from sqlalchemy.engine.interfaces import Dialect
    from sqlalchemy.orm import Session, SessionTransaction

__all__ = [
    "Failure",
    "Holder",
    "aborted",
    "aborted_error",
    "connection_savepoints",
    "contain",
    "first_failure",
    "install_failure_tracking",
    "own_connection",
    "rolled_back",
    "session_savepoints",
]

_STATUS_DRIVERS: Final = ("psycopg", "psycopg2")  # psycopg 3 (sync and async), psycopg2
_WRAPPED: Final = DIALECT_EXECUTE_HOOKS
# The connection of each connect() block -> its holder. Weak keys: a connection that is
# garbage goes back to the pool as before.
_holders: weakref.WeakKeyDictionary[Connection, Holder] = weakref.WeakKeyDictionary()
_tracked: weakref.WeakSet[Dialect] = weakref.WeakSet()  # dialects with the wrappers
_status_dialects: weakref.WeakSet[Dialect] = weakref.WeakSet()
_check_status = False  # whether any dialect above is in use: SQLite units skip the check


class Holder(Protocol):
    """What keeps a transaction's failures: a unit's root ``Transaction``, or a ``connect()``
    block's holder."""

    failures: list[Failure] | tuple[Failure, ...]
    mode: Mode
    where: Origin  # where the unit or the connect() block was opened

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


def install_failure_tracking(engine: Engine) -> None:
    """Wrap ``engine``'s dialect so that failed statements are recorded (idempotent)."""
    global _check_status
    dialect = engine.dialect
    if dialect in _tracked:
        return
    for name in _WRAPPED:
        wrapper = _wrap(getattr(dialect, name), dialect, params=name != "do_execute_no_params")
        setattr(dialect, name, wrapper)
    _tracked.add(dialect)
    if dialect.name == "postgresql" and dialect.driver in _STATUS_DRIVERS:
        _status_dialects.add(dialect)
        _check_status = True


def own_connection(connection: Connection, holder: Holder) -> None:
    """Register the connection of a ``connect()`` block; ``holder`` keeps its failures."""
    install_failure_tracking(connection.engine)
    _holders[connection] = holder


def _wrap(execute: Callable[..., None], dialect: Dialect, params: bool) -> Callable[..., None]:
    """Return a dialect's ``do_execute*`` that records a failed statement on its unit.

    It runs on every statement of the engine, so it is a closure (a call through an
    object's ``__call__`` measured three times dearer) that only adds a ``try``; the
    search for the unit waits until a statement fails.
    """
    dbapi_error: type[Exception] = dialect.loaded_dbapi.Error  # what SQLAlchemy wraps

    if not params:

        def do_execute_no_params(
            cursor: Any, statement: str, context: ExecutionContext | None = None
        ) -> None:
            if (statement[:1] in ENDS_FIRST or ";" in statement) and context is not None:
                _refuse_sql_end(statement, context)
            try:
                execute(cursor, statement, context)
            except dbapi_error as error:
                if context is not None:
                    _statement_failed(error, statement, context)
                raise

        return do_execute_no_params

    def do_execute(
        cursor: Any, statement: str, parameters: Any, context: ExecutionContext | None = None
    ) -> None:
        if (statement[:1] in ENDS_FIRST or ";" in statement) and context is not None:
            _refuse_sql_end(statement, context)
        try:
            execute(cursor, statement, parameters, context)
        except dbapi_error as error:
            if context is not None:
                _statement_failed(error, statement, context)
            raise

    return do_execute


def _refuse_sql_end(statement: str, context: ExecutionContext) -> None:
    """Refuse SQL that would end a begin-once unit's transaction behind its back.

    The server would commit (or roll back) while the unit, and SQLAlchemy, still take the
    transaction for open: what follows would run outside it and the unit's rollback would
    undo nothing before the COMMIT. Raised before the statement reaches the server.
    """
    verb = ends_transaction(statement)
    if verb is None:
        return
    connection = context.root_connection
    holder = _holders.get(connection)
    if holder is None:
        holder = _unit_of(connection)
    if holder is None or holder.mode is not Mode.BEGIN_ONCE:
        return
    raise DisciplineError(
        f"{verb} sent as SQL at {capture(1)}, inside the "
        f"begin-once unit opened at {holder.where}: the server would end the transaction "
        "while the unit still owns it, and the unit's rollback could no longer undo what "
        "ran before. Remove the statement: the unit commits when its block ends and rolls "
        "back if an exception leaves it; use a savepoint (begin_nested() or "
        "propagation='nested') to undo part of the work, or open the unit with "
        "mode='commit_as_you_go' and call commit()."
    )


def _statement_failed(error: Exception, statement: str, context: ExecutionContext) -> None:
    connection = context.root_connection
    holder = _holders.get(connection)
    if holder is None:
        holder = _unit_of(connection)
    if holder is None:
        return
    compiled = context.compiled
    # The compiled SQL, not ``statement``: that has literal_execute values rendered in.
    sql = compiled.string if compiled is not None else statement
    # SQLAlchemy wraps ``error`` once this returns, in an exception no hook sees; an equal
    # one (its class, statement and driver error; no parameters) is the failure's cause.
    dialect = context.dialect
    cause = DBAPIError.instance(
        sql, None, error, dialect.loaded_dbapi.Error, hide_parameters=True, dialect=dialect
    )
    savepoints = holder.savepoints(connection)
    failure = Failure(cause, capture(1), shorten_sql(sql) if sql else None, savepoints)
    holder.failures = [*holder.failures, failure]


def _unit_of(connection: Connection) -> Holder | None:
    """Return the unit whose session holds ``connection``: SQLAlchemy's live sessions are
    searched, newest first (a session a unit opened carries its unit while it runs)."""
    # valuerefs() copies the registry in one step: other threads may add sessions meanwhile.
    for session in live_sessions():
        unit = vars(session).get("_txguard_unit")
        if unit is not None:
            root = session.get_transaction()
            if root is not None and holds_connection(root, connection):
                holder: Holder = unit.transaction
                return holder
    return None


def session_savepoints(session: Session) -> tuple[object, ...]:
    """The session's savepoints, innermost first; watch them for rollbacks if there are any.

    Those of the session's own (``session.begin_nested()``), then the Core savepoints open
    on its connections (``session.connection().begin_nested()``, which the session does
    not know about; each of its own savepoints has one there too).
    """
    chain: list[object] = []
    transaction = session.get_nested_transaction()
    while transaction is not None:
        if transaction.nested:
            chain.append(transaction)
        transaction = transaction.parent
    if chain and not event.contains(session, "after_soft_rollback", _session_rolled_back):
        event.listen(session, "after_soft_rollback", _session_rolled_back)
    root = session.get_transaction()
    if root is not None:
        for connection, _ in held_connections(root):
            savepoint = connection.get_nested_transaction()
            while savepoint is not None:
                if type(savepoint) is NestedTransaction:
                    adopt_transaction(savepoint, _WatchedSavepoint)
                chain.append(savepoint)
                savepoint = enclosing_savepoint(savepoint)
    return tuple(chain)


# The savepoints that ``session_savepoints`` watched and that have been rolled back: kept
# as long as a failure or a callback registered in one of them refers to it.
_rolled_back_savepoints: weakref.WeakSet[object] = weakref.WeakSet()


class _WatchedSavepoint(NestedTransaction):
    """A Core savepoint on a unit's session connection that a callback or a failure was
    recorded in: its rollback is remembered (its ``rollback_savepoint`` event would cost
    every statement of the connection an event dispatch, as in ``_connect``)."""

    __slots__ = ()

    def rollback(self) -> None:
        undone = self.is_active
        try:
            super().rollback()
        finally:
            if undone:
                _core_savepoint_rolled_back(self)

    def close(self) -> None:
        undone = self.is_active
        try:
            super().close()
        finally:
            if undone:
                _core_savepoint_rolled_back(self)


def _core_savepoint_rolled_back(savepoint: NestedTransaction) -> None:
    """Remember ``savepoint`` as rolled back and drop the failures it contained."""
    _rolled_back_savepoints.add(savepoint)
    holder = _unit_of(savepoint.connection)
    if holder is not None:
        contain(holder, savepoint)


def rolled_back(savepoints: tuple[object, ...]) -> bool:
    """Say whether one of ``savepoints`` (``session_savepoints``' answer) has rolled back."""
    return any(savepoint in _rolled_back_savepoints for savepoint in savepoints)


def _session_rolled_back(session: Session, previous: SessionTransaction) -> None:
    """Drop the failures that the savepoint just rolled back contained, and remember it.

    ``previous`` is the transaction ``rollback()`` was called on; what the database rolled
    back is the nearest savepoint (or the root) at or above it, as SQLAlchemy's rollback of
    a flush's subtransaction rolls back the savepoint it runs in.
    """
    boundary: SessionTransaction | None = previous
    while boundary is not None and not boundary.nested:
        boundary = boundary.parent
    if boundary is None:
        return
    _rolled_back_savepoints.add(boundary)
    unit = vars(session).get("_txguard_unit")
    if unit is not None:
        contain(unit.transaction, boundary)


def connection_savepoints(connection: Connection) -> tuple[object, ...]:
    """The Core savepoints of ``connection``, innermost first; watch them for rollbacks."""
    chain = []
    savepoint = connection.get_nested_transaction()
    while savepoint is not None:
        chain.append(savepoint)
        savepoint = enclosing_savepoint(savepoint)
    if chain and not event.contains(connection, "rollback_savepoint", _savepoint_rolled_back):
        event.listen(connection, "rollback_savepoint", _savepoint_rolled_back)
    return tuple(chain)


def _savepoint_rolled_back(connection: Connection, name: str, context: object) -> None:
    """Drop the failures contained by the savepoint being rolled back (the innermost)."""
    holder = _holders.get(connection)
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


def aborted(transaction: SessionTransaction | Connection | None) -> bool:
    """Say whether the server has aborted the transaction of a session (or a connection).

    Only psycopg 3 and psycopg2 tell (``info.transaction_status``); elsewhere this is False.
    """
    if not _check_status or transaction is None:
        return False
    if isinstance(transaction, Connection):
        connections = [transaction]
    else:
        connections = [conn for conn, _ in held_connections(transaction)]
    for connection in connections:
        if connection.dialect in _status_dialects and not connection.closed:
            info = getattr(connection.connection.driver_connection, "info", None)
            if getattr(info, "transaction_status", None) == PQTRANS_INERROR:
                return True
    return False


def aborted_error(refused: str) -> UnexpectedRollbackError:
    """Say that PostgreSQL aborted a transaction after a failure SQLAlchemy did not see."""
    return UnexpectedRollbackError(
        f"{refused}: PostgreSQL had aborted its transaction after a statement failed that "
        "SQLAlchemy did not run (one on a raw DBAPI cursor?), and would have answered "
        "COMMIT with ROLLBACK; the transaction has been rolled back. Run statements through "
        "the session or connection, and one that may fail in its own savepoint "
        "(propagation='nested')."
    )
