"""A Starlette app under txguard.asgi.UnitOfWorkMiddleware: a unit per HTTP request.

Run the demo (Starlette's TestClient, no server): `.venv/bin/python examples/asgi_app.py`
Serve it: `.venv/bin/uvicorn examples.asgi_app:app`, then
`curl -X POST localhost:8000/notes/hello` and `curl localhost:8000/notes`.
Data goes to an SQLite file next to this script.
"""

import contextlib
import logging
from collections.abc import AsyncIterator
from pathlib import Path

from sqlalchemy import String, select
from sqlalchemy.ext.asyncio import create_async_engine
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route
from starlette.testclient import TestClient

import txguard
from txguard.asgi import UnitOfWorkMiddleware


class Base(DeclarativeBase):
    pass


class Note(Base):
    __tablename__ = "notes"

    id: Mapped[int] = mapped_column(primary_key=True)
    text: Mapped[str] = mapped_column(String(100), unique=True)


engine = create_async_engine(f"sqlite+aiosqlite:///{Path(__file__).with_name('asgi_app.db')}")
txguard.configure(engine)


async def create(request: Request) -> JSONResponse:
    text = request.path_params["text"]
    txguard.current_session().add(Note(text=text))
    txguard.on_commit(lambda: print(f"  on_commit: {text!r} is committed"))
    if text == "forbidden":
        return JSONResponse({"error": "forbidden"}, status_code=403)  # >= 400: rolled back
    return JSONResponse({"created": text}, status_code=201)  # committed before it is sent


async def index(request: Request) -> JSONResponse:
    notes = await txguard.current_session().scalars(select(Note.text))
    return JSONResponse({"notes": list(notes)})


@contextlib.asynccontextmanager
async def lifespan(app: Starlette) -> AsyncIterator[None]:
    async with engine.begin() as conn:  # lifespan scopes get no unit
        await conn.run_sync(Base.metadata.create_all)
    yield
    await engine.dispose()


app = Starlette(
    routes=[Route("/notes/{text}", create, methods=["POST"]), Route("/notes", index)],
    lifespan=lifespan,
)
app.add_middleware(UnitOfWorkMiddleware)  # the default registry, set by txguard.configure

if __name__ == "__main__":
    logging.getLogger("txguard").disabled = True  # it logs the failed commit's traceback
    Path(__file__).with_name("asgi_app.db").unlink(missing_ok=True)
    with TestClient(app) as client:
        for text in ("hello", "forbidden", "hello"):  # the second "hello" fails at COMMIT
            print(f"POST /notes/{text} -> {client.post(f'/notes/{text}').status_code}")
        print(f"GET /notes -> {client.get('/notes').json()}")
