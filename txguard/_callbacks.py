"""Callbacks that run when a transaction ends: what ``on_commit``/``on_rollback`` register.

A callback is kept on the transaction it was registered in and run once the unit has
left its registry's stack; ``capture_on_commit()`` (``txguard.testing``) may take the
on_commit ones instead. Async callbacks are awaited through SQLAlchemy's greenlet bridge.
A callback registered by another thread than the one ending its transaction is ``Shared``.
"""

from __future__ import annotations

import asyncio
import contextvars
import inspect
import logging
import threading
from collections.abc import Callable
from typing import Any, Final

from sqlalchemy.util import await_only
from sqlalchemy.util.concurrency import in_greenlet

from ._async import completed
from ._describe import name_of
from ._errors import ConfigurationError, mark_after_commit

__all__ = [
    "ALWAYS", "BlockCallbacks", "Callback", "NO_CALLBACKS", "ON_COMMIT", "ON_ROLLBACK", "Shared",
    "call_each", "capturing", "capturing_callbacks", "current_block", "intercept",
    "run_callbacks", "selected", "undone",
]

logger = logging.getLogger("txguard")

ON_COMMIT: Final = 0
ON_ROLLBACK: Final = 1
ALWAYS: Final = 2  # an on_rollback callback whose savepoint was rolled back: its work is gone


class Callback:
    """A function to run when the transaction it was registered in ends.

    ``savepoints`` are the session's savepoints it was registered in, innermost first: if
    one of them rolls back, its work is gone, whatever the transaction's outcome.
    """

    __slots__ = ("fn", "when", "robust", "savepoints")

    def __init__(
        self, fn: Callable[[], object], when: int, robust: bool, savepoints: tuple[object, ...] = ()
    ) -> None:
        self.fn = fn
        self.when = when
        self.robust = robust
        self.savepoints = savepoints


NO_CALLBACKS: Final[tuple[Callback, ...]] = ()


class Shared:
    """The function of a callback that a thread added to a transaction another thread ends.

    That thread cannot know whether the end, racing it, took the callback, so both may come
    to run it: the end when it runs its callbacks, the thread when it finds the transaction
    ended (``_hooks``). Whichever claims it first runs it (or drops it); the other skips it.
    """

    __slots__ = ("__wrapped__", "_claim")

    def __init__(self, fn: Callable[[], object]) -> None:
        self.__wrapped__ = fn
        self._claim = threading.Lock()

    def claim(self) -> bool:
        """Say whether this caller is the first to claim the callback (then it is its own)."""
        return self._claim.acquire(blocking=False)

    def __call__(self) -> object:
        return self.__wrapped__() if self.claim() else None


def undone(callback: Callback) -> bool:
    """Settle ``callback`` for the rollback of a savepoint it was registered in (SPEC §4):
    True for an on_commit one, which is dropped; an on_rollback one will run whatever the
    transaction's outcome, as its work is gone either way (False: keep it)."""
    if callback.when == ON_COMMIT:
        return True
    callback.when = ALWAYS
    return False


def selected(callbacks: list[Callback] | tuple[Callback, ...], committed: bool) -> list[Callback]:
    """The callbacks an outcome runs, in registration order."""
    wanted = ON_COMMIT if committed else ON_ROLLBACK
    return [cb for cb in callbacks if cb.when == wanted or cb.when == ALWAYS]


class BlockCallbacks:
    """The callbacks of a ``txguard.connect()`` block, which is on no registry's stack.

    ``outer`` is the unit that was current on the block's registry when the block opened:
    while it is still the current one, the block is the innermost transaction and
    ``on_commit()`` keeps its callbacks here; a unit opened inside the block keeps its own.
    The block stays ``open`` until its end has taken its last callbacks (``close``): a
    thread registering while the block commits or rolls back joins that end.
    """

    __slots__ = ("callbacks", "outer", "open", "undone")

    def __init__(self, outer: object) -> None:
        self.callbacks: list[Callback] = []
        self.outer = outer
        self.open = True  # False once its end has taken its last callbacks
        self.undone = False  # it ended without committing what it began to commit

    def add(self, callback: Callback) -> None:
        """Keep ``callback`` for the outcome of the block's transaction."""
        self.callbacks.append(callback)
        self.track(callback)

    def track(self, callback: Callback) -> None:
        """Note what ``callback`` was registered inside (``_connect``: its savepoints)."""

    def take(self, committed: bool) -> list[Callback]:
        """Remove and return the callbacks this outcome runs (the others are dropped)."""
        callbacks, self.callbacks = self.callbacks, []
        return selected(callbacks, committed)

    def close(self, committed: bool, undone: bool) -> list[Callback]:
        """Take the block's last callbacks at its end. What registers after it is handled
        as registered after the block: on_commit() at once, or dropped if ``undone`` (a
        begin-once block that rolled back), as after a unit."""
        self.undone = undone
        self.open = False
        return self.take(committed)

    def add_shared(self, callback: Callback) -> list[Callback]:
        """Add a ``Shared`` callback from a thread that may race the block's end; return the
        token ``takes`` needs: the list it was appended to, which a take may replace."""
        token = self.callbacks
        token.append(callback)
        self.track(callback)
        return token

    def takes(self, token: list[Callback]) -> bool:
        """Say whether the block's end is sure to take the callback ``add_shared`` added.

        The end marks the block closed before it takes the last callbacks, and each take
        replaces the list: read after the append, an open block still holding that list
        has not taken them yet. False means it may have: the callback's claim decides.
        """
        return self.open and self.callbacks is token


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
            logger.error("txguard: %s callback %s failed", kind, _name(cb), exc_info=True)
    if cancelled is not None:
        raise cancelled


def _name(cb: Callback) -> str:
    fn = cb.fn
    return name_of(fn.__wrapped__ if isinstance(fn, Shared) else fn)


def _await_callback(result: Any, cb: Callback, kind: str) -> BaseException | None:
    """Await a callback's coroutine in the greenlet bridge; return a cancellation meanwhile."""
    if not in_greenlet():
        close = getattr(result, "close", None)
        if close is not None:
            close()
        name = _name(cb)
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
    taken = [cb for cb in map(_own, callbacks) if cb is not None and cb.when == ON_COMMIT]
    captured.extend(cb.fn for cb in taken)
    details = capturing_callbacks.get()
    if details is not None:
        details.extend(taken)
    return [cb for cb in callbacks if cb.when != ON_COMMIT]


def _own(cb: Callback) -> Callback | None:
    """``cb`` with the user's function, or None if it is ``Shared`` and claimed elsewhere."""
    fn = cb.fn
    if cb.when != ON_COMMIT or not isinstance(fn, Shared):
        return cb
    return Callback(fn.__wrapped__, ON_COMMIT, cb.robust) if fn.claim() else None
