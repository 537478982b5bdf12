"""``txguard.SessionRegistry``: a registry with the verbs that open units on it.

The registry's state (its bind, session factories and stack of units) is
``_registry.Registry``, low in the layers, where units read it. The methods here open
units, decorate functions and register callbacks, so they live above the modules that
do that, and ``configure()`` builds this class.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, ParamSpec, TypeVar, overload

from sqlalchemy.orm import Session

from ._connect import ConnectionUnit, connect
from ._errors import TransactionRequiredError
from ._hooks import on_commit, on_rollback
from ._options import UNIT_OPTION_NAMES, cached_options, check_names
from ._registry import Registry, resolve, set_default
from ._transactional import transactional
from ._unit import Unit, UnitOfWork, current_unit, unit_for

if TYPE_CHECKING:
    from sqlalchemy.ext.asyncio import AsyncSession

    from ._registry import Bind

__all__ = ["SessionRegistry", "configure", "current_session", "in_transaction"]

P = ParamSpec("P")
R = TypeVar("R")


class SessionRegistry(Registry):
    """Hand out sessions for units of work and remember, per context, which unit is current.

    Each registry keeps its stack of active units in its own ``ContextVar``: a new thread
    starts with none, and an asyncio task sees the units of the task that created it.
    The module-level functions (``txguard.unit_of_work`` …) are these methods on the
    default registry, or on the one passed as ``registry=``.
    """

    def unit_of_work(self, **options: Any) -> UnitOfWork:
        """Open a unit of work on this registry (see ``txguard.unit_of_work``)."""
        if not options:
            return unit_for(self.default_options)
        check_names("unit_of_work()", options, UNIT_OPTION_NAMES)
        return unit_for(cached_options(self, options))

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

    def current_session(self) -> Session | AsyncSession:
        """Return the session of the current unit of work of this registry."""
        return current_session(self)  # type: ignore[no-any-return]

    def in_transaction(self) -> bool:
        """Say whether the current unit's session has an active transaction."""
        return in_transaction(self)

    def on_commit(self, fn: Callable[[], object], *, robust: bool = False) -> None:
        """Run ``fn`` after the current transaction commits (see ``txguard.on_commit``)."""
        on_commit(fn, robust=robust, registry=self)

    def on_rollback(self, fn: Callable[[], object]) -> None:
        """Run ``fn`` after the current transaction rolls back (see ``txguard.on_rollback``)."""
        on_rollback(fn, registry=self)

    def connect(self, engine: Any = None, **options: Any) -> ConnectionUnit:
        """Open a disciplined Core connection (see ``txguard.connect``)."""
        return connect(engine, registry=self, **options)


def configure(bind: Bind, **session_options: Any) -> SessionRegistry:
    """Create the default registry that the module-level functions use, and return it."""
    registry = SessionRegistry(bind, **session_options)
    set_default(registry)
    return registry


def current_session(registry: Registry | None = None) -> Any:
    """Return the session of the current unit of work (a Session, or an AsyncSession).

    Raises TransactionRequiredError outside any unit, saying how to open one.
    """
    unit = current_unit(resolve(registry))
    if unit is None:
        raise TransactionRequiredError(
            "No unit of work is active, so there is no current session. Open one with "
            "`with txguard.unit_of_work() as session:` (or `async with` on an async "
            "registry), or decorate the calling function with @txguard.transactional."
        )
    return unit.session


def in_transaction(registry: Registry | None = None) -> bool:
    """Say whether the current unit of work's session has an active transaction."""
    unit = current_unit(resolve(registry))
    return unit is not None and unit.sync_session.in_transaction()
