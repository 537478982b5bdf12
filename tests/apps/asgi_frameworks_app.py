"""Litestar and Quart apps under ``txguard.asgi.UnitOfWorkMiddleware``, for
tests/test_asgi_frameworks.py (in process, and served by uvicorn / hypercorn).

``create_litestar(registry)`` and ``create_quart(registry)`` build one app each with the same
routes: POST /items/<name> (201, committed), /conflict/<name> (a raised 409, rolled back),
/raise/<name> (500, rolled back), /stream/<name> (a streamed 201, committed), and GET /count.
Served with ``TXGUARD_APP_SYNC_URL=<url> TXGUARD_APP=litestar|quart``, guards at "error";
``/stats`` then reports the rows, the guard findings and the pool.
"""

import os
import sys
import warnings
from collections.abc import AsyncIterator
from typing import Any

import sqlalchemy as sa

import txguard
from tests.models import Item
from txguard.asgi import UnitOfWorkMiddleware


async def _add(registry: txguard.SessionRegistry[Any], name: str) -> None:
    session = txguard.current_session(registry)
    session.add(Item(name=name))
    await session.flush()


async def _body(name: str) -> AsyncIterator[bytes]:
    yield name.encode()


def create_litestar(registry: txguard.SessionRegistry[Any], stats: Any = None) -> Any:
    """A Litestar app, wrapped by the middleware (Litestar's own middleware list works too)."""
    from litestar import Litestar, get, post
    from litestar.exceptions import HTTPException
    from litestar.response import Stream

    @post("/items/{name:str}", status_code=201)
    async def create(name: str) -> dict[str, str]:
        await _add(registry, name)
        return {"name": name}

    @post("/conflict/{name:str}")
    async def conflict(name: str) -> None:
        await _add(registry, name)
        raise HTTPException(status_code=409, detail="conflict")

    @post("/raise/{name:str}")
    async def fail(name: str) -> None:
        await _add(registry, name)
        raise RuntimeError("the handler failed")

    @post("/stream/{name:str}", status_code=201)
    async def stream(name: str) -> Stream:
        await _add(registry, name)
        return Stream(_body(name), status_code=201)

    handlers: list[Any] = [create, conflict, fail, stream]
    if stats is not None:
        @get("/stats")
        async def get_stats() -> dict[str, Any]:
            return stats()

        handlers.append(get_stats)
    return UnitOfWorkMiddleware(Litestar(handlers, debug=False), registry=registry)


def create_quart(registry: txguard.SessionRegistry[Any], stats: Any = None) -> Any:
    """A Quart app whose ``asgi_app`` is wrapped by the middleware (Quart's documented way)."""
    from quart import Quart, abort

    app = Quart(__name__)

    @app.post("/items/<name>")
    async def create(name: str) -> Any:
        await _add(registry, name)
        return {"name": name}, 201

    @app.post("/conflict/<name>")
    async def conflict(name: str) -> Any:
        await _add(registry, name)
        abort(409)

    @app.post("/raise/<name>")
    async def fail(name: str) -> Any:
        await _add(registry, name)
        raise RuntimeError("the handler failed")

    @app.post("/stream/<name>")
    async def stream(name: str) -> Any:
        await _add(registry, name)
        return _body(name), 201

    if stats is not None:
        @app.get("/stats")
        async def get_stats() -> Any:
            return stats()

    app.asgi_app = UnitOfWorkMiddleware(app.asgi_app, registry=registry)  # type: ignore[method-assign]
    return app


def _serve() -> Any:
    """The app a server runs: guards at "error", every finding recorded for /stats.

    The test creates the schema before it starts the server: an import of this module
    (a server may import it again, as hypercorn does in each worker it spawns) never
    empties the table.
    """
    from tests.apps.asgi_units_app import create_engines

    warnings.filterwarnings("error", category=txguard.TxGuardWarning)
    txguard.install(mixed_begin="error", leaks="warn", cross_thread="error", cross_task="error")
    engine, async_engine = create_engines(os.environ["TXGUARD_APP_SYNC_URL"])
    registry = txguard.SessionRegistry(async_engine)
    findings: list[str] = []
    previous = sys.unraisablehook

    def unraisable(args: Any) -> None:
        if isinstance(args.exc_value, (txguard.TxGuardWarning, txguard.TxGuardError)):
            findings.append(repr(args.exc_value))
        previous(args)

    sys.unraisablehook = unraisable

    def stats() -> dict[str, Any]:
        with engine.connect() as conn:
            names = sorted(conn.scalars(sa.select(Item.name)))
        return {"items": names, "findings": findings,
                "checked_out": async_engine.sync_engine.pool.checkedout()}  # type: ignore[attr-defined]

    build = create_quart if os.environ.get("TXGUARD_APP") == "quart" else create_litestar
    return build(registry, stats)


app = _serve() if "TXGUARD_APP_SYNC_URL" in os.environ else None
