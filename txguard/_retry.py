"""Which errors are worth running a transaction again for, and how long to wait."""

from __future__ import annotations

import math
import random
from typing import TYPE_CHECKING, Final

from sqlalchemy.exc import DBAPIError

from ._describe import option_value
from ._errors import ConfigurationError, raised_after_commit
from ._transaction import Role, TransactionState

if TYPE_CHECKING:
    from collections.abc import Callable

    from ._options import UnitOptions
    from ._unit import Unit

__all__ = [
    "is_retryable", "retry_wanted", "next_delay", "backoff_delay", "BACKOFF_CAP",
]

# SQLSTATE, as psycopg 3 (``.sqlstate``), psycopg2 (``.pgcode``) and SQLAlchemy's asyncpg
# adapter (both) report it: serialization failure, deadlock detected.
_PG_RETRYABLE: Final = frozenset({"40001", "40P01"})
# MySQL/MariaDB error numbers: deadlock (the server rolled the transaction back), lock wait
# timeout (the server rolled back the statement only; the unit rolls back the rest).
_MYSQL_RETRYABLE: Final = frozenset({1213, 1205})
BACKOFF_CAP: Final = 2.0  # seconds; a larger base backoff is its own cap
_MAX_DOUBLINGS: Final = 60  # keeps 2 ** n a float long after the cap is reached


def _sqlstate(orig: object) -> str | None:
    for attr in ("sqlstate", "pgcode"):
        value = getattr(orig, attr, None)
        if isinstance(value, str):
            return value
    return None


def _mysql_errno(orig: object) -> int | None:
    # PyMySQL, aiomysql, mysqlclient: args[0]; mysql-connector and MariaDB Connector: .errno.
    # PyMySQL >= 1.2 also sets .sqlstate ("HY000" for a lock wait timeout), so the error
    # number is looked at whatever the SQLSTATE says.
    args = getattr(orig, "args", ())
    candidates = (args[0] if args else None, getattr(orig, "errno", None))
    for value in candidates:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    return None


def is_retryable(exc: BaseException) -> bool:
    """Say whether the database reported an error that a fresh attempt can get past.

    True for a serialization failure (SQLSTATE 40001) or deadlock (40P01) on PostgreSQL
    (psycopg 3, psycopg2, asyncpg), a deadlock (1213) or lock wait timeout (1205) on
    MySQL/MariaDB (PyMySQL, aiomysql, mysqlclient), and an error on which SQLAlchemy
    invalidated the connection (the server dropped it, or it was killed). Never for an
    arbitrary ``OperationalError``: a constraint violation or a timeout stays an error.
    """
    if not isinstance(exc, DBAPIError):
        return False
    if exc.connection_invalidated:
        return True
    orig = exc.orig
    return _sqlstate(orig) in _PG_RETRYABLE or _mysql_errno(orig) in _MYSQL_RETRYABLE


def retry_wanted(opts: UnitOptions, exc: BaseException) -> bool:
    """Say whether ``exc`` is one this unit's options retry on.

    Never a ``BaseException`` that is not an ``Exception`` (KeyboardInterrupt, SystemExit,
    GeneratorExit, a cancelled task: each asks to stop, not to try again), nor an error
    raised after a commit (running the work again would apply it twice): ``retry_on`` is
    not asked about either.
    """
    if not isinstance(exc, Exception) or raised_after_commit(exc):
        return False
    if is_retryable(exc):
        return True
    predicate = opts.retry_on
    if predicate is None:
        return False
    try:
        return bool(predicate(exc))
    except BaseException as predicate_error:
        if predicate_error.__context__ is None:
            predicate_error.__context__ = exc  # keep the database error in the traceback
        raise


def backoff_delay(backoff: float | Callable[[int], float], attempt: int) -> float:
    """Return the pause after failed attempt ``attempt`` (1, 2, ...), in seconds.

    A number is the base of an exponential backoff with full jitter: a uniform draw from
    ``[0, min(cap, base * 2 ** (attempt - 1))]``, the cap being ``max(2 s, base)``. A
    function of the attempt number is used as it is, and must return seconds >= 0.
    """
    if callable(backoff):
        value = backoff(attempt)
        if (
            isinstance(value, bool)
            or not isinstance(value, (int, float))
            or not math.isfinite(value)
            or value < 0
        ):
            raise ConfigurationError(
                f"backoff({attempt}) returned {option_value(value)}; the backoff function must "
                "return a finite number of seconds >= 0."
            )
        return float(value)
    ceiling = min(max(BACKOFF_CAP, backoff), backoff * 2.0 ** min(attempt - 1, _MAX_DOUBLINGS))
    return random.uniform(0.0, ceiling)


def next_delay(unit: Unit, exc: BaseException, attempt: int) -> float | None:
    """Return how long to sleep before attempt ``attempt + 1``, or None to give up.

    Only a unit that began its own transaction retries (a joined unit leaves that to its
    owner, and a savepoint cannot undo what the server rolled back); ``unit_options``
    already refuses ``retries=`` where the unit could be commit-as-you-go. An error raised
    while COMMIT was in flight is retried only when the database said it rolled back;
    otherwise the outcome is unknown and running the work again could apply it twice; an
    error raised after a commit succeeded is never retried. Every error given up on after
    a retry carries a note saying how many attempts ran.
    """
    opts = unit.opts
    if raised_after_commit(exc):
        _note(
            exc,
            f"txguard: not retried by {unit.where}: it was raised after a transaction "
            "committed (by an after_commit listener, an on_commit callback or closing the "
            "session), so its data is saved and running the work again would apply it twice.",
        )
        return None
    if not retry_wanted(opts, exc):
        if attempt > 1:
            _note(
                exc,
                f"txguard: attempt {attempt} of {unit.where} failed with an error that is "
                f"not retried, after {attempt - 1} retried attempt(s); gave up after "
                f"{attempt} attempts.",
            )
        return None
    transaction = unit.transaction
    if unit.role is Role.JOINS:
        _note(
            exc,
            f"txguard: not retried by {unit.where}: it joined the transaction of the "
            f"unit opened at {transaction.where}; only the unit that begins a "
            "transaction retries it (retries= there, or propagation='requires_new' here).",
        )
        return None
    if transaction.parent is not None:  # a savepoint: the transaction around it goes on
        return None
    if transaction.state is TransactionState.IN_DOUBT and _from_commit(exc) and not _declared_rollback(exc):
        _note(
            exc,
            f"txguard: attempt {attempt} of {unit.where} failed while COMMIT was being "
            "sent, so whether the transaction committed is unknown; it was not retried, "
            f"after {attempt} attempt(s). Check the data before running the work again.",
        )
        return None
    if attempt > opts.retries:
        _note(
            exc,
            f"txguard: {unit.where} gave up after {attempt} attempts "
            f"(retries={opts.retries}); this is the error of the last one.",
        )
        return None
    return backoff_delay(opts.backoff, attempt)


def _from_commit(exc: BaseException) -> bool:
    """Say whether ``exc`` came from COMMIT itself, not from the flush before it.

    SQLAlchemy attaches the failing statement to errors of a flush; an error of the DBAPI
    ``commit()`` has none.
    """
    return isinstance(exc, DBAPIError) and exc.statement is None


def _declared_rollback(exc: BaseException) -> bool:
    """Say whether the database itself reported the transaction as rolled back."""
    if not isinstance(exc, DBAPIError) or exc.connection_invalidated:
        return False
    return is_retryable(exc)


def _note(exc: BaseException, text: str) -> None:
    add_note = getattr(exc, "add_note", None)
    if add_note is not None:
        add_note(text)
    else:  # pragma: no cover - Python 3.10: keep the note where 3.11's traceback shows it
        setattr(exc, "__notes__", [*getattr(exc, "__notes__", []), text])  # noqa: B010
