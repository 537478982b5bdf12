"""The options every unit of work and ``@transactional`` share, validated once, up front."""

from __future__ import annotations

import enum
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Final, TypeVar

from ._describe import option_value
from ._errors import ConfigurationError

if TYPE_CHECKING:
    from ._registry import Registry

__all__ = [
    "DECORATOR_OPTION_NAMES", "DEFAULT_OPTIONS", "Mode", "Propagation", "UNIT_OPTION_NAMES",
    "UnitOptions", "cached_options", "check_names", "choice", "unit_options",
]


class Mode(str, enum.Enum):
    """How a unit's session runs its transaction (SQLAlchemy 2.x's two styles)."""

    BEGIN_ONCE = "begin_once"
    COMMIT_AS_YOU_GO = "commit_as_you_go"

    __module__ = "txguard"


class Propagation(str, enum.Enum):
    """What a unit does when another unit is already active (as in Spring)."""

    REQUIRED = "required"
    REQUIRES_NEW = "requires_new"
    NESTED = "nested"
    MANDATORY = "mandatory"
    NEVER = "never"
    SUPPORTS = "supports"
    NOT_SUPPORTED = "not_supported"

    __module__ = "txguard"


_E = TypeVar("_E", bound=enum.Enum)

_NEVER_OWNS_A_TRANSACTION: Final = frozenset(
    {Propagation.MANDATORY, Propagation.NEVER, Propagation.SUPPORTS, Propagation.NOT_SUPPORTED}
)
_JOIN_AN_ACTIVE_UNIT: Final = frozenset(
    {Propagation.REQUIRED, Propagation.MANDATORY, Propagation.SUPPORTS}
)
UNIT_OPTION_NAMES: Final = (
    "mode", "propagation", "read_only", "isolation_level", "rollback_for", "no_rollback_for",
    "durable",
)
"""The options of ``registry.unit_of_work(...)``; ``txguard.unit_of_work`` adds ``registry``."""
RETRY_OPTION_NAMES: Final = ("retries", "retry_on", "backoff")
DECORATOR_OPTION_NAMES: Final = (*UNIT_OPTION_NAMES, "registry", *RETRY_OPTION_NAMES)
"""The options of ``@transactional(...)``."""

ISOLATION_LEVELS: Final = ("READ UNCOMMITTED", "READ COMMITTED", "REPEATABLE READ", "SERIALIZABLE")


def choice(name: str, value: object, enum_type: type[_E]) -> _E:
    """Accept an enum member or its lower-case value; refuse anything else by name."""
    if isinstance(value, enum_type):
        return value
    if isinstance(value, str):
        try:
            return enum_type(value)
        except ValueError:
            pass
    allowed = ", ".join(repr(m.value) for m in enum_type)
    raise ConfigurationError(
        f"{name}={option_value(value, names=True)} is not valid; use one of {allowed} "
        f"(or txguard.{enum_type.__name__}.<NAME>)."
    )


def _flag(name: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise ConfigurationError(
            f"{name}={option_value(value)} is not valid; use True or False."
        )
    return value


def exception_types(name: str, value: object) -> tuple[type[BaseException], ...]:
    """Accept one exception class or a tuple/list of them."""
    items = tuple(value) if isinstance(value, (tuple, list)) else (value,)
    for item in items:
        if not (isinstance(item, type) and issubclass(item, BaseException)):
            raise ConfigurationError(
                f"{name}={option_value(value)} is not valid; use an exception class or a "
                f"tuple of exception classes, e.g. {name}=(ValueError, KeyError)."
            )
    return items


def _isolation(value: object) -> str | None:
    if value is None:
        return None
    if isinstance(value, str):
        normalised = " ".join(value.replace("_", " ").upper().split())
        if normalised in ISOLATION_LEVELS:
            return normalised
        if normalised == "AUTOCOMMIT":
            raise ConfigurationError(
                "isolation_level='AUTOCOMMIT' has no transaction to discipline; use None or "
                f"one of {', '.join(repr(level) for level in ISOLATION_LEVELS)}, or "
                "engine.execution_options(isolation_level='AUTOCOMMIT') outside txguard."
            )
    allowed = ", ".join(repr(level) for level in ISOLATION_LEVELS)
    raise ConfigurationError(
        f"isolation_level={option_value(value, names=True)} is not valid; use None or one of "
        f"{allowed}."
    )


def _retries(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ConfigurationError(
            f"retries={option_value(value)} is not valid; use a whole number >= 0 (0 turns "
            "retries off)."
        )
    return value


def _retry_on(value: object) -> Callable[[BaseException], bool] | None:
    if value is None:
        return None
    if isinstance(value, type) or isinstance(value, (tuple, list)):
        types = exception_types("retry_on", value)
        return lambda exc: isinstance(exc, types)
    if callable(value):
        return value
    raise ConfigurationError(
        f"retry_on={option_value(value)} is not valid; use an exception class, a tuple of "
        "them, or a predicate taking the exception and returning True to retry."
    )


MAX_BACKOFF: Final = 86400.0
"""A day: a longer base delay is surely a mistake, and a much longer one (``1e308``) makes
``time.sleep`` fail at the first retry."""


def _backoff(value: object) -> Callable[[int], float] | float:
    if callable(value):
        return value
    if (
        not isinstance(value, bool)
        and isinstance(value, (int, float))
        and 0 <= value <= MAX_BACKOFF  # refuses NaN and infinities too
    ):
        return float(value)
    raise ConfigurationError(
        f"backoff={option_value(value)} is not valid; use the base delay in seconds (a number "
        f">= 0, at most {MAX_BACKOFF:.0f}: a day) or a function taking the attempt number "
        "(1, 2, ...) and returning seconds to sleep."
    )


class UnitOptions:
    """The validated options of one unit of work (immutable, shared by every call)."""

    __slots__ = (
        "mode",
        "propagation",
        "read_only",
        "isolation_level",
        "rollback_for",
        "no_rollback_for",
        "durable",
        "registry",
        "retries",
        "retry_on",
        "backoff",
        "plain_rollback_rules",
        "enter_needs_io",
        "joins_without_frame",
        "session_key",
    )

    mode: Mode
    propagation: Propagation
    read_only: bool
    isolation_level: str | None
    rollback_for: tuple[type[BaseException], ...]
    no_rollback_for: tuple[type[BaseException], ...]
    durable: bool
    registry: Registry | None
    retries: int
    retry_on: Callable[[BaseException], bool] | None
    backoff: Callable[[int], float] | float
    plain_rollback_rules: bool
    enter_needs_io: bool
    joins_without_frame: bool  # inside a unit in a transaction, its call needs no frame (_unit.joinable)
    session_key: tuple[bool, bool, str | None]  # which of the registry's factories it uses

    def rolls_back(self, exc: BaseException) -> bool:
        """Say whether ``exc`` leaving the unit rolls it back (the nearest rule wins)."""
        if self.plain_rollback_rules or not isinstance(exc, Exception):
            return True
        rollback, keep = self.rollback_for, self.no_rollback_for
        for cls in type(exc).__mro__:
            if cls in keep:
                return False
            if cls in rollback:
                return True
        if isinstance(exc, keep):
            return False
        return isinstance(exc, rollback)


def unit_options(
    *,
    mode: object = Mode.BEGIN_ONCE,
    propagation: object = Propagation.REQUIRED,
    read_only: object = False,
    isolation_level: object = None,
    rollback_for: object = (Exception,),
    no_rollback_for: object = (),
    durable: object = False,
    registry: object = None,
    retries: object = 0,
    retry_on: object = None,
    backoff: object = 0.05,
) -> UnitOptions:
    """Validate every option and return them frozen; raise ConfigurationError naming the fix.

    ``registry`` must already be a registry or None (``_registry.check_registry``): this
    layer lies below the registries.
    """
    opts = UnitOptions()
    opts.mode = choice("mode", mode, Mode)
    opts.propagation = choice("propagation", propagation, Propagation)
    opts.read_only = _flag("read_only", read_only)
    opts.isolation_level = _isolation(isolation_level)
    opts.rollback_for = exception_types("rollback_for", rollback_for)
    opts.no_rollback_for = exception_types("no_rollback_for", no_rollback_for)
    opts.durable = _flag("durable", durable)
    opts.registry = registry  # type: ignore[assignment]  # checked by the caller
    opts.retries = _retries(retries)
    opts.retry_on = _retry_on(retry_on)
    opts.backoff = _backoff(backoff)
    if opts.mode is Mode.COMMIT_AS_YOU_GO and opts.propagation is Propagation.NESTED:
        raise ConfigurationError(
            "mode='commit_as_you_go' cannot be combined with propagation='nested': a "
            "savepoint is released or rolled back by its unit; use mode='begin_once'."
        )
    if opts.retries and (
        opts.mode is Mode.COMMIT_AS_YOU_GO or opts.propagation in _NEVER_OWNS_A_TRANSACTION
    ):
        raise ConfigurationError(
            f"retries={opts.retries} would never apply: a unit with mode={opts.mode.value!r} and "
            f"propagation={opts.propagation.value!r} never owns a begin-once transaction it "
            "could run again. Put retries= on the outermost @transactional function (begin "
            "once, propagation 'required', 'requires_new' or 'nested')."
        )
    opts.plain_rollback_rules = opts.rollback_for == (Exception,) and not opts.no_rollback_for
    opts.session_key = (opts.mode is Mode.COMMIT_AS_YOU_GO, opts.read_only, opts.isolation_level)
    opts.enter_needs_io = bool(
        opts.propagation is Propagation.NESTED or opts.read_only or opts.isolation_level
    )
    opts.joins_without_frame = (
        opts.propagation in _JOIN_AN_ACTIVE_UNIT
        and not opts.durable
        and opts.isolation_level is None
        and not opts.retries
    )
    return opts


DEFAULT_OPTIONS: Final = unit_options()
"""The options of ``unit_of_work()`` with none given, on the default registry."""


def check_names(what: str, given: Mapping[str, object], allowed: tuple[str, ...]) -> None:
    """Refuse an option name ``what`` does not take, listing the ones it does."""
    unknown = sorted(set(given) - set(allowed))
    if unknown:
        hint = "" if "retries" in allowed else " (retries= belongs on @transactional)"
        raise ConfigurationError(
            f"{what} got unknown option(s) {', '.join(map(repr, unknown))}; the "
            f"options are {', '.join(allowed)}{hint}."
        )


def cached_options(registry: Registry | None, given: Mapping[str, object]) -> UnitOptions:
    """Return the validated options of a unit of ``registry``, built once per set of values.

    ``registry`` is a checked registry or None (the default one). Its options are cached on
    the registry (``options_cache``), so that the cache never keeps a registry, with its
    engine and pool, alive; the default registry's are cached here. Unhashable values
    (a list of exception classes) are validated on every call.
    """
    cache = _default_registry_options if registry is None else registry.options_cache
    # The flags' types are part of the key: 0 == False and 1 == True, but only bools are valid.
    try:
        key = tuple((name, value, type(value)) for name, value in sorted(given.items()))
        return cache[key]
    except (KeyError, TypeError):
        pass
    opts = unit_options(registry=registry, **given)
    if len(cache) < _OPTIONS_CACHE_SIZE:
        try:
            cache[key] = opts
        except TypeError:  # an unhashable option value, e.g. a list of exceptions
            pass
    return opts


_OPTIONS_CACHE_SIZE: Final = 256
_default_registry_options: dict[tuple[object, ...], UnitOptions] = {}


def validate_guard_level(name: str, value: object, allowed: tuple[str, ...]) -> str:
    """Check a guard's level ("off", "warn", "error") and name the allowed values."""
    if isinstance(value, str) and value in allowed:
        return value
    raise ConfigurationError(
        f"{name}={option_value(value, names=True)} is not valid; use one of "
        + ", ".join(repr(a) for a in allowed) + "."
    )


