"""txguard.connect(): Core connections with begin-once and commit-as-you-go discipline."""

from __future__ import annotations

import pytest
import sqlalchemy as sa

import txguard
from tests.helpers import names, this_line
from tests.models import Item

INSERT = sa.insert(Item)


def test_begin_once_commits(engine: sa.Engine) -> None:
    """A begin-once connection commits at a normal exit, like engine.begin()."""
    with txguard.connect(engine) as conn:
        conn.execute(INSERT, {"name": "a"})
    assert names(engine) == ["a"]


def test_begin_once_rolls_back_on_exception(engine: sa.Engine) -> None:
    """An exception rolls the connection's transaction back and propagates."""
    with pytest.raises(RuntimeError):
        with txguard.connect(engine, mode="begin_once") as conn:
            conn.execute(INSERT, {"name": "a"})
            raise RuntimeError
    assert names(engine) == []


@pytest.mark.parametrize("method", ["commit", "rollback", "begin"])
def test_begin_once_refuses_boundary_calls(engine: sa.Engine, method: str) -> None:
    """conn.commit()/rollback()/begin() inside a begin-once connection raise DisciplineError."""
    with pytest.raises(txguard.DisciplineError, match="commit_as_you_go"):
        with txguard.connect(engine) as conn:
            conn.execute(INSERT, {"name": "a"})
            getattr(conn, method)()
    assert names(engine) == []


def test_commit_as_you_go_commits_each_time(engine: sa.Engine) -> None:
    """A commit-as-you-go connection commits whenever the body says so, without warnings."""
    with txguard.connect(engine, mode="commit_as_you_go") as conn:
        conn.execute(INSERT, {"name": "a"})
        conn.commit()
        conn.execute(sa.select(Item)).all()
    assert names(engine) == ["a"]


def test_commit_as_you_go_warns_about_discarded_writes(engine: sa.Engine) -> None:
    """Writes never committed are rolled back with a warning naming the statement and its line."""
    with pytest.warns(txguard.UncommittedWorkWarning) as record:
        with txguard.connect(engine, mode="commit_as_you_go") as conn:
            line = this_line() + 1
            conn.execute(INSERT, {"name": "secret-value"})
    message = str(record[0].message)
    assert f"test_connect.py:{line}" in message
    assert "INSERT INTO txg_items" in message
    assert "secret-value" not in message
    assert names(engine) == []


def test_engine_comes_from_the_default_registry(engine: sa.Engine) -> None:
    """With no engine given, connect() uses the default registry's engine."""
    txguard.configure(engine)
    with txguard.connect() as conn:
        conn.execute(INSERT, {"name": "a"})
    assert names(engine) == ["a"]


def test_isolation_level_is_applied(engine: sa.Engine) -> None:
    """isolation_level= is set on the connection before it begins."""
    with txguard.connect(engine, isolation_level="SERIALIZABLE") as conn:
        assert conn.get_isolation_level() == "SERIALIZABLE"


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"mode": "autocommit"}, "'begin_once'"),
        ({"isolation_level": "chaos"}, "SERIALIZABLE"),
    ],
)
def test_bad_options_are_refused(engine: sa.Engine, kwargs: dict[str, object], match: str) -> None:
    """Wrong options raise ConfigurationError naming the allowed values."""
    with pytest.raises(txguard.ConfigurationError, match=match):
        txguard.connect(engine, **kwargs)  # type: ignore[arg-type]


def test_not_an_engine_is_refused() -> None:
    """Anything but an Engine or AsyncEngine is refused."""
    with pytest.raises(txguard.ConfigurationError, match="Engine"):
        txguard.connect("sqlite://")
