"""txguard.asgi.UnitOfWorkMiddleware: a unit per HTTP request of a Starlette app, decided when
the response starts, in Starlette's TestClient on every backend."""

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import create_async_engine
from starlette.applications import Starlette
from starlette.responses import PlainTextResponse
from starlette.routing import Route
from starlette.testclient import TestClient

import txguard
from tests.apps.asgi_units_app import Stats, create_apps, create_engines
from tests.apps.flask_app import create_schema
from tests.models import Item
from tests.test_fastapi_integration import _guards, database_url  # noqa: F401 (autouse)
from txguard.asgi import UnitOfWorkMiddleware


class App:
    def __init__(self, star: Starlette, stats: Stats, engine: sa.Engine) -> None:
        self.stats, self.engine = stats, engine
        self.client = TestClient(star, raise_server_exceptions=False)

    def names(self) -> list[str]:
        with self.engine.connect() as conn:
            return sorted(conn.scalars(sa.select(Item.name)))


@pytest.fixture
def app(backend: str, tmp_path: Path) -> Iterator[App]:
    """The Starlette test app on ``backend``; no connection may stay checked out."""
    engine, async_engine = create_engines(database_url(backend, tmp_path))
    create_schema(engine)
    _, star, stats = create_apps(engine, async_engine)
    yield App(star, stats, engine)
    pools = (engine.pool, async_engine.sync_engine.pool)
    assert [getattr(pool, "checkedout", lambda: 0)() for pool in pools] == [0, 0]
    engine.dispose()
    asyncio.run(async_engine.dispose())


def test_a_success_status_commits_before_the_response_starts(app: App) -> None:
    """A 201 means committed; the on_commit callback ran and saw the row."""
    assert app.client.post("/items/ada").status_code == 201
    assert app.names() == ["ada"]
    assert (app.stats.committed, app.stats.seen_after_commit) == (["ada"], 1)


def test_an_error_status_rolls_back(app: App) -> None:
    """A returned 409 after a flush rolls back (a commit veto, as pyramid_tm)."""
    assert app.client.post("/conflict/bob").status_code == 409
    assert app.names() == []
    assert app.stats.committed == []


def test_an_exception_rolls_back(app: App) -> None:
    """A handler that raises: a 500, nothing committed."""
    assert app.client.post("/raise/cy").status_code == 500
    assert app.names() == []


def test_a_failed_commit_replaces_the_response_with_a_500(app: App) -> None:
    """The COMMIT fails before the start is sent: the client gets a 500, not the 201."""
    response = app.client.post("/commit-fails/eve")
    assert (response.status_code, response.text) == (500, "Internal Server Error")
    assert app.names() == []
    assert app.stats.committed == []


def test_a_def_handler_runs_inside_the_requests_unit(app: App) -> None:
    """Starlette runs a def handler in a worker thread; the request's unit follows it there."""
    assert app.client.get("/in-unit").text == "True"


def test_lifespan_and_unasked_websocket_scopes_get_no_unit(tmp_path: Path) -> None:
    """Only http scopes get a unit by default: the app starts and stops without the database."""
    registry = txguard.SessionRegistry(create_async_engine(f"sqlite+aiosqlite:///{tmp_path}/a.db"))
    star = Starlette(routes=[Route("/", lambda request: PlainTextResponse("ok"))])
    star.add_middleware(UnitOfWorkMiddleware, registry=registry)
    with TestClient(star) as client:
        assert client.get("/").text == "ok"


def test_a_sync_registry_is_refused(tmp_path: Path) -> None:
    """ASGI handlers run on the event loop: a sync Session there would block every request."""
    registry = txguard.SessionRegistry(sa.create_engine(f"sqlite:///{tmp_path}/a.db"))
    with pytest.raises(txguard.ConfigurationError, match="AsyncEngine"):
        UnitOfWorkMiddleware(Starlette(), registry=registry)


def test_unknown_options_are_refused_when_the_middleware_is_created() -> None:
    """A misspelt option fails at startup with the list of valid ones."""
    with pytest.raises(txguard.ConfigurationError, match=r"'readonly'.*read_only"):
        UnitOfWorkMiddleware(Starlette(), readonly=True)


def test_unknown_scope_types_are_refused() -> None:
    """scope_types takes http and websocket only."""
    with pytest.raises(txguard.ConfigurationError, match="lifespan scopes never get a unit"):
        UnitOfWorkMiddleware(Starlette(), scope_types=("http", "lifespan"))


def test_messages_about_the_request_unit_name_the_endpoint(tmp_path: Path) -> None:
    """The unit opens before routing; its messages still name the endpoint's definition.

    Not Starlette's middleware code that called the middleware, which the user never wrote;
    a request that matched no route keeps the middleware's own site.
    """
    engine = create_async_engine(f"sqlite+aiosqlite:///{tmp_path}/m.db")
    registry = txguard.SessionRegistry(engine)
    messages: list[str] = []

    async def create_order(request: object) -> PlainTextResponse:
        try:
            await registry.current_session().commit()
        except txguard.DisciplineError as exc:
            messages.append(str(exc))
        return PlainTextResponse("ok")

    app = UnitOfWorkMiddleware(Starlette(routes=[Route("/orders", create_order, methods=["POST"])]),
                               registry=registry)
    with TestClient(app) as client:
        assert client.post("/orders").status_code == 200
    asyncio.run(engine.dispose())
    line = create_order.__code__.co_firstlineno
    assert f"opened at tests/test_asgi_integration.py:{line} in create_order()" in messages[0]
