"""Units of work: the transaction logic, written once and driven from sync or async code.

A unit is one block's stack frame: it either begins a ``Transaction`` (its own session's,
a savepoint in the active one, or a commit-as-you-go session) or joins the active unit's
``Transaction``, which then has two frames referencing it. ``open_unit`` carries out what
``_propagation.plan`` decides from the propagation, and ``settle`` ends it: commit,
release, roll back, or mark the shared transaction rollback-only. ``end`` (and ``aend``)
takes the unit off its stack and settles it, and ``leave`` delivers what that left: the
with-block, ``@transactional`` and ``connect()`` all finish through them.
Both are plain functions over a sync ``Session``; the asyncio driver runs the same
functions inside SQLAlchemy's greenlet bridge, exactly as ``AsyncSession`` drives
``Session`` (async is a thin driver, the logic exists once).
"""

from __future__ import annotations

import asyncio
import enum
import logging
import sys
import threading
from time import monotonic
from typing import TYPE_CHECKING, Any, Final, TypeVar

from sqlalchemy.orm import Session, SessionTransaction
from sqlalchemy.exc import DBAPIError
from sqlalchemy.util import greenlet_spawn

from ._async import completed
from ._callbacks import NO_CALLBACKS, Callback, run_callbacks, undone
from ._errors import (
    ConfigurationError,
    CrossTaskWarning,
    DisciplineError,
    UncommittedWorkWarning,
    UnexpectedRollbackError,
    mark_after_commit,
)
from ._failures import Failure, aborted, aborted_error, first_failure
from ._options import (
    DEFAULT_OPTIONS,
    Mode,
    Propagation,
    UnitOptions,
    cached_options,
)
from ._origin import Origin, caller_origin, warn_at_user
from ._propagation import Plan, plan
from ._registry import Registry, check_registry, resolve
from ._retry import _sqlstate, is_retryable, retry_wanted
from ._transaction import Role, Transaction, TransactionState
from ._transaction import in_progress as _in_progress
from ._sessions import first_change, seal
from ._sqla import commit_state, held_connections

if TYPE_CHECKING:
    from contextvars import ContextVar, Token
    from types import TracebackType

    from sqlalchemy.ext.asyncio import AsyncSession

__all__ = [
    "Finish", "Unit", "UnitOfWork", "UnitState", "adopt", "aend", "aleave", "current_unit", "end",
    "end_joined", "ended_uncommitted", "follow_context", "joinable", "leave", "live",
    "open_unit", "settle", "unit_in_progress", "unit_of_work",
]

logger = logging.getLogger("txguard")

class UnitState(enum.Enum):
    """Where a unit of work is in its life; only an ACTIVE unit can be current."""

    READY = "ready"  # created; its block has not begun
    ACTIVE = "active"  # its block runs in the unit
    OUTSIDE = "outside"  # its block runs without a unit (propagation="never" outside any)
    ORPHANED = "orphaned"  # rolled back because a unit around it ended first; not exited yet
    ENDED = "ended"  # its block has exited


_T = TypeVar("_T")
# Each read of an enum member through its class (``UnitState.ACTIVE``) is a type-attribute
# lookup that CPython 3.11 does not specialise, and an ORM transaction evicts the type cache
# it would hit: measured with callgrind (benchmarks/instructions.py, REQUIRED join row),
# reading the members through the class cost +61k instructions per transaction against
# +28k with these module constants. So the hot paths read them here.
_MODE_BEGIN_ONCE: Final = Mode.BEGIN_ONCE
_MODE_COMMIT_AS_YOU_GO: Final = Mode.COMMIT_AS_YOU_GO
_PLAN_BEGIN: Final = Plan.BEGIN
_PLAN_JOIN: Final = Plan.JOIN
_PLAN_NO_UNIT: Final = Plan.NO_UNIT
_PLAN_SAVEPOINT: Final = Plan.SAVEPOINT
_ROLE_BEGINS: Final = Role.BEGINS
_ROLE_JOINS: Final = Role.JOINS
_ROLE_SAVEPOINT: Final = Role.SAVEPOINT
_STATE_ACTIVE: Final = UnitState.ACTIVE
_STATE_ENDED: Final = UnitState.ENDED
_STATE_ORPHANED: Final = UnitState.ORPHANED
_STATE_OUTSIDE: Final = UnitState.OUTSIDE
_STATE_READY: Final = UnitState.READY
_REQUIRED: Final = Propagation.REQUIRED
_TX_ACTIVE: Final = TransactionState.ACTIVE
_TX_ROLLBACK_ONLY: Final = TransactionState.ROLLBACK_ONLY
_TX_COMMITTED: Final = TransactionState.COMMITTED
_TX_ROLLED_BACK: Final = TransactionState.ROLLED_BACK
_TX_IN_DOUBT: Final = TransactionState.IN_DOUBT


class Unit:
    """One unit of work's stack frame: a block (or a call) running in a transaction.

    What belongs to the block is here: its options, where it was opened, how it stands to
    its ``transaction`` (``role``), the unit that was current when it was opened, the
    thread that may use it and its own life (``state``). What belongs to the transaction
    (its state, callbacks, caught failures, session) is on the ``Transaction`` it runs in,
    which units that join it share.

    Units have slots, and ``open_unit`` sets every attribute that is read before it is
    set elsewhere. An ORM transaction touches so many types that CPython's type-lookup
    cache misses on nearly every lookup in the type, which a class-level default costs on
    each read; and an instance dict may lose the fast path when a process creates many
    objects of a class before one sets a new attribute. Slots have neither problem.
    """

    __slots__ = ("opts", "where", "role", "transaction", "previous", "thread", "state", "ended_by")

    opts: UnitOptions
    where: Origin  # where it was opened (a ``with`` block, or a ``@transactional`` function)
    role: Role
    transaction: Transaction  # the one it began, or the one it joined
    state: UnitState
    previous: Unit | None  # the unit that was current when it was opened
    thread: int  # the ident of the thread that may use it (see adopt)
    ended_by: Unit | None  # set when it is ORPHANED: the unit around it that ended first

    @property
    def session(self) -> Any:
        """The session its block uses: a Session, or an AsyncSession."""
        return self.transaction.session

    def begins_at(self) -> Origin | None:
        """Where the transaction being begun on this unit's session began, for the guards.

        A begin-once unit begins its transaction itself at its ``with`` line (a user's
        session.begin() is refused before it begins), so the guards need not walk the
        stack for it; other units answer None.
        """
        return self.where if self.transaction.mode is _MODE_BEGIN_ONCE else None

    # The user's calls of the session's own methods, routed here by the session class of
    # the unit that opened the session (_sessions._guarded_methods).

    def session_commit(self) -> None:
        transaction = self.transaction
        if transaction.mode is _MODE_BEGIN_ONCE:
            raise DisciplineError(
                f"session.commit() inside the begin-once unit opened at {self.where}: the "
                "unit commits when its block ends (and rolls back if an exception leaves "
                "it). Remove the call; to commit part of the work on its own, run it in a "
                "unit with propagation='requires_new', or open this unit with "
                "mode='commit_as_you_go'."
            )
        self._refuse_inside_inner_unit("commit")
        sync = transaction.sync_session
        if transaction.state is _TX_ROLLBACK_ONLY or transaction.failures:
            transaction.session_class.rollback(sync)
            if transaction.state is _TX_ROLLBACK_ONLY:
                error = unexpected_rollback(transaction)
            else:
                error = caught_failure(
                    transaction.failures[0],
                    f"session.commit() in the commit-as-you-go unit opened at {self.where} "
                    "was refused",
                    "the transaction has been rolled back",
                )
            transaction.begin_again(_TX_ROLLED_BACK)
            self.run_callbacks_outside(committed=False, in_flight=True)
            raise error
        begun = sync.get_transaction()
        if aborted(begun):
            transaction.session_class.rollback(sync)
            transaction.begin_again(_TX_ROLLED_BACK)
            self.run_callbacks_outside(committed=False, in_flight=True)
            raise aborted_error(
                f"session.commit() in the commit-as-you-go unit opened at {self.where} was "
                "refused"
            )
        try:
            transaction.session_class.commit(sync)
        except BaseException as error:
            if begun is not None and _commit_went_through(transaction, begun):
                mark_after_commit(error)  # committed all the same: its callbacks run
                transaction.begin_again(_TX_COMMITTED)
                self.run_callbacks_outside(committed=True, in_flight=True)
            raise
        transaction.begin_again(_TX_COMMITTED)
        self.run_callbacks_outside(committed=True, in_flight=False)

    def session_rollback(self) -> None:
        transaction = self.transaction
        if transaction.mode is _MODE_BEGIN_ONCE:
            raise DisciplineError(
                f"session.rollback() inside the begin-once unit opened at {self.where}: "
                "raise an exception to roll the unit back, or use session.begin_nested() / "
                "propagation='nested' to undo part of the work."
            )
        self._refuse_inside_inner_unit("rollback")
        transaction.session_class.rollback(transaction.sync_session)
        transaction.begin_again(_TX_ROLLED_BACK)
        self.run_callbacks_outside(committed=False, in_flight=False)

    def _refuse_inside_inner_unit(self, call: str) -> None:
        """Refuse ``session.commit()``/``rollback()`` of this commit-as-you-go unit while a
        savepoint unit or a begin-once unit that joined it runs: that unit's block still
        counts on the transaction it runs in."""
        current = current_unit(self.transaction.registry)
        if current is None or current is self:
            return
        transaction = current.transaction
        if transaction is not self.transaction and transaction.root is self.transaction:
            raise DisciplineError(
                f"session.{call}() inside the savepoint unit opened at {current.where}: the "
                "savepoint is released when its block ends (raise an exception to roll it "
                f"back); {call} after it."
            )
        if (
            current.role is _ROLE_JOINS
            and transaction is self.transaction
            and current.opts.mode is _MODE_BEGIN_ONCE
        ):
            raise DisciplineError(
                f"session.{call}() inside the begin-once unit opened at {current.where}, "
                f"which joined the commit-as-you-go unit opened at {self.where}: only that "
                "unit commits or rolls back. Remove the call (raise an exception to roll back), "
                "or give this unit mode='commit_as_you_go'."
            )

    def run_callbacks_outside(self, committed: bool, in_flight: bool) -> None:
        """Run the callbacks of a commit-as-you-go transaction that ended inside the unit's
        block, with the registry's stack as it was before the unit opened: a unit opened in
        a callback begins its own transaction instead of joining the next one (SPEC §4)."""
        callbacks = self.transaction.take_callbacks(committed)
        if not callbacks:
            return
        var = self.transaction.registry._var
        token = var.set(self.previous)
        try:
            run_callbacks(callbacks, committed, in_flight)
        finally:
            var.reset(token)

    def session_begin(self) -> None:
        if self.transaction.mode is _MODE_BEGIN_ONCE:
            raise DisciplineError(
                f"session.begin() inside the begin-once unit opened at {self.where}: the "
                "unit already began the transaction. Use the session as it is, or "
                "session.begin_nested() for a savepoint."
            )

    def session_close(self, call: str) -> None:
        if self.transaction.mode is _MODE_BEGIN_ONCE:
            raise DisciplineError(
                f"session.{call}() inside the begin-once unit opened at {self.where}: "
                "closing now would silently discard the transaction. The unit closes its "
                "session when the block ends."
            )


class Finish:
    """What is left to do once a unit's transaction has ended and its session is closed."""

    __slots__ = ("callbacks", "committed", "warning")

    def __init__(
        self, callbacks: list[Callback], committed: bool, warning: str | None = None
    ) -> None:
        self.callbacks = callbacks
        self.committed = committed
        self.warning = warning

    def deliver(self, in_flight: bool) -> None:
        """Emit the warning at the user's line, then run the callbacks."""
        if self.warning is not None:
            warn_at_user(self.warning, UncommittedWorkWarning)
        if self.callbacks:
            run_callbacks(self.callbacks, self.committed, in_flight)

    async def adeliver(self, in_flight: bool) -> None:
        """Deliver for an async unit: the callbacks run in the greenlet bridge, which awaits
        the async ones (the warning is emitted here, where the user's frames are)."""
        if self.warning is not None:
            warn_at_user(self.warning, UncommittedWorkWarning)
        if self.callbacks:
            await greenlet_spawn(run_callbacks, self.callbacks, self.committed, in_flight)


def leave(finish: Finish | None, error: BaseException | None, exc: BaseException | None) -> None:
    """The last step of every block txguard ends (a unit's ``with`` block, a
    ``@transactional`` call, a ``connect()`` block): deliver what its end left, then raise
    ``error`` unless it is ``exc``, the exception already leaving the block."""
    if finish is not None:
        finish.deliver(in_flight=error is not None)
    if error is not None and error is not exc:
        raise error


async def aleave(
    finish: Finish | None, error: BaseException | None, exc: BaseException | None
) -> None:
    """``leave`` for an async block."""
    if finish is not None:
        await finish.adeliver(in_flight=error is not None)
    if error is not None and error is not exc:
        raise error


# Opening a unit.


def open_unit(registry: Registry, unit: Unit) -> Unit | None:
    """Begin, join or take a savepoint as ``_propagation.plan`` says; return ``unit``.

    ``unit`` is a new unit holding only its options and origin; this fills in the rest.
    Returns None for ``propagation="never"`` outside any unit (the call runs without one).
    The caller pushes the unit on ``registry._var`` and later passes it to ``settle``.
    """
    opts = unit.opts
    current = registry._var.get()
    if current is not None:
        current = live(current)
    unit.previous = current
    unit.thread = threading.get_ident()
    outer = None if current is None else current.transaction
    if outer is None:
        step = plan(opts.propagation, opts.durable, unit.where, None, None)
    else:
        where = outer.where
        step = plan(
            opts.propagation, opts.durable, unit.where, where if outer.transactional else None,
            where,
        )
        if step is _PLAN_JOIN:
            if opts.isolation_level is not None:
                _check_isolation(outer, unit)
            unit.role = _ROLE_JOINS
            unit.transaction = outer
            return unit
        if step is _PLAN_SAVEPOINT:
            return _savepoint(outer, unit)
    if step is _PLAN_NO_UNIT:
        return None
    transactional = step is _PLAN_BEGIN
    key = opts.session_key if transactional else (True, opts.read_only, opts.isolation_level)
    session = (registry._factories.get(key) or registry.session_factory(*key))()
    sync: Session = session.sync_session if registry.is_async else session
    base = registry.base_class
    commit_as_you_go, _, isolation_level = key
    transaction = unit.transaction = Transaction(
        unit.where, None, _MODE_COMMIT_AS_YOU_GO if commit_as_you_go else _MODE_BEGIN_ONCE,
        transactional, registry, session, sync, base, isolation_level,
    )
    unit.role = _ROLE_BEGINS
    sync._txguard_unit = unit  # type: ignore[attr-defined]  # before begin: the guards ask it
    transaction.begun = None if commit_as_you_go else base.begin(sync)
    return unit


def _check_isolation(outer: Transaction, unit: Unit) -> None:
    wanted = unit.opts.isolation_level
    if wanted != outer.isolation_level:
        actual = outer.isolation_level or _effective_isolation(outer)
        if actual != wanted:
            raise DisciplineError(
                f"The unit opened at {unit.where} asks for isolation_level={wanted!r} but "
                f"would join the transaction of the unit opened at {outer.where}, "
                f"which runs at {actual!r}. Use propagation='requires_new' for its own "
                "transaction, or set the level on the outer unit."
            )


def _effective_isolation(transaction: Transaction) -> str:
    level: str = transaction.sync_session.connection().get_isolation_level()
    return level.upper().replace("_", " ")


def _savepoint(outer: Transaction, unit: Unit) -> Unit:
    if unit.opts.isolation_level is not None:
        _check_isolation(outer, unit)
    savepoint = Transaction(
        unit.where, outer, _MODE_BEGIN_ONCE, True, outer.registry, outer.session,
        outer.sync_session, outer.session_class, outer.isolation_level,
    )
    savepoint.begun = outer.sync_session.begin_nested()
    unit.role = _ROLE_SAVEPOINT
    unit.transaction = savepoint
    return unit


# Ending a unit.


def settle(unit: Unit, exc: BaseException | None) -> tuple[Finish | None, BaseException | None]:
    """End ``unit`` after its body finished (``exc`` is what escaped it, if any).

    Never raises: returns what is left to deliver and the exception the unit must raise
    (``exc`` itself, or a new error chained to it), or None when it returns normally.
    A unit that joined and a begin-once unit (the common cases) are settled here.
    """
    role = unit.role
    tx = unit.transaction
    if role is not _ROLE_BEGINS:
        if role is _ROLE_JOINS:
            if exc is not None and _rolls_back(unit.opts, exc):
                tx.mark_rollback_only(exc, unit.where)
            return None, exc
        return None, _settle_savepoint(unit, tx, exc)
    if tx.mode is not _MODE_BEGIN_ONCE:
        return _settle_commit_as_you_go(tx, exc)
    sync = tx.sync_session
    sync._txguard_unit = None  # type: ignore[attr-defined]
    transaction: SessionTransaction = tx.begun  # type: ignore[assignment]
    error = exc
    committed = False
    try:
        if exc is not None and _rolls_back(unit.opts, exc):
            _rollback(transaction, exc)
        elif tx.state is _TX_ROLLBACK_ONLY:
            _rollback(transaction, exc)
            if exc is None:
                error = unexpected_rollback(tx)
        elif tx.failures:
            _rollback(transaction, exc)
            if exc is None:
                error = caught_failure(
                    tx.failures[0],
                    f"The unit opened at {unit.where} could not commit",
                    "its transaction has been rolled back",
                )
        elif not transaction.is_active:
            if sync.get_transaction() is transaction:
                _rollback(transaction, exc)
                if exc is None:
                    error = _deactivated(tx)
            else:
                # The user's own commit() or rollback(): which one ran is not known here, so
                # neither set of callbacks may run.
                dropped = bool(tx.callbacks)
                tx.callbacks = NO_CALLBACKS
                if exc is None:
                    error = _ended_inside(unit, dropped)
        elif aborted(transaction):
            _rollback(transaction, exc)
            if exc is None:
                error = aborted_error(f"The unit opened at {unit.where} could not commit")
        else:
            try:
                transaction.commit()
                committed = True
            except BaseException as commit_error:
                if _commit_went_through(tx, transaction):
                    committed = True  # an after_commit listener failed, or an interrupt came
                    mark_after_commit(commit_error)
                else:
                    tx.move_to(_TX_IN_DOUBT)  # for retries: COMMIT may have been sent
                    _rollback(transaction, commit_error)
                if exc is not None and commit_error.__context__ is None:
                    commit_error.__context__ = exc
                error = commit_error
    finally:
        if committed:
            tx.move_to(_TX_COMMITTED)
        elif tx.state is not _TX_IN_DOUBT:
            tx.move_to(_TX_ROLLED_BACK)
        try:
            tx.session_class.close(sync)
        except BaseException as close_error:
            if error is None:
                error = close_error
                if committed:
                    mark_after_commit(close_error)
            else:
                logger.warning("txguard: closing the session failed", exc_info=True)
        finally:
            seal(sync, tx.where)
    if tx.callbacks:
        return Finish(tx.take_callbacks(committed), committed), error
    return None, error


def _commit_went_through(tx: Transaction, transaction: SessionTransaction) -> bool:
    """Say whether the database committed before ``transaction.commit()`` raised.

    SQLAlchemy marks the transaction COMMITTED once every connection committed, then runs
    the ``after_commit`` listeners and closes it (CLOSED): what fails there, or interrupts
    it, comes after the data is committed. Before COMMIT it is still ACTIVE or PREPARED (or
    DEACTIVE after a failed flush); only a two-phase PREPARE that failed closes it too.
    SessionTransaction has no public flag for this.
    """
    state = commit_state(transaction)
    return state == "committed" or (state == "closed" and not tx.sync_session.twophase)


def _rolls_back(opts: UnitOptions, exc: BaseException) -> bool:
    if opts.rolls_back(exc):
        return True
    # The server already rolled the transaction (or the statement) back, or dropped the
    # connection: a commit now would report work as committed that is gone.
    return is_retryable(exc) or (opts.retries > 0 and retry_wanted(opts, exc))


def _settle_savepoint(
    unit: Unit, tx: Transaction, exc: BaseException | None
) -> BaseException | None:
    savepoint = tx.begun
    assert savepoint is not None, "a savepoint unit always has its savepoint"
    parent = tx.parent
    error = exc
    released = False
    try:
        if exc is not None and _rolls_back(unit.opts, exc):
            savepoint.rollback()
        elif tx.state is _TX_ROLLBACK_ONLY:
            savepoint.rollback()
            if exc is None:
                error = unexpected_rollback(tx)
        elif (failure := first_failure(tx.root, savepoint)) is not None:
            savepoint.rollback()
            if exc is None:
                error = caught_failure(
                    failure,
                    f"The savepoint unit opened at {unit.where} could not be released",
                    "its savepoint has been rolled back",
                )
        elif not savepoint.is_active:
            savepoint.rollback()
            if exc is None:
                error = _deactivated(tx)
        else:
            try:
                savepoint.commit()
                released = True
            except BaseException as release_error:
                if savepoint.is_active:
                    savepoint.rollback()
                error = release_error
    except BaseException as rollback_error:
        # MySQL/MariaDB end the whole transaction on a deadlock, savepoints included: keep
        # the error that caused it (the unit that began the transaction may retry on it)
        # and let nothing commit.
        if exc is None:
            error = rollback_error
        if parent is not None:
            parent.root.mark_rollback_only(exc or rollback_error, unit.where)
    if released:
        tx.move_to(_TX_COMMITTED)
    elif tx.state is not _TX_IN_DOUBT:
        tx.move_to(_TX_ROLLED_BACK)
    if parent is not None:
        for cb in tx.callbacks:
            if released or not undone(cb):
                parent.add_callback(cb)
    return error


def _settle_commit_as_you_go(
    tx: Transaction, exc: BaseException | None
) -> tuple[Finish, BaseException | None]:
    sync = tx.sync_session
    sync._txguard_unit = None  # type: ignore[attr-defined]
    warning = None
    error = exc
    try:
        if exc is None:
            warning = _uncommitted_work(tx)
        elif (begun := sync.get_transaction()) is not None and _discards(begun, exc):
            _rollback(begun, exc)
    finally:
        tx.move_to(_TX_ROLLED_BACK)  # closing the session rolls back what it had not committed
        try:
            tx.session_class.close(sync)
        except BaseException as close_error:
            if error is None:
                error = close_error
        finally:
            seal(sync, tx.where)
    return Finish(tx.take_callbacks(committed=False), False, warning), error


def _rollback(transaction: SessionTransaction, cause: BaseException | None) -> None:
    try:
        if _discards(transaction, cause):
            transaction.session.invalidate()
        else:
            transaction.rollback()
    except Exception as rollback_error:
        if cause is None:
            raise
        logger.warning(
            "txguard: rolling back after %s failed too: %s",
            describe_exception(cause), describe_exception(rollback_error),
        )


def _discards(transaction: SessionTransaction, cause: BaseException | None) -> bool:
    """Say whether a unit ending with ``cause`` rolls ``transaction`` (its session's root)
    back by discarding its connections.

    It does when the cross_task guard found another task inside its session: that task may
    be mid-statement (stuck on a lock, say), and a ROLLBACK would wait for it behind
    psycopg's connection lock, and the request's error response with it (asyncpg refuses
    it instead). Closing the connection to a server rolls the transaction back there
    without waiting, and the other task's statement fails instead of running on. Not on
    SQLite: the file stays locked until the connection really closes, and an aiosqlite
    connection discarded mid-statement left it locked for the transactions that followed.
    """
    return isinstance(cause, CrossTaskWarning) and all(
        conn.dialect.name != "sqlite" for conn, _ in held_connections(transaction)
    )


def _uncommitted_work(tx: Transaction) -> str | None:
    sync = tx.sync_session
    first = first_change(sync)
    counts = [
        f"{n} {what}"
        for what, n in (
            ("new", len(sync.new)),
            ("modified", sum(1 for obj in sync.dirty if sync.is_modified(obj))),
            ("deleted", len(sync.deleted)),
        )
        if n
    ]
    if not counts and first is None:
        return None
    what = f"{', '.join(counts)} object(s) never flushed" if counts else ""
    if first is not None:
        what = f"{what}; " if what else ""
        what += f"changes since the last commit, the first made at {first}"
    return (
        f"The commit-as-you-go unit opened at {tx.where} ended with uncommitted work "
        f"({what}); it was rolled back. Call session.commit() before the block ends, or "
        "session.rollback() to discard it on purpose."
    )


def describe_exception(exc: BaseException) -> str:
    """Name an exception by its type, never by its text.

    Any exception's text may hold values: a database error echoes the row it refused
    (``Key (email)=(...)``), an application's quotes its arguments. A DBAPIError is named
    with the driver's exception class; a driver's own exception (raised through a raw
    cursor, which SQLAlchemy never wraps) with the SQLSTATE the driver reports, if any.
    """
    if isinstance(exc, DBAPIError):
        return f"{type(exc).__name__} ({type(exc.orig).__name__} from the database)"
    code = _sqlstate(exc)
    return f"{type(exc).__name__} (SQLSTATE {code})" if code else type(exc).__name__


def unexpected_rollback(tx: Transaction) -> UnexpectedRollbackError:
    cause = tx.rollback_cause
    error = UnexpectedRollbackError(
        f"The unit opened at {tx.where} could not commit: the unit opened at "
        f"{tx.rollback_unit} joined its transaction and failed at {tx.rollback_site} "
        f"with {describe_exception(cause) if cause else 'an error'}, which was caught, so "
        "the transaction was marked rollback-only and has been rolled back. Let the "
        "exception propagate, or run the work that may fail in its own savepoint "
        "(propagation='nested') or transaction (propagation='requires_new')."
    )
    error.__cause__ = cause
    return error


def caught_failure(failure: Failure, refused: str, undone: str) -> UnexpectedRollbackError:
    """Say that a statement failed in a transaction and the error was caught: it cannot commit."""
    sql = f" running {failure.sql!r}" if failure.sql else ""
    error = UnexpectedRollbackError(
        f"{refused}: a statement failed at {failure.site}{sql} with "
        f"{describe_exception(failure.cause)}, and the error was caught, so {undone}. A "
        "failed statement dooms the transaction it ran in (PostgreSQL aborts it; other "
        "databases keep the work around it, half done). Let the exception propagate, or "
        "run the statement that may fail in its own savepoint, which contains the error "
        "when it rolls back: a unit with propagation='nested', or session.begin_nested()."
    )
    error.__cause__ = failure.cause
    return error


def _ended_inside(unit: Unit, dropped_callbacks: bool) -> DisciplineError:
    dropped = (
        " Its on_commit and on_rollback callbacks were not run: txguard cannot tell whether "
        "that call committed."
        if dropped_callbacks else ""
    )
    return DisciplineError(
        f"The transaction of the begin-once unit opened at {unit.where} was ended inside its "
        "block (session.get_transaction().commit() or .rollback()), so the unit had nothing "
        f"left to commit: work after that call was discarded.{dropped} The unit owns its "
        "transaction: raise an exception to roll it back, or open it with "
        "mode='commit_as_you_go'."
    )


def _deactivated(tx: Transaction) -> UnexpectedRollbackError:
    return UnexpectedRollbackError(
        f"The unit opened at {tx.where} could not commit: a statement or flush failed "
        "inside it and the exception was caught, so SQLAlchemy rolled the transaction back. "
        "Let the exception propagate, or wrap the statement that may fail in "
        "session.begin_nested() (or a unit with propagation='nested')."
    )


# Entering and leaving the registry's stack.


def current_unit(registry: Registry) -> Unit | None:
    """Return the unit this thread's code runs in on ``registry``, or None (see ``live``)."""
    unit = registry._var.get()
    return None if unit is None else live(unit)


def live(unit: Unit) -> Unit | None:
    """Return the innermost unit of the stack that ``unit`` tops which this thread may use.

    A unit can end where its ``ContextVar`` token cannot be reset (another thread, another
    copy of the context), so a context may still hold an ended unit. This follows each
    unit's link to the unit that was current when it was opened, past ended units and
    units of other threads; None when there is none. A thread may use a unit it owns (the
    one that opened it, see ``adopt``) that is active and runs in transactions that are all
    in progress: a thread that inherits a copy of another thread's context must not share
    that thread's Session. So a new thread
    starts with none, even one running in a copy of another thread's context, and an
    asyncio task sees the units of the task that created it.
    """
    ident = threading.get_ident()
    current: Unit | None = unit
    while current is not None:
        thread = current.thread
        if (thread == ident or thread == FOLLOWS_CONTEXT) and current.state is _STATE_ACTIVE:
            transaction: Transaction | None = current.transaction
            while transaction is not None and (
                transaction.state is _TX_ACTIVE or transaction.state is _TX_ROLLBACK_ONLY
            ):
                transaction = transaction.parent
            if transaction is None:  # all in progress
                return current
        current = current.previous
    return None


def unit_in_progress(registry: Registry) -> Unit | None:
    """Return the innermost unit of this context's stack on ``registry`` whose transactions
    are all in progress, whichever thread may use it, and even if its block has just ended
    (its end is settling them).

    For callbacks: a thread running in a copy of another thread's context (``asyncio.to_thread``
    inside a unit) may not use that unit (``live``), but what it registers follows the
    transaction the unit runs in.
    """
    current = registry._var.get()
    while current is not None:
        if _in_progress(current.transaction):
            return current
        current = current.previous
    return None


def ended_uncommitted(registry: Registry, upto: Unit | None = None) -> bool:
    """Say whether this context's stack on ``registry`` holds, above ``upto`` (the unit the
    code now runs in, or None), a unit whose transaction ended without committing: a
    savepoint unit's that rolled back, or a begin-once unit's, though the context still
    holds it.

    Code that sees it runs after that unit, in a task or a thread the unit's block started
    and did not wait for (a request's fire-and-forget task, after the request failed):
    whatever it does was meant to follow that transaction's commit, which never came. A
    savepoint unit that was released leaves it to the transaction around it; a unit that
    began its transaction and committed it (or a commit-as-you-go unit) ends the search.
    """
    unit = registry._var.get()
    while unit is not None and unit is not upto:
        transaction = unit.transaction
        state = transaction.state
        undone = state is _TX_ROLLED_BACK or state is _TX_IN_DOUBT
        if transaction.parent is None:
            return undone and transaction.mode is _MODE_BEGIN_ONCE
        if undone:
            return True
        unit = unit.previous
    return False


def adopt(unit: Unit) -> None:
    """Make the calling thread the one that may use ``unit`` and sees it as current.

    A unit belongs to the thread that opened it (a thread running in a copy of its context
    must not share its Session). This is the explicit hand-over, for code that runs the
    rest of a unit's block in another thread strictly after the first one stopped using it.
    """
    unit.thread = threading.get_ident()


FOLLOWS_CONTEXT: Final = 0  # never a thread's ident: the unit is usable wherever its context is


def follow_context(unit: Unit) -> None:
    """Let every thread whose context holds ``unit`` use it (a framework's hand-over).

    For frameworks that run the rest of a request in worker threads with a copy of the
    request's context (FastAPI's and Starlette's ``def`` endpoints and dependencies), one
    step at a time, so the threads never use the unit's Session at once.
    """
    unit.thread = FOLLOWS_CONTEXT


_NO_UNITS: Final[list[Unit]] = []  # never appended to: _pop's answer when nothing was left open


def _pop(unit: UnitOfWork) -> list[Unit]:
    """Mark ``unit`` ended and take it off this context's stack, wherever it was entered.

    Returns the units entered inside it that are still active in this context, innermost
    first: non-empty only for an out-of-order exit. Where its token cannot be reset (it
    was entered in another context), the value stays, and the lookup skips it.
    """
    unit.state = _STATE_ENDED
    var = unit._var
    top = var.get()
    try:
        var.reset(unit._token)
    except ValueError:  # the token was created in another context
        pass
    if top is unit:
        return _NO_UNITS
    return _active_inside(top, unit)


def _active_inside(top: Unit | None, unit: Unit) -> list[Unit]:
    """Return the units of the stack ``top`` tops that were entered inside ``unit`` and are
    still active, innermost first ([] if ``unit`` is not on that stack)."""
    inner: list[Unit] = []
    while top is not None and top is not unit:
        if top.state is _STATE_ACTIVE:
            inner.append(top)
        top = top.previous
    return inner if top is unit else []


def _orphan(unit: Unit, inner: list[Unit]) -> DisciplineError:
    """Make ``unit`` and the units still open inside it roll back; return the error to raise."""
    error = DisciplineError(
        f"The unit opened at {unit.where} ended before the unit(s) entered inside it, at "
        f"{', '.join(str(u.where) for u in reversed(inner))}, which had not ended yet: "
        "units must end innermost first. They were all rolled back. Exit the inner "
        "unit(s) first (an ExitStack does, in reverse order of entry)."
    )
    for u in inner:
        u.state = _STATE_ORPHANED
        u.ended_by = unit
        u.transaction.mark_rollback_only(error, u.where)
    unit.transaction.mark_rollback_only(error, unit.where)
    return error


def _outlived(unit: Unit) -> DisciplineError:
    """Discard what ``unit`` did since a transaction it runs inside of was settled first (its
    block ended in another context: an async generator finalised by the event loop), and
    return the error its exit raises."""
    outer = unit.transaction if unit.role is _ROLE_JOINS else unit.transaction.parent
    while outer is not None and _in_progress(outer):
        outer = outer.parent
    assert outer is not None, "only called when a transaction around the unit has ended"
    error = DisciplineError(
        f"The unit opened at {unit.where} ran in the transaction of the unit opened at "
        f"{outer.where}, which ended first, in another context (an async generator closed "
        "by the event loop, or a block exited in another task or thread): what it did "
        "after that was not committed, and has been rolled back. Let the outer unit end "
        "after the units inside it, e.g. exhaust or aclose() the generator first."
    )
    root = unit.transaction.root
    if _in_progress(root):
        root.mark_rollback_only(error, unit.where)
    else:
        try:
            # what autobegan on the closed session since
            root.session_class.close(root.sync_session)
        except Exception:
            logger.warning("txguard: closing the session failed", exc_info=True)
    return error


def _abandon(unit: Unit) -> None:
    """Close the session of a unit whose settling was interrupted, which rolls back its work.

    An interrupt can land on any instruction, also on those before ``settle`` enters the
    ``try`` that closes the session; the caller's ``try`` covers them. Closing a session
    twice is harmless, so this does not ask how far ``settle`` got.
    """
    if unit.role is not _ROLE_BEGINS:
        return  # the interrupt goes on to the unit that began the transaction
    transaction = unit.transaction
    sync = transaction.sync_session
    sync._txguard_unit = None  # type: ignore[attr-defined]
    if _in_progress(transaction):
        transaction.move_to(_TX_ROLLED_BACK)
    try:
        transaction.session_class.close(sync)
    except Exception:
        logger.warning("txguard: closing the session failed", exc_info=True)
    finally:
        seal(sync, transaction.where)


def _settled_inner(
    outcome: tuple[Finish | None, BaseException | None], error: DisciplineError
) -> None:
    finish, inner_error = outcome
    if finish is not None:
        finish.deliver(in_flight=True)
    if inner_error is not None and inner_error is not error:
        logger.warning(
            "txguard: rolling back a unit left open failed too: %s", describe_exception(inner_error)
        )


def end(unit: UnitOfWork, exc: BaseException | None) -> tuple[Finish | None, BaseException | None]:
    """End ``unit``'s block (``exc`` escaped it, if any): leave the stack, then ``settle``.

    Units left open inside it are rolled back first, and the result is a DisciplineError.
    """
    inner = _pop(unit)
    if not inner:
        if unit.role is _ROLE_BEGINS or _in_progress(unit.transaction):
            try:
                return settle(unit, exc)
            except BaseException:  # settle returns errors: this interrupted it (Ctrl-C)
                _abandon(unit)
                raise
        return None, _outlived(unit)
    return _end_out_of_order(unit, inner, exc)


def _end_out_of_order(
    unit: Unit, inner: list[Unit], exc: BaseException | None
) -> tuple[Finish | None, DisciplineError]:
    error = _orphan(unit, inner)
    for u in inner:
        _settled_inner(settle(u, error), error)
    finish, _ = settle(unit, exc if exc is not None else error)
    return finish, error


def joinable(current: Unit, opts: UnitOptions) -> Unit | None:
    """Return ``current`` (the top of a registry's stack) if a call with ``opts`` joins its
    transaction without a frame of its own.

    A call that joins (``required``, ``mandatory``, ``supports``) a live unit running in a
    transaction shares everything with it: the session, the transaction, its callbacks.
    What a frame of its own would add is only its end, which can do nothing but mark the
    transaction rollback-only (``end_joined``); so ``@transactional`` runs such a call as
    a plain call of its function, as Spring does. Options that make a join do more
    (``durable``, ``isolation_level``, ``retries``: ``opts.joins_without_frame``) and a
    begin-once call inside a commit-as-you-go unit, whose frame refuses the session's
    ``commit()`` while it runs, get a frame (None here).
    """
    if not opts.joins_without_frame or live(current) is not current:
        return None
    transaction = current.transaction
    if not transaction.transactional or (
        transaction.mode is not _MODE_BEGIN_ONCE and opts.mode is _MODE_BEGIN_ONCE
    ):
        return None
    return current


def end_joined(unit: Unit, opts: UnitOptions, where: Origin, exc: BaseException | None) -> None:
    """End a call that joined ``unit``'s transaction without a frame (see ``joinable``).

    ``exc`` escaped the call, if any; a rollback-worthy one marks the transaction
    rollback-only, naming the call's ``where``. If the call left units entered inside it
    open, they are rolled back as at any out-of-order exit, and this raises that
    DisciplineError; otherwise the caller goes on (re-raising ``exc``).
    """
    if exc is not None and _rolls_back(opts, exc):
        unit.transaction.mark_rollback_only(exc, where)
    top = unit.transaction.registry._var.get()
    inner = [] if top is unit else _active_inside(top, unit)
    if inner:
        call = UnitOfWork(opts, where)  # the frame the call did without, for the messages
        call.role = _ROLE_JOINS
        call.transaction = unit.transaction
        call.previous = unit
        call.state = _STATE_ENDED
        _, error = _end_out_of_order(call, inner, exc)
        raise error


async def aend(
    unit: UnitOfWork, exc: BaseException | None
) -> tuple[Finish | None, BaseException | None]:
    """End an async unit's block: ``end`` with ``asettle``."""
    inner = _pop(unit)
    if not inner:
        if unit.role is _ROLE_BEGINS or _in_progress(unit.transaction):
            return await asettle(unit, exc)
        return None, await greenlet_spawn(_outlived, unit)
    error = _orphan(unit, inner)
    for u in inner:
        _settled_inner(await asettle(u, error), error)
    finish, _ = await asettle(unit, exc if exc is not None else error)
    return finish, error


# The context manager.


class UnitOfWork(Unit):
    """A unit of work as a context manager: ``with`` for sync, ``async with`` for async.

    It is itself the frame its block runs in; entering one that begins a transaction
    allocates its ``Transaction``, and one that joins allocates nothing more. Where
    its block was entered is an ``Origin`` that keeps the caller's code and instruction
    offset and looks the line up only if a message shows it. Each object runs one block
    (``state``; see docs/decisions.md for why it is not reusable).

    Its block may end in another thread or another copy of the context than the one it
    began in (a web framework's thread-pool generator dependency, an async generator the
    event loop finalises in a new task): it settles there all the same.

    ``@transactional`` runs each call in a UnitOfWork too, opened with ``enter`` (the
    function's origin given up front): CPython specialises each attribute access for one
    class, so ``open_unit`` and ``settle`` stay fast only if every unit they see is of the
    same class.
    """

    __slots__ = ("_token", "_var")

    def __init__(self, opts: UnitOptions, where: Origin | None = None) -> None:
        self.opts = opts
        self.state = _STATE_READY
        if where is not None:  # a @transactional call's; a with block's is set at entry
            self.where = where

    _token: Token[Unit | None]  # set with state ACTIVE: the registry's stack before it
    _var: ContextVar[Unit | None]  # the registry's stack it was pushed on

    def lends_to_running_task(self) -> bool:
        """Say whether the running task may take its turn with this unit's session.

        For the cross_task guard: the unit follows its context (``follow_context``: a
        framework's request) and the running task's context holds it, so the task was
        started inside the unit (by the framework or by the handler) and inherited it.
        """
        if self.thread != FOLLOWS_CONTEXT:
            return False
        current = self._var.get()
        while current is not None:
            if current is self:
                return True
            current = current.previous
        return False

    def _refuse(self, registry: Registry, want_async: bool) -> None:
        if registry.is_async is not want_async:
            raise ConfigurationError(_mismatch(registry, "async with" if want_async else "with"))
        raise DisciplineError(
            f"The unit_of_work() entered at {self.where} is "
            f"{'done' if self.state is _STATE_ENDED else 'already in use'}: each object runs one "
            "`with` block; create a new one for each block."
        )

    def _exit_inactive(self, exc: BaseException | None) -> None:
        """Exit a block that ran without a unit, or whose unit an outer unit's exit ended."""
        state = self.state
        if state is _STATE_READY or state is _STATE_ENDED:
            how = "twice" if state is _STATE_ENDED else "without being entered"
            raise DisciplineError(f"This unit_of_work() was exited {how}.")
        self.state = _STATE_ENDED
        if state is _STATE_ORPHANED and exc is None:
            raise DisciplineError(
                f"The unit opened at {self.where} was rolled back, its work not committed: the "
                f"unit opened at {self.ended_by.where if self.ended_by else '?'}, which it was "
                "entered inside, ended before it (and raised DisciplineError). Exit units "
                "innermost first."
            )

    # The sync and async methods are the same steps; the async ones await the IO.

    def enter(self, registry: Registry) -> bool:
        """Open this unit on ``registry`` and make it current; False if its block runs without
        one (``propagation="never"`` outside any unit). ``with`` and ``@transactional`` call it."""
        if open_unit(registry, self) is None:
            self.state = _STATE_OUTSIDE
            return False
        var = self._var = registry._var
        self._token = var.set(self)
        self.state = _STATE_ACTIVE
        return True

    async def aenter(self, registry: Registry) -> bool:
        """``enter`` for an async unit."""
        if await aopen_unit(registry, self) is None:
            self.state = _STATE_OUTSIDE
            return False
        var = self._var = registry._var
        self._token = var.set(self)
        self.state = _STATE_ACTIVE
        return True

    def __enter__(self) -> Session:
        registry = self.opts.registry or resolve(None)
        if registry.is_async or self.state is not _STATE_READY:
            self._refuse(registry, want_async=False)
        self.where = caller_origin(sys._getframe(1))
        if self.enter(registry):
            session: Session = self.transaction.session
            return session
        return None  # type: ignore[return-value]  # propagation="never" outside a unit

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self.state is not _STATE_ACTIVE:
            self._exit_inactive(exc)
            return
        finish, error = end(self, exc)
        leave(finish, error, exc)

    async def __aenter__(self) -> AsyncSession:
        registry = self.opts.registry or resolve(None)
        if not registry.is_async or self.state is not _STATE_READY:
            self._refuse(registry, want_async=True)
        self.where = caller_origin(sys._getframe(1))
        if await self.aenter(registry):
            session: AsyncSession = self.transaction.session
            return session
        return None  # type: ignore[return-value]  # propagation="never" outside a unit

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self.state is not _STATE_ACTIVE:
            self._exit_inactive(exc)
            return
        finish, error = await aend(self, exc)
        await aleave(finish, error, exc)


def _mismatch(registry: Registry, statement: str) -> str:
    if registry.is_async:
        return (
            f"The registry {registry!r} hands out AsyncSessions, so its units need "
            "`async with txguard.unit_of_work() as session:` (and @transactional on "
            "`async def` functions), not a plain `with` or a plain function."
        )
    return (
        f"The registry {registry!r} hands out sync Sessions, so its units need a plain "
        f"`with txguard.unit_of_work() as session:`, not `{statement}`; for AsyncSessions, "
        "build the registry on an AsyncEngine or async_sessionmaker."
    )


_ROLLBACK_ANY: Final[tuple[type[BaseException], ...]] = (Exception,)
_NOTHING: Final[tuple[type[BaseException], ...]] = ()


def unit_of_work(
    *,
    mode: Mode | str = Mode.BEGIN_ONCE,
    propagation: Propagation | str = Propagation.REQUIRED,
    read_only: bool = False,
    isolation_level: str | None = None,
    rollback_for: type[BaseException] | tuple[type[BaseException], ...] = _ROLLBACK_ANY,
    no_rollback_for: type[BaseException] | tuple[type[BaseException], ...] = _NOTHING,
    durable: bool = False,
    registry: Registry | None = None,
) -> UnitOfWork:
    """Open a unit of work: ``with unit_of_work() as session:`` (or ``async with``).

    In begin-once mode (the default) the unit begins the transaction at entry, commits at
    a normal exit, rolls back when a selected exception leaves the block, and closes the
    session it opened. See ``Propagation`` for what happens when a unit is already active.
    """
    if (
        mode is _MODE_BEGIN_ONCE
        and propagation is _REQUIRED
        and read_only is False
        and isolation_level is None
        and rollback_for is _ROLLBACK_ANY
        and no_rollback_for is _NOTHING
        and durable is False
    ):
        checked = check_registry(registry)
        opts = DEFAULT_OPTIONS if checked is None else checked.default_options
    else:
        opts = cached_options(
            check_registry(registry),
            {
                "mode": mode,
                "propagation": propagation,
                "read_only": read_only,
                "isolation_level": isolation_level,
                "rollback_for": rollback_for,
                "no_rollback_for": no_rollback_for,
                "durable": durable,
            },
        )
    return UnitOfWork(opts)


# The asyncio driver: the same functions, run through SQLAlchemy's greenlet bridge.


async def aopen_unit(registry: Registry, unit: Unit) -> Unit | None:
    """Open a unit for async code; only units that emit SQL at entry need the bridge."""
    if not unit.opts.enter_needs_io:
        return open_unit(registry, unit)
    return await greenlet_spawn(open_unit, registry, unit)


async def asettle(
    unit: Unit, exc: BaseException | None
) -> tuple[Finish | None, BaseException | None]:
    """End an async unit; the IO runs to completion even if the task is cancelled meanwhile.

    A cancellation that arrived becomes the error the unit raises, so the caller still
    delivers what the unit left (the callbacks of a COMMIT that went through) before it.
    """
    if unit.role is _ROLE_JOINS:
        return settle(unit, exc)
    task, cancelled = await completed(greenlet_spawn(settle, unit, exc))
    finish: Finish | None
    finish, error = task.result()
    tx = unit.transaction
    if unit.role is _ROLE_BEGINS and tx.sync_session.get_transaction() is not None:
        # Waited for even if the task is cancelled meanwhile: left open, the transaction
        # would keep its connection and its locks once that task is out.
        _, late = await completed(_close_once_free(tx))
        cancelled = cancelled or late
    return finish, error if cancelled is None else cancelled


async def _close_once_free(tx: Transaction) -> None:
    """Close a session that SQLAlchemy refused to close because another task was inside it.

    ``gather`` of two services on one session, or a task nobody awaited, can still be in
    the middle of a statement or of provisioning the connection when the unit ends (the
    cross_task guard reports it; SQLAlchemy refuses a close mid-connect). Once SQLAlchemy
    lets it, the session is invalidated, not closed: that task may be between its connect and
    its statement's IO, and a connection returned to the pool would then run that statement
    in a transaction nobody ends (idle in transaction, handed to the next request). Its
    connection is discarded, which rolls the transaction back, instead of waiting for the
    garbage collector. Polled: SQLAlchemy announces nothing when a method in progress ends.
    """
    deadline = monotonic() + _FREE_WAIT_S
    while True:
        await asyncio.sleep(_FREE_POLL_S)
        try:
            await greenlet_spawn(tx.session_class.invalidate, tx.sync_session)
            return
        except Exception:
            if monotonic() >= deadline:
                logger.warning(
                    "txguard: another task is still inside the session of the unit opened at "
                    "%s; its connection is left to the garbage collector", tx.where, exc_info=True
                )
                return


_FREE_WAIT_S: Final = 10.0
_FREE_POLL_S: Final = 0.01
