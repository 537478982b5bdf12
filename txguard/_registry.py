"""The state of a session registry: its bind, its session factories, its stack of units.

This is the registry as the layers below the public API see it: units of work read their
registry's ``ContextVar`` and session factories here. ``_session_registry.SessionRegistry``
(a subclass, far up the layers) adds the verbs that open units (``unit_of_work()``,
``transactional``, ``connect()``, ``on_commit()``), so this module imports no unit.
"""

from __future__ import annotations

import contextvars
import itertools
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Union

from sqlalchemy import Engine
from sqlalchemy.orm import sessionmaker

from . import _sessions
from ._describe import describe, option_value
from ._errors import ConfigurationError
from ._failures import install_failure_tracking
from ._options import UnitOptions, unit_options
from ._sqlite import install_sqlite_transactions

if TYPE_CHECKING:
    from sqlalchemy.ext.asyncio import AsyncEngine, async_sessionmaker

    from ._unit import Unit

    Bind = Union[Engine, sessionmaker[Any], AsyncEngine, async_sessionmaker[Any]]

__all__ = [
    "Registry", "check_registry", "default_registry", "registry_or_default", "resolve", "set_default",
]

_ids = itertools.count(1)


class Registry:
    """Build sessions for units of work and hold, per context, the innermost unit.

    Each registry keeps its stack of active units in its own ``ContextVar``; the value is
    the innermost unit, and each unit links to the one that was current when it was
    opened (``_unit.current_unit`` walks those links). The public ``txguard.SessionRegistry``
    is this class with the verbs that open units.
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
        self.options_cache: dict[tuple[object, ...], UnitOptions] = {}  # see cached_options
        self.default_options = unit_options(registry=self)  # of unit_of_work() with none given

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


_default: Registry | None = None  # set by txguard.configure()


def set_default(registry: Registry | None) -> None:
    """Make ``registry`` the one that calls without ``registry=`` use (see ``configure``)."""
    global _default
    _default = registry


def default_registry() -> Registry:
    """Return the default registry, or explain how to configure one."""
    if _default is None:
        raise ConfigurationError(
            "txguard has no default registry yet: call txguard.configure(engine) once at "
            "startup (an Engine, AsyncEngine, sessionmaker or async_sessionmaker), or pass "
            "registry=txguard.SessionRegistry(engine) to this call."
        )
    return _default


def resolve(registry: Registry | None) -> Registry:
    """Return ``registry``, or the default one when it is None."""
    if registry is not None:
        if isinstance(registry, Registry):
            return registry
        raise _not_a_registry(registry)
    if _default is None:
        return default_registry()
    return _default


def registry_or_default(registry: Registry | None) -> Registry | None:
    """Return ``registry``, or the default one when it is None (None when none is set)."""
    return _default if registry is None else registry


def check_registry(registry: object) -> Registry | None:
    """Return ``registry`` if it is a SessionRegistry or None; refuse anything else."""
    if registry is None or isinstance(registry, Registry):
        return registry
    raise _not_a_registry(registry)


def _not_a_registry(value: object) -> ConfigurationError:
    # A wrong registry= would otherwise fail deep inside txguard, as an AttributeError.
    return ConfigurationError(
        f"registry={option_value(value)} is not valid; pass a txguard.SessionRegistry, or "
        "None for the default registry set by txguard.configure()."
    )


def _reset_default_for_tests() -> None:
    set_default(None)
