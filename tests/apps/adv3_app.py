"""A FastAPI app for tests/test_adversary_adv3.py, served by uvicorn in a subprocess.

``TXGUARD_APP_SYNC_URL`` and ``TXGUARD_APP_ASYNC_URL`` name the database. Every guard is at
"error"; every txguard report (a warning, a txguard error logged or raised in a request, an
unraisable or thread error) is recorded and served at ``/stats`` with the pools'
checked-out counts.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
import threading
import time
import warnings
from collections.abc import AsyncIterator
from typing import Any

import sqlalchemy as sa
from fastapi import BackgroundTasks, FastAPI, WebSocket
from fastapi.responses import StreamingResponse
from starlette.applications import Starlette
from starlette.routing import WebSocketRoute
from sqlalchemy.ext.asyncio import AsyncSession, create_async_engine
from sqlalchemy.orm import Session

import txguard
from txguard.asgi import UnitOfWorkMiddleware
from txguard.fastapi import session

txguard.install(mixed_begin="error", leaks="error", cross_thread="error", cross_task="error")

reports: list[str] = []
background: list[str] = []
_TXGUARD = (txguard.TxGuardWarning, txguard.TxGuardError)


def _showwarning(message: Any, category: type[Warning], filename: str, lineno: int, *a: Any) -> None:
    reports.append(f"{category.__name__}: {message} [{filename}:{lineno}]")


warnings.simplefilter("always", txguard.TxGuardWarning)
warnings.showwarning = _showwarning


class _Recorder(logging.Handler):
    def emit(self, entry: logging.LogRecord) -> None:
        error = entry.exc_info[1] if entry.exc_info else None
        if isinstance(error, _TXGUARD) or (entry.name == "txguard" and entry.levelno >= logging.WARNING):
            reports.append(f"log: {entry.getMessage()} ({error!r})")


logging.getLogger().addHandler(_Recorder(logging.WARNING))
sys.unraisablehook = lambda args: reports.append(f"unraisable: {args.exc_value!r}")
threading.excepthook = lambda args: reports.append(f"thread: {args.exc_value!r}")

items = sa.Table(
    "adv3_items", sa.MetaData(),
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("label", sa.String(60), nullable=False),
)
engine = sa.create_engine(os.environ["TXGUARD_APP_SYNC_URL"])
async_engine = create_async_engine(os.environ["TXGUARD_APP_ASYNC_URL"])
BACKEND = engine.dialect.name
items.drop(engine, checkfirst=True)
items.create(engine)
with engine.begin() as conn:  # what makes a COMMIT fail, checked only at COMMIT
    conn.execute(sa.text("DROP TABLE IF EXISTS adv3_child"))
    conn.execute(sa.text("DROP TABLE IF EXISTS adv3_parent"))
    conn.execute(sa.text("CREATE TABLE adv3_parent (id INTEGER PRIMARY KEY)"))
    if BACKEND == "sqlite":
        conn.execute(sa.text("CREATE TABLE adv3_child (id INTEGER PRIMARY KEY, parent_id INTEGER "
                             "REFERENCES adv3_parent (id) DEFERRABLE INITIALLY DEFERRED)"))
    elif BACKEND == "postgresql":
        conn.execute(sa.text(
            "CREATE TABLE adv3_child (id INTEGER, UNIQUE (id) DEFERRABLE INITIALLY DEFERRED)"
        ))


@sa.event.listens_for(async_engine.sync_engine, "connect")
def _foreign_keys(dbapi_connection: Any, record: Any) -> None:
    if BACKEND == "sqlite":
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.close()


async def fail_commit(db: AsyncSession) -> None:
    """Make the session's COMMIT fail: a deferred constraint, or (MariaDB) a killed connection."""
    if BACKEND == "sqlite":  # a child without its parent
        await db.execute(sa.text("INSERT INTO adv3_child VALUES (1, 999)"))
    elif BACKEND == "postgresql":  # a duplicate
        await db.execute(sa.text("INSERT INTO adv3_child VALUES (1), (1)"))
    else:  # MariaDB checks every constraint at once: end the session's connection instead
        connection_id = (await db.execute(sa.text("SELECT CONNECTION_ID()"))).scalar()
        with engine.connect() as conn:
            conn.execute(sa.text(f"KILL CONNECTION {int(connection_id)}"))


sync_registry = txguard.SessionRegistry(engine)
async_registry = txguard.SessionRegistry(async_engine)
app = FastAPI()


@app.post("/stream/{label}")
async def stream(label: str, db: AsyncSession = session(registry=async_registry)) -> StreamingResponse:
    """The body's generator raises after the start (and a first chunk) went out."""
    await db.execute(items.insert().values(label=label))

    async def body() -> AsyncIterator[bytes]:
        yield b"first chunk\n"
        await asyncio.sleep(0.05)
        raise RuntimeError("the stream broke")

    return StreamingResponse(body())


@app.post("/slow-async/{label}")
async def slow_async(label: str, db: AsyncSession = session(registry=async_registry)) -> dict[str, str]:
    """The client gives up while this sleeps; the endpoint runs to its end all the same."""
    await db.execute(items.insert().values(label=label))
    await asyncio.sleep(0.6)
    await db.execute(items.insert().values(label=label + "-after"))
    return {"label": label}


@app.post("/slow-sync/{label}")
def slow_sync(label: str, db: Session = session(registry=sync_registry)) -> dict[str, str]:
    """The same in a `def` endpoint: a worker thread and a sync registry."""
    txguard.current_session(sync_registry).execute(items.insert().values(label=label))
    time.sleep(0.6)
    db.execute(items.insert().values(label=label + "-after"))
    return {"label": label}


def _background_sync() -> None:
    try:
        txguard.current_session(sync_registry)
        background.append("sync: a session")
    except txguard.TransactionRequiredError:
        background.append("sync: TransactionRequiredError")


async def _background_async() -> None:
    try:
        txguard.current_session(async_registry)
        background.append("async: a session")
    except txguard.TransactionRequiredError:
        background.append("async: TransactionRequiredError")


@app.post("/background/{label}")
def with_background(
    label: str, tasks: BackgroundTasks, db: Session = session(registry=sync_registry)
) -> dict[str, str]:
    db.execute(items.insert().values(label=label))
    tasks.add_task(_background_sync)
    tasks.add_task(_background_async)
    return {"label": label}


async def _websocket(websocket: WebSocket, db: AsyncSession) -> None:
    """Save ?label=, fail the COMMIT if ?fail=1, say "saved", close if ?close=1."""
    await websocket.accept()
    await db.execute(items.insert().values(label=websocket.query_params["label"]))
    if websocket.query_params.get("fail"):
        await fail_commit(db)
    await websocket.send_text("saved")
    if websocket.query_params.get("close"):
        await websocket.close()


@app.websocket("/ws")
async def websocket_with_session(
    websocket: WebSocket, db: AsyncSession = session(registry=async_registry)
) -> None:
    await _websocket(websocket, db)


async def _websocket_in_middleware(websocket: WebSocket) -> None:
    await _websocket(websocket, txguard.current_session(async_registry))


async def _refuse(websocket: WebSocket) -> None:
    """Save ?label=, then return without accepting: the server answers 403."""
    db = txguard.current_session(async_registry)
    await db.execute(items.insert().values(label=websocket.query_params["label"]))


app.mount("/mw", UnitOfWorkMiddleware(
    Starlette(routes=[WebSocketRoute("/ws", _websocket_in_middleware), WebSocketRoute("/refuse", _refuse)]),
    registry=async_registry, scope_types=("websocket",),
))


@app.get("/stats")
def stats() -> dict[str, Any]:
    return {
        "reports": reports,
        "background": background,
        "checked_out": {"sync": engine.pool.checkedout(),
                        "async": async_engine.sync_engine.pool.checkedout()},
    }


@app.get("/items")
def labels() -> list[str]:
    with engine.connect() as conn:
        return sorted(conn.scalars(sa.select(items.c.label)))
