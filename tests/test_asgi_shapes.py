"""txguard.asgi.UnitOfWorkMiddleware under the guards at "error", for the shapes of response
real apps produce (streams, files, errors before and after the start, disconnects,
background tasks, BaseHTTPMiddleware), cancellation of the request at each of its awaits,
and the cross_task guard still catching concurrent use inside a request."""

import asyncio
import contextvars
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from starlette.applications import Starlette
from starlette.background import BackgroundTask
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.base import BaseHTTPMiddleware
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response, StreamingResponse
from starlette.routing import Route

import txguard
from tests.apps.asgi_units_app import _foreign_keys, fail_commit
from tests.models import Item
from tests.test_adversary_web import Db, client, db  # noqa: F401 (the fixture)
from txguard.asgi import UnitOfWorkMiddleware


def star(db: Db, *routes: Route, middleware: list[Middleware] | None = None) -> Starlette:
    """A Starlette app with ``routes`` (POST), ``middleware`` inside the unit's middleware."""
    app = Starlette(routes=list(routes), middleware=middleware)
    app.add_middleware(UnitOfWorkMiddleware, registry=db.aio)
    return app


def post(path: str, endpoint: Any) -> Route:
    return Route(path, endpoint, methods=["POST"])


def add(db: Db, name: str) -> None:
    txguard.current_session(db.aio).add(Item(name=name))


async def flushed(db: Db, name: str) -> None:
    add(db, name)
    await txguard.current_session(db.aio).flush()


async def counted(db: Db) -> int:
    """A service running a statement on the request's session."""
    count = await txguard.current_session(db.aio).scalar(sa.select(sa.func.count()).select_from(Item))
    return int(count or 0)


# ---------------------------------------------------------------- responses


def test_a_stream_of_a_sync_iterator_commits_before_its_start(db: Db) -> None:
    """StreamingResponse over a plain iterator (produced in worker threads): committed, 200."""
    async def endpoint(request: Request) -> Response:
        await flushed(db, "sync-stream")
        return StreamingResponse(iter([b"a", b"b"]))

    r = client(star(db, post("/x", endpoint))).post("/x")
    assert (r.status_code, r.content) == (200, b"ab")
    assert db.names() == ["sync-stream"]
    assert db.checked_out() == [0, 0]


def test_a_stream_with_an_error_status_rolls_back_and_still_streams(db: Db) -> None:
    """A 503 stream: rolled back at its start, its body still reaches the client."""
    async def body() -> AsyncIterator[bytes]:
        yield b"down"

    async def endpoint(request: Request) -> Response:
        await flushed(db, "unavailable")
        return StreamingResponse(body(), status_code=503)

    r = client(star(db, post("/x", endpoint))).post("/x")
    assert (r.status_code, r.content) == (503, b"down")
    assert db.names() == []


def test_a_file_response_commits(db: Db, tmp_path: Path) -> None:
    """FileResponse (its start sent from a child task of Starlette's): committed, the file sent."""
    path = tmp_path / "report.txt"
    path.write_bytes(b"file body")

    async def endpoint(request: Request) -> Response:
        await flushed(db, "file")
        return FileResponse(path)

    r = client(star(db, post("/x", endpoint))).post("/x")
    assert (r.status_code, r.content) == (200, b"file body")
    assert db.names() == ["file"]


def test_a_file_response_with_a_missing_file_rolls_back(db: Db, tmp_path: Path) -> None:
    """FileResponse of a file that is gone raises before its start: rolled back, 500."""
    async def endpoint(request: Request) -> Response:
        await flushed(db, "gone")
        return FileResponse(tmp_path / "missing.txt")

    assert client(star(db, post("/x", endpoint))).post("/x").status_code == 500
    assert db.names() == []
    assert db.checked_out() == [0, 0]


def test_a_failed_commit_replaces_a_stream_with_a_500(db: Db) -> None:
    """A stream whose COMMIT fails: the client gets a bare 500, not the stream; nothing kept."""
    sa.event.listen(db.async_engine.sync_engine, "connect", _foreign_keys)
    body_ran: list[bool] = []

    async def body() -> AsyncIterator[bytes]:
        body_ran.append(True)
        yield b"never"

    async def endpoint(request: Request) -> Response:
        await flushed(db, "doomed")
        await txguard.current_session(db.aio).run_sync(fail_commit, db.engine)
        return StreamingResponse(body())

    r = client(star(db, post("/x", endpoint))).post("/x")
    assert (r.status_code, r.content) == (500, b"Internal Server Error")
    assert db.names() == []
    assert db.checked_out() == [0, 0]


def test_an_http_exception_rolls_back(db: Db) -> None:
    """HTTPException(409) after a flush: Starlette answers 409, the unit rolls back."""
    async def endpoint(request: Request) -> Response:
        await flushed(db, "conflict")
        raise HTTPException(status_code=409)

    assert client(star(db, post("/x", endpoint))).post("/x").status_code == 409
    assert db.names() == []


def test_an_app_raising_after_the_start_keeps_the_commit(db: Db) -> None:
    """A pure ASGI app that sends a 200 start then raises: decided at the start, committed."""
    async def app(scope: Any, receive: Any, send: Any) -> None:
        await flushed(db, "started")
        await send({"type": "http.response.start", "status": 200, "headers": []})
        raise RuntimeError("after the start")

    with pytest.raises(RuntimeError, match="after the start"):
        client_raising(UnitOfWorkMiddleware(app, registry=db.aio)).post("/x")
    assert db.names() == ["started"]
    assert db.checked_out() == [0, 0]


def client_raising(app: Any) -> Any:
    from starlette.testclient import TestClient
    return TestClient(app)


def test_background_tasks_run_after_the_commit_outside_the_unit(db: Db) -> None:
    """A BackgroundTask sees the row committed, from its own unit, with the request's ended."""
    seen: list[object] = []

    async def check() -> None:
        seen.append(txguard.in_transaction(db.aio))
        async with txguard.unit_of_work(registry=db.aio) as s:
            seen.append(await s.scalar(sa.select(sa.func.count()).select_from(Item)))

    async def endpoint(request: Request) -> Response:
        await flushed(db, "first")
        return JSONResponse({"ok": True}, background=BackgroundTask(check))

    assert client(star(db, post("/x", endpoint))).post("/x").status_code == 200
    assert seen == [False, 1]
    assert db.checked_out() == [0, 0]


def test_a_client_disconnecting_mid_stream_keeps_the_commit(db: Db) -> None:
    """The client goes away after the first chunk: committed at the start; the pool is clean."""
    async def body() -> AsyncIterator[bytes]:
        yield b"first"
        await asyncio.sleep(3600)  # Starlette cancels it when the disconnect arrives
        yield b"never"

    async def endpoint(request: Request) -> Response:
        await flushed(db, "left")
        return StreamingResponse(body())

    sent = asyncio.run(drive(db, star(db, post("/x", endpoint)), disconnect_after_body=True))
    assert [m["type"] for m in sent] == ["http.response.start", "http.response.body"]
    assert db.names() == ["left"]
    assert db.checked_out() == [0, 0]


def test_a_client_disconnecting_before_the_start_rolls_back(db: Db) -> None:
    """An app that sees the client gone and returns without a response: rolled back."""
    async def app(scope: Any, receive: Any, send: Any) -> None:
        await flushed(db, "impatient")
        while (await receive())["type"] != "http.disconnect":
            pass

    assert asyncio.run(drive(db, UnitOfWorkMiddleware(app, registry=db.aio),
                             disconnect_at_once=True)) == []
    assert db.names() == []
    assert db.checked_out() == [0, 0]


async def drive(
    db: Db, app: Any, *, disconnect_after_body: bool = False, disconnect_at_once: bool = False
) -> list[dict[str, Any]]:
    """Run one POST /x through ``app`` as a server would; return what it sent."""
    sent: list[dict[str, Any]] = []
    gone = asyncio.Event()
    requested = False

    async def receive() -> dict[str, Any]:
        nonlocal requested
        if not requested:
            requested = True
            return {"type": "http.request", "body": b"", "more_body": False}
        if not disconnect_at_once:
            await gone.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        if gone.is_set():
            raise OSError("the client has gone")
        sent.append(message)
        if disconnect_after_body and message["type"] == "http.response.body":
            gone.set()

    try:
        await app(scope(), receive, send)
    finally:
        await db.async_engine.dispose()
    return sent


def scope(path: str = "/x") -> dict[str, Any]:
    return {"type": "http", "method": "POST", "path": path, "raw_path": path.encode(),
            "query_string": b"", "headers": [], "root_path": "", "scheme": "http",
            "server": ("t", 80), "client": ("c", 1), "http_version": "1.1",
            "asgi": {"version": "3.0", "spec_version": "2.3"}}


# ---------------------------------------------------------------- BaseHTTPMiddleware


class Passthrough(BaseHTTPMiddleware):
    async def dispatch(self, request: Request, call_next: Any) -> Response:
        return await call_next(request)


def test_a_stream_behind_base_http_middleware_commits(db: Db) -> None:
    """BaseHTTPMiddleware + a streaming endpoint (SQL in call_next's child task): committed."""
    async def body() -> AsyncIterator[bytes]:
        yield b"s"

    async def endpoint(request: Request) -> Response:
        await flushed(db, "behind")
        return StreamingResponse(body())

    app = star(db, post("/x", endpoint), middleware=[Middleware(Passthrough)])
    r = client(app).post("/x")
    assert (r.status_code, r.content) == (200, b"s")
    assert db.names() == ["behind"]
    assert db.checked_out() == [0, 0]


def test_sql_in_two_nested_base_http_middlewares_and_the_endpoint_commits(db: Db) -> None:
    """Two BaseHTTPMiddlewares doing SQL before and after call_next, and the endpoint: each
    runs in a task the one before started; one unit, committed, no guard error."""
    class Audit(BaseHTTPMiddleware):
        def __init__(self, app: Any, name: str) -> None:
            super().__init__(app)
            self.name = name

        async def dispatch(self, request: Request, call_next: Any) -> Response:
            await flushed(db, f"{self.name}-before")
            response = await call_next(request)
            await flushed(db, f"{self.name}-after")
            return response

    async def endpoint(request: Request) -> Response:
        await flushed(db, "endpoint")
        return JSONResponse({"ok": True})

    app = star(db, post("/x", endpoint),
               middleware=[Middleware(Audit, name="outer"), Middleware(Audit, name="inner")])
    assert client(app).post("/x").status_code == 200
    assert db.names() == sorted(["outer-before", "inner-before", "endpoint", "inner-after",
                                 "outer-after"])
    assert db.checked_out() == [0, 0]


def test_an_error_status_behind_base_http_middleware_rolls_back(db: Db) -> None:
    """BaseHTTPMiddleware + a 422 from the endpoint: rolled back."""
    async def endpoint(request: Request) -> Response:
        await flushed(db, "invalid")
        return JSONResponse({"error": True}, status_code=422)

    app = star(db, post("/x", endpoint), middleware=[Middleware(Passthrough)])
    assert client(app).post("/x").status_code == 422
    assert db.names() == []


# ---------------------------------------------------------------- the guard still tells


def guard_error(db: Db, endpoint: Any, middleware: list[Middleware] | None = None) -> str:
    """POST to ``endpoint``; assert a 500 and nothing committed; return the guard's message."""
    errors: list[BaseException] = []

    async def catching(request: Request) -> Response:
        try:
            return await endpoint(request)  # type: ignore[no-any-return]
        except txguard.CrossTaskWarning as exc:
            errors.append(exc)
            raise

    r = client(star(db, post("/x", catching), middleware=middleware)).post("/x")
    assert r.status_code == 500
    assert db.names() == []
    assert db.checked_out() == [0, 0]
    assert len(errors) == 1
    return str(errors[0])


def test_two_tasks_of_a_request_on_its_session_at_once_are_caught(db: Db) -> None:
    """gather() of two services using the request's session: concurrent use, reported."""
    async def endpoint(request: Request) -> Response:
        add(db, "lost")
        await asyncio.gather(counted(db), counted(db))
        return JSONResponse({})

    message = guard_error(db, endpoint)
    assert "which is still running, uses it" in message


def test_two_tasks_behind_base_http_middleware_are_caught(db: Db) -> None:
    """The same gather() in an endpoint behind BaseHTTPMiddleware: reported."""
    async def endpoint(request: Request) -> Response:
        await flushed(db, "first")
        await asyncio.gather(counted(db), counted(db))
        return JSONResponse({})

    guard_error(db, endpoint, middleware=[Middleware(Passthrough)])


def test_a_child_task_using_the_session_while_the_endpoint_is_inside_it_is_caught(db: Db) -> None:
    """A child task's statement while the endpoint's own statement is in flight: reported."""
    async def endpoint(request: Request) -> Response:
        session = txguard.current_session(db.aio)
        child = asyncio.ensure_future(flushed(db, "child"))
        await session.execute(sa.select(sa.func.count()).select_from(Item))
        await child
        return JSONResponse({})

    guard_error(db, endpoint)


def test_the_endpoint_using_the_session_while_a_child_is_inside_it_is_caught(db: Db) -> None:
    """The endpoint's statement while a child task it lent the session to is inside it."""
    async def endpoint(request: Request) -> Response:
        session = txguard.current_session(db.aio)
        child = asyncio.ensure_future(flushed(db, "child"))
        await asyncio.sleep(0)  # the child starts its flush and waits for the database
        await session.execute(sa.select(sa.func.count()).select_from(Item))
        await child
        return JSONResponse({})

    guard_error(db, endpoint)


def test_a_task_that_did_not_inherit_the_unit_is_caught(db: Db) -> None:
    """A task started in an empty context (not inside the unit) using the session: reported."""
    async def endpoint(request: Request) -> Response:
        session = txguard.current_session(db.aio)
        await session.execute(sa.select(Item.id))
        session.add(Item(name="outsider"))
        loop = asyncio.get_running_loop()
        # A task created inside an empty context copies it (create_task(context=) is 3.11+).
        await contextvars.Context().run(loop.create_task, session.flush())
        return JSONResponse({})

    guard_error(db, endpoint)


def test_one_child_task_awaited_by_the_endpoint_is_not_concurrent_use(db: Db) -> None:
    """gather() of one service, then the endpoint again: one at a time, committed, no report."""
    async def endpoint(request: Request) -> Response:
        await flushed(db, "before")
        await asyncio.gather(flushed(db, "child"))
        await flushed(db, "after")
        return JSONResponse({})

    assert client(star(db, post("/x", endpoint))).post("/x").status_code == 200
    assert db.names() == ["after", "before", "child"]


# ---------------------------------------------------------------- cancellation


@pytest.mark.parametrize("hops", range(0, 40, 3))
def test_a_request_cancelled_at_any_step_leaves_no_trace(db: Db, hops: int) -> None:
    """The server cancels the request ``hops`` loop iterations in (BEGIN, the app, the
    start, the COMMIT, the body): CancelledError, the pool clean, and a 200 start that went
    out means committed."""
    async def body() -> AsyncIterator[bytes]:
        yield b"a"
        await asyncio.sleep(0)
        yield b"b"

    async def endpoint(request: Request) -> Response:
        await flushed(db, "maybe")
        return StreamingResponse(body())

    app = star(db, post("/x", endpoint))
    sent: list[str] = []

    async def main() -> BaseException | None:
        received: list[bool] = []

        async def receive() -> dict[str, Any]:  # the body once, then a client that stays
            if not received:
                received.append(True)
                return {"type": "http.request", "body": b"", "more_body": False}
            await asyncio.sleep(3600)
            return {"type": "http.disconnect"}

        async def send(message: dict[str, Any]) -> None:
            sent.append(message["type"])

        task = asyncio.ensure_future(app(scope(), receive, send))
        for _ in range(hops):
            await asyncio.sleep(0)
        task.cancel()
        try:
            await task
        except BaseException as exc:
            return exc
        finally:
            await db.async_engine.dispose()
        return None

    outcome = asyncio.run(main())
    assert outcome is None or isinstance(outcome, asyncio.CancelledError)
    assert db.checked_out() == [0, 0]
    if "http.response.start" in sent:
        assert db.names() == ["maybe"]
    if outcome is not None and not sent:
        assert db.names() == []
