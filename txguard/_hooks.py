"""Callbacks that run after the current transaction commits or rolls back."""

from __future__ import annotations

import contextvars
import inspect
from collections.abc import Callable

from ._describe import describe, option_value
from ._errors import ConfigurationError
from ._registry import SessionRegistry, resolve
from ._unit import ON_COMMIT, ON_ROLLBACK, Callback, run_callbacks

__all__ = ["on_commit", "on_rollback", "intercept", "capturing", "capturing_callbacks"]

capturing: contextvars.ContextVar[list[Callable[[], object]] | None] = contextvars.ContextVar(
    "txguard_capture_on_commit", default=None
)
# The same captured callbacks with their options (``robust``), for capture_on_commit(execute=True).
capturing_callbacks: contextvars.ContextVar[list[Callback] | None] = contextvars.ContextVar(
    "txguard_capture_on_commit_callbacks", default=None
)


def _check(name: str, fn: object, registry: SessionRegistry) -> None:
    """Refuse what could never run as a callback of ``registry``'s units."""
    if not callable(fn):
        if inspect.iscoroutine(fn):
            fn.close()
            raise ConfigurationError(
                f"{name}() needs the function, not the coroutine it returned: pass "
                f"`{fn.__qualname__}` (or a lambda calling it), not `{fn.__qualname__}()`."
            )
        raise ConfigurationError(
            f"{name}() needs a callable, not {describe(fn)}; pass the function itself."
        )
    if not registry.is_async and inspect.iscoroutinefunction(fn):
        raise ConfigurationError(
            f"{name}() got a coroutine function, but the units of {registry!r} are sync: "
            "nothing would await it. Register it in an async unit (a registry on an "
            "AsyncEngine awaits async callbacks after the commit), or pass a plain function; "
            "to start async work on a running event loop, pass e.g. "
            "`lambda: asyncio.get_running_loop().create_task(send_email())`."
        )


def on_commit(
    fn: Callable[[], object], *, robust: bool = False, registry: SessionRegistry | None = None
) -> None:
    """Run ``fn`` after the outermost transaction of the current unit commits.

    Outside any transaction ``fn`` runs at once. Inside a savepoint that rolls back, ``fn``
    is dropped. With ``robust=True`` an exception from ``fn`` is logged (logger
    ``txguard``) and the other callbacks still run; otherwise it propagates to the caller
    after the commit, whose data stays committed. In an async unit ``fn`` may be an
    ``async def`` function (or return a coroutine): it is awaited after the commit, in order.
    """
    owner = resolve(registry)
    _check("on_commit", fn, owner)
    if not isinstance(robust, bool):
        raise ConfigurationError(f"robust={option_value(robust)} is not valid; use True or False.")
    unit = owner.current_unit()
    if unit is None or not (unit.scope.transactional or unit.sync.in_transaction()):
        run_callbacks([Callback(fn, ON_COMMIT, robust)], committed=True, in_flight=False)
        return
    unit.scope.add_callback(Callback(fn, ON_COMMIT, robust))


def on_rollback(fn: Callable[[], object], *, registry: SessionRegistry | None = None) -> None:
    """Run ``fn`` after the current transaction rolls back (or its savepoint's work is undone).

    A callback registered inside a savepoint that rolls back runs when the outermost
    transaction ends, whatever its outcome: its work is gone either way. Outside any
    transaction there is nothing to roll back and ``fn`` never runs.
    """
    owner = resolve(registry)
    _check("on_rollback", fn, owner)
    unit = owner.current_unit()
    if unit is None:
        return
    unit.scope.add_callback(Callback(fn, ON_ROLLBACK, False))


def intercept(callbacks: list[Callback]) -> list[Callback]:
    """Hand on_commit callbacks to an active ``capture_on_commit()`` instead of running them."""
    captured = capturing.get()
    if captured is None:
        return callbacks
    captured.extend(cb.fn for cb in callbacks if cb.when == ON_COMMIT)
    details = capturing_callbacks.get()
    if details is not None:
        details.extend(cb for cb in callbacks if cb.when == ON_COMMIT)
    return [cb for cb in callbacks if cb.when != ON_COMMIT]
