"""AUTOCOMMIT binds are refused: no unit, connect() block or rollback_after() could roll back."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine, async_sessionmaker, create_async_engine
from sqlalchemy.orm import sessionmaker

import txguard
from tests.conftest import AsyncDatabase
from tests.helpers import names
from tests.models import Item
from txguard.testing import rollback_after

REFUSED = "AUTOCOMMIT isolation"


def url_of(engine: sa.Engine) -> str:
    return engine.url.render_as_string(hide_password=False)


@pytest.fixture
def make_engine() -> Iterator[Callable[..., sa.Engine]]:
    """Yield create_engine, disposing of every engine it made at the end."""
    made: list[sa.Engine] = []

    def make(url: str, **kw: Any) -> sa.Engine:
        made.append(sa.create_engine(url, **kw))
        return made[-1]

    yield make
    for engine in made:
        engine.dispose()


def test_engine_with_autocommit_execution_option_is_refused(engine: sa.Engine) -> None:
    """engine.execution_options(isolation_level='AUTOCOMMIT') cannot back a registry."""
    with pytest.raises(txguard.ConfigurationError, match=REFUSED):
        txguard.SessionRegistry(engine.execution_options(isolation_level="AUTOCOMMIT"))


def test_create_engine_isolation_level_autocommit_is_refused(
    engine: sa.Engine, make_engine: Callable[..., sa.Engine]
) -> None:
    """create_engine(url, isolation_level='AUTOCOMMIT') cannot back a registry."""
    with pytest.raises(txguard.ConfigurationError, match=REFUSED):
        txguard.configure(make_engine(url_of(engine), isolation_level="AUTOCOMMIT"))


def test_create_engine_execution_options_autocommit_is_refused(
    engine: sa.Engine, make_engine: Callable[..., sa.Engine]
) -> None:
    """create_engine(url, execution_options={'isolation_level': 'AUTOCOMMIT'}) is refused too."""
    autocommit = make_engine(url_of(engine), execution_options={"isolation_level": "AUTOCOMMIT"})
    with pytest.raises(txguard.ConfigurationError, match=REFUSED):
        txguard.SessionRegistry(autocommit)


def test_sessionmaker_on_an_autocommit_engine_is_refused(engine: sa.Engine) -> None:
    """A sessionmaker bound (or with a per-mapper bind) to an AUTOCOMMIT engine is refused."""
    autocommit = engine.execution_options(isolation_level="AUTOCOMMIT")
    with pytest.raises(txguard.ConfigurationError, match=REFUSED):
        txguard.SessionRegistry(sessionmaker(autocommit))
    with pytest.raises(txguard.ConfigurationError, match=REFUSED):
        txguard.SessionRegistry(sessionmaker(engine, binds={Item: autocommit}))


def test_sessionmaker_on_an_autocommit_connection_is_refused(engine: sa.Engine) -> None:
    """A sessionmaker bound to a connection in AUTOCOMMIT isolation is refused."""
    with engine.connect() as conn:
        conn.execution_options(isolation_level="AUTOCOMMIT")
        with pytest.raises(txguard.ConfigurationError, match="a connection in AUTOCOMMIT"):
            txguard.SessionRegistry(sessionmaker(conn))


def test_a_transactional_level_over_autocommit_is_accepted(
    engine: sa.Engine, make_engine: Callable[..., sa.Engine]
) -> None:
    """An execution option naming a real level overrides create_engine's AUTOCOMMIT: accepted."""
    autocommit = make_engine(url_of(engine), isolation_level="AUTOCOMMIT")
    registry = txguard.SessionRegistry(autocommit.execution_options(isolation_level="SERIALIZABLE"))
    with pytest.raises(RuntimeError), registry.unit_of_work() as session:
        session.add(Item(name="lost"))
        session.flush()
        raise RuntimeError
    assert names(engine) == []


def test_refusal_names_neither_url_nor_password(make_engine: Callable[..., sa.Engine]) -> None:
    """The message names the fix, never the URL, host or password of the engine."""
    secret = make_engine(
        "postgresql+psycopg://app:s3cr3t@db.internal:5432/bank", isolation_level="AUTOCOMMIT"
    )
    with pytest.raises(txguard.ConfigurationError) as info:
        txguard.SessionRegistry(secret)
    message = str(info.value)
    assert "execution_options(isolation_level='AUTOCOMMIT')" in message
    for part in ("s3cr3t", "db.internal", "bank", "app"):
        assert part not in message


@pytest.mark.parametrize("spelling", ["AUTOCOMMIT", "autocommit"])
def test_autocommit_as_a_unit_option_is_refused(engine: sa.Engine, spelling: str) -> None:
    """isolation_level='AUTOCOMMIT' on a unit, a @transactional or connect() is refused up front."""
    registry = txguard.SessionRegistry(engine)
    with pytest.raises(txguard.ConfigurationError, match="no transaction to discipline"):
        registry.unit_of_work(isolation_level=spelling)
    with pytest.raises(txguard.ConfigurationError, match="no transaction to discipline"):
        txguard.transactional(isolation_level=spelling, registry=registry)
    with pytest.raises(txguard.ConfigurationError, match="no transaction to discipline"):
        txguard.connect(engine, isolation_level=spelling)


@pytest.mark.parametrize("mode", ["begin_once", "commit_as_you_go"])
def test_connect_on_an_autocommit_engine_is_refused(engine: sa.Engine, mode: str) -> None:
    """txguard.connect() refuses an AUTOCOMMIT engine, before taking a connection."""
    autocommit = engine.execution_options(isolation_level="AUTOCOMMIT")
    with pytest.raises(txguard.ConfigurationError, match=REFUSED):
        txguard.connect(autocommit, mode=mode)
    assert names(engine) == []


def test_rollback_after_on_an_autocommit_engine_is_refused(engine: sa.Engine) -> None:
    """rollback_after() could not undo anything on an AUTOCOMMIT engine, so it refuses it."""
    with pytest.raises(txguard.ConfigurationError, match=REFUSED):
        rollback_after(engine.execution_options(isolation_level="AUTOCOMMIT"))


def test_rollback_after_on_a_normal_engine_still_rolls_back(engine: sa.Engine) -> None:
    """rollback_after() on an ordinary engine undoes what a unit committed inside it."""
    registry = txguard.SessionRegistry(engine)
    with rollback_after(registry):
        with registry.unit_of_work() as session:
            session.add(Item(name="committed in the test"))
        with registry.unit_of_work() as session:
            assert session.scalars(sa.select(Item.name)).all() == ["committed in the test"]
    assert names(engine) == []


# Async engines.


def test_async_engine_with_autocommit_is_refused(async_db: AsyncDatabase) -> None:
    """An AsyncEngine (or async_sessionmaker) in AUTOCOMMIT isolation cannot back a registry."""
    autocommit = async_db.engine.execution_options(isolation_level="AUTOCOMMIT")
    with pytest.raises(txguard.ConfigurationError, match=REFUSED):
        txguard.SessionRegistry(autocommit)
    with pytest.raises(txguard.ConfigurationError, match=REFUSED):
        txguard.SessionRegistry(async_sessionmaker(autocommit))


async def test_create_async_engine_isolation_level_autocommit_is_refused(
    async_db: AsyncDatabase,
) -> None:
    """create_async_engine(url, isolation_level='AUTOCOMMIT') cannot back a registry."""
    url = async_db.engine.url.render_as_string(hide_password=False)
    autocommit: AsyncEngine = create_async_engine(url, isolation_level="AUTOCOMMIT")
    try:
        with pytest.raises(txguard.ConfigurationError, match=REFUSED):
            txguard.SessionRegistry(autocommit)
    finally:
        await autocommit.dispose()


async def test_async_connect_and_rollback_after_refuse_autocommit(async_db: AsyncDatabase) -> None:
    """txguard.connect() and rollback_after() refuse an AUTOCOMMIT AsyncEngine."""
    autocommit = async_db.engine.execution_options(isolation_level="AUTOCOMMIT")
    with pytest.raises(txguard.ConfigurationError, match=REFUSED):
        txguard.connect(autocommit)
    with pytest.raises(txguard.ConfigurationError, match=REFUSED):
        rollback_after(autocommit)


@pytest.mark.parametrize("mode", ["begin_once", "commit_as_you_go"])
def test_autocommit_connection_inside_a_unit_is_refused(engine: sa.Engine, mode: str) -> None:
    """session.connection(execution_options=AUTOCOMMIT) in a unit raises; the unit keeps nothing."""
    registry = txguard.SessionRegistry(engine)
    with pytest.raises(txguard.DisciplineError, match="AUTOCOMMIT"):
        with registry.unit_of_work(mode=mode) as session:
            session.connection(execution_options={"isolation_level": "AUTOCOMMIT"})
            session.add(Item(name="kept by autocommit"))
            session.flush()
    assert names(engine) == []
