"""Callbacks that run when a transaction ends: what ``on_commit``/``on_rollback`` register.

A callback is kept on the transaction it was registered in and run once the unit has
left its registry's stack; ``capture_on_commit()`` (``txguard.testing``) may take the
on_commit ones instead. Async callbacks are awaited through SQLAlchemy's greenlet bridge.
"""

from __future__ import annotations

import asyncio
import contextvars
import inspect
import logging
from collections.abc import Callable
from typing import Any, Final

from sqlalchemy.util import await_only
from sqlalchemy.util.concurrency import in_greenlet

from ._async import completed
from ._describe import name_of
from ._errors import ConfigurationError, mark_after_commit

__all__ = [
    "ALWAYS", "BlockCallbacks", "Callback", "NO_CALLBACKS", "ON_COMMIT", "ON_ROLLBACK",
    "call_each", "capturing", "capturing_callbacks", "current_block", "intercept",
    "run_callbacks", "selected",
]

logger = logging.getLogger("txguard")

ON_COMMIT: Final = 0
ON_ROLLBACK: Final = 1
ALWAYS: Final = 2  # an on_rollback callback whose savepoint was rolled back: its work is gone


class Callback:
    """A function to run when the transaction it was registered in ends."""

    __slots__ = ("fn", "when", "robust")

    def __init__(self, fn: Callable[[], object], when: int, robust: bool) -> None:
        self.fn = fn
        self.when = when
        self.robust = robust


NO_CALLBACKS: Final[tuple[Callback, ...]] = ()


def selected(callbacks: list[Callback] | tuple[Callback, ...], committed: bool) -> list[Callback]:
    """The callbacks an outcome runs, in registration order."""
    wanted = ON_COMMIT if committed else ON_ROLLBACK
    return [cb for cb in callbacks if cb.when == wanted or cb.when == ALWAYS]


class BlockCallbacks:
    """The callbacks of a ``txguard.connect()`` block, which is on no registry's stack.

    ``outer`` is the unit that was current on the block's registry when the block opened:
    while it is still the current one, the block is the innermost transaction and
    ``on_commit()`` keeps its callbacks here; a unit opened inside the block keeps its own.
    """

    __slots__ = ("callbacks", "outer", "open")

    def __init__(self, outer: object) -> None:
        self.callbacks: list[Callback] = []
        self.outer = outer
        self.open = True  # False once the block has left its context

    def add(self, callback: Callback) -> None:
        """Keep ``callback`` for the outcome of the block's transaction."""
        self.callbacks.append(callback)

    def take(self, committed: bool) -> list[Callback]:
        """Remove and return the callbacks this outcome runs (the others are dropped)."""
        callbacks, self.callbacks = self.callbacks, []
        return selected(callbacks, committed)


# The txguard.connect() block the code runs in, if any (see BlockCallbacks).
current_block: contextvars.ContextVar[BlockCallbacks | None] = contextvars.ContextVar(
    "txguard_connect_block", default=None
)


capturing: contextvars.ContextVar[list[Callable[[], object]] | None] = contextvars.ContextVar(
    "txguard_capture_on_commit", default=None
)
# The same captured callbacks with their options (``robust``), for capture_on_commit(execute=True).
capturing_callbacks: contextvars.ContextVar[list[Callback] | None] = contextvars.ContextVar(
    "txguard_capture_on_commit_callbacks", default=None
)


def run_callbacks(callbacks: list[Callback], committed: bool, in_flight: bool) -> None:
    """Run the callbacks of a transaction's outcome, unless ``capture_on_commit()`` takes them."""
    if committed:
        callbacks = intercept(callbacks)
    call_each(callbacks, "on_commit" if committed else "on_rollback", in_flight)


def call_each(callbacks: list[Callback], kind: str, in_flight: bool) -> None:
    """Run callbacks in order; a failure propagates unless robust or another error is in flight.

    A callback that returns a coroutine (an ``async def`` function, or a lambda calling one)
    is awaited through SQLAlchemy's greenlet bridge, in order with the others and shielded
    from cancellation as the COMMIT is: the work it reports has happened. A cancellation
    that arrives meanwhile is raised once every callback ran. A future or task is already
    scheduled and is left to run on its own.
    """
    cancelled: BaseException | None = None
    for cb in callbacks:
        try:
            result = cb.fn()
            if result is not None and inspect.isawaitable(result) and not asyncio.isfuture(result):
                cancellation = _await_callback(result, cb, kind)
                if cancellation is not None:
                    cancelled = cancellation
                    in_flight = True  # a failure after it is logged, not raised over it
        except Exception as error:
            if not (cb.robust or in_flight):
                if kind == "on_commit":
                    mark_after_commit(error)
                raise
            logger.error("txguard: %s callback %s failed", kind, name_of(cb.fn), exc_info=True)
    if cancelled is not None:
        raise cancelled


def _await_callback(result: Any, cb: Callback, kind: str) -> BaseException | None:
    """Await a callback's coroutine in the greenlet bridge; return a cancellation meanwhile."""
    if not in_greenlet():
        close = getattr(result, "close", None)
        if close is not None:
            close()
        name = name_of(cb.fn)
        raise ConfigurationError(
            f"The {kind} callback {name} returned a coroutine where nothing can await it (a "
            "sync unit, on_commit() outside any unit, or a plain `with capture_on_commit("
            "execute=True)`), so it was closed without running. Register a plain function "
            "there: async units and `async with capture_on_commit(...)` await async "
            "callbacks, and outside a unit you can await the coroutine yourself."
        )
    task: asyncio.Future[Any]
    task, cancelled = await_only(completed(result))
    task.result()
    return cancelled


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
