"""LeakDetector: sessions and pooled connections left open, on every backend."""

from __future__ import annotations

import gc
import threading
import weakref
from collections.abc import Iterator

import pytest
import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.pool import Pool

import txguard
from tests.conftest import AsyncDatabase
from tests.helpers import this_line
from tests.models import Item
from txguard import _leaks

SELECT_1 = sa.text("SELECT 1")


@pytest.fixture
def detector() -> Iterator[txguard.LeakDetector]:
    with txguard.LeakDetector() as running:
        yield running


def open_session(engine: sa.Engine) -> Session:
    session = Session(engine)
    session.execute(SELECT_1)
    return session


# Sessions.


def test_open_session_is_reported_with_its_origin_line(
    engine: sa.Engine, detector: txguard.LeakDetector
) -> None:
    """A session left in a transaction is reported as a session opened at the user's line."""
    session = Session(engine)
    line = this_line() + 1
    session.execute(SELECT_1)
    try:
        [leak] = detector.open_resources()
        assert leak.kind == "session"
        assert (leak.origin.filename, leak.origin.lineno) == (__file__, line)
        assert leak.location.endswith(f"test_leaks.py:{line}")
        assert leak.age_s >= 0
        assert leak.resource is session
    finally:
        session.close()


def test_session_and_its_connection_are_one_leak(
    engine: sa.Engine, detector: txguard.LeakDetector
) -> None:
    """The connection a session holds is folded into the session's report, not listed twice."""
    session = open_session(engine)
    try:
        [leak] = detector.open_resources()
        assert leak.kind == "session"
        assert leak.holds_connection
        assert "holds a connection" in str(leak)
    finally:
        session.close()


def test_session_closed_later_is_no_longer_reported(
    engine: sa.Engine, detector: txguard.LeakDetector
) -> None:
    """Closing a session that was reported removes it, and its connection, from the report."""
    session = open_session(engine)
    assert len(detector.open_resources()) == 1
    session.close()
    assert detector.open_resources() == []
    detector.check()


def test_session_committed_later_is_no_longer_reported(
    engine: sa.Engine, detector: txguard.LeakDetector
) -> None:
    """A session whose transaction ended (commit) holds nothing and is not a leak, even unclosed."""
    session = open_session(engine)
    session.commit()
    try:
        assert detector.open_resources() == []
    finally:
        session.close()


def test_session_never_used_is_not_a_leak(engine: sa.Engine, detector: txguard.LeakDetector) -> None:
    """A session created and never used holds no transaction and is not reported."""
    session = Session(engine)
    assert detector.open_resources() == []
    detector.check()
    session.close()


def test_session_with_pending_objects_is_open_without_a_connection(
    engine: sa.Engine, detector: txguard.LeakDetector
) -> None:
    """add() autobegins a transaction: the session counts as open though it holds no connection."""
    session = Session(engine)
    session.add(Item(name="a"))
    try:
        [leak] = detector.open_resources()
        assert leak.kind == "session"
        assert not leak.holds_connection
        assert "holds no connection" in str(leak)
    finally:
        session.close()


def test_failed_session_is_open_until_rolled_back(
    engine: sa.Engine, detector: txguard.LeakDetector
) -> None:
    """A session whose statement failed still holds its transaction and connection until closed."""
    session = Session(engine)
    with pytest.raises(sa.exc.DBAPIError):
        session.execute(sa.text("SELECT * FROM txg_no_such_table"))
    assert [leak.kind for leak in detector.open_resources()] == ["session"]
    session.rollback()
    assert detector.open_resources() == []
    session.close()


def test_session_subclass_from_a_sessionmaker_is_tracked(
    engine: sa.Engine, detector: txguard.LeakDetector
) -> None:
    """Sessions of user subclasses made by a sessionmaker are tracked like any other."""

    class MySession(Session):
        pass

    session = sessionmaker(engine, class_=MySession)()
    session.execute(SELECT_1)
    try:
        [leak] = detector.open_resources()
        assert leak.description == "a MySession"
    finally:
        session.close()


def test_unit_of_work_leaves_nothing_open(engine: sa.Engine, detector: txguard.LeakDetector) -> None:
    """Sessions of txguard units are closed at the end of their block: no leak."""
    txguard.configure(engine)
    with txguard.unit_of_work() as session:
        session.add(Item(name="a"))
        assert [leak.kind for leak in detector.open_resources()] == ["session"]
    with txguard.unit_of_work(mode="commit_as_you_go") as session:
        session.execute(SELECT_1)
        session.commit()
    detector.check()


def test_session_opened_in_another_thread_is_reported(
    engine: sa.Engine, detector: txguard.LeakDetector
) -> None:
    """Class-level events see sessions opened anywhere, including other threads."""
    sessions: list[Session] = []
    thread = threading.Thread(target=lambda: sessions.append(open_session(engine)))
    thread.start()
    thread.join()
    try:
        [leak] = detector.open_resources()
        assert leak.resource is sessions[0]
    finally:
        sessions[0].close()


# Connections.


def test_open_connection_is_reported_with_its_origin_line(
    engine: sa.Engine, detector: txguard.LeakDetector
) -> None:
    """A Connection never closed is reported as a pooled connection checked out at the user's line."""
    line = this_line() + 1
    conn = engine.connect()
    try:
        [leak] = detector.open_resources()
        assert leak.kind == "connection"
        assert (leak.origin.filename, leak.origin.lineno) == (__file__, line)
        assert f"pooled {engine.dialect.name} connection" in str(leak)
        assert "never returned to the pool" in str(leak)
    finally:
        conn.close()


def test_closed_connection_is_not_reported(engine: sa.Engine, detector: txguard.LeakDetector) -> None:
    """A connection closed (here by its `with` block) is not a leak."""
    with engine.connect() as conn:
        conn.execute(SELECT_1)
    with engine.begin() as conn:
        conn.execute(SELECT_1)
    assert detector.open_resources() == []


def test_raw_pool_connection_is_tracked(engine: sa.Engine, detector: txguard.LeakDetector) -> None:
    """Connections taken from the pool directly (raw_connection()) are tracked too."""
    raw = engine.raw_connection()
    try:
        assert [leak.kind for leak in detector.open_resources()] == ["connection"]
    finally:
        raw.close()
    assert detector.open_resources() == []


@pytest.mark.txguard_allow_leaks
def test_connection_dropped_unclosed_is_reported_as_collected(
    engine: sa.Engine, detector: txguard.LeakDetector
) -> None:
    """A connection garbage-collected while checked out stays in the report, marked collected."""
    conn = engine.connect()
    line = this_line() - 1
    conn.execute(SELECT_1)
    del conn
    gc.collect()
    assert detector.open_resources() == []
    [leak] = detector.leaks()
    assert leak.collected
    assert leak.origin.lineno == line
    assert "garbage-collected while still checked out" in str(leak)
    with pytest.raises(txguard.LeakError):
        detector.check()


@pytest.mark.txguard_allow_leaks
def test_session_dropped_unclosed_reports_its_collected_connection(
    engine: sa.Engine, detector: txguard.LeakDetector
) -> None:
    """A session lost in a transaction is found through its connection after garbage collection."""
    line = this_line() + 1
    open_session(engine)
    gc.collect()
    [leak] = detector.leaks()
    assert (leak.kind, leak.collected) == ("connection", True)
    assert [lineno for _, lineno in leak.origin.frames][:2] == [open_session.__code__.co_firstlineno + 2, line]


# The detector itself.


def test_check_raises_leak_error_listing_the_leaks(
    engine: sa.Engine, detector: txguard.LeakDetector
) -> None:
    """check() raises LeakError whose .leaks are the open resources and whose message says where and how to fix."""
    session = open_session(engine)
    conn = engine.connect()
    line = this_line() - 1
    try:
        with pytest.raises(txguard.LeakError) as info:
            detector.check()
        assert [leak.kind for leak in info.value.leaks] == ["session", "connection"]
        message = str(info.value)
        assert message.startswith("2 sessions or connections were opened while the leak detector ran")
        assert f"test_leaks.py:{line}" in message
        assert "with Session(engine) as session:" in message
    finally:
        session.close()
        conn.close()
    detector.check()


def test_resources_opened_before_start_are_not_reported(engine: sa.Engine) -> None:
    """A detector reports only what was opened while it ran."""
    session = open_session(engine)
    try:
        with txguard.LeakDetector() as detector:
            assert detector.open_resources() == []
    finally:
        session.close()


def test_resources_opened_after_stop_are_not_reported(engine: sa.Engine) -> None:
    """After stop() nothing new is tracked, and what was opened meanwhile is still reported while open."""
    with txguard.LeakDetector() as detector:
        during = engine.connect()
    after = engine.connect()
    try:
        assert [leak.resource for leak in detector.open_resources()] == [
            during._dbapi_connection  # type: ignore[attr-defined]
        ]
        during.close()
        assert detector.open_resources() == []
    finally:
        during.close()
        after.close()


def test_detector_never_started_reports_nothing(engine: sa.Engine) -> None:
    """A detector that never ran has nothing to report and check() passes."""
    detector = txguard.LeakDetector()
    assert not detector.running
    assert detector.leaks() == []
    detector.check()


def test_start_twice_keeps_the_first_window(engine: sa.Engine) -> None:
    """start() on a running detector does nothing: its window still begins at the first start()."""
    detector = txguard.LeakDetector().start()
    try:
        conn = engine.connect()
        assert detector.start() is detector
        assert detector.running
        assert len(detector.open_resources()) == 1
        conn.close()
    finally:
        detector.stop()
    assert not detector.running


def test_nested_detectors_report_their_own_windows(engine: sa.Engine) -> None:
    """An inner detector sees only what was opened while it ran; the outer sees both."""
    with txguard.LeakDetector() as outer:
        first = engine.connect()
        with txguard.LeakDetector() as inner:
            second = engine.connect()
        assert len(outer.open_resources()) == 2
        assert len(inner.open_resources()) == 1
    first.close()
    second.close()


def test_listeners_stay_only_while_a_detector_runs() -> None:
    """The listeners stay while any detector runs, and go once the last one stops."""
    others = bool(_leaks.tracker.running)  # e.g. this suite run with --txguard-leaks
    with txguard.LeakDetector():
        with txguard.LeakDetector():
            pass
        assert event.contains(Session, "after_transaction_create", _leaks._on_transaction)
    assert event.contains(Session, "after_transaction_create", _leaks._on_transaction) is others
    assert event.contains(Pool, "checkout", _leaks._on_checkout) is others
    assert event.contains(Pool, "checkin", _leaks._on_returned) is others


def test_tracking_does_not_keep_a_session_alive(
    engine: sa.Engine, detector: txguard.LeakDetector
) -> None:
    """A tracked session is freed like any other once the user drops it."""
    session = Session(engine)
    session.add(Item(name="a"))
    ref = weakref.ref(session)
    del session
    gc.collect()
    assert ref() is None
    assert detector.leaks() == []


def test_tracking_does_not_keep_a_connection_alive(
    engine: sa.Engine, detector: txguard.LeakDetector
) -> None:
    """A tracked Connection (and its pool connection) is freed once closed and dropped."""
    conn = engine.connect()
    refs = [weakref.ref(conn), weakref.ref(conn._dbapi_connection)]  # type: ignore[attr-defined]
    conn.close()
    del conn
    gc.collect()
    assert [ref() for ref in refs] == [None, None]


def test_capture_stack_records_a_few_callers(sqlite_engine: sa.Engine) -> None:
    """With capture_stack=True the origin lists the user's callers, innermost first."""
    with txguard.LeakDetector(capture_stack=True) as detector:
        line = this_line() + 1
        session = open_session(sqlite_engine)
    try:
        [leak] = detector.open_resources()
        linenos = [lineno for _, lineno in leak.origin.frames]
        assert linenos[:2] == [open_session.__code__.co_firstlineno + 2, line]
        assert "test_capture_stack_records_a_few_callers()" in leak.origin.format_stack()
    finally:
        session.close()


def open_at_depth(engine: sa.Engine, depth: int) -> Session:
    if depth:
        return open_at_depth(engine, depth - 1)
    session = Session(engine)
    session.execute(SELECT_1)
    return session


def test_origin_is_found_again_on_each_call_path(sqlite_engine: sa.Engine) -> None:
    """Openings reached through different call depths each get their own innermost line and callers."""
    execute_line = open_at_depth.__code__.co_firstlineno + 4
    recurse_line = open_at_depth.__code__.co_firstlineno + 2
    with txguard.LeakDetector() as detector:
        sessions = [open_at_depth(sqlite_engine, depth) for depth in (0, 3, 0, 1, 3)]
    try:
        stacks = [[lineno for _, lineno in leak.origin.frames] for leak in detector.open_resources()]
        assert [stack[:1 + depth] for stack, depth in zip(stacks, (0, 3, 0, 1, 3))] == [
            [execute_line] + [recurse_line] * depth for depth in (0, 3, 0, 1, 3)
        ]
    finally:
        for session in sessions:
            session.close()


def test_capture_stack_false_records_only_the_line(sqlite_engine: sa.Engine) -> None:
    """With capture_stack=False the origin is the single innermost user line."""
    with txguard.LeakDetector(capture_stack=False) as detector:
        session = open_session(sqlite_engine)
    try:
        [leak] = detector.open_resources()
        assert len(leak.origin.frames) == 1
        assert str(leak) == leak.summary()
    finally:
        session.close()


# Async.


async def test_async_session_left_open_is_reported(async_db: AsyncDatabase) -> None:
    """An AsyncSession left in a transaction is reported as such, at the user's line."""
    from sqlalchemy.ext.asyncio import AsyncSession

    with txguard.LeakDetector() as detector:
        session = AsyncSession(async_db.engine)
        line = this_line() + 1
        await session.execute(SELECT_1)
    try:
        [leak] = detector.open_resources()
        assert leak.description == "an AsyncSession"
        assert leak.holds_connection
        assert (leak.origin.filename, leak.origin.lineno) == (__file__, line)
    finally:
        await session.close()
    assert detector.open_resources() == []


async def test_async_connection_left_open_is_reported(async_db: AsyncDatabase) -> None:
    """An AsyncConnection never closed is reported as a pooled connection at the user's line."""
    with txguard.LeakDetector() as detector:
        line = this_line() + 1
        conn = await async_db.engine.connect()
    try:
        [leak] = detector.open_resources()
        assert leak.kind == "connection"
        assert leak.origin.lineno == line
    finally:
        await conn.close()
    assert detector.open_resources() == []
