"""Fixtures of the reliability suite: engines sized for many threads, its own tables, and the
figures (attempts, conflicts, faults) that each test reports at the end of the run."""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from tests.backends import SYNC_URLS, require
from tests.reliability.faults import Side, bound_lock_waits

THREADS_POOL = 24  # every worker thread of a test holds at most one connection


class RelBase(DeclarativeBase):
    pass


class Account(RelBase):
    __tablename__ = "rel_accounts"

    id: Mapped[int] = mapped_column(sa.Integer, primary_key=True, autoincrement=False)
    balance: Mapped[int] = mapped_column(sa.Integer)


class Transfer(RelBase):
    __tablename__ = "rel_transfers"

    id: Mapped[int] = mapped_column(sa.Integer, primary_key=True, autoincrement=True)
    tid: Mapped[int] = mapped_column(sa.Integer)  # not unique: a transfer applied twice shows
    src: Mapped[int] = mapped_column(sa.Integer)
    dst: Mapped[int] = mapped_column(sa.Integer)
    amount: Mapped[int] = mapped_column(sa.Integer)


class Row(RelBase):
    __tablename__ = "rel_rows"

    id: Mapped[int] = mapped_column(sa.Integer, primary_key=True, autoincrement=True)
    name: Mapped[str] = mapped_column(sa.String(100))


# Figures, printed by pytest_terminal_summary below.

FIGURES: dict[str, dict[str, Any]] = {}


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if not FIGURES:
        return
    terminalreporter.write_sep("=", "txguard reliability figures")
    for name, figures in FIGURES.items():
        text = ", ".join(f"{key}={value}" for key, value in figures.items())
        terminalreporter.write_line(f"{name}: {text}")


@dataclass(eq=False)
class ErrorLog:
    """Count the database errors an engine saw, by driver code (SQLSTATE or MySQL errno)."""

    codes: Counter[str] = field(default_factory=Counter)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def __call__(self, context: Any) -> None:
        orig = context.original_exception
        code = getattr(orig, "sqlstate", None) or getattr(orig, "pgcode", None)
        args = getattr(orig, "args", ())
        if args and isinstance(args[0], int):
            code = str(args[0])
        if context.is_disconnect:
            code = "disconnect"
        with self.lock:
            self.codes[str(code or type(orig).__name__)] += 1

    def count(self, *codes: str) -> int:
        return sum(self.codes[c] for c in codes)


@dataclass
class Server:
    """A real database server under test: an engine of its own and the side connections."""

    backend: str
    engine: sa.Engine
    side: Side
    errors: ErrorLog
    busy: dict[int, int]  # id(pool record) -> server connection id, while checked out
    lock: threading.Lock

    def reset(self, accounts: dict[int, int] | None = None) -> None:
        with self.engine.begin() as conn:
            for table in reversed(RelBase.metadata.sorted_tables):
                conn.execute(table.delete())
            if accounts:
                conn.execute(
                    sa.insert(Account), [{"id": k, "balance": v} for k, v in accounts.items()]
                )
        self.errors.codes.clear()

    def busy_ids(self) -> list[int]:
        with self.lock:
            return list(self.busy.values())


def tune(backend: str) -> Any:
    """Return a connect listener: faster deadlock detection, and note the server's connection id."""
    def on_connect(dbapi_connection: Any, connection_record: Any) -> None:
        bound_lock_waits(dbapi_connection, connection_record)
        cursor = dbapi_connection.cursor()
        try:
            if backend == "postgresql":
                # Detect deadlocks after 100 ms instead of 1 s (superuser only; else keep 1 s).
                try:
                    cursor.execute("SET deadlock_timeout = '100ms'")
                except Exception:  # noqa: BLE001 - not allowed for this role: keep the default
                    dbapi_connection.rollback()
                cursor.execute("SELECT pg_backend_pid()")
            else:
                cursor.execute("SELECT CONNECTION_ID()")
            connection_record.info["server_id"] = int(cursor.fetchone()[0])
        finally:
            cursor.close()
        dbapi_connection.commit()

    return on_connect


@pytest.fixture(params=["postgresql", "mariadb"])
def server(request: pytest.FixtureRequest) -> Iterator[Server]:
    """Yield a server with the suite's tables, an engine sized for the suite, and its side connections."""
    backend: str = request.param
    require(backend)
    engine = sa.create_engine(SYNC_URLS[backend], pool_size=THREADS_POOL, max_overflow=8)
    side = Side(backend)
    errors = ErrorLog()
    lock = threading.Lock()
    busy: dict[int, int] = {}

    def on_checkout(dbapi_connection: Any, record: Any, proxy: Any) -> None:
        with lock:
            busy[id(record)] = record.info["server_id"]

    def on_checkin(dbapi_connection: Any, record: Any) -> None:
        with lock:
            busy.pop(id(record), None)

    sa.event.listen(engine, "connect", tune(backend))
    sa.event.listen(engine, "checkout", on_checkout)
    sa.event.listen(engine, "checkin", on_checkin)
    sa.event.listen(engine, "handle_error", errors)
    RelBase.metadata.create_all(side.engine)
    srv = Server(backend, engine, side, errors, busy, lock)
    srv.reset()
    try:
        yield srv
        assert engine.pool.checkedout() == 0, "a pooled connection was left checked out"  # noqa: S101
    finally:
        engine.dispose()
        RelBase.metadata.drop_all(side.engine)
        side.close()
