"""Misuse guards (SPEC section 6): ``txguard.install()`` and ``txguard.uninstall()``.

``install()`` attaches class-level listeners (SessionEvents on ``Session``, PoolEvents on
``Pool``) and wraps ``Session.begin`` and ``Connection.begin`` (and, for the leak guard's
reports, ``Session.__init__``: see ``_creation``), places with no event to listen to, and
for cross_thread the Session methods that run statements or end transactions (no event
marks where a call ends); every Session, AsyncSession, Connection and AsyncConnection is
then watched, whoever made it. Only what the chosen guards need is attached.
``uninstall()`` removes all of it and puts the original functions back into the class
dictionaries, so plain SQLAlchemy behaviour returns. txguard's pytest plugin asks for
levels on top of the application's own installation with ``require()``: the stricter
level of each guard is in force. The checks themselves live in ``_guard_sessions`` and
``_guard_connections``; what they share, in ``_guard_records``.
"""

from __future__ import annotations

import math
import os
import sys
import threading
import warnings
from collections.abc import Callable
from functools import partial
from time import monotonic
from typing import Any, cast

from sqlalchemy import event
from sqlalchemy.engine import Connection
from sqlalchemy.orm import Session
from sqlalchemy.pool import Pool

from . import _creation as creation
from . import _guard_connections as connections
from . import _guard_records as guard_records
from . import _guard_sessions as sessions
from ._describe import option_value
from ._errors import (
    ConfigurationError,
    LeakedConnectionWarning,
    LeakedSessionWarning,
    LongTransactionWarning,
)
from ._guard_records import LEVELS, OFF, WARN, WARNED_LONG, Settings, describe_thread, seconds
from ._options import validate_guard_level

__all__ = ["install", "uninstall"]

_lock = threading.RLock()

# (target, event name, listener) currently attached; patched (class, name) -> (original,
# our wrapper). A wanted patch is a function that makes the wrapper from the original.
_listening: set[tuple[type, str, Callable[..., Any]]] = set()
_patched: dict[tuple[type, str], tuple[Any, Any]] = {}
_Patches = dict[tuple[type, str], Callable[[Any], Any]]
_sweeper: _Sweeper | None = None
_added_filters: list[tuple[Any, ...]] = []
# What install() asked for (None: nothing, or uninstall()), and the levels required on top of
# it by require(); the guards run at the stricter of each.
_requested: Settings | None = None
_required: list[Settings] = []


def install(
    *,
    mixed_begin: str = "warn",
    leaks: str = "warn",
    cross_thread: str = "warn",
    cross_task: str = "warn",
    long_transaction: float | None = None,
) -> None:
    """Watch every Session, AsyncSession and Connection for transaction misuse.

    Each guard is ``"off"``, ``"warn"`` or ``"error"``; ``long_transaction`` is a threshold
    in seconds (None turns it off). Calling it again changes the levels in place; the
    guards stay until ``txguard.uninstall()``.
    """
    new = Settings(
        validate_guard_level("mixed_begin", mixed_begin, LEVELS),
        validate_guard_level("leaks", leaks, LEVELS),
        validate_guard_level("cross_thread", cross_thread, LEVELS),
        validate_guard_level("cross_task", cross_task, LEVELS),
        _threshold(long_transaction),
    )
    global _requested
    with _lock:
        _requested = new
        _apply()


def uninstall() -> None:
    """Remove every guard: no listener or patch stays behind (idempotent).

    Levels that txguard's pytest plugin requires for a test run stay until it is over.
    """
    global _requested
    with _lock:
        _requested = None
        _apply()


def require(levels: Settings) -> Callable[[], None]:
    """Run the guards at least at ``levels`` until the returned function is called.

    For txguard's pytest plugin: the application's own install() composes with it (the
    stricter level of each guard wins) and is in force again, as it was, once released.
    """
    with _lock:
        _required.append(levels)
        _apply()

    def release() -> None:
        with _lock:
            if any(entry is levels for entry in _required):
                _required[:] = [entry for entry in _required if entry is not levels]
                _apply()

    return release


def _apply() -> None:
    """Put in force the strictest of what install() asked for and require() requires."""
    layers = [entry for entry in (_requested, *_required) if entry is not None]
    if not layers:
        _uninstall()
        return

    def strictest(name: str) -> str:
        levels: list[str] = [getattr(entry, name) for entry in layers]
        return max(levels, key=LEVELS.index)

    thresholds = [entry.long_transaction for entry in layers if entry.long_transaction]
    _install(
        Settings(
            strictest("mixed_begin"),
            strictest("leaks"),
            strictest("cross_thread"),
            strictest("cross_task"),
            min(thresholds, default=None),
        )
    )


def _install(new: Settings) -> None:
    """Put ``new`` in force: attach what its guards need, and only that."""
    with _lock:
        listeners = _wanted_listeners(new)
        guard_records.put_in_force(new, listening=bool(listeners))
        _attach(listeners, _wanted_patches(new))
        creation.want("guards", new.leaks != OFF)
        _show_leak_warnings(new.leaks == WARN)
        _run_sweeper(new.long_transaction)


def _uninstall() -> None:
    """Detach everything and forget what the guards knew."""
    with _lock:
        guard_records.put_in_force(None, listening=False)
        _attach(set(), {})
        creation.want("guards", False)
        _show_leak_warnings(False)
        _run_sweeper(None)
        connections.forget()


def _threshold(value: object) -> float | None:
    if value is None:
        return None
    if (
        not isinstance(value, bool)
        and isinstance(value, (int, float))
        and math.isfinite(value)
        and value > 0
    ):
        return float(value)
    raise ConfigurationError(
        f"long_transaction={option_value(value)} is not valid; use a number of seconds > 0, "
        "or None to turn the guard off."
    )


# What each guard needs.


def _wanted_listeners(cfg: Settings) -> set[tuple[type, str, Callable[..., Any]]]:
    on = {
        name
        for name in ("mixed_begin", "leaks", "cross_thread", "cross_task")
        if getattr(cfg, name) != OFF
    }
    if cfg.long_transaction is not None:
        on.add("long_transaction")
    wanted: set[tuple[type, str, Callable[..., Any]]] = set()
    if not on:
        return wanted
    wanted.add((Session, "after_transaction_create", sessions.on_transaction_create))
    wanted.add((Session, "after_transaction_end", sessions.on_transaction_end))
    if "cross_task" in on or "mixed_begin" in on:
        wanted.add((Session, "do_orm_execute", sessions.on_orm_execute))
    if "cross_task" in on:
        wanted.add((Session, "before_flush", sessions.on_before_flush))
        wanted.add((Session, "before_commit", sessions.on_before_commit))
    if "leaks" in on:
        wanted.add((Pool, "checkout", connections.on_checkout))
        wanted.add((Pool, "checkin", connections.on_checkin))
        wanted.add((Pool, "detach", connections.on_detach))
    return wanted


def _wanted_patches(cfg: Settings) -> _Patches:
    wanted: _Patches = {}
    if cfg.mixed_begin != OFF:
        wanted[(Session, "begin")] = _begin_of(sessions)
    if cfg.mixed_begin != OFF or cfg.leaks != OFF or cfg.long_transaction is not None:
        wanted[(Connection, "begin")] = _begin_of(connections)
    if cfg.cross_thread != OFF:
        for name, operation in sessions.THREAD_WATCHED.items():
            wanted[(Session, name)] = partial(sessions.watch_threads, operation=operation)
    return wanted


def _begin_of(module: Any) -> Callable[[Any], Any]:
    """The begin() wrapper of ``module``, which calls the original it is given."""

    def make(original: Any) -> Any:
        module.original_begin = original
        return module.begin

    return make


def _attach(listeners: set[tuple[type, str, Callable[..., Any]]], patches: _Patches) -> None:
    """Make what is attached exactly ``listeners`` and ``patches``.

    What is attached is checked, not remembered: something else may have removed our
    listeners (SQLAlchemy's own test fixtures clear every class-level listener) or put
    the original method back, and then they are attached again.
    """
    for target, name, fn in _listening - listeners:
        if event.contains(target, name, fn):
            event.remove(target, name, fn)
    for target, name, fn in listeners:
        if not event.contains(target, name, fn):
            event.listen(target, name, fn)
    _listening.clear()
    _listening.update(listeners)
    for patch in [p for p in _patched if p not in patches]:
        _unpatch(patch)
    for patch, make in patches.items():
        cls, name = patch
        if patch not in _patched:
            _patch(patch, make)
        elif cls.__dict__.get(name) is _patched[patch][0]:  # the original was put back
            setattr(cls, name, _patched[patch][1])


def _patch(key: tuple[type, str], make: Callable[[Any], Any]) -> None:
    cls, name = key
    original = cls.__dict__[name]
    wrapper = make(original)
    wrapper.__wrapped__ = original
    _patched[key] = (original, wrapper)
    setattr(cls, name, wrapper)


def _unpatch(key: tuple[type, str]) -> None:
    cls, name = key
    original, wrapper = _patched.pop(key)
    # Put the original back only if our wrapper is still there: someone who wrapped it
    # after us keeps their wrapper, and ours then passes straight through.
    if cls.__dict__.get(name) is wrapper:
        setattr(cls, name, original)


# Leak warnings are ResourceWarnings, which Python ignores by default; with leaks="warn"
# they must show, yet a filter the user set for them (or for all warnings) must still win.
# So our "default" filter goes just before the stdlib's `ignore::ResourceWarning`, after
# every filter the user added, and only when that stdlib filter is in force.


def _show_leak_warnings(show: bool) -> None:
    filters = cast("list[Any]", warnings.filters)
    mutated = False
    for entry in _added_filters:
        if entry in filters:
            filters.remove(entry)
            mutated = True
    _added_filters.clear()
    if show:
        stdlib_ignore = ("ignore", None, ResourceWarning, None, 0)
        if stdlib_ignore in filters:
            at = filters.index(stdlib_ignore)
            for category in (LeakedConnectionWarning, LeakedSessionWarning):
                entry = ("default", None, category, None, 0)
                filters.insert(at, entry)
                _added_filters.append(entry)
            mutated = True
    if mutated:
        _filters_mutated()


def _filters_mutated() -> None:
    # Resets the "already shown" registries, as warnings.filterwarnings() does.
    mutated = getattr(warnings, "_filters_mutated", None)
    if mutated is not None:
        mutated()


# long_transaction: a background sweep, as HikariCP's leakDetectionThreshold.


class _Sweeper(threading.Thread):
    """Warn once about each transaction open longer than the threshold, while it is open."""

    def __init__(self, threshold: float) -> None:
        super().__init__(name="txguard-long-transactions", daemon=True)
        self.threshold = threshold
        self.interval = min(max(threshold / 4, 0.005), 1.0)
        self.stopped = threading.Event()

    def run(self) -> None:
        while not self.stopped.wait(self.interval):
            try:
                _sweep(self.threshold)
            except Exception:
                # The user's warning filters may turn our warning into an exception; there is
                # no caller to hand it to, so it goes where uncaught thread errors go.
                threading.excepthook(threading.ExceptHookArgs([*sys.exc_info(), self]))


def _sweep(threshold: float) -> None:
    now = monotonic()
    for key, ref in guard_records.open_transactions.copy().items():
        record = ref()
        if record is None or not record.is_open():
            if guard_records.open_transactions.pop(key, None) is not None and record is not None:
                guard_records.log_end(record)
            continue
        age = now - record.began
        warned = getattr(record, "warned", 0)
        if age < threshold or warned & WARNED_LONG:
            continue
        record.warned = warned | WARNED_LONG
        guard_records.report_late(
            WARN,
            LongTransactionWarning,
            f"A {record.owner}'s transaction has been open for {seconds(age)} "
            f"(long_transaction={threshold:g} s) and is still open: it was "
            f"{record.describe()} in thread {describe_thread(record.thread)}. An open "
            "transaction holds its pooled connection and its locks, and keeps old row "
            "versions alive. Commit or roll back sooner, and keep slow work (network calls, "
            "user input, sleeps) outside the transaction.",
            record.origin,
        )


def _run_sweeper(threshold: float | None) -> None:
    """Run one sweep at ``threshold`` (None: none); replace one that has died."""
    global _sweeper
    current = _sweeper
    if current is not None and (
        threshold is None or current.threshold != threshold or not current.is_alive()
    ):
        current.stopped.set()
        if current is not threading.current_thread() and current.is_alive():
            current.join(timeout=5)
        _sweeper = current = None
    if threshold is not None and current is None:
        _sweeper = _Sweeper(threshold)
        _sweeper.start()


def _after_fork_in_child() -> None:
    """Start the sweep again in a forked child (a prefork worker): threads do not survive fork."""
    global _lock
    _lock = threading.RLock()  # another thread may have held it at the fork
    if _sweeper is not None:
        _run_sweeper(_sweeper.threshold)


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)

