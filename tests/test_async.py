"""Async: AsyncSession units, propagation, hooks, connect() and cancellation on every async driver."""

from __future__ import annotations

import asyncio
import inspect

import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncSession, async_sessionmaker

import txguard
from tests.conftest import AsyncDatabase
from tests.helpers import SERVER_SESSION_ID, names, transaction_left_open
from tests.models import Item


@pytest.fixture
def registry(async_db: AsyncDatabase) -> txguard.SessionRegistry:
    return txguard.configure(async_db.engine)


async def add(name: str) -> None:
    session = txguard.current_session()
    assert isinstance(session, AsyncSession)
    session.add(Item(name=name))
    await session.flush()


async def test_begin_once_commits(registry: txguard.SessionRegistry, async_db: AsyncDatabase) -> None:
    """`async with unit_of_work()` hands out an AsyncSession and commits at a normal exit."""
    async with txguard.unit_of_work() as session:
        assert isinstance(session, AsyncSession)
        await add("a")
    assert names(async_db.sync) == ["a"]


async def test_begin_once_rolls_back(registry: txguard.SessionRegistry, async_db: AsyncDatabase) -> None:
    """An exception leaving an async unit rolls it back and propagates."""
    with pytest.raises(RuntimeError):
        async with txguard.unit_of_work():
            await add("a")
            raise RuntimeError
    assert names(async_db.sync) == []


async def test_commit_inside_begin_once_raises(registry: txguard.SessionRegistry, async_db: AsyncDatabase) -> None:
    """`await session.commit()` inside an async begin-once unit raises DisciplineError."""
    with pytest.raises(txguard.DisciplineError, match="session.commit"):
        async with txguard.unit_of_work() as session:
            await add("a")
            await session.commit()
    assert names(async_db.sync) == []


async def test_commit_as_you_go(registry: txguard.SessionRegistry, async_db: AsyncDatabase) -> None:
    """An async commit-as-you-go unit commits when told and warns about the rest."""
    with pytest.warns(txguard.UncommittedWorkWarning, match="first made at"):
        async with txguard.unit_of_work(mode="commit_as_you_go") as session:
            await add("a")
            await session.commit()
            await add("lost")
    assert names(async_db.sync) == ["a"]


async def test_required_joins_and_requires_new_suspends(
    registry: txguard.SessionRegistry, async_db: AsyncDatabase
) -> None:
    """REQUIRED shares the AsyncSession; REQUIRES_NEW gets its own and commits on its own."""
    with pytest.raises(RuntimeError):
        async with txguard.unit_of_work() as outer:
            async with txguard.unit_of_work(propagation="requires_new") as inner:
                assert inner is not outer
                await add("audit")
            async with txguard.unit_of_work() as joined:
                assert joined is outer
                await add("work")
            raise RuntimeError
    assert names(async_db.sync) == ["audit"]


async def test_nested_rolls_back_to_the_savepoint(
    registry: txguard.SessionRegistry, async_db: AsyncDatabase
) -> None:
    """A failed async NESTED unit undoes only its savepoint."""
    async with txguard.unit_of_work():
        await add("kept")
        with pytest.raises(KeyError):
            async with txguard.unit_of_work(propagation="nested"):
                await add("undone")
                raise KeyError
    assert names(async_db.sync) == ["kept"]


async def test_released_savepoint_is_undone_by_the_outer_rollback(
    registry: txguard.SessionRegistry, async_db: AsyncDatabase
) -> None:
    """A released async savepoint is undone when its owner rolls back (aiosqlite too)."""
    with pytest.raises(RuntimeError):
        async with txguard.unit_of_work():
            async with txguard.unit_of_work(propagation="nested"):
                await add("released")
            raise RuntimeError
    assert names(async_db.sync) == []


async def test_swallowed_joined_failure_is_an_unexpected_rollback(
    registry: txguard.SessionRegistry, async_db: AsyncDatabase
) -> None:
    """A joined async unit's caught failure makes the owner raise UnexpectedRollbackError."""
    with pytest.raises(txguard.UnexpectedRollbackError) as info:
        async with txguard.unit_of_work():
            await add("a")
            try:
                async with txguard.unit_of_work():
                    raise LookupError
            except LookupError:
                pass
    assert isinstance(info.value.__cause__, LookupError)
    assert names(async_db.sync) == []


@pytest.mark.parametrize(
    "propagation,error",
    [("mandatory", txguard.TransactionRequiredError), ("never", None)],
)
async def test_mandatory_and_never(
    registry: txguard.SessionRegistry, propagation: str, error: type[Exception] | None
) -> None:
    """MANDATORY needs a unit; NEVER refuses one (async)."""
    if error is not None:
        with pytest.raises(error):
            async with txguard.unit_of_work(propagation=propagation):
                pass
    else:
        async with txguard.unit_of_work(propagation=propagation) as session:
            assert session is None
        async with txguard.unit_of_work():
            with pytest.raises(txguard.TransactionNotAllowedError):
                async with txguard.unit_of_work(propagation=propagation):
                    pass


async def test_supports_and_not_supported(registry: txguard.SessionRegistry, async_db: AsyncDatabase) -> None:
    """SUPPORTS joins; NOT_SUPPORTED suspends and runs commit-as-you-go (async)."""
    async with txguard.unit_of_work() as outer:
        async with txguard.unit_of_work(propagation="supports") as joined:
            assert joined is outer
        async with txguard.unit_of_work(propagation="not_supported") as own:
            assert own is not outer
            await add("independent")
            await own.commit()
        assert txguard.current_session() is outer
    assert names(async_db.sync) == ["independent"]


async def test_read_only_and_isolation(registry: txguard.SessionRegistry, async_db: AsyncDatabase) -> None:
    """read_only refuses writes and isolation_level is applied on async sessions."""
    with pytest.raises(txguard.ReadOnlyTransactionError):
        async with txguard.unit_of_work(read_only=True):
            await add("a")
    async with txguard.unit_of_work(isolation_level="SERIALIZABLE") as session:
        connection = await session.connection()
        assert await connection.get_isolation_level() == "SERIALIZABLE"
    assert names(async_db.sync) == []


async def test_transactional_on_async_functions(
    registry: txguard.SessionRegistry, async_db: AsyncDatabase
) -> None:
    """@transactional async functions share one unit and run on_commit after the commit."""
    seen: list[str] = []

    @txguard.transactional
    async def create(name: str) -> None:
        await add(name)
        txguard.on_commit(lambda: seen.append(name))

    @txguard.transactional
    async def create_two() -> None:
        await create("a")
        await create("b")
        assert seen == []

    assert inspect.iscoroutinefunction(create_two)
    await create_two()
    assert seen == ["a", "b"]
    assert names(async_db.sync) == ["a", "b"]


async def test_sync_use_of_an_async_registry_is_refused(registry: txguard.SessionRegistry) -> None:
    """A plain `with` or a plain @transactional function on an async registry says what to write."""
    with pytest.raises(txguard.ConfigurationError, match="async with"):
        with txguard.unit_of_work():
            pass

    @txguard.transactional
    def sync_service() -> None:
        return None

    with pytest.raises(txguard.ConfigurationError, match="async def"):
        sync_service()


async def test_cancellation_rolls_back_and_returns_the_connection(
    registry: txguard.SessionRegistry, async_db: AsyncDatabase
) -> None:
    """A task cancelled inside a unit rolls back, closes its session and frees the connection."""
    started = asyncio.Event()

    async def work() -> None:
        async with txguard.unit_of_work():
            await add("cancelled")
            started.set()
            await asyncio.sleep(30)

    task = asyncio.create_task(work())
    await started.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert async_db.engine.sync_engine.pool.checkedout() == 0
    assert names(async_db.sync) == []


async def test_cancellation_during_a_query(registry: txguard.SessionRegistry, async_db: AsyncDatabase) -> None:
    """Cancelling a task while the database runs its statement still cleans up, on the server too.

    asyncpg and psycopg cancel the statement on the server. aiomysql cannot: the server runs
    the SLEEP to its end, holding the row lock of the INSERT, so the test kills that query
    (as an operator would) and then checks that the connection was closed, not left open in
    its transaction (which a later test's DELETE would wait on).
    """
    backend = async_db.backend
    if backend == "sqlite":
        pytest.skip("SQLite has no server-side sleep to cancel")
    sleep = "SELECT pg_sleep(5)" if backend == "postgresql" else "SELECT SLEEP(5)"
    started = asyncio.Event()
    server_ids: list[int] = []

    async def work() -> None:
        async with txguard.unit_of_work() as session:
            await add("cancelled")
            server_ids.append(await session.scalar(sa.text(SERVER_SESSION_ID[backend])))
            started.set()
            await session.execute(sa.text(sleep))

    task = asyncio.create_task(work())
    await started.wait()
    await asyncio.sleep(0.2)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert async_db.engine.sync_engine.pool.checkedout() == 0
    if backend == "mariadb":
        with async_db.sync.connect() as conn:
            conn.exec_driver_sql(f"KILL QUERY {server_ids[0]}")
    assert transaction_left_open(async_db.sync, backend, server_ids[0]) is None
    assert names(async_db.sync) == []


async def test_fifty_concurrent_units_each_get_their_own_session(
    registry: txguard.SessionRegistry, async_db: AsyncDatabase
) -> None:
    """A gather of 50 units gives 50 sessions and commits each one's work."""
    sessions: list[AsyncSession] = []

    @txguard.transactional
    async def one(i: int) -> None:
        sessions.append(txguard.current_session())  # type: ignore[arg-type]
        await add(f"item-{i:02d}")

    await asyncio.gather(*(one(i) for i in range(50)))
    assert len({id(s) for s in sessions}) == 50
    assert names(async_db.sync) == [f"item-{i:02d}" for i in range(50)]


async def test_child_tasks_see_the_unit_and_requires_new_is_their_own(
    registry: txguard.SessionRegistry, async_db: AsyncDatabase
) -> None:
    """A child task sees its creator's unit; REQUIRES_NEW inside it gets a session of its own."""
    async with txguard.unit_of_work() as outer:

        async def child() -> tuple[object, object]:
            seen = txguard.current_session()
            async with txguard.unit_of_work(propagation="requires_new") as own:
                await add("child")
            return seen, own

        seen, own = await asyncio.create_task(child())
        assert seen is outer
        assert own is not outer
    assert names(async_db.sync) == ["child"]


async def test_connect_on_an_async_engine(async_db: AsyncDatabase) -> None:
    """`async with txguard.connect(async_engine)` gives a real AsyncConnection in both modes."""
    async with txguard.connect(async_db.engine) as conn:
        assert isinstance(conn, AsyncConnection)
        await conn.execute(sa.insert(Item).values(name="a"))
    with pytest.raises(txguard.DisciplineError):
        async with txguard.connect(async_db.engine) as conn:
            await conn.commit()
    with pytest.warns(txguard.UncommittedWorkWarning):
        async with txguard.connect(async_db.engine, mode="commit_as_you_go") as conn:
            await conn.execute(sa.insert(Item).values(name="lost"))
    with pytest.raises(txguard.ConfigurationError, match="async with"):
        with txguard.connect(async_db.engine):
            pass
    assert names(async_db.sync) == ["a"]


async def test_async_sessionmaker_bind(async_db: AsyncDatabase) -> None:
    """A registry on an async_sessionmaker keeps its options."""
    registry = txguard.SessionRegistry(async_sessionmaker(async_db.engine, expire_on_commit=False))
    async with registry.unit_of_work() as session:
        item = Item(name="a")
        session.add(item)
    assert item.name == "a"
    async with txguard.connect(async_db.engine, mode="commit_as_you_go") as conn:
        assert await conn.scalar(sa.select(sa.func.count()).select_from(Item)) == 1
