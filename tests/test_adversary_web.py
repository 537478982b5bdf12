"""Adversary: shapes real FastAPI/ASGI apps produce, against txguard.fastapi and txguard.asgi."""


import asyncio
import warnings
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
import sqlalchemy as sa
from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.responses import JSONResponse, StreamingResponse
from fastapi.testclient import TestClient
from pydantic import BaseModel
from sqlalchemy.ext.asyncio import create_async_engine
from sqlalchemy.orm import Session

import txguard
from tests.apps.flask_app import create_schema
from tests.backends import SYNC_URLS, require
from tests.models import Item
from txguard.asgi import UnitOfWorkMiddleware
from txguard.fastapi import session


PG = SYNC_URLS["postgresql"]


class Db:
    def __init__(self, tmp_path: Path, pg: bool = False) -> None:
        sync_url, async_url = (
            (PG, PG.replace("+psycopg", "+asyncpg")) if pg
            else (f"sqlite:///{tmp_path}/web.db", f"sqlite+aiosqlite:///{tmp_path}/web.db"))
        self.engine = sa.create_engine(sync_url)
        create_schema(self.engine)
        self.async_engine = create_async_engine(async_url)
        self.sync = txguard.SessionRegistry(self.engine)
        self.aio = txguard.SessionRegistry(self.async_engine)

    def names(self) -> list[str]:
        with self.engine.connect() as conn:
            return sorted(conn.scalars(sa.select(Item.name)))

    def checked_out(self) -> list[int]:
        return [self.engine.pool.checkedout(), self.async_engine.sync_engine.pool.checkedout()]  # type: ignore[attr-defined]


@pytest.fixture(params=["sqlite", "postgresql"])
def db(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Db]:
    require(request.param)
    txguard.install(mixed_begin="error", leaks="warn", cross_thread="error", cross_task="error")
    d = Db(tmp_path, pg=request.param == "postgresql")
    try:
        yield d
    finally:
        txguard.uninstall()
        d.engine.dispose()
        asyncio.run(d.async_engine.dispose())


def client(app: Any) -> TestClient:
    return TestClient(app, raise_server_exceptions=False)


# ---------------------------------------------------------------- txguard.fastapi


class Out(BaseModel):
    name: str
    count: int


def test_response_model_failure_after_the_endpoint_returned_rolls_back(db: Db) -> None:
    """A response_model validation error (500) leaves nothing committed."""
    api = FastAPI()

    @api.post("/x", response_model=Out)
    async def x(s: Any = session(registry=db.aio)) -> Any:
        s.add(Item(name="ghost"))
        return {"name": "ghost"}  # count missing

    assert client(api).post("/x").status_code == 500
    assert db.names() == []
    assert db.checked_out() == [0, 0]


def test_a_dependency_and_the_endpoint_asking_for_session_share_one_unit(db: Db) -> None:
    """A plain sub-dependency taking session() and the endpoint get the same session."""
    api = FastAPI()

    class Repo:
        def __init__(self, s: Any = session(registry=db.aio)) -> None:
            self.s = s

    @api.post("/x")
    async def x(repo: Repo = Depends(), s: Any = session(registry=db.aio)) -> dict[str, bool]:
        s.add(Item(name="one"))
        return {"same": repo.s is s and s is txguard.current_session(db.aio)}

    r = client(api).post("/x")
    assert (r.status_code, r.json()) == (200, {"same": True})
    assert db.names() == ["one"]


def test_a_yield_sub_dependency_raising_after_the_endpoint_rolls_back(db: Db) -> None:
    """A function-scoped yield dependency that raises on exit: the client gets 500, no commit."""
    api = FastAPI()

    async def audit(s: Any = session(registry=db.aio)) -> AsyncIterator[None]:
        yield
        raise RuntimeError("audit failed")

    @api.post("/x", dependencies=[Depends(audit, scope="function")])
    async def x(s: Any = session(registry=db.aio)) -> dict[str, str]:
        s.add(Item(name="audited"))
        return {"ok": "yes"}

    assert client(api).post("/x").status_code == 500
    assert db.names() == []


def test_a_yield_dependency_taking_session_is_declared_function_scoped(db: Db) -> None:
    """The repository shape: a yield dependency taking session() needs scope="function".

    session() commits before the response, so it is function-scoped; FastAPI refuses a
    default (request) scope yield dependency on it when the route is defined, and
    docs/recipes/fastapi.md says to write Depends(repo, scope="function"), which works.
    """
    from fastapi.exceptions import DependencyScopeError

    api = FastAPI()

    async def repo(s: Any = session(registry=db.aio)) -> AsyncIterator[Any]:
        yield s

    with pytest.raises(DependencyScopeError):
        @api.post("/refused")
        async def refused(r: Any = Depends(repo)) -> None: ...

    @api.post("/x")
    async def x(r: Any = Depends(repo, scope="function")) -> dict[str, str]:
        r.add(Item(name="repo"))
        return {"ok": "yes"}

    assert client(api).post("/x").status_code == 200
    assert db.names() == ["repo"]
    recipe = (Path(__file__).parent.parent / "docs" / "recipes" / "fastapi.md").read_text()
    assert 'Depends(repo, scope="function")' in recipe


def test_http_exception_in_a_dependency_before_the_endpoint_rolls_back(db: Db) -> None:
    """A 403 from an auth dependency after session() wrote: nothing committed."""
    api = FastAPI()

    async def auth(s: Any = session(registry=db.aio)) -> None:
        s.add(Item(name="half"))
        raise HTTPException(403)

    @api.post("/x", dependencies=[Depends(auth)])
    async def x() -> None:
        raise AssertionError("not reached")

    assert client(api).post("/x").status_code == 403
    assert db.names() == []


def test_a_def_endpoint_calling_transactional_services_commits_once(db: Db) -> None:
    """@transactional services inside a def endpoint join the request's unit."""
    api = FastAPI()

    @txguard.transactional(registry=db.sync)
    def service(name: str) -> None:
        txguard.current_session(db.sync).add(Item(name=name))

    @api.post("/x/{name}")
    def x(name: str, s: Session = session(registry=db.sync)) -> dict[str, bool]:
        service(name)
        service(name + "2")
        return {"same": txguard.current_session(db.sync) is s}

    r = client(api).post("/x/d")
    assert (r.status_code, r.json()) == (200, {"same": True})
    assert db.names() == ["d", "d2"]
    assert db.checked_out() == [0, 0]


def test_background_task_opening_its_own_unit_sees_the_commit(db: Db) -> None:
    """A background task runs after COMMIT and its own unit commits too."""
    from fastapi import BackgroundTasks

    api = FastAPI()
    seen: list[list[str]] = []

    async def later() -> None:
        async with txguard.unit_of_work(registry=db.aio) as s:
            seen.append(sorted(await s.scalars(sa.select(Item.name))))
            s.add(Item(name="bg"))

    @api.post("/x")
    async def x(tasks: BackgroundTasks, s: Any = session(registry=db.aio)) -> None:
        s.add(Item(name="req"))
        tasks.add_task(later)

    assert client(api).post("/x").status_code == 200
    assert seen == [["req"]]
    assert db.names() == ["bg", "req"]


def test_an_exception_handler_turning_an_error_into_200_still_rolled_back(db: Db) -> None:
    """Documented: the endpoint raised, so the unit rolled back, whatever the handler answers."""
    api = FastAPI()

    class Soft(Exception):
        pass

    @api.exception_handler(Soft)
    async def soft(request: Request, exc: Soft) -> JSONResponse:
        return JSONResponse({"soft": True})

    @api.post("/x")
    async def x(s: Any = session(registry=db.aio)) -> None:
        s.add(Item(name="soft"))
        raise Soft

    assert client(api).post("/x").status_code == 200
    assert db.names() == []


def test_a_sync_registry_unit_is_closed_when_an_anyio_timeout_cancels_the_request(db: Db) -> None:
    """A timeout middleware (anyio cancel scope) cancelling the endpoint must not leak the connection."""
    api = FastAPI()
    started = anyio.Event()

    @api.post("/x")
    async def x(s: Session = session(registry=db.sync)) -> None:
        s.execute(sa.text("SELECT 1"))
        s.add(Item(name="late"))
        s.flush()
        started.set()
        await anyio.sleep_forever()

    async def main() -> None:
        async def timeout_app(scope: Any, receive: Any, send: Any) -> None:
            with anyio.CancelScope() as cancel:
                async with anyio.create_task_group() as tg:
                    async def stop() -> None:
                        await started.wait()
                        cancel.cancel()
                    tg.start_soon(stop)
                    await api(scope, receive, send)

        transport = httpx.ASGITransport(app=timeout_app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
            with pytest.raises(Exception):
                await c.post("/x")

    txguard.uninstall()  # the endpoint's sync IO on the loop is the point, not a guard finding
    anyio.run(main)
    assert db.checked_out() == [0, 0]
    assert db.names() == []


def test_asyncio_wait_for_cancelling_the_app_rolls_back_the_async_unit(db: Db) -> None:
    """asyncio.wait_for around the app call: the unit rolls back and returns its connection."""
    api = FastAPI()
    started = asyncio.Event()

    @api.post("/x")
    async def x(s: Any = session(registry=db.aio)) -> None:
        s.add(Item(name="late"))
        await s.flush()
        started.set()
        await asyncio.sleep(3600)

    async def main() -> None:
        async def receive() -> dict[str, Any]:
            return {"type": "http.request", "body": b"", "more_body": False}

        async def send(message: Any) -> None:
            pass

        scope = {"type": "http", "method": "POST", "path": "/x", "raw_path": b"/x",
                 "query_string": b"", "headers": [], "root_path": "", "scheme": "http",
                 "server": ("t", 80), "client": ("c", 1), "http_version": "1.1",
                 "asgi": {"version": "3.0"}}
        task = asyncio.ensure_future(api(scope, receive, send))
        await started.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(main())
    assert db.checked_out() == [0, 0]
    assert db.names() == []


# ---------------------------------------------------------------- txguard.asgi


def asgi_app(db: Db) -> FastAPI:
    api = FastAPI()

    @api.post("/ok")
    async def ok() -> dict[str, str]:
        txguard.current_session(db.aio).add(Item(name="ok"))
        return {"ok": "yes"}

    @api.post("/explicit500")
    async def explicit500() -> JSONResponse:
        txguard.current_session(db.aio).add(Item(name="e500"))
        return JSONResponse({"bad": True}, status_code=500)

    @api.post("/stream")
    async def stream() -> StreamingResponse:
        txguard.current_session(db.aio).add(Item(name="streamed"))

        async def body() -> AsyncIterator[bytes]:
            yield b"a"
            raise RuntimeError("body broke")

        return StreamingResponse(body())

    @api.post("/plainstream")
    async def plainstream() -> StreamingResponse:
        txguard.current_session(db.aio).add(Item(name="plain"))

        async def body() -> AsyncIterator[bytes]:
            yield b"a"

        return StreamingResponse(body())

    @api.post("/flush")
    async def flush() -> dict[str, str]:
        s = txguard.current_session(db.aio)
        s.add(Item(name="flushed"))
        await s.flush()
        return {"ok": "yes"}

    @api.post("/validation", response_model=Out)
    async def validation() -> Any:
        txguard.current_session(db.aio).add(Item(name="invalid"))
        return {"name": "x"}

    @api.post("/defview")
    def defview() -> dict[str, str]:
        return {"has": str(txguard.current_session(db.aio) is not None)}

    return api


def test_asgi_explicit_500_response_rolls_back(db: Db) -> None:
    """A returned 500 rolls back under the middleware."""
    api = asgi_app(db)
    api.add_middleware(UnitOfWorkMiddleware, registry=db.aio)
    assert client(api).post("/explicit500").status_code == 500
    assert db.names() == []


def test_asgi_plain_streaming_response_commits_under_guards(db: Db) -> None:
    """A StreamingResponse under the middleware, guards at "error": 200 and committed."""
    api = asgi_app(db)
    api.add_middleware(UnitOfWorkMiddleware, registry=db.aio)
    r = client(api).post("/plainstream")
    assert (r.status_code, r.content) == (200, b"a")
    assert db.names() == ["plain"]


def test_asgi_streaming_body_raising_after_start_keeps_the_commit(db: Db) -> None:
    """Documented: a stream is decided at its start; the row is committed, the pool is clean."""
    api = asgi_app(db)
    api.add_middleware(UnitOfWorkMiddleware, registry=db.aio)
    with pytest.raises(Exception):
        TestClient(api).post("/stream")
    assert db.names() == ["streamed"]
    assert db.checked_out() == [0, 0]


def test_asgi_response_model_failure_rolls_back(db: Db) -> None:
    """A response_model failure (500) under the middleware commits nothing."""
    api = asgi_app(db)
    api.add_middleware(UnitOfWorkMiddleware, registry=db.aio)
    assert client(api).post("/validation").status_code == 500
    assert db.names() == []


def test_asgi_with_a_base_http_middleware_inside_commits_without_guard_errors(db: Db) -> None:
    """@app.middleware("http") runs the endpoint in a child task; the unit still works."""
    api = asgi_app(db)

    @api.middleware("http")
    async def passthrough(request: Request, call_next: Any) -> Any:
        return await call_next(request)

    api.add_middleware(UnitOfWorkMiddleware, registry=db.aio)
    r = client(api).post("/ok")
    assert r.status_code == 200
    assert db.names() == ["ok"]
    assert db.checked_out() == [0, 0]


def test_asgi_with_a_base_http_middleware_inside_an_endpoint_may_flush(db: Db) -> None:
    """@app.middleware("http") + an endpoint that flushes (SQL in call_next's child task): 200, committed."""
    api = asgi_app(db)

    @api.middleware("http")
    async def passthrough(request: Request, call_next: Any) -> Any:
        return await call_next(request)

    api.add_middleware(UnitOfWorkMiddleware, registry=db.aio)
    r = client(api).post("/flush")
    assert r.status_code == 200
    assert db.names() == ["flushed"]


def test_fastapi_session_with_a_streaming_response_commits_before_the_stream(db: Db) -> None:
    """session() + StreamingResponse: the unit ends in the endpoint's task, before the body; committed."""
    api = FastAPI()

    @api.post("/x")
    async def x(s: Any = session(registry=db.aio)) -> StreamingResponse:
        s.add(Item(name="fs"))
        await s.flush()

        async def body() -> AsyncIterator[bytes]:
            yield b"b"

        return StreamingResponse(body())

    r = client(api).post("/x")
    assert (r.status_code, r.content) == (200, b"b")
    assert db.names() == ["fs"]


def test_asgi_mounted_sub_app_gets_the_outer_unit(db: Db) -> None:
    """A sub-app mounted under the middleware's app sees current_session()."""
    outer = FastAPI()
    outer.mount("/sub", asgi_app(db))
    outer.add_middleware(UnitOfWorkMiddleware, registry=db.aio)
    assert client(outer).post("/sub/ok").status_code == 200
    assert db.names() == ["ok"]


def test_asgi_lifespan_passes_through_without_a_unit(db: Db) -> None:
    """Lifespan startup runs outside any unit (no current session)."""
    seen: list[bool] = []
    api = asgi_app(db)

    @api.on_event("startup")
    async def startup() -> None:
        seen.append(txguard.in_unit_of_work(db.aio) if hasattr(txguard, "in_unit_of_work") else True)

    api.add_middleware(UnitOfWorkMiddleware, registry=db.aio)
    with TestClient(api) as c:
        assert c.post("/ok").status_code == 200
    assert len(seen) == 1
    assert db.checked_out() == [0, 0]


async def _raw(app: Any, path: str = "/") -> list[dict[str, Any]]:
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: Any) -> None:
        sent.append(dict(message))

    scope = {"type": "http", "method": "GET", "path": path, "headers": []}
    await app(scope, receive, send)
    return sent


def test_asgi_app_sending_no_response_rolls_back(db: Db) -> None:
    """An app that returns without a response: rolled back, pool clean."""

    async def app(scope: Any, receive: Any, send: Any) -> None:
        txguard.current_session(db.aio).add(Item(name="none"))

    assert asyncio.run(_raw(UnitOfWorkMiddleware(app, registry=db.aio))) == []
    assert db.names() == []
    assert db.checked_out() == [0, 0]


def test_asgi_app_sending_two_starts_commits_once_and_passes_both(db: Db) -> None:
    """A buggy app's second start goes through untouched; the first decided the unit."""

    async def app(scope: Any, receive: Any, send: Any) -> None:
        txguard.current_session(db.aio).add(Item(name="twice"))
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.start", "status": 500, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    sent = asyncio.run(_raw(UnitOfWorkMiddleware(app, registry=db.aio)))
    assert [m.get("status") for m in sent] == [200, 500, None]
    assert db.names() == ["twice"]


def test_asgi_anyio_cancel_before_the_response_rolls_back(db: Db) -> None:
    """A timeout (anyio cancel scope) around the middleware: rolled back, pool clean."""
    started = anyio.Event()

    async def app(scope: Any, receive: Any, send: Any) -> None:
        s = txguard.current_session(db.aio)
        s.add(Item(name="cancelled"))
        await s.flush()
        started.set()
        await anyio.sleep_forever()

    middleware = UnitOfWorkMiddleware(app, registry=db.aio)

    async def main() -> None:
        with anyio.CancelScope() as cancel:
            async with anyio.create_task_group() as tg:
                async def stop() -> None:
                    await started.wait()
                    cancel.cancel()
                tg.start_soon(stop)
                await _raw(middleware)

    anyio.run(main)
    assert db.names() == []
    assert db.checked_out() == [0, 0]


def test_asgi_streaming_response_without_the_cross_task_guard_commits(db: Db) -> None:
    """With cross_task="off" the stream's start (in Starlette's child task) commits: the guard is the trip."""
    txguard.install(mixed_begin="error", leaks="warn", cross_thread="error", cross_task="off")
    api = asgi_app(db)
    api.add_middleware(UnitOfWorkMiddleware, registry=db.aio)
    r = client(api).post("/plainstream")
    assert (r.status_code, r.content) == (200, b"a")
    assert db.names() == ["plain"]


def test_fastapi_session_under_a_base_http_middleware_commits(db: Db) -> None:
    """session() (sync registry, def endpoint) under @app.middleware("http"): 200, committed."""
    api = FastAPI()

    @api.middleware("http")
    async def passthrough(request: Request, call_next: Any) -> Any:
        return await call_next(request)

    @api.post("/x")
    def x(s: Session = session(registry=db.sync)) -> dict[str, str]:
        s.add(Item(name="bhm"))
        s.flush()
        return {"ok": "yes"}

    assert client(api).post("/x").status_code == 200
    assert db.names() == ["bhm"]
    assert db.checked_out() == [0, 0]


@pytest.mark.parametrize("status", [201, 409])
@pytest.mark.parametrize("kind", ["fastapi-async", "fastapi-sync", "middleware"])
def test_commit_as_you_go_requests_commit_what_is_pending_on_success(
    db: Db, kind: str, status: int
) -> None:
    """mode="commit_as_you_go" request units commit pending work below 400 (not dropped)."""
    if kind == "middleware":
        from starlette.applications import Starlette
        from starlette.responses import PlainTextResponse
        from starlette.routing import Route

        async def view(request: Request) -> PlainTextResponse:
            s = db.aio.current_session()
            s.add(Item(name="committed"))
            await s.commit()
            s.add(Item(name="pending"))
            return PlainTextResponse("ok", status_code=status)

        app: Any = UnitOfWorkMiddleware(
            Starlette(routes=[Route("/x", view, methods=["POST"])]),
            registry=db.aio, mode="commit_as_you_go")
    else:
        api = FastAPI()
        registry: Any = db.aio if kind == "fastapi-async" else db.sync

        @api.post("/x")
        async def x(s: Any = session(registry=registry, mode="commit_as_you_go")) -> JSONResponse:
            s.add(Item(name="committed"))
            if registry.is_async:
                await s.commit()
            else:
                s.commit()
            s.add(Item(name="pending"))
            if status >= 400:
                raise HTTPException(status)
            return JSONResponse({}, status_code=status)

        app = api
    with warnings.catch_warnings():
        warnings.simplefilter("error", txguard.UncommittedWorkWarning)
        assert client(app).post("/x").status_code == status
    assert db.names() == (["committed", "pending"] if status < 400 else ["committed"])
    assert db.checked_out() == [0, 0]
