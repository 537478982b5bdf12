"""Make SAVEPOINT and BEGIN correct on SQLite's stock drivers (pysqlite, aiosqlite).

In its legacy transaction mode the ``sqlite3`` driver emits no BEGIN before SELECT or
SAVEPOINT, so a released savepoint commits on its own and an outer rollback cannot undo
it. We install SQLAlchemy's documented recipe on every SQLite engine txguard is given:
the driver's own BEGIN is disabled and SQLAlchemy emits BEGIN when a transaction starts.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import Engine, event
from sqlalchemy.engine import Connection

__all__ = ["install_sqlite_transactions", "uses_sqlite_recipe"]

_DRIVERS = ("pysqlite", "aiosqlite", "pysqlcipher")


def _driver_connection(dbapi_connection: Any) -> Any:
    return getattr(dbapi_connection, "driver_connection", dbapi_connection)


def _disable_driver_begin(dbapi_connection: Any, connection_record: Any) -> None:
    if getattr(dbapi_connection, "autocommit", None) is not False:
        dbapi_connection.isolation_level = None


def _emit_begin(conn: Connection) -> None:
    if conn.get_execution_options().get("isolation_level") == "AUTOCOMMIT":
        return
    dbapi_connection = conn.connection.dbapi_connection
    if getattr(dbapi_connection, "autocommit", None) is False:
        return  # Python 3.12+ PEP 249 mode: the driver already begins correctly.
    if dbapi_connection is not None and dbapi_connection.isolation_level is not None:
        # Pooled before txguard saw the engine, or reset by an isolation-level change.
        dbapi_connection.isolation_level = None
    conn.exec_driver_sql("BEGIN")


def uses_sqlite_recipe(engine: Engine) -> bool:
    """Say whether txguard's BEGIN recipe is installed on ``engine``."""
    return event.contains(engine, "begin", _emit_begin)


def install_sqlite_transactions(engine: Engine) -> None:
    """Install the BEGIN recipe on a SQLite engine (idempotent; other dialects untouched)."""
    if engine.dialect.name != "sqlite" or engine.dialect.driver not in _DRIVERS:
        return
    if uses_sqlite_recipe(engine):
        return
    if getattr(engine.dialect, "_on_connect_isolation_level", None) == "AUTOCOMMIT":
        return
    event.listen(engine, "connect", _disable_driver_begin)
    event.listen(engine, "begin", _emit_begin)
