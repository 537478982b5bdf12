"""The exceptions and warnings txguard raises and emits (one root for each)."""

from __future__ import annotations

from typing import Final

from sqlalchemy.exc import InvalidRequestError

__all__ = [
    "ConfigurationError",
    "CrossTaskWarning",
    "CrossThreadWarning",
    "DisciplineError",
    "LeakError",
    "LeakedConnectionWarning",
    "LeakedSessionWarning",
    "LongTransactionWarning",
    "MixedBeginError",
    "MixedBeginWarning",
    "ReadOnlyTransactionError",
    "TransactionNotAllowedError",
    "TransactionRequiredError",
    "TxGuardError",
    "TxGuardWarning",
    "UncommittedWorkWarning",
    "UnexpectedRollbackError",
    "mark_after_commit",
    "raised_after_commit",
]


class TxGuardError(Exception):
    """Root of every error txguard raises."""

    __module__ = "txguard"


class ConfigurationError(TxGuardError, ValueError):
    """Raise for a wrong option or a registry that is missing or of the wrong kind."""

    __module__ = "txguard"


class TransactionRequiredError(TxGuardError):
    """Raise when code needs an active unit of work and there is none."""

    __module__ = "txguard"


class TransactionNotAllowedError(TxGuardError):
    """Raise when code marked ``propagation="never"`` runs inside a unit of work."""

    __module__ = "txguard"


class DisciplineError(TxGuardError):
    """Raise when code takes over a transaction boundary that a unit of work owns."""

    __module__ = "txguard"


class UnexpectedRollbackError(TxGuardError):
    """Raise when a unit tries to commit a transaction that a joined unit doomed."""

    __module__ = "txguard"


class ReadOnlyTransactionError(TxGuardError):
    """Raise when a read-only unit of work tries to write."""

    __module__ = "txguard"


class LeakError(TxGuardError):
    """Raise when sessions or connections are still open; ``.leaks`` lists them."""

    __module__ = "txguard"

    def __init__(self, message: str, leaks: list[object] | None = None) -> None:
        super().__init__(message)
        self.leaks = list(leaks or [])


class MixedBeginError(TxGuardError, InvalidRequestError):
    """Raise for ``begin()`` on a session or connection whose transaction is already active."""

    __module__ = "txguard"


class TxGuardWarning(UserWarning):
    """Root of every warning txguard emits."""

    __module__ = "txguard"


class MixedBeginWarning(TxGuardWarning):
    """Warn that ``begin()`` was called while a transaction was already active."""

    __module__ = "txguard"


class UncommittedWorkWarning(TxGuardWarning):
    """Warn that changes were never committed and have been rolled back."""

    __module__ = "txguard"


class LeakedSessionWarning(TxGuardWarning, ResourceWarning):
    """Warn that a Session was garbage-collected while still holding a transaction."""

    __module__ = "txguard"


class LeakedConnectionWarning(TxGuardWarning, ResourceWarning):
    """Warn that a Connection was garbage-collected while still checked out."""

    __module__ = "txguard"


class CrossThreadWarning(TxGuardWarning):
    """Warn that a Session is used from a thread other than the one that began it."""

    __module__ = "txguard"


class CrossTaskWarning(TxGuardWarning):
    """Warn that an AsyncSession is used by an asyncio task other than its unit's."""

    __module__ = "txguard"


class LongTransactionWarning(TxGuardWarning):
    """Warn that a transaction has been open longer than the configured threshold."""

    __module__ = "txguard"


_AFTER_COMMIT: Final = "_txguard_after_commit"


def mark_after_commit(exc: BaseException) -> None:
    """Record that ``exc`` was raised after a transaction committed (a listener, a callback).

    The mark travels with the exception, so no unit it passes through on its way out (the
    one that committed, or an outer one that would run the committed work again) retries it.
    """
    try:
        setattr(exc, _AFTER_COMMIT, True)
    except Exception:  # pragma: no cover - an exception type that refuses attributes
        pass


def raised_after_commit(exc: BaseException) -> bool:
    """Say whether ``exc`` was raised after a transaction committed."""
    return getattr(exc, _AFTER_COMMIT, False) is True
