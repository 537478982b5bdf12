"""@transactional: metadata, methods, options and the shared unit of nested service calls."""

from __future__ import annotations

import asyncio
import inspect

import pytest
import sqlalchemy as sa

import txguard
from tests.helpers import names
from tests.models import Item


@pytest.fixture
def registry(engine: sa.Engine) -> txguard.SessionRegistry:
    return txguard.configure(engine)


@txguard.transactional
def create_item(name: str, *, fail: bool = False) -> int:
    """Create an item."""
    session = txguard.current_session()
    item = Item(name=name)
    session.add(item)
    session.flush()
    if fail:
        raise RuntimeError("create failed")
    return item.id


@txguard.transactional(propagation="requires_new")
def audit(name: str) -> None:
    txguard.current_session().add(Item(name=f"audit:{name}"))


def test_bare_decorator_commits(registry: txguard.SessionRegistry, engine: sa.Engine) -> None:
    """@transactional without arguments runs the call in a begin-once unit."""
    assert isinstance(create_item("a"), int)
    assert names(engine) == ["a"]


def test_failure_rolls_back(registry: txguard.SessionRegistry, engine: sa.Engine) -> None:
    """An exception from the function rolls its unit back and propagates."""
    with pytest.raises(RuntimeError, match="create failed"):
        create_item("a", fail=True)
    assert names(engine) == []


def test_nested_service_calls_share_one_unit(registry: txguard.SessionRegistry, engine: sa.Engine) -> None:
    """Service functions calling each other join the caller's unit: all or nothing."""

    @txguard.transactional
    def place_order() -> None:
        audit("order")  # first: on SQLite a second writer would wait for the outer one
        create_item("order")
        create_item("line", fail=True)

    with pytest.raises(RuntimeError):
        place_order()
    assert names(engine) == ["audit:order"]


def test_metadata_and_signature_are_kept() -> None:
    """The wrapper keeps __name__, __doc__, __wrapped__ and the signature."""
    assert create_item.__name__ == "create_item"
    assert create_item.__doc__ == "Create an item."
    assert create_item.__wrapped__ is not None  # type: ignore[attr-defined]
    assert str(inspect.signature(create_item)) == "(name: 'str', *, fail: 'bool' = False) -> 'int'"


def test_async_functions_stay_coroutine_functions() -> None:
    """Decorating an async def returns a real coroutine function with its signature."""

    @txguard.transactional(retries=2)
    async def transfer(a: int, b: int) -> None:
        return None

    assert inspect.iscoroutinefunction(transfer)
    assert list(inspect.signature(transfer).parameters) == ["a", "b"]


class Service:
    @txguard.transactional
    def method(self, name: str) -> str:
        txguard.current_session().add(Item(name=name))
        return name

    @txguard.transactional
    @staticmethod
    def static(name: str) -> str:
        txguard.current_session().add(Item(name=name))
        return name

    @txguard.transactional(read_only=True)
    @classmethod
    def count(cls) -> int:
        return len(txguard.current_session().scalars(sa.select(Item)).all())


def test_methods_static_and_class_methods(registry: txguard.SessionRegistry, engine: sa.Engine) -> None:
    """Methods, staticmethods and classmethods all run in a unit."""
    service = Service()
    assert service.method("m") == "m"
    assert Service.static("s") == "s"
    assert Service.count() == 2
    assert names(engine) == ["m", "s"]


def test_generator_functions_are_refused() -> None:
    """A generator would run after the unit closed, so decorating one raises."""
    with pytest.raises(txguard.ConfigurationError, match="generator"):

        @txguard.transactional
        def rows():  # type: ignore[no-untyped-def]
            yield 1


def test_non_callables_are_refused() -> None:
    """Decorating something that is not callable raises ConfigurationError."""
    with pytest.raises(txguard.ConfigurationError, match="needs a function"):
        txguard.transactional(42)  # type: ignore[call-overload]


def test_bad_options_fail_at_decoration(registry: txguard.SessionRegistry) -> None:
    """A wrong option fails when the module is imported, naming the allowed values."""
    with pytest.raises(txguard.ConfigurationError, match="'requires_new'"):
        txguard.transactional(propagation="sometimes")


def test_async_function_on_a_sync_registry_is_refused(registry: txguard.SessionRegistry) -> None:
    """An async def bound to a sync registry raises ConfigurationError saying what to do."""

    @txguard.transactional
    async def work() -> None:
        return None

    with pytest.raises(txguard.ConfigurationError, match="AsyncEngine"):
        asyncio.run(work())


def test_registry_method_decorates(engine: sa.Engine) -> None:
    """SessionRegistry.transactional binds the function to that registry."""
    registry = txguard.SessionRegistry(engine)

    @registry.transactional
    def work() -> None:
        registry.current_session().add(Item(name="r"))

    @registry.transactional(propagation="mandatory")
    def must_join() -> None:
        return None

    work()
    with pytest.raises(txguard.TransactionRequiredError):
        must_join()
    assert names(engine) == ["r"]


def test_never_propagation_runs_without_a_unit(registry: txguard.SessionRegistry) -> None:
    """@transactional(propagation='never') calls the function with no unit open."""

    @txguard.transactional(propagation="never")
    def outside() -> bool:
        return txguard.in_transaction()

    assert outside() is False


def test_unknown_options_are_named() -> None:
    """A misspelt option raises ConfigurationError listing the real ones."""
    with pytest.raises(txguard.ConfigurationError, match="'retry'.*retries, retry_on, backoff"):
        txguard.transactional(retry=3)


@pytest.mark.parametrize(
    "options",
    [
        {"mode": "commit_as_you_go"},
        {"propagation": "mandatory"},
        {"propagation": "supports"},
        {"propagation": "not_supported"},
        {"propagation": "never"},
    ],
)
def test_retries_where_they_could_never_apply_are_refused(options: dict[str, str]) -> None:
    """retries= on a unit that never owns a begin-once transaction raises ConfigurationError."""
    with pytest.raises(txguard.ConfigurationError, match="outermost"):
        txguard.transactional(retries=2, **options)
