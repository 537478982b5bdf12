"""Adversary: request units after today's changes (ASGI app task, commit-as-you-go on success)."""

import asyncio
from collections.abc import Iterator

import pytest
import sqlalchemy as sa
from flask import Flask
from sqlalchemy.ext.asyncio import create_async_engine
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route
from starlette.testclient import TestClient

import txguard
from tests.backends import SYNC_URLS, require
from txguard.asgi import UnitOfWorkMiddleware
from txguard.flask import TxGuard

PG = SYNC_URLS["postgresql"]
SCHEMA = [
    "DROP TABLE IF EXISTS adv_child",
    "DROP TABLE IF EXISTS adv_parent",
    "CREATE TABLE adv_parent (id INTEGER PRIMARY KEY)",
    "CREATE TABLE adv_child (id INTEGER PRIMARY KEY, parent_id INTEGER "
    "REFERENCES adv_parent (id) DEFERRABLE INITIALLY DEFERRED)",
]


@pytest.fixture
def pg() -> Iterator[sa.Engine]:
    require("postgresql")
    engine = sa.create_engine(PG)
    with engine.begin() as conn:
        for ddl in SCHEMA:
            conn.execute(sa.text(ddl))
    txguard.install(mixed_begin="error", leaks="warn", cross_thread="error", cross_task="error")
    try:
        yield engine
    finally:
        txguard.uninstall()
        engine.dispose()


def children(engine: sa.Engine) -> list[int]:
    with engine.connect() as conn:
        return sorted(conn.scalars(sa.text("SELECT id FROM adv_child")))


def test_asgi_commit_as_you_go_pending_commit_fails_on_deferred_fk(pg: sa.Engine) -> None:
    aengine = create_async_engine(PG.replace("+psycopg", "+asyncpg"))
    registry = txguard.SessionRegistry(aengine)

    async def view(request: Request) -> PlainTextResponse:
        s = txguard.current_session(registry)
        await s.execute(sa.text("INSERT INTO adv_child VALUES (1, NULL)"))
        await s.commit()  # intermediate commit: kept
        await s.execute(sa.text("INSERT INTO adv_child VALUES (2, 999)"))  # fails at COMMIT
        return PlainTextResponse("ok")

    app = Starlette(routes=[Route("/", view)])
    app.add_middleware(UnitOfWorkMiddleware, registry=registry, mode="commit_as_you_go")
    with TestClient(app, raise_server_exceptions=False) as client:
        response = client.get("/")
    assert response.status_code == 500
    assert children(pg) == [1]
    assert aengine.sync_engine.pool.checkedout() == 0


def test_flask_commit_as_you_go_pending_commit_fails_on_deferred_fk(pg: sa.Engine) -> None:
    registry = txguard.SessionRegistry(pg)
    app = Flask(__name__)
    TxGuard(app, registry=registry, mode="commit_as_you_go")

    @app.post("/")
    def view() -> str:
        s = txguard.current_session(registry)
        s.execute(sa.text("INSERT INTO adv_child VALUES (1, NULL)"))
        s.commit()
        s.execute(sa.text("INSERT INTO adv_child VALUES (2, 999)"))
        return "ok"

    response = app.test_client().post("/")
    assert response.status_code == 500
    assert children(pg) == [1]
    assert pg.pool.checkedout() == 0


def test_asgi_gather_two_coroutines_on_the_session_is_reported(pg: sa.Engine) -> None:
    aengine = create_async_engine(PG.replace("+psycopg", "+asyncpg"))
    registry = txguard.SessionRegistry(aengine)

    async def one(i: int) -> None:
        await txguard.current_session(registry).execute(sa.text(f"INSERT INTO adv_parent VALUES ({i})"))

    async def view(request: Request) -> PlainTextResponse:
        await asyncio.gather(one(1), one(2))
        return PlainTextResponse("ok")

    app = Starlette(routes=[Route("/", view)])
    app.add_middleware(UnitOfWorkMiddleware, registry=registry)
    with TestClient(app, raise_server_exceptions=False) as client:
        response = client.get("/")
    assert response.status_code == 500
    with pg.connect() as conn:
        assert list(conn.scalars(sa.text("SELECT id FROM adv_parent"))) == []
    assert aengine.sync_engine.pool.checkedout() == 0
