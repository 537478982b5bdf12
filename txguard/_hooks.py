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


def _check(name: str, fn: object) -> None:
    if not callable(fn):
        raise ConfigurationError(
            f"{name}() needs a callable, not {describe(fn)}; pass the function itself."
        )
    if inspect.iscoroutinefunction(fn) or inspect.iscoroutine(fn):
        raise ConfigurationError(
            f"{name}() takes a plain callable, not a coroutine function: nothing would await "
            "it. To start async work after the commit, pass e.g. "
            "`lambda: asyncio.get_running_loop().create_task(send_email())`."
        )


def on_commit(
    fn: Callable[[], object], *, robust: bool = False, registry: SessionRegistry | None = None
) -> None:
    """Run ``fn`` after the outermost transaction of the current unit commits.

    Outside any transaction ``fn`` runs at once. Inside a savepoint that rolls back, ``fn``
    is dropped. With ``robust=True`` an exception from ``fn`` is logged (logger
    ``txguard``) and the other callbacks still run; otherwise it propagates to the caller
    after the commit, whose data stays committed.
    """
    _check("on_commit", fn)
    if not isinstance(robust, bool):
        raise ConfigurationError(f"robust={option_value(robust)} is not valid; use True or False.")
    unit = resolve(registry).current_unit()
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
    _check("on_rollback", fn)
    unit = resolve(registry).current_unit()
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
