"""Build the session factories of a registry: one per kind of unit, each built once.

Sessions of units are instances of a private subclass of the user's session class. Its
``commit``, ``rollback``, ``begin`` and ``close`` ask the unit that owns the session (a
single attribute, set for the unit's lifetime) whether the call is allowed; with no unit
they are the user's methods. Units that need SQLAlchemy events (commit-as-you-go units
track uncommitted writes, read-only units refuse writes) get their own subclass with the
listeners on it, so plain units never pay for an event dispatch.
"""

from __future__ import annotations

import functools
import inspect
import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, NamedTuple

from sqlalchemy import Engine, event
from sqlalchemy.engine import Connection
from sqlalchemy.orm import ORMExecuteState, Session, SessionTransaction, sessionmaker
from sqlalchemy.sql.elements import TextClause

from ._errors import ConfigurationError, ReadOnlyTransactionError
from ._origin import capture, shorten_sql

if TYPE_CHECKING:
    from ._unit import Unit

__all__ = ["describe_bind", "build_factory", "FIRST_CHANGE", "is_write_sql"]

FIRST_CHANGE = "txguard.first_uncommitted_change"
_WRITE_KEYWORDS = frozenset(
    {"INSERT", "UPDATE", "DELETE", "MERGE", "REPLACE", "UPSERT", "CREATE", "DROP", "ALTER", "TRUNCATE"}
)


class Base(NamedTuple):
    is_async: bool
    async_class: Any
    sync_class: type[Session]
    kw: dict[str, Any]


def describe_bind(bind: Any, options: dict[str, Any]) -> tuple[bool, list[Engine], Base]:
    """Classify a registry's bind; return (is_async, sync engines, how to build sessions)."""
    if isinstance(bind, Engine):
        return False, [bind], Base(False, None, Session, {"bind": bind, **options})
    if isinstance(bind, sessionmaker):
        kw = {**bind.kw, **options}
        return False, _engines_of(kw), Base(False, None, bind.class_, kw)
    try:
        from sqlalchemy.ext.asyncio import AsyncEngine, async_sessionmaker
    except ImportError:  # pragma: no cover - the asyncio extension ships with SQLAlchemy
        AsyncEngine = async_sessionmaker = ()  # type: ignore[assignment,misc]
    if isinstance(bind, AsyncEngine):
        from sqlalchemy.ext.asyncio import AsyncSession

        kw = {"bind": bind, **options}
        return True, [bind.sync_engine], Base(True, AsyncSession, Session, kw)
    if isinstance(bind, async_sessionmaker):
        kw = {**bind.kw, **options}
        sync_class = kw.pop("sync_session_class", None) or bind.class_.sync_session_class
        return True, _engines_of(kw), Base(True, bind.class_, sync_class, kw)
    raise ConfigurationError(
        f"Cannot build a txguard registry on {bind!r}; pass an Engine, a sessionmaker, an "
        "AsyncEngine or an async_sessionmaker, e.g. txguard.configure(create_engine(url))."
    )


def _engines_of(kw: dict[str, Any]) -> list[Engine]:
    candidates = [kw.get("bind"), *(kw.get("binds") or {}).values()]
    engines: list[Engine] = []
    for candidate in candidates:
        engine = getattr(candidate, "sync_engine", candidate)
        if isinstance(engine, Connection):
            engine = engine.engine
        if isinstance(engine, Engine) and engine not in engines:
            engines.append(engine)
    return engines


def _guarded_methods(base: type[Session]) -> dict[str, Callable[..., Any]]:
    """The methods a unit of work must see, for a private subclass of ``base``.

    ``_txguard_unit`` is the unit that owns the session, or None outside one; units set it
    on every session they open. Units call the user's class (``unit.base``) directly, so
    these methods run only for the user's calls. They go straight into the subclass (no
    mixin class): every lookup in the session's type that misses CPython's type cache,
    which an ORM flush does many times, walks the class's MRO, and each extra class on
    it cost measurably on an insert.
    """

    def commit(self: Any) -> None:
        unit = self._txguard_unit
        if unit is None:
            base.commit(self)
        else:
            unit.session_commit()

    def rollback(self: Any) -> None:
        unit = self._txguard_unit
        if unit is None:
            base.rollback(self)
        else:
            unit.session_rollback()

    def begin(self: Any, nested: bool = False) -> SessionTransaction:
        unit = self._txguard_unit
        if unit is not None and not nested:  # begin_nested() is begin(nested=True): allowed
            unit.session_begin()
        return base.begin(self, nested)

    def close(self: Any) -> None:
        unit = self._txguard_unit
        if unit is not None:
            unit.session_close()
        base.close(self)

    methods: dict[str, Callable[..., Any]] = {}
    for method in (commit, rollback, begin, close):
        method.__qualname__ = f"{base.__qualname__}.{method.__name__}"
        method.__doc__ = getattr(base, method.__name__).__doc__
        methods[method.__name__] = method
    return methods


def build_factory(
    base: Base,
    commit_as_you_go: bool,
    read_only: bool,
    isolation_level: str | None,
    external_bind: Any,
) -> Callable[[], Any]:
    """Return a session factory for units with these options.

    A ``functools.partial`` of the class rather than a ``sessionmaker``: the keywords are
    merged once here instead of at every call, and those equal to the class's own
    defaults are left out (keyword parsing is a measurable part of a session's cost).
    """
    kw = dict(base.kw)
    if external_bind is not None:
        kw.pop("binds", None)
        kw["bind"] = external_bind
        kw["join_transaction_mode"] = "create_savepoint"
    elif isolation_level is not None:
        bind = kw.get("bind")
        if bind is None:
            raise ConfigurationError(
                "isolation_level= needs a registry bound to one engine; this registry's "
                "sessionmaker has no bind=. Build the registry on the engine instead."
            )
        kw["bind"] = bind.execution_options(isolation_level=isolation_level)
    sync_class = _variant(base.sync_class, commit_as_you_go, read_only)
    if base.is_async:
        kw["sync_session_class"] = sync_class
        return _partial(base.async_class, kw)
    return _partial(sync_class, kw)


def _partial(cls: Callable[..., Any], kw: dict[str, Any]) -> Callable[[], Any]:
    try:
        params = inspect.signature(cls).parameters
    except (TypeError, ValueError):  # pragma: no cover - a class without a signature
        return functools.partial(cls, **kw)
    kw = {
        name: value
        for name, value in kw.items()
        if name not in params or params[name].default is not value
    }
    first = next(iter(params.values()), None)
    if list(kw) == ["bind"] and first is not None and first.name == "bind" and (
        first.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD
    ):
        return functools.partial(cls, kw["bind"])
    return functools.partial(cls, **kw)


_variants: weakref.WeakKeyDictionary[
    type[Session], dict[tuple[bool, bool], weakref.ref[type[Session]]]
] = weakref.WeakKeyDictionary()


def _variant(cls: type[Session], commit_as_you_go: bool, read_only: bool) -> type[Session]:
    """Return the private subclass of ``cls`` for these options, shared while it is in use.

    Held weakly on both sides (a variant refers to ``cls``, so a strong value would keep
    the key alive): session classes made at run time, one per ``sessionmaker``, are
    collected with the registries that use them.
    """
    key = (commit_as_you_go, read_only)
    of_class = _variants.get(cls)
    if of_class is None:
        of_class = _variants[cls] = {}
    ref = of_class.get(key)
    existing = ref() if ref is not None else None
    if existing is not None:
        return existing
    namespace = {"__module__": cls.__module__, "__qualname__": cls.__qualname__}
    variant: type[Session] = type(cls.__name__, (cls,), {**namespace, **_guarded_methods(cls)})
    if commit_as_you_go:
        event.listen(variant, "transient_to_pending", _note_pending)
        event.listen(variant, "after_flush", _note_flush)
        event.listen(variant, "do_orm_execute", _note_execute)
        event.listen(variant, "after_transaction_end", _forget_changes)
    if read_only:
        event.listen(variant, "before_flush", _refuse_flush)
        event.listen(variant, "do_orm_execute", _refuse_write)
        event.listen(variant, "after_begin", _begin_read_only)
    of_class[key] = weakref.ref(variant)
    return variant


def is_write_sql(sql: str) -> bool:
    """Say whether SQL text starts with a data- or schema-changing keyword."""
    head = sql.lstrip().split(None, 1)
    return bool(head) and head[0].upper() in _WRITE_KEYWORDS


def _is_write(state: ORMExecuteState) -> bool:
    if state.is_insert or state.is_update or state.is_delete:
        return True
    statement = state.statement
    return isinstance(statement, TextClause) and is_write_sql(statement.text)


def _note_pending(session: Session, instance: object) -> None:
    info = session.info
    if FIRST_CHANGE not in info:
        info[FIRST_CHANGE] = capture(1)


def _note_flush(session: Session, flush_context: object) -> None:
    _note_pending(session, None)


def _note_execute(state: ORMExecuteState) -> None:
    if _is_write(state):
        _note_pending(state.session, None)


def _forget_changes(session: Session, transaction: SessionTransaction) -> None:
    if transaction.parent is None:
        session.info.pop(FIRST_CHANGE, None)


def _refuse_flush(session: Session, flush_context: object, instances: object) -> None:
    changes = [
        f"{len(objs)} {what}"
        for what, objs in (
            ("new", session.new),
            ("modified", [o for o in session.dirty if session.is_modified(o)]),
            ("deleted", session.deleted),
        )
        if objs
    ]
    if changes:
        raise ReadOnlyTransactionError(
            f"A read-only unit of work tried to flush changes ({', '.join(changes)} "
            "objects). Open the unit with read_only=False, or expunge the objects you "
            "did not mean to write."
        )


def _refuse_write(state: ORMExecuteState) -> None:
    if _is_write(state):
        statement = state.statement
        try:
            sql = statement.text if isinstance(statement, TextClause) else str(statement)
        except Exception:  # an ORM bulk INSERT/UPDATE compiles only inside its execution
            verb = "INSERT INTO" if state.is_insert else "UPDATE" if state.is_update else "DELETE FROM"
            sql = f"{verb} {getattr(getattr(statement, 'table', None), 'name', '?')} ..."
        raise ReadOnlyTransactionError(
            f"A read-only unit of work tried to execute a write: {shorten_sql(sql)!r}. "
            "Open the unit with read_only=False, or run the write in its own unit "
            "(propagation='requires_new')."
        )


def _begin_read_only(
    session: Session, transaction: SessionTransaction, connection: Connection
) -> None:
    if transaction.nested or isinstance(session.bind, Connection):
        return
    dialect = connection.dialect.name
    if dialect == "postgresql":
        connection.exec_driver_sql("SET TRANSACTION READ ONLY")
    elif dialect in ("mysql", "mariadb"):
        connection.exec_driver_sql("START TRANSACTION READ ONLY")
