"""txguard.fastapi.session() in websocket endpoints: the unit ends when the endpoint sends
its close, and the close goes out after the COMMIT (1011 when it fails); a refused socket
rolls back. Sync and async registries, on every backend (TestClient; a real server in
tests/test_adversary_adv3.py)."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from fastapi import FastAPI, WebSocket
from fastapi.testclient import TestClient
from sqlalchemy.ext.asyncio import create_async_engine
from starlette.websockets import WebSocketDisconnect

import txguard
from tests.backends import SYNC_URLS, ASYNC_DRIVERS
from tests.helpers import names
from tests.models import Base, Item
from txguard.fastapi import session


class Socket:
    """A FastAPI app whose websocket endpoint saves ?name= and does what ?then= says."""

    def __init__(self, sync: sa.Engine, registry: txguard.SessionRegistry[Any]) -> None:
        self.sync = sync
        self.seen_at_close: list[list[str]] = []
        self.raised: list[str] = []
        self.api = FastAPI()
        is_async = registry.is_async

        @self.api.websocket("/ws")
        async def ws(websocket: WebSocket, db: Any = session(registry=registry)) -> None:
            then = websocket.query_params["then"]
            if then != "refuse":
                await websocket.accept()
            db.add(Item(name=websocket.query_params["name"]))
            if is_async:
                await db.flush()
            else:
                db.flush()
            if then == "refuse":
                await websocket.close()
                return
            if then == "fail":
                (db.sync_session if is_async else db).info["fail_commit"] = True
            if then == "raise":
                raise RuntimeError("the handler failed")
            await websocket.send_text("saved")
            if then in ("close", "fail", "close-then-raise"):
                await websocket.close()
                self.seen_at_close.append(names(sync))
            if then == "close-then-raise":
                raise RuntimeError("after the close")

    def exchange(self, name: str, then: str) -> tuple[list[str], int | None]:
        """Connect, read what comes, and return the texts and the close code (None: none came).

        TestClient raises the endpoint's error when the socket ends, over the close that
        the client received (a ``WebSocketDisconnect``): that error goes to ``raised``."""
        texts: list[str] = []
        with TestClient(self.api) as client:
            try:
                with client.websocket_connect(f"/ws?name={name}&then={then}") as socket:
                    while True:
                        texts.append(socket.receive_text())
            except WebSocketDisconnect as closed:
                return texts, closed.code
            except RuntimeError as error:
                self.raised.append(str(error))
                context: BaseException | None = error
                while context is not None and not isinstance(context, WebSocketDisconnect):
                    context = context.__context__
                return texts, None if context is None else context.code
        raise AssertionError("the socket never closed")


@pytest.fixture(params=["sync", "async"])
def socket(request: pytest.FixtureRequest, backend: str, tmp_path: Path) -> Iterator[Socket]:
    url = f"sqlite:///{tmp_path}/ws.db" if backend == "sqlite" else SYNC_URLS[backend]
    sync = sa.create_engine(url)
    Base.metadata.drop_all(sync)
    Base.metadata.create_all(sync)
    if request.param == "sync":
        registry: txguard.SessionRegistry[Any] = txguard.SessionRegistry(sync)
        engine: Any = sync
    else:
        driver = "sqlite+aiosqlite" if backend == "sqlite" else ASYNC_DRIVERS[backend][0]
        engine = create_async_engine(sa.make_url(url).set(drivername=driver))
        registry = txguard.SessionRegistry(engine)
    txguard.install(mixed_begin="error", leaks="warn", cross_thread="error", cross_task="error")
    sa.event.listen(sa.orm.Session, "before_commit", _fail_when_asked)
    try:
        yield Socket(sync, registry)
    finally:
        sa.event.remove(sa.orm.Session, "before_commit", _fail_when_asked)
        txguard.uninstall()
        if request.param == "async":
            assert engine.sync_engine.pool.checkedout() == 0
            asyncio.run(engine.dispose())
        assert sync.pool.checkedout() == 0
        sync.dispose()


def _fail_when_asked(session: sa.orm.Session) -> None:
    if session.info.get("fail_commit"):
        raise RuntimeError("the COMMIT failed")


def test_the_close_goes_out_after_the_commit(socket: Socket) -> None:
    assert socket.exchange("a", "close") == (["saved"], 1000)
    assert socket.seen_at_close == [["a"]]  # committed when the endpoint's close() returned
    assert names(socket.sync) == ["a"]


def test_a_commit_that_fails_closes_with_1011(socket: Socket) -> None:
    """The endpoint's close() raises the COMMIT's error, after sending 1011 instead of its
    close. TestClient may raise that error before its client reads the 1011 (None here);
    under uvicorn the client gets it (tests/test_adversary_adv3.py)."""
    texts, code = socket.exchange("a", "fail")
    assert (texts, code in (1011, None)) == (["saved"], True), code
    assert (socket.seen_at_close, names(socket.sync)) == ([], [])
    assert socket.raised == ["the COMMIT failed"]


def test_a_refused_socket_rolls_back(socket: Socket) -> None:
    texts, code = socket.exchange("refused", "refuse")
    assert (texts, names(socket.sync)) == ([], [])


def test_an_endpoint_that_raises_rolls_back(socket: Socket) -> None:
    texts, code = socket.exchange("a", "raise")
    assert (texts, names(socket.sync), socket.raised) == ([], [], ["the handler failed"])


def test_an_endpoint_that_raises_after_its_close_keeps_the_commit(socket: Socket) -> None:
    assert socket.exchange("a", "close-then-raise") == (["saved"], 1000)
    assert (names(socket.sync), socket.raised) == (["a"], ["after the close"])
