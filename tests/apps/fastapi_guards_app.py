"""A FastAPI app in the documented shapes, under every txguard guard (tests/test_real_fastapi.py).

Served by uvicorn in a subprocess. ``TXGUARD_APP_SYNC_URL`` and ``TXGUARD_APP_ASYNC_URL``
name the database. Every report txguard makes (a warning, an exception raised in a request
or in a dependency's cleanup, a log line, an unraisable or thread error) is recorded and
served at ``/stats`` with the pools' checked-out counts. ``/wrong/...`` misuse on purpose.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sys
import threading
import warnings
from collections.abc import AsyncIterator, Iterator
from typing import Any

import sqlalchemy as sa
from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker, create_async_engine
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker

import txguard

txguard.install(mixed_begin="error", leaks="warn", cross_thread="error", cross_task="error")

reports: list[str] = []
_TXGUARD = (txguard.TxGuardWarning, txguard.TxGuardError)


def record(kind: str, text: str) -> None:
    reports.append(f"{kind}: {text}")


def _showwarning(message: Any, category: type[Warning], filename: str, lineno: int, *a: Any) -> None:
    record(category.__name__, f"{message} [{filename}:{lineno}]")


warnings.simplefilter("always", txguard.TxGuardWarning)
warnings.showwarning = _showwarning


class _Recorder(logging.Handler):
    """Record txguard's log lines, and any logged error caused by a txguard exception."""

    def emit(self, entry: logging.LogRecord) -> None:
        error = entry.exc_info[1] if entry.exc_info else None
        if isinstance(error, _TXGUARD) or (
            entry.name == "txguard" and entry.levelno >= logging.WARNING
        ):
            record("log", entry.getMessage() + (f" ({error!r})" if error else ""))


logging.getLogger().addHandler(_Recorder(logging.WARNING))
sys.unraisablehook = lambda args: record("unraisable", repr(args.exc_value))
threading.excepthook = lambda args: record("thread", repr(args.exc_value))


class Base(DeclarativeBase):
    pass


class AppItem(Base):
    __tablename__ = "txg_fastapi_items"

    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=True)
    shape: Mapped[str] = mapped_column(sa.String(20))
    n: Mapped[int]


_sqlite = {"connect_args": {"timeout": 30}} if os.environ["TXGUARD_APP_SYNC_URL"].startswith(
    "sqlite"
) else {"pool_size": 10, "max_overflow": 30}
engine = sa.create_engine(os.environ["TXGUARD_APP_SYNC_URL"], **_sqlite)  # type: ignore[arg-type]
async_engine = create_async_engine(os.environ["TXGUARD_APP_ASYNC_URL"], **_sqlite)  # type: ignore[arg-type]
Base.metadata.drop_all(engine)
Base.metadata.create_all(engine)

SessionLocal = sessionmaker(engine)
AsyncSessionLocal = async_sessionmaker(async_engine, expire_on_commit=False)
registry = txguard.SessionRegistry(async_engine)

app = FastAPI()


@app.exception_handler(txguard.TxGuardWarning)
@app.exception_handler(txguard.TxGuardError)
async def _txguard_error(request: Request, exc: Exception) -> JSONResponse:
    record(type(exc).__name__, str(exc))
    return JSONResponse({"error": type(exc).__name__, "message": str(exc)}, status_code=500)


# (a) FastAPI's SQL tutorial: a sync dependency with yield, and `def` endpoints.


def get_db() -> Iterator[Session]:
    db = SessionLocal()
    try:
        yield db
    finally:
        db.close()


@app.post("/sync/items")
def sync_create(n: int, db: Session = Depends(get_db)) -> dict[str, Any]:
    item = AppItem(shape="sync", n=n)
    db.add(item)
    db.commit()
    db.refresh(item)  # a new transaction, ended by get_db's cleanup in another thread
    return {"id": item.id, "n": item.n}


# (b) async dependencies with yield: a plain async generator, and one that wraps an
# @asynccontextmanager; and txguard's own unit of work as the dependency.


async def get_session() -> AsyncIterator[AsyncSession]:
    async with AsyncSessionLocal() as session:
        yield session


@contextlib.asynccontextmanager
async def session_scope() -> AsyncIterator[AsyncSession]:
    async with AsyncSessionLocal() as session:
        yield session


async def get_scoped_session() -> AsyncIterator[AsyncSession]:
    async with session_scope() as session:
        yield session


async def get_unit() -> AsyncIterator[AsyncSession]:
    async with registry.unit_of_work() as session:
        yield session


async def _create(session: AsyncSession, shape: str, n: int) -> dict[str, Any]:
    item = AppItem(shape=shape, n=n)
    session.add(item)
    await session.commit()
    count = await session.scalar(sa.select(sa.func.count()).where(AppItem.shape == shape))
    return {"id": item.id, "n": item.n, "seen": count}


@app.post("/async/items")
async def async_create(n: int, session: AsyncSession = Depends(get_session)) -> dict[str, Any]:
    return await _create(session, "async", n)


@app.post("/scoped/items")
async def scoped_create(
    n: int, session: AsyncSession = Depends(get_scoped_session)
) -> dict[str, Any]:
    return await _create(session, "scoped", n)


@app.post("/unit/items")
async def unit_create(n: int, session: AsyncSession = Depends(get_unit)) -> dict[str, Any]:
    session.add(AppItem(shape="unit", n=n))  # the unit commits when the dependency ends
    await session.flush()
    return {"n": n}


# Misuse, on purpose: each must be reported, naming these lines.


@app.get("/wrong/gather")
async def wrong_gather(session: AsyncSession = Depends(get_session)) -> dict[str, Any]:
    await session.execute(sa.select(AppItem.id).limit(1))  # mark: gather-began

    async def count() -> int | None:
        return await session.scalar(sa.select(sa.func.count(AppItem.id)))  # mark: gather-child

    await asyncio.gather(count(), count())
    return {}


@app.get("/wrong/begin")
def wrong_begin(db: Session = Depends(get_db)) -> dict[str, Any]:
    db.execute(sa.select(AppItem.id).limit(1))  # mark: begin-began
    db.begin()  # mark: begin-call
    return {}


@app.get("/stats")
def stats() -> dict[str, Any]:
    pools = {"sync": engine.pool, "async": async_engine.sync_engine.pool}
    return {
        "reports": list(reports),
        "checked_out": {name: getattr(pool, "checkedout", lambda: 0)() for name, pool in pools.items()},
    }


@app.get("/items")
def items() -> dict[str, list[int]]:
    with engine.connect() as conn:
        rows = conn.execute(sa.select(AppItem.shape, AppItem.n)).all()
    found: dict[str, list[int]] = {}
    for shape, n in rows:
        found.setdefault(shape, []).append(n)
    return {shape: sorted(ns) for shape, ns in found.items()}
