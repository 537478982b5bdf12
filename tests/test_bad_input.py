"""Every option of the public API refuses wrong types and values with a ConfigurationError
that names the option and the values it allows; every allowed value is accepted."""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.orm import Session, sessionmaker

import txguard


def _pending(call: Callable[[], object]) -> bool:
    try:
        call()
    except NotImplementedError:
        return True
    return False


GUARDS_PENDING = _pending(txguard.uninstall)
needs_guards = pytest.mark.skipif(
    GUARDS_PENDING, reason="txguard.install() is still a placeholder (SPEC section 6, issue 3)"
)

ENGINE = sa.create_engine("sqlite://")
MODES = ("'begin_once'", "'commit_as_you_go'")
PROPAGATIONS = tuple(repr(p.value) for p in txguard.Propagation)
LEVELS = ("'READ UNCOMMITTED'", "'READ COMMITTED'", "'REPEATABLE READ'", "'SERIALIZABLE'")
FLAG = ("True", "False")
EXCEPTIONS = ("exception class",)
REGISTRY = ("txguard.SessionRegistry", "None")
RETRIES = ("whole number >= 0",)
RETRY_ON = ("exception class", "predicate")
BACKOFF = ("number >= 0", "function taking the attempt number")
GUARD_LEVELS = ("'off'", "'warn'", "'error'")
SECONDS = ("seconds", "None")

# option -> (values it must refuse, words the message must contain)
UNIT_OPTIONS: dict[str, tuple[list[Any], tuple[str, ...]]] = {
    "mode": (["begin-once", "BEGIN_ONCE", "", None, 1, txguard.Propagation.REQUIRED], MODES),
    "propagation": (
        ["REQUIRED", "require", "", None, 0, True, txguard.Mode.BEGIN_ONCE],
        PROPAGATIONS,
    ),
    "read_only": ([1, 0, "yes", None, "False"], FLAG),
    "isolation_level": (["SNAPSHOT", "AUTOCOMMIT", "", 5, b"SERIALIZABLE", True], LEVELS),
    "rollback_for": (
        [ValueError("x"), "ValueError", int, (ValueError, 3), None, [KeyError, "x"]],
        EXCEPTIONS,
    ),
    "no_rollback_for": ([KeyError("x"), "KeyError", object, (3,), None], EXCEPTIONS),
    "durable": ([1, "true", None], FLAG),
    "registry": (["default", ENGINE, sessionmaker(ENGINE), 0], REGISTRY),
}
RETRY_OPTIONS: dict[str, tuple[list[Any], tuple[str, ...]]] = {
    "retries": ([-1, 1.5, "3", True, None, math.inf, 2.0], RETRIES),
    "retry_on": ([5, "OperationalError", (ValueError, "x"), int, [3], True], RETRY_ON[:1]),
    "backoff": ([-0.1, math.nan, math.inf, -math.inf, True, "0.1", None, [0.1]], BACKOFF),
}
CONNECT_OPTIONS: dict[str, tuple[list[Any], tuple[str, ...]]] = {
    "mode": (["nested", "BEGIN_ONCE", None, 1], MODES),
    "isolation_level": (["SNAPSHOT", "AUTOCOMMIT", 5], LEVELS),
    "registry": (["default", ENGINE, 1], REGISTRY),
}
INSTALL_OPTIONS: dict[str, tuple[list[Any], tuple[str, ...]]] = {
    **{
        name: (["warning", "ERROR", "", True, None, 1], GUARD_LEVELS)
        for name in ("mixed_begin", "leaks", "cross_thread", "cross_task")
    },
    "long_transaction": ([-1, "10", True, math.nan, math.inf, [1]], SECONDS),
}


def _cases(table: dict[str, tuple[list[Any], tuple[str, ...]]]) -> list[Any]:
    return [
        pytest.param(option, value, words, id=f"{option}={value!r}")
        for option, (values, words) in table.items()
        for value in values
    ]


def _check(call: Callable[[], object], option: str, words: tuple[str, ...]) -> None:
    with pytest.raises(txguard.ConfigurationError) as info:
        call()
    message = str(info.value)
    assert f"{option}=" in message
    for word in words:
        assert word in message


@pytest.mark.parametrize(("option", "value", "words"), _cases(UNIT_OPTIONS))
def test_unit_of_work_refuses_bad_option(option: str, value: Any, words: tuple[str, ...]) -> None:
    """unit_of_work() refuses a wrong option at the call, naming the allowed values."""
    txguard.unit_of_work()  # a valid call first: nothing it caches may let a wrong one through
    _check(lambda: txguard.unit_of_work(**{option: value}), option, words)


@pytest.mark.parametrize(("option", "value", "words"), _cases(UNIT_OPTIONS))
def test_registry_unit_of_work_refuses_bad_option(
    option: str, value: Any, words: tuple[str, ...]
) -> None:
    """SessionRegistry.unit_of_work(...) checks its options like the module-level one."""
    registry = txguard.SessionRegistry(ENGINE)
    registry.unit_of_work()  # a valid call first: its cached defaults must not leak through
    if option == "registry":
        with pytest.raises(txguard.ConfigurationError, match="unknown option.*'registry'"):
            registry.unit_of_work(registry=value)
        return
    _check(lambda: registry.unit_of_work(**{option: value}), option, words)


@pytest.mark.parametrize("option", ["retries", "retry_on", "backoff", "timeout", "modes"])
def test_registry_unit_of_work_names_the_options_of_a_unit(option: str) -> None:
    """An option that is not a unit's (a typo, or one of @transactional's) is named, with the list."""
    registry = txguard.SessionRegistry(ENGINE)
    with pytest.raises(txguard.ConfigurationError) as info:
        registry.unit_of_work(**{option: 1})
    message = str(info.value)
    assert repr(option) in message
    for name in ("mode", "propagation", "read_only", "isolation_level", "durable"):
        assert name in message
    assert "retries= belongs on @transactional" in message


@pytest.mark.parametrize(("option", "value", "words"), _cases({**UNIT_OPTIONS, **RETRY_OPTIONS}))
def test_transactional_refuses_bad_option(option: str, value: Any, words: tuple[str, ...]) -> None:
    """@transactional(...) refuses a wrong option when it decorates, naming the allowed values."""
    _check(lambda: txguard.transactional(**{option: value}), option, words)


@pytest.mark.parametrize(("option", "value", "words"), _cases({**UNIT_OPTIONS, **RETRY_OPTIONS}))
def test_registry_transactional_refuses_bad_option(
    option: str, value: Any, words: tuple[str, ...]
) -> None:
    """SessionRegistry.transactional(...) checks its options like the module-level one."""
    if option == "registry":
        pytest.skip("the method passes its own registry")
    registry = txguard.SessionRegistry(ENGINE)
    _check(lambda: registry.transactional(**{option: value}), option, words)


@pytest.mark.parametrize(("option", "value", "words"), _cases(CONNECT_OPTIONS))
def test_connect_refuses_bad_option(option: str, value: Any, words: tuple[str, ...]) -> None:
    """connect() refuses a wrong option before it opens a connection, naming the allowed values."""
    _check(lambda: txguard.connect(ENGINE, **{option: value}), option, words)


@pytest.mark.parametrize(
    "engine", ["sqlite://", Session(), sessionmaker(ENGINE), 5], ids=lambda e: type(e).__name__
)
def test_connect_refuses_what_is_not_an_engine(engine: Any) -> None:
    """connect() needs an Engine or an AsyncEngine and says so."""
    with pytest.raises(txguard.ConfigurationError, match="Engine or AsyncEngine"):
        txguard.connect(engine)


@needs_guards
@pytest.mark.parametrize(("option", "value", "words"), _cases(INSTALL_OPTIONS))
def test_install_refuses_bad_option(option: str, value: Any, words: tuple[str, ...]) -> None:
    """install() refuses a wrong level or threshold, naming the allowed values, and installs nothing."""
    try:
        _check(lambda: txguard.install(**{option: value}), option, words)
    finally:
        txguard.uninstall()


@pytest.mark.parametrize("bind", ["sqlite://", None, Session(), 3], ids=lambda b: type(b).__name__)
def test_registry_refuses_what_is_not_a_bind(bind: Any) -> None:
    """SessionRegistry() takes an Engine, sessionmaker, AsyncEngine or async_sessionmaker only."""
    with pytest.raises(txguard.ConfigurationError, match="Engine, a sessionmaker"):
        txguard.SessionRegistry(bind)


@pytest.mark.parametrize("fn", [3, "create_user", object()], ids=["int", "str", "object"])
def test_transactional_refuses_what_is_not_a_function(fn: Any) -> None:
    """@transactional on something that is not callable says where it belongs."""
    with pytest.raises(txguard.ConfigurationError, match="needs a function"):
        txguard.transactional(fn)
    with pytest.raises(txguard.ConfigurationError, match="needs a function"):
        txguard.transactional(retries=1)(fn)


GOOD_VALUES: dict[str, list[Any]] = {
    "mode": [*txguard.Mode, *(m.value for m in txguard.Mode)],
    "propagation": [*txguard.Propagation, *(p.value for p in txguard.Propagation)],
    "read_only": [True, False],
    "isolation_level": [None, "SERIALIZABLE", "read committed", "repeatable_read"],
    "rollback_for": [ValueError, (ValueError, KeyError), [LookupError], ()],
    "no_rollback_for": [KeyError, (KeyError,), []],
    "durable": [True, False],
    "registry": [None, txguard.SessionRegistry(ENGINE)],
    "retries": [0, 1, 100],
    "retry_on": [None, KeyError, (KeyError, ValueError), [KeyError], lambda exc: False],
    "backoff": [0, 0.05, 3, lambda attempt: 0.1],
}


def _id(value: Any) -> str:
    """A test id that is the same in every process (pytest-xdist workers compare them)."""
    return "<function>" if inspect.isfunction(value) else repr(value)


@pytest.mark.parametrize(
    ("option", "value"),
    [
        pytest.param(option, value, id=f"{option}={_id(value)}")
        for option, values in GOOD_VALUES.items()
        for value in values
    ],
)
def test_transactional_accepts_every_allowed_value(option: str, value: Any) -> None:
    """Enum members, their lower-case values and the documented forms are all accepted."""
    txguard.transactional(**{option: value})
    if option not in ("retries", "retry_on", "backoff"):
        txguard.unit_of_work(**{option: value})


def test_commit_as_you_go_cannot_be_nested() -> None:
    """mode='commit_as_you_go' with propagation='nested' is refused: a savepoint has one owner."""
    with pytest.raises(txguard.ConfigurationError, match="mode='begin_once'"):
        txguard.unit_of_work(mode="commit_as_you_go", propagation="nested")


# Confusing or silent input (issue 13, section 5): each is refused with the fix, up front.


NOT_REGISTRIES = ["default", ENGINE, sessionmaker(ENGINE), 0]
REGISTRY_CALLS: dict[str, Callable[[Any], object]] = {
    "on_commit": lambda r: txguard.on_commit(lambda: None, registry=r),
    "on_rollback": lambda r: txguard.on_rollback(lambda: None, registry=r),
    "current_session": lambda r: txguard.current_session(registry=r),
    "in_transaction": lambda r: txguard.in_transaction(registry=r),
    "rollback_after": lambda r: _rollback_after()(ENGINE, registry=r),
    "rollback_after without bind": lambda r: _rollback_after()(registry=r),
}


def _rollback_after() -> Callable[..., object]:
    from txguard.testing import rollback_after

    return rollback_after


@pytest.mark.parametrize("value", NOT_REGISTRIES, ids=lambda v: type(v).__name__)
@pytest.mark.parametrize("call", REGISTRY_CALLS)
def test_functions_taking_registry_refuse_what_is_not_one(call: str, value: Any) -> None:
    """Every function with registry= refuses a wrong one by name, not with an AttributeError."""
    txguard.configure(ENGINE)
    _check(lambda: REGISTRY_CALLS[call](value), "registry", REGISTRY)


def test_transactional_names_a_partial_of_a_generator_function() -> None:
    """@transactional on a functools.partial of a generator function refuses it by its name."""
    import functools

    def rows(limit: int) -> Any:
        yield from range(limit)

    with pytest.raises(txguard.ConfigurationError, match="generator function .*rows"):
        txguard.transactional(functools.partial(rows, 3))


def test_transactional_refuses_a_class() -> None:
    """@transactional on a class is refused: its unit would end when the object is built."""

    class Service:
        pass

    with pytest.raises(txguard.ConfigurationError, match="class .*Service.*methods"):
        txguard.transactional(Service)


async def test_transactional_runs_an_async_callable_object_in_an_async_unit(
    async_db: Any,
) -> None:
    """An object whose __call__ is async def is wrapped as a coroutine function: it commits after it."""
    import inspect

    from tests.models import Item

    registry = txguard.SessionRegistry(async_db.engine)

    class AddItem:
        async def __call__(self, name: str) -> str:
            txguard.current_session(registry).add(Item(name=name))
            return name

    add_item = registry.transactional(AddItem())
    assert inspect.iscoroutinefunction(add_item)
    assert await add_item("ada") == "ada"
    with async_db.sync.connect() as conn:
        assert conn.execute(sa.select(Item.name)).scalars().all() == ["ada"]


def _returns_a_coroutine(registry: txguard.SessionRegistry, **options: Any) -> Callable[[], Any]:
    from tests.models import Item

    async def later() -> None:
        pass

    @registry.transactional(**options)
    def work() -> Any:
        txguard.current_session(registry).add(Item(name="written"))
        return later()

    return work


@pytest.mark.parametrize("options", [{}, {"rollback_for": KeyError}, {"no_rollback_for": ValueError}])
def test_plain_function_returning_a_coroutine_is_rolled_back(
    engine: sa.Engine, options: dict[str, Any]
) -> None:
    """A sync @transactional function that returns a coroutine rolls back and raises, whatever its rules."""
    from tests.models import Item

    registry = txguard.SessionRegistry(engine)
    with pytest.raises(txguard.ConfigurationError, match="returned a coroutine.*async def"):
        _returns_a_coroutine(registry, **options)()
    with engine.connect() as conn:
        assert conn.execute(sa.select(Item.name)).all() == []


def test_plain_function_returning_a_coroutine_dooms_the_unit_it_joined(engine: sa.Engine) -> None:
    """Caught by its caller, the refused coroutine still rolls back the transaction it joined."""
    from tests.models import Item

    registry = txguard.SessionRegistry(engine)
    work = _returns_a_coroutine(registry)
    with pytest.raises(txguard.UnexpectedRollbackError), registry.unit_of_work():
        try:
            work()
        except txguard.ConfigurationError:
            pass
    with engine.connect() as conn:
        assert conn.execute(sa.select(Item.name)).all() == []


@pytest.mark.parametrize("value", ["no", 1, None, 0.0])
def test_leak_detector_refuses_a_capture_stack_that_is_not_a_bool(value: Any) -> None:
    """LeakDetector(capture_stack=...) takes True or False: "no" would read as true."""
    _check(lambda: txguard.LeakDetector(capture_stack=value), "capture_stack", FLAG)


@pytest.mark.parametrize("backoff", [1e308, 86400.5, 10**400], ids=["1e308", "a day and a bit", "10**400"])
def test_transactional_refuses_a_backoff_too_long_to_sleep(backoff: Any) -> None:
    """A base backoff above a day is refused when decorating, not by time.sleep at the first retry."""
    _check(lambda: txguard.transactional(retries=1, backoff=backoff), "backoff", BACKOFF)


def test_transactional_accepts_a_backoff_of_a_day() -> None:
    """The longest base backoff, a day, is accepted."""
    txguard.transactional(retries=1, backoff=86400)


class TenantSession(Session):
    def __init__(self, *args: Any, tenant: str = "", **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.tenant = tenant


SESSION_BINDS: dict[str, Callable[..., txguard.SessionRegistry]] = {
    "engine": lambda **kw: txguard.SessionRegistry(ENGINE, **kw),
    "sessionmaker": lambda **kw: txguard.SessionRegistry(sessionmaker(ENGINE, **kw)),
    "configure": lambda **kw: txguard.configure(ENGINE, **kw),
    "subclass": lambda **kw: txguard.SessionRegistry(
        sessionmaker(ENGINE, class_=TenantSession), **kw
    ),
    "async engine": lambda **kw: txguard.SessionRegistry(_async_engine(), **kw),
}


def _async_engine() -> Any:
    from sqlalchemy.ext.asyncio import create_async_engine

    return create_async_engine("sqlite+aiosqlite://")


@pytest.mark.parametrize("bind", SESSION_BINDS)
def test_registry_refuses_an_unknown_session_option(bind: str) -> None:
    """A mistyped session option fails when the registry is built, listing the valid ones."""
    with pytest.raises(txguard.ConfigurationError) as info:
        SESSION_BINDS[bind](expire_on_comit=False)
    message = str(info.value)
    assert "'expire_on_comit'" in message
    for name in ("expire_on_commit", "autoflush", "join_transaction_mode", "info"):
        assert name in message


@pytest.mark.parametrize("bind", SESSION_BINDS)
def test_registry_accepts_the_session_options(bind: str) -> None:
    """Every option the session class takes (its own, and its bases') is accepted."""
    extra = {"tenant": "acme"} if bind == "subclass" else {}
    registry = SESSION_BINDS[bind](expire_on_commit=False, autoflush=False, info={}, **extra)
    assert isinstance(registry, txguard.SessionRegistry)
