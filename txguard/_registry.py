"""Session registries: where units of work get their sessions, and which unit is current."""

from __future__ import annotations

import contextvars
import enum
import functools
import itertools
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, ParamSpec, TypeVar, Union, overload

from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from . import _sessions
from ._describe import describe, option_value
from ._errors import ConfigurationError, TransactionRequiredError
from ._failures import install_failure_tracking
from ._sqlite import install_sqlite_transactions

if TYPE_CHECKING:
    from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

    from ._connect import ConnectionUnit
    from ._options import UnitOptions
    from ._unit import Unit, UnitOfWork

    Bind = Union[Engine, sessionmaker[Any], AsyncEngine, async_sessionmaker[Any]]

__all__ = [
    "SessionRegistry",
    "UnitState",
    "check_registry",
    "configure",
    "current_session",
    "default_registry",
    "in_transaction",
    "resolve",
]

_ids = itertools.count(1)
_new_object = object.__new__
_get_ident = threading.get_ident
P = ParamSpec("P")
R = TypeVar("R")


class UnitState(enum.Enum):
    """Where a unit of work is in its life; only an ACTIVE unit can be current."""

    READY = "ready"  # created; its block has not begun
    ACTIVE = "active"  # its block runs in the unit
    OUTSIDE = "outside"  # its block runs without a unit (propagation="never" outside any)
    ORPHANED = "orphaned"  # rolled back because a unit around it ended first; not exited yet
    ENDED = "ended"  # its block has exited


_ACTIVE = UnitState.ACTIVE


class SessionRegistry:
    """Hand out sessions for units of work and remember, per context, which unit is current.

    Each registry keeps its stack of active units in its own ``ContextVar``; the value is
    the innermost unit, and each unit links to the one that was current when it was
    opened. A unit can end where its ``ContextVar`` token cannot be reset (another thread,
    another copy of the context), so a context may still hold an ended unit: the lookup
    skips it, and units that belong to another thread, by following those links. So a new
    thread starts with none, even one running in a copy of another thread's context, and
    an asyncio task sees the units of the task that created it.
    """

    def __init__(self, bind: Bind, **session_options: Any) -> None:
        self._var: contextvars.ContextVar[Unit | None] = contextvars.ContextVar(
            f"txguard_unit_{next(_ids)}", default=None
        )
        self._bind = bind
        self._session_options = session_options
        self.is_async, self.engines, self._base = _sessions.describe_bind(bind, session_options)
        _sessions.check_session_options(self._base)
        self.base_class = self._base.sync_class
        for engine in self.engines:
            install_sqlite_transactions(engine)
            install_failure_tracking(engine)
        self._factories: dict[tuple[bool, bool, str | None], Callable[[], Any]] = {}
        self._external_bind: Any = None
        self._unit_defaults: UnitOptions | None = None  # the options of unit_of_work()
        self._options_cache: dict[tuple[object, ...], UnitOptions] = {}  # of unit_of_work(...)

    def __repr__(self) -> str:
        kind = "async" if self.is_async else "sync"
        return f"<txguard.SessionRegistry ({kind}) bind={describe(self._bind)}>"

    @property
    def engine(self) -> Engine | None:
        """The sync Engine behind this registry, when it has exactly one."""
        return self.engines[0] if len(self.engines) == 1 else None

    def core_engine(self) -> Any:
        """Return the one Engine (or AsyncEngine) behind this registry, for ``connect()``."""
        bind = self._base.kw.get("bind")
        if self.is_async and hasattr(bind, "sync_engine") and not hasattr(bind, "sync_connection"):
            return bind
        if not self.is_async and isinstance(bind, Engine):
            return bind
        raise ConfigurationError(
            f"The registry {self!r} is not bound to exactly one engine; pass it: "
            "txguard.connect(engine)."
        )

    def session_factory(
        self, commit_as_you_go: bool, read_only: bool, isolation_level: str | None
    ) -> Callable[[], Any]:
        """Return the factory of sessions for units with these options (built once)."""
        key = (commit_as_you_go, read_only, isolation_level)
        try:
            return self._factories[key]
        except KeyError:
            factory = _sessions.build_factory(
                self._base, commit_as_you_go, read_only, isolation_level, self._external_bind
            )
            self._factories[key] = factory
            return factory

    def _bind_sessions_to(self, connection: Any) -> Callable[[], None]:
        """Make this registry's sessions join ``connection``'s transaction; return the undo."""
        previous_bind, previous_factories = self._external_bind, self._factories
        self._external_bind, self._factories = connection, {}

        def restore() -> None:
            self._external_bind, self._factories = previous_bind, previous_factories

        return restore

    # The module-level API, as methods of this registry.

    def unit_of_work(self, **options: Any) -> UnitOfWork:
        """Open a unit of work on this registry (see ``txguard.unit_of_work``)."""
        opts = (not options and self._unit_defaults) or _unit.registry_options(self, options)
        unit: UnitOfWork = _new_object(_unit.UnitOfWork)
        unit.opts = opts
        unit.state = UnitState.READY
        return unit

    @overload
    def transactional(self, fn: Callable[P, R], /) -> Callable[P, R]: ...

    @overload
    def transactional(self, /, **options: Any) -> Callable[[Callable[P, R]], Callable[P, R]]: ...

    def transactional(self, fn: Any = None, /, **options: Any) -> Any:
        """Decorate a function to run in a unit of this registry (see ``txguard.transactional``)."""
        decorator = _api().transactional(registry=self, **options)
        return decorator if fn is None else decorator(fn)

    def current_unit(self) -> Unit | None:
        """Return the unit this thread's code runs in, or None (see ``live``)."""
        unit = self._var.get()
        return None if unit is None else live(unit)

    def current_session(self) -> Session | AsyncSession:
        """Return the session of the current unit of work of this registry."""
        unit = self.current_unit()
        if unit is None:
            raise TransactionRequiredError(
                "No unit of work is active, so there is no current session. Open one with "
                "`with txguard.unit_of_work() as session:` (or `async with` on an async "
                "registry), or decorate the calling function with @txguard.transactional."
            )
        return unit.session  # type: ignore[no-any-return]

    def in_transaction(self) -> bool:
        """Say whether the current unit's session has an active transaction."""
        unit = self.current_unit()
        return unit is not None and unit.sync.in_transaction()

    def on_commit(self, fn: Callable[[], object], *, robust: bool = False) -> None:
        """Run ``fn`` after the current transaction commits (see ``txguard.on_commit``)."""
        _api().on_commit(fn, robust=robust, registry=self)

    def on_rollback(self, fn: Callable[[], object]) -> None:
        """Run ``fn`` after the current transaction rolls back (see ``txguard.on_rollback``)."""
        _api().on_rollback(fn, registry=self)

    def connect(self, engine: Any = None, **options: Any) -> ConnectionUnit:
        """Open a disciplined Core connection (see ``txguard.connect``)."""
        unit: ConnectionUnit = _api().connect(engine, registry=self, **options)
        return unit


def live(unit: Unit) -> Unit | None:
    """Return the innermost unit of the stack that ``unit`` tops which this thread may use.

    Follows each unit's link to the unit that was current when it was opened, past ended
    units and units of other threads (see ``usable``); None when there is none.
    """
    ident = _get_ident()
    current: Unit | None = unit
    while current is not None and not usable(current, ident):
        current = current.previous
    return current


def usable(unit: Unit, ident: int) -> bool:
    """Say whether code in thread ``ident`` may use ``unit``: the thread owns it (see
    ``_unit.adopt``), and it and every unit whose transaction it runs in are active.

    The owner thread is the one that opened the unit: a thread that inherits a copy of
    another thread's context must not share that thread's Session.
    """
    if unit.thread != ident:
        return False
    scope: Unit | None = unit
    while scope is not None:
        if scope.state is not _ACTIVE:
            return False
        scope = scope.owner or scope.parent
    return True


@functools.cache
def _api() -> Any:
    """Return the package, with the modules behind the registry's methods loaded.

    They import this module, so they cannot be imported at its top; caching the lookup
    keeps the registry's methods as cheap as the module-level functions.
    """
    import txguard

    for name in ("unit_of_work", "transactional", "on_commit", "on_rollback", "connect"):
        getattr(txguard, name)
    return txguard


_default: SessionRegistry | None = None


def configure(bind: Bind, **session_options: Any) -> SessionRegistry:
    """Create the default registry that the module-level functions use, and return it."""
    global _default
    _default = SessionRegistry(bind, **session_options)
    return _default


def default_registry() -> SessionRegistry:
    """Return the default registry, or explain how to configure one."""
    if _default is None:
        raise ConfigurationError(
            "txguard has no default registry yet: call txguard.configure(engine) once at "
            "startup (an Engine, AsyncEngine, sessionmaker or async_sessionmaker), or pass "
            "registry=txguard.SessionRegistry(engine) to this call."
        )
    return _default


def resolve(registry: SessionRegistry | None) -> SessionRegistry:
    """Return ``registry``, or the default one when it is None."""
    if registry is not None:
        if isinstance(registry, SessionRegistry):
            return registry
        raise _not_a_registry(registry)
    if _default is None:
        return default_registry()
    return _default


def check_registry(registry: object) -> SessionRegistry | None:
    """Return ``registry`` if it is a SessionRegistry or None; refuse anything else."""
    if registry is None or isinstance(registry, SessionRegistry):
        return registry
    raise _not_a_registry(registry)


def _not_a_registry(value: object) -> ConfigurationError:
    # A wrong registry= would otherwise fail deep inside txguard, as an AttributeError.
    return ConfigurationError(
        f"registry={option_value(value)} is not valid; pass a txguard.SessionRegistry, or "
        "None for the default registry set by txguard.configure()."
    )


def _reset_default_for_tests() -> None:
    global _default
    _default = None


def current_session(registry: SessionRegistry | None = None) -> Any:
    """Return the session of the current unit of work (a Session, or an AsyncSession).

    Raises TransactionRequiredError outside any unit, saying how to open one.
    """
    return resolve(registry).current_session()


def in_transaction(registry: SessionRegistry | None = None) -> bool:
    """Say whether the current unit of work's session has an active transaction."""
    return resolve(registry).in_transaction()


# The module of units of work imports this one, so it is bound last (its import may be
# the one under way, which is fine: the registry's methods look it up when called).
from . import _unit  # noqa: E402
