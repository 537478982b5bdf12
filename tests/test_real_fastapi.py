"""A real FastAPI app under uvicorn, every guard at "error": silent when right, loud when wrong.

tests/apps/fastapi_guards_app.py runs in a subprocess on 127.0.0.1 and is driven over HTTP
with httpx: 200 requests, 20 at a time, for each documented dependency shape (SPEC
section 6). The app records every report txguard makes and serves them at ``/stats``.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import sqlalchemy as sa

from tests.backends import SYNC_URLS, require

ROOT = Path(__file__).resolve().parent.parent
APP = ROOT / "tests" / "apps" / "fastapi_guards_app.py"
REQUESTS, CONCURRENCY = 200, 20
ASYNC_DRIVER = {"postgresql": "postgresql+asyncpg", "mariadb": "mysql+aiomysql"}


def urls(backend: str, tmp_path: Path) -> tuple[str, str]:
    """Return the app's sync and async database URLs on ``backend``."""
    if backend == "sqlite":
        path = tmp_path / "fastapi.db"
        return f"sqlite:///{path}", f"sqlite+aiosqlite:///{path}"
    url = sa.make_url(SYNC_URLS[backend])
    async_url = url.set(drivername=ASYNC_DRIVER[backend])
    return url.render_as_string(hide_password=False), async_url.render_as_string(hide_password=False)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class Server:
    """The app's base URL, and its output for failure messages."""

    def __init__(self, base: str, process: subprocess.Popen[bytes], log: Path) -> None:
        self.base = base
        self.process = process
        self.log = log

    def stats(self) -> dict[str, Any]:
        response = httpx.get(f"{self.base}/stats", timeout=30)
        response.raise_for_status()
        result: dict[str, Any] = response.json()
        return result

    def settled(self) -> dict[str, Any]:
        """Return /stats once every pooled connection is back (cleanups run after the reply)."""
        deadline = time.monotonic() + 10
        while True:
            stats = self.stats()
            if not any(stats["checked_out"].values()) or time.monotonic() > deadline:
                return stats
            time.sleep(0.05)


@contextlib.contextmanager
def uvicorn(
    app: str, env: dict[str, str], log: Path, server: str = "uvicorn"
) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """Serve the ASGI ``app`` ("module:attribute") with uvicorn (or hypercorn) on a free
    port of 127.0.0.1.

    Yields its base URL once ``/stats`` answers; always stops it, whatever happens.
    """
    port = free_port()
    env = {**os.environ, **env, "PYTHONPATH": str(ROOT)}
    env.pop("COVERAGE_PROCESS_START", None)
    if server == "uvicorn":
        options = ["--host", "127.0.0.1", "--port", str(port), "--log-level", "warning",
                   "--timeout-keep-alive", "300"]  # no idle close racing a request on a busy box
    else:
        options = ["--bind", f"127.0.0.1:{port}", "--keep-alive", "300"]
    with log.open("wb") as output:
        process = subprocess.Popen(
            [sys.executable, "-m", server, app, *options],
            cwd=ROOT, env=env, stdout=output, stderr=subprocess.STDOUT,
        )
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 30
        while True:
            if process.poll() is not None:
                pytest.fail(f"the app exited with {process.returncode}:\n{log.read_text()}")
            try:
                if httpx.get(f"{base}/stats", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"the app did not answer within 30 s:\n{log.read_text()}")
            time.sleep(0.1)
        yield base, process
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@pytest.fixture(scope="module", params=["sqlite", "postgresql", "mariadb"])
def server(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """Start the app under uvicorn on a free port; always stop it, whatever happens."""
    backend: str = request.param
    require(backend)
    tmp = tmp_path_factory.mktemp(f"fastapi-{backend}")
    sync_url, async_url = urls(backend, tmp)
    log = tmp / "server.log"
    env = {"TXGUARD_APP_SYNC_URL": sync_url, "TXGUARD_APP_ASYNC_URL": async_url}
    with uvicorn("tests.apps.fastapi_guards_app:app", env, log) as (base, process):
        yield Server(base, process, log)


async def hammer(base: str, path: str) -> list[dict[str, Any]]:
    """POST ``path?n=i`` for each i in range(REQUESTS), CONCURRENCY at a time; return the bodies."""
    limits = httpx.Limits(max_connections=CONCURRENCY)
    gate = asyncio.Semaphore(CONCURRENCY)
    async with httpx.AsyncClient(base_url=base, limits=limits, timeout=60) as client:

        async def one(n: int) -> dict[str, Any]:
            async with gate:
                response = await client.post(path, params={"n": n})
            assert response.status_code == 200, response.text
            body: dict[str, Any] = response.json()
            return body

        return await asyncio.gather(*(one(n) for n in range(REQUESTS)))


def mark(name: str) -> str:
    """Return "fastapi_guards_app.py:<line> in <function>()" for the line marked ``name``."""
    lines = APP.read_text().splitlines()
    number = next(i for i, text in enumerate(lines, 1) if text.endswith(f"# mark: {name}"))
    function = next(
        text.split("def ", 1)[1].split("(", 1)[0]
        for text in reversed(lines[:number])
        if text.lstrip().startswith(("def ", "async def "))
    )
    return f"fastapi_guards_app.py:{number} in {function}()"


def assert_clean(server: Server, shape: str) -> None:
    stats = server.settled()
    assert stats["reports"] == [], stats["reports"]
    assert stats["checked_out"] == {"sync": 0, "async": 0}
    items = httpx.get(f"{server.base}/items", timeout=30).json()
    assert items.get(shape) == list(range(REQUESTS))


@pytest.mark.parametrize(
    ("path", "shape"),
    [
        ("/sync/items", "sync"),
        ("/async/items", "async"),
        ("/scoped/items", "scoped"),
        ("/unit/items", "unit"),
    ],
    ids=["sync-get_db", "async-generator", "asynccontextmanager", "unit_of_work"],
)
async def test_documented_dependency_shapes_run_silently(server: Server, path: str, shape: str) -> None:
    """200 requests, 20 at once: every answer right, every row there, no report, no connection out."""
    bodies = await hammer(server.base, path)
    assert sorted(body["n"] for body in bodies) == list(range(REQUESTS))
    if shape != "unit":
        assert len({body["id"] for body in bodies}) == REQUESTS
    assert_clean(server, shape)


def test_two_tasks_on_one_async_session_are_caught(server: Server) -> None:
    """asyncio.gather() of two queries on the request's AsyncSession answers 500, naming the lines."""
    before = len(server.stats()["reports"])
    response = httpx.get(f"{server.base}/wrong/gather", timeout=30)
    assert response.status_code == 500
    assert response.json()["error"] == "CrossTaskWarning"
    message = response.json()["message"]
    assert f"runs a statement at tests/apps/{mark('gather-child')}" in message
    assert f"autobegun at tests/apps/{mark('gather-began')}" in message
    stats = server.settled()
    assert [r.split(":", 1)[0] for r in stats["reports"][before:]] == ["CrossTaskWarning"]
    assert stats["checked_out"] == {"sync": 0, "async": 0}


def test_begin_after_a_query_is_caught(server: Server) -> None:
    """session.begin() after a query in a `def` endpoint answers 500, naming both lines."""
    before = len(server.stats()["reports"])
    response = httpx.get(f"{server.base}/wrong/begin", timeout=30)
    assert response.status_code == 500
    assert response.json()["error"] == "MixedBeginError"
    message = response.json()["message"]
    assert f"session.begin() was called at tests/apps/{mark('begin-call')}" in message
    assert f"autobegun at tests/apps/{mark('begin-began')}" in message
    stats = server.settled()
    assert [r.split(":", 1)[0] for r in stats["reports"][before:]] == ["MixedBeginError"]
    assert stats["checked_out"] == {"sync": 0, "async": 0}
