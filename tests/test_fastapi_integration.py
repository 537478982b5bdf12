"""txguard.fastapi: a unit per request, committed before the response, in FastAPI's TestClient
(sync and async registries, `def` and `async def` endpoints) on every backend."""


import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any

import pytest
import sqlalchemy as sa
from fastapi import FastAPI
from fastapi.testclient import TestClient
from sqlalchemy.orm import Session

import txguard
from tests.apps.asgi_units_app import Stats, create_apps, create_engines
from tests.apps.flask_app import create_schema
from tests.backends import SYNC_URLS
from tests.models import Item
from txguard.fastapi import session


@pytest.fixture(autouse=True)
def _guards() -> Iterator[None]:
    """Every test runs with the guards at "error", as the server does."""
    txguard.install(mixed_begin="error", leaks="warn", cross_thread="error", cross_task="error")
    try:
        yield
    finally:
        txguard.uninstall()


class Apps:
    def __init__(self, api: FastAPI, stats: Stats, engine: sa.Engine) -> None:
        self.api, self.stats, self.engine = api, stats, engine
        self.client = TestClient(api, raise_server_exceptions=False)

    def names(self) -> list[str]:
        with self.engine.connect() as conn:
            return sorted(conn.scalars(sa.select(Item.name)))


def database_url(backend: str, tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path}/units.db" if backend == "sqlite" else SYNC_URLS[backend]


@pytest.fixture
def apps(backend: str, tmp_path: Path) -> Iterator[Apps]:
    """The test apps on ``backend``; no connection may stay checked out."""
    engine, async_engine = create_engines(database_url(backend, tmp_path))
    create_schema(engine)
    api, _, stats = create_apps(engine, async_engine)
    yield Apps(api, stats, engine)
    pools = (engine.pool, async_engine.sync_engine.pool)
    assert [getattr(pool, "checkedout", lambda: 0)() for pool in pools] == [0, 0]
    engine.dispose()
    asyncio.run(async_engine.dispose())


@pytest.mark.parametrize("kind", ["sync", "async"])
def test_a_response_means_committed_on_commit_ran_and_background_tasks_saw_the_row(
    apps: Apps, kind: str
) -> None:
    """A 201 arrives after the COMMIT; on_commit and background tasks run after it."""
    response = apps.client.post(f"/{kind}/items/ada")
    assert response.status_code == 201
    assert response.json() == {"name": "ada", "one_session": True}
    assert apps.names() == ["ada"]
    assert (apps.stats.committed, apps.stats.seen_after_commit) == (["ada"], 1)
    assert apps.stats.background == ["ada"]


def test_an_exception_in_a_def_endpoint_rolls_back(apps: Apps) -> None:
    """A 500 from an endpoint that raised: nothing committed, no callback."""
    assert apps.client.post("/sync/raise/bob").status_code == 500
    assert apps.names() == []
    assert apps.stats.committed == []


def test_an_http_exception_rolls_back(apps: Apps) -> None:
    """HTTPException(409) after a flush: the client gets the 409, the row is rolled back."""
    response = apps.client.post("/async/http-error/cy")
    assert (response.status_code, response.json()) == (409, {"detail": "conflict"})
    assert apps.names() == []


@pytest.mark.parametrize("kind", ["sync", "async"])
def test_a_failed_commit_reaches_the_client_as_a_500(apps: Apps, kind: str) -> None:
    """A COMMIT that fails never yields the 201: the client gets a 500, nothing is kept."""
    response = apps.client.post(f"/{kind}/commit-fails/eve")
    assert response.status_code == 500
    assert apps.names() == []
    assert apps.stats.committed == apps.stats.background == []


def test_a_failed_commit_raises_through_the_test_client(apps: Apps) -> None:
    """With raise_server_exceptions (TestClient's default), the commit's error reaches the test."""
    with pytest.raises(sa.exc.DBAPIError):
        TestClient(apps.api).post("/async/commit-fails/eve")
    assert apps.names() == []


# Declaration: one unit per request, options checked at once.


def test_same_options_at_different_call_sites_share_one_unit(tmp_path: Path) -> None:
    """session(read_only=True) declared twice is one dependency, so one session per request."""
    registry = txguard.SessionRegistry(sa.create_engine(f"sqlite:///{tmp_path}/a.db"))
    first = session(registry=registry, read_only=True)
    second = session(read_only=True, registry=registry)
    assert first.dependency is second.dependency
    assert session(registry=registry).dependency is not first.dependency


def test_different_options_in_one_request_are_refused(tmp_path: Path) -> None:
    """Two session() with different options in one request: ConfigurationError, no unit opened."""
    engine = sa.create_engine(f"sqlite:///{tmp_path}/a.db")
    registry = txguard.SessionRegistry(engine)
    api = FastAPI()

    @api.get("/")
    def both(
        a: Annotated[Session, session(registry=registry)],
        b: Annotated[Session, session(registry=registry, read_only=True)],
    ) -> None:
        raise AssertionError("not reached")

    with pytest.raises(txguard.ConfigurationError, match="different options"):
        TestClient(api).get("/")
    assert engine.pool.checkedout() == 0


def test_unknown_options_are_refused_at_declaration() -> None:
    """A misspelt option fails where the route is declared, listing the valid ones."""
    with pytest.raises(txguard.ConfigurationError, match=r"'readonly'.*read_only"):
        session(readonly=True)


def test_bad_option_values_are_refused_at_declaration() -> None:
    """Every value is validated once, by the core, when session() is called."""
    with pytest.raises(txguard.ConfigurationError, match="propagation='sometimes'"):
        session(propagation="sometimes")


def test_the_default_registry_is_looked_up_at_each_request(tmp_path: Path) -> None:
    """session() may be declared before txguard.configure()."""
    api = FastAPI()

    @api.get("/")
    def view(db: Session = session()) -> bool:
        return db is txguard.current_session()

    engine = sa.create_engine(f"sqlite:///{tmp_path}/a.db")
    txguard.configure(engine)
    assert TestClient(api).get("/").json() is True
    assert engine.pool.checkedout() == 0


def test_a_returned_error_response_commits_as_django_atomic_requests(tmp_path: Path) -> None:
    """The dependency sees exceptions, not returned responses: a returned 409 commits."""
    from fastapi.responses import JSONResponse

    engine = sa.create_engine(f"sqlite:///{tmp_path}/a.db")
    create_schema(engine)
    registry = txguard.SessionRegistry(engine)
    api = FastAPI()

    @api.post("/")
    def view(db: Session = session(registry=registry)) -> Any:
        db.add(Item(name="kept"))
        return JSONResponse({}, status_code=409)

    assert TestClient(api).post("/").status_code == 409
    with engine.connect() as conn:
        assert list(conn.scalars(sa.select(Item.name))) == ["kept"]


ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("example", ["fastapi_app.py", "asgi_app.py"])
def test_the_examples_tell_their_story(example: str) -> None:
    """examples/{fastapi,asgi}_app.py: a commit, a 403 rolled back, a COMMIT that fails."""
    import subprocess
    import sys

    result = subprocess.run(
        [sys.executable, f"examples/{example}"], cwd=ROOT, capture_output=True, text=True,
        check=True, timeout=60,
    )
    assert "POST /notes/forbidden -> 403" in result.stdout
    assert "POST /notes/hello -> 500" in result.stdout
    assert result.stdout.rstrip().endswith("GET /notes -> {'notes': ['hello']}")


def test_session_markers_do_not_keep_their_registry_alive() -> None:
    """session() caches its dependency per registry and options weakly: once nothing uses a
    marker (an app built per test, gone), its registry and engine can be garbage-collected.
    (FastAPI itself keeps the last endpoints it classified, and their defaults, in bounded
    caches: a route's registry lives as long as FastAPI keeps that route's endpoint.)"""
    import gc
    import weakref

    engine = sa.create_engine("sqlite://")
    registry = txguard.SessionRegistry(engine)
    marker = session(registry=registry)
    assert session(registry=registry).dependency is marker.dependency  # one per options
    assert session(registry=registry, read_only=True).dependency is not marker.dependency
    alive = weakref.ref(registry)
    del registry
    gc.collect()
    assert alive() is not None  # the marker's dependency serves it
    del marker
    gc.collect()
    assert alive() is None
    engine.dispose()


def test_messages_about_the_request_unit_name_the_endpoint(tmp_path: Path) -> None:
    """A DisciplineError about the request's unit says it was opened at the endpoint's def."""
    from sqlalchemy.ext.asyncio import AsyncSession, create_async_engine

    engine = create_async_engine(f"sqlite+aiosqlite:///{tmp_path}/m.db")
    registry = txguard.SessionRegistry(engine)
    api = FastAPI()
    messages: list[str] = []

    @api.post("/orders")
    async def create_order(db: AsyncSession = session(registry=registry)) -> None:
        try:
            await db.commit()
        except txguard.DisciplineError as exc:
            messages.append(str(exc))

    TestClient(api).post("/orders")
    line = create_order.__code__.co_firstlineno
    assert f"opened at tests/test_fastapi_integration.py:{line} in create_order()" in messages[0]
