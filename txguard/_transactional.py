"""``@transactional``: run a function in a unit of work, sync or async, with retries."""

from __future__ import annotations

import asyncio
import functools
import inspect
import time
from collections.abc import Awaitable, Callable
from typing import Any, NoReturn, ParamSpec, TypeVar, overload

from ._describe import describe, name_of
from ._errors import ConfigurationError
from ._options import (
    DECORATOR_OPTION_NAMES,
    Mode,
    Propagation,
    UnitOptions,
    check_names,
    unit_options,
)
from ._origin import Origin, capture
from ._registry import Registry, check_registry, resolve
from ._retry import next_delay
from ._transaction import Transaction
from ._unit import UnitOfWork, _mismatch, aend, aleave, end, end_joined, joinable, leave

__all__ = ["transactional"]

P = ParamSpec("P")
R = TypeVar("R")


@overload
def transactional(fn: Callable[P, R], /) -> Callable[P, R]: ...


@overload
def transactional(
    *,
    mode: Mode | str = ...,
    propagation: Propagation | str = ...,
    read_only: bool = ...,
    isolation_level: str | None = ...,
    rollback_for: type[BaseException] | tuple[type[BaseException], ...] = ...,
    no_rollback_for: type[BaseException] | tuple[type[BaseException], ...] = ...,
    durable: bool = ...,
    registry: Registry | None = ...,
    retries: int = ...,
    retry_on: Any = ...,
    backoff: float | Callable[[int], float] = ...,
) -> Callable[[Callable[P, R]], Callable[P, R]]: ...


def transactional(fn: Any = None, /, **options: Any) -> Any:
    """Run the decorated function in a unit of work; ``@transactional`` or ``@transactional(...)``.

    Takes the options of ``unit_of_work`` plus ``retries`` (extra attempts after a
    retryable error, default 0), ``retry_on`` (exception types or a predicate adding to
    ``txguard.is_retryable``) and ``backoff`` (base delay in seconds of the exponential
    backoff with full jitter, or a function of the attempt number). Options are checked
    here, once, so a mistake fails at import time rather than at the first call.
    """
    check_names("@transactional", options, DECORATOR_OPTION_NAMES)
    opts = unit_options(**{**options, "registry": check_registry(options.get("registry"))})
    if fn is None:
        return lambda f: _decorate(f, opts, capture(1))
    return _decorate(fn, opts, capture(1))


def _decorate(fn: Any, opts: UnitOptions, decorated_at: Origin) -> Any:
    if isinstance(fn, (staticmethod, classmethod)):
        return type(fn)(_decorate(fn.__func__, opts, decorated_at))
    if not callable(fn):
        raise ConfigurationError(
            f"@transactional needs a function, not {describe(fn)}; put it directly above a def."
        )
    if isinstance(fn, type):
        raise ConfigurationError(
            f"@transactional needs a function, not {describe(fn)}: the unit would end when "
            "the object is built. Decorate its methods instead."
        )
    if inspect.isgeneratorfunction(fn) or inspect.isasyncgenfunction(fn):
        raise ConfigurationError(
            f"@transactional cannot wrap the generator function {name_of(fn)}: its body "
            "runs after the call returns, outside the unit. Return a list, or open "
            "`with txguard.unit_of_work():` inside the generator."
        )
    code = getattr(fn, "__code__", None)
    where = Origin.of_code(code) if code is not None else decorated_at
    # An object whose __call__ is `async def` is a coroutine function too (as for tenacity).
    if inspect.iscoroutinefunction(fn) or inspect.iscoroutinefunction(
        getattr(type(fn), "__call__", None)
    ):
        return functools.wraps(fn)(_async_wrapper(fn, opts, where))
    return functools.wraps(fn)(_sync_wrapper(fn, opts, where))


def _refuse_awaitable(
    fn: Callable[..., Any], result: Any, transaction: Transaction, where: Origin
) -> NoReturn:
    """Raise for the awaitable a plain function returned: its work would run after the commit.

    The call's transaction is marked rollback-only, so it rolls back whatever the
    function's ``rollback_for`` rules say about the error, also when the call joined it.
    """
    if inspect.iscoroutine(result):
        result.close()  # it will never run: spare the "never awaited" warning
    error = ConfigurationError(
        f"{name_of(fn)} is decorated with @transactional as a plain function but returned "
        f"{describe(result)}, whose work would run after the unit ended; the unit was rolled "
        "back. Make it an `async def` (on an async registry), or await the work inside it."
    )
    try:
        raise error
    except ConfigurationError:
        transaction.mark_rollback_only(error, where)  # with its traceback, for the site
        raise


def _sync_wrapper(fn: Callable[..., Any], opts: UnitOptions, where: Origin) -> Callable[..., Any]:
    def run_in_unit(*args: Any, **kwargs: Any) -> Any:
        registry = opts.registry or resolve(None)
        if registry.is_async:
            raise ConfigurationError(_mismatch(registry, "def"))
        current = registry._var.get()
        joined = None if current is None else joinable(current, opts)
        if joined is not None:  # no frame of its own: see joinable
            try:
                result = fn(*args, **kwargs) if kwargs else fn(*args)
                if result is not None and hasattr(type(result), "__await__"):  # an Awaitable
                    _refuse_awaitable(fn, result, joined.transaction, where)
            except BaseException as exc:
                end_joined(joined, opts, where, exc)
                raise
            end_joined(joined, opts, where, None)
            return result
        attempt = 1
        while True:
            unit = UnitOfWork(opts, where)  # the class of every unit: see UnitOfWork
            if not unit.enter(registry):
                return fn(*args, **kwargs)
            try:
                result = fn(*args, **kwargs) if kwargs else fn(*args)
                if result is not None and hasattr(type(result), "__await__"):  # an Awaitable
                    _refuse_awaitable(fn, result, unit.transaction, unit.where)
            except BaseException as exc:
                finish, error = end(unit, exc)
            else:
                finish, error = end(unit, None)
                if error is None:
                    if finish is not None:
                        finish.deliver(in_flight=False)
                    return result
            delay = next_delay(unit, error, attempt) if opts.retries else None  # type: ignore[arg-type]
            if delay is None:
                leave(finish, error, None)  # error is not None: this raises it
            else:
                attempt += 1
                time.sleep(delay)

    return run_in_unit


def _async_wrapper(
    fn: Callable[..., Awaitable[Any]], opts: UnitOptions, where: Origin
) -> Callable[..., Awaitable[Any]]:
    async def run_in_unit(*args: Any, **kwargs: Any) -> Any:
        registry = opts.registry or resolve(None)
        if not registry.is_async:
            raise ConfigurationError(_mismatch(registry, "async def"))
        current = registry._var.get()
        joined = None if current is None else joinable(current, opts)
        if joined is not None:  # no frame of its own: see joinable
            try:
                result = await fn(*args, **kwargs)
            except BaseException as exc:
                end_joined(joined, opts, where, exc)
                raise
            end_joined(joined, opts, where, None)
            return result
        attempt = 1
        while True:
            unit = UnitOfWork(opts, where)  # the class of every unit: see UnitOfWork
            if not await unit.aenter(registry):
                return await fn(*args, **kwargs)
            try:
                result = await fn(*args, **kwargs)
            except BaseException as exc:
                finish, error = await aend(unit, exc)
            else:
                finish, error = await aend(unit, None)
                if error is None:
                    if finish is not None:
                        await finish.adeliver(in_flight=False)
                    return result
            delay = next_delay(unit, error, attempt) if opts.retries else None  # type: ignore[arg-type]
            if delay is None:
                await aleave(finish, error, None)  # error is not None: this raises it
            else:
                attempt += 1
                await asyncio.sleep(delay)

    return run_in_unit
