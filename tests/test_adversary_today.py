"""Adversary: today's changes (sessions closed for good, the cross_task check before COMMIT,
closing a session once another task is out of it), against shapes real code produces."""

import asyncio
import collections
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import create_async_engine
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.util import await_only
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route

import txguard
from tests.backends import SYNC_URLS, require
from tests.helpers import names
from tests.models import Item
from tests.test_real_fastapi import uvicorn
from txguard.asgi import UnitOfWorkMiddleware

PG = SYNC_URLS["postgresql"]


@pytest.fixture
def pg() -> Iterator[sa.Engine]:
    require("postgresql")
    engine = sa.create_engine(PG)
    with engine.begin() as conn:
        conn.execute(sa.text("DROP TABLE IF EXISTS adv4_t"))
        conn.execute(sa.text("CREATE TABLE adv4_t (id INTEGER PRIMARY KEY, v INTEGER)"))
    try:
        yield engine
    finally:
        txguard.uninstall()
        engine.dispose()


def rows(engine: sa.Engine) -> list[tuple[int, int | None]]:
    with engine.connect() as conn:
        return [tuple(row) for row in conn.execute(sa.text("SELECT id, v FROM adv4_t ORDER BY id"))]


def idle_in_transaction(engine: sa.Engine) -> list[str]:
    """The statements of the server sessions left idle in a transaction on the database."""
    with engine.connect() as conn:
        return list(conn.scalars(sa.text(
            "SELECT query FROM pg_stat_activity WHERE datname = current_database() "
            "AND state LIKE 'idle in transaction%'"
        )))


class AppSession(Session):
    """A user's session class."""


def test_a_session_made_from_a_unit_sessions_own_class_is_a_plain_session(engine: sa.Engine) -> None:
    """`type(session)(bind=...)` (a side session of the same class as the request's, as
    repository code writes it) gives a session that works as the user's class does, inside
    the unit and after it: not an AttributeError on txguard's private attributes."""
    txguard.configure(sessionmaker(engine, class_=AppSession))
    with txguard.unit_of_work() as session:
        with type(session)(bind=engine) as side:
            side.add(Item(name="side"))
            side.commit()
        session.add(Item(name="unit"))
    with type(session)(bind=engine) as after:  # the class of a session closed for good
        after.add(Item(name="after"))
        after.commit()
        assert isinstance(after, AppSession)
    assert names(engine) == ["after", "side", "unit"]
    assert engine.pool.checkedout() == 0


def slow_connects(aengine: Any) -> tuple[asyncio.Event, asyncio.Event]:
    """Make the engine's next new connection wait, inside the connect, until ``go_on``."""
    connecting = asyncio.Event()
    go_on = asyncio.Event()

    @sa.event.listens_for(aengine.sync_engine, "connect")
    def slow_connect(dbapi_connection: Any, record: Any) -> None:
        connecting.set()
        await_only(go_on.wait())

    return connecting, go_on


@pytest.mark.parametrize("driver", ["+asyncpg", "+psycopg_async"])
async def test_a_cancelled_unit_still_closes_a_session_another_task_was_connecting(
    pg: sa.Engine, driver: str
) -> None:
    """`gather` of two services, one failing while the other is still provisioning the
    session's connection, under a timeout (`asyncio.wait_for`, as on Python 3.10): the timeout fires while the unit waits
    for the other task to leave the session. The unit still closes it once that task is out
    (the cancellation is raised then, as for the unit's own COMMIT or ROLLBACK):
    no connection stays checked out, no transaction stays open on the server (holding the
    locks of what that task wrote)."""
    aengine = create_async_engine(PG.replace("+psycopg", driver))
    connecting, go_on = slow_connects(aengine)
    registry = txguard.SessionRegistry(aengine)

    async def insert() -> None:
        await txguard.current_session(registry).execute(sa.text("INSERT INTO adv4_t VALUES (1, 0)"))

    async def fail_once_connecting() -> None:
        await connecting.wait()
        asyncio.get_running_loop().call_later(0.6, go_on.set)  # the connect ends after the timeout
        raise KeyError("the other service failed")

    gathered: list[asyncio.Future[Any]] = []

    async def unit() -> None:
        async with registry.unit_of_work():
            gathered.append(both := asyncio.gather(insert(), fail_once_connecting()))
            await both

    try:
        started = time.monotonic()
        with pytest.raises(asyncio.TimeoutError):  # TimeoutError itself from Python 3.11
            await asyncio.wait_for(unit(), 0.3)
        assert time.monotonic() - started < 5  # waited for the connect, not the give-up time
        await asyncio.wait_for(asyncio.gather(*gathered, return_exceptions=True), 5)
        await asyncio.sleep(0.2)
        assert aengine.sync_engine.pool.checkedout() == 0
        assert idle_in_transaction(pg) == []
        assert rows(pg) == []
    finally:
        go_on.set()
        await aengine.dispose()


async def test_a_task_cannot_commit_the_session_of_a_unit_that_ended(pg: sa.Engine) -> None:
    """A commit-as-you-go unit ends (one of two gathered services failed) while the other is
    still provisioning the connection, so SQLAlchemy refuses to close the session then. That
    task goes on to `await session.commit()`: the session was closed for good with its unit,
    so the commit is refused (or, if the unit got to the session first, the statement fails
    on the invalidated connection), and nothing is committed after the unit ended in failure."""
    aengine = create_async_engine(PG.replace("+psycopg", "+asyncpg"))
    connecting, go_on = slow_connects(aengine)
    registry = txguard.SessionRegistry(aengine)
    outcome: list[BaseException | None] = []

    async def insert_and_commit() -> None:
        session = txguard.current_session(registry)
        try:
            await session.execute(sa.text("INSERT INTO adv4_t VALUES (1, 0)"))
            await session.commit()
            outcome.append(None)
        except Exception as exc:  # the commit refused, or the connection already invalidated
            outcome.append(exc)

    async def fail_once_connecting() -> None:
        await connecting.wait()
        asyncio.get_running_loop().call_later(0.1, go_on.set)
        raise KeyError("the other service failed")

    gathered: list[asyncio.Future[Any]] = []
    try:
        with pytest.raises(KeyError):
            async with registry.unit_of_work(mode="commit_as_you_go"):
                gathered.append(both := asyncio.gather(insert_and_commit(), fail_once_connecting()))
                await both
        await asyncio.wait_for(asyncio.gather(*gathered, return_exceptions=True), 5)
        assert len(outcome) == 1 and isinstance(outcome[0], (txguard.DisciplineError, sa.exc.DBAPIError)), outcome
        assert rows(pg) == []
        await asyncio.sleep(0.1)
        assert aengine.sync_engine.pool.checkedout() == 0
    finally:
        go_on.set()
        await aengine.dispose()


@pytest.mark.parametrize("driver", ["+psycopg_async", "+asyncpg"])
@pytest.mark.parametrize("mode", ["begin_once", "commit_as_you_go"])
async def test_a_refused_commit_answers_without_waiting_for_a_stuck_task(
    pg: sa.Engine, driver: str, mode: str
) -> None:
    """A task the endpoint started and did not await is stuck on a row lock when the unit
    commits: cross_task at "error" refuses the COMMIT (the unit's, or the endpoint's own in
    commit-as-you-go mode). The client's 500 does not wait for the lock (here held 6 s; in
    production it may be held for minutes): a ROLLBACK would queue behind the stuck
    statement, so the unit discards the connection instead. The stuck task fails rather
    than hangs, nothing of the request is committed, no connection stays checked out."""
    txguard.install(cross_task="error")
    with pg.begin() as conn:
        conn.execute(sa.text("INSERT INTO adv4_t VALUES (1, 0)"))
    aengine = create_async_engine(PG.replace("+psycopg", driver))
    registry = txguard.SessionRegistry(aengine)
    tasks: list[asyncio.Task[None]] = []

    async def stuck() -> None:
        await txguard.current_session(registry).execute(sa.text("UPDATE adv4_t SET v = v + 1 WHERE id = 1"))

    async def view(request: Request) -> PlainTextResponse:
        session = txguard.current_session(registry)
        await session.execute(sa.text("INSERT INTO adv4_t VALUES (2, 0)"))
        tasks.append(asyncio.create_task(stuck()))
        await asyncio.sleep(0.1)
        if mode == "commit_as_you_go":
            await session.commit()
        return PlainTextResponse("ok")

    app = Starlette(routes=[Route("/", view)])
    app.add_middleware(UnitOfWorkMiddleware, registry=registry, mode=mode)
    locker = pg.connect()
    locker.execute(sa.text("SELECT * FROM adv4_t WHERE id = 1 FOR UPDATE"))
    asyncio.get_running_loop().call_later(6, locker.rollback)
    try:
        started = time.monotonic()
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://t", timeout=30) as client:
            response = await client.get("/")
        waited = time.monotonic() - started
        assert response.status_code == 500
        assert waited < 3, f"the 500 took {waited:.1f} s"
        (outcome,) = await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 15)
        assert isinstance(outcome, Exception), "the stuck task's UPDATE ran on after its unit ended"
        locker.rollback()
        assert rows(pg) == [(1, 0)]
        assert aengine.sync_engine.pool.checkedout() == 0
        assert idle_in_transaction(pg) == []
    finally:
        locker.close()
        await asyncio.gather(*tasks, return_exceptions=True)
        await aengine.dispose()


KINDS = ["ok", "outlive", "gather", "unawaited", "stream"]  # tests/apps/adversary_today_app.py
MISUSED = {"gather": 500, "unawaited": 500}  # refused by cross_task at "error": rolled back


async def test_requests_that_misuse_the_session_leave_the_others_exact(
    pg: sa.Engine, tmp_path: Any
) -> None:
    """uvicorn, 200 requests 20 at a time, two in five misusing the request's session: every
    well-behaved request commits (201), the misusing ones answer as the guards decide, late
    uses are refused, the data is exact and no connection stays checked out."""
    env = {"TXGUARD_ADV_URL": PG.replace("+psycopg", "+asyncpg")}
    with uvicorn("tests.apps.adversary_today_app:app", env, tmp_path / "server.log") as (url, _):
        gate = asyncio.Semaphore(20)
        limits = httpx.Limits(max_connections=20, max_keepalive_connections=0)
        async with httpx.AsyncClient(base_url=url, limits=limits, timeout=60) as client:

            async def one(i: int) -> tuple[str, int]:
                kind = KINDS[i % len(KINDS)]
                async with gate:
                    return kind, (await client.post(f"/{kind}/n{i}")).status_code

            outcomes = collections.Counter(await asyncio.gather(*(one(i) for i in range(200))))
            await asyncio.sleep(1)
            stats = (await client.get("/stats")).json()
    assert outcomes == collections.Counter((k, MISUSED.get(k, 201)) for k in KINDS for _ in range(40))
    kept = sorted(f"n{i}" for i in range(200) if KINDS[i % len(KINDS)] not in MISUSED)
    assert stats["names"] == kept
    assert stats["checked_out"] == 0
    assert stats["late"] == {"refused": 80, "other": 0}
