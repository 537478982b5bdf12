"""Fixtures: one engine per backend for the whole run, clean tables and a leak check per test."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.exc import OperationalError

import txguard
from tests.backends import SYNC_URLS, require
from tests.models import Base

BACKENDS = ["sqlite", "postgresql", "mariadb"]


@pytest.fixture(scope="session")
def _engines(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, sa.Engine]]:
    engines: dict[str, sa.Engine] = {}
    yield engines
    for engine in engines.values():
        Base.metadata.drop_all(engine)
        engine.dispose()


def _make_engine(backend: str, tmp_path_factory: pytest.TempPathFactory) -> sa.Engine:
    if backend == "sqlite":
        path = tmp_path_factory.mktemp("sqlite") / "txguard.db"
        engine = sa.create_engine(f"sqlite:///{path}")
    else:
        engine = sa.create_engine(SYNC_URLS[backend], pool_size=5, max_overflow=20)
    Base.metadata.drop_all(engine)
    Base.metadata.create_all(engine)
    return engine


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    """Name each backend; unreachable servers skip (or fail under CI=true)."""
    name: str = request.param
    require(name)
    return name


@pytest.fixture
def engine(
    backend: str, _engines: dict[str, sa.Engine], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[sa.Engine]:
    """Yield the backend's engine with empty tables; fail the test if it leaves a connection out."""
    if backend not in _engines:
        _engines[backend] = _make_engine(backend, tmp_path_factory)
    eng = _engines[backend]
    empty_tables(eng)
    yield eng
    assert eng.pool.checkedout() == 0, "the test left a pooled connection checked out"  # noqa: S101


# Emptying the tables waits this long for a lock before it fails and names who holds it
# (the servers' own waits are 50 s on MariaDB and unbounded on PostgreSQL).
CLEANUP_LOCK_WAIT_S = 10

# (time.time() when it started, node id) of each test of the run, for naming the test a
# stray transaction began in.
_test_starts: list[tuple[float, str]] = []


def pytest_runtest_setup(item: pytest.Item) -> None:
    _test_starts.append((time.time(), item.nodeid))


def empty_tables(engine: sa.Engine) -> None:
    """Delete every row of the test tables; fail fast, naming the holder, if one is locked.

    A lock here is held by a transaction an earlier test left open (or by the server still
    running a statement of a connection its client gave up on), never by this test.
    """
    backend = _server(engine)
    table = None
    try:
        with engine.begin() as conn:
            if backend == "postgresql":
                conn.exec_driver_sql(f"SET LOCAL lock_timeout = '{CLEANUP_LOCK_WAIT_S}s'")
            for table in reversed(Base.metadata.sorted_tables):
                delete = str(table.delete().compile(conn))
                if backend == "mysql":  # for this statement, not for the pooled connection
                    wait = f"innodb_lock_wait_timeout={CLEANUP_LOCK_WAIT_S}"
                    delete = f"SET STATEMENT {wait} FOR {delete}"
                conn.exec_driver_sql(delete)
    except OperationalError as exc:
        if not _is_lock_timeout(exc):
            raise
    else:
        return
    name = "?" if table is None else table.name
    pytest.fail(
        f"Emptying {name} before the test waited {CLEANUP_LOCK_WAIT_S} s for a lock and gave "
        f"up. {_lock_holders(engine)}",
        pytrace=False,
    )


def _server(engine: sa.Engine) -> str:
    name = engine.dialect.name
    return "mysql" if name == "mariadb" else name


def _is_lock_timeout(exc: OperationalError) -> bool:
    """Say whether ``exc`` is PostgreSQL's lock_timeout (55P03) or MariaDB's 1205."""
    orig = exc.orig
    args = getattr(orig, "args", ())
    return getattr(orig, "sqlstate", None) == "55P03" or bool(args and args[0] == 1205)


_HOLDERS = {
    "postgresql": """
        SELECT pid, state, EXTRACT(EPOCH FROM now() - xact_start), left(query, 200)
        FROM pg_stat_activity
        WHERE datname = current_database() AND pid <> pg_backend_pid()
          AND xact_start IS NOT NULL
        ORDER BY xact_start
    """,
    "mysql": """
        SELECT t.trx_mysql_thread_id, CONCAT(p.COMMAND, ' ', p.STATE),
               TIMESTAMPDIFF(SECOND, t.trx_started, NOW()), LEFT(p.INFO, 200)
        FROM information_schema.innodb_trx t
        JOIN information_schema.PROCESSLIST p ON p.ID = t.trx_mysql_thread_id
        WHERE p.DB = DATABASE() AND p.ID <> CONNECTION_ID()
        ORDER BY t.trx_started
    """,
}


def _lock_holders(engine: sa.Engine) -> str:
    """Describe the transactions open on the test database, and the test each began in."""
    prober = sa.create_engine(engine.url, poolclass=sa.pool.NullPool)
    try:
        with prober.connect() as conn:
            rows = conn.execute(sa.text(_HOLDERS[_server(engine)])).all()
    finally:
        prober.dispose()
    if not rows:
        return "No transaction is open on the database now: its holder has ended since."
    now = time.time()
    slack = 1.0 if _server(engine) == "mysql" else 0.0  # innodb_trx counts whole seconds
    described = []
    for ident, state, age, statement in rows:
        seconds = float(age or 0)
        current = f", running {statement!r}" if statement else ""
        described.append(
            f"connection {ident} ({state.strip()}{current}), in a transaction for "
            f"{seconds:.0f} s, begun {_tests_around(now - seconds, slack)}"
        )
    return "Open transactions, oldest first: " + "; ".join(described) + "."


def _tests_around(moment: float, slack: float) -> str:
    """Name the test running at ``moment`` (give or take ``slack`` seconds)."""
    before = [nodeid for started, nodeid in _test_starts if started <= moment - slack]
    near = [nodeid for started, nodeid in _test_starts if abs(started - moment) < slack]
    candidates = before[-1:] + near
    if not candidates:
        return "before this run's first test"
    if len(candidates) == 1:
        return f"during {candidates[0]}"
    shown = ", ".join(candidates[:4]) + (", ..." if len(candidates) > 4 else "")
    return f"during one of {shown}"


@pytest.fixture
def sqlite_engine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[sa.Engine]:
    """Yield a fresh file-based SQLite engine with the test tables."""
    engine = _make_engine("sqlite", tmp_path_factory)
    yield engine
    engine.dispose()


@pytest.fixture(autouse=True)
def _reset_txguard_globals() -> Iterator[None]:
    yield
    from txguard import _registry

    _registry._reset_default_for_tests()


ASYNC_CASES = [
    ("sqlite", "sqlite+aiosqlite"),
    ("postgresql", "postgresql+asyncpg"),
    ("postgresql", "postgresql+psycopg_async"),
    ("mariadb", "mysql+aiomysql"),
]


class AsyncDatabase:
    """An AsyncEngine on a test database, with the sync engine of the same database."""

    def __init__(self, backend: str, engine: Any, sync: sa.Engine) -> None:
        self.backend = backend
        self.engine = engine
        self.sync = sync


@pytest.fixture(params=ASYNC_CASES, ids=[driver.split("+")[1] for _, driver in ASYNC_CASES])
async def async_db(
    request: pytest.FixtureRequest,
    _engines: dict[str, sa.Engine],
    tmp_path_factory: pytest.TempPathFactory,
) -> AsyncIterator[AsyncDatabase]:
    """Yield an AsyncEngine per async driver with empty tables; fail on a leaked connection."""
    from sqlalchemy.ext.asyncio import create_async_engine

    backend, driver = request.param
    require(backend)
    if backend not in _engines:
        _engines[backend] = _make_engine(backend, tmp_path_factory)
    sync = _engines[backend]
    empty_tables(sync)
    url = sync.url.set(drivername=driver)
    engine = create_async_engine(url, pool_size=5, max_overflow=60) if backend != "sqlite" else (
        create_async_engine(url)
    )
    yield AsyncDatabase(backend, engine, sync)
    pool = engine.sync_engine.pool
    checked_out = pool.checkedout() if hasattr(pool, "checkedout") else 0
    await engine.dispose()
    assert checked_out == 0, "the test left a pooled connection checked out"  # noqa: S101
