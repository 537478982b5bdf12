"""Caches pin nothing: dropped registries close their connections, dynamic session classes are collected."""

from __future__ import annotations

import gc
import time
import uuid
import weakref

import pytest
import sqlalchemy as sa
from sqlalchemy.orm import Session, sessionmaker

import txguard
from tests.backends import SYNC_URLS, require
from tests.models import Item


def use_registry(registry: txguard.SessionRegistry) -> None:
    """Run units with cached non-default options, a commit-as-you-go one and a decorated function."""
    with registry.unit_of_work(read_only=True) as session:
        session.execute(sa.select(1))
    with txguard.unit_of_work(read_only=True, registry=registry) as session:
        session.execute(sa.select(1))
    with txguard.unit_of_work(mode="commit_as_you_go", isolation_level="SERIALIZABLE", registry=registry) as session:
        session.execute(sa.select(1))

    @registry.transactional(read_only=True)
    def read() -> None:
        txguard.current_session(registry).execute(sa.select(1))

    read()


def write(registry: txguard.SessionRegistry) -> None:
    """Commit a row in a commit-as-you-go unit (whose session class has listeners)."""
    with registry.unit_of_work(mode="commit_as_you_go") as session:
        session.add(Item(name="a"))
        session.commit()


def collected(refs: list[weakref.ref[object]]) -> bool:
    """Collect garbage and say whether every referent is gone."""
    gc.collect()
    return all(ref() is None for ref in refs)


def server_connections(application_name: str) -> int:
    """Count the PostgreSQL backends with this application_name, waiting up to 5 s for them to go."""
    engine = sa.create_engine(SYNC_URLS["postgresql"], poolclass=sa.NullPool)
    query = sa.text("select count(*) from pg_stat_activity where application_name = :name")
    try:
        deadline = time.monotonic() + 5
        while True:
            with engine.connect() as conn:
                count: int = conn.scalar(query, {"name": application_name})
            if count == 0 or time.monotonic() > deadline:
                return count
            time.sleep(0.05)
    finally:
        engine.dispose()


def test_dropped_registries_release_their_engines_and_connections() -> None:
    """Registries used with non-default options and then dropped leave no engine alive and no PostgreSQL connection open."""
    require("postgresql")
    name = f"txguard-caches-{uuid.uuid4().hex[:8]}"
    engines = [
        sa.create_engine(SYNC_URLS["postgresql"], connect_args={"application_name": name})
        for _ in range(5)
    ]
    for engine in engines:
        use_registry(txguard.SessionRegistry(engine))
    assert server_connections(name) == 5
    refs = [weakref.ref(engine) for engine in engines]
    del engines, engine
    assert collected(refs)
    assert server_connections(name) == 0


@pytest.mark.parametrize("kind", ["sessionmaker", "class_"])
def test_dynamic_session_classes_are_collected(engine: sa.Engine, kind: str) -> None:
    """Session classes made at run time (a sessionmaker makes one each) are collected with their registries."""
    refs: list[weakref.ref[object]] = []
    for n in range(5):
        if kind == "sessionmaker":
            maker: sessionmaker[Session] = sessionmaker(engine)
        else:
            maker = sessionmaker(engine, class_=type(f"Session{n}", (Session,), {}))
        registry = txguard.SessionRegistry(maker)
        use_registry(registry)
        write(registry)
        refs += [weakref.ref(maker.class_), weakref.ref(registry)]
    del maker, registry
    assert collected(refs)


def test_a_registry_that_is_not_one_is_refused_with_options() -> None:
    """unit_of_work(registry=...) with options refuses a non-registry by name instead of caching it."""
    with pytest.raises(txguard.ConfigurationError, match="registry=<a str> is not valid"):
        txguard.unit_of_work(read_only=True, registry="db")  # type: ignore[arg-type]
