"""A SERIALIZABLE read-modify-write counter under contention ends exactly where it should."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import pytest
import sqlalchemy as sa

import txguard
from tests.reliability.conftest import FIGURES, Account, ErrorLog, Server, tune
from tests.reliability.faults import WAIT_S, driver_module, driver_url

pytestmark = pytest.mark.reliability

THREADS = 8
INCREMENTS = 25
RETRIES = 60  # bounded; a streak of 60 lost conflicts would mean a livelock, and fails
CONFLICT_CODES = ("40001", "40P01", "1213", "1205")


def test_serializable_counter_reaches_exactly_threads_times_increments(server: Server) -> None:
    """8 threads x 25 SERIALIZABLE increments with retries end at exactly 200, after real conflicts."""
    server.reset({1: 0})
    registry = txguard.SessionRegistry(server.engine)
    attempts: list[int] = []
    failures: list[BaseException] = []
    # Every thread reads 0 on its first attempt before any of them writes: a conflict is
    # certain (PostgreSQL: 40001 for all but one; MariaDB: the shared locks of the
    # SERIALIZABLE reads deadlock, 1213), whatever the scheduler does.
    start_line = threading.Barrier(THREADS, timeout=WAIT_S)
    local = threading.local()

    @registry.transactional(isolation_level="SERIALIZABLE", retries=RETRIES, backoff=0.002)
    def increment() -> None:
        attempts.append(1)
        session = registry.current_session()
        value = session.scalar(sa.select(Account.balance).where(Account.id == 1))
        if not getattr(local, "lined_up", False):
            local.lined_up = True
            start_line.wait()
        session.execute(sa.update(Account).where(Account.id == 1).values(balance=value + 1))

    def worker() -> None:
        try:
            for _ in range(INCREMENTS):
                increment()
        except BaseException as exc:  # reported below, with its notes
            failures.append(exc)

    threads = [threading.Thread(target=worker, name=f"counter-{n}") for n in range(THREADS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert not any(t.is_alive() for t in threads), "a worker thread did not finish"
    assert not failures, _describe(failures)

    with server.engine.connect() as conn:
        final = conn.scalar(sa.select(Account.balance).where(Account.id == 1))
    conflicts = server.errors.count(*CONFLICT_CODES)
    FIGURES[f"counter[{server.backend}]"] = {
        "increments_expected": THREADS * INCREMENTS,
        "increments_actual": final,
        "attempts": len(attempts),
        "conflicts": dict(server.errors.codes),
        "leaked_connections": server.engine.pool.checkedout(),
    }
    assert final == THREADS * INCREMENTS
    assert conflicts >= THREADS - 1  # the first round alone loses THREADS - 1 conflicts
    assert len(attempts) == THREADS * INCREMENTS + conflicts


@pytest.mark.parametrize(
    ("server", "driver"), [("postgresql", "asyncpg"), ("mariadb", "aiomysql")], indirect=["server"]
)
async def test_async_serializable_counter_reaches_exactly_tasks_times_increments(
    server: Server, driver: str
) -> None:
    """The same counter run by 8 asyncio tasks on an async driver ends at exactly 200."""
    from sqlalchemy.ext.asyncio import create_async_engine

    module = driver_module(driver)
    if module is not None:
        pytest.importorskip(module)
    server.reset({1: 0})
    engine = create_async_engine(driver_url(driver), pool_size=THREADS)
    errors = ErrorLog()
    sa.event.listen(engine.sync_engine, "connect", tune(server.backend))
    sa.event.listen(engine.sync_engine, "handle_error", errors)
    registry = txguard.SessionRegistry(engine)
    attempts: list[int] = []
    arrived: list[int] = []
    all_read = asyncio.Event()
    lined_up: set[int] = set()

    @registry.transactional(isolation_level="SERIALIZABLE", retries=RETRIES, backoff=0.002)
    async def increment(worker: int) -> None:
        attempts.append(1)
        session = registry.current_session()
        value = await session.scalar(sa.select(Account.balance).where(Account.id == 1))
        if worker not in lined_up:
            lined_up.add(worker)
            arrived.append(worker)
            if len(arrived) == THREADS:
                all_read.set()
            await asyncio.wait_for(all_read.wait(), WAIT_S)
        await session.execute(
            sa.update(Account).where(Account.id == 1).values(balance=value + 1)
        )

    async def worker(n: int) -> None:
        for _ in range(INCREMENTS):
            await increment(n)

    try:
        results = await asyncio.wait_for(
            asyncio.gather(*(worker(n) for n in range(THREADS)), return_exceptions=True), 120
        )
        failures = [r for r in results if isinstance(r, BaseException)]
        assert not failures, _describe(failures)
        async with engine.connect() as conn:
            final = await conn.scalar(sa.select(Account.balance).where(Account.id == 1))
        leaked = engine.sync_engine.pool.checkedout()
    finally:
        await engine.dispose()
    conflicts = errors.count(*CONFLICT_CODES)
    FIGURES[f"counter[{driver}]"] = {
        "increments_expected": THREADS * INCREMENTS,
        "increments_actual": final,
        "attempts": len(attempts),
        "conflicts": dict(errors.codes),
        "leaked_connections": leaked,
    }
    assert final == THREADS * INCREMENTS
    assert conflicts >= THREADS - 1
    assert len(attempts) == THREADS * INCREMENTS + conflicts
    assert leaked == 0


def _describe(failures: list[BaseException]) -> str:
    first: Any = failures[0]
    notes = "\n".join(getattr(first, "__notes__", []))
    return f"{len(failures)} worker(s) failed; the first: {type(first).__name__}: {first}\n{notes}"
