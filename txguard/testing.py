"""Test helpers: roll back everything a test commits, and capture after-commit callbacks.

``rollback_after(bind)`` runs a block inside one outer transaction on one connection and
makes the registry's units of work join it through savepoints, so code that commits,
rolls back and nests savepoints behaves as in production while the database ends the
block as it began it. ``capture_on_commit()`` is Django's ``captureOnCommitCallbacks``.
"""

from __future__ import annotations

import contextvars
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from sqlalchemy import Engine
from sqlalchemy.engine import Connection
from sqlalchemy.orm import Session
from sqlalchemy.util import greenlet_spawn

from ._callbacks import call_each, capturing, capturing_callbacks
from ._describe import describe, option_value
from ._errors import ConfigurationError, DisciplineError
from ._registry import Registry, check_registry, default_registry
from ._session_registry import SessionRegistry
from ._sessions import refuse_autocommit
from ._sqlite import install_sqlite_transactions

if TYPE_CHECKING:
    from types import TracebackType

    from sqlalchemy.engine import RootTransaction

    from ._callbacks import Callback

__all__ = ["RollbackAfter", "capture_on_commit", "rollback_after"]


class RollbackAfter:
    """One outer transaction around a block, rolled back at its end.

    ``with`` for an Engine or a sync registry yields the Connection; ``async with`` for
    an AsyncEngine or an async registry yields the AsyncConnection.
    """

    __slots__ = ("_engine", "_registry", "_connection", "_transaction", "_undo")

    @property
    def is_async(self) -> bool:
        """Whether the block is entered with ``async with`` (an AsyncEngine or async registry)."""
        return _is_async(self._engine)

    def __init__(self, engine: Any, registry: Registry | None) -> None:
        self._engine = engine
        self._registry = registry
        self._connection: Any = None
        self._transaction: Any = None
        self._undo: Callable[[], None] | None = None

    def _claim(self, want_async: bool) -> None:
        if self._connection is not None:
            raise DisciplineError(
                "This rollback_after() is already in use; create a new one for each block."
            )
        if want_async is not _is_async(self._engine):
            raise ConfigurationError(
                f"rollback_after({describe(self._engine)}) needs `async with` for an "
                "AsyncEngine or an async registry, and a plain `with` for an Engine or a sync "
                "registry."
            )

    def _bind(self, connection: Any) -> None:
        conn: Connection = getattr(connection, "sync_connection", None) or connection
        # The code under test must not end the outer transaction: only the block does.
        conn.__dict__["commit"] = _refuse_commit
        if self._registry is not None:
            self._undo = _bind_registry(self._registry, connection, conn)

    def _unbind(self) -> None:
        undo, self._undo = self._undo, None
        connection, self._connection = self._connection, None
        conn = getattr(connection, "sync_connection", None) or connection
        if conn is not None:
            conn.__dict__.pop("commit", None)
        if undo is not None:
            undo()

    def __enter__(self) -> Connection:
        self._claim(want_async=False)
        engine: Engine = self._engine
        install_sqlite_transactions(engine)
        connection = engine.connect()
        try:
            transaction = connection.begin()
            self._connection, self._transaction = connection, transaction
            self._bind(connection)
        except BaseException:
            self._unbind()
            connection.close()
            raise
        return connection

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        connection: Connection = self._connection
        transaction: RootTransaction = self._transaction
        self._transaction = None
        try:
            self._unbind()
            if transaction.is_active:
                transaction.rollback()
        finally:
            connection.close()

    async def __aenter__(self) -> Any:
        self._claim(want_async=True)
        install_sqlite_transactions(self._engine.sync_engine)
        connection = self._engine.connect()
        await connection.start()
        try:
            self._transaction = await connection.begin()
            self._connection = connection
            self._bind(connection)
        except BaseException:
            self._unbind()
            await connection.close()
            raise
        return connection

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        from ._async import run_to_completion

        connection, transaction = self._connection, self._transaction
        self._transaction = None
        self._unbind()
        await run_to_completion(_arollback_and_close(connection, transaction))


async def _arollback_and_close(connection: Any, transaction: Any) -> None:
    try:
        if transaction.is_active:
            await transaction.rollback()
    finally:
        await connection.close()


def _bind_registry(registry: Registry, connection: Any, conn: Connection) -> Callable[[], None]:
    """Bind ``registry``'s sessions to ``connection``, also those whose class picks its own bind.

    ``conn`` is ``connection`` itself, or the sync Connection of an AsyncConnection.

    A session class that overrides ``get_bind()`` (Flask-SQLAlchemy's, which routes by bind
    key to ``db.engines``, or a read-replica router) ignores the ``bind=`` the registry
    passes, so its statements would run on a new connection and really commit. Where such
    a ``get_bind()`` answers the block's engine, the bound sessions get the block's
    connection instead; other engines stay as they are.
    """
    undo = registry._bind_sessions_to(connection)
    if registry.base_class.get_bind is Session.get_bind:
        return undo
    build = registry.session_factory

    def session_factory(*key: Any) -> Callable[[], Any]:
        factory = build(*key)

        def joined() -> Any:
            session = factory()
            sync: Session = getattr(session, "sync_session", session)
            sync.get_bind = _prefer(conn, sync.get_bind)  # type: ignore[method-assign]
            return session

        registry._factories[key] = joined
        return joined

    registry.session_factory = session_factory  # type: ignore[method-assign,assignment]

    def restore() -> None:
        del registry.session_factory
        undo()

    return restore


def _prefer(conn: Connection, get_bind: Callable[..., Any]) -> Callable[..., Any]:
    """Return ``get_bind`` answering ``conn`` where it would answer ``conn``'s engine."""
    engine = conn.engine

    def get_bind_in_block(*args: Any, **kwargs: Any) -> Any:
        bind = get_bind(*args, **kwargs)
        return conn if bind is engine else bind

    return get_bind_in_block


def _refuse_commit(*args: Any, **kwargs: Any) -> None:
    raise DisciplineError(
        "commit() on the connection of txguard.testing.rollback_after(): the block owns its "
        "outer transaction and rolls it back at the end. Commit through a unit of work or a "
        "Session joined with join_transaction_mode='create_savepoint' (each commit then "
        "releases a savepoint), or use conn.begin_nested()."
    )


def _is_async(engine: Any) -> bool:
    return hasattr(engine, "sync_engine")


def rollback_after(
    bind: Engine | SessionRegistry[Any] | Any = None, *, registry: SessionRegistry[Any] | None = None
) -> RollbackAfter:
    """Run a block in one outer transaction that is rolled back at its end.

    ``bind`` is an Engine, an AsyncEngine or a SessionRegistry; omitted, the default
    registry. The registry's units of work (the one given, the one ``bind`` is, or the
    default registry when it uses that engine) open their sessions on the block's
    connection with ``join_transaction_mode="create_savepoint"``: each commit releases a
    savepoint, each rollback returns to one, and nothing reaches the database. Sessions
    the code under test creates itself must be given the yielded connection, as
    ``Session(bind=conn, join_transaction_mode="create_savepoint")``.
    """
    check_registry(registry)
    if bind is None:
        bind = registry if registry is not None else default_registry()
    if isinstance(bind, SessionRegistry):
        if registry is not None and registry is not bind:
            raise ConfigurationError(
                "rollback_after() got two registries; pass one, as bind or as registry=."
            )
        return RollbackAfter(bind.core_engine(), bind)
    if isinstance(bind, Engine) or (_is_async(bind) and not hasattr(bind, "sync_connection")):
        refuse_autocommit(bind, "txguard.testing.rollback_after()")
        return RollbackAfter(bind, registry if registry is not None else _default_for(bind))
    raise ConfigurationError(
        f"rollback_after() needs an Engine, an AsyncEngine or a txguard.SessionRegistry, "
        f"not {describe(bind)}; pass e.g. create_engine(url)."
    )


def _default_for(engine: Any) -> Registry | None:
    """Return the default registry if it uses ``engine`` (and is as sync/async as it)."""
    from . import _registry

    default = _registry._default
    if default is None or default.is_async is not _is_async(engine):
        return None
    return default if getattr(engine, "sync_engine", engine) in default.engines else None


class _Capture:
    """The context manager behind ``capture_on_commit()``."""

    __slots__ = ("_execute", "_callbacks", "_details", "_tokens")

    def __init__(self, execute: bool) -> None:
        self._execute = execute
        self._callbacks: list[Callable[[], object]] = []
        self._details: list[Callback] = []
        self._tokens: tuple[contextvars.Token[Any], contextvars.Token[Any]] | None = None

    def __enter__(self) -> list[Callable[[], object]]:
        if self._tokens is not None:
            raise DisciplineError("This capture_on_commit() is already in use; create a new one.")
        self._tokens = (capturing.set(self._callbacks), capturing_callbacks.set(self._details))
        return self._callbacks

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        tokens, self._tokens = self._tokens, None
        try:
            if self._execute and exc is None:
                self._run_all()
        finally:
            _stop_capturing(tokens)

    async def __aenter__(self) -> list[Callable[[], object]]:
        return self.__enter__()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """Run the callbacks as ``__exit__`` does, in the greenlet bridge that awaits async ones."""
        tokens, self._tokens = self._tokens, None
        try:
            if self._execute and exc is None:
                await greenlet_spawn(self._run_all)
        finally:
            _stop_capturing(tokens)

    def _run_all(self) -> None:
        # A callback may register more: on_commit outside a transaction is captured
        # too while we still listen, and then run in turn (as Django does).
        index = 0
        while index < len(self._details):
            callback = self._details[index]
            index += 1
            call_each([callback], "on_commit", in_flight=False)


def capture_on_commit(execute: bool = False) -> _Capture:
    """Collect the callbacks that ``on_commit`` would run after a commit, instead of running them.

    ``with capture_on_commit() as callbacks:`` yields the list they are appended to (as
    Django's ``captureOnCommitCallbacks``); with ``execute=True`` they also run, in order,
    when the block ends without an exception, and so do callbacks they register in turn.
    Callbacks registered in a transaction that rolls back are not captured. Under
    ``async with`` the callbacks that return coroutines (async units' callbacks) are awaited.
    """
    if not isinstance(execute, bool):
        raise ConfigurationError(
            f"execute={option_value(execute)} is not valid; use True or False."
        )
    return _Capture(execute)


def _stop_capturing(tokens: tuple[contextvars.Token[Any], contextvars.Token[Any]] | None) -> None:
    """Stop a capture_on_commit() block from taking callbacks (its tokens, if it began)."""
    if tokens is not None:
        capturing_callbacks.reset(tokens[1])
        capturing.reset(tokens[0])
