"""Make SAVEPOINT and BEGIN correct on SQLite's stock drivers (pysqlite, aiosqlite).

In its legacy transaction mode the ``sqlite3`` driver emits no BEGIN before SELECT or
SAVEPOINT, so a released savepoint commits on its own and an outer rollback cannot undo
it. SQLAlchemy's documented recipe fixes this with a ``ConnectionEvents.begin`` listener
that runs ``exec_driver_sql("BEGIN")``, but one connection-event listener makes SQLAlchemy
dispatch events around every statement of the engine: measured, the recipe made each
SQLite transaction about 25 µs (40% of a ``SELECT 1`` unit) slower, in txguard's units and
in the application's own code alike.

So txguard gives the engine's dialect a ``do_begin`` (the hook SQLAlchemy calls to start
a DBAPI transaction, a no-op for SQLite) that sends BEGIN on the driver connection. The
driver is left in its legacy mode: once a transaction is open it adds no BEGIN of its own,
and its COMMIT and ROLLBACK work as before. A driver ``isolation_level`` of None means
autocommit (SQLAlchemy's ``AUTOCOMMIT``, or an application's own BEGIN recipe), and gets
no BEGIN, nor does a connection already in a transaction; ``IMMEDIATE`` or ``EXCLUSIVE``
is honoured as ``BEGIN IMMEDIATE`` and so on.

On aiosqlite every driver call is a round trip to the connection's worker thread (a
future, the worker's queue, a wake-up of the event loop: ~68,000 instructions, more than
SQLite's BEGIN and COMMIT together), and a cursor costs three (open, execute, close). A
deferred BEGIN, the default, takes no lock and so cannot fail but on a closed connection,
where the call behind it fails too: it is queued on the worker without waiting, and the
worker runs it before the first statement, in that statement's round trip. A BEGIN
IMMEDIATE or EXCLUSIVE takes the write lock and may fail on it (``database is locked``),
so it is awaited, in one round trip through aiosqlite's ``Connection.execute``.
"""

from __future__ import annotations

import sqlite3
from typing import Any, Callable

from sqlalchemy import Engine
from sqlalchemy.engine import AdaptedConnection
from sqlalchemy.engine.default import DefaultDialect

from ._sqla import queue_on_worker

__all__ = ["install_sqlite_transactions", "uses_sqlite_recipe"]

_DRIVERS = ("pysqlite", "aiosqlite", "pysqlcipher")
_TAKES_NO_LOCK = ("", "DEFERRED")  # a BEGIN that cannot fail on a lock need not be waited for


class _BeginOnDriver:
    """A SQLite dialect's ``do_begin`` that emits BEGIN where the driver would not.

    It runs on every transaction of the engine, so it does as little as it can: the
    dialect's own ``do_begin`` is chained only when it is not the default no-op, and what
    the driver class offers is learnt once per class (a ``getattr`` with a default on an
    attribute the class lacks raises and swallows an AttributeError on every call).
    """

    __slots__ = ("dialect_begin", "driver_features")

    def __init__(self, dialect_begin: Callable[[Any], None] | None) -> None:
        self.dialect_begin = dialect_begin
        self.driver_features: dict[type, tuple[bool, bool, bool]] = {}

    def __call__(self, dbapi_connection: Any) -> None:
        if self.dialect_begin is not None:
            self.dialect_begin(dbapi_connection)
        driver = dbapi_connection.dbapi_connection  # SQLAlchemy passes its pooled proxy
        level = driver.isolation_level
        if level is None:
            return  # autocommit: SQLAlchemy's AUTOCOMMIT, or the application begins
        tells_transaction, has_autocommit, adapted = (
            self.driver_features.get(type(driver)) or self._learn(driver)
        )
        if tells_transaction and driver.in_transaction:
            return  # the application's own recipe began it
        if has_autocommit and driver.autocommit is False:
            return  # Python 3.12+ PEP 249 mode: the driver already begins correctly
        statement = "BEGIN " + level if level else "BEGIN"
        if adapted:
            if level in _TAKES_NO_LOCK and queue_on_worker(driver.driver_connection, _begin):
                return
            _begin_in_one_round_trip(driver, statement)
            return
        driver.execute(statement)  # sqlite3's shortcut: its cursor is freed as it returns

    def _learn(self, driver: Any) -> tuple[bool, bool, bool]:
        features = (
            hasattr(driver, "in_transaction"),
            hasattr(driver, "autocommit"),
            isinstance(driver, AdaptedConnection),
        )
        self.driver_features[type(driver)] = features
        return features


def _begin(connection: sqlite3.Connection) -> None:
    """Begin a deferred transaction on aiosqlite's worker thread, unless one is open."""
    if not connection.in_transaction:
        connection.execute("BEGIN")


def _begin_in_one_round_trip(driver: AdaptedConnection, statement: str) -> None:
    """Send BEGIN through aiosqlite's ``Connection.execute``: one worker-thread round trip."""
    driver.run_async(lambda connection: connection.execute(statement))


def uses_sqlite_recipe(engine: Engine) -> bool:
    """Say whether txguard's BEGIN recipe is installed on ``engine``."""
    return isinstance(vars(engine.dialect).get("do_begin"), _BeginOnDriver)


def install_sqlite_transactions(engine: Engine) -> None:
    """Install the BEGIN recipe on a SQLite engine (idempotent; other dialects untouched)."""
    dialect = engine.dialect
    if dialect.name != "sqlite" or dialect.driver not in _DRIVERS:
        return
    if uses_sqlite_recipe(engine):
        return
    own = type(dialect).do_begin
    chained = None if own is DefaultDialect.do_begin else dialect.do_begin
    dialect.do_begin = _BeginOnDriver(chained)  # type: ignore[method-assign]
