"""The state of a unit's transaction: whether it may still commit, and how it ended.

As SQLAlchemy's ``SessionTransactionState``, the states are an enum and the legal moves
between them are declared, so a move the code never meant to make fails at once, with
the transaction's origin, instead of leaving flags whose meaning depends on each other.
"""

from __future__ import annotations

import enum
from typing import TYPE_CHECKING, Final

from ._errors import DisciplineError

if TYPE_CHECKING:
    from ._origin import Origin

__all__ = ["TRANSITIONS", "TransactionState", "transition"]


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

# Each member keeps its moves as a tuple, so a move is checked without hashing the members
# (Enum.__hash__ is Python code: two hashes per move cost ~10k instructions per unit).
for _state, _targets in TRANSITIONS.items():
    _state.may_become = tuple(sorted(_targets, key=lambda s: s.value))


def transition(current: TransactionState, new: TransactionState, where: Origin) -> TransactionState:
    """Return ``new`` if a transaction in state ``current`` may become it; else raise.

    ``where`` is where the unit that began the transaction was opened, for the message.
    """
    if new in current.may_become:
        return new
    allowed = ", ".join(s.value for s in current.may_become) or "nothing: it is final"
    raise DisciplineError(
        f"The transaction of the unit opened at {where} is {current.value!r} and cannot "
        f"become {new.value!r} (from {current.value!r} it may become {allowed}). A unit "
        "that ended was used again: open a new unit for new work."
    )
