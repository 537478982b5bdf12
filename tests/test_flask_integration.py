"""txguard.flask: a unit per request, committed before the response, in Flask's test client
and under a real WSGI server (waitress) driven by 20 concurrent clients."""

from __future__ import annotations

import os
import subprocess
import sys
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import IO
import warnings

import pytest
import sqlalchemy as sa
from flask import Flask
from sqlalchemy.orm import sessionmaker

import txguard
from tests.apps.flask_app import create_app, create_schema, create_item
from tests.models import Item
from txguard.flask import TxGuard

flask_testing = pytest.mark.parametrize("testing", [False, True], ids=["production", "TESTING"])
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def _guards() -> Iterator[None]:
    """Every test runs with the guards at "error", as the server does."""
    txguard.install(mixed_begin="error", leaks="warn", cross_thread="error", cross_task="error")
    try:
        yield
    finally:
        txguard.uninstall()


@pytest.fixture
def app_engine(engine: sa.Engine) -> Iterator[sa.Engine]:
    """The backend's engine with the app's tables (SQLite enforcing its foreign keys)."""
    if engine.dialect.name == "sqlite":
        engine = sa.create_engine(engine.url, connect_args={"timeout": 30})
        sa.event.listen(engine, "connect", lambda dbapi, _: dbapi.execute("PRAGMA foreign_keys=ON"))
    create_schema(engine)
    yield engine
    assert engine.pool.checkedout() == 0  # noqa: S101
    if engine.dialect.name == "sqlite":
        engine.dispose()


@pytest.fixture(params=["default registry", "explicit registry"])
def app(request: pytest.FixtureRequest, app_engine: sa.Engine) -> Flask:
    registry = None if request.param == "default registry" else txguard.SessionRegistry(app_engine)
    return create_app(app_engine, registry)


def names(engine: sa.Engine) -> list[str]:
    with engine.connect() as conn:
        return sorted(conn.scalars(sa.select(Item.name)))


# The test client.


def test_a_view_that_returns_commits_before_the_response_and_on_commit_runs_after(
    app: Flask, app_engine: sa.Engine
) -> None:
    """A 201 response means the row is committed and the on_commit callback has seen it."""
    response = app.test_client().post("/items/ada")
    assert response.status_code == 201
    assert names(app_engine) == ["ada"]
    stats = app.extensions["test_stats"]
    assert (stats.committed, stats.seen_after_commit) == (["ada"], 1)


@flask_testing
def test_an_exception_in_the_view_rolls_back(
    app: Flask, app_engine: sa.Engine, testing: bool
) -> None:
    """An unhandled exception rolls the request back: a 500, or raised under TESTING."""
    app.testing = testing
    if testing:
        with pytest.raises(RuntimeError, match="the view failed"):
            app.test_client().post("/raise/bob")
    else:
        assert app.test_client().post("/raise/bob").status_code == 500
    assert names(app_engine) == []
    assert app.extensions["test_stats"].committed == []


def test_abort_400_rolls_back(app: Flask, app_engine: sa.Engine) -> None:
    """abort(400) after a flush rolls the flushed row back."""
    assert app.test_client().post("/abort/cy").status_code == 400
    assert names(app_engine) == []


def test_a_returned_409_rolls_back(app: Flask, app_engine: sa.Engine) -> None:
    """A view that returns an error status rolls back, though nothing raised."""
    assert app.test_client().post("/conflict/dee").status_code == 409
    assert names(app_engine) == []


def test_a_failed_commit_gives_the_client_a_500(app: Flask, app_engine: sa.Engine) -> None:
    """A COMMIT that fails (deferred constraint, killed connection) never yields the 201."""
    response = app.test_client().post("/commit-fails/eve")
    assert response.status_code == 500
    assert names(app_engine) == []
    assert app.extensions["test_stats"].committed == []


def test_a_failed_commit_raises_through_the_test_client_under_testing(
    app: Flask, app_engine: sa.Engine
) -> None:
    """Under TESTING the commit's database error reaches the test."""
    app.testing = True
    with pytest.raises(sa.exc.DBAPIError):
        app.test_client().post("/commit-fails/eve")
    assert names(app_engine) == []


def test_session_commit_in_a_begin_once_request_raises_discipline_error(
    app: Flask, app_engine: sa.Engine
) -> None:
    """The request's unit owns the boundaries: session.commit() in the view is refused."""
    app.testing = True
    with pytest.raises(txguard.DisciplineError, match=r"session\.commit\(\) inside the begin-once"):
        app.test_client().post("/session-commit/fay")
    assert names(app_engine) == []


def test_commit_as_you_go_requests_may_commit_in_the_view(app_engine: sa.Engine) -> None:
    """TxGuard(app, mode="commit_as_you_go") lets views commit, and their callbacks run."""
    flask_app = Flask(__name__)
    registry = txguard.SessionRegistry(app_engine)
    TxGuard(flask_app, registry=registry, mode="commit_as_you_go")
    ran: list[str] = []

    @flask_app.post("/")
    def view() -> str:
        create_item("gus", registry)
        txguard.on_commit(lambda: ran.append("after commit"), registry=registry)
        registry.current_session().commit()
        return "ok"

    assert flask_app.test_client().post("/").status_code == 200
    assert names(app_engine) == ["gus"]
    assert ran == ["after commit"]


def test_a_streamed_response_is_committed_before_its_body_runs(
    app: Flask, app_engine: sa.Engine
) -> None:
    """Streaming is decided at the start: the body runs after the commit, outside the unit."""
    response = app.test_client().get("/stream/hal")
    assert response.status_code == 200
    assert response.get_data(as_text=True) == "in unit: False"
    assert names(app_engine) == ["hal"]


@flask_testing
def test_no_rollback_for_commits_an_unhandled_exception_the_same_way_under_testing(
    app_engine: sa.Engine, testing: bool
) -> None:
    """The unit's rules judge an unhandled exception, in production and under TESTING alike."""
    flask_app = Flask(__name__)
    flask_app.testing = testing
    registry = txguard.SessionRegistry(app_engine)
    TxGuard(flask_app, registry=registry, no_rollback_for=LookupError)

    @flask_app.post("/")
    def view() -> str:
        create_item("ivy", registry)
        raise KeyError("kept")

    if testing:
        with pytest.raises(KeyError):
            flask_app.test_client().post("/")
    else:
        assert flask_app.test_client().post("/").status_code == 500
    assert names(app_engine) == ["ivy"]


def test_an_error_status_rolls_back_whatever_rollback_for_says(app_engine: sa.Engine) -> None:
    """rollback_for selects exceptions; a 4xx response rolls back even when it selects none."""
    flask_app = Flask(__name__)
    registry = txguard.SessionRegistry(app_engine)
    TxGuard(flask_app, registry=registry, rollback_for=ZeroDivisionError)

    @flask_app.post("/")
    def view() -> tuple[str, int]:
        create_item("jo", registry)
        return "invalid", 422

    assert flask_app.test_client().post("/").status_code == 422
    assert names(app_engine) == []


def test_an_exception_an_error_handler_turns_into_a_redirect_commits(
    app_engine: sa.Engine,
) -> None:
    """A handled exception is judged by the response it became: a 302 commits."""
    flask_app = Flask(__name__)
    registry = txguard.SessionRegistry(app_engine)
    TxGuard(flask_app, registry=registry)

    class NeedsLogin(Exception):
        pass

    flask_app.register_error_handler(NeedsLogin, lambda exc: ("", 302, {"Location": "/login"}))

    @flask_app.post("/")
    def view() -> str:
        create_item("kim", registry)
        raise NeedsLogin

    assert flask_app.test_client().post("/").status_code == 302
    assert names(app_engine) == ["kim"]


class Interrupted(BaseException):
    """Stands for KeyboardInterrupt or SystemExit: not an Exception, Flask re-raises it."""


def test_teardown_rolls_back_and_closes_a_unit_that_a_base_exception_left_open(
    app_engine: sa.Engine,
) -> None:
    """A BaseException skips after_request; teardown_request still rolls back and closes."""
    flask_app = Flask(__name__)
    registry = txguard.SessionRegistry(app_engine)
    TxGuard(flask_app, registry=registry)

    @flask_app.post("/")
    def view() -> str:
        create_item("lou", registry)
        registry.current_session().flush()
        raise Interrupted

    with pytest.raises(Interrupted):
        flask_app.test_client().post("/")
    assert names(app_engine) == []
    assert app_engine.pool.checkedout() == 0


def test_the_default_registry_is_looked_up_at_each_request(app_engine: sa.Engine) -> None:
    """TxGuard(app) may be created before txguard.configure()."""
    flask_app = Flask(__name__)
    TxGuard(flask_app)

    @flask_app.post("/")
    def view() -> str:
        create_item("max")
        return "ok"

    txguard.configure(app_engine)
    assert flask_app.test_client().post("/").status_code == 200
    assert names(app_engine) == ["max"]


def test_init_app_stores_the_extension_in_app_extensions(app_engine: sa.Engine) -> None:
    """The extension pattern: TxGuard(registry=...) first, init_app(app) later."""
    registry = txguard.SessionRegistry(app_engine)
    guard = TxGuard(registry=registry, read_only=True)
    flask_app = Flask(__name__)
    guard.init_app(flask_app)
    assert flask_app.extensions["txguard"] is guard

    @flask_app.post("/")
    def view() -> str:
        create_item("ned", registry)
        return "ok"

    flask_app.testing = True
    with pytest.raises(txguard.ReadOnlyTransactionError):
        flask_app.test_client().post("/")


def test_init_app_twice_is_refused() -> None:
    """One TxGuard per app: a second one would open a second unit per request."""
    flask_app = Flask(__name__)
    TxGuard(flask_app)
    with pytest.raises(txguard.ConfigurationError, match="already has a txguard.flask.TxGuard"):
        TxGuard(flask_app)


def test_unknown_options_are_refused_naming_the_options() -> None:
    """A misspelt option fails at startup with the list of valid ones."""
    with pytest.raises(txguard.ConfigurationError, match=r"'readonly'.*read_only"):
        TxGuard(Flask(__name__), readonly=True)


def test_bad_option_values_are_refused_at_startup() -> None:
    """Every option is validated once, by the core, when TxGuard is created."""
    with pytest.raises(txguard.ConfigurationError, match="propagation='sometimes'"):
        TxGuard(Flask(__name__), propagation="sometimes")


def test_an_async_registry_is_refused(tmp_path: Path) -> None:
    """Flask calls views synchronously: an AsyncSession registry cannot serve them."""
    from sqlalchemy.ext.asyncio import create_async_engine

    registry = txguard.SessionRegistry(create_async_engine(f"sqlite+aiosqlite:///{tmp_path}/a.db"))
    with pytest.raises(txguard.ConfigurationError, match="Flask calls views synchronously"):
        TxGuard(Flask(__name__), registry=registry)


def test_flask_sqlalchemy_engine_and_session_class(tmp_path: Path) -> None:
    """A registry on Flask-SQLAlchemy's db.engine and Session class serves its models."""
    import flask_sqlalchemy
    from flask_sqlalchemy.session import Session as FlaskSession

    flask_app = Flask(__name__)
    flask_app.config["SQLALCHEMY_DATABASE_URI"] = f"sqlite:///{tmp_path}/fsa.db"
    db = flask_sqlalchemy.SQLAlchemy(flask_app)

    class Note(db.Model):  # type: ignore[name-defined,misc]
        id = db.Column(db.Integer, primary_key=True)
        text = db.Column(db.String(50))

    with flask_app.app_context():
        db.create_all()
        registry = txguard.SessionRegistry(sessionmaker(db.engine, class_=FlaskSession, db=db))
    TxGuard(flask_app, registry=registry)

    @flask_app.post("/<text>")
    def post(text: str) -> tuple[str, int]:
        session = registry.current_session()
        assert isinstance(session, FlaskSession)  # noqa: S101
        session.add(Note(text=text))
        return "", 201 if text == "ok" else 409

    client = flask_app.test_client()
    assert [client.post("/ok").status_code, client.post("/no").status_code] == [201, 409]
    with flask_app.app_context():
        assert [note.text for note in db.session.scalars(sa.select(Note))] == ["ok"]
        db.session.remove()
        assert db.engine.pool.checkedout() == 0


# A real WSGI server.


def start_server(url: str, log: IO[str]) -> tuple[subprocess.Popen[str], int]:
    env = {**os.environ, "TXGUARD_FLASK_DB_URL": url, "PYTHONPATH": str(ROOT)}
    server = subprocess.Popen(  # its log (a traceback per 500) goes to a file, not the run's output
        [sys.executable, "-m", "tests.apps.flask_app"],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=log, text=True,
    )
    assert server.stdout is not None  # noqa: S101
    line = server.stdout.readline()
    if not line.strip().isdigit():
        server.kill()
        pytest.fail(f"the Flask app did not start (exit code {server.wait()}); see {log.name}")
    return server, int(line)


def test_under_waitress_200_requests_from_20_clients_keep_the_data_exact(
    app_engine: sa.Engine, tmp_path: Path
) -> None:
    """Guards at "error", 20 concurrent clients: every status, row and callback is right."""
    import httpx

    log = (tmp_path / "server.log").open("w")
    server, port = start_server(app_engine.url.render_as_string(hide_password=False), log)
    try:
        requests = [
            (path, f"{path[1:]}{i}-{j}") for i in range(40)
            for j, path in enumerate(("/items", "/items", "/items", "/raise", "/abort"))
        ]
        requests[::20] = [("/conflict", f"conflict{i}") for i in range(10)]
        requests[1::20] = [("/commit-fails", f"fail{i}") for i in range(10)]
        assert len(requests) == 200
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60) as client:

            def call(request: tuple[str, str]) -> tuple[str, int]:
                path, name = request
                return path, client.post(f"{path}/{name}").status_code

            with ThreadPoolExecutor(20) as pool:
                outcomes = Counter(pool.map(call, requests))
            stats = client.get("/stats").json()
        expected = Counter(
            (path, {"/items": 201, "/abort": 400, "/conflict": 409}.get(path, 500))
            for path, _ in requests
        )
        assert outcomes == expected
        committed = sorted(name for path, name in requests if path == "/items")
        assert stats["items"] == committed == names(app_engine)
        assert stats["committed"] == stats["seen_after_commit"] == len(committed)
        assert stats["guard_findings"] == []
        assert stats["checkedout"] == 0
    finally:
        server.terminate()
        server.wait(timeout=30)
        log.close()


def test_the_flask_example_runs() -> None:
    """examples/flask_app.py tells its story: a commit, a 403 rolled back, a failed COMMIT."""
    result = subprocess.run(
        [sys.executable, "examples/flask_app.py"], cwd=ROOT, capture_output=True, text=True,
        check=True, timeout=60,
    )
    assert "POST /notes/forbidden -> 403" in result.stdout
    assert result.stdout.rstrip().endswith("GET /notes -> {'notes': ['hello']}")


@pytest.mark.parametrize("status", [201, 409])
def test_commit_as_you_go_requests_commit_what_is_pending_on_success(
    app_engine: sa.Engine, status: int
) -> None:
    """Work left pending in a commit-as-you-go request is committed below 400, not dropped.

    A 201 over work then discarded is what the integration exists to prevent; 400 and
    above rolls it back as in begin-once requests. No UncommittedWorkWarning either way.
    """
    flask_app = Flask(__name__)
    registry = txguard.SessionRegistry(app_engine)
    TxGuard(flask_app, registry=registry, mode="commit_as_you_go")
    ran: list[str] = []

    @flask_app.post("/")
    def view() -> tuple[str, int]:
        create_item("committed", registry)
        registry.current_session().commit()
        create_item("pending", registry)
        txguard.on_commit(lambda: ran.append("after commit"), registry=registry)
        return "ok", status

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert flask_app.test_client().post("/").status_code == status
    assert names(app_engine) == (["committed", "pending"] if status < 400 else ["committed"])
    assert ran == (["after commit"] if status < 400 else [])
    assert app_engine.pool.checkedout() == 0


def test_messages_about_the_request_unit_name_the_view(app_engine: sa.Engine) -> None:
    """A DisciplineError about the request's unit says it was opened at the view's def.

    Not at Flask's preprocess_request(), which is where before_request runs: the user
    never opens that unit, so the view is the line to look at.
    """
    flask_app = Flask(__name__)
    registry = txguard.SessionRegistry(app_engine)
    TxGuard(flask_app, registry=registry)
    messages: list[str] = []

    @flask_app.post("/orders")
    def create_order() -> str:
        try:
            registry.current_session().commit()
        except txguard.DisciplineError as exc:
            messages.append(str(exc))
        return "ok"

    assert flask_app.test_client().post("/orders").status_code == 200
    line = create_order.__code__.co_firstlineno
    assert f"opened at tests/test_flask_integration.py:{line} in create_order()" in messages[0]
