"""txguard.asgi.UnitOfWorkMiddleware on Litestar and Quart (SPEC section 10 names them), guards
at "error": in process with each framework's test client, then served for real (Litestar by
uvicorn, Quart by hypercorn), 200 requests 20 at a time, data exact, the pool clean."""

import asyncio
from collections import Counter
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tests.apps.asgi_frameworks_app import create_litestar, create_quart
from tests.apps.flask_app import create_engine, create_schema
from tests.backends import require
from tests.test_adversary_web import Db, db  # noqa: F401 (the fixture)
from tests.test_fastapi_integration import database_url
from tests.test_real_fastapi import CONCURRENCY, REQUESTS, uvicorn

pytest.importorskip("litestar")
pytest.importorskip("quart")

EXPECTED = {"items": 201, "conflict": 409, "raise": 500, "stream": 201}


def test_litestar_commits_below_400_and_rolls_back_otherwise(db: Db) -> None:
    """Litestar (the whole app wrapped): 201 and streams commit; a raised 409 and a 500 do not."""
    from litestar.testing import TestClient

    with TestClient(create_litestar(db.aio)) as client:
        got = {route: client.post(f"/{route}/{route}").status_code for route in EXPECTED}
        assert client.post("/stream/s2").content == b"s2"
    assert got == EXPECTED
    assert db.names() == ["items", "s2", "stream"]
    assert db.checked_out() == [0, 0]


def test_quart_commits_below_400_and_rolls_back_otherwise(db: Db) -> None:
    """Quart (``app.asgi_app`` wrapped; handlers run in tasks of Quart's own): the same."""
    app = create_quart(db.aio)

    async def main() -> tuple[dict[str, int], bytes]:
        client = app.test_client()
        got = {route: (await client.post(f"/{route}/{route}")).status_code for route in EXPECTED}
        body = await (await client.post("/stream/s2")).get_data()
        await db.async_engine.dispose()
        return got, body

    got, body = asyncio.run(main())
    assert (got, body) == (EXPECTED, b"s2")
    assert db.names() == ["items", "s2", "stream"]
    assert db.checked_out() == [0, 0]


@pytest.fixture(
    scope="module",
    params=[(framework, backend) for framework in ("litestar", "quart")
            for backend in ("sqlite", "postgresql")],
    ids=lambda p: "-".join(p),
)
def served(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Serve the framework's app (Litestar: uvicorn, Quart: hypercorn); always stop it."""
    framework, backend = request.param
    require(backend)
    tmp = tmp_path_factory.mktemp(f"{framework}-{backend}")
    database = database_url(backend, tmp)
    engine = create_engine(database)
    create_schema(engine)  # here, once: never in the served module, which a server may re-import
    engine.dispose()
    env = {"TXGUARD_APP_SYNC_URL": database, "TXGUARD_APP": framework}
    server = "hypercorn" if framework == "quart" else "uvicorn"
    with uvicorn("tests.apps.asgi_frameworks_app:app", env, tmp / "server.log", server) as (url, _):
        yield url


async def test_200_requests_from_20_clients_under_a_real_server(served: str) -> None:
    """Every status right, every committed row there and no other, no finding, pool clean."""
    routes = list(EXPECTED)
    calls = [(routes[i % len(routes)], f"n{i}") for i in range(REQUESTS)]
    gate = asyncio.Semaphore(CONCURRENCY)
    limits = httpx.Limits(max_connections=CONCURRENCY, max_keepalive_connections=0)
    async with httpx.AsyncClient(base_url=served, limits=limits, timeout=60) as client:

        async def one(route: str, name: str) -> tuple[str, int]:
            async with gate:
                response = await client.post(f"/{route}/{name}")
            if route == "stream":
                assert response.content == name.encode()
            return route, response.status_code

        outcomes = Counter(await asyncio.gather(*(one(r, n) for r, n in calls)))
        stats: dict[str, Any] = (await client.get("/stats")).json()
    assert outcomes == Counter((route, EXPECTED[route]) for route, _ in calls)
    assert stats["items"] == sorted(n for r, n in calls if EXPECTED[r] == 201)
    assert stats["findings"] == []
    assert stats["checked_out"] == 0
