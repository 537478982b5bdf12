"""Units of work: the transaction logic, written once and driven from sync or async code.

A unit either *owns* a scope (it began the transaction, or a savepoint) or *joins* the
scope of the unit around it. ``open_unit`` carries out what ``_propagation.plan`` decides
from the propagation, and ``settle`` ends it: commit, release, roll back, or mark the
shared scope rollback-only.
Both are plain functions over a sync ``Session``; the asyncio driver runs the same
functions inside SQLAlchemy's greenlet bridge, exactly as ``AsyncSession`` drives
``Session`` (async is a thin driver, the logic exists once).
"""

from __future__ import annotations

import enum
import logging
import sys
import threading
from typing import TYPE_CHECKING, Any, Final, TypeVar

from sqlalchemy.orm import Session, SessionTransaction
from sqlalchemy.orm.session import SessionTransactionState
from sqlalchemy.exc import DBAPIError
from sqlalchemy.util import greenlet_spawn

from ._async import completed
from ._callbacks import ALWAYS, NO_CALLBACKS, ON_COMMIT, ON_ROLLBACK, Callback, run_callbacks
from ._errors import (
    ConfigurationError,
    DisciplineError,
    UncommittedWorkWarning,
    UnexpectedRollbackError,
)
from ._failures import Failure, aborted, aborted_error, first_failure, session_savepoints
from ._options import (
    DEFAULT_OPTIONS,
    Mode,
    Propagation,
    UnitOptions,
    cached_options,
)
from ._origin import UNKNOWN, Origin, _is_library, caller_origin, warn_at_user
from ._propagation import Plan, plan
from ._registry import Registry, check_registry, resolve
from ._transaction import TransactionState, transition
from ._retry import _sqlstate, is_retryable, mark_after_commit, retry_wanted
from ._sessions import first_change
from ._sqla import transaction_state

if TYPE_CHECKING:
    from contextvars import ContextVar, Token
    from types import TracebackType

    from sqlalchemy.engine import Connection
    from sqlalchemy.ext.asyncio import AsyncSession

__all__ = [
    "Unit", "UnitOfWork", "UnitState", "adopt", "aend", "current_unit", "end", "follow_context",
    "open_unit", "push", "settle", "unit_for", "unit_of_work",
]

logger = logging.getLogger("txguard")

class Role(enum.Enum):
    """How a unit stands to the transaction it runs in."""

    BEGINS = "begins"  # it began the transaction (or runs a commit-as-you-go session)
    JOINS = "joins"  # it runs in the transaction of an active unit (its ``owner``)
    SAVEPOINT = "savepoint"  # it took a savepoint in the transaction of its ``parent``



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
    """One active unit of work: the entry of a registry's stack.

    A unit either begins a transaction (``role`` BEGINS, or SAVEPOINT for a savepoint) and
    is its own ``scope``, or JOINS the scope of an active unit (``owner``). What belongs to
    the transaction (its ``TransactionState``, callbacks, caught failures) lives on the
    scope; ``state`` is the unit's own life (``UnitState``).

    Units have slots, and ``open_unit`` sets every attribute that is read before it is
    set elsewhere. An ORM transaction touches so many types that CPython's type-lookup
    cache misses on nearly every lookup in the type, which a class-level default costs on
    each read; and an instance dict may lose the fast path when a process creates many
    objects of a class before one sets a new attribute. Slots have neither problem.
    """

    __slots__ = (
        "opts", "where", "role", "mode", "owner", "parent",
        "registry", "transaction", "transactional", "isolation_level", "callbacks",
        "tx_state", "rollback_cause", "rollback_site", "rollback_unit",
        "session", "sync_session", "session_class", "state", "previous", "thread", "ended_by",
        "failures",
    )

    opts: UnitOptions
    where: Origin  # where it was opened (a ``with`` block, or a ``@transactional`` function)
    role: Role
    mode: Mode
    owner: Unit | None
    parent: Unit | None  # the scope a savepoint was taken in
    registry: Registry  # set on commit-as-you-go units, which need it
    transaction: SessionTransaction | None
    transactional: bool
    isolation_level: str | None
    callbacks: tuple[Callback, ...] | list[Callback]
    tx_state: TransactionState  # of the transaction it began (see _transaction)
    rollback_cause: BaseException | None  # set when it became ROLLBACK_ONLY
    rollback_site: Origin | None
    rollback_unit: Origin | None
    session: Any
    sync_session: Session  # the session itself, or an AsyncSession's sync_session
    session_class: type[Session]  # the user's session class: the unit calls it, past the guards
    state: UnitState
    previous: Unit | None  # the unit that was current when it was opened
    thread: int  # the ident of the thread that may use it (see adopt)
    ended_by: Unit | None  # set when it is ORPHANED: the unit around it that ended first
    failures: list[Failure] | tuple[Failure, ...]  # caught statement failures (see _failures)

    def begins_at(self) -> Origin | None:
        """Where the transaction being begun on this unit's session began, for the guards.

        A begin-once unit begins its transaction itself at its ``with`` line (a user's
        session.begin() is refused before it begins), so the guards need not walk the
        stack for it; other units answer None.
        """
        return self.where if self.mode is _MODE_BEGIN_ONCE else None

    @property
    def scope(self) -> Unit:
        """The unit that owns the transaction (or savepoint) this unit runs in."""
        return self.owner or self

    @property
    def root(self) -> Unit:
        scope = self.scope
        while scope.parent is not None:
            scope = scope.parent
        return scope

    def add_callback(self, callback: Callback) -> None:
        callbacks = self.callbacks
        if isinstance(callbacks, list):
            callbacks.append(callback)
        else:
            self.callbacks = [callback]

    def take_callbacks(self, committed: bool) -> list[Callback]:
        """Remove and return the callbacks this outcome runs, in registration order."""
        callbacks = self.callbacks
        if not callbacks:
            return []
        self.callbacks = NO_CALLBACKS
        wanted = ON_COMMIT if committed else ON_ROLLBACK
        return [cb for cb in callbacks if cb.when == wanted or cb.when == ALWAYS]

    def savepoints(self, connection: Connection) -> tuple[object, ...]:
        """The savepoints of this unit's session, innermost first (see _failures)."""
        return session_savepoints(self.sync_session)

    def move_to(self, state: TransactionState) -> None:
        """Move the transaction this unit began to ``state``, if that move is declared legal."""
        self.tx_state = transition(self.tx_state, state, self.where)

    def mark_rollback_only(self, cause: BaseException, unit: Origin) -> None:
        """Doom the transaction: it will roll back. The first cause is kept; a transaction
        that has already ended has nothing left to doom."""
        if self.tx_state is _TX_ACTIVE:
            self.move_to(_TX_ROLLBACK_ONLY)
            self.rollback_cause = cause
            self.rollback_site = failure_site(cause)
            self.rollback_unit = unit

    # The user's calls of the session's own methods, routed here by the session class of
    # the unit (_sessions._guarded_methods).

    def session_commit(self) -> None:
        if self.mode is _MODE_BEGIN_ONCE:
            raise DisciplineError(
                f"session.commit() inside the begin-once unit opened at {self.where}: the "
                "unit commits when its block ends (and rolls back if an exception leaves "
                "it). Remove the call; to commit part of the work on its own, run it in a "
                "unit with propagation='requires_new', or open this unit with "
                "mode='commit_as_you_go'."
            )
        self._refuse_inside_inner_unit("commit")
        sync = self.sync_session
        if self.tx_state is _TX_ROLLBACK_ONLY or self.failures:
            self.session_class.rollback(sync)
            if self.tx_state is _TX_ROLLBACK_ONLY:
                error = unexpected_rollback(self)
            else:
                error = caught_failure(
                    self.failures[0],
                    f"session.commit() in the commit-as-you-go unit opened at {self.where} "
                    "was refused",
                    "the transaction has been rolled back",
                )
            self.begin_again(_TX_ROLLED_BACK)
            self.run_callbacks_outside(committed=False, in_flight=True)
            raise error
        transaction = sync.get_transaction()
        if aborted(transaction):
            self.session_class.rollback(sync)
            self.begin_again(_TX_ROLLED_BACK)
            self.run_callbacks_outside(committed=False, in_flight=True)
            raise aborted_error(
                f"session.commit() in the commit-as-you-go unit opened at {self.where} was "
                "refused"
            )
        try:
            self.session_class.commit(sync)
        except BaseException as error:
            if transaction is not None and _commit_went_through(self, transaction):
                mark_after_commit(error)  # committed all the same: its callbacks run
                self.begin_again(_TX_COMMITTED)
                self.run_callbacks_outside(committed=True, in_flight=True)
            raise
        self.begin_again(_TX_COMMITTED)
        self.run_callbacks_outside(committed=True, in_flight=False)

    def session_rollback(self) -> None:
        if self.mode is _MODE_BEGIN_ONCE:
            raise DisciplineError(
                f"session.rollback() inside the begin-once unit opened at {self.where}: "
                "raise an exception to roll the unit back, or use session.begin_nested() / "
                "propagation='nested' to undo part of the work."
            )
        self._refuse_inside_inner_unit("rollback")
        self.session_class.rollback(self.sync_session)
        self.begin_again(_TX_ROLLED_BACK)
        self.run_callbacks_outside(committed=False, in_flight=False)

    def _refuse_inside_inner_unit(self, call: str) -> None:
        """Refuse ``session.commit()``/``rollback()`` of this commit-as-you-go unit while a
        savepoint unit or a begin-once unit that joined it runs: that unit's block still
        counts on the transaction it runs in."""
        current = current_unit(self.registry)
        if current is None or current is self:
            return
        if current.scope is not self and current.root is self:
            raise DisciplineError(
                f"session.{call}() inside the savepoint unit opened at {current.where}: the "
                "savepoint is released when its block ends (raise an exception to roll it "
                f"back); {call} after it."
            )
        if (
            current.role is _ROLE_JOINS
            and current.owner is self
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
        callbacks = self.take_callbacks(committed)
        if not callbacks:
            return
        var = self.registry._var
        token = var.set(self.previous)
        try:
            run_callbacks(callbacks, committed, in_flight)
        finally:
            var.reset(token)

    def begin_again(self, ended: TransactionState) -> None:
        """Record that a commit-as-you-go session's transaction ended (``ended``) and that the
        session goes on, in a new one; its failures and rollback-only mark are gone with it."""
        self.move_to(ended)
        self.move_to(_TX_ACTIVE)
        self.failures = ()

    def session_begin(self) -> None:
        if self.mode is _MODE_BEGIN_ONCE:
            raise DisciplineError(
                f"session.begin() inside the begin-once unit opened at {self.where}: the "
                "unit already began the transaction. Use the session as it is, or "
                "session.begin_nested() for a savepoint."
            )

    def session_close(self) -> None:
        if self.mode is _MODE_BEGIN_ONCE:
            raise DisciplineError(
                f"session.close() inside the begin-once unit opened at {self.where}: "
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
    unit.role = _ROLE_BEGINS
    unit.owner = None
    unit.parent = None
    unit.mode = _MODE_BEGIN_ONCE
    unit.transactional = True
    unit.isolation_level = None
    unit.callbacks = NO_CALLBACKS
    unit.tx_state = _TX_ACTIVE
    scope = None if current is None else current.scope
    active = scope if scope is not None and scope.transactional else None
    step = plan(
        opts.propagation,
        opts.durable,
        unit.where,
        None if active is None else active.where,
        None if scope is None else scope.where,
    )
    if scope is not None:  # the plans that run in the active unit
        if step is _PLAN_JOIN:
            return _join(scope, unit)
        if step is _PLAN_SAVEPOINT:
            return _savepoint(scope, unit)
    if step is _PLAN_NO_UNIT:
        return None
    if step is _PLAN_BEGIN:
        key = opts.session_key
    else:
        key = (True, opts.read_only, opts.isolation_level)
        unit.transactional = False
    session = (registry._factories.get(key) or registry.session_factory(*key))()
    sync: Session = session.sync_session if registry.is_async else session
    base = registry.base_class
    unit.session = session
    unit.sync_session = sync
    unit.session_class = base
    sync._txguard_unit = unit  # type: ignore[attr-defined]  # before begin: the guards ask it
    commit_as_you_go, _, isolation_level = key
    if commit_as_you_go:
        unit.mode = _MODE_COMMIT_AS_YOU_GO
        unit.registry = registry
    else:
        unit.transaction = base.begin(sync)
    unit.isolation_level = isolation_level
    unit.failures = ()
    return unit


def _join(active: Unit, unit: Unit) -> Unit:
    if unit.opts.isolation_level is not None:
        _check_isolation(active, unit)
    unit.role = _ROLE_JOINS
    unit.owner = active
    unit.session = active.session
    unit.sync_session = active.sync_session
    return unit


def _check_isolation(active: Unit, unit: Unit) -> None:
    wanted = unit.opts.isolation_level
    if wanted != active.isolation_level:
        actual = active.isolation_level or _effective_isolation(active)
        if actual != wanted:
            raise DisciplineError(
                f"The unit opened at {unit.where} asks for isolation_level={wanted!r} but "
                f"would join the transaction of the unit opened at {active.where}, which "
                f"runs at {actual!r}. Use propagation='requires_new' for its own transaction, "
                "or set the level on the outer unit."
            )


def _effective_isolation(scope: Unit) -> str:
    level: str = scope.sync_session.connection().get_isolation_level()
    return level.upper().replace("_", " ")


def _savepoint(active: Unit, unit: Unit) -> Unit:
    if unit.opts.isolation_level is not None:
        _check_isolation(active, unit)
    unit.transaction = active.sync_session.begin_nested()
    unit.role = _ROLE_SAVEPOINT
    unit.parent = active
    unit.session = active.session
    unit.sync_session = active.sync_session
    unit.session_class = active.session_class
    unit.isolation_level = active.isolation_level
    return unit


# Ending a unit.


def settle(unit: Unit, exc: BaseException | None) -> tuple[Finish | None, BaseException | None]:
    """End ``unit`` after its body finished (``exc`` is what escaped it, if any).

    Never raises: returns what is left to deliver and the exception the unit must raise
    (``exc`` itself, or a new error chained to it), or None when it returns normally.
    A unit that joined and a begin-once unit (the common cases) are settled here.
    """
    role = unit.role
    if role is not _ROLE_BEGINS:
        if role is _ROLE_JOINS:
            if exc is not None and _rolls_back(unit, exc):
                unit.owner.mark_rollback_only(exc, unit.where)  # type: ignore[union-attr]
            return None, exc
        return None, _settle_savepoint(unit, exc)
    if unit.mode is not _MODE_BEGIN_ONCE:
        return _settle_commit_as_you_go(unit, exc)
    sync = unit.sync_session
    sync._txguard_unit = None  # type: ignore[attr-defined]
    transaction: SessionTransaction = unit.transaction  # type: ignore[assignment]
    error = exc
    committed = False
    try:
        if exc is not None and _rolls_back(unit, exc):
            _rollback(transaction, exc)
        elif unit.tx_state is _TX_ROLLBACK_ONLY:
            _rollback(transaction, exc)
            if exc is None:
                error = unexpected_rollback(unit)
        elif unit.failures:
            _rollback(transaction, exc)
            if exc is None:
                error = caught_failure(
                    unit.failures[0],
                    f"The unit opened at {unit.where} could not commit",
                    "its transaction has been rolled back",
                )
        elif not transaction.is_active:
            if sync.get_transaction() is transaction:
                _rollback(transaction, exc)
                if exc is None:
                    error = _deactivated(unit)
            elif exc is None:
                error = _ended_inside(unit)
        elif aborted(transaction):
            _rollback(transaction, exc)
            if exc is None:
                error = aborted_error(f"The unit opened at {unit.where} could not commit")
        else:
            try:
                transaction.commit()
                committed = True
            except BaseException as commit_error:
                if _commit_went_through(unit, transaction):
                    committed = True  # an after_commit listener failed, or an interrupt came
                    mark_after_commit(commit_error)
                else:
                    unit.move_to(_TX_IN_DOUBT)  # for retries: COMMIT may have been sent
                    _rollback(transaction, commit_error)
                if exc is not None and commit_error.__context__ is None:
                    commit_error.__context__ = exc
                error = commit_error
    finally:
        if committed:
            unit.move_to(_TX_COMMITTED)
        elif unit.tx_state is not _TX_IN_DOUBT:
            unit.move_to(_TX_ROLLED_BACK)
        try:
            unit.session_class.close(sync)
        except BaseException as close_error:
            if error is None:
                error = close_error
                if committed:
                    mark_after_commit(close_error)
            else:
                logger.warning("txguard: closing the session failed", exc_info=True)
    if unit.callbacks:
        return Finish(unit.take_callbacks(committed), committed), error
    return None, error


def _commit_went_through(unit: Unit, transaction: SessionTransaction) -> bool:
    """Say whether the database committed before ``transaction.commit()`` raised.

    SQLAlchemy marks the transaction COMMITTED once every connection committed, then runs
    the ``after_commit`` listeners and closes it (CLOSED): what fails there, or interrupts
    it, comes after the data is committed. Before COMMIT it is still ACTIVE or PREPARED (or
    DEACTIVE after a failed flush); only a two-phase PREPARE that failed closes it too.
    SessionTransaction has no public flag for this.
    """
    state = transaction_state(transaction)
    return state is _COMMITTED or (state is _CLOSED and not unit.sync_session.twophase)


_COMMITTED: Final = SessionTransactionState.COMMITTED
_CLOSED: Final = SessionTransactionState.CLOSED


def _rolls_back(unit: Unit, exc: BaseException) -> bool:
    opts = unit.opts
    if opts.rolls_back(exc):
        return True
    # The server already rolled the transaction (or the statement) back, or dropped the
    # connection: a commit now would report work as committed that is gone.
    return is_retryable(exc) or (opts.retries > 0 and retry_wanted(opts, exc))


def _settle_savepoint(unit: Unit, exc: BaseException | None) -> BaseException | None:
    savepoint = unit.transaction
    assert savepoint is not None, "a savepoint unit always has its savepoint"
    parent = unit.parent
    error = exc
    released = False
    try:
        if exc is not None and _rolls_back(unit, exc):
            savepoint.rollback()
        elif unit.tx_state is _TX_ROLLBACK_ONLY:
            savepoint.rollback()
            if exc is None:
                error = unexpected_rollback(unit)
        elif (failure := first_failure(unit.root, savepoint)) is not None:
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
                error = _deactivated(unit)
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
        # the error that caused it (the owner may retry on it) and let nothing commit.
        if exc is None:
            error = rollback_error
        if parent is not None:
            parent.root.mark_rollback_only(exc or rollback_error, unit.where)
    if parent is not None:
        for cb in unit.callbacks:
            if released:
                parent.add_callback(cb)
            elif cb.when != ON_COMMIT:
                cb.when = ALWAYS
                parent.add_callback(cb)
    return error


def _settle_commit_as_you_go(
    unit: Unit, exc: BaseException | None
) -> tuple[Finish, BaseException | None]:
    sync = unit.sync_session
    sync._txguard_unit = None  # type: ignore[attr-defined]
    warning = None
    error = exc
    try:
        if exc is None:
            warning = _uncommitted_work(unit)
    finally:
        try:
            unit.session_class.close(sync)
        except BaseException as close_error:
            if error is None:
                error = close_error
    return Finish(unit.take_callbacks(committed=False), False, warning), error


def _rollback(transaction: SessionTransaction, cause: BaseException | None) -> None:
    try:
        transaction.rollback()
    except Exception as rollback_error:
        if cause is None:
            raise
        logger.warning(
            "txguard: rolling back after %s failed too: %s",
            describe_exception(cause), describe_exception(rollback_error),
        )


def _uncommitted_work(scope: Unit) -> str | None:
    sync = scope.sync_session
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
        f"The commit-as-you-go unit opened at {scope.where} ended with uncommitted work "
        f"({what}); it was rolled back. Call session.commit() before the block ends, or "
        "session.rollback() to discard it on purpose."
    )


def failure_site(exc: BaseException) -> Origin:
    """Return the innermost user frame of ``exc``'s traceback."""
    tb = exc.__traceback__
    site = UNKNOWN
    while tb is not None:
        code = tb.tb_frame.f_code
        if not _is_library(code.co_filename):
            site = Origin(code, tb.tb_lasti)
        tb = tb.tb_next
    return site


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


def unexpected_rollback(scope: Unit) -> UnexpectedRollbackError:
    cause = scope.rollback_cause
    error = UnexpectedRollbackError(
        f"The unit opened at {scope.where} could not commit: the unit opened at "
        f"{scope.rollback_unit} joined its transaction and failed at {scope.rollback_site} "
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


def _ended_inside(unit: Unit) -> DisciplineError:
    return DisciplineError(
        f"The transaction of the begin-once unit opened at {unit.where} was ended inside its "
        "block (session.get_transaction().commit() or .rollback()), so the unit had nothing "
        "left to commit: work after that call was discarded. The unit owns its transaction: "
        "raise an exception to roll it back, or open it with mode='commit_as_you_go'."
    )


def _deactivated(scope: Unit) -> UnexpectedRollbackError:
    return UnexpectedRollbackError(
        f"The unit opened at {scope.where} could not commit: a statement or flush failed "
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
    units of other threads (see ``usable``); None when there is none. So a new thread
    starts with none, even one running in a copy of another thread's context, and an
    asyncio task sees the units of the task that created it.
    """
    ident = threading.get_ident()
    current: Unit | None = unit
    while current is not None and not usable(current, ident):
        current = current.previous
    return current


def usable(unit: Unit, ident: int) -> bool:
    """Say whether code in thread ``ident`` may use ``unit``: the thread owns it (see
    ``adopt``), and it and every unit whose transaction it runs in are active.

    The owner thread is the one that opened the unit: a thread that inherits a copy of
    another thread's context must not share that thread's Session.
    """
    if unit.thread != ident and unit.thread != FOLLOWS_CONTEXT:
        return False
    scope: Unit | None = unit
    while scope is not None:
        if scope.state is not _STATE_ACTIVE:
            return False
        scope = scope.owner or scope.parent
    return True


def push(registry: Registry, unit: UnitOfWork) -> None:
    """Make ``unit``, just opened by ``open_unit``, the current unit of this context."""
    var = unit._var = registry._var
    unit._token = var.set(unit)
    unit.state = _STATE_ACTIVE


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
        u.scope.mark_rollback_only(error, u.where)
    unit.scope.mark_rollback_only(error, unit.where)
    return error


def _outlived(unit: Unit) -> DisciplineError | None:
    """Check that the units ``unit`` runs in are still active; if one ended first (its
    block ended in another context: an async generator finalised by the event loop),
    discard what ``unit`` did since and return the error its exit raises."""
    scope = unit.owner or unit.parent
    while scope is not None and scope.state is _STATE_ACTIVE:
        scope = scope.owner or scope.parent
    if scope is None:
        return None
    error = DisciplineError(
        f"The unit opened at {unit.where} ran in the transaction of the unit opened at "
        f"{scope.where}, which ended first, in another context (an async generator closed "
        "by the event loop, or a block exited in another task or thread): what it did "
        "after that was not committed, and has been rolled back. Let the outer unit end "
        "after the units inside it, e.g. exhaust or aclose() the generator first."
    )
    root = unit.root
    if root.state is _STATE_ACTIVE:
        root.mark_rollback_only(error, unit.where)
    else:
        try:
            # what autobegan on the closed session since
            root.session_class.close(root.sync_session)
        except Exception:
            logger.warning("txguard: closing the session failed", exc_info=True)
    return error


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
        error = _outlived(unit) if unit.role is not _ROLE_BEGINS else None
        return settle(unit, exc) if error is None else (None, error)
    error = _orphan(unit, inner)
    for u in inner:
        _settled_inner(settle(u, error), error)
    finish, _ = settle(unit, exc if exc is not None else error)
    return finish, error


async def aend(
    unit: UnitOfWork, exc: BaseException | None
) -> tuple[Finish | None, BaseException | None]:
    """End an async unit's block: ``end`` with ``asettle``."""
    inner = _pop(unit)
    if not inner:
        error = await greenlet_spawn(_outlived, unit) if unit.role is not _ROLE_BEGINS else None
        if error is None:
            return await asettle(unit, exc)
        return None, error
    error = _orphan(unit, inner)
    for u in inner:
        _settled_inner(await asettle(u, error), error)
    finish, _ = await asettle(unit, exc if exc is not None else error)
    return finish, error


# The context manager.


class UnitOfWork(Unit):
    """A unit of work as a context manager: ``with`` for sync, ``async with`` for async.

    It is itself the unit its block runs in, so entering one allocates nothing more. Where
    its block was entered is an ``Origin`` that keeps the caller's code and instruction
    offset and looks the line up only if a message shows it. Each object runs one block
    (``state``; see the README's Decisions for why it is not reusable).

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
            if current.root is self:
                return True
            current = current.previous
        return False

    def _registry_for(self, want_async: bool) -> Registry:
        registry = self.opts.registry or resolve(None)
        if registry.is_async is not want_async or self.state is not _STATE_READY:
            self._refuse(registry, want_async)
        return registry

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
        push(registry, self)
        return True

    async def aenter(self, registry: Registry) -> bool:
        """``enter`` for an async unit."""
        if await aopen_unit(registry, self) is None:
            self.state = _STATE_OUTSIDE
            return False
        push(registry, self)
        return True

    def __enter__(self) -> Session:
        registry = self._registry_for(want_async=False)
        self.where = caller_origin(sys._getframe(1))
        if self.enter(registry):
            session: Session = self.session
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
        if finish is not None:
            finish.deliver(in_flight=error is not None)
        if error is not None and error is not exc:
            raise error

    async def __aenter__(self) -> AsyncSession:
        registry = self._registry_for(want_async=True)
        self.where = caller_origin(sys._getframe(1))
        if await self.aenter(registry):
            session: AsyncSession = self.session
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
        if finish is not None:
            await finish.adeliver(in_flight=error is not None)
        if error is not None and error is not exc:
            raise error


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
    return unit_for(opts)


def unit_for(opts: UnitOptions) -> UnitOfWork:
    """Return a new unit of work with these (validated) options, ready to be entered."""
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
    return finish, error if cancelled is None else cancelled
