"""Served by tests/test_adversary_today.py: a Starlette app under UnitOfWorkMiddleware (asyncpg)
whose endpoints misuse the request's session in the ways real code does (a task outliving the
request, gather of two services, a task not awaited still in a statement, a streamed body using
the session); guards at "error". ``/stats`` reports the rows, the pool and the late uses."""

import asyncio
import os
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import create_async_engine
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.routing import Route
import txguard
from txguard.asgi import UnitOfWorkMiddleware
txguard.install(mixed_begin="error", leaks="warn", cross_thread="error", cross_task="error")
URL = os.environ["TXGUARD_ADV_URL"]
sync = sa.create_engine(URL.replace("+asyncpg", "+psycopg"))
with sync.begin() as c:
    c.exec_driver_sql("DROP TABLE IF EXISTS adv4_s"); c.exec_driver_sql("CREATE TABLE adv4_s (name varchar(20) primary key)")
aeng = create_async_engine(URL, pool_size=10, max_overflow=5, pool_timeout=20)
reg = txguard.SessionRegistry(aeng)
late = {"refused": 0, "other": 0}
REFUSED = (txguard.DisciplineError, txguard.CrossTaskWarning)
keep = set()
async def ins(name):
    await txguard.current_session(reg).execute(sa.text("INSERT INTO adv4_s VALUES (:n)"), {"n": name})
async def ok(r: Request):
    await ins(r.path_params["n"]); return PlainTextResponse("ok", 201)
async def outlive(r: Request):
    await ins(r.path_params["n"])
    s = txguard.current_session(reg)
    async def later():
        await asyncio.sleep(0.05)
        try: await s.execute(sa.text("SELECT 1")); late["other"] += 1
        except REFUSED: late["refused"] += 1  # its unit has ended, or is still committing
        except Exception: late["other"] += 1
    t = asyncio.create_task(later()); keep.add(t); t.add_done_callback(keep.discard)
    return PlainTextResponse("ok", 201)
async def gathered(r: Request):
    n = r.path_params["n"]
    await asyncio.gather(ins(n + "a"), ins(n + "b"))
    return PlainTextResponse("ok", 201)
async def unawaited(r: Request):
    n = r.path_params["n"]
    await ins(n)
    s = txguard.current_session(reg)
    t = asyncio.create_task(s.execute(sa.text("SELECT pg_sleep(0.2)"))); keep.add(t); t.add_done_callback(keep.discard)
    await asyncio.sleep(0.02)
    return PlainTextResponse("ok", 201)
async def stream_late(r: Request):
    n = r.path_params["n"]
    await ins(n)
    s = txguard.current_session(reg)
    async def body():
        yield b"x"
        try: await s.execute(sa.text("SELECT 1")); late["other"] += 1
        except REFUSED: late["refused"] += 1
        yield b"y"
    return StreamingResponse(body(), status_code=201)
async def stats(r: Request):
    async with aeng.connect() as c:
        names = sorted((await c.execute(sa.text("SELECT name FROM adv4_s"))).scalars())
    return JSONResponse({"names": names, "checked_out": aeng.sync_engine.pool.checkedout() - 0, "late": late, "tasks": len(keep)})
star = Starlette(routes=[Route(f"/{p}/{{n}}", f, methods=["POST"]) for p, f in
    [("ok", ok), ("outlive", outlive), ("gather", gathered), ("unawaited", unawaited), ("stream", stream_late)]])
star.add_middleware(UnitOfWorkMiddleware, registry=reg)
app = Starlette(routes=[Route("/stats", stats)])
app.mount("/", star)
