"""One statement classifier for read_only, the discard warning and connect()."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncSession

import txguard
from tests.conftest import AsyncDatabase
from tests.helpers import names
from tests.models import Item
from txguard._statements import is_write_sql
from txguard.testing import rollback_after

INSERT = "INSERT INTO txg_items (name) VALUES ('w')"
CTE = "WITH t AS (SELECT 'w' AS n)"

# Writes every backend runs, those MariaDB cannot (it has no WITH before INSERT/UPDATE/DELETE),
# and those only MariaDB reads as writes.
PREFIXED_WRITES = {
    "block comment": f"/* audit */ {INSERT}",
    "line comment": f"-- audit\n{INSERT}",
    "comments and space": f"  /* a */ -- b\n  /* c */\n{INSERT}",
}
MARIADB_WRITES = {
    "hash comment": f"# audit\n{INSERT}",
    "executable comment": f"/*!40101 {INSERT} */",
}
CTE_WRITES = {
    "with insert": f"{CTE} INSERT INTO txg_items (name) SELECT n FROM t",
    "with update": f"{CTE} UPDATE txg_items SET name = 'x' WHERE name IN (SELECT n FROM t)",
    "with delete": f"{CTE} DELETE FROM txg_items WHERE name IN (SELECT n FROM t)",
    "two ctes": (
        "WITH a AS (SELECT ')' AS n, (1 + (2)) AS k), b (n) AS (SELECT n FROM a) "
        "INSERT INTO txg_items (name) SELECT n FROM b"
    ),
    "recursive": (
        "WITH RECURSIVE c (k) AS (SELECT 1 UNION ALL SELECT k + 1 FROM c WHERE k < 2) "
        "INSERT INTO txg_items (name) SELECT 'w' FROM c"
    ),
}
READS = {
    "select": "SELECT name FROM txg_items",
    "with select": f"{CTE} SELECT n FROM t",
    "keyword in a literal": "SELECT 'insert into txg_items values (1); delete' AS s",
    "comment before a select": "/* INSERT */ -- DELETE\nSELECT 1",
}


def writes_for(backend: str) -> dict[str, str]:
    if backend == "mariadb":
        return {**PREFIXED_WRITES, **MARIADB_WRITES}
    return {**PREFIXED_WRITES, **CTE_WRITES}


ALL_WRITES = {**PREFIXED_WRITES, **CTE_WRITES, **MARIADB_WRITES}


# The classifier itself.


@pytest.mark.parametrize(
    "sql",
    [
        *ALL_WRITES.values(),
        "WITH d AS (DELETE FROM t RETURNING id) SELECT * FROM d",
        'WITH "q" AS NOT MATERIALIZED (SELECT 1) UPDATE t SET a = 1',
        "SELECT 1; DELETE FROM t",
        "SELECT 'a;b'; UPDATE t SET a = 1",
        "SELECT 'it\\'s'; DELETE FROM t",
        "SELECT $a$ ; $a$; TRUNCATE t",
        "(INSERT INTO t VALUES (1))",
        "create table t (a int)",
        "EXPLAIN ANALYZE INSERT INTO t VALUES (1)",
        "explain (analyze, buffers) WITH x AS (SELECT 1) DELETE FROM t",
        "ANALYZE UPDATE t SET a = 1",
    ],
)
def test_writes_are_classified_as_writes(sql: str) -> None:
    """Comment-, parenthesis- and CTE-prefixed writes and later statements are writes."""
    assert is_write_sql(sql)


@pytest.mark.parametrize(
    "sql",
    [
        *READS.values(),
        "(SELECT 1) UNION (SELECT 2)",
        "SELECT $$ ; DELETE $$",
        "SELECT 1 /* ; DELETE */",
        'SELECT "insert" FROM t',
        "WITH a AS (SELECT 1), b AS (SELECT '(') SELECT * FROM a, b",
        "insert_row()",
        "EXPLAIN INSERT INTO t VALUES (1)",
        "EXPLAIN ANALYZE SELECT * FROM t",
        "ANALYZE t",
        "",
        "WITH",
    ],
)
def test_reads_are_classified_as_reads(sql: str) -> None:
    """Reads, including a CTE read and write keywords inside literals and comments, are reads."""
    assert not is_write_sql(sql)


# read_only=True.


@pytest.fixture
def registry(engine: sa.Engine) -> txguard.SessionRegistry:
    return txguard.SessionRegistry(engine)


def test_read_only_refuses_prefixed_writes(
    registry: txguard.SessionRegistry, engine: sa.Engine, backend: str
) -> None:
    """Each write behind a comment or a WITH clause raises ReadOnlyTransactionError."""
    for shape, sql in writes_for(backend).items():
        with pytest.raises(txguard.ReadOnlyTransactionError, match="read-only unit"):
            with registry.unit_of_work(read_only=True) as session:
                session.execute(sa.text(sql))
        assert names(engine) == [], shape


@pytest.mark.parametrize(
    "run",
    [
        lambda conn: conn.execute(sa.text(f"/* x */ {INSERT}")),
        lambda conn: conn.execute(sa.text(INSERT)),
        lambda conn: conn.exec_driver_sql(INSERT),
        lambda conn: conn.execute(sa.insert(Item).values(name="w")),
    ],
    ids=["text with comment", "text", "driver sql", "core insert"],
)
def test_read_only_refuses_writes_through_session_connection(
    registry: txguard.SessionRegistry, engine: sa.Engine, run: Callable[[sa.Connection], Any]
) -> None:
    """A write through session.connection() raises ReadOnlyTransactionError before it is sent."""
    with pytest.raises(txguard.ReadOnlyTransactionError, match="read-only unit"):
        with registry.unit_of_work(read_only=True) as session:
            run(session.connection())
    assert names(engine) == []


@pytest.mark.parametrize(
    "statement",
    [
        sa.text(f"{INSERT} RETURNING id").columns(id=sa.Integer),
        sa.select(Item).from_statement(sa.text(f"-- x\n{INSERT} RETURNING id, name")),
        sa.DDL("CREATE TABLE txg_never (a INTEGER)"),
    ],
    ids=["text columns", "from statement", "ddl"],
)
def test_read_only_refuses_wrapped_writes(
    registry: txguard.SessionRegistry, engine: sa.Engine, statement: Any
) -> None:
    """A write wrapped as text().columns(), from_statement() or DDL raises ReadOnlyTransactionError."""
    with pytest.raises(txguard.ReadOnlyTransactionError, match="read-only unit"):
        with registry.unit_of_work(read_only=True) as session:
            session.execute(statement)
    assert names(engine) == []
    assert not sa.inspect(engine).has_table("txg_never")


@pytest.mark.parametrize("shape", list(READS))
def test_read_only_runs_reads(registry: txguard.SessionRegistry, engine: sa.Engine, shape: str) -> None:
    """Reads, a WITH ... SELECT and a SELECT quoting 'insert' run in a read-only unit, both ways."""
    with registry.unit_of_work(read_only=True) as session:
        session.execute(sa.text(READS[shape])).all()
        session.connection().execute(sa.text(READS[shape])).all()


def test_read_only_watch_ends_with_the_unit(engine: sa.Engine) -> None:
    """After a read-only unit used session.connection(), a later unit on the same connection writes."""
    registry = txguard.SessionRegistry(engine)
    with rollback_after(registry):
        with registry.unit_of_work(read_only=True) as session:
            session.connection().execute(sa.text("SELECT 1"))
        with registry.unit_of_work() as session:
            session.connection().execute(sa.text(INSERT))
        with registry.unit_of_work() as session:
            assert session.scalars(sa.select(Item.name)).all() == ["w"]


# The commit-as-you-go discard warning.


def test_discard_warning_fires_for_prefixed_writes(
    registry: txguard.SessionRegistry, engine: sa.Engine, backend: str
) -> None:
    """Each comment- or CTE-prefixed write that is never committed is reported."""
    for shape, sql in writes_for(backend).items():
        with pytest.warns(txguard.UncommittedWorkWarning, match="first made at"):
            with registry.unit_of_work(mode="commit_as_you_go") as session:
                session.execute(sa.text(sql))
        assert names(engine) == [], shape


@pytest.mark.parametrize(
    "run",
    [
        lambda conn: conn.execute(sa.text(INSERT)),
        lambda conn: conn.exec_driver_sql(INSERT),
        lambda conn: conn.execute(sa.insert(Item).values(name="w")),
        lambda conn: conn.execute(sa.text(f"-- x\n{INSERT}")),
    ],
    ids=["text", "driver sql", "core insert", "text with comment"],
)
def test_discard_warning_fires_for_writes_through_session_connection(
    registry: txguard.SessionRegistry, engine: sa.Engine, run: Callable[[sa.Connection], Any]
) -> None:
    """A write through session.connection() that is never committed is reported and rolled back."""
    with pytest.warns(txguard.UncommittedWorkWarning, match="first made at"):
        with registry.unit_of_work(mode="commit_as_you_go") as session:
            run(session.connection())
    assert names(engine) == []


def test_discard_warning_is_silent_for_reads(registry: txguard.SessionRegistry, backend: str) -> None:
    """Reads, through the session or its connection, are not uncommitted work."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for sql in READS.values():
            with registry.unit_of_work(mode="commit_as_you_go") as session:
                session.execute(sa.text(sql)).all()
                session.connection().execute(sa.text(sql)).all()


def test_discard_warning_is_silent_after_a_commit(
    registry: txguard.SessionRegistry, engine: sa.Engine
) -> None:
    """A write through session.connection() that was committed leaves nothing to report."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with registry.unit_of_work(mode="commit_as_you_go") as session:
            session.connection().execute(sa.text(INSERT))
            session.commit()
            session.connection().execute(sa.text("SELECT 1"))
    assert names(engine) == ["w"]


# txguard.connect(mode="commit_as_you_go").


def test_connect_discard_warning_fires_for_prefixed_writes(engine: sa.Engine, backend: str) -> None:
    """A Core connection that discards a comment- or CTE-prefixed write warns."""
    for shape, sql in writes_for(backend).items():
        with pytest.warns(txguard.UncommittedWorkWarning, match="uncommitted writes"):
            with txguard.connect(engine, mode="commit_as_you_go") as conn:
                conn.execute(sa.text(sql))
        assert names(engine) == [], shape


def test_connect_discard_warning_is_silent_for_reads(engine: sa.Engine) -> None:
    """A Core connection that only read, including a SELECT quoting 'insert', does not warn."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for sql in READS.values():
            with txguard.connect(engine, mode="commit_as_you_go") as conn:
                conn.execute(sa.text(sql)).all()


# Async sessions.


async def test_async_read_only_refuses_writes_through_the_connection(async_db: AsyncDatabase) -> None:
    """`await session.connection()` of a read-only unit refuses a comment-prefixed write."""
    registry = txguard.SessionRegistry(async_db.engine)
    with pytest.raises(txguard.ReadOnlyTransactionError):
        async with registry.unit_of_work(read_only=True) as session:
            assert isinstance(session, AsyncSession)
            conn = await session.connection()
            await conn.execute(sa.text(f"/* x */ {INSERT}"))
    assert names(async_db.sync) == []


async def test_async_discard_warning_fires_for_writes_through_the_connection(
    async_db: AsyncDatabase,
) -> None:
    """An async commit-as-you-go unit reports a discarded write made through its connection."""
    registry = txguard.SessionRegistry(async_db.engine)
    with pytest.warns(txguard.UncommittedWorkWarning):
        async with registry.unit_of_work(mode="commit_as_you_go") as session:
            conn = await session.connection()
            await conn.execute(sa.text(INSERT))
    assert names(async_db.sync) == []
