"""txguard's pytest plugin: a leak check per test, the mixed-begin guard, and fixtures.

Registered through the ``pytest11`` entry point and inert unless asked for:

- ``--txguard-leaks={off,warn,fail}`` (ini ``txguard_leaks``): a test that leaves a
  Session or pooled connection open (opened during its setup, call or teardown, still
  open once its teardown is over) errors at teardown, or warns, naming where each was
  opened. Fixtures of a wider scope than the test (class, module, package, session) may
  hold sessions and connections across tests: what they open while being set up, and
  the sessions or connections they return, are theirs, not the test's.
  ``@pytest.mark.txguard_allow_leaks`` exempts a test.
- ``--txguard-mixed-begin={off,warn,error}`` (ini ``txguard_mixed_begin``): runs the
  session with the mixed-begin guard at least at that level, on top of the guards the
  application installs itself (the stricter level of each guard wins; the application's
  own installation is back as it was after the run).
- Fixtures: ``txguard_leak_detector``, ``txguard_rollback`` and ``txguard_bind``.

The module imports nothing heavy at pytest startup beyond the ``txguard`` package itself;
the detector and the test helpers are imported when first used.
"""

from __future__ import annotations

import sys
import warnings
import weakref
from collections.abc import Generator, Iterator
from typing import TYPE_CHECKING, Any, cast

import pytest

if TYPE_CHECKING:
    from sqlalchemy.engine import Connection

    from ._leaks import Leak, LeakDetector

__all__ = [
    "pytest_addoption",
    "pytest_configure",
    "txguard_bind",
    "txguard_leak_detector",
    "txguard_rollback",
]

LEAK_MODES = ("off", "warn", "fail")
MIXED_BEGIN_MODES = ("off", "warn", "error")
ALLOW_LEAKS = "txguard_allow_leaks"
_WATCH = "txguard-leak-watch"


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("txguard", "txguard (transaction discipline for SQLAlchemy)")
    group.addoption(
        "--txguard-leaks",
        choices=LEAK_MODES,
        default=None,
        dest="txguard_leaks",
        help="Check that each test closes the SQLAlchemy sessions and pooled connections "
        "it opens: 'fail' errors the test at teardown, 'warn' warns, 'off' does nothing. "
        "Default: the txguard_leaks ini value, else off.",
    )
    group.addoption(
        "--txguard-mixed-begin",
        choices=MIXED_BEGIN_MODES,
        default=None,
        dest="txguard_mixed_begin",
        help="Run the tests under txguard.install(mixed_begin=...): begin() on a session "
        "or connection whose transaction is already active warns or raises. Default: the "
        "txguard_mixed_begin ini value, else off.",
    )
    parser.addini(
        "txguard_leaks",
        "txguard leak check per test: off, warn or fail (--txguard-leaks overrides).",
        default="off",
    )
    parser.addini(
        "txguard_mixed_begin",
        "txguard mixed-begin guard: off, warn or error (--txguard-mixed-begin overrides).",
        default="off",
    )


def _setting(config: pytest.Config, name: str, allowed: tuple[str, ...]) -> str:
    value = config.getoption(name)
    if value is not None:
        return str(value)
    raw = config.getini(name)
    text = str(raw).strip() if raw else "off"
    if text not in allowed:  # as strict as the command line's choices=, and install()
        raise pytest.UsageError(
            f"{name} = {raw!r} in the ini file is not valid; use one of: {', '.join(allowed)}."
        )
    return text


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        f"{ALLOW_LEAKS}: let this test leave SQLAlchemy sessions or connections open "
        "(txguard's leak check, --txguard-leaks, skips it).",
    )
    leaks = _setting(config, "txguard_leaks", LEAK_MODES)
    mixed_begin = _setting(config, "txguard_mixed_begin", MIXED_BEGIN_MODES)
    if mixed_begin != "off":
        # On top of the application's own txguard.install(), never instead of it.
        from ._guard_records import Settings
        from ._guards import require

        release = require(Settings(mixed_begin, "off", "off", "off", None))
        config.add_cleanup(release)
    if leaks != "off":
        watch = LeakWatch(leaks)
        config.pluginmanager.register(watch, _WATCH)
        config.add_cleanup(watch.close)


class LeakWatch:
    """Attribute every leak to the test that opened it, and report it after its teardown.

    One detector runs for the whole session; each test is a window of it, from the start
    of its setup to the end of its teardown. Resources opened while a wider-scoped
    fixture is set up, and the sessions or connections such a fixture returns, are owned
    by the fixture: they may stay open across tests.
    """

    def __init__(self, mode: str) -> None:
        from ._leaks import LeakDetector

        self.mode = mode
        self.detector: LeakDetector = LeakDetector(capture_stack=True).start()
        self.owned: weakref.WeakSet[Any] = weakref.WeakSet()
        self.since: int | None = None
        self.exempt: list[tuple[int, int]] = []

    def close(self) -> None:
        self.detector.stop()

    @pytest.hookimpl(wrapper=True, tryfirst=True)
    def pytest_runtest_setup(self, item: pytest.Item) -> Generator[None, None, None]:
        self.detector._listen()  # an earlier test may have cleared SQLAlchemy's listeners
        self.since = self.detector._mark()
        self.exempt = []
        return (yield)

    @pytest.hookimpl(wrapper=True)
    def pytest_fixture_setup(
        self, fixturedef: pytest.FixtureDef[Any], request: pytest.FixtureRequest
    ) -> Generator[None, object, object]:
        if fixturedef.scope == "function":
            return (yield)
        begin = self.detector._mark()
        try:
            result = yield
        finally:
            end = self.detector._mark()
            self.exempt.append((begin, end))
            for leak in self.detector._leaks_since(begin):
                resource = leak.resource
                if leak._seq < end and resource is not None:
                    self.owned.add(resource)
        for resource in _resources_in(result):
            self.owned.add(resource)
        return result

    @pytest.hookimpl(wrapper=True)
    def pytest_runtest_teardown(
        self, item: pytest.Item, nextitem: pytest.Item | None
    ) -> Generator[None, None, None]:
        result = yield
        since, self.since = self.since, None
        if since is not None and item.get_closest_marker(ALLOW_LEAKS) is None:
            leaks = [leak for leak in self.detector._leaks_since(since) if not self._owned(leak)]
            if leaks:
                self._report(item, leaks)
        return result

    def _owned(self, leak: Leak) -> bool:
        if any(begin <= leak._seq < end for begin, end in self.exempt):
            return True
        resource = leak.resource
        return resource is not None and resource in self.owned

    def _report(self, item: pytest.Item, leaks: list[Leak]) -> None:
        __tracebackhide__ = True
        if self.mode == "fail":
            pytest.fail(_failure(item, leaks), pytrace=False)
        _warn(item, leaks)


def _failure(item: pytest.Item, leaks: list[Leak]) -> str:
    from ._leaks import leak_report

    count = len(leaks)
    what = "session or connection" if count == 1 else "sessions or connections"
    return leak_report(
        f"txguard: {item.nodeid} left {count} {what} open after its teardown:",
        leaks,
        "Close each one where it is opened (`with Session(engine) as session:`, "
        "txguard.unit_of_work(), `with engine.connect() as conn:`), close it in the "
        "fixture's teardown, or mark the test @pytest.mark.txguard_allow_leaks if it "
        "hands them over on purpose.",
    )


def _warn(item: pytest.Item, leaks: list[Leak]) -> None:
    from ._errors import LeakedConnectionWarning, LeakedSessionWarning

    categories = (LeakedSessionWarning, LeakedConnectionWarning)
    with warnings.catch_warnings():
        _show_resource_warnings(categories)
        for leak in leaks:
            category = LeakedSessionWarning if leak.kind == "session" else LeakedConnectionWarning
            warnings.warn_explicit(
                f"{item.nodeid} left {leak.summary()}. Close it where it is opened, or "
                "mark the test @pytest.mark.txguard_allow_leaks.",
                category,
                leak.origin.filename,
                leak.origin.lineno,
            )


def _show_resource_warnings(categories: tuple[type[Warning], ...]) -> None:
    """Show our warnings although they are ResourceWarnings, unless a user filter decides.

    Python ends its default filters with ``ignore::ResourceWarning``; our filters go just
    before it, so every filter the user configured still comes first.
    """
    filters = cast("list[Any]", warnings.filters)
    python_default = ("ignore", None, ResourceWarning, None, 0)
    for index in range(len(filters) - 1, -1, -1):
        if tuple(filters[index]) == python_default:
            for ours in categories:
                filters.insert(index, ("default", None, ours, None, 0))
            return


def _resources_in(value: object, depth: int = 0) -> Iterator[Any]:
    """Yield the sessions and pool connections a fixture returned, also in tuples, lists
    and dicts (two levels deep)."""
    from sqlalchemy.engine import Connection
    from sqlalchemy.orm import Session

    if isinstance(value, Session):
        yield value
    elif isinstance(value, Connection):
        fairy = getattr(value, "_dbapi_connection", None)
        if fairy is not None:
            yield fairy
    elif "sqlalchemy.ext.asyncio" in sys.modules and _is_async_resource(value):
        sync = getattr(value, "sync_session", None) or getattr(value, "sync_connection", None)
        if sync is not None:
            yield from _resources_in(sync, depth)
    elif depth < 2 and isinstance(value, (tuple, list)):
        for element in value:
            yield from _resources_in(element, depth + 1)
    elif depth < 2 and isinstance(value, dict):
        for element in value.values():
            yield from _resources_in(element, depth + 1)


def _is_async_resource(value: object) -> bool:
    from sqlalchemy.ext.asyncio import AsyncConnection, AsyncSession

    return isinstance(value, (AsyncSession, AsyncConnection))


@pytest.fixture
def txguard_leak_detector() -> Iterator[LeakDetector]:
    """Yield a LeakDetector running for this test; call ``.check()`` to assert no leaks."""
    from ._leaks import LeakDetector

    with LeakDetector() as detector:
        yield detector


@pytest.fixture
def txguard_bind() -> Any:
    """Return what ``txguard_rollback`` binds: by default the registry set by configure().

    Override it in your conftest.py to return an Engine or a SessionRegistry.
    """
    from . import _registry

    registry = _registry._default
    if registry is None:
        pytest.fail(
            "txguard_rollback needs to know the database: call txguard.configure(engine) "
            "before the test (e.g. in a session-scoped autouse fixture), or override the "
            "`txguard_bind` fixture in your conftest.py to return an Engine or a "
            "txguard.SessionRegistry.",
            pytrace=False,
        )
    return registry


@pytest.fixture
def txguard_rollback(request: pytest.FixtureRequest, txguard_bind: Any) -> Iterator[Any]:
    """Run the test inside one outer transaction that is rolled back at teardown.

    Yields the Connection (an AsyncConnection for an async bind); the registry's units of
    work join it through savepoints. An async bind needs an async test run on asyncio:
    pytest-asyncio's function-scoped loop, or anyio's ``asyncio`` backend.
    """
    from .testing import rollback_after

    block = rollback_after(txguard_bind)
    if not block.is_async:
        with block as connection:
            yield connection
    elif _runs_under_anyio(request):
        yield from _under_anyio(request, block)
    else:
        yield request.getfixturevalue("_txguard_async_rollback")


def _runs_under_anyio(request: pytest.FixtureRequest) -> bool:
    """Say whether anyio, not pytest-asyncio, runs the test; refuse a test both claim.

    pytest-asyncio runs every test it marks ``asyncio`` (in auto mode every async test,
    anyio's included) while anyio runs that test's async fixtures on its own loop, so no
    single loop would hold the block's connection.
    """
    anyio = "anyio_backend" in request.fixturenames
    if request.node.get_closest_marker("asyncio") is None:
        return anyio
    if anyio:
        pytest.fail(
            f"{request.node.nodeid} is marked for both anyio and pytest-asyncio (auto mode "
            "marks every async test), which run it and its async fixtures on different "
            "event loops. Use one: asyncio_mode = strict with @pytest.mark.anyio, or drop "
            "the anyio marker.",
            pytrace=False,
        )
    return False


def _under_anyio(request: pytest.FixtureRequest, block: Any) -> Iterator[Any]:
    """Run the async block on the anyio test runner of the test (as anyio runs async fixtures).

    Done here rather than by an async fixture: pytest-asyncio in auto mode would run such a
    fixture on its own loop.
    """
    from anyio.pytest_plugin import extract_backend_and_options, get_runner

    name, options = extract_backend_and_options(request.getfixturevalue("anyio_backend"))
    if name != "asyncio":
        pytest.fail(
            f"txguard_rollback with an async engine needs anyio_backend 'asyncio' "
            f"(SQLAlchemy's asyncio extension runs on asyncio only), not {name!r}.",
            pytrace=False,
        )

    async def enter_block() -> Any:
        async with block as connection:
            yield connection

    with get_runner(name, options) as runner:
        yield from runner.run_asyncgen_fixture(enter_block, {})


def _async_fixture(fn: Any) -> Any:
    """Declare ``fn`` a pytest-asyncio fixture, so it runs in strict mode too."""
    try:
        import pytest_asyncio
    except ImportError:
        return pytest.fixture(fn)
    return pytest_asyncio.fixture(fn)


@_async_fixture
async def _txguard_async_rollback(txguard_bind: Any) -> Any:
    """The async half of ``txguard_rollback`` under pytest-asyncio, on the test's loop."""
    from .testing import rollback_after

    async with rollback_after(txguard_bind) as connection:
        yield connection
