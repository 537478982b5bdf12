"""on_commit / on_rollback inside a ``txguard.connect()`` block, and in a task that outlived
its unit: a callback follows the transaction it was registered in, never runs before its
COMMIT, and never runs for work that was rolled back."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import pytest
import sqlalchemy as sa

import txguard
from tests.backends import SYNC_URLS, require
from tests.conftest import AsyncDatabase
from tests.helpers import names
from tests.models import Item


@pytest.fixture
def registry(engine: sa.Engine) -> txguard.SessionRegistry[sa.orm.Session]:
    return txguard.configure(engine)


def test_a_begin_once_block_runs_on_commit_after_its_commit(
    registry: txguard.SessionRegistry[sa.orm.Session], engine: sa.Engine
) -> None:
    """The callback runs once the row is committed (another connection reads it), not when
    it is registered, and outside the block (no transaction of the callback's own)."""
    seen: list[object] = []
    with txguard.connect() as conn:
        conn.execute(sa.insert(Item).values(name="a"))
        txguard.on_commit(lambda: seen.append(names(engine)))
        txguard.on_rollback(lambda: seen.append("rolled back"))
        assert seen == []
    assert seen == [["a"]]


def test_a_begin_once_block_that_rolls_back_drops_on_commit(
    registry: txguard.SessionRegistry[sa.orm.Session], engine: sa.Engine
) -> None:
    seen: list[str] = []
    with pytest.raises(RuntimeError), txguard.connect() as conn:
        conn.execute(sa.insert(Item).values(name="a"))
        txguard.on_commit(lambda: seen.append("committed"))
        txguard.on_rollback(lambda: seen.append("rolled back"))
        raise RuntimeError("payment declined")
    assert seen == ["rolled back"]
    assert names(engine) == []


def test_a_block_whose_commit_fails_drops_on_commit(
    registry: txguard.SessionRegistry[sa.orm.Session], engine: sa.Engine
) -> None:
    """A caught statement failure makes the block's COMMIT a rollback: nothing runs for it."""
    with engine.begin() as conn:
        conn.execute(sa.insert(Item).values(id=1, name="taken"))
    seen: list[str] = []
    with pytest.raises(txguard.UnexpectedRollbackError), txguard.connect() as conn:
        txguard.on_commit(lambda: seen.append("committed"))
        try:
            conn.execute(sa.insert(Item).values(id=1, name="again"))
        except sa.exc.IntegrityError:
            pass  # caught: the block can no longer commit
    assert seen == []


def test_commit_as_you_go_block_runs_callbacks_at_each_commit(
    registry: txguard.SessionRegistry[sa.orm.Session], engine: sa.Engine
) -> None:
    """As a commit-as-you-go unit: conn.commit() runs what was registered before it,
    conn.rollback() and the block's end without a commit drop it."""
    seen: list[str] = []
    with txguard.connect(mode="commit_as_you_go") as conn:
        conn.execute(sa.insert(Item).values(name="a"))
        txguard.on_commit(lambda: seen.append("first"))
        conn.commit()
        assert seen == ["first"]
        conn.execute(sa.insert(Item).values(name="b"))
        txguard.on_commit(lambda: seen.append("undone"))
        txguard.on_rollback(lambda: seen.append("rollback"))
        conn.rollback()
        assert seen == ["first", "rollback"]
        txguard.on_commit(lambda: seen.append("never committed"))
    assert seen == ["first", "rollback"]
    assert names(engine) == ["a"]


def test_the_innermost_of_a_unit_and_a_block_keeps_the_callback(
    registry: txguard.SessionRegistry[sa.orm.Session],
) -> None:
    """A block inside a unit keeps its callbacks for its own COMMIT; a unit opened inside a
    block (its own transaction) keeps its own; the unit around both gets the rest."""
    seen: list[str] = []
    with txguard.unit_of_work():
        with txguard.connect():
            txguard.on_commit(lambda: seen.append("block in unit"))
        assert seen == ["block in unit"]
        with txguard.connect():
            with txguard.unit_of_work(propagation="requires_new"):
                txguard.on_commit(lambda: seen.append("unit in block"))
            assert seen[-1] == "unit in block"
            txguard.on_commit(lambda: seen.append("block"))
        txguard.on_commit(lambda: seen.append("unit"))
        assert seen[-1] == "block"
    assert seen == ["block in unit", "unit in block", "block", "unit"]


def test_a_callback_that_opens_a_block_begins_a_new_transaction(
    registry: txguard.SessionRegistry[sa.orm.Session], engine: sa.Engine
) -> None:
    """Callbacks run after the block has left the context: a block opened in one commits on
    its own, and its callbacks run at its own end."""
    seen: list[object] = []

    def audit() -> None:
        with txguard.connect() as conn:
            conn.execute(sa.insert(Item).values(name="audit"))
            txguard.on_commit(lambda: seen.append(names(engine)))

    with txguard.connect() as conn:
        conn.execute(sa.insert(Item).values(name="a"))
        txguard.on_commit(audit)
    assert seen == [["a", "audit"]]


async def test_an_async_block_awaits_async_callbacks_after_its_commit(
    async_db: AsyncDatabase,
) -> None:
    registry = txguard.SessionRegistry(async_db.engine)
    seen: list[object] = []

    async def notify() -> None:
        await asyncio.sleep(0)
        seen.append(names(async_db.sync))

    async with txguard.connect(registry=registry) as conn:
        await conn.execute(sa.insert(Item).values(name="a"))
        txguard.on_commit(notify, registry=registry)
        assert seen == []
    assert seen == [["a"]]
    with pytest.raises(RuntimeError):
        async with txguard.connect(registry=registry) as conn:
            await conn.execute(sa.insert(Item).values(name="b"))
            txguard.on_commit(notify, registry=registry)
            raise RuntimeError
    assert seen == [["a"]]


async def test_a_task_started_in_a_unit_that_rolled_back_registers_nothing_later(
    async_db: AsyncDatabase,
) -> None:
    """A fire-and-forget task of a unit that failed calls on_commit after the unit ended:
    the callback is dropped, as it would have been had the task registered it in time. A
    task of a unit that committed runs it at once."""
    registry = txguard.SessionRegistry(async_db.engine)
    seen: list[str] = []

    async def notify_later(label: str) -> None:
        await asyncio.sleep(0.05)
        txguard.on_commit(lambda: seen.append(label), registry=registry)

    tasks = []
    with pytest.raises(RuntimeError):
        async with txguard.unit_of_work(registry=registry) as session:
            session.add(Item(name="declined"))
            tasks.append(asyncio.create_task(notify_later("after rollback")))
            raise RuntimeError("payment declined")
    async with txguard.unit_of_work(registry=registry) as session:
        session.add(Item(name="paid"))
        tasks.append(asyncio.create_task(notify_later("after commit")))
    await asyncio.gather(*tasks)
    assert seen == ["after commit"]
    assert names(async_db.sync) == ["paid"]


def test_a_block_ended_in_another_context_no_longer_keeps_callbacks(
    registry: txguard.SessionRegistry[sa.orm.Session],
) -> None:
    """A block entered in one context and ended in another (a generator closed elsewhere)
    stays in the first one, ended: on_commit() there runs at once, outside any transaction,
    instead of joining a block whose callbacks have already been taken."""
    import contextvars

    seen: list[str] = []
    began, ended = contextvars.copy_context(), contextvars.copy_context()
    block = txguard.connect()
    began.run(block.__enter__)
    ended.run(block.__exit__, None, None, None)
    began.run(txguard.on_commit, lambda: seen.append("at once"))
    assert seen == ["at once"]


# A commit-as-you-go block's transaction ends however its code ends it: conn.commit(),
# SQLAlchemy's `with conn.begin():`, the transaction object's commit(), rollback() or
# close(). Each runs the callbacks of its outcome once it is over, as conn.commit() does.

CAYG = "commit_as_you_go"
no_sqlalchemy_warnings = pytest.mark.filterwarnings("error::sqlalchemy.exc.SAWarning")


@no_sqlalchemy_warnings
def test_with_conn_begin_runs_on_commit_after_its_commit(
    registry: txguard.SessionRegistry[sa.orm.Session], engine: sa.Engine
) -> None:
    """What was registered before the `with` and inside it runs once, after its COMMIT and
    before the next line; the block's end runs nothing more."""
    seen: list[object] = []
    with txguard.connect(mode=CAYG) as conn:
        txguard.on_commit(lambda: seen.append(("before", names(engine))))
        with conn.begin():
            conn.execute(sa.insert(Item).values(name="a"))
            txguard.on_commit(lambda: seen.append(("inside", names(engine))))
            txguard.on_rollback(lambda: seen.append("rolled back"))
            assert seen == []
        assert seen == [("before", ["a"]), ("inside", ["a"])]
    assert seen == [("before", ["a"]), ("inside", ["a"])]


@no_sqlalchemy_warnings
def test_with_conn_begin_left_by_an_exception_runs_on_rollback(
    registry: txguard.SessionRegistry[sa.orm.Session], engine: sa.Engine
) -> None:
    """Its on_commit callbacks are dropped (a later COMMIT does not run them) and its
    on_rollback ones run, before the exception goes on."""
    seen: list[str] = []
    with txguard.connect(mode=CAYG) as conn:
        txguard.on_commit(lambda: seen.append("before"))
        txguard.on_rollback(lambda: seen.append("rollback before"))
        with pytest.raises(RuntimeError), conn.begin():
            conn.execute(sa.insert(Item).values(name="declined"))
            txguard.on_commit(lambda: seen.append("inside"))
            txguard.on_rollback(lambda: seen.append("rollback inside"))
            raise RuntimeError("payment declined")
        assert seen == ["rollback before", "rollback inside"]
        conn.execute(sa.insert(Item).values(name="paid"))
        conn.commit()
    assert seen == ["rollback before", "rollback inside"]
    assert names(engine) == ["paid"]


@no_sqlalchemy_warnings
def test_a_transaction_ended_through_its_object_runs_its_callbacks(
    registry: txguard.SessionRegistry[sa.orm.Session], engine: sa.Engine
) -> None:
    """trans.commit(), trans.rollback() and trans.close() of conn.begin(), and of the
    autobegun transaction (conn.get_transaction()), each run the callbacks at once; an
    ended transaction's close() changes nothing."""
    seen: list[object] = []
    with txguard.connect(mode=CAYG) as conn:
        trans = conn.begin()
        conn.execute(sa.insert(Item).values(name="a"))
        txguard.on_commit(lambda: seen.append(("committed", names(engine))))
        trans.commit()
        assert seen == [("committed", ["a"])]
        trans = conn.begin()
        conn.execute(sa.insert(Item).values(name="undone"))
        txguard.on_commit(lambda: seen.append("undone"))
        txguard.on_rollback(lambda: seen.append("rolled back"))
        trans.rollback()
        conn.execute(sa.insert(Item).values(name="closed"))
        txguard.on_rollback(lambda: seen.append("closed"))
        autobegun = conn.get_transaction()
        assert autobegun is not None
        autobegun.close()
        conn.execute(sa.insert(Item).values(name="c"))
        txguard.on_commit(lambda: seen.append(("autobegun", names(engine))))
        trans.close()  # ended long ago: the transaction that runs now is not its
        autobegun = conn.get_transaction()
        assert autobegun is not None
        autobegun.commit()
        assert seen == [("committed", ["a"]), "rolled back", "closed", ("autobegun", ["a", "c"])]
    assert names(engine) == ["a", "c"]


@pytest.fixture(params=["sqlite", "postgresql"])
def late_check(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[sa.Engine, sa.TextClause]]:
    """An engine and an INSERT that runs but fails its COMMIT: a foreign key checked at
    COMMIT (DEFERRABLE INITIALLY DEFERRED; MariaDB checks every constraint at once)."""
    backend: str = request.param
    if backend == "sqlite":
        path = tmp_path_factory.mktemp("late") / "late.db"
        engine = sa.create_engine(f"sqlite:///{path}")

        @sa.event.listens_for(engine, "connect")
        def foreign_keys_on(dbapi_connection: Any, record: object) -> None:
            dbapi_connection.execute("PRAGMA foreign_keys = ON")

    else:
        require(backend)
        engine = sa.create_engine(SYNC_URLS[backend])
    drop = ["DROP TABLE IF EXISTS txg_late", "DROP TABLE IF EXISTS txg_late_parent"]
    with engine.begin() as conn:
        for ddl in [
            *drop,
            "CREATE TABLE txg_late_parent (id INTEGER PRIMARY KEY)",
            "CREATE TABLE txg_late (id INTEGER PRIMARY KEY, parent_id INTEGER "
            "REFERENCES txg_late_parent (id) DEFERRABLE INITIALLY DEFERRED)",
        ]:
            conn.execute(sa.text(ddl))
    yield engine, sa.text("INSERT INTO txg_late VALUES (1, 999)")
    with engine.begin() as conn:
        for ddl in drop:
            conn.execute(sa.text(ddl))
    engine.dispose()


@no_sqlalchemy_warnings
def test_a_commit_that_fails_runs_no_on_commit_whichever_call_made_it(
    late_check: tuple[sa.Engine, sa.TextClause],
) -> None:
    """The end of `with conn.begin():`, trans.commit() and conn.commit(): the COMMIT fails,
    nothing runs for it; its on_rollback callbacks run once it is rolled back. (A block
    each: SQLite keeps the transaction of a failed COMMIT, which SQLAlchemy's rollback()
    does not end; the pool's reset does, when the block closes the connection.)"""
    engine, orphan = late_check
    txguard.configure(engine)
    seen: list[str] = []
    with txguard.connect(mode=CAYG) as conn:
        with pytest.raises(sa.exc.IntegrityError), conn.begin():
            conn.execute(orphan)
            txguard.on_commit(lambda: seen.append("with: committed"))
            txguard.on_rollback(lambda: seen.append("with: rolled back"))
        assert seen == ["with: rolled back"]
    with txguard.connect(mode=CAYG) as conn:
        trans = conn.begin()
        conn.execute(orphan)
        txguard.on_commit(lambda: seen.append("trans: committed"))
        txguard.on_rollback(lambda: seen.append("trans: rolled back"))
        with pytest.raises(sa.exc.IntegrityError):
            trans.commit()
        assert seen == ["with: rolled back"]  # SQLAlchemy waits for the rollback
        trans.rollback()
        assert seen == ["with: rolled back", "trans: rolled back"]
    with txguard.connect(mode=CAYG) as conn:
        conn.execute(orphan)
        txguard.on_commit(lambda: seen.append("conn: committed"))
        txguard.on_rollback(lambda: seen.append("conn: rolled back"))
        with pytest.raises(sa.exc.IntegrityError):
            conn.commit()
        conn.rollback()
    assert seen == ["with: rolled back", "trans: rolled back", "conn: rolled back"]
    with engine.connect() as conn:
        assert conn.scalar(sa.text("SELECT count(*) FROM txg_late")) == 0


@no_sqlalchemy_warnings
def test_with_conn_begin_after_a_caught_failure_refuses_to_commit(
    registry: txguard.SessionRegistry[sa.orm.Session], engine: sa.Engine
) -> None:
    """As conn.commit() (SPEC §2), the end of `with conn.begin():` and trans.commit() refuse
    to COMMIT after a caught statement failure: UnexpectedRollbackError, rolled back, its
    on_rollback callbacks run and its on_commit ones never."""
    with engine.begin() as conn:
        conn.execute(sa.insert(Item).values(id=1, name="taken"))
    seen: list[str] = []
    with txguard.connect(mode=CAYG) as conn:
        with pytest.raises(txguard.UnexpectedRollbackError), conn.begin():
            conn.execute(sa.insert(Item).values(name="half done"))
            txguard.on_commit(lambda: seen.append("with: committed"))
            txguard.on_rollback(lambda: seen.append("with: rolled back"))
            try:
                conn.execute(sa.insert(Item).values(id=1, name="again"))
            except sa.exc.IntegrityError:
                pass
        assert seen == ["with: rolled back"]
        assert conn.get_transaction() is None
        trans = conn.begin()
        conn.execute(sa.insert(Item).values(name="half done"))
        txguard.on_commit(lambda: seen.append("trans: committed"))
        txguard.on_rollback(lambda: seen.append("trans: rolled back"))
        try:
            conn.execute(sa.insert(Item).values(id=1, name="again"))
        except sa.exc.IntegrityError:
            pass
        with pytest.raises(txguard.UnexpectedRollbackError):
            trans.commit()
        assert conn.get_transaction() is None
    assert seen == ["with: rolled back", "trans: rolled back"]
    assert names(engine) == ["taken"]


@no_sqlalchemy_warnings
def test_an_on_commit_error_leaves_with_conn_begin_after_its_commit(
    registry: txguard.SessionRegistry[sa.orm.Session], engine: sa.Engine
) -> None:
    """A failing callback's exception comes out of the `with` statement (SPEC §4): the row
    stays committed, the callbacks after it do not run, and the connection goes on."""
    seen: list[str] = []
    with txguard.connect(mode=CAYG) as conn:
        with pytest.raises(ZeroDivisionError), conn.begin():
            conn.execute(sa.insert(Item).values(name="a"))
            txguard.on_commit(lambda: seen.append(str(1 / 0)))
            txguard.on_commit(lambda: seen.append("after the failed one"))
        assert names(engine) == ["a"]
        conn.execute(sa.insert(Item).values(name="b"))
        conn.commit()
    assert seen == []
    assert names(engine) == ["a", "b"]


@no_sqlalchemy_warnings
def test_an_on_commit_callback_may_use_the_connection_after_with_conn_begin(
    registry: txguard.SessionRegistry[sa.orm.Session], engine: sa.Engine
) -> None:
    """The callbacks run once the `with` is over: a statement on the block's connection in
    one begins a new transaction, which the block commits as usual."""
    with txguard.connect(mode=CAYG) as conn:
        with conn.begin():
            conn.execute(sa.insert(Item).values(name="order"))
            txguard.on_commit(lambda: conn.execute(sa.insert(Item).values(name="audit")))
        conn.commit()
    assert names(engine) == ["audit", "order"]


def test_on_commit_in_a_callback_of_a_commit_as_you_go_block_runs_at_once(
    registry: txguard.SessionRegistry[sa.orm.Session],
) -> None:
    """A COMMIT's callbacks run outside the block, as a unit's do (SPEC §4): on_commit() in
    one runs at once, instead of waiting for a next COMMIT of the block that may never come."""
    seen: list[str] = []
    with txguard.connect(mode=CAYG) as conn:
        conn.execute(sa.insert(Item).values(name="a"))
        txguard.on_commit(lambda: txguard.on_commit(lambda: seen.append("inner")))
        conn.commit()
        assert seen == ["inner"]
    assert seen == ["inner"]


@no_sqlalchemy_warnings
@pytest.mark.parametrize("end", ["commit", "rollback", "close", "with"])
def test_a_begin_once_block_refuses_ending_its_transaction_object(
    registry: txguard.SessionRegistry[sa.orm.Session], engine: sa.Engine, end: str
) -> None:
    """conn.get_transaction().commit() would COMMIT behind the block (which then ran its
    on_rollback callbacks): refused as conn.commit() is; the block still commits at its end
    and runs its on_commit callbacks once."""
    seen: list[object] = []
    with txguard.connect() as conn:
        conn.execute(sa.insert(Item).values(name="a"))
        txguard.on_commit(lambda: seen.append(names(engine)))
        txguard.on_rollback(lambda: seen.append("rolled back"))
        transaction = conn.get_transaction()
        assert transaction is not None
        with pytest.raises(txguard.DisciplineError, match="owns its transaction"):
            if end == "with":
                with transaction:
                    pass
            else:
                getattr(transaction, end)()
        conn.execute(sa.insert(Item).values(name="b"))
    assert seen == [["a", "b"]]


@no_sqlalchemy_warnings
def test_on_commit_in_a_savepoint_that_rolls_back_is_dropped(
    registry: txguard.SessionRegistry[sa.orm.Session], engine: sa.Engine
) -> None:
    """SPEC §4 in a begin-once block: a savepoint rolled back (by rollback(), by an exception
    leaving `with conn.begin_nested():`, or with the savepoint around it) drops its on_commit
    callbacks and runs its on_rollback ones whatever the outcome (their work is undone); a
    released savepoint leaves them to the block."""
    seen: list[object] = []
    with txguard.connect() as conn:
        savepoint = conn.begin_nested()
        txguard.on_commit(lambda: seen.append("rolled back"))
        txguard.on_rollback(lambda: seen.append("undone"))
        savepoint.rollback()
        with conn.begin_nested():
            conn.execute(sa.insert(Item).values(name="kept"))
            txguard.on_commit(lambda: seen.append(("released", names(engine))))
        with pytest.raises(RuntimeError), conn.begin_nested():
            txguard.on_commit(lambda: seen.append("left by an exception"))
            raise RuntimeError
        outer = conn.begin_nested()
        with conn.begin_nested():
            txguard.on_commit(lambda: seen.append("released in a rolled back one"))
        txguard.on_commit(lambda: seen.append("in the rolled back one"))
        outer.rollback()
        assert seen == []
    assert seen == ["undone", ("released", ["kept"])]


@no_sqlalchemy_warnings
def test_a_commit_as_you_go_savepoint_that_rolls_back_drops_its_on_commit(
    registry: txguard.SessionRegistry[sa.orm.Session],
) -> None:
    """The same in a commit-as-you-go block: its COMMIT runs what the savepoints kept."""
    seen: list[str] = []
    with txguard.connect(mode=CAYG) as conn:
        with conn.begin():
            with conn.begin_nested() as savepoint:
                txguard.on_commit(lambda: seen.append("rolled back"))
                txguard.on_rollback(lambda: seen.append("undone"))
                savepoint.rollback()
            txguard.on_commit(lambda: seen.append("kept"))
        assert seen == ["undone", "kept"]
        conn.execute(sa.insert(Item).values(name="a"))
        savepoint = conn.begin_nested()
        txguard.on_commit(lambda: seen.append("rolled back too"))
        savepoint.rollback()
        conn.commit()
    assert seen == ["undone", "kept"]


async def test_an_async_block_runs_callbacks_however_its_transaction_ends(
    async_db: AsyncDatabase,
) -> None:
    """`async with conn.begin():`, left normally or by an exception, and an AsyncTransaction's
    commit(): async callbacks are awaited after the COMMIT, on_rollback ones run on a rollback."""
    registry = txguard.SessionRegistry(async_db.engine)
    seen: list[object] = []

    async def notify() -> None:
        await asyncio.sleep(0)
        seen.append(names(async_db.sync))

    async with txguard.connect(registry=registry, mode=CAYG) as conn:
        async with conn.begin():
            await conn.execute(sa.insert(Item).values(name="a"))
            txguard.on_commit(notify, registry=registry)
            assert seen == []
        assert seen == [["a"]]
        with pytest.raises(RuntimeError):
            async with conn.begin():
                await conn.execute(sa.insert(Item).values(name="declined"))
                txguard.on_commit(notify, registry=registry)
                txguard.on_rollback(lambda: seen.append("rolled back"), registry=registry)
                raise RuntimeError
        assert seen == [["a"], "rolled back"]
        trans = await conn.begin()
        await conn.execute(sa.insert(Item).values(name="b"))
        txguard.on_commit(notify, registry=registry)
        await trans.commit()
        assert seen == [["a"], "rolled back", ["a", "b"]]
    assert seen == [["a"], "rolled back", ["a", "b"]]


async def test_an_async_savepoint_that_rolls_back_drops_its_on_commit(
    async_db: AsyncDatabase,
) -> None:
    registry = txguard.SessionRegistry(async_db.engine)
    seen: list[str] = []
    async with txguard.connect(registry=registry) as conn:
        savepoint = await conn.begin_nested()
        txguard.on_commit(lambda: seen.append("rolled back"), registry=registry)
        await savepoint.rollback()
        async with conn.begin_nested():
            await conn.execute(sa.insert(Item).values(name="kept"))
            txguard.on_commit(lambda: seen.append("released"), registry=registry)
    assert seen == ["released"]
    assert names(async_db.sync) == ["kept"]


def test_a_block_savepoint_drops_what_a_thread_of_the_block_registered(engine: sa.Engine) -> None:
    """A plain block registers its callbacks as any thread holding its context may (no unit
    owns them): the savepoint that rolls back still drops them."""
    txguard.configure(engine)
    seen: list[str] = []
    with txguard.connect(engine) as conn:
        savepoint = conn.begin_nested()
        txguard.on_commit(lambda: seen.append("undone"))
        savepoint.rollback()
        txguard.on_commit(lambda: seen.append("kept"))
    assert seen == ["kept"]
