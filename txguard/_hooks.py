"""Callbacks that run after the current transaction commits or rolls back.

A thread running in a copy of a unit's context (``asyncio.to_thread`` inside the unit)
may not use the unit's session, but its callbacks join the unit's transaction. The unit's
own thread may be ending it at that moment, and its end takes no lock: the thread adds
the callback, then looks whether the end is sure to take it, and if not, claims it back
(``Shared``) and handles it as registered after the end.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Final

from ._callbacks import (
    ON_COMMIT, ON_ROLLBACK, BlockCallbacks, Callback, Shared, current_block, run_callbacks,
)
from ._describe import describe, option_value
from ._errors import ConfigurationError
from ._failures import session_savepoints
from ._registry import Registry, resolve
from ._transaction import Transaction
from ._unit import FOLLOWS_CONTEXT, Unit, current_unit, ended_uncommitted, unit_in_progress

__all__ = ["on_commit", "on_rollback"]


# What _innermost_block answers for a begin-once block that rolled back, seen by code that
# runs after it in a thread or task it started: on_commit() there is dropped.
_UNDONE: Final = BlockCallbacks(None)


def _innermost_block(unit: object) -> BlockCallbacks | None:
    """The ``connect()`` block the code runs in, unless ``unit`` (the current unit) was
    opened inside it, or the block has ended (in another context than it began in):
    ``_UNDONE`` if it rolled back."""
    block = current_block.get()
    if block is None or (unit is not None and unit is not block.outer):
        return None
    if not block.open:
        return _UNDONE if block.undone else None
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
    block's COMMIT. In a thread running in a copy of a unit's context (``asyncio.to_thread``,
    ``copy_context().run`` in a thread pool), which may not use that unit's session, ``fn``
    joins the unit's transaction all the same, and runs where the unit ends. Outside any
    transaction ``fn`` runs at once, except in a task or thread started inside a begin-once
    unit that has since rolled back: there ``fn`` is dropped, as it would have been had it
    been registered in time. Inside a savepoint that rolls back, ``fn`` is dropped. With
    ``robust=True`` an exception from ``fn`` is logged (logger ``txguard``) and the other
    callbacks still run; otherwise it propagates to the caller after the commit, whose data
    stays committed. In an async unit ``fn`` may be an ``async def`` function (or return a
    coroutine): it is awaited after the commit, in order.
    """
    owner = resolve(registry)
    _check("on_commit", fn, owner)
    if not isinstance(robust, bool):
        raise ConfigurationError(f"robust={option_value(robust)} is not valid; use True or False.")
    unit = current_unit(owner)
    if unit is None or unit.thread == FOLLOWS_CONTEXT:
        _register_shared(owner, fn, ON_COMMIT, robust)
        return
    block = _innermost_block(unit)
    if block is not None:
        if block is not _UNDONE:
            block.add(Callback(fn, ON_COMMIT, robust))
        return
    if ended_uncommitted(owner, unit):  # a task outliving a savepoint unit that rolled back
        return
    transaction = unit.transaction
    if not (transaction.transactional or transaction.sync_session.in_transaction()):
        run_callbacks([Callback(fn, ON_COMMIT, robust)], committed=True, in_flight=False)
        return
    savepoints = session_savepoints(transaction.sync_session)
    transaction.add_callback(Callback(fn, ON_COMMIT, robust, savepoints))


def on_rollback(fn: Callable[[], object], *, registry: Registry | None = None) -> None:
    """Run ``fn`` after the current transaction rolls back (or its savepoint's work is undone).

    A callback registered inside a savepoint that rolls back runs when the outermost
    transaction ends, whatever its outcome: its work is gone either way. A thread running in
    a copy of a unit's context registers in the unit's transaction, as ``on_commit`` does.
    Outside any transaction there is nothing to roll back and ``fn`` never runs.
    """
    owner = resolve(registry)
    _check("on_rollback", fn, owner)
    unit = current_unit(owner)
    if unit is None or unit.thread == FOLLOWS_CONTEXT:
        _register_shared(owner, fn, ON_ROLLBACK, False)
        return
    block = _innermost_block(unit)
    if block is not None and block is not _UNDONE:
        block.add(Callback(fn, ON_ROLLBACK, False))
        return
    transaction = unit.transaction
    savepoints = session_savepoints(transaction.sync_session)
    transaction.add_callback(Callback(fn, ON_ROLLBACK, False, savepoints))


def _register_shared(owner: Registry, fn: Callable[[], object], when: int, robust: bool) -> None:
    """Register ``fn`` where the transaction it follows may be ended by another thread.

    That is a unit (or a ``connect()`` block) of another thread that this thread's context
    holds, a unit every thread with the context may use (``follow_context``), or none at
    all. Each try adds the callback, then asks whether the end is sure to take it; if not,
    and the end has not claimed it to run it, it is tried again against what has ended
    meanwhile, as if registered after that end.
    """
    while True:
        unit = unit_in_progress(owner)
        block = _innermost_block(unit)
        target: Transaction | BlockCallbacks
        if block is not None and block is not _UNDONE:
            target = block
        elif when == ON_COMMIT and (block is _UNDONE or ended_uncommitted(owner, unit)):
            return  # started inside a unit that rolled back, and registered after its end
        elif unit is not None and (
            when != ON_COMMIT
            or unit.transaction.transactional
            or unit.transaction.sync_session.in_transaction()
        ):
            target = unit.transaction
        else:
            if when == ON_COMMIT:
                run_callbacks([Callback(fn, ON_COMMIT, robust)], committed=True, in_flight=False)
            return
        shared = Shared(fn)
        token = target.add_shared(Callback(shared, when, robust, _savepoints(unit, target)))
        if target.takes(token) or not shared.claim():
            return


def _savepoints(unit: Unit | None, target: Transaction | BlockCallbacks) -> tuple[object, ...]:
    """The session savepoints a callback for ``target`` is registered in.

    A thread that may not use the session opened none of them, but the unit's own thread
    may have: ``with session.begin_nested(): await asyncio.to_thread(...)`` registers in
    that savepoint, and its rollback must drop the callback (SPEC §4). A ``connect()``
    block reads its connection's savepoints itself (``_connect._Held.add``).
    """
    if unit is None or not isinstance(target, Transaction):
        return ()
    return session_savepoints(target.sync_session)
