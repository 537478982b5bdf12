"""txguard.fastapi and txguard.asgi under a real server: uvicorn in a subprocess on 127.0.0.1,
driven by httpx, 200 requests 20 at a time, guards at "error", on every backend."""

import asyncio
import time
from collections import Counter
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tests.backends import require
from tests.test_fastapi_integration import database_url
from tests.test_real_fastapi import CONCURRENCY, REQUESTS, uvicorn

SUCCESS = ["/sync/items", "/async/items", "/starlette/items", "/starlette/stream",
           "/starlette/sync-stream", "/behind/items"]
STREAMS = frozenset({"/starlette/stream", "/starlette/sync-stream", "/behind/items"})
FAILURES = {  # path -> the status its client must get
    "/sync/raise": 500, "/async/http-error": 409, "/starlette/conflict": 409,
    "/starlette/raise": 500, "/sync/commit-fails": 500, "/async/commit-fails": 500,
    "/starlette/commit-fails": 500, "/behind/conflict": 409,
}


def requests() -> list[tuple[str, str]]:
    """200 (path, name) pairs: seven in ten succeed, the rest fail in every way there is."""
    failing = list(FAILURES)
    chosen = [
        (SUCCESS[i % len(SUCCESS)] if i % 10 < 7 else failing[i % len(failing)], f"n{i}")
        for i in range(REQUESTS)
    ]
    return chosen


@pytest.fixture(scope="module", params=["sqlite", "postgresql", "mariadb"])
def base(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Serve tests/apps/asgi_units_app.py with uvicorn on a free port; always stop it."""
    backend: str = request.param
    require(backend)
    tmp = tmp_path_factory.mktemp(f"asgi-{backend}")
    env = {"TXGUARD_APP_SYNC_URL": database_url(backend, tmp)}
    with uvicorn("tests.apps.asgi_units_app:app", env, tmp / "server.log") as (url, _):
        yield url


async def hammer(url: str, calls: list[tuple[str, str]]) -> Counter[tuple[str, int]]:
    gate = asyncio.Semaphore(CONCURRENCY)
    # No keep-alive: uvicorn closes a connection after an app raised (FastAPI re-raises every
    # 500), and a client reusing it at that moment would see a ReadError, not an answer.
    limits = httpx.Limits(max_connections=CONCURRENCY, max_keepalive_connections=0)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=60) as client:

        async def one(path: str, name: str) -> tuple[str, int]:
            async with gate:
                response = await client.post(f"{path}/{name}")
            if path in STREAMS and response.status_code == 201:
                assert response.content == name.encode()  # the body after the COMMIT
            return path, response.status_code

        return Counter(await asyncio.gather(*(one(p, n) for p, n in calls)))


def settled(url: str) -> dict[str, Any]:
    """Return /stats once every connection is back and every background task has run."""
    deadline = time.monotonic() + 10
    while True:
        stats: dict[str, Any] = httpx.get(f"{url}/stats", timeout=30).json()
        if stats["checked_out"] == 0 or time.monotonic() > deadline:
            return stats
        time.sleep(0.05)


async def test_200_requests_from_20_clients_keep_the_data_exact(base: str) -> None:
    """Every status right, every committed row there and no other, callbacks after commits."""
    calls = requests()
    outcomes = await hammer(base, calls)
    assert outcomes == Counter((path, FAILURES.get(path, 201)) for path, _ in calls)
    committed = sorted(name for path, name in calls if path in SUCCESS)
    stats = settled(base)
    assert stats["findings"] == []
    assert stats["checked_out"] == 0
    assert stats["items"] == committed
    assert stats["committed"] == committed and stats["seen_after_commit"] == len(committed)
    fastapi_committed = sorted(n for p, n in calls if p in SUCCESS[:2])
    assert stats["background"] == fastapi_committed
