"""Units of work: begin once, commit as you go, rollback rules and options, on every backend."""

from __future__ import annotations

import pytest
import sqlalchemy as sa
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

import txguard
from tests.helpers import names, this_line
from tests.models import Account, Item


@pytest.fixture
def registry(engine: sa.Engine) -> txguard.SessionRegistry:
    return txguard.configure(engine)


# Begin once.


def test_begin_once_commits_at_a_normal_exit(registry: txguard.SessionRegistry, engine: sa.Engine) -> None:
    """A begin-once unit commits what its block did when the block ends normally."""
    with txguard.unit_of_work() as session:
        session.add(Item(name="a"))
    assert names(engine) == ["a"]


def test_begin_once_rolls_back_and_reraises(registry: txguard.SessionRegistry, engine: sa.Engine) -> None:
    """An exception leaving the block rolls the unit back and propagates unchanged."""
    with pytest.raises(ZeroDivisionError):
        with txguard.unit_of_work() as session:
            session.add(Item(name="a"))
            session.flush()
            1 / 0
    assert names(engine) == []


def test_unit_hands_out_a_real_session_and_closes_it(registry: txguard.SessionRegistry, engine: sa.Engine) -> None:
    """The session is SQLAlchemy's own and is closed, its connection returned, at exit."""
    with txguard.unit_of_work() as session:
        assert isinstance(session, Session)
        session.execute(sa.text("SELECT 1"))
        assert engine.pool.checkedout() == 1
    assert not session.in_transaction()
    assert engine.pool.checkedout() == 0


@pytest.mark.parametrize("method", ["commit", "rollback", "begin", "close"])
def test_taking_over_a_begin_once_boundary_raises(
    registry: txguard.SessionRegistry, engine: sa.Engine, method: str
) -> None:
    """commit()/rollback()/begin()/close() inside a begin-once unit raise DisciplineError naming the unit."""
    line = this_line() + 2
    with pytest.raises(txguard.DisciplineError, match=rf"test_units.py:{line}") as info:
        with txguard.unit_of_work() as session:
            session.add(Item(name="a"))
            getattr(session, method)()
    assert f"session.{method}()" in str(info.value)
    assert names(engine) == []


def test_boundary_guards_end_with_the_unit_and_its_session_stays_closed(
    registry: txguard.SessionRegistry, engine: sa.Engine
) -> None:
    """After the unit, close() and rollback() are refused no more, but the session begins
    nothing new: the unit closed it for good (tests/test_closed_sessions.py)."""
    with txguard.unit_of_work() as session:
        pass
    session.rollback()
    session.close()
    with pytest.raises(txguard.DisciplineError, match="has ended and closed it"):
        session.add(Item(name="later"))
    assert names(engine) == []


def test_begin_nested_is_allowed_in_begin_once(registry: txguard.SessionRegistry, engine: sa.Engine) -> None:
    """A savepoint opened by hand inside a begin-once unit works as in SQLAlchemy."""
    with txguard.unit_of_work() as session:
        session.add(Item(name="kept"))
        with pytest.raises(KeyError):
            with session.begin_nested():
                session.add(Item(name="undone"))
                session.flush()
                raise KeyError("x")
    assert names(engine) == ["kept"]


def test_failure_at_commit_rolls_back_everything(registry: txguard.SessionRegistry, engine: sa.Engine) -> None:
    """A failure at commit rolls the whole unit back and raises the database's error."""
    with txguard.unit_of_work() as session:
        session.add(Account(id=1, balance=0))
    with pytest.raises(IntegrityError):
        with txguard.unit_of_work() as session:
            session.add(Item(name="half"))
            session.add(Account(id=1, balance=5))
    assert names(engine) == []
    with engine.connect() as conn:
        assert conn.scalar(sa.select(Account.balance)) == 0


def test_caught_statement_failure_is_an_unexpected_rollback(
    registry: txguard.SessionRegistry, engine: sa.Engine
) -> None:
    """A flush failure swallowed inside the unit makes the commit an UnexpectedRollbackError."""
    with txguard.unit_of_work() as session:
        session.add(Account(id=1, balance=0))
    with pytest.raises(txguard.UnexpectedRollbackError, match="begin_nested"):
        with txguard.unit_of_work() as session:
            session.add(Item(name="lost"))
            session.add(Account(id=1, balance=5))
            try:
                session.flush()
            except IntegrityError:
                pass
    assert names(engine) == []


def test_a_unit_object_is_single_use(registry: txguard.SessionRegistry) -> None:
    """Entering the same unit_of_work() object twice at once raises DisciplineError."""
    unit = txguard.unit_of_work()
    with unit:
        with pytest.raises(txguard.DisciplineError, match="new one"):
            with unit:
                pass


def test_a_unit_object_is_opened_where_its_block_is_entered(
    registry: txguard.SessionRegistry, engine: sa.Engine
) -> None:
    """A unit made on one line and entered on another names the `with` line in messages."""
    unit = txguard.unit_of_work()
    line = this_line() + 2
    with pytest.raises(txguard.DisciplineError, match=rf"opened at .*test_units.py:{line}"):
        with unit as session:
            session.add(Item(name="a"))
            session.commit()
    assert names(engine) == []


def test_a_unit_object_runs_one_block(registry: txguard.SessionRegistry) -> None:
    """Entering a unit_of_work() object again after its block ended raises DisciplineError."""
    unit = txguard.unit_of_work()
    with unit:
        pass
    with pytest.raises(txguard.DisciplineError, match="is done.*create a new one"):
        with unit:
            pass
    never = txguard.unit_of_work(propagation="never")
    with never as session:
        assert session is None
    with pytest.raises(txguard.DisciplineError, match="is done"):
        with never:
            pass


def test_async_with_on_a_sync_registry_is_refused(registry: txguard.SessionRegistry) -> None:
    """`async with` on a sync registry raises ConfigurationError saying what to write."""
    import asyncio

    async def main() -> None:
        async with txguard.unit_of_work():
            pass

    with pytest.raises(txguard.ConfigurationError, match="plain `with"):
        asyncio.run(main())


# Rollback rules.


def test_no_rollback_for_commits_and_reraises(registry: txguard.SessionRegistry, engine: sa.Engine) -> None:
    """An exception selected by no_rollback_for commits the unit, then propagates."""
    with pytest.raises(KeyError):
        with txguard.unit_of_work(no_rollback_for=KeyError) as session:
            session.add(Item(name="kept"))
            raise KeyError("x")
    assert names(engine) == ["kept"]


def test_rollback_for_selects_which_exceptions_roll_back(
    registry: txguard.SessionRegistry, engine: sa.Engine
) -> None:
    """With rollback_for=(ValueError,) a ValueError rolls back and other exceptions commit."""
    with pytest.raises(ValueError):
        with txguard.unit_of_work(rollback_for=(ValueError,)) as session:
            session.add(Item(name="rolled back"))
            raise ValueError
    with pytest.raises(KeyError):
        with txguard.unit_of_work(rollback_for=(ValueError,)) as session:
            session.add(Item(name="committed"))
            raise KeyError
    assert names(engine) == ["committed"]


def test_the_nearest_rollback_rule_wins(registry: txguard.SessionRegistry, engine: sa.Engine) -> None:
    """rollback_for=LookupError with no_rollback_for=KeyError: KeyError commits, IndexError rolls back."""
    options = {"rollback_for": LookupError, "no_rollback_for": KeyError}
    with pytest.raises(KeyError):
        with txguard.unit_of_work(**options) as session:
            session.add(Item(name="key"))
            raise KeyError
    with pytest.raises(IndexError):
        with txguard.unit_of_work(**options) as session:
            session.add(Item(name="index"))
            raise IndexError
    assert names(engine) == ["key"]


class Interrupt(BaseException):
    pass


def test_base_exceptions_always_roll_back(registry: txguard.SessionRegistry, engine: sa.Engine) -> None:
    """An exception that is not an Exception (e.g. KeyboardInterrupt) never commits."""
    with pytest.raises(Interrupt):
        with txguard.unit_of_work(no_rollback_for=(BaseException,)) as session:
            session.add(Item(name="a"))
            raise Interrupt
    assert names(engine) == []


# Commit as you go.


def test_commit_as_you_go_commits_many_times(registry: txguard.SessionRegistry, engine: sa.Engine) -> None:
    """A commit-as-you-go unit lets the body commit as often as it likes."""
    with txguard.unit_of_work(mode="commit_as_you_go") as session:
        session.add(Item(name="a"))
        session.commit()
        session.add(Item(name="b"))
        session.commit()
    assert names(engine) == ["a", "b"]


def test_uncommitted_pending_objects_warn_and_roll_back(
    registry: txguard.SessionRegistry, engine: sa.Engine
) -> None:
    """Pending objects left at exit are rolled back with a warning naming where they were added."""
    with pytest.warns(txguard.UncommittedWorkWarning) as record:
        with txguard.unit_of_work(mode="commit_as_you_go") as session:
            session.add(Item(name="a"))
            session.commit()
            line = this_line() + 1
            session.add(Item(name="lost"))
    assert names(engine) == ["a"]
    message = str(record[0].message)
    assert f"test_units.py:{line}" in message
    assert "1 new" in message
    assert record[0].filename == __file__


def test_uncommitted_flushed_writes_warn(registry: txguard.SessionRegistry, engine: sa.Engine) -> None:
    """Flushed but uncommitted writes are rolled back with a warning."""
    with pytest.warns(txguard.UncommittedWorkWarning, match="first made at"):
        with txguard.unit_of_work(mode="commit_as_you_go") as session:
            session.add(Item(name="lost"))
            session.flush()
    assert names(engine) == []


def test_uncommitted_text_writes_warn(registry: txguard.SessionRegistry, engine: sa.Engine) -> None:
    """A write executed as SQL text and never committed is caught too."""
    with pytest.warns(txguard.UncommittedWorkWarning):
        with txguard.unit_of_work(mode="commit_as_you_go") as session:
            session.execute(sa.text("INSERT INTO txg_items (name) VALUES ('lost')"))
    assert names(engine) == []


def test_reads_only_do_not_warn(registry: txguard.SessionRegistry, engine: sa.Engine) -> None:
    """A commit-as-you-go unit that only read ends without a warning."""
    with txguard.unit_of_work(mode="commit_as_you_go") as session:
        session.execute(sa.select(Item)).all()


def test_commit_as_you_go_with_an_exception_rolls_back_silently(
    registry: txguard.SessionRegistry, engine: sa.Engine
) -> None:
    """When an exception leaves a commit-as-you-go unit its work is rolled back without a warning."""
    with pytest.raises(RuntimeError):
        with txguard.unit_of_work(mode="commit_as_you_go") as session:
            session.add(Item(name="lost"))
            raise RuntimeError
    assert names(engine) == []


def test_commit_as_you_go_rollback_discards_on_purpose(
    registry: txguard.SessionRegistry, engine: sa.Engine
) -> None:
    """session.rollback() in a commit-as-you-go unit discards the work without a warning."""
    with txguard.unit_of_work(mode="commit_as_you_go") as session:
        session.add(Item(name="lost"))
        session.flush()
        session.rollback()
    assert names(engine) == []


# Options.


def test_read_only_refuses_orm_writes(registry: txguard.SessionRegistry, engine: sa.Engine) -> None:
    """A read-only unit raises ReadOnlyTransactionError on a flush of new objects."""
    with pytest.raises(txguard.ReadOnlyTransactionError, match="read_only=False"):
        with txguard.unit_of_work(read_only=True) as session:
            session.add(Item(name="a"))
            session.flush()
    assert names(engine) == []


@pytest.mark.parametrize(
    "statement",
    [
        sa.insert(Item).values(name="a"),
        sa.update(Item).values(name="b"),
        sa.delete(Item),
        sa.text("INSERT INTO txg_items (name) VALUES ('a')"),
    ],
    ids=["insert", "update", "delete", "text"],
)
def test_read_only_refuses_executed_writes(
    registry: txguard.SessionRegistry, engine: sa.Engine, statement: sa.Executable
) -> None:
    """A read-only unit raises ReadOnlyTransactionError on DML executed through the session."""
    with pytest.raises(txguard.ReadOnlyTransactionError):
        with txguard.unit_of_work(read_only=True) as session:
            session.execute(statement)
    assert names(engine) == []


def test_read_only_reads(registry: txguard.SessionRegistry, engine: sa.Engine) -> None:
    """A read-only unit reads normally."""
    with txguard.unit_of_work() as session:
        session.add(Item(name="a"))
    with txguard.unit_of_work(read_only=True) as session:
        assert session.scalars(sa.select(Item.name)).all() == ["a"]


def test_read_only_is_enforced_by_the_server(
    registry: txguard.SessionRegistry, engine: sa.Engine, backend: str
) -> None:
    """On PostgreSQL and MariaDB the server transaction itself is READ ONLY."""
    if backend == "sqlite":
        pytest.skip("SQLite has no read-only transactions; txguard's own checks apply")
    with pytest.raises(engine.dialect.loaded_dbapi.Error):
        with txguard.unit_of_work(read_only=True) as session:
            # The driver's own cursor, past txguard's checks: only the server can refuse.
            cursor = session.connection().connection.cursor()
            cursor.execute("INSERT INTO txg_items (name) VALUES ('a')")
    assert names(engine) == []


def test_isolation_level_is_applied(registry: txguard.SessionRegistry, backend: str) -> None:
    """isolation_level= sets the transaction's level when the unit begins it."""
    with txguard.unit_of_work(isolation_level="serializable") as session:
        level = session.connection().get_isolation_level()
    assert level == "SERIALIZABLE"
    with txguard.unit_of_work() as session:
        assert session.connection().get_isolation_level() != "SERIALIZABLE" or backend == "sqlite"


def test_joining_with_another_isolation_level_raises(registry: txguard.SessionRegistry) -> None:
    """A unit asking for a different isolation level than the transaction it joins raises."""
    with txguard.unit_of_work(isolation_level="SERIALIZABLE"):
        with pytest.raises(txguard.DisciplineError, match="requires_new"):
            with txguard.unit_of_work(isolation_level="READ UNCOMMITTED"):
                pass
        with txguard.unit_of_work(isolation_level="SERIALIZABLE"):
            pass


def test_joining_a_default_level_transaction_checks_the_real_level(
    registry: txguard.SessionRegistry, backend: str
) -> None:
    """Joining a transaction begun at the default level compares with the level it really has."""
    with txguard.unit_of_work() as session:
        actual = session.connection().get_isolation_level()
        with txguard.unit_of_work(isolation_level=actual):
            pass
        other = "SERIALIZABLE" if actual != "SERIALIZABLE" else "READ UNCOMMITTED"
        with pytest.raises(txguard.DisciplineError):
            with txguard.unit_of_work(isolation_level=other):
                pass


def test_durable_inside_another_unit_raises(registry: txguard.SessionRegistry, engine: sa.Engine) -> None:
    """durable=True inside another unit raises DisciplineError; outermost it commits."""
    with txguard.unit_of_work(durable=True) as session:
        session.add(Item(name="a"))
    with pytest.raises(txguard.DisciplineError, match="durable"):
        with txguard.unit_of_work():
            with txguard.unit_of_work(durable=True):
                pass
    assert names(engine) == ["a"]
