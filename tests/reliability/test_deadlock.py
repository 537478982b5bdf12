"""Two units that lock the same rows in opposite order: one is retried, both are applied once."""

from __future__ import annotations

import asyncio
import threading
from collections import Counter

import pytest
import sqlalchemy as sa

import txguard
from tests.reliability.conftest import FIGURES, Account, ErrorLog, Server, tune
from tests.reliability.faults import WAIT_S, driver_module, driver_url

pytestmark = pytest.mark.reliability

DEADLOCK_CODES = ("40P01", "1213")


def _add(session: sa.orm.Session, account: int, amount: int) -> None:
    session.execute(
        sa.update(Account).where(Account.id == account).values(balance=Account.balance + amount)
    )


def _balances(engine: sa.Engine) -> dict[int, int]:
    with engine.connect() as conn:
        return {row[0]: row[1] for row in conn.execute(sa.select(Account.id, Account.balance))}


def test_opposite_lock_order_retries_one_unit_and_applies_both_once(server: Server) -> None:
    """A deadlock between two threads is resolved by retrying its victim; both units land once."""
    server.reset({1: 0, 2: 0})
    registry = txguard.SessionRegistry(server.engine)
    attempts: Counter[str] = Counter()
    both_hold_one_row = threading.Barrier(2, timeout=WAIT_S)
    failures: list[BaseException] = []

    @registry.transactional(retries=3, backoff=0)
    def move(name: str, first: int, second: int) -> None:
        attempts[name] += 1
        session = registry.current_session()
        _add(session, first, 1)
        if attempts[name] == 1:
            both_hold_one_row.wait()
        _add(session, second, 1)

    def run(name: str, first: int, second: int) -> None:
        try:
            move(name, first, second)
        except BaseException as exc:
            failures.append(exc)

    threads = [
        threading.Thread(target=run, args=("a", 1, 2)),
        threading.Thread(target=run, args=("b", 2, 1)),
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert not any(t.is_alive() for t in threads)
    assert not failures, failures
    FIGURES[f"deadlock[{server.backend}]"] = {
        "attempts": dict(attempts),
        "deadlocks": server.errors.count(*DEADLOCK_CODES),
    }
    assert sorted(attempts.values()) == [1, 2]
    assert server.errors.count(*DEADLOCK_CODES) == 1
    assert _balances(server.engine) == {1: 2, 2: 2}


@pytest.mark.parametrize(
    ("server", "driver"), [("postgresql", "asyncpg"), ("mariadb", "aiomysql")], indirect=["server"]
)
async def test_async_opposite_lock_order_retries_one_unit_and_applies_both_once(
    server: Server, driver: str
) -> None:
    """The same deadlock between two asyncio tasks on an async driver: one retry, both applied once."""
    from sqlalchemy.ext.asyncio import create_async_engine

    module = driver_module(driver)
    if module is not None:
        pytest.importorskip(module)
    server.reset({1: 0, 2: 0})
    engine = create_async_engine(driver_url(driver))
    errors = ErrorLog()
    sa.event.listen(engine.sync_engine, "connect", tune(server.backend))
    sa.event.listen(engine.sync_engine, "handle_error", errors)
    registry = txguard.SessionRegistry(engine)
    attempts: Counter[str] = Counter()
    holding: set[str] = set()
    both_hold_one_row = asyncio.Event()

    @registry.transactional(retries=3, backoff=0)
    async def move(name: str, first: int, second: int) -> None:
        attempts[name] += 1
        session = registry.current_session()
        await session.run_sync(_add, first, 1)
        if attempts[name] == 1:
            holding.add(name)
            if len(holding) == 2:
                both_hold_one_row.set()
            await asyncio.wait_for(both_hold_one_row.wait(), WAIT_S)
        await session.run_sync(_add, second, 1)

    try:
        await asyncio.wait_for(asyncio.gather(move("a", 1, 2), move("b", 2, 1)), 60)
        leaked = engine.sync_engine.pool.checkedout()
    finally:
        await engine.dispose()
    FIGURES[f"deadlock[{driver}]"] = {
        "attempts": dict(attempts),
        "deadlocks": errors.count(*DEADLOCK_CODES),
    }
    assert sorted(attempts.values()) == [1, 2]
    assert errors.count(*DEADLOCK_CODES) == 1
    assert leaked == 0
    assert _balances(server.engine) == {1: 2, 2: 2}
