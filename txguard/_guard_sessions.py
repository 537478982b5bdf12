"""Guards on every Session, and so on the Session inside every AsyncSession.

SessionEvents do the watching (they cost next to nothing when nobody listens to single
statements): ``after_transaction_create``/``after_transaction_end`` note where each root
transaction began and when it ended, ``do_orm_execute`` keeps the statement that is about
to autobegin one, and ``do_orm_execute``/``before_flush``/``after_transaction_end`` check
which thread and task use the Session. ``Session.begin`` has no "before" event, so the
mixed-begin check wraps it (see ``_guards``).

What the guards know of a transaction lives on the ``SessionTransaction`` itself, so it
goes away with it; a transaction garbage-collected before it ended is a leaked Session.
"""

from __future__ import annotations

import asyncio
import gc
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
from ._origin import Origin, _is_library, _library_cache, capture, warn_at_user

if TYPE_CHECKING:
    from sqlalchemy.orm import ORMExecuteState

__all__ = [
    "KEY",
    "SessionRecord",
    "begin",
    "on_before_flush",
    "on_orm_execute",
    "on_transaction_create",
    "on_transaction_end",
    "record_of",
]

KEY: Final = "_txguard_record"  # the attribute of a root SessionTransaction holding its record
_AUTOBEGIN: Final = SessionTransactionOrigin.AUTOBEGIN
_BEGIN: Final = SessionTransactionOrigin.BEGIN

# Helpers that run cleanup (or a timeout) in a task of their own while the calling task
# waits for it: SQLAlchemy's and txguard's run_to_completion, and asyncio.wait_for < 3.12.
_HANDOFF_HELPERS: Final = frozenset({"_run_to_completion", "run_to_completion", "wait_for"})


class SessionRecord(Record):
    """What the guards know of one root transaction of a Session.

    ``sql`` and ``warned`` are set only when needed (the class defaults stand in).
    """

    __slots__ = (
        "where", "autobegun", "sql", "thread", "began", "warned", "active", "task", "__weakref__"
    )

    owner = "Session"

    active: bool
    task: weakref.ref[asyncio.Task[Any]] | None

    def is_open(self) -> bool:
        return self.active

    def __del__(self) -> None:
        # The transaction is gone. Unless after_transaction_end saw it end, its Session was
        # garbage-collected with the transaction still open.
        if self.active:
            _leaked(self)


def _leaked(record: SessionRecord) -> None:
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


def record_of(session: Session) -> SessionRecord | None:
    """Return the record of ``session``'s open root transaction, if the guards saw it begin."""
    root = session.get_transaction()
    if root is None:
        return None
    record: SessionRecord | None = root.__dict__.get(KEY)
    return record if record is not None and record.active else None


# How many frames above on_transaction_create the Session.begin() wrapper ran last time
# (0: not known yet). The frames between are SQLAlchemy's own and the same every time, so
# sys._getframe(depth), which makes a frame object for that one frame only, finds it.
_begin_depth = 0


def _find_begin_wrapper() -> Any:
    global _begin_depth
    frame: Any = sys._getframe(2)  # on_transaction_create's caller
    depth = 1
    while frame is not None and depth < 30:
        if frame.f_code is _BEGIN_CODE:
            _begin_depth = depth
            return frame
        frame = frame.f_back
        depth += 1
    return None  # begin() was not called through the wrapper (mixed_begin is off)


# (id(session), statement, where) of an ORM execute about to autobegin a transaction.
_pending: tuple[int, object, Origin] | None = None


# Listeners (registered on the Session class by install()).


def on_transaction_create(session: Session, transaction: SessionTransaction) -> None:
    """Note where a root transaction began, how, and in which thread and task."""
    global _pending
    how = transaction.origin
    if how is not _AUTOBEGIN and how is not _BEGIN:
        return  # savepoints and flush subtransactions belong to the root transaction
    cfg = shared.settings
    if cfg is None:
        return
    record = SessionRecord()
    where: Origin | tuple[CodeType, int] | None = None
    if how is _BEGIN:
        # Where the user called Session.begin(): the caller of our wrapper, when it is not
        # library code (sessionmaker.begin(), a txguard unit, generated proxies).
        wrapper: Any = None
        if _begin_depth:
            try:
                wrapper = sys._getframe(_begin_depth)
            except ValueError:
                pass
            if wrapper is not None and wrapper.f_code is not _BEGIN_CODE:
                wrapper = None
        if wrapper is None:
            wrapper = _find_begin_wrapper()
        caller = None if wrapper is None else wrapper.f_back  # None first in a greenlet
        if caller is not None:
            code = caller.f_code
            filename = code.co_filename
            library = _library_cache.get(filename)
            if library is None:
                library = _is_library(filename)
            if not library and filename[:1] != "<":  # generated code is library code too
                where = (code, caller.f_lineno)
    if where is None:
        origin = capture(1)
        where = origin
        pending = _pending
        if pending is not None:
            _pending = None
            # The statement counts only if it is the one now autobeginning it.
            if pending[0] == id(session) and pending[2].frames[:1] == origin.frames[:1]:
                record.sql = pending[1]
    record.where = where
    record.autobegun = how is _AUTOBEGIN
    record.active = True
    record.thread = get_ident()
    if cfg.cross_task == OFF or asyncio._get_running_loop() is None:
        record.task = None
    else:
        task = asyncio.current_task()
        record.task = None if task is None else weakref.ref(task)
    if cfg.long_transaction is not None:
        record.began = monotonic()
        open_transactions[id(record)] = weakref.ref(record)  # weak: the leak guard needs it
    transaction.__dict__[KEY] = record


def on_transaction_end(session: Session, transaction: SessionTransaction) -> None:
    """Mark the root transaction ended; check who ended it; log it if it ran long."""
    record: SessionRecord | None = transaction.__dict__.get(KEY)
    if record is None or not record.active:
        return
    record.active = False
    if open_transactions.pop(id(record), None) is not None:
        log_end(record)
    if record.thread != get_ident() or record.task is not None:
        check_use(session, record, "ends its transaction (commit, rollback or close)")


def on_orm_execute(state: ORMExecuteState) -> None:
    """Keep a statement about to autobegin a transaction; check who uses the Session."""
    session = state.session
    root = session.get_transaction()
    if root is None:
        global _pending
        cfg = shared.settings
        if cfg is not None and cfg.mixed_begin != OFF:
            _pending = (id(session), state.statement, capture(1))
        return
    record = root.__dict__.get(KEY)
    if record is not None and record.active:
        if record.thread != get_ident() or record.task is not None:
            check_use(session, record, "runs a statement")


def on_before_flush(session: Session, flush_context: object, instances: object) -> None:
    root = session.get_transaction()
    record = None if root is None else root.__dict__.get(KEY)
    if record is not None and record.active:
        if record.thread != get_ident() or record.task is not None:
            check_use(session, record, "flushes")


# Who uses the Session.


def check_use(session: Session, record: SessionRecord, operation: str) -> None:
    """Report use from another thread, or from another task while the owner runs."""
    cfg = shared.settings
    if cfg is None:
        return
    if record.thread != get_ident():
        level = cfg.cross_thread
        warned = getattr(record, "warned", 0)
        if level != OFF and (level == ERROR or not warned & WARNED_THREAD):
            record.warned = warned | WARNED_THREAD
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
    warned = getattr(record, "warned", 0)
    if level == ERROR or not warned & WARNED_TASK:
        record.warned = warned | WARNED_TASK
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
        f"A Session {operation} at {capture(1)} in thread {describe_thread(get_ident())}, "
        f"but its transaction was {record.describe()} in thread "
        f"{describe_thread(record.thread)}. A Session is not thread-safe: give each thread "
        "its own (e.g. `with Session(engine) as session:` inside the thread's function, or "
        "txguard.unit_of_work()), or end the transaction (commit, roll back or close) "
        "before another thread takes the Session over."
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
        f"An {kind} {operation} at {capture(1)} in task {task.get_name()!r}, but its "
        f"transaction was {record.describe()} in task {owner.get_name()!r}, which is still "
        f"running. An {kind} is not safe for concurrent use, and a child task inherits the "
        "unit of work of the task that created it: give the task its own session "
        "(txguard.unit_of_work(propagation='requires_new'), or a new AsyncSession), or await "
        "the work in the task that began the transaction."
    )


# Session.begin, wrapped: SQLAlchemy has no event before a begin.

original_begin: Callable[..., SessionTransaction] = Session.begin  # set again by install()


def begin(self: Session, nested: bool = False) -> SessionTransaction:
    """Begin as SQLAlchemy does; first say where the transaction already active began."""
    if not nested and self.in_transaction():
        cfg = shared.settings
        if cfg is not None and cfg.mixed_begin != OFF:
            _mixed_begin(self, cfg.mixed_begin)
    return original_begin(self, nested)


_BEGIN_CODE: Final = begin.__code__


def _mixed_begin(session: Session, level: str) -> None:
    record = record_of(session)
    if record is None:
        described, autobegun = Record.unknown, False
    else:
        described, autobegun = record.describe(), record.autobegun
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


def session_holding(conn: object) -> SessionRecord | None:
    """Find the record of the Session transaction that holds ``conn`` (rare: error path)."""
    for holder in gc.get_referrers(conn):
        if not isinstance(holder, dict):
            continue
        candidates = gc.get_referrers(holder)
        for candidate in list(candidates):
            if isinstance(candidate, dict):
                candidates.extend(gc.get_referrers(candidate))
        for candidate in candidates:
            if isinstance(candidate, SessionTransaction):
                root = candidate
                while root.parent is not None:
                    root = root.parent
                record = root.__dict__.get(KEY)
                if record is not None and record.active:
                    return record  # type: ignore[no-any-return]
    return None
