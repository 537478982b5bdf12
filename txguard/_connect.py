"""``txguard.connect()``: Core connections with the same discipline as sessions."""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Any

from sqlalchemy import Engine, event
from sqlalchemy.engine import Connection, RootTransaction
from sqlalchemy.util import greenlet_spawn

from ._callbacks import BlockCallbacks, current_block, run_callbacks
from ._describe import describe
from ._errors import ConfigurationError, DisciplineError
from ._failures import (
    Failure,
    aborted,
    aborted_error,
    connection_savepoints,
    first_failure,
    own_connection,
)
from ._options import Mode, _isolation, choice
from ._origin import Origin, caller_origin, capture, shorten_sql
from ._async import completed
from ._registry import Registry, check_registry, registry_or_default, resolve
from ._sessions import refuse_autocommit
from ._statements import is_write_execution
from ._unit import Finish, aleave, caught_failure, current_unit, leave

if TYPE_CHECKING:
    from contextvars import Token
    from types import TracebackType

    from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

__all__ = ["connect", "ConnectionUnit"]

# A Connection's class is the engine's, so a begin-once block refuses these calls with
# attributes of the one connection it holds (removed at its end), where a Session's unit
# uses a session subclass (_sessions).
_GUARDED = ("commit", "rollback", "begin", "close")


class _Held(BlockCallbacks):
    """A connection while a ``connect()`` block holds it, and the block's callbacks."""

    __slots__ = ("conn", "mode", "transaction", "where", "first_write", "first_sql", "failures")

    def __init__(self, conn: Connection, mode: Mode, where: Origin, outer: object) -> None:
        super().__init__(outer)
        self.conn = conn
        self.mode = mode
        self.where = where
        self.transaction: RootTransaction | None = None
        self.first_write: Origin | None = None
        self.first_sql: str | None = None
        self.failures: list[Failure] | tuple[Failure, ...] = ()  # caught ones: see _failures

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
        if self.first_write is None and is_write_execution(context, statement):
            self.first_write = capture(1)
            # Quote the SQL as compiled: ``statement`` has literal_execute values rendered in.
            compiled = getattr(context, "compiled", None)
            self.first_sql = shorten_sql(compiled.string if compiled is not None else statement)

    def savepoints(self, connection: Connection) -> tuple[object, ...]:
        return connection_savepoints(connection)

    def commit(self) -> None:
        """``conn.commit()`` of a commit-as-you-go block: refused after a caught failure."""
        conn = self.conn
        failure = first_failure(self)
        if failure is not None:
            self.rollback()
            raise caught_failure(
                failure,
                f"conn.commit() in the commit-as-you-go connection opened at {self.where} "
                "was refused",
                "the transaction has been rolled back",
            )
        if aborted(conn):
            self.rollback()
            raise aborted_error(
                f"conn.commit() in the commit-as-you-go connection opened at {self.where} "
                "was refused"
            )
        type(conn).commit(conn)
        run_callbacks(self.take(committed=True), committed=True, in_flight=False)

    def rollback(self) -> None:
        """``conn.rollback()`` of a commit-as-you-go block: its on_rollback callbacks run."""
        type(self.conn).rollback(self.conn)
        run_callbacks(self.take(committed=False), committed=False, in_flight=False)

    def forget(self, conn: Connection) -> None:
        self.first_write = self.first_sql = None
        self.failures = ()


def _open(
    engine: Engine, mode: Mode, isolation_level: str | None, where: Origin, outer: object
) -> _Held:
    conn = engine.connect()
    try:
        if isolation_level is not None:
            conn.execution_options(isolation_level=isolation_level)
        held = _Held(conn, mode, where, outer)
        own_connection(conn, held)
        if mode is Mode.BEGIN_ONCE:
            held.transaction = type(conn).begin(conn)
            for name in _GUARDED:
                conn.__dict__[name] = held.refuse
        else:
            conn.__dict__["commit"] = held.commit
            conn.__dict__["rollback"] = held.rollback
            event.listen(conn, "before_cursor_execute", held.note_statement)
            event.listen(conn, "commit", held.forget)
            event.listen(conn, "rollback", held.forget)
    except BaseException:
        conn.close()
        raise
    return held


def _settle(held: _Held, exc: BaseException | None) -> tuple[Finish | None, BaseException | None]:
    conn = held.conn
    d = conn.__dict__
    for name in _GUARDED:
        d.pop(name, None)
    error = exc
    warning = None
    committed = False
    try:
        transaction = held.transaction
        if transaction is not None:
            if exc is not None or not transaction.is_active:
                transaction.rollback()
            elif (failure := first_failure(held)) is not None:
                transaction.rollback()
                error = caught_failure(
                    failure,
                    f"The connection opened at {held.where} could not commit",
                    "its transaction has been rolled back",
                )
            elif aborted(conn):
                transaction.rollback()
                error = aborted_error(f"The connection opened at {held.where} could not commit")
            else:
                try:
                    transaction.commit()
                    committed = True
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
    callbacks = held.take(committed)
    if not callbacks and warning is None:
        return None, error
    return Finish(callbacks, committed, warning), error


class ConnectionUnit:
    """A disciplined Core connection: ``with`` for an Engine, ``async with`` for an AsyncEngine."""

    __slots__ = ("_engine", "_mode", "_isolation_level", "_where", "_registry", "_held", "_token")

    def __init__(
        self,
        engine: Engine | AsyncEngine,
        mode: Mode,
        isolation_level: str | None,
        where: Origin,
        registry: Registry | None,
    ) -> None:
        self._engine = engine
        self._mode = mode
        self._isolation_level = isolation_level
        self._where = where
        self._registry = registry
        self._held: _Held | None = None
        self._token: Token[BlockCallbacks | None] | None = None

    def _refuse_reentry(self) -> None:
        if self._held is not None:
            raise DisciplineError(
                f"The txguard.connect() object created at {self._where} is already in use: "
                "its block has not ended, and entering it again would drop that block's "
                "connection. Call txguard.connect() once for each block."
            )

    def __enter__(self) -> Connection:
        if not isinstance(self._engine, Engine):
            raise ConfigurationError(
                f"{describe(self._engine)} is an AsyncEngine: use "
                "`async with txguard.connect(...)`."
            )
        self._refuse_reentry()
        self._held = held = _open(
            self._engine, self._mode, self._isolation_level, self._where, self._outer()
        )
        self._token = current_block.set(held)
        return held.conn

    def _outer(self) -> object:
        """The unit current when the block opens, which on_commit() finds around it."""
        registry = registry_or_default(self._registry)
        return None if registry is None else current_unit(registry)

    def _leave_context(self, held: _Held) -> None:
        """Stop being the context's block: its callbacks run outside it. Ended in another
        context (a generator closed elsewhere), the block stays in the one it began in,
        marked ended, so that on_commit() there no longer counts on it."""
        held.open = False
        token, self._token = self._token, None
        if token is not None:
            try:
                current_block.reset(token)
            except ValueError:
                pass

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        held, self._held = self._held, None
        if held is None:
            return
        self._leave_context(held)
        finish, error = _settle(held, exc)
        leave(finish, error, exc)

    async def __aenter__(self) -> AsyncConnection:
        from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

        engine = self._engine
        if not isinstance(engine, AsyncEngine):
            raise ConfigurationError(
                f"{describe(engine)} is a sync Engine: use `with txguard.connect(...)`."
            )
        self._refuse_reentry()
        self._held = held = await greenlet_spawn(
            _open, engine.sync_engine, self._mode, self._isolation_level, self._where,
            self._outer(),
        )
        self._token = current_block.set(held)
        return AsyncConnection(engine, held.conn)

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        held, self._held = self._held, None
        if held is None:
            return
        self._leave_context(held)
        task, cancelled = await completed(greenlet_spawn(_settle, held, exc))
        finish, error = task.result()
        await aleave(finish, error if cancelled is None else cancelled, exc)


def connect(
    engine: Engine | AsyncEngine | None = None,
    *,
    mode: Mode | str = Mode.BEGIN_ONCE,
    isolation_level: str | None = None,
    registry: Registry | None = None,
) -> ConnectionUnit:
    """Open a Core connection: ``mode="begin_once"`` is ``engine.begin()`` with discipline,
    ``mode="commit_as_you_go"`` is ``engine.connect()`` that warns about discarded writes.

    ``engine`` may be omitted when the registry (default or given) has exactly one.
    """
    checked_mode = mode if mode is Mode.BEGIN_ONCE else choice("mode", mode, Mode)
    level = None if isolation_level is None else _isolation(isolation_level)
    check_registry(registry)
    if engine is None:
        engine = resolve(registry).core_engine()  # the registry refused an AUTOCOMMIT one
    else:
        if not isinstance(engine, Engine):
            from sqlalchemy.ext.asyncio import AsyncEngine

            if not isinstance(engine, AsyncEngine):
                raise ConfigurationError(
                    f"txguard.connect() needs an Engine or AsyncEngine, not {describe(engine)}; "
                    "pass create_engine(url) or create_async_engine(url)."
                )
        refuse_autocommit(engine, "txguard.connect()")
    return ConnectionUnit(engine, checked_mode, level, caller_origin(sys._getframe(1)), registry)
