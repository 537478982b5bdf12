"""Fixtures: one engine per backend for the whole run, clean tables and a leak check per test."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
import sqlalchemy as sa

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
    with eng.begin() as conn:
        for table in reversed(Base.metadata.sorted_tables):
            conn.execute(table.delete())
    yield eng
    assert eng.pool.checkedout() == 0, "the test left a pooled connection checked out"  # noqa: S101


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
    with sync.begin() as conn:
        for table in reversed(Base.metadata.sorted_tables):
            conn.execute(table.delete())
    url = sync.url.set(drivername=driver)
    engine = create_async_engine(url, pool_size=5, max_overflow=60) if backend != "sqlite" else (
        create_async_engine(url)
    )
    yield AsyncDatabase(backend, engine, sync)
    pool = engine.sync_engine.pool
    checked_out = pool.checkedout() if hasattr(pool, "checkedout") else 0
    await engine.dispose()
    assert checked_out == 0, "the test left a pooled connection checked out"  # noqa: S101
