"""``txguard.connect()``: Core connections with the same discipline as sessions."""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Any

from sqlalchemy import Engine, event
from sqlalchemy.engine import Connection, RootTransaction
from sqlalchemy.util import greenlet_spawn

from ._errors import ConfigurationError, DisciplineError, UncommittedWorkWarning
from ._options import Mode, _isolation, choice
from ._origin import Origin, caller_origin, capture, shorten_sql, warn_at_user
from ._registry import SessionRegistry, resolve
from ._sessions import is_write_sql
from ._unit import completed

if TYPE_CHECKING:
    from types import TracebackType

__all__ = ["connect", "ConnectionUnit"]

_GUARDED = ("commit", "rollback", "begin", "close")
_BEGIN_ONCE = Mode.BEGIN_ONCE


class _Held:
    """A connection while a ``connect()`` block holds it."""

    __slots__ = ("conn", "mode", "transaction", "where", "first_write", "first_sql")

    def __init__(self, conn: Connection, mode: Mode, where: Origin) -> None:
        self.conn = conn
        self.mode = mode
        self.where = where
        self.transaction: RootTransaction | None = None
        self.first_write: Origin | None = None
        self.first_sql: str | None = None

    def refuse(self, *args: Any, **kwargs: Any) -> None:
        raise DisciplineError(
            f"The begin-once connection opened at {self.where} owns its transaction: it "
            "commits when the block ends and rolls back if an exception leaves it. Remove "
            "this commit()/rollback()/begin()/close() call, use conn.begin_nested() for a "
            "savepoint, or open it with txguard.connect(mode='commit_as_you_go')."
        )

    def note_statement(
        self, conn: Connection, cursor: Any, statement: str, parameters: Any, context: Any,
        executemany: bool,
    ) -> None:
        if self.first_write is None and is_write_sql(statement):
            self.first_write = capture(1)
            # Quote the SQL as compiled: ``statement`` has literal_execute values rendered in.
            compiled = getattr(context, "compiled", None)
            self.first_sql = shorten_sql(compiled.string if compiled is not None else statement)

    def forget(self, conn: Connection) -> None:
        self.first_write = self.first_sql = None


def _open(engine: Engine, mode: Mode, isolation_level: str | None, where: Origin) -> _Held:
    conn = engine.connect()
    try:
        if isolation_level is not None:
            conn.execution_options(isolation_level=isolation_level)
        held = _Held(conn, mode, where)
        if mode is _BEGIN_ONCE:
            held.transaction = type(conn).begin(conn)
            d = conn.__dict__
            d["commit"] = d["rollback"] = d["begin"] = d["close"] = held.refuse
        else:
            event.listen(conn, "before_cursor_execute", held.note_statement)
            event.listen(conn, "commit", held.forget)
            event.listen(conn, "rollback", held.forget)
    except BaseException:
        conn.close()
        raise
    return held


def _settle(held: _Held, exc: BaseException | None) -> tuple[str | None, BaseException | None]:
    conn = held.conn
    d = conn.__dict__
    for name in _GUARDED:
        d.pop(name, None)
    error = exc
    warning = None
    try:
        transaction = held.transaction
        if transaction is not None:
            if exc is not None or not transaction.is_active:
                transaction.rollback()
            else:
                try:
                    transaction.commit()
                except BaseException as commit_error:
                    transaction.rollback()
                    error = commit_error
        elif exc is None and conn.in_transaction() and held.first_write is not None:
            warning = (
                f"The commit-as-you-go connection opened at {held.where} ended with "
                f"uncommitted writes (the first, {held.first_sql!r}, at {held.first_write}); "
                "they were rolled back. Call conn.commit() before the block ends, or "
                "conn.rollback() to discard them on purpose."
            )
    except BaseException as rollback_error:
        if error is None:
            error = rollback_error
    finally:
        conn.close()
    return warning, error


class ConnectionUnit:
    """A disciplined Core connection: ``with`` for an Engine, ``async with`` for an AsyncEngine."""

    __slots__ = ("_engine", "_mode", "_isolation_level", "_where", "_held")

    def __init__(self, engine: Any, mode: Mode, isolation_level: str | None, where: Origin) -> None:
        self._engine = engine
        self._mode = mode
        self._isolation_level = isolation_level
        self._where = where
        self._held: _Held | None = None

    def __enter__(self) -> Connection:
        if not isinstance(self._engine, Engine):
            raise ConfigurationError(
                f"{self._engine!r} is an AsyncEngine: use `async with txguard.connect(...)`."
            )
        self._held = _open(self._engine, self._mode, self._isolation_level, self._where)
        return self._held.conn

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        held, self._held = self._held, None
        if held is None:
            return
        warning, error = _settle(held, exc)
        _deliver(warning, error, exc)

    async def __aenter__(self) -> Any:
        from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

        engine = self._engine
        if not isinstance(engine, AsyncEngine):
            raise ConfigurationError(f"{engine!r} is a sync Engine: use `with txguard.connect(...)`.")
        self._held = await greenlet_spawn(
            _open, engine.sync_engine, self._mode, self._isolation_level, self._where
        )
        return AsyncConnection(engine, self._held.conn)

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        held, self._held = self._held, None
        if held is None:
            return
        task, cancelled = await completed(greenlet_spawn(_settle, held, exc))
        warning, error = task.result()
        _deliver(warning, error if cancelled is None else cancelled, exc)


def _deliver(warning: str | None, error: BaseException | None, exc: BaseException | None) -> None:
    if warning is not None:
        warn_at_user(warning, UncommittedWorkWarning)
    if error is not None and error is not exc:
        raise error


def connect(
    engine: Any = None,
    *,
    mode: Mode | str = Mode.BEGIN_ONCE,
    isolation_level: str | None = None,
    registry: SessionRegistry | None = None,
) -> ConnectionUnit:
    """Open a Core connection: ``mode="begin_once"`` is ``engine.begin()`` with discipline,
    ``mode="commit_as_you_go"`` is ``engine.connect()`` that warns about discarded writes.

    ``engine`` may be omitted when the registry (default or given) has exactly one.
    """
    checked_mode = mode if mode is _BEGIN_ONCE else choice("mode", mode, Mode)
    level = None if isolation_level is None else _isolation(isolation_level)
    if registry is not None and not isinstance(registry, SessionRegistry):
        raise ConfigurationError(
            f"registry={registry!r} is not valid; pass a txguard.SessionRegistry, or None "
            "for the default registry set by txguard.configure()."
        )
    if engine is None:
        engine = resolve(registry).core_engine()
    elif not isinstance(engine, Engine):
        from sqlalchemy.ext.asyncio import AsyncEngine

        if not isinstance(engine, AsyncEngine):
            raise ConfigurationError(
                f"txguard.connect() needs an Engine or AsyncEngine, not {engine!r}."
            )
    return ConnectionUnit(engine, checked_mode, level, caller_origin(sys._getframe(1)))
