"""Guards on every Session, and so on the Session inside every AsyncSession.

SessionEvents do the watching (unlike ConnectionEvents, they add no cost to every
statement): ``after_transaction_create``/``after_transaction_end`` note where each root
transaction began and when it ended, ``do_orm_execute`` keeps the statement that is about
to autobegin one, and ``do_orm_execute``/``before_flush``/``before_commit``/
``after_transaction_end`` check which thread and task use the Session. ``Session.begin``
has no "before" event, so the mixed-begin check wraps it (see ``_guards``).

What the guards know of the current transaction lives on the Session itself, so it goes
away with it; a record garbage-collected before its transaction ended is a leaked Session.
"""

from __future__ import annotations

import asyncio
import gc
import os
import sys
import weakref
from collections.abc import Callable, Iterator
from contextvars import ContextVar

import sqlalchemy
from threading import get_ident
from time import monotonic
from types import AsyncGeneratorType, CoroutineType, FrameType, GeneratorType
from typing import TYPE_CHECKING, Any, Final

from sqlalchemy.orm import Session, SessionTransaction
from sqlalchemy.orm.session import SessionTransactionOrigin

from . import _guard_records as guard_records
from ._creation import created_at
from ._errors import (
    CrossTaskWarning,
    CrossThreadWarning,
    LeakedSessionWarning,
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
    report_mixed_begin,
)
from ._origin import Origin, _is_library, capture, is_user_frame
from ._sqla import held_connections, running_loop

if TYPE_CHECKING:
    from sqlalchemy.orm import ORMExecuteState

__all__ = [
    "KEY",
    "THREAD_WATCHED",
    "SessionRecord",
    "begin",
    "on_before_flush",
    "on_orm_execute",
    "on_transaction_create",
    "on_transaction_end",
    "record_of",
    "watch_threads",
]

KEY: Final = "_txguard_record"  # the Session attribute holding its current transaction's record
_AUTOBEGIN: Final = SessionTransactionOrigin.AUTOBEGIN
_BEGIN: Final = SessionTransactionOrigin.BEGIN



class SessionRecord(Record):
    """What the guards know of one root transaction of a Session (``warned`` is set once
    a guard has warned about it; until then it is absent)."""

    __slots__ = (
        "where", "autobegun", "sql", "thread", "began", "warned", "active", "task", "gen",
        "transaction", "created", "lent_by", "refused", "__weakref__",
    )

    owner = "Session"

    active: bool
    transaction: SessionTransaction | None  # while active: the one its Session must hold
    created: Origin | None  # where its Session was created, if the leak guard saw it
    task: weakref.ref[asyncio.Task[Any]] | None  # the task holding it: the one that began it,
    # or a task of its unit it was lent to (see _takes_turn), when ``lent_by`` names those that lent it
    lent_by: tuple[weakref.ref[asyncio.Task[Any]], ...]  # the tasks that lent it, outermost first
    gen: int  # guard_records.generation when it began: records from before an uninstall() are stale
    refused: str  # the name of a task whose flush the cross_task guard refused (absent until then)

    def is_open(self) -> bool:
        """Say whether the Session still holds the transaction.

        Not only whether after_transaction_end was seen: SQLAlchemy skips that event when
        returning the connection raises (a cancelled task, Ctrl-C) after the COMMIT or
        ROLLBACK, although the Session let go of its transaction first.
        """
        transaction = self.transaction
        if not self.active or transaction is None:
            return False
        session = transaction.session
        return session is not None and session.get_transaction() is transaction

    def __del__(self) -> None:
        # The transaction is gone. Unless its Session had let go of it, the Session was
        # garbage-collected with the transaction still open.
        if self.is_open():
            _leaked(self)


def _leaked(record: SessionRecord) -> None:
    cfg = guard_records.settings
    if cfg is None or cfg.leaks == OFF or record.gen != guard_records.generation:
        return
    created = "" if record.created is None else f" created at {record.created}"
    report_late(
        cfg.leaks,
        LeakedSessionWarning,
        f"A Session{created} was garbage-collected while its transaction, "
        f"{record.describe()}, was still open: nobody committed, rolled back or closed "
        f"it{_what_was_lost(record)} Close every Session: `with Session(engine) as "
        "session:`, `with sessionmaker.begin() as session:`, or session.close() in a "
        "`finally:` block.",
        record.origin,
    )


def _what_was_lost(record: SessionRecord) -> str:
    """Say what became of a leaked Session's work and connection (the end of a sentence)."""
    transaction = record.transaction
    held = [] if transaction is None else held_connections(transaction)
    if not held:
        return ", so its work was silently discarded (it held no connection yet)."
    if any(autoclose for _, autoclose in held):
        return (
            ", so its work was silently discarded, and the pooled connection it held went "
            "back only because the garbage collector found it."
        )
    return (
        ". It worked on a Connection it was given (Session(bind=conn)), which is not its to "
        "give back: what it did stays in that Connection's transaction until the "
        "Connection's owner commits or rolls back."
    )


def record_of(session: Session) -> SessionRecord | None:
    """Return the record of ``session``'s open root transaction, if the guards saw it begin."""
    record: SessionRecord | None = session.__dict__.get(KEY)
    if record is None or not record.active or record.gen != guard_records.generation:
        return None
    return record


# How many frames above on_transaction_create the Session.begin() wrapper ran last time
# (0: not known yet). The frames between are SQLAlchemy's own and the same every time, so
# sys._getframe(depth), which makes a frame object for that one frame only, finds it.
_begin_depth = 0


def _find_begin_wrapper() -> Any:
    global _begin_depth
    frame: Any = sys._getframe(3)  # on_transaction_create's caller
    depth = 1
    while frame is not None and depth < 30:
        if frame.f_code is _BEGIN_CODE:
            _begin_depth = depth
            return frame
        frame = frame.f_back
        depth += 1
    return None  # begin() was not called through the wrapper (mixed_begin is off)


def _begin_caller() -> Origin | None:
    """Where the user called Session.begin(): the caller of our wrapper, when it is user
    code (not sessionmaker.begin(), a txguard unit, or a generated proxy)."""
    try:
        wrapper: Any = sys._getframe(_begin_depth + 1)
    except ValueError:
        wrapper = None
    if wrapper is None or wrapper.f_code is not _BEGIN_CODE:
        wrapper = _find_begin_wrapper()
    caller = None if wrapper is None else wrapper.f_back  # None first in a greenlet
    if caller is not None and is_user_frame(caller):
        return Origin(caller.f_code, caller.f_lasti)
    return None


# (id(session), statement, where) of an ORM execute about to autobegin a transaction.
_pending: tuple[int, object, Origin] | None = None


# Listeners (registered on the Session class by install()).


def on_transaction_create(session: Session, transaction: SessionTransaction) -> None:
    """Note where a root transaction began, how, and in which thread and task."""
    global _pending
    settings = guard_records.settings
    if settings is None:
        return
    how = transaction.origin
    where: Origin | None = None
    sql = None
    if how is _BEGIN:
        unit = session.__dict__.get("_txguard_unit")
        if unit is not None:
            where = unit.begins_at()  # a txguard unit beginning its own transaction
        if where is None and settings.wraps_begin:
            where = _begin_caller()
    elif how is not _AUTOBEGIN:
        return  # savepoints and flush subtransactions belong to the root transaction
    if where is None:
        origin = capture(1)
        where = origin
        pending = _pending
        if pending is not None:
            _pending = None
            # The statement counts only if it is the one now autobeginning it.
            if pending[0] == id(session) and pending[2].same_line_as(origin):
                sql = pending[1]
    record = SessionRecord()
    record.where = where
    record.sql = sql
    record.autobegun = how is _AUTOBEGIN
    record.active = True
    record.transaction = transaction
    record.created = created_at(session)
    record.thread = get_ident()
    record.task = None
    record.gen = guard_records.generation
    if settings.watches_tasks and running_loop() is not None:
        task = asyncio.current_task()
        if task is not None:
            record.task = weakref.ref(task)
    if settings.watches_age:
        record.began = monotonic()
        open_transactions[id(record)] = weakref.ref(record)  # weak: the leak guard needs it
    session.__dict__[KEY] = record


def on_transaction_end(session: Session, transaction: SessionTransaction) -> None:
    """Mark the root transaction ended; check who ended it; log it if it ran long."""
    how = transaction.origin
    if how is not _BEGIN and how is not _AUTOBEGIN:
        return
    record = session.__dict__.get(KEY)
    if record is None or not record.active:
        return
    record.active = False
    record.transaction = None
    settings = guard_records.settings
    if (
        settings is not None
        and settings.long_transaction is not None
        and open_transactions.pop(id(record), None) is not None
    ):
        if monotonic() - record.began >= settings.long_transaction:
            log_end(record)
    if record.task is not None:
        check_task(session, record, _ENDS)


def on_orm_execute(state: ORMExecuteState) -> None:
    """Check who uses the Session; keep a statement about to autobegin a transaction."""
    session = state.session
    record = session.__dict__.get(KEY)
    if record is not None and record.active:
        if record.task is not None:
            check_task(session, record, _STATEMENT)
    elif not session.in_transaction():
        global _pending
        cfg = guard_records.settings
        if cfg is not None and cfg.mixed_begin != OFF:
            _pending = (id(session), state.statement, capture(1))


def on_before_flush(session: Session, flush_context: object, instances: object) -> None:
    record = session.__dict__.get(KEY)
    if record is not None and record.active:
        if record.task is not None:
            check_task(session, record, _FLUSHES)


def on_before_commit(session: Session) -> None:
    """Check who commits before the COMMIT goes out, not only once it went through.

    A task that holds the session of a request (see ``_takes_turn``) may still be inside
    SQLAlchemy when the unit commits: the COMMIT would wait for its statement (psycopg's
    connection lock, aiosqlite's queue) and commit what it had done so far. At "error" the
    report refuses the COMMIT, and the unit rolls back.
    """
    record = session.__dict__.get(KEY)
    if record is not None and record.active and record.task is not None:
        check_task(session, record, _COMMITS)
        if hasattr(record, "refused"):
            _refused_flush_pending(session, record)


def _refused_flush_pending(session: Session, record: SessionRecord) -> None:
    """Refuse the COMMIT while what a task's refused flush left pending is still there.

    Refusing a flush (``before_flush``) leaves the objects that task added or changed in
    the session, and the owner's COMMIT would flush them with its own: part of that task's
    work, committed although its flush raised.
    """
    cfg = guard_records.settings
    if cfg is None or cfg.cross_task != ERROR or record.gen != guard_records.generation:
        return
    if not (session.new or session.dirty or session.deleted):
        return
    kind = _kind(session)
    report(
        ERROR,
        CrossTaskWarning,
        f"An {kind} commits the transaction {record.describe()}, but the cross_task guard "
        f"refused a flush of it by task {record.refused!r}, and what that task added or "
        "changed is still pending: the COMMIT would commit part of its work. It is "
        f"refused, and the transaction rolls back. Await every task that uses the {kind} "
        "before its unit ends, or give the task its own session "
        "(txguard.unit_of_work(propagation='requires_new'), or a new AsyncSession).",
    )


# Who uses the Session: threads.

_STATEMENT: Final = "runs a statement"
_FLUSHES: Final = "flushes"
_COMMITS: Final = "commits its transaction"
_ENDS: Final = "ends its transaction (commit, rollback or close)"

# The Session methods the cross_thread guard wraps, and what a call of each does.
THREAD_WATCHED: Final = {
    "execute": _STATEMENT,
    "scalar": _STATEMENT,
    "scalars": _STATEMENT,
    "flush": _FLUSHES,
    "commit": _ENDS,
    "rollback": _ENDS,
    "close": _ENDS,
}

# id(session) -> ident of the thread inside one of its watched methods right now. A forked
# child has only the thread that forked: the others are inside nothing there.
_inside: dict[int, int] = {}
os.register_at_fork(after_in_child=_inside.clear)


def watch_threads(original: Callable[..., Any], operation: str) -> Callable[..., Any]:
    """Wrap the Session method ``original`` so that it notes which thread is inside it.

    A call that finds another thread inside the same Session is concurrent use, the real
    hazard, and is reported; a call after the other thread came out is a hand-over
    (FastAPI's sync dependencies run setup, endpoint and cleanup in three worker threads)
    and is not. No lock: two threads entering in the same instant may go unseen.
    """

    def guarded(self: Session, *args: Any, **kwargs: Any) -> Any:
        key = id(self)
        me = get_ident()
        inside = _inside.get(key)
        if inside is None:
            _inside[key] = me
            try:
                return original(self, *args, **kwargs)
            finally:
                _inside.pop(key, None)
        if inside != me:
            _concurrent_threads(self, inside, operation)
        return original(self, *args, **kwargs)

    guarded.__name__ = original.__name__
    guarded.__qualname__ = original.__qualname__
    guarded.__doc__ = original.__doc__
    return guarded


def _concurrent_threads(session: Session, inside: int, operation: str) -> None:
    cfg = guard_records.settings
    if cfg is None or cfg.cross_thread == OFF:
        return
    record = record_of(session)
    if cfg.cross_thread != ERROR and record is not None:
        warned = getattr(record, "warned", 0)
        if warned & WARNED_THREAD:
            return
        record.warned = warned | WARNED_THREAD
    began = "" if record is None else f"; its transaction was {record.describe()}"
    report(
        cfg.cross_thread,
        CrossThreadWarning,
        f"A Session {operation} at {capture(2)} in thread {describe_thread(get_ident())} "
        f"while thread {describe_thread(inside)} is inside it (running a statement, "
        f"flushing or ending the transaction){began}. A Session is not thread-safe: give "
        "each thread its own (e.g. `with Session(engine) as session:` inside the thread's "
        "function, or txguard.unit_of_work()), or let one thread finish with it before "
        "another takes it over.",
    )


# Who uses the Session: tasks.


def check_task(session: Session, record: SessionRecord, operation: str) -> None:
    """Report use from another task while the task holding the transaction runs: the one
    that began it, or one it was lent to (see ``_takes_turn``)."""
    cfg = guard_records.settings
    if cfg is None or record.gen != guard_records.generation or cfg.cross_task == OFF:
        return
    held = record.task
    if held is None or record.thread != get_ident():
        return
    task = current_task()
    holder = held()
    if task is holder or task is None:
        return
    if holder is None or holder.done():
        lender = _given_back(record)
        if lender is None:
            record.task = weakref.ref(task)  # the task that began it has finished: handed over
            return
        holder = lender  # the task it was lent to has finished
        if task is holder:
            return
    if _awaits(holder, task) or _takes_turn(session, record, holder, task):
        return
    level = cfg.cross_task
    warned = getattr(record, "warned", 0)
    if level == ERROR or not warned & WARNED_TASK:
        record.warned = warned | WARNED_TASK
        if level == ERROR and operation is _FLUSHES:
            record.refused = task.get_name()  # what it added stays pending: see on_before_commit
        message = _cross_task_message(session, record, holder, task, operation)
        report(level, CrossTaskWarning, message)


def _takes_turn(
    session: Session, record: SessionRecord, holder: asyncio.Task[Any], task: asyncio.Task[Any]
) -> bool:
    """Say whether ``task`` takes its turn with the session of a request's unit.

    A unit that follows its context (``txguard.asgi``'s and ``txguard.fastapi``'s, see
    ``follow_context``) serves a request that frameworks move between tasks: Starlette's
    ``BaseHTTPMiddleware`` runs the endpoint in a child task while the request's task waits
    for its response, Quart runs handlers in tasks of their own. So the task holding the
    transaction lends it to a task it started (the first time: any task whose context holds
    the unit), while it is not inside SQLAlchemy itself, and the tasks that lent it (or a
    task one of them awaits alone, such as its COMMIT) use it again while the holder is not
    inside SQLAlchemy. Concurrent use stays reported: a second task started while the first
    still holds it (``gather``, task groups), a task that did not inherit the unit, and any
    use while the task holding the session is inside SQLAlchemy (a statement, flush or
    COMMIT in flight).
    """
    lenders: tuple[weakref.ref[asyncio.Task[Any]], ...] = getattr(record, "lent_by", ())
    if lenders:
        for ref in lenders:
            lender = ref()
            if lender is not None and (task is lender or _awaits(lender, task)):
                return not _busy(holder)  # it uses its session again; the holder keeps it
        held = _held_here.get()
        if held is None or held[0]() is not record or held[1]() is not holder:
            return False  # not started by the holder since it took the session
    else:
        unit = session.__dict__.get("_txguard_unit")
        if unit is None or not unit.lends_to_running_task():
            return False
    if _busy(holder):
        return False
    record.lent_by = (*lenders, weakref.ref(holder))
    record.task = taken = weakref.ref(task)
    _held_here.set((weakref.ref(record), taken))
    return True


# In the context of the task a transaction was lent to, for the tasks it starts: the record
# and that task (see _takes_turn). Weak, so that it keeps no record from the leak guard.
_held_here: ContextVar[
    tuple[weakref.ref[SessionRecord], weakref.ref[asyncio.Task[Any]]] | None
] = ContextVar("txguard_held_here", default=None)


def _given_back(record: SessionRecord) -> asyncio.Task[Any] | None:
    """Give a transaction lent to a task that has finished back to the innermost task that
    lent it and still runs; return that task, or None if it was not lent or they all ended."""
    lenders: tuple[weakref.ref[asyncio.Task[Any]], ...] = getattr(record, "lent_by", ())
    while lenders:
        ref, lenders = lenders[-1], lenders[:-1]
        lender = ref()
        if lender is not None and not lender.done():
            record.lent_by = lenders
            record.task = ref
            return lender
    record.lent_by = ()
    return None


_SQLALCHEMY_DIR: Final = os.path.dirname(os.path.abspath(sqlalchemy.__file__)) + os.sep


def _busy(task: asyncio.Task[Any], depth: int = 0) -> bool:
    """Say whether ``task`` is suspended inside SQLAlchemy (a statement, flush or COMMIT in
    flight), itself or in a task it awaits alone in library code (txguard's COMMIT task).

    Any SQLAlchemy await counts, whichever session it serves: in doubt, the use is reported.
    """
    innermost = None
    for frame in _await_chain(task):
        if frame.f_code.co_filename.startswith(_SQLALCHEMY_DIR):
            return True
        innermost = frame
    if innermost is None or depth > 3 or not _is_library(innermost.f_code.co_filename):
        return False
    return any(
        isinstance(value, asyncio.Task) and not value.done() and _busy(value, depth + 1)
        for value in innermost.f_locals.values()
    )


def _awaits(owner: asyncio.Task[Any], task: asyncio.Task[Any]) -> bool:
    """Say whether ``owner`` is suspended awaiting ``task`` alone, in library code that started it.

    SQLAlchemy closes (and commits) an ``async with`` session in a task of its own that the
    owner awaits, shielded; txguard settles async units in a task of its own too, and
    ``asyncio.wait_for`` (before Python 3.12) runs its awaitable in a task: the owner is
    suspended until that task ends, so the session is handed over, not guard_records. Found by
    following the owner's chain of awaits to its innermost frame, which must be a library
    frame holding ``task`` itself. The chain passes through the async generators of
    ``@asynccontextmanager`` (FastAPI's dependencies with ``yield``) too.
    """
    innermost = None
    for innermost in _await_chain(owner):
        pass
    if innermost is None or not _is_library(innermost.f_code.co_filename):
        return False
    return any(value is task for value in innermost.f_locals.values())


def _await_chain(task: asyncio.Task[Any]) -> Iterator[FrameType]:
    """Yield the frames of ``task``'s suspended chain of awaits, outermost first."""
    awaiting: Any = task.get_coro()
    for _ in range(500):
        frame, awaiting = _awaited_by(awaiting)
        if frame is None:
            return
        yield frame


def _awaited_by(awaitable: object) -> tuple[FrameType | None, object]:
    """Return the frame of a suspended awaitable and what that frame awaits in turn."""
    if isinstance(awaitable, CoroutineType):
        return awaitable.cr_frame, awaitable.cr_await
    if isinstance(awaitable, GeneratorType):
        return awaitable.gi_frame, awaitable.gi_yieldfrom
    if isinstance(awaitable, AsyncGeneratorType):
        return awaitable.ag_frame, awaitable.ag_await
    if awaitable is not None and type(awaitable).__name__ in _ASYNC_GENERATOR_STEPS:
        # What `async for` and @asynccontextmanager await (agen.asend(), agen.athrow()) has
        # no attribute naming its generator; the garbage collector's references do.
        for referent in gc.get_referents(awaitable):
            if isinstance(referent, AsyncGeneratorType):
                return referent.ag_frame, referent.ag_await
    return None, None


_ASYNC_GENERATOR_STEPS: Final = frozenset({"async_generator_asend", "async_generator_athrow"})


def _cross_task_message(
    session: Session,
    record: SessionRecord,
    holder: asyncio.Task[Any],
    task: asyncio.Task[Any],
    operation: str,
) -> str:
    kind = _kind(session)
    lenders: tuple[weakref.ref[asyncio.Task[Any]], ...] = getattr(record, "lent_by", ())
    lender = lenders[0]() if lenders else None
    if operation is _COMMITS and _busy(holder):
        return _commit_message(kind, record, lender or holder, holder)
    running = (
        "which is still running" if lender is None
        else f"and task {holder.get_name()!r}, which is still running, uses it"
    )
    return (
        f"An {kind} {operation} at {capture(1)} in task {task.get_name()!r}, but its "
        f"transaction was {record.describe()} in task {(lender or holder).get_name()!r}, "
        f"{running}. An {kind} is not safe for concurrent use, and a child task inherits the "
        "unit of work of the task that created it: give the task its own session "
        "(txguard.unit_of_work(propagation='requires_new'), or a new AsyncSession), or await "
        "the work in the task that began the transaction."
    )


def _kind(session: Session) -> str:
    from sqlalchemy.ext.asyncio import async_session

    return "AsyncSession" if async_session(session) is not None else "Session"


def _commit_message(
    kind: str, record: SessionRecord, began: asyncio.Task[Any], inside: asyncio.Task[Any]
) -> str:
    """Say that the transaction commits while ``inside`` is suspended inside SQLAlchemy."""
    cfg = guard_records.settings
    if cfg is not None and cfg.cross_task == ERROR:
        outcome = (
            "would wait for that statement and commit only part of the task's work: it "
            "is refused, and the transaction rolls back"
        )
    else:
        outcome = "waits for that statement and commits only part of the task's work"
    return (
        f"An {kind} commits the transaction {record.describe()} in task "
        f"{began.get_name()!r} while task {inside.get_name()!r}, still running, is inside "
        f"it (a statement or flush in flight{_suspended_at(inside)}): the COMMIT {outcome}. "
        f"Await every task that uses the {kind} before its unit ends (the session of a web "
        "request: before the endpoint returns), or give the task its own session "
        "(txguard.unit_of_work(propagation='requires_new'), or a new AsyncSession)."
    )


def _suspended_at(task: asyncio.Task[Any]) -> str:
    """Say where the user's code in ``task`` awaits SQLAlchemy, if it does (for a message)."""
    user = None
    for frame in _await_chain(task):
        if frame.f_code.co_filename.startswith(_SQLALCHEMY_DIR):
            break
        if is_user_frame(frame):
            user = frame
    return "" if user is None else f", awaited at {Origin(user.f_code, user.f_lasti)}"


# Session.begin, wrapped: SQLAlchemy has no event before a begin.

original_begin: Callable[..., SessionTransaction] = Session.begin  # set again by install()


def begin(self: Session, nested: bool = False) -> SessionTransaction:
    """Begin as SQLAlchemy does; first say where the transaction already active began."""
    if not nested and self._transaction is not None:
        cfg = guard_records.settings
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
    report_mixed_begin(
        level, "session", "Session", described, autobegun,
        "a Session begins a transaction by itself when first used",
    )


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
                record = record_of(candidate.session)
                if record is not None:
                    return record
    return None
