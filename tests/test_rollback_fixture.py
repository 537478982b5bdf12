"""The txguard_rollback fixture in real inner pytest runs: sync and async binds, pytest-asyncio and anyio, every backend."""

from __future__ import annotations

import importlib

import pytest
import sqlalchemy as sa

# Imported before any inner run: pytester drops the modules an inner run imports first,
# the plugin (loaded once) must see the same txguard as the inner conftest, and a driver's
# C extension imported a second time crashes the interpreter.
import txguard
import txguard.testing  # noqa: F401

for _driver in ("flask", "flask_sqlalchemy", "txguard.flask", "sqlalchemy.ext.asyncio", "aiosqlite", "asyncpg", "psycopg", "aiomysql", "pymysql"):
    try:
        importlib.import_module(_driver)
    except ImportError:  # pragma: no cover - that driver's cases skip
        pass
from tests.backends import SYNC_URLS, require

# (backend, driver or None for the backend's sync URL)
CASES = [
    ("sqlite", None),
    ("sqlite", "sqlite+aiosqlite"),
    ("postgresql", None),
    ("postgresql", "postgresql+asyncpg"),
    ("postgresql", "postgresql+psycopg_async"),
    ("mariadb", None),
    ("mariadb", "mysql+aiomysql"),
]
ASYNC_CASES = [case for case in CASES if case[1] is not None]

CONFTEST = """
import os

import pytest
import sqlalchemy as sa
import sqlalchemy as sa
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

import txguard

SYNC_URL = {sync_url!r} or "sqlite:///" + os.path.join(os.path.dirname(__file__), "db.sqlite")
DRIVER = {driver!r}


class Base(DeclarativeBase):
    pass


class Row(Base):
    __tablename__ = "txguard_fixture_rows"
    id: Mapped[int] = mapped_column(primary_key=True)


SYNC = sa.create_engine(SYNC_URL)
Base.metadata.drop_all(SYNC)
Base.metadata.create_all(SYNC)
if DRIVER:
    from sqlalchemy.ext.asyncio import create_async_engine

    # NullPool: each test runs on its own event loop, and a pooled asyncpg/aiomysql
    # connection cannot move to the next test's loop.
    ENGINE = create_async_engine(sa.make_url(SYNC_URL).set(drivername=DRIVER), poolclass=sa.NullPool)
else:
    ENGINE = SYNC
txguard.configure(ENGINE)


def count(conn):
    return conn.scalar(sa.select(sa.func.count()).select_from(Row))


def pytest_sessionfinish(session):
    Base.metadata.drop_all(SYNC)
    SYNC.dispose()
"""

SYNC_TESTS = """
import txguard
from conftest import SYNC, Row, count


@txguard.transactional(propagation="requires_new")
def add_inner(row_id):
    txguard.current_session().add(Row(id=row_id))


@txguard.transactional
def add_two():
    txguard.current_session().add(Row(id=1))
    add_inner(2)


def test_writes(txguard_rollback):
    add_two()
    with txguard.unit_of_work(mode="commit_as_you_go") as session:
        session.add(Row(id=3))
        session.commit()
    assert count(txguard_rollback) == 3


def test_writes_the_same_keys_again(txguard_rollback):
    assert count(txguard_rollback) == 0
    add_two()
    assert count(txguard_rollback) == 2


def test_nothing_stayed():
    with SYNC.connect() as conn:
        assert count(conn) == 0
"""

ASYNC_TESTS = """
import pytest
import sqlalchemy as sa
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

import txguard
from conftest import SYNC, Row, count

{header}

@txguard.transactional(propagation="requires_new")
async def add_inner(row_id):
    txguard.current_session().add(Row(id=row_id))


@txguard.transactional
async def add_two():
    txguard.current_session().add(Row(id=1))
    await add_inner(2)


async def test_writes(txguard_rollback):
    assert isinstance(txguard_rollback, AsyncConnection)
    await add_two()
    async with txguard.unit_of_work(mode="commit_as_you_go") as session:
        session.add(Row(id=3))
        await session.commit()
    assert await txguard_rollback.run_sync(count) == 3


async def test_writes_the_same_keys_again(txguard_rollback):
    assert await txguard_rollback.run_sync(count) == 0
    await add_two()
    assert await txguard_rollback.run_sync(count) == 2


def test_nothing_stayed():
    with SYNC.connect() as conn:
        assert count(conn) == 0
"""

ANYIO_HEADER = """
pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend():
    return "asyncio"
"""


def sync_url(backend: str) -> str:
    """Return the inner conftest's sync URL: empty for a SQLite file in the inner run's directory."""
    require(backend)
    return "" if backend == "sqlite" else SYNC_URLS[backend]


def prepare(pytester: pytest.Pytester, backend: str, driver: str | None, mode: str = "auto") -> None:
    pytester.makeconftest(CONFTEST.format(sync_url=sync_url(backend), driver=driver))
    pytester.makeini(
        f"[pytest]\nasyncio_mode = {mode}\nasyncio_default_fixture_loop_scope = function\n"
    )


def params(cases: list[tuple[str, str | None]]) -> list[object]:
    """Name each (backend, driver) case as backend-driver."""
    return [
        pytest.param(b, d, id=f"{b}-{d.split('+')[1] if d else 'sync'}") for b, d in cases
    ]


@pytest.mark.parametrize(("backend", "driver"), params([c for c in CASES if c[1] is None]))
def test_sync_tests_leave_nothing_behind(pytester: pytest.Pytester, backend: str, driver: None) -> None:
    """Nested @transactional units and commit-as-you-go commits in sync tests are all rolled back."""
    prepare(pytester, backend, driver)
    pytester.makepyfile(SYNC_TESTS)
    pytester.runpytest("--txguard-leaks=fail").assert_outcomes(passed=3)


@pytest.mark.parametrize(("backend", "driver"), params(ASYNC_CASES))
def test_async_tests_under_pytest_asyncio_leave_nothing_behind(
    pytester: pytest.Pytester, backend: str, driver: str
) -> None:
    """With an async registry, pytest-asyncio tests run in one outer transaction on the test's loop."""
    prepare(pytester, backend, driver)
    pytester.makepyfile(ASYNC_TESTS.format(header=""))
    pytester.runpytest("--txguard-leaks=fail").assert_outcomes(passed=3)


@pytest.mark.parametrize(("backend", "driver"), params(ASYNC_CASES))
def test_async_tests_under_anyio_leave_nothing_behind(
    pytester: pytest.Pytester, backend: str, driver: str
) -> None:
    """anyio-marked tests (pytest-asyncio in strict mode) get the outer transaction on anyio's loop."""
    prepare(pytester, backend, driver, mode="strict")
    pytester.makepyfile(ASYNC_TESTS.format(header=ANYIO_HEADER))
    pytester.runpytest("--txguard-leaks=fail").assert_outcomes(passed=3)


def test_an_anyio_test_under_auto_mode_is_refused_with_the_fix(pytester: pytest.Pytester) -> None:
    """In auto mode pytest-asyncio runs anyio-marked tests on another loop than anyio's fixtures: the fixture says so."""
    prepare(pytester, "sqlite", "sqlite+aiosqlite", mode="auto")
    pytester.makepyfile(ASYNC_TESTS.format(header=ANYIO_HEADER))
    result = pytester.runpytest()
    result.assert_outcomes(passed=1, errors=2)
    result.stdout.fnmatch_lines(["*marked for both anyio and pytest-asyncio*asyncio_mode = strict*"])


def test_async_tests_under_pytest_asyncio_strict_mode(pytester: pytest.Pytester) -> None:
    """In strict mode, tests marked @pytest.mark.asyncio get the async outer transaction too."""
    prepare(pytester, "sqlite", "sqlite+aiosqlite", mode="strict")
    header = "pytestmark = pytest.mark.asyncio\n"
    tests = ASYNC_TESTS.format(header=header).replace(
        "def test_nothing_stayed", "@pytest.mark.filterwarnings('ignore')\ndef test_nothing_stayed"
    )
    pytester.makepyfile(tests)
    pytester.runpytest().assert_outcomes(passed=3)


def test_anyio_on_trio_is_refused_with_the_reason(pytester: pytest.Pytester) -> None:
    """An async bind under anyio's trio backend fails the test naming the asyncio backend."""
    pytest.importorskip("trio")
    prepare(pytester, "sqlite", "sqlite+aiosqlite")
    pytester.makepyfile(
        """
        import pytest

        @pytest.fixture
        def anyio_backend():
            return "trio"

        @pytest.mark.anyio
        async def test_needs_asyncio(txguard_rollback):
            pass
        """
    )
    result = pytester.runpytest()
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(["*needs anyio_backend 'asyncio'*"])


FLASK_SQLALCHEMY_CONFTEST = """
import os

import flask
import flask_sqlalchemy
import pytest
import sqlalchemy as sa
import sqlalchemy as sa
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, sessionmaker

import txguard
from txguard.flask import TxGuard

URL = {sync_url!r} or "sqlite:///" + os.path.join(os.path.dirname(__file__), "db.sqlite")


class Base(DeclarativeBase):
    pass


db = flask_sqlalchemy.SQLAlchemy(model_class=Base)


class Note(db.Model):
    __tablename__ = "txguard_fsa_notes"
    id: Mapped[int] = mapped_column(primary_key=True)
    text: Mapped[str] = mapped_column(sa.String(50), unique=True)


app = flask.Flask(__name__)
app.config.update(SQLALCHEMY_DATABASE_URI=URL, TESTING=True)
db.init_app(app)
with app.app_context():
    db.drop_all()
    db.create_all()
    registry = txguard.SessionRegistry(
        sessionmaker(db.engine, class_=flask_sqlalchemy.session.Session, db=db)
    )
TxGuard(app, registry=registry)


@app.post("/notes/<text>")
def create(text):
    txguard.current_session(registry).add(Note(text=text))
    return {{"text": text}}, 201


@app.get("/notes")
def index():
    session = txguard.current_session(registry)
    return {{"texts": list(session.scalars(sa.select(Note.text).order_by(Note.text)))}}


@pytest.fixture
def txguard_bind():
    return registry


@pytest.fixture
def client(txguard_rollback):
    return app.test_client()


def pytest_sessionfinish(session):
    with app.app_context():
        db.drop_all()
        db.engine.dispose()
"""

FLASK_SQLALCHEMY_TESTS = """
from conftest import Note, app, db


def test_a_view_commits_and_the_next_request_sees_it(client):
    assert client.post("/notes/ann").status_code == 201
    assert client.get("/notes").json == {"texts": ["ann"]}


def test_the_next_test_starts_empty_and_may_reuse_the_key(client):
    assert client.get("/notes").json == {"texts": []}
    assert client.post("/notes/ann").status_code == 201


def test_nothing_stayed_in_the_database():
    with app.app_context():
        assert db.session.scalars(db.select(Note)).all() == []
"""


@pytest.mark.parametrize("backend", ["sqlite", "postgresql", "mariadb"])
def test_flask_sqlalchemy_views_driven_by_the_test_client_are_isolated(
    pytester: pytest.Pytester, backend: str
) -> None:
    """Rows a Flask-SQLAlchemy view commits in one test (TxGuard, test client) are gone in the next."""
    pytest.importorskip("flask_sqlalchemy")
    pytester.makeconftest(FLASK_SQLALCHEMY_CONFTEST.format(sync_url=sync_url(backend)))
    pytester.makeini("[pytest]\nasyncio_default_fixture_loop_scope = function\n")
    pytester.makepyfile(FLASK_SQLALCHEMY_TESTS)
    pytester.runpytest("--txguard-leaks=fail").assert_outcomes(passed=3)


def test_an_eager_celery_task_enqueued_on_commit_sees_the_tests_rows(engine: sa.Engine) -> None:
    """Inside rollback_after, delay_on_commit runs an eager task at the unit's commit, on the block's connection."""
    celery = pytest.importorskip("celery")
    from tests.helpers import names
    from tests.models import Item
    from txguard.celery import delay_on_commit
    from txguard.testing import rollback_after

    app = celery.Celery("h6", broker="memory://", backend="cache+memory://")
    app.conf.task_always_eager = True
    seen: list[list[str]] = []

    @app.task
    def list_items() -> None:
        with txguard.unit_of_work() as session:
            seen.append(sorted(session.scalars(sa.select(Item.name))))

    txguard.configure(engine)
    with rollback_after(engine):
        with txguard.unit_of_work() as session:
            session.add(Item(name="a"))
            delay_on_commit(list_items)
            assert seen == []
        assert seen == [["a"]]
    assert names(engine) == []
