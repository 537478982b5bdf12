"""Which errors are worth running a transaction again for, and how long to wait."""

from __future__ import annotations

import random
from typing import TYPE_CHECKING, Final

from sqlalchemy.exc import DBAPIError

if TYPE_CHECKING:
    from ._options import UnitOptions
    from ._unit import Frame

__all__ = ["is_retryable", "retry_wanted", "next_delay"]

_PG_RETRYABLE: Final = frozenset({"40001", "40P01"})  # serialization failure, deadlock
_MYSQL_RETRYABLE: Final = frozenset({1213, 1205})  # deadlock, lock wait timeout
_BACKOFF_CAP: Final = 2.0


def _sqlstate(orig: object) -> str | None:
    for attr in ("sqlstate", "pgcode"):
        value = getattr(orig, attr, None)
        if isinstance(value, str):
            return value
    return None


def _mysql_errno(orig: object) -> int | None:
    args = getattr(orig, "args", ())
    if args and isinstance(args[0], int) and not isinstance(args[0], bool):
        return args[0]
    return None


def is_retryable(exc: BaseException) -> bool:
    """Say whether the database reported an error that a fresh attempt can get past.

    True for a serialization failure (SQLSTATE 40001) or deadlock (40P01) on PostgreSQL
    (psycopg 3, psycopg2, asyncpg), a deadlock (1213) or lock wait timeout (1205) on
    MySQL/MariaDB, and a connection invalidated under the transaction. Never for an
    arbitrary ``OperationalError``.
    """
    if not isinstance(exc, DBAPIError):
        return False
    if exc.connection_invalidated:
        return True
    orig = exc.orig
    code = _sqlstate(orig)
    if code is not None:
        return code in _PG_RETRYABLE
    return _mysql_errno(orig) in _MYSQL_RETRYABLE


def retry_wanted(opts: UnitOptions, exc: BaseException) -> bool:
    """Say whether ``exc`` is one this unit's options retry on."""
    if is_retryable(exc):
        return True
    return opts.retry_on is not None and bool(opts.retry_on(exc))


def _note(exc: BaseException, text: str) -> None:
    add_note = getattr(exc, "add_note", None)
    if add_note is not None:
        add_note(text)
    else:  # Python 3.10: keep the note where 3.11's traceback would show it
        exc.__notes__ = [*getattr(exc, "__notes__", []), text]  # type: ignore[attr-defined]


def next_delay(frame: Frame, exc: BaseException, attempt: int) -> float | None:
    """Return how long to sleep before attempt ``attempt + 1``, or None to give up.

    Only a unit that began its own begin-once transaction retries (a joined unit leaves
    that to its owner); an error raised while COMMIT was in flight is retried only when
    the database said it rolled back, since otherwise the outcome is unknown.
    """
    from ._options import Mode
    from ._unit import ROOT

    opts = frame.opts
    if frame.kind != ROOT or frame.scope.mode is not Mode.BEGIN_ONCE or not retry_wanted(opts, exc):
        if attempt > 1:
            _note(exc, f"txguard: gave up after {attempt} attempts (this error is not retried).")
        return None
    if frame.scope.committing and not _declared_rollback(exc):
        _note(
            exc,
            "txguard: this error came while COMMIT was being sent, so whether the "
            "transaction committed is unknown; it was not retried. Check the data before "
            "running the operation again.",
        )
        return None
    if attempt > opts.retries:
        _note(exc, f"txguard: gave up after {attempt} attempts (retries={opts.retries}).")
        return None
    backoff = opts.backoff
    if callable(backoff):
        return max(0.0, float(backoff(attempt)))
    return random.uniform(0.0, min(max(_BACKOFF_CAP, backoff), backoff * 2 ** (attempt - 1)))


def _declared_rollback(exc: BaseException) -> bool:
    """Say whether the database itself reported the transaction as rolled back."""
    if not isinstance(exc, DBAPIError) or exc.connection_invalidated:
        return False
    return is_retryable(exc)
