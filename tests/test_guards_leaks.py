"""The leaks guard: Sessions and Connections garbage-collected while still holding resources."""

from __future__ import annotations

import gc
import sys
import warnings
from collections.abc import Iterator

import pytest
import sqlalchemy as sa
from sqlalchemy.orm import Session, sessionmaker

import txguard
import txguard._registry  # noqa: F401  (conftest's reset reaches for it; txguard loads lazily)
from tests.helpers import this_line
from tests.models import Item


@pytest.fixture(autouse=True)
def _uninstall() -> Iterator[None]:
    gc.collect()  # what earlier tests left (an async engine's transport) warns before, not in, this test
    yield
    txguard.uninstall()


@pytest.fixture
def unraisable() -> Iterator[list[BaseException]]:
    """Collect what Python reports through sys.unraisablehook (errors in finalizers)."""
    seen: list[BaseException] = []
    gc.collect()  # earlier tests' garbage is not this test's
    previous = sys.unraisablehook
    sys.unraisablehook = lambda args: seen.append(args.exc_value)  # type: ignore[arg-type]
    yield seen
    sys.unraisablehook = previous


def where(line: int, function: str) -> str:
    """Name a line of this file as txguard's messages do."""
    code = sys._getframe(1).f_code
    return txguard._origin.describe_location(code.co_filename, line, function)


def leak_session(engine: sa.Engine) -> int:
    """Open a Session, run a query, and drop it unclosed; return the query's line."""
    session = Session(engine)
    line = this_line() + 1
    session.execute(sa.select(Item))
    return line


def leak_connection(engine: sa.Engine) -> int:
    """Check out a Connection and drop it unclosed; return the connect() line."""
    line = this_line() + 1
    conn = engine.connect()
    conn.execute(sa.text("SELECT 1"))
    return line


def test_leaked_session_warns_where_its_transaction_began(engine: sa.Engine) -> None:
    """A Session collected with its transaction open names the query that began it."""
    txguard.install(leaks="warn")
    with pytest.warns(txguard.LeakedSessionWarning) as record:
        line = leak_session(engine)
        gc.collect()
    message = str(record[0].message)
    assert f"autobegun at {where(line, 'leak_session')} by 'SELECT txg_items.id" in message
    assert "pooled connection" in message
    assert "with Session(engine) as session:" in message


def test_leaked_session_warning_points_at_its_origin(engine: sa.Engine) -> None:
    """The warning's file and line are where the leaked transaction began."""
    txguard.install(leaks="warn")
    with pytest.warns(txguard.LeakedSessionWarning) as record:
        line = leak_session(engine)
        gc.collect()
    assert (record[0].filename, record[0].lineno) == (__file__, line)


def test_leaked_session_is_reported_once_not_as_a_connection(engine: sa.Engine) -> None:
    """A leaked Session's own connection is not reported a second time."""
    txguard.install(leaks="warn")
    with pytest.warns(txguard.TxGuardWarning) as record:
        leak_session(engine)
        gc.collect()
    assert [type(w.message) for w in record] == [txguard.LeakedSessionWarning]


def test_leaked_session_with_only_pending_objects_warns(engine: sa.Engine) -> None:
    """A Session dropped with objects added but never flushed still held a transaction."""
    txguard.install(leaks="warn")
    with pytest.warns(txguard.LeakedSessionWarning, match="was still open"):
        Session(engine).add(Item(name="lost"))
        gc.collect()


def test_closed_session_is_not_a_leak(engine: sa.Engine) -> None:
    """A Session that was closed (or whose transaction ended) is collected silently."""
    txguard.install(leaks="error")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with Session(engine) as session:
            session.execute(sa.select(Item))
        committed = Session(engine)
        committed.execute(sa.select(Item))
        committed.commit()
        del session, committed
        gc.collect()


def test_leaked_connection_warns_where_it_was_opened(engine: sa.Engine) -> None:
    """A Connection collected while checked out names the connect() call."""
    txguard.install(leaks="warn")
    with pytest.warns(txguard.LeakedConnectionWarning) as record:
        line = leak_connection(engine)
        gc.collect()
    message = str(record[0].message)
    assert f"A Connection opened at {where(line, 'leak_connection')}" in message
    assert "by 'SELECT 1'" in message
    assert "with engine.connect() as conn:" in message
    assert engine.pool.checkedout() == 0


def test_leaked_connection_without_transaction_warns(engine: sa.Engine) -> None:
    """A Connection dropped before any statement still held a pooled connection."""
    txguard.install(leaks="warn")
    with pytest.warns(txguard.LeakedConnectionWarning, match="garbage-collected while still checked out"):
        engine.connect()
        gc.collect()


def test_closed_connection_is_not_a_leak(engine: sa.Engine) -> None:
    """Closed, invalidated and detached Connections are collected silently."""
    txguard.install(leaks="error")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with engine.connect() as conn:
            conn.execute(sa.text("SELECT 1"))
        invalidated = engine.connect()
        invalidated.invalidate()
        invalidated.close()
        detached = engine.connect()
        detached.detach()
        detached.close()
        del conn, invalidated, detached
        gc.collect()


def test_leak_error_level_goes_to_the_unraisable_hook(
    engine: sa.Engine, unraisable: list[BaseException]
) -> None:
    """At "error" a leak is raised in the finalizer, which Python reports as unraisable."""
    txguard.install(leaks="error")
    leak_session(engine)
    gc.collect()
    assert [type(exc) for exc in unraisable] == [txguard.LeakedSessionWarning]


def test_leaks_off_reports_nothing(engine: sa.Engine, unraisable: list[BaseException]) -> None:
    """With leaks="off" a leaked Session is collected silently."""
    txguard.install(leaks="off")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        leak_session(engine)
        leak_connection(engine)
        gc.collect()
    assert unraisable == []


def test_leaks_after_uninstall_are_not_reported(engine: sa.Engine) -> None:
    """A Session that leaks after uninstall() is not reported."""
    txguard.install(leaks="warn")
    session = Session(engine)
    session.execute(sa.select(Item))
    txguard.uninstall()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        del session
        gc.collect()


def test_transaction_ended_while_uninstalled_is_not_a_leak(engine: sa.Engine) -> None:
    """A transaction whose end uninstall() hid is not reported after a new install()."""
    txguard.install(leaks="warn")
    session = Session(engine)
    session.execute(sa.select(Item))
    txguard.uninstall()
    session.commit()
    txguard.install(leaks="warn")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        del session
        gc.collect()


def test_leak_from_sessionmaker_begin_is_impossible(engine: sa.Engine) -> None:
    """`with sessionmaker.begin()` always closes: nothing to report."""
    txguard.install(leaks="error")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with sessionmaker(engine).begin() as session:
            session.add(Item(name="a"))
        del session
        gc.collect()


def test_leak_warning_shows_under_default_filters(engine: sa.Engine) -> None:
    """Leak warnings are ResourceWarnings, yet leaks="warn" shows them under Python's defaults."""
    with warnings.catch_warnings(record=True) as record:
        warnings.resetwarnings()
        warnings.simplefilter("ignore", ResourceWarning)  # what Python does by default
        txguard.install(leaks="warn")
        leak_session(engine)
        gc.collect()
        txguard.uninstall()
    assert [type(w.message) for w in record] == [txguard.LeakedSessionWarning]


def test_user_filter_still_silences_leak_warnings(engine: sa.Engine) -> None:
    """A filter the user set for leak warnings wins over txguard's."""
    with warnings.catch_warnings(record=True) as record:
        warnings.resetwarnings()
        warnings.simplefilter("ignore", ResourceWarning)
        warnings.filterwarnings("ignore", category=txguard.LeakedSessionWarning)
        txguard.install(leaks="warn")
        leak_session(engine)
        gc.collect()
        txguard.uninstall()
    assert record == []


def test_uninstall_removes_the_leak_warning_filter() -> None:
    """uninstall() takes back the filter install() added."""
    with warnings.catch_warnings():
        warnings.resetwarnings()
        warnings.simplefilter("ignore", ResourceWarning)
        before = list(warnings.filters)
        txguard.install(leaks="warn")
        txguard.uninstall()
        assert warnings.filters == before
