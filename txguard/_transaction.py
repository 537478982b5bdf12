"""A transaction units run in, as its own object, and its state.

A ``Transaction`` is what one unit began: a transaction in a session of its own, a
commit-as-you-go session, or a savepoint in the transaction of another (its ``parent``).
It owns what belongs to the transaction rather than to a block of code: its state, the
callbacks waiting for its outcome, why it became rollback-only, the statement failures
caught in it and its session. The units (``_unit.Unit``, one stack frame per block) that
run in it reference it; joining a transaction is a new frame referencing the same object.

As SQLAlchemy's ``SessionTransactionState``, the states are an enum and the legal moves
between them are declared, so a move the code never meant to make fails at once, with
the transaction's origin, instead of leaving flags whose meaning depends on each other.
"""

from __future__ import annotations

import enum
import threading
from typing import TYPE_CHECKING, Any, Final

from ._callbacks import ALWAYS, NO_CALLBACKS, Callback, selected, undone
from ._errors import DisciplineError
from ._failures import Failure, rolled_back, session_savepoints
from ._options import Mode
from ._origin import Origin, failure_site

if TYPE_CHECKING:
    from sqlalchemy.engine import Connection
    from sqlalchemy.orm import Session, SessionTransaction

    from ._registry import Registry

__all__ = ["TRANSITIONS", "Role", "Transaction", "TransactionState", "in_progress", "transition"]


class Role(enum.Enum):
    """How a unit stands to the transaction it runs in."""

    BEGINS = "begins"  # it began the transaction (or runs a commit-as-you-go session)
    JOINS = "joins"  # it runs in the transaction of an active unit
    SAVEPOINT = "savepoint"  # it took a savepoint: a transaction whose parent is the active one


class TransactionState(enum.Enum):
    """Where the transaction a unit began stands."""

    ACTIVE = "active"  # statements run in it; it may commit
    ROLLBACK_ONLY = "rollback_only"  # a unit that joined it failed: it can only roll back
    COMMITTED = "committed"
    ROLLED_BACK = "rolled_back"
    IN_DOUBT = "in_doubt"  # its COMMIT failed before it went through: the outcome is unknown

    may_become: tuple[TransactionState, ...]  # the legal moves from it (TRANSITIONS)


_S = TransactionState

TRANSITIONS: Final[dict[TransactionState, frozenset[TransactionState]]] = {
    _S.ACTIVE: frozenset({_S.ROLLBACK_ONLY, _S.COMMITTED, _S.ROLLED_BACK, _S.IN_DOUBT}),
    _S.ROLLBACK_ONLY: frozenset({_S.ROLLED_BACK}),
    # A commit-as-you-go session begins a new transaction after each commit or rollback.
    _S.COMMITTED: frozenset({_S.ACTIVE}),
    _S.ROLLED_BACK: frozenset({_S.ACTIVE}),
    _S.IN_DOUBT: frozenset(),
}
"""The legal moves: from each state, the states it may become."""

# Each member keeps its moves as a tuple, so a move is checked without hashing members:
# Enum.__hash__ is Python code, and a lookup in TRANSITIONS cost ~3.5k instructions per
# move (callgrind), 0.6% of a SELECT 1 transaction, which makes one move on the way out.
for _state, _targets in TRANSITIONS.items():
    _state.may_become = tuple(sorted(_targets, key=lambda s: s.value))


def transition(current: TransactionState, new: TransactionState, where: Origin) -> TransactionState:
    """Return ``new`` if a transaction in state ``current`` may become it; else raise.

    ``where`` is where the unit that began the transaction was opened, for the message.
    """
    if new in current.may_become:
        return new
    raise _illegal_move(current, new, where)


def _illegal_move(current: TransactionState, new: TransactionState, where: Origin) -> DisciplineError:
    allowed = ", ".join(s.value for s in current.may_become) or "nothing: it is final"
    return DisciplineError(
        f"The transaction of the unit opened at {where} is {current.value!r} and cannot "
        f"become {new.value!r} (from {current.value!r} it may become {allowed}). A unit "
        "that ended was used again: open a new unit for new work."
    )


_ACTIVE: Final = TransactionState.ACTIVE  # module constants on the hot path: see _unit
_ROLLBACK_ONLY: Final = TransactionState.ROLLBACK_ONLY


def in_progress(transaction: Transaction | None) -> bool:
    """Say whether ``transaction`` and the transactions around it (a savepoint's) have not
    been settled yet: the units that began them are still running."""
    while transaction is not None:
        state = transaction.state
        if state is not _ACTIVE and state is not _ROLLBACK_ONLY:
            return False
        transaction = transaction.parent
    return True


# Held while a transaction's first callback replaces NO_CALLBACKS with a list: its own
# thread and another one (add_shared) may make that move at once, and one list would be lost.
_FIRST_CALLBACK: Final = threading.Lock()


class Transaction:
    """One transaction (or savepoint) and what it owes: state, callbacks, failures, session.

    ``where`` is where the unit that began it was opened, and ``parent`` the transaction a
    savepoint was taken in (None for the others). It holds no reference to the units that
    run in it: they reference it, and a unit's transaction outlives the unit's block without
    a reference cycle (each cycle would wait for the cyclic garbage collector, with its
    session). ``begun`` is SQLAlchemy's transaction: the
    session's root one for a begin-once transaction, the savepoint's for a savepoint, None
    for a commit-as-you-go session, which begins and ends transactions as its code commits.
    """

    __slots__ = (
        "where", "parent", "mode", "transactional", "registry", "session", "sync_session",
        "session_class", "isolation_level", "begun", "state", "callbacks", "failures",
        "rollback_cause", "rollback_site", "rollback_unit",
    )

    begun: SessionTransaction | None
    rollback_cause: BaseException | None  # set when it became ROLLBACK_ONLY
    rollback_site: Origin  # where that cause was raised
    rollback_unit: Origin  # where the unit that failed with it was opened

    def __init__(
        self,
        where: Origin,
        parent: Transaction | None,
        mode: Mode,
        transactional: bool,
        registry: Registry,
        session: Any,
        sync_session: Session,
        session_class: type[Session],
        isolation_level: str | None,
    ) -> None:
        self.where = where
        self.parent = parent
        self.mode = mode
        self.transactional = transactional  # False: a commit-as-you-go session for a call
        self.registry = registry
        self.session = session  # the Session, or the AsyncSession, the units hand out
        self.sync_session = sync_session  # the session itself, or an AsyncSession's
        self.session_class = session_class  # the user's class: called past the unit's guards
        self.isolation_level = isolation_level
        self.state = _ACTIVE
        self.callbacks: tuple[Callback, ...] | list[Callback] = NO_CALLBACKS
        self.failures: list[Failure] | tuple[Failure, ...] = ()  # caught ones: see _failures

    @property
    def root(self) -> Transaction:
        """The outermost transaction: the one whose session began it, savepoints aside."""
        transaction = self
        while transaction.parent is not None:
            transaction = transaction.parent
        return transaction

    def move_to(self, state: TransactionState) -> None:
        """Move to ``state``, if that move is declared legal (as ``transition``)."""
        current = self.state
        if state not in current.may_become:
            raise _illegal_move(current, state, self.where)
        self.state = state

    def mark_rollback_only(self, cause: BaseException, unit: Origin) -> None:
        """Doom the transaction: it will roll back. The first cause is kept; a transaction
        that has already ended has nothing left to doom."""
        if self.state is _ACTIVE:
            self.move_to(_ROLLBACK_ONLY)
            self.rollback_cause = cause
            self.rollback_site = failure_site(cause)
            self.rollback_unit = unit

    def begin_again(self, ended: TransactionState) -> None:
        """Record that a commit-as-you-go session's transaction ended (``ended``) and that the
        session goes on, in a new one; its failures and rollback-only mark are gone with it."""
        self.move_to(ended)
        self.move_to(_ACTIVE)
        self.failures = ()

    def add_callback(self, callback: Callback) -> None:
        callbacks = self.callbacks
        if isinstance(callbacks, list):
            callbacks.append(callback)
            return
        with _FIRST_CALLBACK:
            callbacks = self.callbacks
            if isinstance(callbacks, list):
                callbacks.append(callback)
            else:
                self.callbacks = [callback]

    def add_shared(self, callback: Callback) -> list[Callback]:
        """Add a ``Shared`` callback from a thread that may race the transaction's end;
        return the token ``takes`` needs."""
        with _FIRST_CALLBACK:
            callbacks = self.callbacks
            if not isinstance(callbacks, list):
                callbacks = self.callbacks = []
            callbacks.append(callback)
        return callbacks

    def takes(self, token: list[Callback]) -> bool:
        """Say whether the transaction's end is sure to take the callback ``add_shared`` added.

        Every end moves the state (a savepoint's, or a begin-once transaction's) before it
        looks at the callbacks, and a take replaces the list (a commit-as-you-go session's
        commit): read after the append, a state still in progress and the same list mean
        the end has not looked yet. False means it may have: the callback's claim decides.
        """
        return self.callbacks is token and in_progress(self)

    def take_callbacks(self, committed: bool) -> list[Callback]:
        """Remove and return the callbacks this outcome runs, in registration order."""
        callbacks = self.callbacks
        if not callbacks:
            return []
        self.callbacks = NO_CALLBACKS
        return selected(_settle_savepoints(callbacks), committed)

    def savepoints(self, connection: Connection) -> tuple[object, ...]:
        """The savepoints of this transaction's session, innermost first (see _failures)."""
        return session_savepoints(self.sync_session)


def _settle_savepoints(callbacks: list[Callback] | tuple[Callback, ...]) -> list[Callback]:
    """The callbacks, those registered in a savepoint that has rolled back settled as a
    savepoint unit settles its own: its on_commit ones dropped, its on_rollback ones run
    whatever the outcome (the user's ``begin_nested()`` has no unit to do it)."""
    return [
        cb for cb in callbacks
        if not (cb.savepoints and cb.when != ALWAYS and rolled_back(cb.savepoints) and undone(cb))
    ]
