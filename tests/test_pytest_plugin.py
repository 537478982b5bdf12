"""The pytest plugin, driven through real inner pytest runs (pytester) on small test files."""

from __future__ import annotations

import pytest

import txguard

# Every inner run gets this conftest: a file-based SQLite engine, and a `keep` fixture that
# holds resources past the test and closes them once the run is over (after the checks).
CONFTEST = """
import os

import pytest
import sqlalchemy as sa
from sqlalchemy.orm import Session

ENGINE = sa.create_engine("sqlite:///" + os.path.join(os.path.dirname(__file__), "db.sqlite"))
KEPT = []


@pytest.fixture(scope="session")
def engine():
    return ENGINE


@pytest.fixture
def keep():
    return KEPT.append


def pytest_sessionfinish(session):
    for resource in KEPT:
        resource.close()
    KEPT.clear()
    ENGINE.dispose()
"""

LEAKY = """
import sqlalchemy as sa
from sqlalchemy.orm import Session


def test_clean(engine):
    with Session(engine) as session, session.begin():
        session.execute(sa.text("SELECT 1"))


def test_leaks_a_session(engine, keep):
    session = Session(engine)
    session.execute(sa.text("SELECT 1"))  # line 12 once pytester strips the first newline
    keep(session)
"""


@pytest.fixture
def inner(pytester: pytest.Pytester) -> pytest.Pytester:
    """Prepare an inner run's directory with the shared conftest and an ini."""
    pytester.makeconftest(CONFTEST)
    pytester.makeini("[pytest]\nasyncio_default_fixture_loop_scope = function\n")
    return pytester


def with_ini(pytester: pytest.Pytester, **options: str) -> None:
    lines = "".join(f"{key} = {value}\n" for key, value in options.items())
    pytester.makeini(f"[pytest]\nasyncio_default_fixture_loop_scope = function\n{lines}")


# Off by default.


def test_plugin_is_off_by_default(inner: pytest.Pytester) -> None:
    """Without options or ini keys a leaking test passes and txguard reports nothing."""
    inner.makepyfile(test_leaky=LEAKY)
    result = inner.runpytest()
    result.assert_outcomes(passed=2, warnings=0)
    assert "txguard:" not in result.stdout.str()


# --txguard-leaks=fail.


def test_clean_test_passes(inner: pytest.Pytester) -> None:
    """A test that closes what it opens passes with the check on."""
    inner.makepyfile(
        """
        import sqlalchemy as sa
        from sqlalchemy.orm import Session

        def test_clean(engine):
            with Session(engine) as session, session.begin():
                session.execute(sa.text("SELECT 1"))
            with engine.connect() as conn:
                conn.execute(sa.text("SELECT 1"))
        """
    )
    inner.runpytest("--txguard-leaks=fail").assert_outcomes(passed=1)


def test_leaking_session_fails_naming_the_test_and_origin_line(inner: pytest.Pytester) -> None:
    """A test that leaves a session open errors at teardown with the test id and the opening file:line."""
    inner.makepyfile(test_leaky=LEAKY)
    result = inner.runpytest("--txguard-leaks=fail")
    result.assert_outcomes(passed=2, errors=1)
    result.stdout.fnmatch_lines(
        [
            "*ERROR at teardown of test_leaks_a_session*",
            "txguard: test_leaky.py::test_leaks_a_session left 1 session or connection open after its teardown:",
            "  - a Session opened at test_leaky.py:12 in test_leaks_a_session() *, still in a transaction that holds a connection",
            "*mark the test @pytest.mark.txguard_allow_leaks*",
        ]
    )
    assert "test_clean" not in result.stdout.str().split("short test summary")[0].split("ERRORS")[1]


def test_leaking_connection_fails_naming_its_origin_line(inner: pytest.Pytester) -> None:
    """A Connection never closed is reported as a pooled connection checked out at its line."""
    inner.makepyfile(
        test_conn="""
        def test_leaks_a_connection(engine, keep):
            keep(engine.connect())
        """
    )
    result = inner.runpytest("--txguard-leaks=fail")
    result.assert_outcomes(passed=1, errors=1)
    result.stdout.fnmatch_lines(
        ["*a pooled sqlite connection checked out at test_conn.py:2 in test_leaks_a_connection()*"]
    )


@pytest.mark.txguard_allow_leaks  # the inner run leaks in this process, on purpose
def test_session_dropped_unclosed_is_reported_as_collected(inner: pytest.Pytester) -> None:
    """A session lost while open is still caught after the garbage collector returned its connection."""
    inner.makepyfile(
        test_dropped="""
        import gc
        import sqlalchemy as sa
        from sqlalchemy.orm import Session

        def test_drops_a_session(engine):
            Session(engine).execute(sa.text("SELECT 1"))
            gc.collect()
        """
    )
    result = inner.runpytest("--txguard-leaks=fail")
    result.assert_outcomes(passed=1, errors=1)
    result.stdout.fnmatch_lines(
        ["*checked out at test_dropped.py:6 in test_drops_a_session()*garbage-collected*"]
    )


def test_async_test_leaking_an_async_session_names_its_line(inner: pytest.Pytester) -> None:
    """An AsyncSession left open by an async test is reported at the line that opened it."""
    inner.makepyfile(
        test_async="""
        import pytest
        import sqlalchemy as sa
        from sqlalchemy.ext.asyncio import AsyncSession, create_async_engine

        LEFT = []

        @pytest.mark.asyncio
        async def test_leaks_an_async_session(engine):
            session = AsyncSession(create_async_engine(engine.url.set(drivername="sqlite+aiosqlite")))
            await session.execute(sa.text("SELECT 1"))
            LEFT.append(session)

        @pytest.mark.asyncio
        @pytest.mark.txguard_allow_leaks
        async def test_cleans_up():
            await LEFT[0].close()
            await LEFT[0].bind.dispose()
        """
    )
    result = inner.runpytest("--txguard-leaks=fail")
    result.assert_outcomes(passed=2, errors=1)
    result.stdout.fnmatch_lines(
        ["*an AsyncSession opened at test_async.py:10 in test_leaks_an_async_session()*"]
    )


def test_leak_opened_in_a_function_fixture_is_the_tests(inner: pytest.Pytester) -> None:
    """A function-scoped fixture is part of its test: what it leaves open fails the test."""
    inner.makepyfile(
        test_fixture="""
        import pytest
        from sqlalchemy.orm import Session

        @pytest.fixture
        def session(engine, keep):
            session = Session(engine)
            session.connection()
            keep(session)
            return session

        def test_uses_it(session):
            pass
        """
    )
    result = inner.runpytest("--txguard-leaks=fail")
    result.assert_outcomes(passed=1, errors=1)
    result.stdout.fnmatch_lines(["*test_fixture.py::test_uses_it left 1*", "*test_fixture.py:7 in session()*"])


def test_function_fixture_that_closes_at_teardown_is_clean(inner: pytest.Pytester) -> None:
    """Resources closed by a fixture's teardown count as closed: the check runs after teardown."""
    inner.makepyfile(
        """
        import pytest
        from sqlalchemy.orm import Session

        @pytest.fixture
        def session(engine):
            session = Session(engine)
            session.connection()
            yield session
            session.close()

        def test_uses_it(session):
            pass
        """
    )
    inner.runpytest("--txguard-leaks=fail").assert_outcomes(passed=1)


def test_allow_leaks_marker_silences_the_check(inner: pytest.Pytester) -> None:
    """@pytest.mark.txguard_allow_leaks lets a test leave resources open."""
    inner.makepyfile(
        """
        import pytest

        @pytest.mark.txguard_allow_leaks
        def test_hands_a_connection_over(engine, keep):
            keep(engine.connect())
        """
    )
    inner.runpytest("--txguard-leaks=fail", "--strict-markers").assert_outcomes(passed=1)


def test_module_scoped_fixture_session_is_not_blamed(inner: pytest.Pytester) -> None:
    """A module-scoped fixture's session may stay open across tests, even when tests begin its transactions."""
    inner.makepyfile(
        """
        import pytest
        import sqlalchemy as sa
        from sqlalchemy.orm import Session

        @pytest.fixture(scope="module")
        def shared(engine):
            session = Session(engine)
            yield session
            session.close()

        @pytest.fixture(scope="module")
        def busy(engine):
            session = Session(engine)
            session.execute(sa.text("SELECT 1"))
            yield session
            session.close()

        def test_first(shared, busy):
            shared.execute(sa.text("SELECT 1"))

        def test_second(shared, busy):
            shared.commit()
            shared.execute(sa.text("SELECT 2"))
            busy.execute(sa.text("SELECT 3"))
        """
    )
    inner.runpytest("--txguard-leaks=fail").assert_outcomes(passed=2)


def test_sessions_a_module_fixture_returns_in_a_dict_are_its_own(inner: pytest.Pytester) -> None:
    """Sessions and connections inside a tuple or dict that a wider-scoped fixture returns are the fixture's."""
    inner.makepyfile(
        """
        import pytest
        import sqlalchemy as sa
        from sqlalchemy.orm import Session

        @pytest.fixture(scope="module")
        def db(engine):
            resources = {"session": Session(engine), "pair": (Session(engine), 1)}
            yield resources
            resources["session"].close()
            resources["pair"][0].close()

        def test_uses_them(db):
            db["session"].execute(sa.text("SELECT 1"))
            db["pair"][0].execute(sa.text("SELECT 1"))

        def test_still_has_them(db):
            assert db["session"].in_transaction()
        """
    )
    inner.runpytest("--txguard-leaks=fail").assert_outcomes(passed=2)


def test_module_scoped_async_session_fixture_is_not_blamed(inner: pytest.Pytester) -> None:
    """An AsyncSession from a module-scoped async fixture may stay in a transaction across tests."""
    inner.makepyfile(
        """
        import pytest
        import pytest_asyncio
        import sqlalchemy as sa
        from sqlalchemy.ext.asyncio import AsyncSession, create_async_engine

        @pytest_asyncio.fixture(scope="module", loop_scope="module")
        async def session(engine):
            session = AsyncSession(create_async_engine(engine.url.set(drivername="sqlite+aiosqlite")))
            yield session
            await session.close()
            await session.bind.dispose()

        @pytest.mark.asyncio(loop_scope="module")
        async def test_first(session):
            await session.execute(sa.text("SELECT 1"))

        @pytest.mark.asyncio(loop_scope="module")
        async def test_second(session):
            await session.execute(sa.text("SELECT 2"))
        """
    )
    inner.runpytest("--txguard-leaks=fail").assert_outcomes(passed=2)


def test_session_scoped_fixture_connection_is_not_blamed(inner: pytest.Pytester) -> None:
    """A session-scoped fixture's open Connection is not a leak of the test that first used it."""
    inner.makepyfile(
        """
        import pytest
        import sqlalchemy as sa

        @pytest.fixture(scope="session")
        def conn(engine):
            with engine.connect() as conn:
                yield conn

        def test_first(conn):
            conn.execute(sa.text("SELECT 1"))

        def test_second(conn):
            conn.execute(sa.text("SELECT 2"))
        """
    )
    inner.runpytest("--txguard-leaks=fail").assert_outcomes(passed=2)


def test_a_leak_is_blamed_only_on_the_test_that_opened_it(inner: pytest.Pytester) -> None:
    """A resource left open by one test is not reported again by the next ones."""
    inner.makepyfile(
        """
        def test_leaks(engine, keep):
            keep(engine.connect())

        def test_after():
            pass
        """
    )
    result = inner.runpytest("--txguard-leaks=fail")
    result.assert_outcomes(passed=2, errors=1)
    result.stdout.fnmatch_lines(["*ERROR at teardown of test_leaks*"])
    assert "teardown of test_after" not in result.stdout.str()


# --txguard-leaks=warn, ini keys, options and marker.


def test_warn_mode_warns_and_passes(inner: pytest.Pytester) -> None:
    """In warn mode a leak is a LeakedSessionWarning at the opening line, and the test passes."""
    inner.makepyfile(test_leaky=LEAKY)
    result = inner.runpytest_subprocess("--txguard-leaks=warn")
    result.assert_outcomes(passed=2, warnings=1)
    result.stdout.fnmatch_lines(
        [
            "test_leaky.py::test_leaks_a_session",
            "*test_leaky.py:12: LeakedSessionWarning: test_leaky.py::test_leaks_a_session left a Session opened at test_leaky.py:12*",
        ]
    )


def test_warn_mode_respects_a_filter_that_turns_it_into_an_error(inner: pytest.Pytester) -> None:
    """A user's filterwarnings entry for txguard's warnings still decides what a leak warning does."""
    inner.makepyfile(test_leaky=LEAKY)
    with_ini(inner, txguard_leaks="warn", filterwarnings="error::txguard.LeakedSessionWarning")
    result = inner.runpytest()
    result.assert_outcomes(passed=2, errors=1)
    result.stdout.fnmatch_lines(["*LeakedSessionWarning: test_leaky.py::test_leaks_a_session left*"])


def test_ini_key_enables_the_check(inner: pytest.Pytester) -> None:
    """txguard_leaks = fail in the ini file turns the check on."""
    inner.makepyfile(test_leaky=LEAKY)
    with_ini(inner, txguard_leaks="fail")
    inner.runpytest().assert_outcomes(passed=2, errors=1)


def test_command_line_overrides_the_ini(inner: pytest.Pytester) -> None:
    """--txguard-leaks=off wins over txguard_leaks = fail in the ini file."""
    inner.makepyfile(test_leaky=LEAKY)
    with_ini(inner, txguard_leaks="fail")
    inner.runpytest("--txguard-leaks=off").assert_outcomes(passed=2)


def test_invalid_ini_value_is_a_usage_error(inner: pytest.Pytester) -> None:
    """An unknown txguard_leaks value stops the run with a message listing the valid ones."""
    inner.makepyfile(test_leaky=LEAKY)
    with_ini(inner, txguard_leaks="loud")
    result = inner.runpytest()
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*txguard_leaks = 'loud' in the ini file is not valid; use one of: off, warn, fail.*"])


def test_invalid_option_value_is_refused(inner: pytest.Pytester) -> None:
    """An unknown --txguard-mixed-begin value is refused by the option parser."""
    result = inner.runpytest("--txguard-mixed-begin=loud")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*--txguard-mixed-begin*invalid choice*"])


def test_options_and_ini_keys_are_in_a_txguard_group(inner: pytest.Pytester) -> None:
    """--help lists the options under a txguard group, and the ini keys."""
    result = inner.runpytest("--help")
    result.stdout.fnmatch_lines(
        [
            "txguard (transaction discipline for SQLAlchemy):",
            "*--txguard-leaks={off,warn,fail}*",
            "*--txguard-mixed-begin={off,warn,error}*",
        ]
    )
    result.stdout.fnmatch_lines(["*txguard_leaks (string):*", "*txguard_mixed_begin (string):*"])


def test_marker_is_registered_with_its_documentation(inner: pytest.Pytester) -> None:
    """`pytest --markers` documents txguard_allow_leaks, so --strict-markers accepts it."""
    result = inner.runpytest("--markers")
    result.stdout.fnmatch_lines(["@pytest.mark.txguard_allow_leaks: let this test leave*"])


# Fixtures.


def test_txguard_leak_detector_fixture_reports_what_the_test_left_open(inner: pytest.Pytester) -> None:
    """The fixture is a detector running for the test; check() names the open session."""
    inner.makepyfile(
        test_detects="""
        import pytest
        import sqlalchemy as sa
        from sqlalchemy.orm import Session

        import txguard

        def test_detects(engine, txguard_leak_detector):
            session = Session(engine)
            session.execute(sa.text("SELECT 1"))
            with pytest.raises(txguard.LeakError, match="test_detects.py:9"):
                txguard_leak_detector.check()
            session.close()
            txguard_leak_detector.check()
        """
    )
    inner.runpytest().assert_outcomes(passed=1)


ROLLBACK_CONFTEST_EXTRA = """

import txguard
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


class Base(DeclarativeBase):
    pass


class Row(Base):
    __tablename__ = "rows"
    id: Mapped[int] = mapped_column(primary_key=True)


Base.metadata.create_all(ENGINE)


@pytest.fixture(scope="session", autouse=True)
def configured():
    txguard.configure(ENGINE)
"""


def test_txguard_rollback_fixture_rolls_back_each_test(inner: pytest.Pytester) -> None:
    """Each test's commits are rolled back at its end: two tests insert the same key, and nothing stays."""
    inner.makeconftest(CONFTEST + ROLLBACK_CONFTEST_EXTRA)
    inner.makepyfile(
        """
        import sqlalchemy as sa
        import txguard
        from conftest import Row

        def count(conn):
            return conn.scalar(sa.select(sa.func.count()).select_from(Row))

        def test_first(txguard_rollback):
            with txguard.unit_of_work() as session:
                session.add(Row(id=1))
            assert count(txguard_rollback) == 1

        def test_second(txguard_rollback):
            with txguard.unit_of_work(mode="commit_as_you_go") as session:
                session.add(Row(id=1))
                session.commit()
            assert count(txguard_rollback) == 1

        def test_nothing_stayed(engine):
            with engine.connect() as conn:
                assert count(conn) == 0
        """
    )
    inner.runpytest("--txguard-leaks=fail").assert_outcomes(passed=3)


def test_txguard_bind_can_be_overridden_with_an_engine(inner: pytest.Pytester) -> None:
    """Overriding txguard_bind to return an Engine is enough for txguard_rollback."""
    inner.makepyfile(
        """
        import pytest
        import sqlalchemy as sa
        from sqlalchemy.orm import Session

        @pytest.fixture
        def txguard_bind(engine):
            return engine

        def test_uses_it(txguard_rollback):
            assert txguard_rollback.in_transaction()
            assert txguard_rollback.engine.url.database.endswith("db.sqlite")
        """
    )
    inner.runpytest().assert_outcomes(passed=1)


def test_txguard_rollback_without_configuration_explains_the_fix(inner: pytest.Pytester) -> None:
    """With no default registry and no txguard_bind override the fixture errors saying what to do."""
    inner.makepyfile(
        """
        def test_needs_a_database(txguard_rollback):
            pass
        """
    )
    result = inner.runpytest()
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(["*call txguard.configure(engine)*override the `txguard_bind` fixture*"])


# --txguard-mixed-begin.

MIXED = """
import pytest
import sqlalchemy as sa
from sqlalchemy.exc import InvalidRequestError
from sqlalchemy.orm import Session

import txguard


def test_begin_inside_an_autobegun_transaction(engine):
    with Session(engine) as session:
        session.execute(sa.text("SELECT 1"))
        with pytest.raises(InvalidRequestError) as info:
            session.begin()
        print("raised", type(info.value).__name__)
"""


def guards_available() -> bool:
    """Say whether txguard.install() is implemented yet (it lands with the guards issue)."""
    try:
        txguard.install(mixed_begin="off", leaks="off", cross_thread="off", cross_task="off")
    except NotImplementedError:
        return False
    txguard.uninstall()
    return True


needs_guards = pytest.mark.skipif(
    "not guards_available()", reason="txguard.install() is not implemented yet"
)


def test_mixed_begin_is_off_by_default(inner: pytest.Pytester) -> None:
    """Without the option SQLAlchemy's own InvalidRequestError is raised, not txguard's."""
    inner.makepyfile(test_mixed=MIXED)
    result = inner.runpytest("-s")
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines(["*raised InvalidRequestError*"])


@needs_guards
def test_mixed_begin_error_mode_raises_mixed_begin_error(inner: pytest.Pytester) -> None:
    """--txguard-mixed-begin=error installs the guard: begin() on an active transaction raises MixedBeginError."""
    inner.makepyfile(test_mixed=MIXED)
    result = inner.runpytest("-s", "--txguard-mixed-begin=error")
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines(["*raised MixedBeginError*"])


@needs_guards
def test_mixed_begin_warn_mode_from_the_ini_warns(inner: pytest.Pytester) -> None:
    """txguard_mixed_begin = warn in the ini emits MixedBeginWarning and SQLAlchemy raises as usual."""
    inner.makepyfile(test_mixed=MIXED)
    with_ini(inner, txguard_mixed_begin="warn")
    result = inner.runpytest_subprocess("-s")
    result.assert_outcomes(passed=1, warnings=1)
    result.stdout.fnmatch_lines(["*raised InvalidRequestError*", "*MixedBeginWarning*"])


@needs_guards
def test_mixed_begin_guard_is_uninstalled_after_the_run(inner: pytest.Pytester) -> None:
    """The guard installed for an inner run is gone once that run ends."""
    inner.makepyfile(test_mixed=MIXED)
    inner.runpytest("--txguard-mixed-begin=error").assert_outcomes(passed=1)
    inner.runpytest("-s").stdout.fnmatch_lines(["*raised InvalidRequestError*"])


@pytest.mark.parametrize(
    ("setting", "allowed"),
    [("txguard_leaks=FAIL", "off, warn, fail"), ("txguard_mixed_begin=Error", "off, warn, error")],
)
def test_ini_values_are_as_strict_as_the_command_line(
    inner: pytest.Pytester, setting: str, allowed: str
) -> None:
    """-o txguard_leaks=FAIL is refused as --txguard-leaks=FAIL is: the levels are lower-case words."""
    inner.makepyfile(test_leaky=LEAKY)
    result = inner.runpytest("-o", setting)
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    name, value = setting.split("=")
    result.stderr.fnmatch_lines([f"*{name} = '{value}' * not valid; use one of: {allowed}.*"])


# The leak report under pytest-xdist.


def test_leak_stack_under_xdist_shows_only_the_users_frames(inner: pytest.Pytester) -> None:
    """Under pytest-xdist a leak's stack lists the test's frames, not xdist's or execnet's."""
    inner.makepyfile(
        test_xdist="""
        import sqlalchemy as sa
        from sqlalchemy.orm import Session

        def open_one(engine):
            session = Session(engine)
            session.execute(sa.text("SELECT 1"))
            return session

        def test_leaks(engine, keep):
            keep(open_one(engine))
        """
    )
    result = inner.runpytest("-p", "xdist", "-n", "1", "--txguard-leaks=fail")
    result.assert_outcomes(passed=1, errors=1)
    result.stdout.fnmatch_lines(
        [
            "  - a Session opened at test_xdist.py:6 in open_one() *",
            "    (the Session was created at test_xdist.py:5 in open_one())",
            "    test_xdist.py:6 in open_one()",
            "    test_xdist.py:10 in test_leaks()",
            "Close each one where it is opened*",
        ],
        consecutive=True,
    )
    assert "execnet" not in result.stdout.str()


# StaticPool, the usual in-memory SQLite test engine.


def test_connection_left_open_on_a_static_pool_fails_the_test(inner: pytest.Pytester) -> None:
    """A connection left open on a StaticPool is caught although others were opened and closed."""
    inner.makepyfile(
        test_static="""
        import sqlalchemy as sa

        ENGINE = sa.create_engine("sqlite://", poolclass=sa.pool.StaticPool)

        def test_leaks(keep):
            keep(ENGINE.connect())
            with ENGINE.connect() as conn:
                conn.execute(sa.text("SELECT 1"))
        """
    )
    result = inner.runpytest("--txguard-leaks=fail")
    result.assert_outcomes(passed=1, errors=1)
    result.stdout.fnmatch_lines(
        ["  - a pooled sqlite connection checked out at test_static.py:6 in test_leaks() *"]
    )


# Listeners cleared by another test (SQLAlchemy's own test fixtures do).


def test_leak_check_survives_a_test_that_clears_listeners(inner: pytest.Pytester) -> None:
    """After a test clears SQLAlchemy's class-level listeners, the next test's leak is caught."""
    inner.makepyfile(
        test_cleared="""
        import sqlalchemy as sa
        from sqlalchemy.orm import Session
        from sqlalchemy.orm.events import SessionEvents
        from sqlalchemy.pool.events import PoolEvents

        def test_clears_listeners():
            SessionEvents._clear()
            PoolEvents._clear()

        def test_leaks_a_session(engine, keep):
            session = Session(engine)
            session.execute(sa.text("SELECT 1"))
            keep(session)
        """
    )
    result = inner.runpytest_subprocess("--txguard-leaks=fail")  # clearing is process-wide
    result.assert_outcomes(passed=2, errors=1)
    result.stdout.fnmatch_lines(["  - a Session opened at test_cleared.py:12 in test_leaks_a_session() *"])


# The plugin's guards compose with the application's own txguard.install().

APP_CONFTEST = CONFTEST + """
import txguard

txguard.install(cross_task="error")  # the application's own guards
"""

APP_TESTS = """
import asyncio

import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncSession, create_async_engine
from sqlalchemy.orm import Session

import txguard


@pytest.mark.asyncio
async def test_cross_task_misuse_still_raises(engine):
    async_engine = create_async_engine(engine.url.set(drivername="sqlite+aiosqlite"))
    try:
        async with AsyncSession(async_engine) as session:
            await session.execute(sa.text("SELECT 1"))

            async def meddle():
                await session.execute(sa.text("SELECT 2"))

            child = asyncio.create_task(meddle())
            while not child.done():  # the owner is still inside its transaction
                await asyncio.sleep(0.01)
            assert isinstance(child.exception(), txguard.CrossTaskWarning)
    finally:
        await async_engine.dispose()


def test_mixed_begin_raises_too(engine):
    with Session(engine) as session:
        session.execute(sa.text("SELECT 1"))
        with pytest.raises(txguard.MixedBeginError):
            session.begin()
"""


def test_plugin_guards_compose_with_the_applications_install(inner: pytest.Pytester) -> None:
    """-o txguard_mixed_begin=error adds its guard to the app's install(); the app's is back after."""
    # Imported here, before the inner run: pytester drops the modules an inner run imports,
    # and the app's guards, installed by the inner run, outlive it.
    from txguard import _guard_records, _guards

    inner.makeconftest(APP_CONFTEST)
    inner.makepyfile(test_app=APP_TESTS)
    try:
        result = inner.runpytest("-o", "txguard_mixed_begin=error")
        result.assert_outcomes(passed=2)
        assert repr(_guard_records.settings) == repr(
            _guard_records.Settings("warn", "warn", "warn", "error", None)
        )
    finally:
        _guards.uninstall()


def test_applications_later_install_keeps_the_plugins_guard(inner: pytest.Pytester) -> None:
    """An install() the app makes during the run (a session fixture) keeps the plugin's level."""
    from txguard import _guard_records

    inner.makeconftest(
        CONFTEST
        + """
import txguard


@pytest.fixture(scope="session", autouse=True)
def guards():
    txguard.install(cross_task="error")
    yield
    txguard.uninstall()
"""
    )
    inner.makepyfile(test_app=APP_TESTS)
    try:
        result = inner.runpytest("-o", "txguard_mixed_begin=error")
        result.assert_outcomes(passed=2)
        assert _guard_records.settings is None
    finally:
        txguard.uninstall()
