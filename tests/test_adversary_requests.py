"""Adversary: request units after today's changes (ASGI app task, commit-as-you-go on success)."""

import asyncio
import functools
import os
import sys
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import sqlalchemy as sa
from flask import Blueprint, Flask
from flask.views import MethodView
from sqlalchemy.ext.asyncio import create_async_engine
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket
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


def _commit_message(app: Flask, path: str) -> str:
    app.config["PROPAGATE_EXCEPTIONS"] = True
    with pytest.raises(txguard.DisciplineError) as caught:
        app.test_client().get(path)
    return str(caught.value)


def _commit_in_view(registry: txguard.SessionRegistry) -> str:
    s = txguard.current_session(registry)
    s.execute(sa.text("SELECT 1"))
    s.commit()  # begin-once: DisciplineError naming where the request's unit was opened
    return "x"


def test_flask_message_names_a_method_views_definition(tmp_path: Path) -> None:
    registry = txguard.SessionRegistry(sa.create_engine(f"sqlite:///{tmp_path}/f.db"))
    app = Flask(__name__)
    TxGuard(app, registry=registry)

    class Items(MethodView):
        def get(self) -> str:
            return _commit_in_view(registry)

    app.add_url_rule("/items", view_func=Items.as_view("items"))
    message = _commit_message(app, "/items")
    assert "flask" + os.sep not in message, message
    assert __file__.rsplit(os.sep, 1)[-1] in message, message


def test_flask_message_for_a_404_names_where_txguard_was_installed(tmp_path: Path) -> None:
    registry = txguard.SessionRegistry(sa.create_engine(f"sqlite:///{tmp_path}/f.db"))
    app = Flask(__name__)
    installed_at = sys._getframe().f_lineno + 1
    TxGuard(registry=registry).init_app(app)

    @app.errorhandler(404)
    def not_found(error: Exception) -> tuple[str, int]:
        return _commit_in_view(registry), 404

    message = _commit_message(app, "/nowhere")
    assert "flask" + os.sep not in message, message
    where = f"{__file__.rsplit(os.sep, 1)[-1]}:{installed_at} in "
    assert f"{where}test_flask_message_for_a_404_names_where_txguard_was_installed()" in message


def test_flask_message_names_blueprint_and_wrapped_views(tmp_path: Path) -> None:
    registry = txguard.SessionRegistry(sa.create_engine(f"sqlite:///{tmp_path}/f.db"))
    app = Flask(__name__)
    TxGuard(app, registry=registry)
    bp = Blueprint("bp", __name__)

    def deco(fn: Callable[[], str]) -> Callable[[], str]:
        @functools.wraps(fn)
        def wrapper() -> str:
            return fn()
        return wrapper

    @bp.get("/bp")
    def in_blueprint() -> str:
        return _commit_in_view(registry)

    @app.get("/deco")
    @deco
    def decorated() -> str:
        return _commit_in_view(registry)

    app.register_blueprint(bp)
    assert "in in_blueprint()" in _commit_message(app, "/bp")
    assert "in decorated()" in _commit_message(app, "/deco")


async def test_asgi_task_outliving_the_request_is_reported(tmp_path: Path) -> None:
    txguard.install(mixed_begin="error", leaks="warn", cross_thread="error", cross_task="error")
    aengine = create_async_engine(f"sqlite+aiosqlite:///{tmp_path}/bg.db")
    registry = txguard.SessionRegistry(aengine)
    response_sent = asyncio.Event()
    outcome: list[BaseException | None] = []
    tasks: list[asyncio.Task[None]] = []

    async def later(s: Any) -> None:
        await response_sent.wait()
        try:
            await s.execute(sa.text("SELECT 1"))
            outcome.append(None)
        except BaseException as exc:  # the guard's report (CrossTaskWarning at "error")
            outcome.append(exc)

    async def view(request: Request) -> PlainTextResponse:
        s = txguard.current_session(registry)
        await s.execute(sa.text("SELECT 1"))
        tasks.append(asyncio.create_task(later(s)))
        return PlainTextResponse("ok")

    app = Starlette(routes=[Route("/", view)])
    app.add_middleware(UnitOfWorkMiddleware, registry=registry)
    try:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            assert (await client.get("/")).status_code == 200
        assert aengine.sync_engine.pool.checkedout() == 0
        response_sent.set()
        await asyncio.gather(*tasks)
        assert outcome != [None], "the late statement ran unreported"
        assert aengine.sync_engine.pool.checkedout() == 0  # its autobegun transaction, ended by nobody
    finally:
        txguard.uninstall()
        await aengine.dispose()



def test_flask_callbacks_around_an_intermediate_commit_and_a_failed_final_one(pg: sa.Engine) -> None:
    registry = txguard.SessionRegistry(pg)
    app = Flask(__name__)
    TxGuard(app, registry=registry, mode="commit_as_you_go")
    events: list[str] = []

    @app.post("/")
    def view() -> str:
        s = txguard.current_session(registry)
        s.execute(sa.text("INSERT INTO adv_child VALUES (1, NULL)"))
        txguard.on_commit(lambda: events.append("commit-1"), registry=registry)
        txguard.on_rollback(lambda: events.append("rollback-1"), registry=registry)
        s.commit()
        events.append("view")
        s.execute(sa.text("INSERT INTO adv_child VALUES (2, 999)"))
        txguard.on_commit(lambda: events.append("commit-2"), registry=registry)
        txguard.on_rollback(lambda: events.append("rollback-2"), registry=registry)
        return "ok"

    assert app.test_client().post("/").status_code == 500
    assert events == ["commit-1", "view", "rollback-2"]
    assert children(pg) == [1]
    assert pg.pool.checkedout() == 0


async def test_asgi_statement_after_the_response_start_is_reported(tmp_path: Path) -> None:
    txguard.install(mixed_begin="error", leaks="warn", cross_thread="error", cross_task="error")
    aengine = create_async_engine(f"sqlite+aiosqlite:///{tmp_path}/after.db")
    registry = txguard.SessionRegistry(aengine)
    outcome: list[BaseException | None] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        s = txguard.current_session(registry)
        await s.execute(sa.text("SELECT 1"))
        await send({"type": "http.response.start", "status": 200, "headers": []})
        try:
            await s.execute(sa.text("SELECT 1"))  # the unit has committed and closed the session
            outcome.append(None)
        except BaseException as exc:
            outcome.append(exc)
        await send({"type": "http.response.body", "body": b"ok"})

    try:
        transport = httpx.ASGITransport(app=UnitOfWorkMiddleware(app, registry=registry))
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            assert (await client.get("/")).status_code == 200
        assert outcome != [None], "the statement after the unit ended ran unreported"
        assert aengine.sync_engine.pool.checkedout() == 0
    finally:
        txguard.uninstall()
        await aengine.dispose()


async def test_asgi_child_statement_in_flight_at_the_start_is_not_half_committed(pg: sa.Engine) -> None:
    aengine = create_async_engine(PG)  # psycopg async: its connection lock queues the COMMIT
    registry = txguard.SessionRegistry(aengine)
    holder = pg.connect()
    holder.execute(sa.text("SELECT pg_advisory_lock(4204)"))
    holder.commit()
    tasks: list[asyncio.Task[None]] = []
    child_error: list[BaseException] = []

    async def child(s: Any) -> None:
        try:
            await s.execute(sa.text("INSERT INTO adv_parent VALUES (2)"))
            await s.execute(sa.text("SELECT pg_advisory_lock(4204)"))  # in flight at the start
            await s.execute(sa.text("INSERT INTO adv_parent VALUES (3)"))
        except BaseException as exc:
            child_error.append(exc)

    async def view(request: Request) -> PlainTextResponse:
        s = txguard.current_session(registry)
        await s.execute(sa.text("INSERT INTO adv_parent VALUES (1)"))
        tasks.append(asyncio.create_task(child(s)))
        while not holder.scalar(sa.text(
                "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
                "AND query LIKE 'SELECT pg_advisory_lock%'")):
            holder.commit()
            await asyncio.sleep(0.01)
        holder.execute(sa.text("SELECT pg_advisory_unlock(4204)"))
        holder.commit()
        return PlainTextResponse("ok")

    app = Starlette(routes=[Route("/", view)])
    app.add_middleware(UnitOfWorkMiddleware, registry=registry)
    try:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            status = (await client.get("/")).status_code
        await asyncio.gather(*tasks)
        with pg.connect() as conn:
            committed = sorted(conn.scalars(sa.text("SELECT id FROM adv_parent")))
        assert (status, committed) in [(200, [1, 2, 3]), (500, [])], (status, committed, child_error)
        assert aengine.sync_engine.pool.checkedout() == 0
    finally:
        holder.close()
        await aengine.dispose()


def test_asgi_websocket_commit_as_you_go_commits_pending_work_on_return(tmp_path: Path) -> None:
    txguard.install(mixed_begin="error", leaks="warn", cross_thread="error", cross_task="error")
    url = f"{tmp_path}/ws.db"
    engine = sa.create_engine(f"sqlite:///{url}")
    with engine.begin() as conn:
        conn.execute(sa.text("CREATE TABLE t (id INTEGER PRIMARY KEY)"))
    aengine = create_async_engine(f"sqlite+aiosqlite:///{url}")
    registry = txguard.SessionRegistry(aengine)

    async def ws(websocket: WebSocket) -> None:
        await websocket.accept()
        s = txguard.current_session(registry)
        await s.execute(sa.text("INSERT INTO t VALUES (1)"))
        await s.commit()
        await s.execute(sa.text("INSERT INTO t VALUES (2)"))  # pending when the app returns
        await websocket.send_text("hi")
        await websocket.close()

    app = Starlette(routes=[WebSocketRoute("/ws", ws)])
    app.add_middleware(UnitOfWorkMiddleware, registry=registry, scope_types=("http", "websocket"),
                       mode="commit_as_you_go")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", txguard.UncommittedWorkWarning)
            with TestClient(app) as client, client.websocket_connect("/ws") as socket:
                assert socket.receive_text() == "hi"
        with engine.connect() as conn:
            assert sorted(conn.scalars(sa.text("SELECT id FROM t"))) == [1, 2]
        assert aengine.sync_engine.pool.checkedout() == 0
    finally:
        txguard.uninstall()
        engine.dispose()


@pytest.mark.parametrize("driver", ["+asyncpg", "+psycopg"])
async def test_a_unit_ended_while_a_gathered_task_connects_returns_the_connection(
    pg: sa.Engine, driver: str
) -> None:
    """``gather`` of two services on the request's session: the second is reported (cross_task
    at "error") while the first is still provisioning the session's connection, so the unit
    ends (a 500) with SQLAlchemy refusing to close the session mid-connect. The unit closes
    it once that task is out: nothing is committed and no connection stays checked out."""
    from tests.test_adversary_today import slow_connects

    aengine = create_async_engine(PG.replace("+psycopg", driver))
    connecting, go_on = slow_connects(aengine)
    registry = txguard.SessionRegistry(aengine)
    tasks: list[asyncio.Future[Any]] = []

    async def one(i: int) -> None:
        await txguard.current_session(registry).execute(sa.text(f"INSERT INTO adv_parent VALUES ({i})"))

    async def second() -> None:
        await connecting.wait()
        asyncio.get_running_loop().call_later(0.2, go_on.set)
        await one(2)

    async def view(request: Request) -> PlainTextResponse:
        tasks.append(gathered := asyncio.gather(one(1), second()))
        await gathered
        return PlainTextResponse("ok")

    app = Starlette(routes=[Route("/", view)])
    app.add_middleware(UnitOfWorkMiddleware, registry=registry)
    try:
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            assert (await client.get("/")).status_code == 500
        assert connecting.is_set()
        await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 5)
        with pg.connect() as conn:
            assert list(conn.scalars(sa.text("SELECT id FROM adv_parent"))) == []
        assert aengine.sync_engine.pool.checkedout() == 0
    finally:
        await aengine.dispose()
