"""What the guards share: the settings in force, the record of each watched transaction, and
how a finding reaches the user.

A record is one small object per transaction: where and how it began (an ``Origin``, its
line decoded only if a message needs it), in which thread and task, and when. A
Session's record lives on the Session; a checked-out connection's is a weak reference to
the pooled connection, kept in the pool record's ``info``. Neither keeps anything alive,
and each notices a leak when what it describes is garbage-collected too early.
"""

from __future__ import annotations

import asyncio
import logging
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from time import monotonic
from typing import TYPE_CHECKING, Any, ClassVar, Final

from ._errors import MixedBeginError, MixedBeginWarning
from ._origin import UNKNOWN, Origin, capture, shorten_sql, warn_at, warn_at_user
from ._sqla import running_loop

__all__ = [
    "ERROR",
    "LEVELS",
    "OFF",
    "WARN",
    "Record",
    "Settings",
    "describe_thread",
    "open_transactions",
    "put_in_force",
    "report",
    "report_late",
    "report_mixed_begin",
    "settings",
    "sql_text",
]

logger = logging.getLogger("txguard")

OFF: Final = "off"
WARN: Final = "warn"
ERROR: Final = "error"
LEVELS: Final = (OFF, WARN, ERROR)

WARNED_THREAD: Final = 1
WARNED_TASK: Final = 2
WARNED_LONG: Final = 4


@dataclass(frozen=True, slots=True, repr=False)
class Settings:
    """The level of each guard, as txguard.install() asks for them; never changed in place.

    ``install()`` and ``uninstall()`` put a new one in force with ``put_in_force()``; the
    guards read the one in force (``settings``) and the flags derived from it here, once.
    """

    mixed_begin: str
    leaks: str
    cross_thread: str
    cross_task: str
    long_transaction: float | None
    # Derived once, read by the listeners on every transaction.
    wraps_begin: bool = field(init=False)  # Session.begin is wrapped to see its caller
    watches_tasks: bool = field(init=False)  # records note the asyncio task
    watches_age: bool = field(init=False)  # records note when they began

    def __post_init__(self) -> None:
        object.__setattr__(self, "wraps_begin", self.mixed_begin != OFF)
        object.__setattr__(self, "watches_tasks", self.cross_task != OFF)
        object.__setattr__(self, "watches_age", self.long_transaction is not None)

    def __repr__(self) -> str:
        return (
            f"txguard.install(mixed_begin={self.mixed_begin!r}, leaks={self.leaks!r}, "
            f"cross_thread={self.cross_thread!r}, cross_task={self.cross_task!r}, "
            f"long_transaction={self.long_transaction!r})"
        )


# The settings in force; None while the guards are not installed. Listeners read it on every
# call; only put_in_force() changes it (and the counters below).
settings: Settings | None = None

# Transactions the long_transaction sweep watches: id of their record -> a callable that
# returns it (a weak reference for a Session's record, which must stay collectable for the
# leak guard to see it go), or None once it is gone.
open_transactions: dict[int, Callable[[], Record | None]] = {}

# Bumped when the guards stop listening: records made before may have missed events, so they
# are stale.
generation = 0
# Bumped when leak tracking of connections stops (leaks="off", or uninstall()): connection
# records made before can no longer tell a returned connection from a leaked one.
leak_generation = 0


def put_in_force(new: Settings | None, listening: bool) -> None:
    """Make ``new`` the settings the guards read (None: uninstalled).

    ``listening`` says whether the guards still receive events under ``new``; when they stop,
    or stop tracking leaks, the records made before become stale.
    """
    global settings, generation, leak_generation
    old = settings
    if new is None or (old is not None and not listening):
        generation += 1
    if new is None or (old is not None and old.leaks != OFF and new.leaks == OFF):
        leak_generation += 1
    if new is None or new.long_transaction is None:
        open_transactions.clear()
    settings = new


class Record:
    """Where a watched transaction began, and how; subclasses add what they watch."""

    if not TYPE_CHECKING:  # subclasses declare the slots (one of them is a weakref.ref)
        __slots__ = ()

    owner: ClassVar[str] = "object"
    unknown: ClassVar[str] = (
        "begun where txguard could not see it (before txguard.install(), or by code that "
        "bypassed it)"
    )

    # Where the transaction began (its line decoded only if a message shows it).
    where: Origin | None
    autobegun: bool
    sql: object
    thread: int
    began: float
    warned: int

    @property
    def origin(self) -> Origin | None:
        """Where the transaction began, if the guards saw it."""
        return self.where

    def is_open(self) -> bool:
        """Say whether the transaction recorded here is still open."""
        raise NotImplementedError

    def describe(self) -> str:
        """Say how and where the recorded transaction began (never with parameter values)."""
        origin = self.origin
        if origin is None:
            return self.unknown
        if self.autobegun:
            sql = sql_text(getattr(self, "sql", None))
            how = f"autobegun at {origin}"
            return f"{how} by {sql!r}" if sql else how
        return f"begun explicitly at {origin}"


def sql_text(statement: object) -> str | None:
    """Return the SQL of ``statement``, shortened; placeholders stay, values never appear."""
    if statement is None:
        return None
    if isinstance(statement, str):
        text = statement
    else:
        raw = getattr(statement, "text", None)  # a TextClause keeps the text as written
        if isinstance(raw, str):
            text = raw
        else:
            try:
                text = str(statement)  # compiles with bound-parameter placeholders
            except Exception:
                return type(statement).__name__
    return shorten_sql(text)


def describe_thread(ident: int) -> str:
    """Name a thread by its ident for a message (it may have ended since)."""
    for thread in threading.enumerate():
        if thread.ident == ident:
            return repr(thread.name)
    return f"#{ident} (now ended)"


def report(level: str, category: type[Warning], message: str) -> None:
    """Raise ``category`` (level "error") or warn at the user's line (level "warn")."""
    if level == ERROR:
        raise category(message)
    warn_at_user(message, category)


def report_mixed_begin(
    level: str, name: str, kind: str, described: str, autobegun: bool, autobegin: str
) -> None:
    """Report ``{name}.begin()`` called while the ``kind`` (Session, Connection) already had
    the transaction ``described``; ``autobegin`` says how such an object autobegins."""
    if autobegun:
        what = f"{described} ({autobegin})"
        fix = (
            f"Commit or roll back first ({name}.commit() / {name}.rollback()), or begin "
            f"before the first statement: put the whole block in `with {name}.begin():`."
        )
    else:
        what = described
        fix = (
            "Commit or roll back that one first (or put the whole block in one `with "
            f"{name}.begin():`); for a SAVEPOINT inside it, use {name}.begin_nested()."
        )
    message = (
        f"{name}.begin() was called at {capture(1)} while this {kind} already had a "
        f"transaction, {what}. {fix}"
    )
    if level == ERROR:
        raise MixedBeginError(message)
    warn_at_user(message, MixedBeginWarning)


# Warnings delivered away from the user's code share one registry, so the "default"
# action shows each distinct message once, as it does for warnings raised in user code.
_late_registry: dict[Any, Any] = {}


def report_late(level: str, category: type[Warning], message: str, origin: Origin | None) -> None:
    """Deliver a finding made by the garbage collector or the sweep thread, at ``origin``.

    Nothing can catch an exception there: at level "error" it is raised, and Python hands it
    to ``sys.unraisablehook`` (from a finalizer or weakref callback) or the caller reports it.
    """
    if sys.is_finalizing():
        return
    if level == ERROR:
        raise category(message)
    warn_at(origin if origin is not None else UNKNOWN, message, category, _late_registry)


def current_task() -> asyncio.Task[Any] | None:
    """Return the running asyncio task, or None outside one (cheaply, in sync code too)."""
    loop = running_loop()
    return None if loop is None else asyncio.current_task(loop)


def log_end(record: Record) -> None:
    """Log (INFO) a transaction that ended after running longer than the threshold."""
    cfg = settings
    threshold = None if cfg is None else cfg.long_transaction
    if threshold is None:
        return
    age = monotonic() - record.began
    if age >= threshold and logger.isEnabledFor(logging.INFO):
        logger.info(
            "txguard: the %s transaction %s ended after %s (long_transaction=%s s)",
            record.owner, record.describe(), seconds(age), threshold,
        )


def seconds(value: float) -> str:
    """Format a duration for a message."""
    return f"{value:.3g} s" if value < 100 else f"{value:.0f} s"
