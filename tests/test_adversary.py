"""Adversary shapes the issues did not list: caught errors and lifecycle edges (SPEC §2)."""

from __future__ import annotations

import asyncio

import pytest
import sqlalchemy as sa
from sqlalchemy.exc import IntegrityError

import txguard
from tests.conftest import AsyncDatabase
from tests.helpers import SEED_ID
from tests.models import Item

SECRET = "hunter2-secret"
DUPLICATE = sa.text("INSERT INTO txg_items (id, name) VALUES (:id, :name)")


@pytest.fixture
def registry(engine: sa.Engine) -> txguard.SessionRegistry:
    with engine.begin() as conn:
        conn.execute(sa.insert(Item).values(id=SEED_ID, name="seed"))
    return txguard.configure(engine)


def count(engine: sa.Engine) -> int:
    with engine.connect() as conn:
        return int(conn.execute(sa.text("SELECT count(*) FROM txg_items")).scalar_one())


def test_error_in_begin_nested_caught_outside_the_block_is_contained(
    registry: txguard.SessionRegistry, engine: sa.Engine
) -> None:
    """A failed begin_nested() block caught outside it rolls back its savepoint; the unit commits."""
    with txguard.unit_of_work() as session:
        session.add(Item(name="kept"))
        session.flush()
        try:
            with session.begin_nested():
                session.execute(DUPLICATE, {"id": SEED_ID, "name": SECRET})
        except IntegrityError:
            pass
    assert count(engine) == 2


def test_rollback_after_caught_error_lets_commit_as_you_go_commit_later_work(
    registry: txguard.SessionRegistry, engine: sa.Engine
) -> None:
    """session.rollback() after a caught error clears the mark; later work commits."""
    with txguard.unit_of_work(mode="commit_as_you_go") as session:
        try:
            session.execute(DUPLICATE, {"id": SEED_ID, "name": SECRET})
        except IntegrityError:
            session.rollback()
        session.add(Item(name="later"))
        session.commit()
    assert count(engine) == 2


def test_caught_autoflush_error_inside_a_query_dooms_the_unit_without_the_value(
    registry: txguard.SessionRegistry, engine: sa.Engine
) -> None:
    """An autoflush failure caught around a query makes the unit raise, quoting no bound value."""
    with pytest.raises(txguard.UnexpectedRollbackError) as info:
        with txguard.unit_of_work() as session:
            session.add(Item(name="lost"))
            session.add(Item(id=SEED_ID, name=SECRET))
            try:
                session.execute(sa.select(Item)).all()
            except IntegrityError:
                pass
    assert SECRET not in str(info.value)
    assert count(engine) == 1


def test_caught_error_from_a_joined_transactional_dooms_the_owner(
    registry: txguard.SessionRegistry, engine: sa.Engine
) -> None:
    """A DB error inside a joined @transactional that the caller catches still dooms the owner."""

    @txguard.transactional
    def insert_duplicate() -> None:
        txguard.current_session().execute(DUPLICATE, {"id": SEED_ID, "name": SECRET})

    with pytest.raises(txguard.UnexpectedRollbackError) as info:
        with txguard.unit_of_work() as session:
            session.add(Item(name="lost"))
            try:
                insert_duplicate()
            except IntegrityError:
                pass
    assert SECRET not in str(info.value)
    assert count(engine) == 1


def test_unit_exited_twice_raises_discipline_error_and_keeps_its_commit(
    registry: txguard.SessionRegistry, engine: sa.Engine
) -> None:
    """A second __exit__ of a committed unit raises DisciplineError and changes nothing."""
    unit = txguard.unit_of_work()
    unit.__enter__().add(Item(name="once"))
    unit.__exit__(None, None, None)
    with pytest.raises(txguard.DisciplineError):
        unit.__exit__(None, None, None)
    assert count(engine) == 2


async def test_wait_for_timeout_at_any_await_never_half_commits(async_db: AsyncDatabase) -> None:
    """asyncio.wait_for cancelling an async unit at any await commits all or nothing, leaking nothing."""
    registry = txguard.SessionRegistry(async_db.engine)

    async def five_rows() -> None:
        async with registry.unit_of_work() as session:
            for i in range(5):
                session.add(Item(name=f"row{i}"))
                await session.flush()
                await session.execute(sa.text("SELECT 1"))

    for timeout in (0.0, 0.001, 0.003, 0.006, 0.01, 0.02, 0.05):
        try:
            await asyncio.wait_for(five_rows(), timeout)
        except asyncio.TimeoutError:  # the builtin TimeoutError only from Python 3.11 on
            pass
    assert count(async_db.sync) % 5 == 0
