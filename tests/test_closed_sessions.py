"""A unit's session is closed for good when the unit ends: later use raises at once, on
every backend, sync and async, whatever the session class and ``close_resets_only`` say."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import sqlalchemy as sa
from fastapi import BackgroundTasks, FastAPI
from fastapi.testclient import TestClient
from sqlalchemy.exc import OperationalError, ResourceClosedError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.orm.exc import DetachedInstanceError

import txguard
import txguard.testing
from tests.conftest import AsyncDatabase
from tests.helpers import names, this_line
from tests.models import Item
from txguard.fastapi import session as session_dependency

LATE_USES: dict[str, Callable[[Session], object]] = {
    "execute": lambda s: s.execute(sa.text("SELECT 1")),
    "add": lambda s: s.add(Item(name="late")),
    "get": lambda s: s.get(Item, 1),
    "connection": lambda s: s.connection(),
    "begin": lambda s: s.begin(),
    "commit": lambda s: s.commit(),
}


def refused_after(line: int) -> Any:
    return pytest.raises(txguard.DisciplineError, match=rf"opened at .*test_closed_sessions.py:{line}.*has ended")


@pytest.fixture
def registry(engine: sa.Engine) -> txguard.SessionRegistry:
    return txguard.configure(engine)


@pytest.mark.parametrize("use", list(LATE_USES))
@pytest.mark.parametrize("mode", ["begin_once", "commit_as_you_go"])
def test_a_session_used_after_its_unit_raises_naming_the_unit(
    registry: txguard.SessionRegistry, engine: sa.Engine, mode: str, use: str
) -> None:
    """Any call that would begin a transaction on the ended unit's session raises at once."""
    line = this_line() + 1
    with txguard.unit_of_work(mode=mode) as session:
        session.add(Item(name="a"))
        if mode == "commit_as_you_go":
            session.commit()
    with refused_after(line) as info:
        LATE_USES[use](session)
    assert "txguard.unit_of_work()" in str(info.value)
    assert not session.in_transaction()
    assert engine.pool.checkedout() == 0
    assert names(engine) == ["a"]


def test_a_session_is_closed_for_good_after_a_unit_that_rolled_back(
    registry: txguard.SessionRegistry, engine: sa.Engine
) -> None:
    """A unit that rolled back closes its session for good as well."""
    line = this_line() + 2
    with pytest.raises(KeyError):
        with txguard.unit_of_work() as session:
            session.add(Item(name="a"))
            raise KeyError("x")
    with refused_after(line):
        session.execute(sa.text("SELECT 1"))
    assert names(engine) == []
    assert engine.pool.checkedout() == 0


def test_closing_or_rolling_back_an_ended_units_session_is_harmless(
    registry: txguard.SessionRegistry, engine: sa.Engine
) -> None:
    """close(), reset() and rollback() begin nothing: clean-up code after a unit still runs."""
    with txguard.unit_of_work() as session:
        session.add(Item(name="a"))
    session.rollback()
    session.close()
    session.reset()
    session.close()
    assert session.get_transaction() is None
    assert isinstance(session, Session)
    assert names(engine) == ["a"]


def test_objects_of_an_ended_unit_are_detached(registry: txguard.SessionRegistry, engine: sa.Engine) -> None:
    """Its objects are detached, as SQLAlchemy's close() leaves them (expired by the commit,
    they cannot load again: give the registry expire_on_commit=False to read them after)."""
    with txguard.unit_of_work() as session:
        item = Item(name="a")
        session.add(item)
    assert sa.inspect(item).detached
    with pytest.raises(DetachedInstanceError):
        item.name


@pytest.mark.parametrize("call", ["close", "reset"])
def test_close_inside_a_commit_as_you_go_unit_keeps_the_session_usable(
    registry: txguard.SessionRegistry, engine: sa.Engine, call: str
) -> None:
    """A user's close() or reset() inside a commit-as-you-go unit discards pending work as
    before; the unit's session works on until the unit ends."""
    with txguard.unit_of_work(mode="commit_as_you_go") as session:
        session.add(Item(name="dropped"))
        getattr(session, call)()
        session.add(Item(name="kept"))
        session.commit()
    assert names(engine) == ["kept"]


@pytest.mark.parametrize("call", ["close", "reset"])
def test_close_or_reset_inside_a_begin_once_unit_is_refused(
    registry: txguard.SessionRegistry, engine: sa.Engine, call: str
) -> None:
    """Either would silently discard the begin-once unit's transaction: both raise, naming
    the call, and the unit rolls back."""
    line = this_line() + 2
    with pytest.raises(txguard.DisciplineError, match=rf"session\.{call}\(\) inside the begin-once unit opened at .*:{line}"):
        with txguard.unit_of_work() as session:
            session.add(Item(name="never"))
            session.flush()
            getattr(session, call)()
    assert names(engine) == []
    assert engine.pool.checkedout() == 0


@pytest.mark.parametrize("resets_only", [True, False])
def test_a_sessionmakers_close_resets_only_neither_reopens_nor_breaks_the_unit(
    engine: sa.Engine, resets_only: bool
) -> None:
    """close_resets_only=True does not make an ended unit's session reusable; =False does not
    make a user's close() inside a commit-as-you-go unit end the unit's session."""
    txguard.configure(sessionmaker(engine, close_resets_only=resets_only))
    line = this_line() + 1
    with txguard.unit_of_work(mode="commit_as_you_go") as session:
        session.add(Item(name="dropped"))
        session.close()
        session.add(Item(name="kept"))
        session.commit()
    with refused_after(line):
        session.execute(sa.text("SELECT 1"))
    assert names(engine) == ["kept"]
    assert engine.pool.checkedout() == 0


class AppSession(Session):
    """A user's session class with an ``__init__`` of its own."""

    def __init__(self, *args: Any, label: str = "", **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.label = label


def test_a_users_session_class_and_options_are_kept_and_closed_for_good(engine: sa.Engine) -> None:
    """The sealed session is still an instance of the user's class, with its attributes."""
    txguard.configure(sessionmaker(engine, class_=AppSession, label="app", expire_on_commit=False))
    line = this_line() + 1
    with txguard.unit_of_work() as session:
        item = Item(name="a")
        session.add(item)
    assert isinstance(session, AppSession)
    assert session.label == "app"
    assert item.name == "a"  # expire_on_commit=False kept it loaded
    with refused_after(line):
        session.add(Item(name="late"))
    assert engine.pool.checkedout() == 0


def test_joined_and_savepoint_units_leave_the_session_to_the_unit_that_began_it(
    registry: txguard.SessionRegistry, engine: sa.Engine
) -> None:
    """A unit that joined or took a savepoint does not close the session; the outer unit does."""
    line = this_line() + 1
    with txguard.unit_of_work() as outer:
        with txguard.unit_of_work() as joined:
            joined.add(Item(name="joined"))
        with txguard.unit_of_work(propagation="nested") as nested:
            nested.add(Item(name="nested"))
        assert joined is nested is outer
        outer.add(Item(name="outer"))
    with refused_after(line):
        joined.execute(sa.text("SELECT 1"))
    assert names(engine) == ["joined", "nested", "outer"]


def test_a_requires_new_units_session_is_closed_when_it_ends(
    registry: txguard.SessionRegistry, engine: sa.Engine
) -> None:
    """The inner unit's own session refuses once it ends; the outer one works on."""
    with txguard.unit_of_work() as outer:
        line = this_line() + 1
        with txguard.unit_of_work(propagation="requires_new") as inner:
            inner.add(Item(name="inner"))
        with refused_after(line):
            inner.execute(sa.text("SELECT 1"))
        outer.add(Item(name="outer"))
    assert names(engine) == ["inner", "outer"]


def test_each_retry_runs_on_a_new_session(registry: txguard.SessionRegistry, engine: sa.Engine) -> None:
    """A retried call gets a fresh session per attempt; the failed attempt's is closed for good."""
    sessions: list[Session] = []

    @txguard.transactional(retries=1, retry_on=(OperationalError,))
    def work() -> None:
        session = txguard.current_session()
        sessions.append(session)
        session.add(Item(name=f"try-{len(sessions)}"))
        if len(sessions) == 1:
            raise OperationalError("SELECT 1", {}, Exception("injected"))

    work()
    assert len(sessions) == 2 and sessions[0] is not sessions[1]
    with pytest.raises(txguard.DisciplineError, match="has ended"):
        sessions[0].execute(sa.text("SELECT 1"))
    assert names(engine) == ["try-2"]


def test_an_on_commit_callback_opens_its_own_unit(registry: txguard.SessionRegistry, engine: sa.Engine) -> None:
    """Callbacks run after the unit closed its session: they open a unit of their own, and the
    unit's session, captured, refuses."""
    seen: list[object] = []

    def callback(captured: Session) -> None:
        with txguard.unit_of_work() as session:
            seen.append(session.scalar(sa.select(sa.func.count()).select_from(Item)))
        try:
            captured.execute(sa.text("SELECT 1"))
        except txguard.DisciplineError as exc:
            seen.append(type(exc))

    with txguard.unit_of_work() as session:
        session.add(Item(name="a"))
        txguard.on_commit(lambda: callback(session))
    assert seen == [1, txguard.DisciplineError]
    assert engine.pool.checkedout() == 0


def test_rollback_after_seals_each_units_session_and_keeps_its_connection(
    registry: txguard.SessionRegistry, engine: sa.Engine
) -> None:
    """Under rollback_after() (and the txguard_rollback fixture) a unit's session is closed for
    good too, while the outer connection stays open for the next unit."""
    with txguard.testing.rollback_after(registry) as conn:
        line = this_line() + 1
        with txguard.unit_of_work() as first:
            first.add(Item(name="a"))
        with refused_after(line):
            first.execute(sa.text("SELECT 1"))
        with txguard.unit_of_work() as second:
            assert second.scalar(sa.select(Item.name)) == "a"
        assert not conn.closed and conn.in_transaction()
    assert names(engine) == []
    assert engine.pool.checkedout() == 0


def test_a_connect_blocks_connection_is_closed_after_it(registry: txguard.SessionRegistry, engine: sa.Engine) -> None:
    """txguard.connect() closes its Connection, which Core never reopens: later use raises."""
    with txguard.connect() as conn:
        conn.execute(sa.text("SELECT 1"))
    with pytest.raises(ResourceClosedError):
        conn.execute(sa.text("SELECT 1"))
    assert engine.pool.checkedout() == 0


def test_a_fastapi_background_task_given_the_requests_session_is_refused(
    registry: txguard.SessionRegistry, engine: sa.Engine
) -> None:
    """Background tasks run after the request's unit: the session handed to one refuses, and
    the response and the committed row are not affected."""
    api = FastAPI()
    outcome: list[BaseException | None] = []

    def late(db: Session) -> None:
        try:
            db.execute(sa.text("SELECT 1"))
            outcome.append(None)
        except txguard.DisciplineError as exc:
            outcome.append(exc)

    @api.post("/")
    def create(tasks: BackgroundTasks, db: Session = session_dependency(registry=registry)) -> str:
        db.add(Item(name="a"))
        tasks.add_task(late, db)
        return "ok"

    with TestClient(api) as client:
        assert client.post("/").status_code == 200
    assert len(outcome) == 1 and isinstance(outcome[0], txguard.DisciplineError)
    assert names(engine) == ["a"]
    assert engine.pool.checkedout() == 0


# Async.


@pytest.fixture
def async_registry(async_db: AsyncDatabase) -> txguard.SessionRegistry:
    return txguard.configure(async_db.engine)


@pytest.mark.parametrize("mode", ["begin_once", "commit_as_you_go"])
async def test_an_async_session_used_after_its_unit_raises(
    async_registry: txguard.SessionRegistry, async_db: AsyncDatabase, mode: str
) -> None:
    """`await session.execute()` after an async unit raises DisciplineError naming it."""
    line = this_line() + 1
    async with txguard.unit_of_work(mode=mode) as session:
        session.add(Item(name="a"))
        if mode == "commit_as_you_go":
            await session.commit()
    with refused_after(line):
        await session.execute(sa.text("SELECT 1"))
    with refused_after(line):
        session.add(Item(name="late"))
    await session.close()
    assert names(async_db.sync) == ["a"]


class AppAsyncSession(AsyncSession):
    """A user's AsyncSession class."""


@pytest.mark.parametrize("resets_only", [True, False])
async def test_an_async_sessionmakers_class_and_close_resets_only(
    async_db: AsyncDatabase, resets_only: bool
) -> None:
    """An async_sessionmaker's own class and close_resets_only: close() inside a
    commit-as-you-go unit keeps the session, the unit's end closes it for good."""
    txguard.configure(async_sessionmaker(async_db.engine, class_=AppAsyncSession, close_resets_only=resets_only))
    line = this_line() + 1
    async with txguard.unit_of_work(mode="commit_as_you_go") as session:
        assert isinstance(session, AppAsyncSession)
        session.add(Item(name="dropped"))
        await session.close()
        session.add(Item(name="kept"))
        await session.commit()
    with refused_after(line):
        await session.execute(sa.text("SELECT 1"))
    assert names(async_db.sync) == ["kept"]


async def test_async_rollback_after_seals_each_units_session(
    async_registry: txguard.SessionRegistry, async_db: AsyncDatabase
) -> None:
    """An async unit under rollback_after() closes its session for good too; the next unit
    runs on the same outer connection."""
    async with txguard.testing.rollback_after(async_registry):
        line = this_line() + 1
        async with txguard.unit_of_work() as first:
            first.add(Item(name="a"))
        with refused_after(line):
            await first.execute(sa.text("SELECT 1"))
        async with txguard.unit_of_work() as second:
            assert await second.scalar(sa.select(Item.name)) == "a"
    assert names(async_db.sync) == []
