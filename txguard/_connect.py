"""``txguard.connect()``: Core connections with the same discipline as sessions."""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, NoReturn

from sqlalchemy import Engine, event
from sqlalchemy.engine import Connection, NestedTransaction, RootTransaction, Transaction
from sqlalchemy.util import greenlet_spawn

from ._callbacks import (
    BlockCallbacks, Callback, current_block, run_callbacks, undone,
)
from ._describe import describe
from ._errors import ConfigurationError, DisciplineError, UnexpectedRollbackError
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
from ._sqla import adopt_transaction, enclosing_savepoint
from ._statements import is_write_execution
from ._unit import Finish, aleave, caught_failure, current_unit, leave

if TYPE_CHECKING:
    from contextvars import Token
    from types import TracebackType

    from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

__all__ = ["connect", "ConnectionUnit"]

logger = logging.getLogger("txguard")

# A Connection's class is the engine's, so a begin-once block refuses these calls with
# attributes of the one connection it holds (removed at its end), where a Session's unit
# uses a session subclass (_sessions). A commit-as-you-go block wraps the first three.
_GUARDED = ("commit", "rollback", "begin", "close")
_BLOCK = "_txguard_block"  # the connection's attribute naming its block, while it runs


class _Held(BlockCallbacks):
    """A connection while a ``connect()`` block holds it, and the block's callbacks.

    The connection's transactions become ``_BlockTransaction`` (and, once a callback is
    registered inside one, its savepoints ``_BlockSavepoint``), which report here however
    the code ends them: in commit-as-you-go mode each one's end runs its callbacks, in
    begin-once mode ending the block's transaction is refused as ``conn.commit()`` is.
    """

    __slots__ = (
        "conn", "mode", "transaction", "where", "first_write", "first_sql", "failures",
        "around", "in_savepoints", "exiting", "outcome",
    )

    def __init__(
        self, conn: Connection, mode: Mode, where: Origin, outer: object,
        around: BlockCallbacks | None,
    ) -> None:
        super().__init__(outer)
        self.conn = conn
        self.mode = mode
        self.where = where
        self.transaction: RootTransaction | None = None
        self.first_write: Origin | None = None
        self.first_sql: str | None = None
        self.failures: list[Failure] | tuple[Failure, ...] = ()  # caught ones: see _failures
        self.around = around  # the block current when this one opened: its callbacks run there
        # The callbacks registered inside each savepoint: its rollback drops (or keeps) them.
        self.in_savepoints: dict[NestedTransaction, list[Callback]] | None = None
        self.exiting = False  # in `with conn.begin():`'s end: the callbacks wait for it
        self.outcome: Finish | None = None  # what that end left to run

    def refuse(self, *args: Any, **kwargs: Any) -> NoReturn:
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

    def forget(self, conn: Connection) -> None:
        self.first_write = self.first_sql = None
        self.failures = ()

    def track(self, callback: Callback) -> None:
        """Keep ``callback`` for the savepoints it is registered in, too."""
        savepoint = self.conn.get_nested_transaction()
        if savepoint is None:
            return
        in_savepoints = self.in_savepoints
        if in_savepoints is None:
            in_savepoints = self.in_savepoints = {}
        while savepoint is not None:
            if not isinstance(savepoint, _BlockSavepoint):
                adopt_transaction(savepoint, _BlockSavepoint)
            in_savepoints.setdefault(savepoint, []).append(callback)
            savepoint = enclosing_savepoint(savepoint)

    def take(self, committed: bool) -> list[Callback]:
        self.in_savepoints = None
        return super().take(committed)

    def rolled_back_to(self, savepoint: NestedTransaction) -> None:
        """Drop the on_commit callbacks registered inside ``savepoint``, which has been rolled
        back; its on_rollback ones run whatever the outcome: their work is undone (SPEC §4)."""
        inside = None if self.in_savepoints is None else self.in_savepoints.pop(savepoint, None)
        if not inside:
            return
        dropped = [cb for cb in inside if undone(cb)]
        self.callbacks = [cb for cb in self.callbacks if cb not in dropped]

    # The ends of a commit-as-you-go block's transactions.

    def begin(self) -> RootTransaction:
        """``conn.begin()``, which a statement's autobegin calls too."""
        transaction = type(self.conn).begin(self.conn)
        adopt_transaction(transaction, _BlockTransaction)
        return transaction

    def commit(self) -> None:
        """``conn.commit()``; with no transaction, what waits for a COMMIT runs (as a
        commit-as-you-go session's ``commit()`` would)."""
        transaction = self.conn.get_transaction()
        if transaction is None:
            self.ended(committed=True)
        else:
            self.commit_transaction(transaction, "conn.commit()")

    def rollback(self) -> None:
        """``conn.rollback()``; with no transaction, what waits for one is dropped."""
        transaction = self.conn.get_transaction()
        if transaction is None:
            self.ended(committed=False)
        else:
            self.end_transaction(transaction, RootTransaction.rollback)

    def refusal(self, call: str) -> UnexpectedRollbackError | None:
        """Why the transaction must not commit (a caught failure, or one PostgreSQL saw)."""
        failure = first_failure(self)
        if failure is not None:
            return caught_failure(
                failure,
                f"{call} in the commit-as-you-go connection opened at {self.where} was refused",
                "the transaction has been rolled back",
            )
        if aborted(self.conn):
            return aborted_error(
                f"{call} in the commit-as-you-go connection opened at {self.where} was refused"
            )
        return None

    def commit_transaction(
        self, transaction: RootTransaction, call: str = "The transaction's commit()"
    ) -> None:
        if self.mode is Mode.BEGIN_ONCE:
            self.refuse()
        if transaction.is_active and self.conn.get_transaction() is transaction:
            refusal = self.refusal(call)
            if refusal is not None:
                self.end_transaction(transaction, RootTransaction.rollback, in_flight=True)
                raise refusal
        try:
            RootTransaction.commit(transaction)  # SQLAlchemy raises for one that has ended
        except BaseException:
            self.discard_after_failed_commit(transaction)
            raise
        self.ended(committed=True)

    def discard_after_failed_commit(self, transaction: RootTransaction) -> None:
        """Roll back the DBAPI transaction of a COMMIT that raised before it went through.

        SQLAlchemy marks the transaction inactive whether or not its COMMIT was sent, and
        its rollback then sends nothing: a failure before the driver's commit (a ``commit``
        listener, an interrupt) left the work open on the connection, and the next
        transaction's COMMIT committed it, after its on_rollback callbacks had run. Once the
        driver's commit has run (or failed), a ROLLBACK changes nothing.
        """
        conn = self.conn
        if conn.closed or conn.invalidated or conn.get_transaction() is not transaction:
            return
        try:
            conn.dialect.do_rollback(conn.connection)
        except Exception:
            logger.warning("txguard: rolling back after a failed COMMIT failed", exc_info=True)

    def end_transaction(
        self,
        transaction: RootTransaction,
        end: Callable[[RootTransaction], None],
        in_flight: bool = False,
    ) -> None:
        """Roll back or close ``transaction``; if it was the connection's, run its
        on_rollback callbacks (also when the ROLLBACK fails: the transaction is gone)."""
        if self.mode is Mode.BEGIN_ONCE:
            self.refuse()
        if self.conn.get_transaction() is not transaction:
            end(transaction)  # it had ended: SQLAlchemy does what it does (nothing, or warns)
            return
        try:
            end(transaction)
        except BaseException:
            self.ended(committed=False, in_flight=True)
            raise
        self.ended(committed=False, in_flight=in_flight)

    def exit_transaction(
        self, transaction: _BlockTransaction, type_: Any, value: Any, traceback: Any
    ) -> None:
        """The end of ``with conn.begin():``: it commits (unless a caught failure forbids
        it) or rolls back, and the callbacks run once SQLAlchemy's context manager is over,
        when statements on the connection work again."""
        if self.mode is Mode.BEGIN_ONCE:
            RootTransaction.__exit__(transaction, type_, value, traceback)
            return
        refusal = None
        if type_ is None and transaction.is_active and self.conn.get_transaction() is transaction:
            refusal = self.refusal("The COMMIT at the end of `with conn.begin():`")
            if refusal is not None:  # end as if it had left the `with`: SQLAlchemy rolls back
                type_, value, traceback = type(refusal), refusal, None
        self.exiting = True
        try:
            RootTransaction.__exit__(transaction, type_, value, traceback)
        except BaseException:
            self.exiting = False
            self.deliver(in_flight=True)
            raise
        self.exiting = False
        self.deliver(in_flight=type_ is not None)
        if refusal is not None:
            raise refusal

    def ended(self, committed: bool, in_flight: bool = False) -> None:
        """The connection's transaction has ended: run the callbacks of its outcome, or keep
        them until the ``with conn.begin():`` that ended it is over."""
        callbacks = self.take(committed)
        if self.exiting:
            self.outcome = Finish(callbacks, committed)
        elif callbacks:
            self.run(callbacks, committed, in_flight)

    def deliver(self, in_flight: bool) -> None:
        finish, self.outcome = self.outcome, None
        if finish is not None and finish.callbacks:
            self.run(finish.callbacks, finish.committed, in_flight)

    def run(self, callbacks: list[Callback], committed: bool, in_flight: bool) -> None:
        """Run callbacks outside the block, as a unit's (SPEC §4): on_commit() in one does
        not wait for the block's next COMMIT."""
        token = current_block.set(self.around)
        try:
            run_callbacks(callbacks, committed, in_flight)
        finally:
            current_block.reset(token)


def _block_of(transaction: Transaction) -> _Held | None:
    """The block whose connection ``transaction`` is on, while the block runs."""
    held: _Held | None = transaction.connection.__dict__.get(_BLOCK)
    return held


class _BlockTransaction(RootTransaction):
    """The root transaction of a ``connect()`` block's connection, which tells the block
    however it ends (``conn.commit()``, ``with conn.begin():``, ``trans.commit()``, the
    rollbacks, ``conn.close()``); once the block has ended, SQLAlchemy's own."""

    __slots__ = ()

    def commit(self) -> None:
        held = _block_of(self)
        if held is None:
            RootTransaction.commit(self)
        else:
            held.commit_transaction(self)

    def rollback(self) -> None:
        held = _block_of(self)
        if held is None:
            RootTransaction.rollback(self)
        else:
            held.end_transaction(self, RootTransaction.rollback)

    def close(self) -> None:
        held = _block_of(self)
        if held is None:
            RootTransaction.close(self)
        else:
            held.end_transaction(self, RootTransaction.close)

    def __exit__(self, type_: Any, value: Any, traceback: Any) -> None:
        held = _block_of(self)
        if held is None:
            RootTransaction.__exit__(self, type_, value, traceback)
        else:
            held.exit_transaction(self, type_, value, traceback)


class _BlockSavepoint(NestedTransaction):
    """A savepoint of a ``connect()`` block's connection that callbacks were registered
    in: its rollback tells the block (its ``rollback_savepoint`` event would cost the rest
    of the block's statements an event dispatch each)."""

    __slots__ = ()

    def rollback(self) -> None:
        held = _block_of(self)
        undone = held is not None and self.is_active
        try:
            super().rollback()
        finally:
            if undone and held is not None:  # its work is undone, or the transaction doomed
                held.rolled_back_to(self)

    def close(self) -> None:
        held = _block_of(self)
        undone = held is not None and self.is_active
        try:
            super().close()
        finally:
            if undone and held is not None:
                held.rolled_back_to(self)


def _open(
    engine: Engine, mode: Mode, isolation_level: str | None, where: Origin, outer: object,
    around: BlockCallbacks | None,
) -> _Held:
    conn = engine.connect()
    try:
        if isolation_level is not None:
            conn.execution_options(isolation_level=isolation_level)
        held = _Held(conn, mode, where, outer, around)
        own_connection(conn, held)
        d = conn.__dict__
        d[_BLOCK] = held
        if mode is Mode.BEGIN_ONCE:
            held.transaction = transaction = type(conn).begin(conn)
            adopt_transaction(transaction, _BlockTransaction)
            for name in _GUARDED:
                d[name] = held.refuse
        else:
            d["begin"] = held.begin
            d["commit"] = held.commit
            d["rollback"] = held.rollback
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
    d.pop(_BLOCK, None)  # its transactions are SQLAlchemy's own again (the block's end
    # calls RootTransaction's methods directly, past _BlockTransaction's)
    for name in _GUARDED:
        d.pop(name, None)
    error = exc
    warning = None
    committed = False
    try:
        transaction = held.transaction
        if transaction is not None:
            if exc is not None or not transaction.is_active:
                RootTransaction.rollback(transaction)
            elif (failure := first_failure(held)) is not None:
                RootTransaction.rollback(transaction)
                error = caught_failure(
                    failure,
                    f"The connection opened at {held.where} could not commit",
                    "its transaction has been rolled back",
                )
            elif aborted(conn):
                RootTransaction.rollback(transaction)
                error = aborted_error(f"The connection opened at {held.where} could not commit")
            else:
                try:
                    RootTransaction.commit(transaction)
                    committed = True
                except BaseException as commit_error:
                    RootTransaction.rollback(transaction)
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
    callbacks = held.close(committed, undone=not committed and held.mode is Mode.BEGIN_ONCE)
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
            self._engine, self._mode, self._isolation_level, self._where, self._outer(),
            current_block.get(),
        )
        self._token = current_block.set(held)
        return held.conn

    def _outer(self) -> object:
        """The unit current when the block opens, which on_commit() finds around it."""
        registry = registry_or_default(self._registry)
        return None if registry is None else current_unit(registry)

    def _leave_context(self, held: _Held) -> None:
        """Stop being the context's block: its callbacks run outside it. Ended in another
        context (a generator closed elsewhere), the block stays in the one it began in;
        its end closes it (``BlockCallbacks.close``), so that on_commit() there no longer
        counts on it. A thread registering before that joins the end."""
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
            self._outer(), current_block.get(),
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
