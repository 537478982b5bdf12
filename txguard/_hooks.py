"""Callbacks that run after the current transaction commits or rolls back."""

from __future__ import annotations

import inspect
from collections.abc import Callable

from ._callbacks import ON_COMMIT, ON_ROLLBACK, BlockCallbacks, Callback, current_block, run_callbacks
from ._describe import describe, option_value
from ._errors import ConfigurationError
from ._registry import Registry, resolve
from ._unit import current_unit, ended_uncommitted

__all__ = ["on_commit", "on_rollback"]


def _innermost_block(unit: object) -> BlockCallbacks | None:
    """The ``connect()`` block the code runs in, unless ``unit`` (the current unit) was
    opened inside it, or the block has ended (in another context than it began in)."""
    block = current_block.get()
    if block is None or not block.open or (unit is not None and unit is not block.outer):
        return None
    return block


def _check(name: str, fn: object, registry: Registry) -> None:
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
    fn: Callable[[], object], *, robust: bool = False, registry: Registry | None = None
) -> None:
    """Run ``fn`` after the outermost transaction of the current unit commits.

    Inside a ``txguard.connect()`` block (and no unit opened in it) ``fn`` runs after the
    block's COMMIT. Outside any transaction ``fn`` runs at once, except in a task started
    inside a begin-once unit that has since rolled back: there ``fn`` is dropped, as it
    would have been had the task registered it in time. Inside a savepoint that rolls back,
    ``fn`` is dropped. With ``robust=True`` an exception from ``fn`` is logged (logger
    ``txguard``) and the other callbacks still run; otherwise it propagates to the caller
    after the commit, whose data stays committed. In an async unit ``fn`` may be an
    ``async def`` function (or return a coroutine): it is awaited after the commit, in order.
    """
    owner = resolve(registry)
    _check("on_commit", fn, owner)
    if not isinstance(robust, bool):
        raise ConfigurationError(f"robust={option_value(robust)} is not valid; use True or False.")
    unit = current_unit(owner)
    block = _innermost_block(unit)
    if block is not None:
        block.add(Callback(fn, ON_COMMIT, robust))
        return
    if unit is None and ended_uncommitted(owner):
        return
    transaction = None if unit is None else unit.transaction
    if transaction is None or not (
        transaction.transactional or transaction.sync_session.in_transaction()
    ):
        run_callbacks([Callback(fn, ON_COMMIT, robust)], committed=True, in_flight=False)
        return
    transaction.add_callback(Callback(fn, ON_COMMIT, robust))


def on_rollback(fn: Callable[[], object], *, registry: Registry | None = None) -> None:
    """Run ``fn`` after the current transaction rolls back (or its savepoint's work is undone).

    A callback registered inside a savepoint that rolls back runs when the outermost
    transaction ends, whatever its outcome: its work is gone either way. Outside any
    transaction there is nothing to roll back and ``fn`` never runs.
    """
    owner = resolve(registry)
    _check("on_rollback", fn, owner)
    unit = current_unit(owner)
    block = _innermost_block(unit)
    if block is not None:
        block.add(Callback(fn, ON_ROLLBACK, False))
        return
    if unit is None:
        return
    unit.transaction.add_callback(Callback(fn, ON_ROLLBACK, False))


