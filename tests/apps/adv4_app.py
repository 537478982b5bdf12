"""A FastAPI app for tests/test_adversary_adv4.py, served by uvicorn in a subprocess.

``TXGUARD_APP_SYNC_URL`` / ``TXGUARD_APP_ASYNC_URL`` name the database. Endpoints register
on_commit / on_rollback from ``asyncio.to_thread`` (async) or a copied-context thread pool
(sync), some inside a savepoint that rolls back; each callback records whether the
request's row was committed when it ran. ``/stats`` serves the records and txguard reports.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import os
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import sqlalchemy as sa
from fastapi import FastAPI, HTTPException
from sqlalchemy.ext.asyncio import AsyncSession, create_async_engine
from sqlalchemy.orm import Session

import txguard
from txguard.fastapi import session

txguard.install(mixed_begin="error", leaks="error", cross_thread="error", cross_task="error")

reports: list[str] = []
events: dict[int, list[Any]] = {}


class _Recorder(logging.Handler):
    def emit(self, entry: logging.LogRecord) -> None:
        if entry.name == "txguard" or entry.levelno >= logging.ERROR:
            reports.append(f"log: {entry.getMessage()}")


logging.getLogger().addHandler(_Recorder(logging.WARNING))
sys.unraisablehook = lambda args: reports.append(f"unraisable: {args.exc_value!r}")
threading.excepthook = lambda args: reports.append(f"thread: {args.exc_value!r}")

items = sa.Table(
    "adv4_items", sa.MetaData(),
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=False),
    sa.Column("name", sa.String(50)),
)
sync_engine = sa.create_engine(os.environ["TXGUARD_APP_SYNC_URL"], pool_size=30, max_overflow=30)
async_engine = create_async_engine(os.environ["TXGUARD_APP_ASYNC_URL"], pool_size=30, max_overflow=30)
items.drop(sync_engine, checkfirst=True)
items.create(sync_engine)
async_registry = txguard.SessionRegistry(async_engine)
sync_registry = txguard.SessionRegistry(sync_engine)
_pool = ThreadPoolExecutor(max_workers=8)


def committed(n: int) -> bool:
    with sync_engine.connect() as conn:
        return conn.scalar(sa.select(sa.func.count()).where(items.c.id == n)) == 1


def register(n: int, registry: Any, tag: str) -> None:
    txguard.on_commit(lambda: events[n].append((tag, "commit", committed(n))), registry=registry)
    txguard.on_rollback(lambda: events[n].append((tag, "rollback", committed(n))), registry=registry)


app = FastAPI()


@app.post("/async/{n}")
async def async_item(
    n: int, fail: bool = False, sp: bool = False, db: AsyncSession = session(registry=async_registry)
) -> dict[str, Any]:
    events[n] = []
    await db.execute(items.insert().values(id=n, name="a"))
    await asyncio.to_thread(register, n, async_registry, "main")
    if sp:
        try:
            async with db.begin_nested():
                await db.execute(items.insert().values(id=n + 100000, name="sp"))
                await asyncio.to_thread(register, n, async_registry, "sp")
                raise RuntimeError
        except RuntimeError:
            pass
    await asyncio.sleep(0)
    if fail:
        raise HTTPException(409)
    return {"n": n}


@app.post("/sync/{n}")
def sync_item(
    n: int, fail: bool = False, sp: bool = False, db: Session = session(registry=sync_registry)
) -> dict[str, Any]:
    events[n] = []
    db.execute(items.insert().values(id=n, name="a"))
    _pool.submit(contextvars.copy_context().run, register, n, sync_registry, "main").result()
    if sp:
        try:
            with db.begin_nested():
                db.execute(items.insert().values(id=n + 100000, name="sp"))
                _pool.submit(contextvars.copy_context().run, register, n, sync_registry, "sp").result()
                raise RuntimeError
        except RuntimeError:
            pass
    if fail:
        raise HTTPException(409)
    return {"n": n}


@app.get("/stats")
def stats() -> dict[str, Any]:
    return {"reports": reports, "events": {str(k): v for k, v in events.items()}}
