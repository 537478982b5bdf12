"""``txguard.SessionRegistry``: a registry with the verbs that open units on it.

The registry's state (its bind, session factories and stack of units) is
``_registry.Registry``, low in the layers, where units read it. The methods here open
units, decorate functions and register callbacks, so they live above the modules that
do that, and ``configure()`` builds this class.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Generic, ParamSpec, TypeVar, overload

from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from ._connect import ConnectionUnit, connect
from ._errors import TransactionRequiredError
from ._hooks import on_commit, on_rollback
from ._options import UNIT_OPTION_NAMES, cached_options, check_names
from ._registry import Registry, resolve, set_default
from ._transactional import transactional
from ._unit import Unit, UnitOfWork, current_unit

if TYPE_CHECKING:
    from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

__all__ = ["SessionRegistry", "configure", "current_session", "in_transaction"]

P = ParamSpec("P")
R = TypeVar("R")
S = TypeVar("S", bound="Session | AsyncSession")  # what the registry's units yield
SyncS = TypeVar("SyncS", bound=Session)
AsyncS = TypeVar("AsyncS", bound="AsyncSession")


class SessionRegistry(Registry, Generic[S]):
    """Hand out sessions for units of work and remember, per context, which unit is current.

    Each registry keeps its stack of active units in its own ``ContextVar``: a new thread
    starts with none, and an asyncio task sees the units of the task that created it.
    The module-level functions (``txguard.unit_of_work`` …) are these methods on the
    default registry, or on the one passed as ``registry=``.

    It is generic in the session it hands out, inferred from the bind: an Engine gives a
    ``SessionRegistry[Session]``, an AsyncEngine a ``SessionRegistry[AsyncSession]``, a
    ``sessionmaker`` of a subclass that subclass.
    """

    @overload
    def __init__(
        self: SessionRegistry[Session], bind: Engine, **session_options: Any
    ) -> None: ...

    @overload
    def __init__(
        self: SessionRegistry[SyncS], bind: sessionmaker[SyncS], **session_options: Any
    ) -> None: ...

    @overload
    def __init__(
        self: SessionRegistry[AsyncSession], bind: AsyncEngine, **session_options: Any
    ) -> None: ...

    @overload
    def __init__(
        self: SessionRegistry[AsyncS], bind: async_sessionmaker[AsyncS], **session_options: Any
    ) -> None: ...

    def __init__(self, bind: Any, **session_options: Any) -> None:
        super().__init__(bind, **session_options)

    def unit_of_work(self, **options: Any) -> UnitOfWork:
        """Open a unit of work on this registry (see ``txguard.unit_of_work``)."""
        if not options:
            return UnitOfWork(self.default_options)
        check_names("unit_of_work()", options, UNIT_OPTION_NAMES)
        return UnitOfWork(cached_options(self, options))

    @overload
    def transactional(self, fn: Callable[P, R], /) -> Callable[P, R]: ...

    @overload
    def transactional(self, /, **options: Any) -> Callable[[Callable[P, R]], Callable[P, R]]: ...

    def transactional(self, fn: Any = None, /, **options: Any) -> Any:
        """Decorate a function to run in a unit of this registry (see ``txguard.transactional``)."""
        decorator = transactional(registry=self, **options)
        return decorator if fn is None else decorator(fn)

    def current_unit(self) -> Unit | None:
        """Return the unit this thread's code runs in, or None."""
        return current_unit(self)

    def current_session(self) -> S:
        """Return the session of the current unit of work of this registry."""
        unit = current_unit(self)
        if unit is None:
            raise _no_session()
        session: S = unit.transaction.session
        return session

    def in_transaction(self) -> bool:
        """Say whether the current unit's session has an active transaction."""
        return in_transaction(self)

    def on_commit(self, fn: Callable[[], object], *, robust: bool = False) -> None:
        """Run ``fn`` after the current transaction commits (see ``txguard.on_commit``)."""
        on_commit(fn, robust=robust, registry=self)

    def on_rollback(self, fn: Callable[[], object]) -> None:
        """Run ``fn`` after the current transaction rolls back (see ``txguard.on_rollback``)."""
        on_rollback(fn, registry=self)

    def connect(
        self, engine: Engine | AsyncEngine | None = None, **options: Any
    ) -> ConnectionUnit:
        """Open a disciplined Core connection (see ``txguard.connect``)."""
        return connect(engine, registry=self, **options)


@overload
def configure(bind: Engine, **session_options: Any) -> SessionRegistry[Session]: ...


@overload
def configure(bind: sessionmaker[SyncS], **session_options: Any) -> SessionRegistry[SyncS]: ...


@overload
def configure(bind: AsyncEngine, **session_options: Any) -> SessionRegistry[AsyncSession]: ...


@overload
def configure(
    bind: async_sessionmaker[AsyncS], **session_options: Any
) -> SessionRegistry[AsyncS]: ...


def configure(bind: Any, **session_options: Any) -> SessionRegistry[Any]:
    """Create the default registry that the module-level functions use, and return it."""
    registry: SessionRegistry[Any] = SessionRegistry(bind, **session_options)
    set_default(registry)
    return registry


@overload
def current_session(registry: SessionRegistry[S]) -> S: ...


@overload
def current_session(registry: None = None) -> Session | AsyncSession: ...


def current_session(registry: Registry | None = None) -> Any:
    """Return the session of the current unit of work (a Session, or an AsyncSession).

    Typed by the registry given; without one, the default registry's kind is only known
    at run time, hence the union (see docs/decisions.md).
    Raises TransactionRequiredError outside any unit, saying how to open one.
    """
    unit = current_unit(resolve(registry))
    if unit is None:
        raise _no_session()
    return unit.transaction.session


def _no_session() -> TransactionRequiredError:
    return TransactionRequiredError(
        "No unit of work is active, so there is no current session. Open one with "
        "`with txguard.unit_of_work() as session:` (or `async with` on an async "
        "registry), or decorate the calling function with @txguard.transactional."
    )


def in_transaction(registry: Registry | None = None) -> bool:
    """Say whether the current unit of work's session has an active transaction."""
    unit = current_unit(resolve(registry))
    return unit is not None and unit.transaction.sync_session.in_transaction()
