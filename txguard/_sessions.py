"""Build the session factories of a registry: one per kind of unit, each built once.

Sessions of units are instances of a private subclass of the user's session class. Its
``commit``, ``rollback``, ``begin``, ``close``, ``reset`` and ``connection`` ask the unit
that owns the session (a single attribute, set for the unit's lifetime) whether the call
is allowed; with no unit they are the user's methods. Units that need SQLAlchemy events
(commit-as-you-go units track uncommitted writes, read-only units refuse writes) get their
own subclass with the listeners on it, so plain units never pay for an event dispatch.
"""

from __future__ import annotations

import functools
import inspect
import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Final, NamedTuple, NoReturn

from sqlalchemy import Engine, event
from sqlalchemy.engine import Connection
from sqlalchemy.orm import ORMExecuteState, Session, SessionTransaction, sessionmaker
from sqlalchemy.sql.elements import TextClause

from ._describe import describe
from ._errors import ConfigurationError, DisciplineError, ReadOnlyTransactionError
from ._origin import Origin, capture, shorten_sql
from ._sqla import beginning_refused
from ._statements import is_write_execution, is_write_statement

if TYPE_CHECKING:
    from ._unit import Unit

__all__ = [
    "describe_bind", "check_session_options", "build_factory", "first_change", "refuse_autocommit",
    "seal",
]

# Where each commit-as-you-go session made its first change since its last commit; kept
# here, not in ``session.info``, which belongs to the application.
_first_changes: weakref.WeakKeyDictionary[Session, Origin] = weakref.WeakKeyDictionary()


class Base(NamedTuple):
    is_async: bool
    async_class: Any
    sync_class: type[Session]
    kw: dict[str, Any]


def describe_bind(bind: Any, options: dict[str, Any]) -> tuple[bool, list[Engine], Base]:
    """Classify a registry's bind; return (is_async, sync engines, how to build sessions).

    A bind that runs in AUTOCOMMIT isolation is refused: no unit on it could roll back.
    """
    described = _describe(bind, options)
    kw = described[2].kw
    for candidate in (kw.get("bind"), *(kw.get("binds") or {}).values()):
        refuse_autocommit(candidate, "txguard.SessionRegistry()")
    return described


def _describe(bind: Any, options: dict[str, Any]) -> tuple[bool, list[Engine], Base]:
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
        f"Cannot build a txguard registry on {describe(bind)}; pass an Engine, a sessionmaker, "
        "an AsyncEngine or an async_sessionmaker, e.g. txguard.configure(create_engine(url))."
    )


def check_session_options(base: Base) -> None:
    """Refuse keywords the session class does not take, at once rather than at the first unit.

    The keywords are the registry's own and those of the sessionmaker it was given. A
    class whose ``__init__`` takes ``**kwargs`` passes them on: to its base class, or, for
    an AsyncSession, to its sync session class. If the last one does, anything goes.
    """
    classes = (base.async_class, base.sync_class) if base.is_async else (base.sync_class,)
    known: set[str] = set()
    for cls in classes:
        names, passes_on = _init_keywords(cls)
        known |= names
        if not passes_on:
            break
    else:
        return
    unknown = sorted(set(base.kw) - known)
    if unknown:
        raise ConfigurationError(
            f"Unknown session option(s) {', '.join(map(repr, unknown))} (given to the "
            f"SessionRegistry or its sessionmaker); {base.sync_class.__name__} takes "
            f"{', '.join(sorted(known))}."
        )


def _init_keywords(cls: type) -> tuple[set[str], bool]:
    """Return the keywords ``cls(...)`` takes by name, and whether it takes ``**kwargs``."""
    names: set[str] = set()
    for klass in cls.__mro__[:-1]:  # object's __init__ takes nothing
        init = vars(klass).get("__init__")
        if init is None:
            continue
        try:
            params = list(inspect.signature(init).parameters.values())[1:]  # after self
        except (TypeError, ValueError):  # pragma: no cover - an __init__ without a signature
            return names, True
        names.update(p.name for p in params if p.kind in _BY_NAME)
        if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
            return names, False
    return names, True


_BY_NAME: Final = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)


def refuse_autocommit(bind: Any, user: str) -> None:
    """Raise ConfigurationError if ``bind`` (an engine or connection, sync or async) autocommits.

    In AUTOCOMMIT isolation each statement commits on its own, so a unit or block that fails
    keeps the writes made before the failure. The level is an execution option (of
    ``create_engine(execution_options=...)``, ``engine.execution_options()`` or a
    connection's), else the level ``create_engine(isolation_level=...)`` gives every new
    DBAPI connection, which SQLAlchemy keeps on the dialect.
    """
    target = getattr(bind, "sync_connection", None) or getattr(bind, "sync_engine", None) or bind
    if not isinstance(target, (Engine, Connection)):
        return
    level = target.get_execution_options().get("isolation_level")
    if level is None:
        level = getattr(target.dialect, "_on_connect_isolation_level", None)
    if not _is_autocommit(level):
        return
    kind = "a connection" if isinstance(target, Connection) else "an engine"
    raise ConfigurationError(
        f"{user} was given {kind} in AUTOCOMMIT isolation: every statement would commit "
        "on its own, so nothing could be rolled back (a unit that fails would keep the writes "
        "made before the failure). "
        "Pass an engine without isolation_level='AUTOCOMMIT' (the engine before "
        ".execution_options(isolation_level='AUTOCOMMIT'), or create_engine() without "
        "it); keep an AUTOCOMMIT connection, outside txguard, for statements that cannot "
        "run in a transaction (VACUUM, CREATE DATABASE), and give a unit "
        "isolation_level='SERIALIZABLE' (or another level) where it needs one."
    )


def _is_autocommit(level: object) -> bool:
    return isinstance(level, str) and level.upper().replace("_", " ") == "AUTOCOMMIT"


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


def _guarded_methods(
    base: type[Session], read_only: bool, watch: bool
) -> dict[str, Callable[..., Any]]:
    """The methods a unit of work must see, for a private subclass of ``base``.

    ``_txguard_unit`` is the unit that owns the session, or None outside one; units set it
    on every session they open. Units call the user's class (``unit.session_class``) directly, so
    these methods run only for the user's calls. They go straight into the subclass (no
    mixin class): every lookup in the session's type that misses CPython's type cache,
    which an ORM flush does many times, walks the class's MRO, and each extra class on
    it cost measurably on an insert. ``connection()`` refuses an AUTOCOMMIT execution
    option inside a unit and, with ``watch`` (read-only and commit-as-you-go units), has
    what runs on the connection it returns classified too.
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
        if unit is None:
            base.close(self)
        else:
            unit.session_close("close")
            base.reset(self)  # the unit's session stays usable (even with close_resets_only=False)

    def reset(self: Any) -> None:
        unit = self._txguard_unit
        if unit is not None:
            unit.session_close("reset")
        base.reset(self)

    def connection(
        self: Any, bind_arguments: Any = None, execution_options: Any = None, **kw: Any
    ) -> Connection:
        unit = self._txguard_unit
        if unit is not None and execution_options:
            _refuse_autocommit_option(unit, execution_options)
        conn = base.connection(self, bind_arguments, execution_options, **kw)
        if watch and unit is not None:
            _Watcher.attach(self, conn, read_only)
        return conn

    methods: dict[str, Callable[..., Any]] = {}
    for method in (commit, rollback, begin, close, reset, connection):
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
    methods = _guarded_methods(cls, read_only, watch=commit_as_you_go or read_only)
    variant: type[Session] = type(
        cls.__name__, (cls,), {**namespace, "_txguard_unit": None, **methods}
    )
    if commit_as_you_go:
        event.listen(variant, "transient_to_pending", _note_pending)
        event.listen(variant, "after_flush", _note_flush)
        event.listen(variant, "do_orm_execute", _note_execute)
    if read_only:
        event.listen(variant, "before_flush", _refuse_flush)
        event.listen(variant, "do_orm_execute", _refuse_write)
        event.listen(variant, "after_begin", _begin_read_only)
    if commit_as_you_go or read_only:
        event.listen(variant, "after_transaction_end", _end_transaction)
    sealed = {"commit": _refuse_commit_after_unit, "__init__": _init_unsealed}
    variant._txguard_sealed = type(  # type: ignore[attr-defined]
        cls.__name__, (variant,), {**namespace, **beginning_refused(_refuse_after_unit), **sealed}
    )
    of_class[key] = weakref.ref(variant)
    return variant


def seal(session: Session, where: Origin) -> None:
    """Make ``session``, which the unit opened at ``where`` has just closed, refuse to begin
    another transaction, whatever ``close_resets_only`` says.

    ``Session.close()`` only resets a session by default: code that kept the unit's session
    (a task that outlives a request, a block's ``as`` variable used after it) would begin a
    transaction that no unit ends, unreported, holding a connection until the garbage
    collector closes it. The session's class becomes its variant's sealed twin, which
    refuses every new transaction (``_sqla.beginning_refused``) and every ``commit()``:
    sessions in use pay nothing. Sealing twice is harmless (an interrupted unit's session
    may be closed twice).
    """
    sealed = type(session)._txguard_sealed  # type: ignore[attr-defined]
    if type(session) is not sealed:
        session.__class__ = sealed
        session._txguard_closed_by = where  # type: ignore[attr-defined]  # after: a plain dict


def _refuse_after_unit(
    session: Session, action: str = "begin another transaction, which no unit would commit"
) -> NoReturn:
    where: Origin = session._txguard_closed_by  # type: ignore[attr-defined]
    raise DisciplineError(
        f"This session belonged to the unit of work opened at {where}, which has ended and "
        f"closed it: it cannot {action}. "
        "Open a new unit for work after it (`with txguard.unit_of_work() as session:`), "
        "and await tasks that use a unit's session before the unit (a request) ends."
    )


def _refuse_commit_after_unit(session: Session) -> NoReturn:
    """``commit()`` of a sealed session: refused even while the session still holds the unit's
    transaction, which SQLAlchemy refused to close because another task was inside it (the
    unit invalidates it, rolling back, once that task is out: see ``_unit._close_once_free``)."""
    _refuse_after_unit(session, "commit what was done on it after the unit ended, which is rolled back")


def _init_unsealed(self: Session, *args: Any, **kw: Any) -> None:
    """Initialise a session made from a sealed session's class (``type(session)(...)``): a
    new session, of the class of sessions in use, which works as the user's class does."""
    self.__class__ = type(self).__mro__[1]
    self.__init__(*args, **kw)  # type: ignore[misc]


class _Watcher:
    """Classify the statements the user runs on a unit's own connection (``session.connection()``).

    Statements given to the session are seen by ``do_orm_execute``; the connection it hands
    out runs them past the session, so its ``before_cursor_execute`` is listened to, from
    the user's first ``connection()`` call until the session's transaction ends. Units that
    never call it pay nothing.
    """

    __slots__ = ("session", "read_only", "connections")

    def __init__(self, session: Session, read_only: bool) -> None:
        self.session = session
        self.read_only = read_only
        self.connections: list[Connection] = []

    @staticmethod
    def attach(session: Session, conn: Connection, read_only: bool) -> None:
        watcher: _Watcher | None = session.__dict__.get(_WATCHER)
        if watcher is None:
            watcher = session.__dict__[_WATCHER] = _Watcher(session, read_only)
        if conn not in watcher.connections:
            event.listen(conn, "before_cursor_execute", watcher)
            watcher.connections.append(conn)

    def detach(self) -> None:
        connections, self.connections = self.connections, []
        for conn in connections:
            event.remove(conn, "before_cursor_execute", self)

    def __call__(
        self, conn: Connection, cursor: Any, statement: str, parameters: Any, context: Any,
        executemany: bool,
    ) -> None:
        if not is_write_execution(context, statement):
            return
        if self.read_only:
            compiled = getattr(context, "compiled", None)  # without literal_execute values
            raise _write_refused(compiled.string if compiled is not None else statement)
        _note_pending(self.session, None)


_WATCHER = "_txguard_watcher"


def _refuse_autocommit_option(unit: Unit, execution_options: Any) -> None:
    if _is_autocommit(execution_options.get("isolation_level")):
        raise DisciplineError(
            "session.connection(execution_options={'isolation_level': 'AUTOCOMMIT'}) inside "
            f"the unit opened at {unit.where}: each statement would commit on its own, and "
            "the unit could not roll them back. Run statements that need AUTOCOMMIT outside "
            "any unit, on engine.connect().execution_options(isolation_level='AUTOCOMMIT'), "
            "or give the unit an isolation_level= it can roll back."
        )


def first_change(session: Session) -> Origin | None:
    """Return where ``session`` made its first uncommitted change, if it made one."""
    return _first_changes.get(session)


def _note_pending(session: Session, instance: object) -> None:
    if session not in _first_changes:
        _first_changes[session] = capture(1)


def _note_flush(session: Session, flush_context: object) -> None:
    _note_pending(session, None)


def _note_execute(state: ORMExecuteState) -> None:
    if is_write_statement(state.statement):
        _note_pending(state.session, None)


def _end_transaction(session: Session, transaction: SessionTransaction) -> None:
    if transaction.parent is None:
        _first_changes.pop(session, None)
        watcher: _Watcher | None = session.__dict__.pop(_WATCHER, None)
        if watcher is not None:
            watcher.detach()


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
    if is_write_statement(state.statement):
        statement = state.statement
        try:
            sql = statement.text if isinstance(statement, TextClause) else str(statement)
        except Exception:  # an ORM bulk INSERT/UPDATE compiles only inside its execution
            verb = "INSERT INTO" if state.is_insert else "UPDATE" if state.is_update else "DELETE FROM"
            sql = f"{verb} {getattr(getattr(statement, 'table', None), 'name', '?')} ..."
        raise _write_refused(sql)


def _write_refused(sql: str) -> ReadOnlyTransactionError:
    return ReadOnlyTransactionError(
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
