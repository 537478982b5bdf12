"""Adversary (adv3): the framework integrations in shapes the other tests do not try.

Celery's ``delay_on_commit`` in units whose COMMIT is refused (a deferred constraint) or
never happens (the backend killed), and in a retried unit; websockets with the ASGI
middleware opted in and with ``txguard.fastapi.session()``; yield dependencies around
``session()``; and, under uvicorn in a subprocess on SQLite (a file), PostgreSQL and
MariaDB: a streamed body that raises after the start, a client that gives up mid-request,
background tasks asking for ``current_session()``. Every guard is at "error".
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import sqlalchemy as sa
from fastapi import Depends, FastAPI, Request, WebSocket
from sqlalchemy.ext.asyncio import AsyncSession, create_async_engine
from sqlalchemy.orm import Session
from starlette.applications import Starlette
from starlette.routing import WebSocketRoute
from starlette.testclient import TestClient
from starlette.websockets import WebSocketDisconnect

import txguard
from tests.apps.celery_app import record
from tests.backends import SYNC_URLS, require
from tests.test_celery_integration import QUEUE, queued
from tests.test_celery_integration import broker as redis_broker
from tests.test_real_fastapi import urls, uvicorn
from txguard.asgi import UnitOfWorkMiddleware
from txguard.celery import apply_async_on_commit, delay_on_commit
from txguard.fastapi import session

PG = SYNC_URLS["postgresql"]
PG_ASYNC = sa.make_url(PG).set(drivername="postgresql+asyncpg").render_as_string(hide_password=False)
SCHEMA = [
    "DROP TABLE IF EXISTS adv3_uniq",
    "CREATE TABLE adv3_uniq (id INTEGER PRIMARY KEY, k INTEGER, "
    "UNIQUE (k) DEFERRABLE INITIALLY DEFERRED)",
    # A COMMIT that takes 0.3 s: a deferred constraint trigger sleeps for each row of adv3_slow.
    "DROP TABLE IF EXISTS adv3_slow",
    "CREATE TABLE adv3_slow (k INTEGER)",
    "CREATE OR REPLACE FUNCTION adv3_sleep() RETURNS trigger LANGUAGE plpgsql AS "
    "$$ BEGIN PERFORM pg_sleep(0.3); RETURN NULL; END $$",
    "CREATE CONSTRAINT TRIGGER adv3_slow_commit AFTER INSERT ON adv3_slow "
    "DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION adv3_sleep()",
]


@pytest.fixture
def pg() -> Iterator[sa.Engine]:
    """PostgreSQL with a table whose unique constraint is checked at COMMIT; guards at "error"."""
    require("postgresql")
    engine = sa.create_engine(PG)
    with engine.begin() as conn:
        for ddl in SCHEMA:
            conn.execute(sa.text(ddl))
    txguard.install(mixed_begin="error", leaks="error", cross_thread="error", cross_task="error")
    try:
        yield engine
        assert engine.pool.checkedout() == 0
    finally:
        txguard.uninstall()
        engine.dispose()


def keys(engine: sa.Engine) -> list[int]:
    with engine.connect() as conn:
        return sorted(conn.scalars(sa.text("SELECT k FROM adv3_uniq")))


# --- Celery: nothing is enqueued unless the COMMIT went through ------------------------------


@pytest.fixture
def broker(redis_broker: Any) -> Any:
    """The Redis database the tests use as Celery's broker, emptied for each test.

    No worker runs: what a unit enqueued waits in the queue, where the test counts it.
    """
    redis_broker.flushdb()
    return redis_broker


def test_celery_a_commit_refused_by_a_deferred_constraint_enqueues_nothing(
    pg: sa.Engine, broker: Any
) -> None:
    txguard.configure(pg)
    with txguard.unit_of_work() as s:  # the control: a COMMIT that goes through enqueues
        s.execute(sa.text("INSERT INTO adv3_uniq VALUES (1, 1)"))
        delay_on_commit(record, PG, "good")
    assert queued(broker) == 1
    with pytest.raises(sa.exc.IntegrityError), txguard.unit_of_work() as s:
        s.execute(sa.text("INSERT INTO adv3_uniq VALUES (2, 1)"))  # refused only at COMMIT
        delay_on_commit(record, PG, "refused")
    assert queued(broker) == 1
    assert keys(pg) == [1]


async def test_celery_an_async_commit_refused_by_a_deferred_constraint_enqueues_nothing(
    pg: sa.Engine, broker: Any
) -> None:
    aengine = create_async_engine(PG_ASYNC)
    registry = txguard.SessionRegistry(aengine)
    try:
        with pytest.raises(sa.exc.IntegrityError):
            async with txguard.unit_of_work(registry=registry) as s:
                await s.execute(sa.text("INSERT INTO adv3_uniq VALUES (1, 1), (2, 1)"))
                apply_async_on_commit(record, (PG, "refused"), registry=registry)
        assert queued(broker) == 0
        assert aengine.sync_engine.pool.checkedout() == 0
    finally:
        await aengine.dispose()
    assert keys(pg) == []


def kill(engine: sa.Engine, pid: int) -> None:
    with engine.connect() as conn:
        assert conn.scalar(sa.text("SELECT pg_terminate_backend(:pid)"), {"pid": pid})
        conn.commit()


def test_celery_a_backend_killed_before_the_commit_enqueues_nothing(pg: sa.Engine, broker: Any) -> None:
    txguard.configure(pg)
    with pytest.raises(sa.exc.DBAPIError), txguard.unit_of_work() as s:
        s.execute(sa.text("INSERT INTO adv3_uniq VALUES (1, 1)"))
        delay_on_commit(record, PG, "killed")
        kill(pg, s.scalar(sa.text("SELECT pg_backend_pid()")))
    assert queued(broker) == 0
    assert keys(pg) == []


def test_celery_a_retried_unit_enqueues_once_for_the_attempt_that_committed(
    pg: sa.Engine, broker: Any
) -> None:
    """The first attempt enqueues, then loses its connection; only the second one's task is sent."""
    txguard.configure(pg)
    attempts: list[int] = []

    @txguard.transactional(retries=2, backoff=0)
    def place(k: int) -> None:
        s = txguard.current_session()
        attempts.append(k)
        s.execute(sa.text("INSERT INTO adv3_uniq VALUES (:k, :k)"), {"k": k})
        delay_on_commit(record, PG, f"attempt-{len(attempts)}")
        if len(attempts) == 1:
            kill(pg, s.scalar(sa.text("SELECT pg_backend_pid()")))
            s.execute(sa.text("SELECT 1"))  # the connection is gone: a retryable error

    place(7)
    assert len(attempts) == 2
    assert queued(broker) == 1
    message = broker.lindex(QUEUE, 0).decode()
    assert "attempt-2" in message and "attempt-1" not in message
    assert keys(pg) == [7]


def test_celery_in_a_fastapi_request_whose_commit_fails_answers_500_and_enqueues_nothing(
    pg: sa.Engine, broker: Any
) -> None:
    registry = txguard.SessionRegistry(pg)
    app = FastAPI()

    @app.post("/order/{k}")
    def order(k: int, db: Session = session(registry=registry)) -> dict[str, int]:
        db.execute(sa.text("INSERT INTO adv3_uniq VALUES (:k, 1)"), {"k": k})
        apply_async_on_commit(record, (PG, f"order-{k}"), registry=registry)
        return {"k": k}

    with TestClient(app, raise_server_exceptions=False) as client:
        assert client.post("/order/1").status_code == 200
        assert queued(broker) == 1
        assert client.post("/order/2").status_code == 500  # k=1 again: refused at COMMIT
    assert queued(broker) == 1
    assert keys(pg) == [1]


async def test_celery_a_task_started_in_a_unit_that_rolled_back_enqueues_nothing_later(
    pg: sa.Engine, broker: Any
) -> None:
    aengine = create_async_engine(PG_ASYNC)
    registry = txguard.SessionRegistry(aengine)
    """A fire-and-forget task of a unit that rolled back calls apply_async_on_commit after
    the unit ended: nothing is enqueued (it is dropped, as if registered in time)."""
    outcome: list[str] = []

    async def notify_later() -> None:  # fire-and-forget, as "send the mail in the background"
        await asyncio.sleep(0.05)
        try:
            apply_async_on_commit(record, (PG, "rolled-back"), registry=registry)
            outcome.append("returned")
        except txguard.TxGuardError as exc:
            outcome.append(type(exc).__name__)

    try:
        with pytest.raises(RuntimeError):
            async with txguard.unit_of_work(registry=registry) as s:
                await s.execute(sa.text("INSERT INTO adv3_uniq VALUES (1, 1)"))
                task = asyncio.create_task(notify_later())
                raise RuntimeError("payment declined")
        await task
    finally:
        await aengine.dispose()
    assert keys(pg) == []
    assert (queued(broker), outcome) == (0, ["returned"])


@pytest.mark.parametrize("kind", ["sync", "async"])
def test_a_fastapi_request_whose_backend_is_killed_answers_500_and_returns_its_connection(
    pg: sa.Engine, broker: Any, kind: str
) -> None:
    """pg_terminate_backend() on the request's connection before its COMMIT: a 500, nothing
    enqueued, the connection back in the pool, and the next request served."""
    aengine = create_async_engine(PG_ASYNC)
    registry = txguard.SessionRegistry(pg if kind == "sync" else aengine)
    app = FastAPI()
    insert = sa.text("INSERT INTO adv3_uniq VALUES (:k, :k)")
    pid = sa.text("SELECT pg_backend_pid()")

    @app.post("/sync/{k}")
    def sync_order(k: int, request: Request, db: Session = session(registry=registry)) -> dict[str, int]:
        db.execute(insert, {"k": k})
        apply_async_on_commit(record, (PG, f"order-{k}"), registry=registry)
        if request.query_params.get("kill"):
            kill(pg, db.scalar(pid))
        return {"k": k}

    @app.post("/async/{k}")
    async def async_order(
        k: int, request: Request, db: AsyncSession = session(registry=registry)
    ) -> dict[str, int]:
        await db.execute(insert, {"k": k})
        apply_async_on_commit(record, (PG, f"order-{k}"), registry=registry)
        if request.query_params.get("kill"):
            kill(pg, (await db.execute(pid)).scalar_one())
        return {"k": k}

    async def check_async_pool() -> None:
        assert aengine.sync_engine.pool.checkedout() == 0
        await aengine.dispose()

    with TestClient(app, raise_server_exceptions=False) as client:
        assert client.post(f"/{kind}/1", params={"kill": 1}).status_code == 500
        assert client.post(f"/{kind}/2").status_code == 200
        client.portal.call(check_async_pool)
    assert queued(broker) == 1
    assert broker.lindex(QUEUE, 0).decode().count("order-2") == 1
    assert keys(pg) == [2]


def test_celery_in_a_connect_block_waits_for_its_commit_and_is_dropped_on_rollback(
    pg: sa.Engine, broker: Any
) -> None:
    txguard.configure(pg)
    in_block: list[int] = []
    with pytest.raises(RuntimeError), txguard.connect() as conn:
        conn.execute(sa.text("INSERT INTO adv3_uniq VALUES (1, 1)"))
        delay_on_commit(record, PG, "rolled-back")
        raise RuntimeError("payment declined")
    with txguard.connect() as conn:
        conn.execute(sa.text("INSERT INTO adv3_uniq VALUES (2, 2)"))
        delay_on_commit(record, PG, "committed")
        in_block.append(queued(broker))
    assert keys(pg) == [2]
    assert (in_block, queued(broker)) == ([0], 1)


# --- Websockets: the close goes out after the COMMIT ---------------------------------------


def _websocket_app(registry: txguard.SessionRegistry[Any], sql: str) -> Starlette:
    async def ws(websocket: WebSocket) -> None:
        await websocket.accept()
        await txguard.current_session(registry).execute(sa.text(sql))
        await websocket.send_text("saved")
        await websocket.close()

    app = Starlette(routes=[WebSocketRoute("/ws", ws)])
    app.add_middleware(UnitOfWorkMiddleware, registry=registry, scope_types=("http", "websocket"))
    return app


def close_code(app: Any) -> int:
    """Connect, read the "saved" message, and return the code the server closed with."""
    with TestClient(app, raise_server_exceptions=False) as client:
        with client.websocket_connect("/ws") as socket:
            assert socket.receive_text() == "saved"
            with pytest.raises(WebSocketDisconnect) as closed:
                socket.receive_text()
    return closed.value.code


def test_asgi_websocket_whose_commit_fails_is_closed_with_1011_not_1000(
    pg: sa.Engine, caplog: pytest.LogCaptureFixture
) -> None:
    """The app closes normally, then its COMMIT is refused: the client must not see a 1000."""
    aengine = create_async_engine(PG_ASYNC, poolclass=sa.NullPool)
    registry = txguard.SessionRegistry(aengine)
    with caplog.at_level(logging.ERROR, logger="txguard"):
        code = close_code(_websocket_app(registry, "INSERT INTO adv3_uniq VALUES (1, 1), (2, 1)"))
    assert code == 1011
    assert keys(pg) == []
    assert "COMMIT failed" in caplog.text


def test_asgi_websocket_close_goes_out_after_the_commit(pg: sa.Engine) -> None:
    """When the client sees the close, the row is committed (another connection reads it),
    although the COMMIT takes 0.3 s."""
    aengine = create_async_engine(PG_ASYNC, poolclass=sa.NullPool)
    registry = txguard.SessionRegistry(aengine)
    seen: list[list[int]] = []
    app = _websocket_app(registry, "INSERT INTO adv3_slow VALUES (1)")
    with TestClient(app) as client, client.websocket_connect("/ws") as socket:
        assert socket.receive_text() == "saved"
        assert socket.receive()["type"] == "websocket.close"
        with pg.connect() as conn:
            seen.append(list(conn.scalars(sa.text("SELECT k FROM adv3_slow"))))
    assert seen == [[1]]


def test_asgi_websocket_the_client_leaving_mid_socket_rolls_back_an_unhandled_disconnect(
    pg: sa.Engine,
) -> None:
    aengine = create_async_engine(PG_ASYNC, poolclass=sa.NullPool)
    registry = txguard.SessionRegistry(aengine)

    async def ws(websocket: WebSocket) -> None:
        await websocket.accept()
        await txguard.current_session(registry).execute(sa.text("INSERT INTO adv3_uniq VALUES (1, 1)"))
        await websocket.send_text("saved")
        await websocket.receive_text()  # the client leaves: WebSocketDisconnect, unhandled

    app = Starlette(routes=[WebSocketRoute("/ws", ws)])
    app.add_middleware(UnitOfWorkMiddleware, registry=registry, scope_types=("websocket",))
    with TestClient(app) as client, client.websocket_connect("/ws") as socket:
        assert socket.receive_text() == "saved"
    assert keys(pg) == []


def test_asgi_websocket_closed_inside_a_joined_session_unit_commits_when_the_app_returns(
    pg: sa.Engine,
) -> None:
    """session() in a FastAPI websocket endpoint under the middleware joins the socket's
    unit and is still open at the close: the close goes out at once and the unit commits at
    the return, without a DisciplineError for the joined unit."""
    aengine = create_async_engine(PG_ASYNC, poolclass=sa.NullPool)
    registry = txguard.SessionRegistry(aengine)
    app = FastAPI()

    @app.websocket("/ws")
    async def ws(websocket: WebSocket, db: AsyncSession = session(registry=registry)) -> None:
        await websocket.accept()
        await db.execute(sa.text("INSERT INTO adv3_uniq VALUES (1, 1)"))
        await websocket.send_text("saved")
        await websocket.close()

    app.add_middleware(UnitOfWorkMiddleware, registry=registry, scope_types=("websocket",))
    with TestClient(app) as client, client.websocket_connect("/ws") as socket:  # raises what the app raised
        assert socket.receive_text() == "saved"
        assert socket.receive()["type"] == "websocket.close"
    assert keys(pg) == [1]


def test_asgi_websocket_closed_before_accept_rolls_back(pg: sa.Engine) -> None:
    """A handshake the app refuses reaches the client as a 403: its work rolls back, as an
    HTTP error status's does (an accepted socket's commits, the control). Under uvicorn, an
    app returning before the accept: test_uvicorn_websocket_refused_..."""
    aengine = create_async_engine(PG_ASYNC, poolclass=sa.NullPool)
    registry = txguard.SessionRegistry(aengine)

    async def ws(websocket: WebSocket) -> None:
        k = int(websocket.query_params["k"])
        await txguard.current_session(registry).execute(
            sa.text("INSERT INTO adv3_uniq VALUES (:k, :k)"), {"k": k}
        )
        if websocket.query_params.get("accept"):
            await websocket.accept()
        await websocket.close()

    app = Starlette(routes=[WebSocketRoute("/ws", ws)])
    app.add_middleware(UnitOfWorkMiddleware, registry=registry, scope_types=("websocket",))
    with TestClient(app) as client:
        with pytest.raises(WebSocketDisconnect), client.websocket_connect("/ws?k=1"):
            pass
        with client.websocket_connect("/ws?k=2&accept=1") as socket:
            assert socket.receive()["type"] == "websocket.close"
    assert keys(pg) == [2]


# --- Yield dependencies around session() ---------------------------------------------------


def test_yield_dependencies_around_session_commit_their_cleanup_sql_and_roll_back_when_it_raises(
    pg: sa.Engine,
) -> None:
    """SQL in a function-scoped yield dependency's cleanup is inside the unit; a raise there
    rolls the whole request back and answers 500 (sync and async)."""
    aengine = create_async_engine(PG_ASYNC, poolclass=sa.NullPool)
    sync_registry, async_registry = txguard.SessionRegistry(pg), txguard.SessionRegistry(aengine)
    insert = sa.text("INSERT INTO adv3_uniq VALUES (:k, :k)")

    async def async_repo(
        request: Request, db: AsyncSession = session(registry=async_registry)
    ) -> AsyncIterator[AsyncSession]:
        yield db
        await db.execute(insert, {"k": 100 + int(request.path_params["k"])})
        if request.query_params.get("fail"):
            raise RuntimeError("the cleanup fails")

    def sync_repo(request: Request, db: Session = session(registry=sync_registry)) -> Iterator[Session]:
        yield db
        db.execute(insert, {"k": 200 + int(request.path_params["k"])})
        if request.query_params.get("fail"):
            raise RuntimeError("the cleanup fails")

    app = FastAPI()

    @app.post("/async/{k}")
    async def a(k: int, repo: AsyncSession = Depends(async_repo, scope="function")) -> dict[str, int]:
        await repo.execute(insert, {"k": k})
        return {"k": k}

    @app.post("/sync/{k}")
    def s(k: int, repo: Session = Depends(sync_repo, scope="function")) -> dict[str, int]:
        repo.execute(insert, {"k": k})
        return {"k": k}

    with TestClient(app, raise_server_exceptions=False) as client:
        assert client.post("/async/1").status_code == 200
        assert client.post("/sync/2").status_code == 200
        assert client.post("/async/3", params={"fail": 1}).status_code == 500
        assert client.post("/sync/4", params={"fail": 1}).status_code == 500
    assert keys(pg) == [1, 2, 101, 202]


# --- Under uvicorn, on SQLite (a file), PostgreSQL and MariaDB -----------------------------


class Server:
    def __init__(self, backend: str, base: str) -> None:
        self.backend, self.base = backend, base

    def settled(self) -> dict[str, Any]:
        """/stats once every pooled connection is back (cleanups run after the reply)."""
        deadline = time.monotonic() + 10
        while True:
            stats: dict[str, Any] = httpx.get(f"{self.base}/stats", timeout=30).json()
            if not any(stats["checked_out"].values()) or time.monotonic() > deadline:
                return stats
            time.sleep(0.05)

    def labels(self) -> list[str]:
        result: list[str] = httpx.get(f"{self.base}/items", timeout=30).json()
        return result


@pytest.fixture(scope="module", params=["sqlite", "postgresql", "mariadb"])
def server(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    backend: str = request.param
    require(backend)
    tmp = tmp_path_factory.mktemp(f"adv3-{backend}")
    sync_url, async_url = urls(backend, tmp)
    env = {"TXGUARD_APP_SYNC_URL": sync_url, "TXGUARD_APP_ASYNC_URL": async_url}
    with uvicorn("tests.apps.adv3_app:app", env, tmp / "server.log") as (base, _):
        yield Server(backend, base)


def websocket_exchange(base: str, target: str) -> tuple[list[str], int | None]:
    """Open a websocket to ``target`` (wsproto over a plain socket); return the texts
    received and the close code (the status of a refused handshake)."""
    from wsproto import ConnectionType, WSConnection
    from wsproto.events import (
        AcceptConnection, CloseConnection, RejectConnection, RejectData, Request, TextMessage,
    )

    host, port = base.removeprefix("http://").split(":")
    texts: list[str] = []
    code: int | None = None
    ws = WSConnection(ConnectionType.CLIENT)
    with socket.create_connection((host, int(port)), timeout=15) as sock:
        sock.sendall(ws.send(Request(host=f"{host}:{port}", target=target)))
        while code is None:
            data = sock.recv(65536)
            if not data:
                break
            ws.receive_data(data)
            for event in ws.events():
                if isinstance(event, TextMessage):
                    texts.append(event.data)
                elif isinstance(event, CloseConnection):
                    code = event.code
                    sock.sendall(ws.send(event.response()))
                elif isinstance(event, RejectConnection):
                    code = event.status_code
                else:
                    assert isinstance(event, (AcceptConnection, RejectData)), event
    return texts, code


def test_uvicorn_websocket_in_the_middleware_closes_1000_after_its_commit_and_1011_when_it_fails(
    server: Server,
) -> None:
    before = len(server.settled()["reports"])
    assert websocket_exchange(server.base, "/mw/ws?label=ws-mw&close=1") == (["saved"], 1000)
    assert websocket_exchange(server.base, "/mw/ws?label=ws-mw-bad&close=1&fail=1") == (["saved"], 1011)
    stats = server.settled()
    assert stats["checked_out"] == {"sync": 0, "async": 0}
    reports = stats["reports"][before:]  # the failed COMMIT the middleware answered with 1011
    assert len(reports) == 1 and "closed the websocket with 1011" in reports[0], reports
    labels = server.labels()
    assert "ws-mw" in labels and "ws-mw-bad" not in labels


def test_uvicorn_websocket_refused_by_returning_before_accept_rolls_back(server: Server) -> None:
    """The app returns without accepting: uvicorn refuses the handshake (a 500 on wsproto,
    403 on websockets), and the work rolls back."""
    texts, status = websocket_exchange(server.base, "/mw/refuse?label=ws-refused")
    assert (texts, status in (403, 500)) == ([], True), status
    assert server.settled()["checked_out"] == {"sync": 0, "async": 0}
    assert "ws-refused" not in server.labels()


def test_uvicorn_fastapi_websocket_endpoint_whose_commit_fails_is_not_closed_with_1000(
    server: Server,
) -> None:
    """The endpoint closes, then its unit's COMMIT is refused: the client gets 1011, not the
    normal close the endpoint sent."""
    texts, code = websocket_exchange(server.base, "/ws?label=ws-fastapi-bad&close=1&fail=1")
    assert "ws-fastapi-bad" not in server.labels()
    assert server.settled()["checked_out"] == {"sync": 0, "async": 0}
    assert (texts, code) == (["saved"], 1011)


def test_uvicorn_fastapi_websocket_endpoint_closes_after_its_commit(server: Server) -> None:
    """The close the endpoint sends goes out once its unit committed."""
    texts, code = websocket_exchange(server.base, "/ws?label=ws-fastapi-ok&close=1")
    assert (texts, code) == (["saved"], 1000)
    assert "ws-fastapi-ok" in server.labels()
    assert server.settled()["checked_out"] == {"sync": 0, "async": 0}


def test_uvicorn_a_stream_raising_after_its_start_keeps_the_commit(server: Server) -> None:
    before = len(server.settled()["reports"])
    with httpx.Client(base_url=server.base, timeout=30) as client:
        with client.stream("POST", "/stream/streamed") as response:
            assert response.status_code == 200
            with pytest.raises(httpx.RemoteProtocolError):  # the body ends short
                response.read()
    stats = server.settled()
    assert stats["reports"][before:] == []
    assert stats["checked_out"] == {"sync": 0, "async": 0}
    assert "streamed" in server.labels()


@pytest.mark.parametrize("kind", ["async", "sync"])
async def test_uvicorn_a_client_giving_up_mid_request_leaves_the_endpoint_to_finish_and_commit(
    server: Server, kind: str
) -> None:
    """uvicorn does not cancel the app when the client leaves: the endpoint runs on and its
    unit commits (as Django's ATOMIC_REQUESTS would); nothing leaks, no guard fires. 20
    clients at once (5 on SQLite, whose writers queue for its 5 s busy timeout, one 0.6 s
    request after the other)."""
    clients = 5 if server.backend == "sqlite" else 20
    names = [f"gone-{kind}-{n}" for n in range(clients)]
    before = len(server.settled()["reports"])
    timeout = httpx.Timeout(30, read=0.2)  # each request is sent, then given up on
    async with httpx.AsyncClient(base_url=server.base, timeout=timeout) as client:
        results = await asyncio.gather(
            *(client.post(f"/slow-{kind}/{name}") for name in names), return_exceptions=True
        )
    assert all(isinstance(r, httpx.ReadTimeout) for r in results), results
    await asyncio.sleep(1.0)
    stats = server.settled()
    assert stats["reports"][before:] == []
    assert stats["checked_out"] == {"sync": 0, "async": 0}
    labels = server.labels()
    assert sorted(n for n in names + [f"{n}-after" for n in names]) == sorted(
        label for label in labels if label.startswith(f"gone-{kind}-")
    )


def test_uvicorn_background_tasks_asking_for_current_session_get_a_clear_error(server: Server) -> None:
    before = len(server.settled()["reports"])
    response = httpx.post(f"{server.base}/background/bg", timeout=30)
    assert response.status_code == 200
    deadline = time.monotonic() + 10
    while len((stats := server.settled())["background"]) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert stats["background"][-2:] == [
        "sync: TransactionRequiredError", "async: TransactionRequiredError",
    ]
    assert stats["reports"][before:] == []
    assert "bg" in server.labels()


# --- Types: the recipes' calls pass mypy --strict ------------------------------------------


def test_the_integrations_as_the_recipes_call_them_pass_mypy_strict() -> None:
    """`app.add_middleware(UnitOfWorkMiddleware, registry=...)` (the ASGI recipe's line) was a
    mypy error: Starlette's _MiddlewareFactory wants the app positional-only."""
    mypy_api = pytest.importorskip("mypy.api")
    sample = Path(__file__).parent / "typing" / "integrations_app.py"
    stdout, stderr, status = mypy_api.run(["--strict", "--no-incremental", str(sample)])
    assert status == 0, stdout + stderr
