"""Retries never run again work whose COMMIT succeeded, whatever ``retry_on`` selects."""

from __future__ import annotations

from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.ext.asyncio import async_sessionmaker
from sqlalchemy.orm import Session, sessionmaker

import txguard
from tests.conftest import AsyncDatabase
from tests.helpers import names
from tests.models import Item


class BrokerDown(Exception):
    """The message broker an after-commit hook publishes to is unreachable."""


def publish() -> None:
    raise BrokerDown("publish failed")


def failing_after_commit() -> type[Session]:
    """Return a new Session class whose after_commit listener raises BrokerDown."""

    class PublishingSession(Session):
        pass

    @event.listens_for(PublishingSession, "after_commit")
    def publish_event(session: Session) -> None:
        raise BrokerDown("publish failed")

    return PublishingSession


def deposit_service(registry: txguard.SessionRegistry, calls: list[int], **options: Any) -> Any:
    """Return a @transactional function of ``registry`` that adds one deposit row per call."""

    @registry.transactional(retries=3, retry_on=BrokerDown, backoff=0, **options)
    def deposit() -> None:
        calls.append(1)
        registry.current_session().add(Item(name=f"deposit {len(calls)}"))

    return deposit


def test_after_commit_listener_error_is_not_retried(engine: sa.Engine) -> None:
    """An after_commit listener's error propagates once; the deposit is committed exactly once."""
    registry = txguard.SessionRegistry(sessionmaker(engine, class_=failing_after_commit()))
    calls: list[int] = []

    with pytest.raises(BrokerDown) as info:
        deposit_service(registry, calls)()
    assert calls == [1]
    assert names(engine) == ["deposit 1"]
    assert any("raised after a transaction committed" in n for n in info.value.__notes__)


def test_after_commit_listener_error_runs_on_commit_not_on_rollback(engine: sa.Engine) -> None:
    """The data committed, so the unit's on_commit callbacks run and its on_rollback ones do not."""
    registry = txguard.SessionRegistry(sessionmaker(engine, class_=failing_after_commit()))
    ran: list[str] = []

    with pytest.raises(BrokerDown), registry.unit_of_work() as session:
        session.add(Item(name="deposit"))
        registry.on_commit(lambda: ran.append("commit"))
        registry.on_rollback(lambda: ran.append("rollback"))
    assert ran == ["commit"]
    assert names(engine) == ["deposit"]


def test_inner_commit_error_is_not_retried_by_the_outer_unit(engine: sa.Engine) -> None:
    """An after_commit error of an inner requires_new unit does not make the outer unit re-run it."""
    inner_registry = txguard.SessionRegistry(sessionmaker(engine, class_=failing_after_commit()))
    registry = txguard.SessionRegistry(engine)
    calls: list[int] = []

    @registry.transactional(retries=3, retry_on=BrokerDown, backoff=0)
    def transfer() -> None:
        calls.append(1)
        with inner_registry.unit_of_work(propagation="requires_new") as session:
            session.add(Item(name=f"deposit {len(calls)}"))

    with pytest.raises(BrokerDown):
        transfer()
    assert calls == [1]
    assert names(engine) == ["deposit 1"]


def test_on_commit_error_of_the_unit_itself_is_not_retried(engine: sa.Engine) -> None:
    """A failing on_commit callback of the retrying unit propagates once, after its commit."""
    registry = txguard.SessionRegistry(engine)
    calls: list[int] = []

    @registry.transactional(retries=3, retry_on=BrokerDown, backoff=0)
    def deposit() -> None:
        calls.append(1)
        registry.current_session().add(Item(name=f"deposit {len(calls)}"))
        registry.on_commit(publish)

    with pytest.raises(BrokerDown):
        deposit()
    assert calls == [1]
    assert names(engine) == ["deposit 1"]


def test_on_commit_error_of_an_inner_unit_is_not_retried_by_the_outer(engine: sa.Engine) -> None:
    """A failing on_commit callback of a requires_new unit does not make the outer unit re-run it."""
    registry = txguard.SessionRegistry(engine)
    calls: list[int] = []

    @registry.transactional(retries=3, retry_on=BrokerDown, backoff=0)
    def transfer() -> None:
        calls.append(1)
        with registry.unit_of_work(propagation="requires_new") as session:
            session.add(Item(name=f"deposit {len(calls)}"))
            registry.on_commit(publish)

    with pytest.raises(BrokerDown) as info:
        transfer()
    assert calls == [1]
    assert names(engine) == ["deposit 1"]
    assert any("raised after a transaction committed" in n for n in info.value.__notes__)


def test_commit_as_you_go_after_commit_error_is_not_retried_by_the_outer(engine: sa.Engine) -> None:
    """session.commit() whose after_commit listener raises, inside a retrying unit, runs once."""
    inner_registry = txguard.SessionRegistry(sessionmaker(engine, class_=failing_after_commit()))
    registry = txguard.SessionRegistry(engine)
    calls: list[int] = []

    @registry.transactional(retries=3, retry_on=BrokerDown, backoff=0)
    def transfer() -> None:
        calls.append(1)
        with inner_registry.unit_of_work(mode="commit_as_you_go") as session:
            session.add(Item(name=f"deposit {len(calls)}"))
            session.commit()

    with pytest.raises(BrokerDown):
        transfer()
    assert calls == [1]
    assert names(engine) == ["deposit 1"]


def test_errors_before_the_commit_are_still_retried(engine: sa.Engine) -> None:
    """A retry_on error raised by the body (nothing committed) still runs the call again."""
    registry = txguard.SessionRegistry(engine)
    calls: list[int] = []

    @registry.transactional(retries=3, retry_on=BrokerDown, backoff=0)
    def deposit() -> None:
        calls.append(1)
        registry.current_session().add(Item(name=f"deposit {len(calls)}"))
        if len(calls) < 3:
            raise BrokerDown

    deposit()
    assert calls == [1, 1, 1]
    assert names(engine) == ["deposit 3"]


# Async drivers.


def async_registry(async_db: AsyncDatabase) -> txguard.SessionRegistry:
    """Return a registry on ``async_db`` whose sessions' after_commit listener raises."""
    return txguard.SessionRegistry(
        async_sessionmaker(async_db.engine, sync_session_class=failing_after_commit())
    )


async def test_async_after_commit_listener_error_is_not_retried(async_db: AsyncDatabase) -> None:
    """An async unit whose after_commit listener raises commits once and propagates the error."""
    registry = async_registry(async_db)
    calls: list[int] = []

    @registry.transactional(retries=3, retry_on=BrokerDown, backoff=0)
    async def deposit() -> None:
        calls.append(1)
        registry.current_session().add(Item(name=f"deposit {len(calls)}"))

    with pytest.raises(BrokerDown) as info:
        await deposit()
    assert calls == [1]
    assert names(async_db.sync) == ["deposit 1"]
    assert any("raised after a transaction committed" in n for n in info.value.__notes__)


async def test_async_on_commit_error_of_an_inner_unit_is_not_retried(async_db: AsyncDatabase) -> None:
    """A failing on_commit callback of an async requires_new unit does not re-run the outer call."""
    registry = txguard.SessionRegistry(async_db.engine)
    calls: list[int] = []

    @registry.transactional(retries=3, retry_on=BrokerDown, backoff=0)
    async def transfer() -> None:
        calls.append(1)
        async with registry.unit_of_work(propagation="requires_new") as session:
            session.add(Item(name=f"deposit {len(calls)}"))
            registry.on_commit(publish)

    with pytest.raises(BrokerDown):
        await transfer()
    assert calls == [1]
    assert names(async_db.sync) == ["deposit 1"]
