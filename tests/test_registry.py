"""Registries: binds, the default registry, and the per-context stack of units."""

from __future__ import annotations

import asyncio
import threading

import pytest
import sqlalchemy as sa
from sqlalchemy.orm import Session, sessionmaker

import txguard
from tests.helpers import names
from tests.models import Item


def test_using_the_default_registry_before_configure_says_how(sqlite_engine: sa.Engine) -> None:
    """Before configure(), the module-level functions raise ConfigurationError with the fix."""
    with pytest.raises(txguard.ConfigurationError, match=r"txguard.configure\(engine\)"):
        txguard.current_session()
    with pytest.raises(txguard.ConfigurationError, match="configure"):
        with txguard.unit_of_work():
            pass


def test_current_session_outside_a_unit_says_how_to_open_one(sqlite_engine: sa.Engine) -> None:
    """current_session() with no unit raises TransactionRequiredError naming unit_of_work."""
    txguard.configure(sqlite_engine)
    with pytest.raises(txguard.TransactionRequiredError, match="unit_of_work"):
        txguard.current_session()


@pytest.mark.parametrize("bind", [None, "sqlite://", 42])
def test_a_wrong_bind_is_refused(bind: object) -> None:
    """Anything but an engine or a sessionmaker is refused with the accepted kinds."""
    with pytest.raises(txguard.ConfigurationError, match="AsyncEngine"):
        txguard.SessionRegistry(bind)  # type: ignore[arg-type]


def test_session_options_reach_the_sessions(sqlite_engine: sa.Engine) -> None:
    """session_options go to the sessionmaker (expire_on_commit=False keeps attributes loaded)."""
    registry = txguard.SessionRegistry(sqlite_engine, expire_on_commit=False)
    with registry.unit_of_work() as session:
        item = Item(name="a")
        session.add(item)
    assert item.name == "a"


def test_a_sessionmaker_bind_keeps_its_class_and_events(sqlite_engine: sa.Engine) -> None:
    """A registry built on a sessionmaker hands out sessions of its class, with its events."""

    class AppSession(Session):
        pass

    factory = sessionmaker(sqlite_engine, class_=AppSession)
    seen: list[str] = []
    sa.event.listen(factory, "after_commit", lambda s: seen.append("commit"))
    registry = txguard.SessionRegistry(factory)
    with registry.unit_of_work() as session:
        assert isinstance(session, AppSession)
    with registry.unit_of_work(mode="commit_as_you_go") as session:
        assert isinstance(session, AppSession)
        session.commit()
    assert seen == ["commit", "commit"]


def test_a_session_subclass_keeps_its_overrides_under_the_guards(sqlite_engine: sa.Engine) -> None:
    """Units hand out a private subclass of the user's class: its own methods still run."""
    calls: list[str] = []

    class AppSession(Session):
        def commit(self) -> None:
            calls.append("commit")
            super().commit()

    registry = txguard.SessionRegistry(sessionmaker(sqlite_engine, class_=AppSession))
    with registry.unit_of_work(mode="commit_as_you_go") as session:
        assert isinstance(session, AppSession) and type(session) is not AppSession
        assert type(session).__name__ == "AppSession"
        session.execute(sa.text("SELECT 1"))
        session.commit()
    assert calls == ["commit"]
    with registry.unit_of_work() as session:
        with pytest.raises(txguard.DisciplineError, match="session.commit"):
            session.commit()
    assert calls == ["commit"]  # refused before the user's override ran
    session.rollback()  # after its unit the guards are gone, and the session is closed for good
    with pytest.raises(txguard.DisciplineError, match="has ended and closed it"):
        session.begin()
    session.close()
    outside = AppSession(sqlite_engine)
    outside.commit()  # a session of the user's own class is never touched
    outside.close()
    assert calls == ["commit", "commit"]


def test_a_new_thread_starts_with_no_unit(sqlite_engine: sa.Engine) -> None:
    """Units are per context: a new thread sees none of its parent's units."""
    registry = txguard.configure(sqlite_engine)
    seen: list[object] = []

    def worker() -> None:
        seen.append(registry.in_transaction())

    with registry.unit_of_work():
        thread = threading.Thread(target=worker)
        thread.start()
        thread.join()
    assert seen == [False]


def test_registries_are_independent(sqlite_engine: sa.Engine, tmp_path_factory: pytest.TempPathFactory) -> None:
    """Two registries keep separate stacks: a unit of one is invisible to the other."""
    first = txguard.SessionRegistry(sqlite_engine)
    second = txguard.SessionRegistry(sqlite_engine)
    with first.unit_of_work():
        assert first.in_transaction()
        assert not second.in_transaction()


def test_registry_methods_mirror_the_module_functions(sqlite_engine: sa.Engine) -> None:
    """A registry's methods work without any default registry configured."""
    registry = txguard.SessionRegistry(sqlite_engine)
    seen: list[str] = []
    with registry.unit_of_work() as session:
        assert registry.current_session() is session
        registry.on_commit(lambda: seen.append("commit"))
        registry.on_rollback(lambda: seen.append("rollback"))
        session.add(Item(name="a"))
    with registry.connect() as conn:
        conn.execute(sa.insert(Item).values(name="b"))
    assert seen == ["commit"]
    assert names(sqlite_engine) == ["a", "b"]
    assert "sync" in repr(registry)


def test_an_asyncio_task_sees_its_creators_units(sqlite_engine: sa.Engine) -> None:
    """A task created inside a unit sees that unit (contextvars are copied at task creation)."""
    registry = txguard.configure(sqlite_engine)

    async def main() -> list[bool]:
        with registry.unit_of_work():
            inside = asyncio.create_task(asyncio.sleep(0, registry.in_transaction()))
            seen_inside = await inside
        outside = await asyncio.create_task(asyncio.sleep(0, registry.in_transaction()))
        return [seen_inside, outside]

    assert asyncio.run(main()) == [True, False]


def test_connect_needs_an_engine_when_the_registry_has_none(sqlite_engine: sa.Engine) -> None:
    """connect() without an engine on a registry with several binds says to pass one."""
    registry = txguard.SessionRegistry(sessionmaker(binds={Item: sqlite_engine}))
    with pytest.raises(txguard.ConfigurationError, match=r"txguard.connect\(engine\)"):
        registry.connect()
