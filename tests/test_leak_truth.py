"""The leak guard and the leak detector tell the truth: no false leak, no missed leak, no trace."""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import subprocess
import sys
import textwrap
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import pytest
import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.orm import Session

import txguard
import txguard._registry  # noqa: F401  (conftest's reset reaches for it; txguard loads lazily)
from tests.conftest import AsyncDatabase
from tests.helpers import names, this_line
from tests.models import Item

SELECT_1 = sa.text("SELECT 1")


@pytest.fixture(autouse=True)
def _uninstall() -> Iterator[None]:
    yield
    txguard.uninstall()


@contextmanager
def findings() -> Iterator[list[str]]:
    """Collect what txguard reports in the block, then after a garbage collection.

    Warnings are recorded, and errors raised in finalizers (leaks at "error") too.
    """
    seen: list[str] = []
    gc.collect()  # earlier tests' garbage is not this block's
    previous = sys.unraisablehook
    sys.unraisablehook = lambda args: seen.append(
        f"{type(args.exc_value).__name__}: {args.exc_value}"
    )
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yield seen
            gc.collect()
    finally:
        sys.unraisablehook = previous
    seen.extend(
        f"{w.category.__name__}: {w.message}"
        for w in caught
        if issubclass(w.category, txguard.TxGuardWarning)
    )


def where(line: int, function: str) -> str:
    """Name a line of this file as txguard's messages do."""
    code = sys._getframe(1).f_code
    return txguard._origin.describe_location(code.co_filename, line, function)


@contextmanager
def interrupting_next_reset(target: object, interrupt: Callable[[], None]) -> Iterator[None]:
    """Call ``interrupt`` when the next connection goes back to ``target``'s pool (once).

    The pool logs the interruption with its traceback; the log is switched off meanwhile, as
    pytest's log capture would keep that traceback, and every object in it, to the test's end.
    """
    calls: list[None] = []

    def reset(dbapi_connection: object, record: object, state: object) -> None:
        if not calls:
            calls.append(None)
            interrupt()

    event.listen(target, "reset", reset)
    logging.disable(logging.ERROR)
    try:
        yield
    finally:
        logging.disable(logging.NOTSET)
        event.remove(target, "reset", reset)
    assert calls, "the interruption did not happen"


def raise_(exc: BaseException) -> Callable[[], None]:
    def interrupt() -> None:
        raise exc

    return interrupt


# 1. An interrupted return of the connection after a successful COMMIT.


def commit_interrupted(session: Session, exc: BaseException) -> None:
    """Commit ``session`` while the return of its connection raises ``exc``; drop ``exc``."""
    with interrupting_next_reset(session.get_bind(), raise_(exc)):
        try:
            session.commit()
        except type(exc):
            pass


def test_commit_whose_connection_return_is_interrupted_is_no_leak(engine: sa.Engine) -> None:
    """A Session committed and interrupted while handing back its connection was no leak."""
    txguard.install(leaks="error")
    with findings() as reported:
        session = Session(engine)
        session.add(Item(name="kept"))
        commit_interrupted(session, KeyboardInterrupt())
        del session
    assert reported == []
    assert names(engine) == ["kept"]


def test_next_transaction_after_an_interrupted_return_is_no_leak(engine: sa.Engine) -> None:
    """The same live Session beginning its next transaction reports nothing either."""
    txguard.install(leaks="error")
    with findings() as reported, Session(engine) as session:
        session.add(Item(name="kept"))
        commit_interrupted(session, KeyboardInterrupt())
        assert session.scalars(sa.select(Item.name)).all() == ["kept"]
        gc.collect()
    assert reported == []


async def test_async_commit_cancelled_while_returning_its_connection_is_no_leak(
    async_db: AsyncDatabase,
) -> None:
    """An AsyncSession whose task is cancelled while it returns its connection was no leak."""
    from sqlalchemy.ext.asyncio import AsyncSession

    txguard.install(leaks="error")

    async def commit() -> None:
        session = AsyncSession(async_db.engine)
        session.add(Item(name="kept"))
        await session.flush()
        task = asyncio.current_task()
        assert task is not None
        # The reset's ROLLBACK is the next await after the COMMIT: the task is cancelled there.
        with interrupting_next_reset(async_db.engine.sync_engine, task.cancel):
            await session.commit()

    with findings() as reported:
        child = asyncio.create_task(commit())
        await asyncio.wait([child])
        assert child.cancelled()
        del child
    assert reported == []
    assert names(async_db.sync) == ["kept"]


# 2. Every guard "off", then installed again.


def test_session_closed_while_every_guard_was_off_is_no_leak(engine: sa.Engine) -> None:
    """A Session closed while install() had every guard off is not reported after a re-install."""
    with findings() as reported:
        txguard.install(leaks="warn")
        session = Session(engine)
        session.execute(SELECT_1)
        txguard.install(mixed_begin="off", leaks="off", cross_thread="off", cross_task="off")
        session.close()
        txguard.install(leaks="warn")
        del session
    assert reported == []


# 3. Messages that say what leaked.


def test_leaked_raw_connection_is_named_raw_and_told_to_close(engine: sa.Engine) -> None:
    """A raw pool checkout collected unreturned is reported as one, with close() as the fix."""
    txguard.install(leaks="warn")
    with findings() as reported:
        engine.raw_connection().cursor().close()
    [message] = reported
    assert message.startswith(
        "LeakedConnectionWarning: A raw DBAPI connection checked out of the pool at "
    )
    assert "(engine.raw_connection() or pool.connect())" in message
    assert "finally: raw.close()" in message
    assert "engine.connect()" not in message
    assert engine.pool.checkedout() == 0


def test_leaked_pool_checkout_is_named_raw(engine: sa.Engine) -> None:
    """A connection taken from the pool itself (pool.connect()) is a raw checkout too."""
    txguard.install(leaks="warn")
    with findings() as reported:
        engine.pool.connect()
    [message] = reported
    assert "A raw DBAPI connection checked out of the pool at " in message


def test_leaked_session_on_a_callers_connection_does_not_claim_a_pooled_connection(
    engine: sa.Engine,
) -> None:
    """A Session bound to a caller's Connection is not said to have had a pooled connection."""
    txguard.install(leaks="warn")
    with engine.connect() as conn:
        with findings() as reported:
            Session(bind=conn).execute(SELECT_1)
        conn.rollback()
    [message] = reported
    assert "LeakedSessionWarning" in message
    assert "pooled connection" not in message
    assert "It worked on a Connection it was given (Session(bind=conn))" in message


def test_leaked_session_without_a_statement_says_it_held_no_connection(engine: sa.Engine) -> None:
    """A Session dropped with only pending objects is said to have held no connection yet."""
    txguard.install(leaks="warn")
    with findings() as reported:
        Session(engine).add(Item(name="lost"))
    [message] = reported
    assert "it held no connection yet" in message
    assert "pooled connection" not in message


def make_session(engine: sa.Engine) -> tuple[Session, int]:
    """Create a Session the way a factory does; return it and the line that created it."""
    return Session(engine), this_line()


def test_leaked_session_names_where_it_was_created_and_where_its_transaction_began(
    engine: sa.Engine,
) -> None:
    """The leak guard's report says where the Session was created and where its transaction
    began."""
    txguard.install(leaks="warn")
    with findings() as reported:
        session, created = make_session(engine)
        began = this_line() + 1
        session.execute(SELECT_1)
        del session
    [message] = reported
    assert f"A Session created at {where(created, 'make_session')} was garbage-collected" in message
    test = "test_leaked_session_names_where_it_was_created_and_where_its_transaction_began"
    assert f"autobegun at {where(began, test)}" in message


def test_detector_names_where_a_session_was_created(engine: sa.Engine) -> None:
    """A detector's session leak says where the Session was created, apart from its transaction."""
    with txguard.LeakDetector() as detector:
        session, created = make_session(engine)
        session.execute(SELECT_1)
        try:
            [leak] = detector.open_resources()
            assert leak.created is not None
            assert (leak.created.filename, leak.created.lineno) == (__file__, created)
            assert f"(the Session was created at {where(created, 'make_session')})" in str(leak)
        finally:
            session.close()


def test_session_created_and_begun_on_one_line_is_named_once(engine: sa.Engine) -> None:
    """A Session whose transaction began where it was created gets no second location."""
    with txguard.LeakDetector() as detector:
        session = Session(engine); session.execute(SELECT_1)  # noqa: E702
        try:
            [leak] = detector.open_resources()
            assert leak.created is None
            assert "created at" not in str(leak)
        finally:
            session.close()


# 4. StaticPool: one DBAPI connection, handed to every checkout.


@pytest.fixture
def static_engine() -> Iterator[sa.Engine]:
    """Yield the usual in-memory SQLite test engine: one connection for everyone."""
    engine = sa.create_engine("sqlite://", poolclass=sa.pool.StaticPool)
    yield engine
    engine.dispose()


def test_detector_sees_a_connection_left_open_on_a_static_pool(static_engine: sa.Engine) -> None:
    """A Connection left open stays a leak after another one was opened and closed."""
    with txguard.LeakDetector() as detector:
        left = static_engine.connect()
        with static_engine.connect() as other:
            other.execute(SELECT_1)
        try:
            [leak] = detector.open_resources()
            assert leak.kind == "connection"
            assert leak.resource is left.connection
        finally:
            left.close()
    assert detector.open_resources() == []


def test_detector_forgets_closed_connections_on_a_static_pool(static_engine: sa.Engine) -> None:
    """Connections closed on a static pool, in any order, are not leaks."""
    with txguard.LeakDetector() as detector:
        first = static_engine.connect()
        second = static_engine.connect()
        first.close()
        second.close()
        with Session(static_engine) as session:
            session.execute(SELECT_1)
    assert detector.leaks() == []


# 5. The long_transaction sweep in a forked child, and after it died.


def long_transaction_warned(engine: sa.Engine, hold: float = 2.0) -> bool:
    """Hold a transaction open up to ``hold`` seconds; say whether the sweep warned about it."""
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        with Session(engine) as session:
            session.execute(SELECT_1)
            deadline = time.monotonic() + hold
            while time.monotonic() < deadline:
                if any(issubclass(w.category, txguard.LongTransactionWarning) for w in record):
                    return True
                time.sleep(0.01)
    return False


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork()")
def test_long_transaction_sweep_runs_in_a_forked_child() -> None:
    """A prefork worker (os.fork() after install()) still gets LongTransactionWarning."""
    txguard.install(long_transaction=0.05)
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report through the pipe, never return into pytest
        code = 1
        try:
            engine = sa.create_engine("sqlite://")
            os.write(write, b"warned" if long_transaction_warned(engine) else b"silent")
            code = 0
        finally:
            os._exit(code)
    os.close(write)
    with os.fdopen(read, "rb") as pipe:
        answer = pipe.read()
    _, status = os.waitpid(pid, 0)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0
    assert answer == b"warned"


def test_install_again_restarts_a_dead_sweep(
    engine: sa.Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """install() with the same threshold starts a new sweep if the old one has died."""
    txguard.install(long_transaction=0.05)

    def exit_thread(args: object) -> None:
        raise SystemExit  # a hook that ends the thread it is called in

    monkeypatch.setattr(threading, "excepthook", exit_thread)
    with warnings.catch_warnings():
        warnings.simplefilter("error", txguard.LongTransactionWarning)  # the sweep's warning raises
        with Session(engine) as session:
            session.execute(SELECT_1)
            sweeper = txguard._guards._sweeper
            assert sweeper is not None
            sweeper.join(timeout=5)
            assert not sweeper.is_alive()
    monkeypatch.undo()
    txguard.install(long_transaction=0.05)
    assert long_transaction_warned(engine)


# 6. Listeners that something else cleared (SQLAlchemy's own test fixtures do). Clearing
# them drops every class-level listener of the process, so each case runs in a fresh one.

CLEAR_LISTENERS = """
import gc, sys, warnings
import sqlalchemy as sa
from sqlalchemy.orm import Session
from sqlalchemy.orm.events import SessionEvents
from sqlalchemy.pool.events import PoolEvents
import txguard

engine = sa.create_engine(sys.argv[1])


def clear_class_level_listeners():
    SessionEvents._clear()
    PoolEvents._clear()


def leak():
    session = Session(engine)
    session.execute(sa.text("SELECT 1"))
    return session, engine.connect()
"""


def run_isolated(script: str, engine: sa.Engine) -> str:
    """Run ``script`` (after CLEAR_LISTENERS) in a new interpreter on ``engine``'s database."""
    url = engine.url.render_as_string(hide_password=False)
    done = subprocess.run(
        [sys.executable, "-c", CLEAR_LISTENERS + textwrap.dedent(script), url],
        capture_output=True, text=True, timeout=60, check=False,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def test_install_reattaches_listeners_that_were_cleared(engine: sa.Engine) -> None:
    """install() after the listeners were cleared attaches them again: leaks are reported."""
    out = run_isolated(
        """
        txguard.install(leaks="warn")
        clear_class_level_listeners()
        txguard.install(leaks="warn")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            leak()
            gc.collect()
        print(*sorted(w.category.__name__ for w in caught))
        """,
        engine,
    )
    assert out == "LeakedConnectionWarning LeakedSessionWarning"


def test_new_detector_reattaches_listeners_that_were_cleared(engine: sa.Engine) -> None:
    """A detector started after the listeners were cleared under a running one still sees leaks."""
    out = run_isolated(
        """
        with txguard.LeakDetector():
            clear_class_level_listeners()
            with txguard.LeakDetector() as detector:
                session, conn = leak()
                print(*[leak.kind for leak in detector.open_resources()])
                session.close()
                conn.close()
        """,
        engine,
    )
    assert out == "session connection"


def test_install_wraps_session_init_again_after_the_original_was_put_back(
    engine: sa.Engine,
) -> None:
    """install() puts back its Session.__init__ wrapper if something restored the original."""
    txguard.install(leaks="warn")
    setattr(Session, "__init__", Session.__init__.__wrapped__)  # noqa: B010
    txguard.install(leaks="warn")
    with findings() as reported:
        session, created = make_session(engine)
        session.execute(SELECT_1)
        del session
    [message] = reported
    assert f"A Session created at {where(created, 'make_session')} was garbage-collected" in message


# 7. No trace in what the application can see.


def test_pooled_connection_info_holds_only_the_applications_keys(engine: sa.Engine) -> None:
    """With every guard on, a pooled connection's .info holds what the application put there."""
    txguard.install(
        mixed_begin="error", leaks="error", cross_thread="error", cross_task="error",
        long_transaction=60,
    )
    with engine.connect() as conn:
        conn.info["foo"] = "bar"
        conn.execute(SELECT_1)
        with conn.begin_nested():
            assert conn.info == {"foo": "bar"}
        conn.commit()
        assert conn.info == {"foo": "bar"}
        conn.info.clear()
    with engine.connect() as conn:
        assert conn.info == {}


def test_no_trace_in_info_survives_uninstall_with_leaks_off(engine: sa.Engine) -> None:
    """With leaks="off" a begin leaves nothing in .info, before or after uninstall()."""
    txguard.install(leaks="off", long_transaction=60)
    with engine.connect() as conn:
        with conn.begin():
            conn.execute(SELECT_1)
        txguard.uninstall()
        assert conn.info == {}
        assert conn.connection.info == {}


def test_commit_as_you_go_session_info_stays_the_applications(engine: sa.Engine) -> None:
    """A commit-as-you-go unit tracks its uncommitted changes without writing to session.info."""
    txguard.configure(engine)
    with pytest.warns(txguard.UncommittedWorkWarning, match="first made at"):
        with txguard.unit_of_work(mode="commit_as_you_go") as session:
            session.add(Item(name="lost"))
            session.flush()
            assert session.info == {}
    assert names(engine) == []
