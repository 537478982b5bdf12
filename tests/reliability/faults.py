"""Real database faults on demand: conflicts, deadlocks, lock timeouts and killed connections.

Everything here talks to the real servers through ordinary connections; nothing is mocked.
The functions that act *inside* a transaction take anything with ``.execute()`` (a sync
``Session`` or ``Connection``), so async tests run them through ``run_sync`` unchanged.
Faults only ever end single backends (``pg_terminate_backend``, ``KILL``), never a server,
and every wait is bounded.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import sqlalchemy as sa
from sqlalchemy.pool import NullPool

from tests.backends import SYNC_URLS

WAIT_S = 15.0  # upper bound of every wait below; only reached when something is broken
LOCK_TIMEOUT_S = 30  # no statement waits for a lock longer (PostgreSQL's default is forever)

DRIVERS: dict[str, tuple[str, str, bool]] = {
    # name: (backend, SQLAlchemy drivername, is_async)
    "psycopg": ("postgresql", "postgresql+psycopg", False),
    "psycopg2": ("postgresql", "postgresql+psycopg2", False),
    "asyncpg": ("postgresql", "postgresql+asyncpg", True),
    "psycopg_async": ("postgresql", "postgresql+psycopg_async", True),
    "pymysql": ("mariadb", "mysql+pymysql", False),
    "aiomysql": ("mariadb", "mysql+aiomysql", True),
}
_MODULES = {"psycopg2": "psycopg2", "asyncpg": "asyncpg", "aiomysql": "aiomysql"}


def driver_url(driver: str) -> str:
    """Return the URL of the test database of ``driver``'s backend, with that driver."""
    backend, drivername, _ = DRIVERS[driver]
    url = sa.make_url(SYNC_URLS[backend]).set(drivername=drivername)
    return url.render_as_string(hide_password=False)


def driver_module(driver: str) -> str | None:
    """Name the module ``driver`` needs beyond the test extra, if any."""
    return _MODULES.get(driver)


def backend_of(bind: Any) -> str:
    """Name the backend of an Engine, AsyncEngine, Connection or Session."""
    if isinstance(bind, sa.orm.Session):
        bind = bind.get_bind()
    name: str = getattr(bind, "dialect").name
    return "mariadb" if name in ("mysql", "mariadb") else name


_OWN_ID = {"postgresql": "SELECT pg_backend_pid()", "mariadb": "SELECT CONNECTION_ID()"}


def own_id(executor: Any) -> int:
    """Return the server-side id of the connection behind ``executor``."""
    return int(executor.execute(sa.text(_OWN_ID[backend_of(executor)])).scalar_one())


def bound_lock_waits(dbapi_connection: Any, connection_record: Any) -> None:
    """Make the server give up on any lock wait after LOCK_TIMEOUT_S (a connect listener).

    A test that waits on a lock held by another test session (e.g. one dropping tables in
    the same database) fails with a lock timeout instead of hanging the run.
    """
    module = type(dbapi_connection).__module__
    cursor = dbapi_connection.cursor()
    try:
        if "mysql" in module or "pymysql" in module:
            cursor.execute(f"SET SESSION lock_wait_timeout = {LOCK_TIMEOUT_S}")
        else:
            cursor.execute(f"SET lock_timeout = '{LOCK_TIMEOUT_S}s'")
    finally:
        cursor.close()
    dbapi_connection.commit()


class Side:
    """Plain connections outside txguard: the other party of a conflict, and the killer."""

    def __init__(self, backend: str) -> None:
        self.backend = backend
        self.engine = sa.create_engine(SYNC_URLS[backend], poolclass=NullPool)
        sa.event.listen(self.engine, "connect", bound_lock_waits)

    def close(self) -> None:
        self.engine.dispose()

    def run(self, sql: str, **params: Any) -> Any:
        """Run one statement in its own committed transaction and return the rows."""
        with self.engine.begin() as conn:
            result = conn.execute(sa.text(sql), params)
            return result.all() if result.returns_rows else None

    def is_alive(self, server_id: int) -> bool:
        if self.backend == "postgresql":
            sql = "SELECT count(*) FROM pg_stat_activity WHERE pid = :id"
        else:
            sql = "SELECT count(*) FROM information_schema.PROCESSLIST WHERE ID = :id"
        return bool(self.run(sql, id=server_id)[0][0])

    def kill(self, server_id: int, wait: bool = True) -> None:
        """End the server connection ``server_id`` (never the server) and wait until it is gone."""
        if self.backend == "postgresql":
            self.run("SELECT pg_terminate_backend(:id)", id=server_id)
        else:
            try:
                self.run(f"KILL {int(server_id)}")
            except sa.exc.DBAPIError as exc:  # 1094: it ended on its own meanwhile
                if getattr(exc.orig, "args", (None,))[0] != 1094:
                    raise
        if wait:
            wait_until(lambda: not self.is_alive(server_id), f"connection {server_id} to end")

    def is_waiting_for_lock(self, server_id: int) -> bool:
        if self.backend == "postgresql":
            sql = "SELECT count(*) FROM pg_locks WHERE pid = :id AND NOT granted"
        else:
            # Not INNODB_TRX: MariaDB refreshes that cache only after 100 ms without a read,
            # so polling it faster than that sees the same stale rows forever.
            sql = (
                "SELECT count(*) FROM information_schema.PROCESSLIST "
                "WHERE ID = :id AND COMMAND = 'Query' AND STATE = 'Updating'"
            )
        return bool(self.run(sql, id=server_id)[0][0])

    def commit_change(self, account_id: int) -> None:
        """Commit a change to an account from outside (the other writer of a conflict)."""
        self.run("UPDATE txg_accounts SET balance = balance WHERE id = :id", id=account_id)

    def write_skew(self, read_id: int, write_id: int) -> None:
        """Commit a SERIALIZABLE transaction that reads one account and writes another."""
        with self.engine.connect() as conn:
            conn.execution_options(isolation_level="SERIALIZABLE")
            with conn.begin():
                conn.execute(sa.text("SELECT balance FROM txg_accounts WHERE id = :id"), {"id": read_id})
                conn.execute(
                    sa.text("UPDATE txg_accounts SET balance = balance + 10 WHERE id = :id"),
                    {"id": write_id},
                )

    @contextmanager
    def holding(self, account_id: int) -> Iterator[sa.Connection]:
        """Hold the row lock of an account in an open transaction until the block ends."""
        with self.engine.connect() as conn:
            conn.begin()
            conn.execute(
                sa.text("UPDATE txg_accounts SET balance = balance WHERE id = :id"),
                {"id": account_id},
            )
            try:
                yield conn
            finally:
                if conn.in_transaction():
                    conn.rollback()


def wait_until(condition: Any, what: str, timeout: float = WAIT_S) -> None:
    """Poll ``condition`` until true; fail (never hang) after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"gave up waiting for {what} after {timeout:.0f} s")
        time.sleep(0.01)


def kill_own_connection(executor: Any, side: Side) -> None:
    """End the server connection behind ``executor``; its next statement fails."""
    side.kill(own_id(executor))


def run_after_kill(executor: Any, side: Side) -> None:
    """End the connection behind ``executor`` and use it again: raises a disconnect error."""
    kill_own_connection(executor, side)
    executor.execute(sa.text("SELECT 1"))


def serialization_failure(executor: Any, side: Side, account_id: int = 1) -> None:
    """Raise PostgreSQL's 40001 in ``executor``'s SERIALIZABLE or REPEATABLE READ transaction.

    The transaction reads the row (taking its snapshot), another transaction commits a
    change to it, then this one updates it: "could not serialize access".
    """
    executor.execute(sa.text("SELECT balance FROM txg_accounts WHERE id = :id"), {"id": account_id})
    side.commit_change(account_id)
    executor.execute(
        sa.text("UPDATE txg_accounts SET balance = balance + 1 WHERE id = :id"), {"id": account_id}
    )


def lock_wait_timeout(executor: Any, side: Side, account_id: int = 1) -> None:
    """Raise MariaDB's 1205 in ``executor``'s transaction (waits about one second)."""
    with side.holding(account_id):
        executor.execute(
            sa.text(
                "SET STATEMENT innodb_lock_wait_timeout=1 FOR "
                "UPDATE txg_accounts SET balance = balance + 1 WHERE id = :id"
            ),
            {"id": account_id},
        )


def statement_timeout(executor: Any) -> None:
    """Raise the server's statement timeout: an OperationalError that is not worth retrying."""
    if backend_of(executor) == "postgresql":
        executor.execute(sa.text("SET LOCAL statement_timeout = '10ms'"))
        executor.execute(sa.text("SELECT pg_sleep(2)"))
    else:
        executor.execute(sa.text("SET STATEMENT max_statement_time=0.01 FOR SELECT SLEEP(2)"))


class DeadlockPeer:
    """The other transaction of a deadlock, built so that the caller is the victim.

    Keep the peer open until the caller's transaction has rolled back: a PostgreSQL
    victim holds its locks until then, and the peer's thread is joined on exit.

    The peer locks ``theirs`` first; the caller locks ``mine``; then ``wait_for_mine()``
    makes the peer request ``mine`` from a thread, and the caller's request for
    ``theirs`` closes the cycle. PostgreSQL aborts the waiter whose deadlock_timeout
    fires first (the caller sets 50 ms, the peer 10 s); MariaDB aborts the transaction
    that changed fewer rows (the peer also inserts padding rows).
    """

    def __init__(self, side: Side, theirs: int = 2, mine: int = 1) -> None:
        self.side = side
        self.theirs = theirs
        self.mine = mine
        self.conn: sa.Connection | None = None
        self.thread: threading.Thread | None = None
        self.error: BaseException | None = None
        self.server_id = 0

    def __enter__(self) -> DeadlockPeer:
        conn = self.conn = self.side.engine.connect()
        conn.begin()
        self.server_id = own_id(conn)
        if self.side.backend == "postgresql":
            conn.execute(sa.text("SET LOCAL deadlock_timeout = '10s'"))
        else:
            conn.execute(
                sa.text("INSERT INTO txg_items (name) VALUES " + ", ".join(["('peer')"] * 20))
            )
        self.lock(conn, self.theirs)
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self.thread is not None:
            self.thread.join(WAIT_S)
            if self.thread.is_alive():  # pragma: no cover - only when a server misbehaves
                self.side.kill(self.server_id, wait=False)
                self.thread.join(WAIT_S)
        if self.conn is not None:
            if self.conn.in_transaction():
                self.conn.rollback()
            self.conn.close()
        if self.error is not None and exc_info[0] is None:
            raise AssertionError(f"the deadlock peer failed: {type(self.error).__name__}")

    @staticmethod
    def lock(executor: Any, account_id: int) -> None:
        executor.execute(
            sa.text("UPDATE txg_accounts SET balance = balance WHERE id = :id"), {"id": account_id}
        )

    def victim_setup(self, executor: Any) -> None:
        """Prepare the caller's transaction: short deadlock timeout, lock ``mine``."""
        if self.side.backend == "postgresql":
            executor.execute(sa.text("SET LOCAL deadlock_timeout = '50ms'"))
        self.lock(executor, self.mine)

    def wait_for_mine(self) -> None:
        """Make the peer request the caller's row from a thread, then rollback its padding."""
        conn = self.conn
        assert conn is not None  # noqa: S101

        def request() -> None:
            try:
                self.lock(conn, self.mine)
                conn.rollback()  # the peer only takes part; it never changes data
            except BaseException as exc:  # pragma: no cover - reported by __exit__
                self.error = exc

        thread = self.thread = threading.Thread(target=request, name="deadlock-peer", daemon=True)
        thread.start()
        wait_until(
            lambda: not thread.is_alive() or self.side.is_waiting_for_lock(self.server_id),
            "the peer to wait",
        )
        if not thread.is_alive():
            raise AssertionError(f"the deadlock peer did not wait: {self.error!r}")

    def finished(self) -> None:
        """Wait until the peer has rolled back and let go of its locks (the victim's retry
        would otherwise race the peer for ``mine`` and may deadlock with it again)."""
        if self.thread is not None:
            self.thread.join(WAIT_S)

    def provoke(self, executor: Any) -> None:
        """Run the caller's part: lock ``mine``, let the peer wait, request ``theirs``."""
        self.victim_setup(executor)
        self.wait_for_mine()
        self.lock(executor, self.theirs)


def reset_accounts(engine: sa.Engine, balances: dict[int, int]) -> None:
    """Replace the accounts table's rows (and empty the items table)."""
    with engine.begin() as conn:
        conn.execute(sa.text("DELETE FROM txg_items"))
        conn.execute(sa.text("DELETE FROM txg_accounts"))
        if balances:
            conn.execute(
                sa.text("INSERT INTO txg_accounts (id, balance) VALUES (:id, :balance)"),
                [{"id": k, "balance": v} for k, v in balances.items()],
            )
