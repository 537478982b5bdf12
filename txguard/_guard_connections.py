"""Guards on every Core Connection (and so on every AsyncConnection).

ConnectionEvents are not used: one listener on them makes SQLAlchemy dispatch events at
every statement of every connection, about 16 µs per unit of work (over 20 % of a
``SELECT 1`` unit on SQLite). PoolEvents cost next to nothing, so ``checkout``/``checkin``/
``detach`` follow each pooled connection's life. The record is kept in ``_records``, keyed
weakly by the pool's record of the connection (or by a detached connection itself), never
in an ``info`` dictionary the application and SQLAlchemy can see. ``Connection.begin``
has no "before" event, so the mixed-begin check wraps it (see ``_guards``); the wrapper
also notes where each transaction began.

A Session's own connection is not recorded: the Session's record speaks for it, so a
leaked Session is reported once, as a Session.
"""

from __future__ import annotations

import sys
import weakref
from collections.abc import Callable
from threading import get_ident
from time import monotonic
from types import FrameType
from typing import Any, Final

from sqlalchemy.engine import Connection, Engine, RootTransaction

from . import _guard_records as guard_records
from ._errors import LeakedConnectionWarning
from ._guard_records import OFF, Record, log_end, open_transactions, report_late, report_mixed_begin
from ._origin import Origin, caller_origin, capture, past_txguard
from ._sqla import (
    ENGINE_FILE,
    RECONNECT_CODE,
    SESSION_CONNECT_CODE,
    autobegin_statement,
    is_session_connect,
    pool_record,
)

__all__ = ["begin", "forget", "on_checkin", "on_checkout", "on_detach"]



class ConnectionRecord(Record, weakref.ref):  # type: ignore[type-arg]
    """A weak reference to a checked-out pooled connection, with its current transaction."""

    __slots__ = (
        "where", "autobegun", "sql", "thread", "began", "warned", "opened", "raw", "returned",
        "tx", "gen",
    )

    owner = "Connection"

    opened: Origin | None
    raw: bool  # checked out of the pool directly (engine.raw_connection(), pool.connect())
    returned: bool
    tx: weakref.ref[RootTransaction] | None
    gen: int

    def is_open(self) -> bool:
        ref = self.tx
        transaction = None if ref is None else ref()
        return transaction is not None and transaction.is_active


# The record of each checked-out connection, by the pool's record of it (a detached
# connection has none: by the connection itself).
_records: weakref.WeakKeyDictionary[Any, ConnectionRecord] = weakref.WeakKeyDictionary()


def _key(fairy: Any) -> Any:
    record = pool_record(fairy)
    return fairy if record is None else record


def forget() -> None:
    """Drop every record (uninstall()): what they describe is no longer followed."""
    _records.clear()
    _tx_records.clear()


def _new_record(fairy: Any, opened: Origin | None, raw: bool = False) -> ConnectionRecord:
    record = ConnectionRecord(fairy, _connection_gone)
    record.opened = opened
    record.raw = raw
    record.returned = False
    record.tx = None
    record.gen = guard_records.leak_generation
    record.where = record.sql = None
    record.autobegun = False
    record.thread = record.warned = 0
    record.began = 0.0
    return record


def _connection_gone(record: ConnectionRecord) -> None:
    """Report a connection garbage-collected while still checked out of its pool."""
    if record.returned:
        return
    record.returned = True
    if open_transactions.pop(id(record), None) is not None:
        log_end(record)
    cfg = guard_records.settings
    opened = record.opened
    if opened is None or cfg is None or cfg.leaks == OFF or record.gen != guard_records.leak_generation:
        return  # not followed from its checkout: whether it was returned is unknown
    if record.raw:
        what = (
            f"A raw DBAPI connection checked out of the pool at {opened} "
            "(engine.raw_connection() or pool.connect())"
        )
        fix = (
            "Give every raw connection back with its close() method, in a `finally:` "
            "block: `raw = engine.raw_connection()`, then `try: ... finally: raw.close()`."
        )
    else:
        what = f"A Connection opened at {opened}"
        fix = (
            "Close every Connection: `with engine.connect() as conn:` (or `with "
            "engine.begin() as conn:`), or conn.close() in a `finally:` block."
        )
    last = f" Its last transaction was {record.describe()}." if record.origin is not None else ""
    report_late(
        cfg.leaks,
        LeakedConnectionWarning,
        f"{what} was garbage-collected while still checked out of the pool; SQLAlchemy "
        f"reset it (rolling back any open transaction) and took it back.{last} {fix}",
        opened,
    )


# Pool listeners (registered on the Pool class by install() when leaks are guarded).


def on_checkout(dbapi_connection: Any, connection_record: Any, connection_proxy: Any) -> None:
    """Record where a connection was checked out, unless a Session is checking it out.

    A checkout with no Connection around it (``engine.raw_connection()``, ``pool.connect()``)
    is a raw one: its user gives it back with ``close()``, and the report says so.
    """
    # Engine.connect() sits at the same depth above us at every checkout (the stack between
    # is SQLAlchemy's own), and sys._getframe(depth) makes a frame object for that one frame
    # only; so look there first, check it, and search again if SQLAlchemy took another path.
    global _connect_depth
    depth = _connect_depth
    if depth:
        try:
            caller: FrameType | None = sys._getframe(depth + 1)  # whoever called connect()
        except ValueError:
            caller = None
        if caller is not None and caller.f_code is SESSION_CONNECT_CODE:
            return  # a Session's connection: the Session's record speaks for it
    connect: FrameType | None = None
    frame: FrameType | None = sys._getframe(1)
    depth = 1
    raw = True
    while frame is not None and depth < 40:
        code = frame.f_code
        if code is _CONNECT_CODE:
            connect, _connect_depth = frame, depth
            raw = False
            break
        if code is _RECONNECT_CODE:  # an invalidated Connection reconnecting
            raw = False
        frame = frame.f_back
        depth += 1
    caller = sys._getframe(1) if connect is None else connect.f_back
    if caller is None:
        opened = capture(1)
    elif is_session_connect(caller.f_code):
        return
    else:
        opened = caller_origin(caller)
    _records[connection_record] = _new_record(connection_proxy, opened, raw)


# How many frames above on_checkout Engine.connect() ran last time (0: not known yet).
_connect_depth = 0
_CONNECT_CODE: Final = Engine.connect.__code__
_RECONNECT_CODE: Final = RECONNECT_CODE


def on_checkin(dbapi_connection: Any, connection_record: Any) -> None:
    record = _records.pop(connection_record, None)
    if record is None:
        return
    if record() is None:
        _connection_gone(record)  # the pool cleans up after the garbage collector
    else:
        record.returned = True


def on_detach(dbapi_connection: Any, connection_record: Any) -> None:
    record = _records.pop(connection_record, None)
    if record is not None:
        record.returned = True


# Connection.begin, wrapped: SQLAlchemy has no event before a begin.

original_begin: Callable[[Connection], RootTransaction] = Connection.begin  # set by install()


def begin(self: Connection) -> RootTransaction:
    """Begin as SQLAlchemy does; first say where the transaction already active began."""
    cfg = guard_records.settings
    if cfg is None:
        return original_begin(self)
    current = self._transaction
    if current is not None:
        if cfg.mixed_begin != OFF:
            _mixed_begin(self, current, cfg.mixed_begin)
        return original_begin(self)
    transaction = original_begin(self)
    caller = past_txguard(sys._getframe().f_back)  # None when begin() runs first in a greenlet
    if caller is not None:
        code = caller.f_code
        if is_session_connect(code):
            return transaction  # a Session's connection: the Session's record speaks for it
    _note_begin(self, transaction, caller, cfg.long_transaction is not None)
    return transaction


def _note_begin(
    conn: Connection, transaction: RootTransaction, caller: FrameType | None, long: bool
) -> None:
    fairy = conn.connection
    key = _key(fairy)
    record = _records.get(key)
    if record is None or record() is not fairy:
        record = _new_record(fairy, None)  # checked out before install(), or leaks are off
        _records[key] = record
    # Connection._autobegin() calls begin() when a statement runs with no transaction.
    autobegun = (
        caller is not None
        and caller.f_code.co_name == "_autobegin"
        and caller.f_code.co_filename == ENGINE_FILE
    )
    record.where = capture(1)
    record.autobegun = autobegun
    record.sql = autobegin_statement(caller.f_back) if caller is not None and autobegun else None
    record.thread = get_ident()
    record.warned = 0
    previous = record.tx
    if previous is not None:
        _tx_records.pop(id(previous), None)
    if long:
        ref = weakref.ref(transaction, _transaction_gone)
        _tx_records[id(ref)] = record
        record.tx = ref
        record.began = monotonic()
        open_transactions[id(record)] = lambda: record
    else:
        record.tx = weakref.ref(transaction)


# For long_transaction: the record of each watched transaction, by id of its weakref.
_tx_records: dict[int, ConnectionRecord] = {}


def _transaction_gone(ref: weakref.ref[RootTransaction]) -> None:
    record = _tx_records.pop(id(ref), None)
    if (
        record is not None
        and record.tx is ref
        and open_transactions.pop(id(record), None) is not None
    ):
        log_end(record)


def _mixed_begin(conn: Connection, current: RootTransaction, level: str) -> None:
    record = _records.get(_key(conn.connection))
    if record is not None and record.tx is not None and record.tx() is current:
        described = record.describe()
        autobegun = record.autobegun
    else:
        described = _session_owning(conn) or Record.unknown
        autobegun = False
    report_mixed_begin(
        level, "conn", "Connection", described, autobegun,
        "a Connection begins a transaction by itself when it first executes: commit as you go",
    )


def _session_owning(conn: Connection) -> str | None:
    """Describe the Session whose transaction holds ``conn`` (e.g. session.connection())."""
    from ._guard_sessions import session_holding

    record = session_holding(conn)
    if record is None:
        return None
    return (
        "the transaction of the Session that owns it (session.connection()), "
        f"{record.describe()}; end it through the Session"
    )
