"""FastAPI and Starlette apps run by tests/test_fastapi_integration.py and test_asgi_integration.py.

``create_apps(sync_url)`` builds, on one database, a FastAPI app whose endpoints take
``txguard.fastapi.session()`` (a sync and an async registry), and a Starlette app under
``txguard.asgi.UnitOfWorkMiddleware`` (streams among its routes), and one behind a
``BaseHTTPMiddleware`` that runs SQL (mounted at /behind). Served by uvicorn with ``TXGUARD_APP_SYNC_URL=<url>
python -m uvicorn tests.apps.asgi_units_app:app`` (FastAPI at /, Starlette mounted at
/starlette), guards at "error"; ``/stats`` reports findings, callbacks and pool counts. No ``from __future__ import
annotations``: FastAPI must see the ``Annotated`` aliases local to ``create_apps``.
"""


import os
import sys
import threading
import warnings
from typing import Annotated, Any

import sqlalchemy as sa
from fastapi import BackgroundTasks, FastAPI, HTTPException
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, create_async_engine
from sqlalchemy.orm import Session
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.base import BaseHTTPMiddleware
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route

import txguard
from tests.apps.flask_app import create_schema
from tests.models import Item
from txguard.asgi import UnitOfWorkMiddleware
from txguard.fastapi import session

ASYNC_DRIVERS = {"sqlite": "sqlite+aiosqlite", "postgresql": "postgresql+asyncpg",
                 "mariadb": "mysql+aiomysql"}


class Stats:
    """What the apps saw: guard findings, on_commit callbacks, background tasks."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.findings: list[str] = []
        self.committed: list[str] = []  # names whose on_commit callback ran
        self.seen_after_commit = 0  # ... and found their row committed
        self.background: list[str] = []  # names whose background task found the row

    def finding(self, what: object) -> None:
        with self.lock:
            self.findings.append(repr(what))


def _foreign_keys(dbapi_connection: Any, record: Any) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()


def create_engines(sync_url: str) -> tuple[sa.Engine, AsyncEngine]:
    """Create the sync and async engines of one database (SQLite checks foreign keys)."""
    url = sa.make_url(sync_url)
    backend = url.get_backend_name()
    async_url = url.set(drivername=ASYNC_DRIVERS["mariadb" if backend == "mysql" else backend])
    if backend == "sqlite":
        options: dict[str, Any] = {"connect_args": {"timeout": 30}}
    else:
        options = {"pool_size": 25, "max_overflow": 10}
    engine = sa.create_engine(url, **options)
    async_engine = create_async_engine(async_url, **options)
    if backend == "sqlite":
        sa.event.listen(engine, "connect", _foreign_keys)
        sa.event.listen(async_engine.sync_engine, "connect", _foreign_keys)
    return engine, async_engine


def fail_commit(session: Session, killer: sa.Engine) -> None:
    """Make the session's COMMIT fail: a deferred constraint, or (MariaDB) a killed connection."""
    name = session.get_bind().dialect.name
    if name == "sqlite":  # a child without its parent, checked at COMMIT
        session.execute(sa.text("INSERT INTO txg_flask_deferred (v) VALUES (999)"))
    elif name == "postgresql":  # a duplicate, checked at COMMIT
        session.execute(sa.text("INSERT INTO txg_flask_deferred (v) VALUES (1), (1)"))
    else:  # MariaDB checks every constraint at once: end the session's connection instead
        connection_id = session.scalar(sa.text("SELECT CONNECTION_ID()"))
        with killer.connect() as conn:
            conn.execute(sa.text(f"KILL CONNECTION {int(connection_id)}"))


def create_apps(
    engine: sa.Engine, async_engine: AsyncEngine
) -> tuple[FastAPI, Starlette, Stats]:
    """Build the FastAPI app (sync and async registries) and the Starlette app."""
    sync_registry = txguard.SessionRegistry(engine)
    async_registry = txguard.SessionRegistry(async_engine)
    stats = Stats()

    def seen(name: str) -> int:
        with txguard.unit_of_work(registry=sync_registry) as check:
            return int(check.scalar(sa.select(sa.func.count()).where(Item.name == name)) or 0)

    def record_commit(name: str) -> None:
        found = seen(name)  # runs after the commit: another transaction sees the row
        with stats.lock:
            stats.committed.append(name)
            stats.seen_after_commit += found == 1

    def add(name: str, registry: txguard.SessionRegistry) -> None:
        """A service: it finds the request's session itself."""
        txguard.current_session(registry).add(Item(name=name))
        txguard.on_commit(lambda: record_commit(name), registry=registry)

    def background(name: str) -> None:
        with stats.lock:
            stats.background.append(name) if seen(name) == 1 else None

    api = FastAPI()
    SyncSession = Annotated[Session, session(registry=sync_registry)]

    @api.post("/sync/items/{name}", status_code=201)
    def sync_create(name: str, db: SyncSession, again: SyncSession, tasks: BackgroundTasks) -> dict[str, Any]:
        add(name, sync_registry)
        tasks.add_task(background, name)
        return {"name": name, "one_session": db is again is txguard.current_session(sync_registry)}

    @api.post("/async/items/{name}", status_code=201)
    async def async_create(
        name: str, tasks: BackgroundTasks, db: AsyncSession = session(registry=async_registry)
    ) -> dict[str, Any]:
        add(name, async_registry)
        await db.flush()
        tasks.add_task(background, name)
        return {"name": name, "one_session": db is txguard.current_session(async_registry)}

    @api.post("/sync/raise/{name}")
    def sync_raise(name: str, db: SyncSession) -> None:
        add(name, sync_registry)
        db.flush()
        raise RuntimeError("the endpoint failed")

    @api.post("/async/http-error/{name}")
    async def async_http_error(name: str, db: AsyncSession = session(registry=async_registry)) -> None:
        add(name, async_registry)
        await db.flush()
        raise HTTPException(status_code=409, detail="conflict")

    @api.post("/sync/commit-fails/{name}", status_code=201)
    def sync_commit_fails(name: str, db: SyncSession) -> dict[str, str]:
        add(name, sync_registry)
        db.flush()
        fail_commit(db, engine)
        return {"name": name}

    @api.post("/async/commit-fails/{name}", status_code=201)
    async def async_commit_fails(name: str, db: AsyncSession = session(registry=async_registry)) -> dict[str, str]:
        add(name, async_registry)
        await db.flush()
        await db.run_sync(fail_commit, engine)
        return {"name": name}

    @api.get("/stats")
    def get_stats() -> dict[str, Any]:
        return stats_of(stats, engine, async_engine)

    async def star_create(request: Request) -> Response:
        name = request.path_params["name"]
        add(name, async_registry)
        return JSONResponse({"name": name}, status_code=201)

    async def star_conflict(request: Request) -> Response:
        add(request.path_params["name"], async_registry)
        await txguard.current_session(async_registry).flush()
        return PlainTextResponse("conflict", status_code=409)

    async def star_raise(request: Request) -> Response:
        add(request.path_params["name"], async_registry)
        raise RuntimeError("the handler failed")

    async def star_commit_fails(request: Request) -> Response:
        name = request.path_params["name"]
        add(name, async_registry)
        db = txguard.current_session(async_registry)
        await db.flush()
        await db.run_sync(fail_commit, engine)
        return JSONResponse({"name": name}, status_code=201)

    def star_sync_handler(request: Request) -> Response:  # Starlette runs it in a thread
        return PlainTextResponse(str(txguard.in_transaction(async_registry)))

    async def star_stream(request: Request) -> Response:
        """Starlette sends a stream's start from a child task (ASGI spec_version < 2.4)."""
        name = request.path_params["name"]
        add(name, async_registry)
        await txguard.current_session(async_registry).flush()

        async def body() -> Any:
            yield name.encode()

        return StreamingResponse(body(), status_code=201)

    async def star_sync_stream(request: Request) -> Response:
        name = request.path_params["name"]
        add(name, async_registry)
        return StreamingResponse(iter([name.encode()]), status_code=201)  # read in a thread

    class Counting(BaseHTTPMiddleware):
        """SQL in dispatch after the endpoint, which runs in call_next's child task (none
        before it: on SQLite, a read then a write in concurrent transactions deadlock)."""

        async def dispatch(self, request: Request, call_next: Any) -> Response:
            response: Response = await call_next(request)
            session = txguard.current_session(async_registry)
            await session.scalar(sa.select(sa.func.count()).select_from(Item))
            return response

    star = Starlette(routes=[
        Route("/items/{name}", star_create, methods=["POST"]),
        Route("/conflict/{name}", star_conflict, methods=["POST"]),
        Route("/raise/{name}", star_raise, methods=["POST"]),
        Route("/commit-fails/{name}", star_commit_fails, methods=["POST"]),
        Route("/in-unit", star_sync_handler),
        Route("/stream/{name}", star_stream, methods=["POST"]),
        Route("/sync-stream/{name}", star_sync_stream, methods=["POST"]),
    ])
    star.add_middleware(UnitOfWorkMiddleware, registry=async_registry)
    api.mount("/starlette", star)
    behind = Starlette(routes=[
        Route("/items/{name}", star_stream, methods=["POST"]),
        Route("/conflict/{name}", star_conflict, methods=["POST"]),
    ], middleware=[Middleware(Counting)])
    behind.add_middleware(UnitOfWorkMiddleware, registry=async_registry)
    api.mount("/behind", behind)
    return api, star, stats


def stats_of(stats: Stats, engine: sa.Engine, async_engine: AsyncEngine) -> dict[str, Any]:
    with engine.connect() as conn:
        names = sorted(conn.scalars(sa.select(Item.name)))
    with stats.lock:
        return {
            "findings": list(stats.findings),
            "committed": sorted(stats.committed),
            "seen_after_commit": stats.seen_after_commit,
            "background": sorted(stats.background),
            "items": names,
            "checked_out": engine.pool.checkedout() - 0
            + getattr(async_engine.sync_engine.pool, "checkedout", lambda: 0)(),
        }


def _serve() -> FastAPI:
    """The app uvicorn serves: guards at "error", every finding recorded."""
    warnings.filterwarnings("error", category=txguard.TxGuardWarning)
    txguard.install(mixed_begin="error", leaks="warn", cross_thread="error", cross_task="error")
    engine, async_engine = create_engines(os.environ["TXGUARD_APP_SYNC_URL"])
    create_schema(engine)
    api, _, stats = create_apps(engine, async_engine)
    previous = sys.unraisablehook

    def unraisable(args: Any) -> None:
        if isinstance(args.exc_value, (txguard.TxGuardWarning, txguard.TxGuardError)):
            stats.finding(args.exc_value)
        previous(args)

    sys.unraisablehook = unraisable
    return api


app = _serve() if "TXGUARD_APP_SYNC_URL" in os.environ else None
