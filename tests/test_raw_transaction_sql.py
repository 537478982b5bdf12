"""COMMIT, ROLLBACK or END sent as SQL inside a begin-once unit is refused before it runs.

The unit owns its transaction (SPEC §2, §5): ``session.commit()`` there raises
DisciplineError, and so does the same COMMIT written as SQL, which the server would obey
behind the unit's back. Correct code never sees it: commit-as-you-go units, code outside
units, savepoints and SQL that only contains the word.
"""

from __future__ import annotations

import pytest
import sqlalchemy as sa

import txguard
from tests.conftest import AsyncDatabase
from tests.helpers import names, this_line
from tests.models import Item
from txguard._statements import ends_transaction

ENDS = {
    "COMMIT": "COMMIT", "commit work": "COMMIT", "COMMIT AND CHAIN": "COMMIT", "commit;": "COMMIT",
    "END": "END", "end transaction": "END", "ROLLBACK": "ROLLBACK",
    "rollback work": "ROLLBACK", "ABORT": "ABORT", "/* c */ COMMIT": "COMMIT",
    "-- a comment\nCOMMIT": "COMMIT",
    "INSERT INTO t VALUES (1); COMMIT": "COMMIT", "PREPARE TRANSACTION 'x'": "PREPARE TRANSACTION",
}
GOES_ON = [
    "SELECT 'COMMIT'", 'SELECT "commit" FROM t', "SELECT 1 -- COMMIT", "/* COMMIT */ SELECT 1",
    "ROLLBACK TO SAVEPOINT sa_1", "rollback work to sp", "RELEASE SAVEPOINT sa_1",
    "SAVEPOINT sa_1", "COMMIT PREPARED 'x'", "UPDATE t SET done = 1 WHERE state = 'commit'",
    "CREATE PROCEDURE p() BEGIN SELECT 1; END", "DO $$ BEGIN PERFORM 1; END $$", "END IF",
    "SELECT 1; SELECT 'END'", "PREPARE s FROM 'SELECT 1'",
]


@pytest.mark.parametrize("sql", ENDS)
def test_sql_that_ends_the_transaction(sql: str) -> None:
    assert ends_transaction(sql) == ENDS[sql]


@pytest.mark.parametrize("sql", GOES_ON)
def test_sql_that_does_not_end_it(sql: str) -> None:
    assert ends_transaction(sql) is None


def _statements(backend: str) -> list[str]:
    common = ["COMMIT", "COMMIT WORK", "ROLLBACK"]
    return common + ["END", "ABORT"] if backend == "postgresql" else common


def _refused(info: pytest.ExceptionInfo[txguard.DisciplineError], line: int) -> None:
    message = str(info.value)
    assert "inside the begin-once unit opened at" in message
    assert f":{line} in " in message
    assert "mode='commit_as_you_go'" in message


def test_session_execute_of_a_raw_end_is_refused(engine: sa.Engine, backend: str) -> None:
    registry = txguard.SessionRegistry(engine)
    for sql in _statements(backend):
        with pytest.raises(txguard.DisciplineError) as info:
            with registry.unit_of_work() as session:
                session.add(Item(name=sql))
                session.flush()
                line = this_line() + 1
                session.execute(sa.text(sql))
        _refused(info, line)
    assert names(engine) == []  # nothing reached the server's COMMIT: each unit rolled back


def test_the_sessions_connection_is_refused_too(engine: sa.Engine) -> None:
    registry = txguard.SessionRegistry(engine)
    with pytest.raises(txguard.DisciplineError) as info:
        with registry.unit_of_work() as session:
            session.add(Item(name="a"))
            session.flush()
            line = this_line() + 1
            session.connection().exec_driver_sql("COMMIT")
    _refused(info, line)
    assert names(engine) == []


def test_connect_begin_once_refuses_a_raw_end(engine: sa.Engine, backend: str) -> None:
    for sql in _statements(backend):
        with pytest.raises(txguard.DisciplineError) as info:
            with txguard.connect(engine) as conn:
                conn.execute(sa.insert(Item).values(name=sql))
                line = this_line() + 1
                conn.exec_driver_sql(sql)
        _refused(info, line)
        with pytest.raises(txguard.DisciplineError):
            with txguard.connect(engine) as conn:
                conn.execute(sa.text(sql))
    assert names(engine) == []


def test_correct_code_is_never_refused(engine: sa.Engine) -> None:
    """Savepoints, the word inside SQL, and raw COMMITs outside begin-once units all run."""
    registry = txguard.SessionRegistry(engine)
    with registry.unit_of_work() as session:
        session.execute(sa.text("SELECT 'COMMIT'"))
        with session.begin_nested():  # SAVEPOINT / RELEASE SAVEPOINT
            session.add(Item(name="kept"))
        nested = session.begin_nested()
        session.add(Item(name="undone"))
        session.flush()
        nested.rollback()  # ROLLBACK TO SAVEPOINT
    with txguard.connect(engine) as conn:
        with conn.begin_nested() as savepoint:
            conn.execute(sa.insert(Item).values(name="undone"))
            savepoint.rollback()
    with registry.unit_of_work(mode="commit_as_you_go") as session:
        session.add(Item(name="committed by SQL"))
        session.flush()
        session.execute(sa.text("COMMIT"))
        session.commit()
    with txguard.connect(engine, mode="commit_as_you_go") as conn:
        conn.exec_driver_sql("COMMIT")
    with engine.connect() as conn:  # no unit at all
        conn.execute(sa.insert(Item).values(name="plain"))
        conn.exec_driver_sql("COMMIT")
        conn.commit()
    assert names(engine) == ["committed by SQL", "kept", "plain"]


async def test_async_units_refuse_a_raw_end(async_db: AsyncDatabase) -> None:
    registry = txguard.SessionRegistry(async_db.engine)
    with pytest.raises(txguard.DisciplineError) as info:
        async with registry.unit_of_work() as session:
            session.add(Item(name="a"))
            await session.flush()
            line = this_line() + 1
            await session.execute(sa.text("COMMIT"))
    _refused(info, line)
    with pytest.raises(txguard.DisciplineError):
        async with txguard.connect(async_db.engine) as conn:
            await conn.exec_driver_sql("ROLLBACK")
    assert names(async_db.sync) == []
