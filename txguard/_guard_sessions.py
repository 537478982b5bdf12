"""Guards on every Session, and so on the Session inside every AsyncSession.

SessionEvents do the watching (they cost next to nothing when nobody listens to the
execution of single statements): ``after_transaction_create``/``after_transaction_end``
note where each root transaction began and when it ended, ``do_orm_execute`` keeps the
statement that is about to autobegin one, and ``do_orm_execute``/``before_flush``/
``before_commit`` check which thread and task use the Session. ``Session.begin`` has no
"before" event, so the mixed-begin check wraps it (see ``_guards``).
"""

from __future__ import annotations

import asyncio
import sys
import weakref
from collections.abc import Callable
from threading import get_ident
from time import monotonic
from types import CodeType
from typing import TYPE_CHECKING, Any, Final

from sqlalchemy.orm import Session, SessionTransaction
from sqlalchemy.orm.session import SessionTransactionOrigin

from . import _guard_records as shared
from ._errors import (
    CrossTaskWarning,
    CrossThreadWarning,
    LeakedSessionWarning,
    MixedBeginError,
    MixedBeginWarning,
)
from ._guard_records import (
    ERROR,
    OFF,
    WARNED_TASK,
    WARNED_THREAD,
    Record,
    current_task,
    describe_thread,
    log_end,
    open_transactions,
    report,
    report_late,
)
from ._origin import Origin, _is_library, capture, warn_at_user

if TYPE_CHECKING:
    from sqlalchemy.orm import ORMExecuteState

__all__ = [
    "begin",
    "on_before_commit",
    "on_before_flush",
    "on_orm_execute",
    "on_transaction_create",
    "on_transaction_end",
    "records",
]

_AUTOBEGIN: Final = SessionTransactionOrigin.AUTOBEGIN
_BEGIN: Final = SessionTransactionOrigin.BEGIN

# Helpers that run cleanup (or a timeout) in a task of their own while the calling task
# waits for it: SQLAlchemy's and txguard's run_to_completion, and asyncio.wait_for < 3.12.
_HANDOFF_HELPERS: Final = frozenset({"_run_to_completion", "run_to_completion", "wait_for"})


class SessionRecord(Record):
    """What the guards know of one Session and its current root transaction."""

    __slots__ = ("key", "active", "pending_sql", "pending_at", "begun_at", "task")

    owner = "Session"

    key: int
    active: bool
    pending_sql: object
    pending_at: Origin | None
    begun_at: tuple[CodeType, int] | None
    task: weakref.ref[asyncio.Task[Any]] | None

    def is_open(self) -> bool:
        return self.active


# Records of the Sessions the guards have seen, by id(session); a record removes itself
# when its Session is garbage-collected.
records: dict[int, SessionRecord] = {}


def _track(session: Session) -> SessionRecord:
    key = id(session)
    record = SessionRecord(session, _session_gone)
    record.key = key
    record.active = False
    record.pending_at = record.begun_at = None
    records[key] = record
    return record


def _session_gone(record: SessionRecord) -> None:
    """Forget a garbage-collected Session; report it if it still held its transaction."""
    if records.get(record.key) is record:
        del records[record.key]
    if not record.active:
        return
    open_transactions.pop(id(record), None)
    cfg = shared.settings
    if cfg is None or cfg.leaks == OFF:
        return
    report_late(
        cfg.leaks,
        LeakedSessionWarning,
        f"A Session was garbage-collected while its transaction, {record.describe()}, was "
        "still open: nobody committed, rolled back or closed it, so its work was silently "
        "discarded, and the pooled connection it held (if a statement had run) went back "
        "only because the garbage collector found it. Close every Session: `with "
        "Session(engine) as session:`, `with sessionmaker.begin() as session:`, or "
        "session.close() in a `finally:` block.",
        record.origin,
    )


# Listeners (registered on the Session class by install()).


def on_transaction_create(session: Session, transaction: SessionTransaction) -> None:
    """Note where a root transaction began, how, and in which thread and task."""
    how = transaction.origin
    if how is not _AUTOBEGIN and how is not _BEGIN:
        return  # savepoints and flush subtransactions belong to the root transaction
    cfg = shared.settings
    if cfg is None:
        return
    record = records.get(id(session))
    if record is None:
        record = _track(session)
    where: Origin | tuple[CodeType, int] | None = record.begun_at  # from Session.begin()
    pending_at = record.pending_at
    if where is None:
        where = capture(1)
        if pending_at is not None:
            # The statement counts only if it is the one now autobeginning: same user line.
            record.sql = record.pending_sql if pending_at.frames[:1] == where.frames[:1] else None
            record.pending_sql = record.pending_at = None
        else:
            record.sql = None
    else:
        record.sql = record.pending_sql = record.pending_at = None
    record.where = where
    record.active = True
    record.autobegun = how is _AUTOBEGIN
    record.thread = get_ident()
    record.warned = 0
    if cfg.cross_task == OFF or asyncio._get_running_loop() is None:
        record.task = None
    else:
        task = asyncio.current_task()
        record.task = None if task is None else weakref.ref(task)
    if cfg.long_transaction is not None:
        record.began = monotonic()
        open_transactions[id(record)] = record


def on_transaction_end(session: Session, transaction: SessionTransaction) -> None:
    """Forget the root transaction that just ended (and log it if it ran long)."""
    how = transaction.origin
    if how is not _AUTOBEGIN and how is not _BEGIN:
        return
    record = records.get(id(session))
    if record is None or not record.active:
        return
    if open_transactions.pop(id(record), None) is not None:
        log_end(record)
    record.active = False
    record.sql = record.task = None


def on_orm_execute(state: ORMExecuteState) -> None:
    """Keep a statement about to autobegin a transaction; check who uses the Session."""
    session = state.session
    record = records.get(id(session))
    if record is not None and record.active:
        if record.thread != get_ident() or record.task is not None:
            check_use(session, record, "execute")
        return
    if not session.in_transaction():
        cfg = shared.settings
        if cfg is not None and cfg.mixed_begin != OFF:
            if record is None:
                record = _track(session)
            record.pending_sql = state.statement
            record.pending_at = capture(1)


def on_before_flush(session: Session, flush_context: object, instances: object) -> None:
    record = records.get(id(session))
    if record is not None and record.active:
        if record.thread != get_ident() or record.task is not None:
            check_use(session, record, "flush")


def on_before_commit(session: Session) -> None:
    record = records.get(id(session))
    if record is not None and record.active:
        if record.thread != get_ident() or record.task is not None:
            check_use(session, record, "commit")


# Who uses the Session.


def check_use(session: Session, record: SessionRecord, operation: str) -> None:
    """Report use from another thread, or from another task while the owner runs."""
    cfg = shared.settings
    if cfg is None:
        return
    if record.thread != get_ident():
        level = cfg.cross_thread
        if level != OFF and (level == ERROR or not record.warned & WARNED_THREAD):
            record.warned |= WARNED_THREAD
            report(level, CrossThreadWarning, _cross_thread_message(record, operation))
        return
    owner_ref = record.task
    if owner_ref is None or cfg.cross_task == OFF:
        return
    task = current_task()
    owner = owner_ref()
    if task is owner or task is None:
        return
    if owner is None or owner.done():
        record.task = weakref.ref(task)  # the task that began it has finished: handed over
        return
    if _awaits(owner, task):
        return
    level = cfg.cross_task
    if level == ERROR or not record.warned & WARNED_TASK:
        record.warned |= WARNED_TASK
        report(level, CrossTaskWarning, _cross_task_message(session, record, owner, task, operation))


def _awaits(owner: asyncio.Task[Any], task: asyncio.Task[Any]) -> bool:
    """Say whether ``owner`` is suspended in a helper that waits for ``task`` to finish."""
    coro: Any = owner.get_coro()
    for _ in range(200):
        frame = getattr(coro, "cr_frame", None) or getattr(coro, "gi_frame", None)
        if frame is None:
            return False
        code = frame.f_code
        if code.co_name in _HANDOFF_HELPERS and _is_library(code.co_filename):
            if any(value is task for value in frame.f_locals.values()):
                return True
        coro = getattr(coro, "cr_await", None) or getattr(coro, "gi_yieldfrom", None)
    return False


def _cross_thread_message(record: SessionRecord, operation: str) -> str:
    return (
        f"A Session is used ({operation}) at {capture(1)} in thread "
        f"{describe_thread(get_ident())} while its transaction, {record.describe()} in "
        f"thread {describe_thread(record.thread)}, is still open. A Session is not "
        "thread-safe: give each thread its own (e.g. `with Session(engine) as session:` "
        "inside the thread's function, or txguard.unit_of_work()), or end the transaction "
        "(commit, roll back or close) before another thread takes the Session over."
    )


def _cross_task_message(
    session: Session,
    record: SessionRecord,
    owner: asyncio.Task[Any],
    task: asyncio.Task[Any],
    operation: str,
) -> str:
    from sqlalchemy.ext.asyncio import async_session

    kind = "AsyncSession" if async_session(session) is not None else "Session"
    return (
        f"An {kind} is used ({operation}) at {capture(1)} by task {task.get_name()!r} "
        f"while its transaction, {record.describe()} in task {owner.get_name()!r}, is still "
        f"open and that task is still running. An {kind} is not safe for concurrent use, "
        "and a child task inherits the unit of work of the task that created it: give the "
        "task its own session (txguard.unit_of_work(propagation='requires_new'), or a new "
        "AsyncSession), or await the work in the task that began the transaction."
    )


# Session.begin, wrapped: SQLAlchemy has no event before a begin.

original_begin: Callable[..., SessionTransaction] = Session.begin  # set again by install()


def begin(self: Session, nested: bool = False) -> SessionTransaction:
    """Begin as SQLAlchemy does; first say where the transaction already active began."""
    cfg = shared.settings
    if cfg is None or nested:
        return original_begin(self, nested)
    if self.in_transaction():
        if cfg.mixed_begin != OFF:
            _mixed_begin(self, cfg.mixed_begin)
        return original_begin(self, nested)
    caller = sys._getframe().f_back  # None when begin() runs first in a greenlet
    if caller is None:
        return original_begin(self, nested)
    filename = caller.f_code.co_filename
    if filename[:1] == "<" or _is_library(filename):  # generated code counts as library
        return original_begin(self, nested)
    # Called from user code: its line is the origin, no need to walk the stack for it.
    record = records.get(id(self))
    if record is None:
        record = _track(self)
    record.begun_at = (caller.f_code, caller.f_lineno)
    try:
        return original_begin(self, nested)
    finally:
        record.begun_at = None


def _mixed_begin(session: Session, level: str) -> None:
    record = records.get(id(session))
    if record is None or not record.active:
        described = Record.unknown
        autobegun = False
    else:
        described = record.describe()
        autobegun = record.autobegun
    if autobegun:
        what = f"{described} (a Session begins a transaction by itself when first used)"
        fix = (
            "Commit or roll back first (session.commit() / session.rollback()), or begin "
            "before the first statement: put the whole block in `with session.begin():`."
        )
    else:
        what = described
        fix = (
            "Commit or roll back that one first (or put the whole block in one `with "
            "session.begin():`); for a SAVEPOINT inside it, use session.begin_nested()."
        )
    message = (
        f"session.begin() was called at {capture(1)} while this Session already had a "
        f"transaction, {what}. {fix}"
    )
    if level == ERROR:
        raise MixedBeginError(message)
    warn_at_user(message, MixedBeginWarning)
