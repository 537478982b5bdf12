"""Leak detector: which Sessions and pooled connections were opened and never closed.

One process-wide tracker listens to SQLAlchemy's class-level events while at least one
detector runs: ``after_transaction_create`` on ``Session`` (every sync session, including
the one inside each ``AsyncSession``) and ``checkout``/``checkin``/``detach`` on ``Pool``
(every pooled connection, whoever asks for it). It holds sessions and connections through
weak references only, numbers every opening, and records where it happened. Whether
something is still open is decided when a detector is asked, so a detector reports the
openings of its own window and nothing that was closed meanwhile.

A pooled connection is open while its connection object is alive and still checked out
(it has a pool record); that is read from the object when a detector is asked, not from
the order of events, since a ``StaticPool`` hands one pool record to every checkout at
once. A pooled connection whose owner was garbage-collected without being closed is
returned to the pool by SQLAlchemy's finalizer; the tracker sees that check-in arrive for
a connection object that no longer exists and keeps it as a *collected* leak, so a report
does not depend on when the garbage collector happened to run.
"""

from __future__ import annotations

import itertools
import sys
import threading
import time
import weakref
from types import CodeType, FrameType
from typing import TYPE_CHECKING, Any, Final, Literal, Tuple

from sqlalchemy import event
from sqlalchemy.orm import Session, SessionTransaction
from sqlalchemy.pool import Pool

from ._creation import created_at
from ._creation import want as want_creation
from ._errors import LeakError
from ._options import _flag
from ._origin import UNKNOWN, Origin, _short_path, _user_files, first_user_frame, is_user_frame
from ._sqla import async_session_of, held_connections, pool_connection, pool_record

if TYPE_CHECKING:
    from types import TracebackType

__all__ = ["Leak", "LeakDetector", "format_leaks", "leak_report", "tracker"]

SESSION: Final = "session"
CONNECTION: Final = "connection"
STACK_LIMIT: Final = 6
_PRUNE_AT: Final = 1024


class Leak:
    """A Session or pooled connection opened while a detector ran and not closed since.

    ``kind`` is ``"session"`` or ``"connection"``; ``origin`` is where it was opened (the
    user's file:line first, then a few callers: ``origin.format_stack()``); ``age_s`` is
    how long ago, in seconds, when the report was made. ``created`` is where a Session was
    created, when that is known and is not its ``origin``. ``collected`` is true for a
    connection that was never closed but was garbage-collected (SQLAlchemy's finalizer
    returned it to the pool). ``resource`` is the Session or pool connection while it is
    alive; the record holds it weakly.
    """

    __slots__ = (
        "kind",
        "origin",
        "age_s",
        "description",
        "collected",
        "holds_connection",
        "created",
        "_ref",
        "_seq",
    )

    def __init__(
        self,
        kind: Literal["session", "connection"],
        origin: Origin,
        age_s: float,
        description: str,
        *,
        collected: bool = False,
        holds_connection: bool = False,
        resource: object | None = None,
        seq: int = 0,
        created: Origin | None = None,
    ) -> None:
        self.kind = kind
        self.origin = origin
        self.age_s = age_s
        self.description = description
        self.collected = collected
        self.holds_connection = holds_connection
        self.created = created
        self._ref = None if resource is None else weakref.ref(resource)
        self._seq = seq

    @property
    def resource(self) -> object | None:
        """The leaked Session or pool connection, or None once it is gone."""
        return None if self._ref is None else self._ref()

    @property
    def location(self) -> str:
        """Where it was opened, as ``file:line``."""
        return f"{_short_path(self.origin.filename)}:{self.origin.lineno}"

    def summary(self) -> str:
        """Say in one line what is open, where it was opened and how long ago."""
        age = f"{self.age_s:.2f} s ago"
        if self.collected:
            return (
                f"{self.description} checked out at {self.origin} ({age}) was never "
                "closed: it was garbage-collected while still checked out"
            )
        if self.kind == SESSION:
            state = (
                "still in a transaction that holds a connection"
                if self.holds_connection
                else "still in a transaction (it holds no connection yet)"
            )
            return f"{self.description} opened at {self.origin} ({age}), {state}"
        return (
            f"{self.description} checked out at {self.origin} ({age}), never returned "
            "to the pool"
        )

    def __str__(self) -> str:
        lines = [self.summary()]
        if self.created is not None:
            lines.append(f"  (the Session was created at {self.created})")
        if len(self.origin.frames) > 1:
            lines.append(self.origin.format_stack())
        return "\n".join(lines)

    def __repr__(self) -> str:
        state = "collected" if self.collected else "open"
        return f"<txguard.Leak {self.kind} {state} at {self.location}>"


# What the tracker keeps of one opening: a weak reference to the Session (or the pool's
# connection object), where (an Origin: its line numbers are decoded only when reported),
# when, and its number. Session entries
# have no weak-reference callback: dead ones are pruned in batches, cheaper than a call
# each.
_SessionSeen = Tuple["weakref.ref[Session]", Origin, float, int]
_ConnectionSeen = Tuple["weakref.ref[Any]", Origin, float, int]


def _unused(ref: object) -> None:
    """Give a weak reference a callback: Python clears those before finalizers run."""


class _Tracker:
    """The process-wide listeners, shared by every running detector."""

    def __init__(self) -> None:
        self.numbers = itertools.count(1)
        self.sessions: dict[int, _SessionSeen] = {}
        # Per pool record, the checkouts made of it that may still be open (several at
        # once on a StaticPool).
        self.connections: weakref.WeakKeyDictionary[Any, list[_ConnectionSeen]] = (
            weakref.WeakKeyDictionary()
        )
        self.collected: list[_ConnectionSeen] = []
        self.running: list[LeakDetector] = []
        self.limit = 1
        self.prune_at = _PRUNE_AT
        self.lock = threading.Lock()

    def mark(self) -> int:
        """Return a number that orders this moment among the recorded openings."""
        return next(self.numbers)

    def acquire(self, detector: LeakDetector) -> int:
        """Start listening for ``detector``; return the start of its window."""
        with self.lock:
            self.listen()
            want_creation("detector", True)
            self.running.append(detector)
            self._set_limit()
            return self.mark()

    def release(self, detector: LeakDetector) -> tuple[int, list[_ConnectionSeen]]:
        """Stop listening for ``detector``; return its window's end and its collected leaks."""
        with self.lock:
            stop = self.mark()
            mine = self.collected_between(detector._start, stop)
            self.running.remove(detector)
            if not self.running:
                for target, name, fn in _listeners():
                    if event.contains(target, name, fn):
                        event.remove(target, name, fn)
                want_creation("detector", False)
            self._set_limit()
            oldest = min((d._start for d in self.running), default=stop)
            self.collected = [c for c in self.collected if c[3] >= oldest]
            self.prune()
            return stop, mine

    def listen(self) -> None:
        """Attach each listener that is not attached, also one something else removed
        (SQLAlchemy's own test fixtures clear every class-level listener)."""
        for target, name, fn in _listeners():
            if not event.contains(target, name, fn):
                event.listen(target, name, fn)

    def _set_limit(self) -> None:
        self.limit = STACK_LIMIT if any(d.capture_stack for d in self.running) else 1

    def prune(self) -> None:
        """Forget the sessions and pool connections that no longer exist."""
        sessions = self.sessions
        for key, seen in sessions.copy().items():
            if seen[0]() is None and sessions.get(key) is seen:
                sessions.pop(key, None)
        for record, checkouts in list(self.connections.items()):
            checkouts[:] = [c for c in checkouts if _checked_out(c[0]())]
            if not checkouts:
                self.connections.pop(record, None)
        self.prune_at = max(_PRUNE_AT, 2 * len(self.sessions))

    def collected_between(self, start: int, stop: int) -> list[_ConnectionSeen]:
        return [c for c in self.collected.copy() if start <= c[3] < stop]

    def leaks(
        self, start: int, stop: int, collected: list[_ConnectionSeen], depth: int
    ) -> list[Leak]:
        """Return what was opened in ``[start, stop)`` and is still open, and ``collected``.

        Each origin keeps at most ``depth`` frames (another detector may record more).
        """
        now = time.monotonic()
        found: list[Leak] = []
        held: set[int] = set()
        # dict.copy() runs without calling back into Python, so no finalizer can change
        # the mapping under it.
        for ref, origin, opened, seq in self.sessions.copy().values():
            session = ref()
            if session is None or not session.in_transaction():
                continue
            fairies = _connections_of(session)
            held.update(id(f) for f in fairies)
            if start <= seq < stop:
                began = _origin(origin, depth)
                created = created_at(session)
                if created is not None and created.same_line_as(began):
                    created = None  # created where its transaction began: said once
                found.append(
                    Leak(
                        SESSION, began, now - opened, _describe_session(session),
                        holds_connection=bool(fairies), resource=session, seq=seq,
                        created=created,
                    )
                )
        checkouts = [c for cs in list(self.connections.values()) for c in list(cs)]
        for fairy_ref, origin, opened, seq in checkouts:
            fairy = fairy_ref()
            if not start <= seq < stop or id(fairy) in held or not _checked_out(fairy):
                continue
            found.append(
                Leak(
                    CONNECTION, _origin(origin, depth), now - opened, _describe_connection(fairy),
                    resource=fairy, seq=seq,
                )
            )
        for _, origin, opened, seq in collected:
            found.append(
                Leak(
                    CONNECTION, _origin(origin, depth), now - opened, "a pooled connection",
                    collected=True, seq=seq,
                )
            )
        found.sort(key=lambda leak: leak._seq)
        return found


tracker: Final = _Tracker()

_SCAN_ABOVE: Final = 32
_session_hints: list[int] = []
_checkout_hints: list[int] = []


def _where(limit: int, hints: list[int]) -> Origin:
    """Capture the user's frames above an event handler: ``capture()``, made cheap here.

    An event fires a dozen SQLAlchemy frames below the user's code, and walking them costs
    most of a capture (each frame object is created on first access). So each handler
    keeps the depths at which it last found the user's frame; a hint is taken when the
    frame there is user code and the one below it is library code, which needs only those
    two frames. Otherwise we walk, looking each file up in one cache, and remember the
    depth. Frames are kept as code and instruction offset: the line number is computed
    only if a leak is reported. Above the user's first frame we look at a bounded number
    of frames (a test runner's are many, all library).
    """
    users = _user_files
    frame: FrameType | None = None
    for depth in hints:
        try:
            below = sys._getframe(depth - 1)
        except ValueError:
            continue
        above = below.f_back
        if (
            above is not None
            and users.get(above.f_code.co_filename)
            and users.get(below.f_code.co_filename) is False
        ):
            frame = above
            break
    if frame is None:
        frame = _walk_to_user(hints)
        if frame is None:
            return UNKNOWN
    if limit == 1:
        return Origin(frame.f_code, frame.f_lasti)
    callers: list[tuple[CodeType, int]] = []
    caller = frame.f_back
    budget = _SCAN_ABOVE
    while caller is not None and len(callers) < limit - 1 and budget:
        user = users.get(caller.f_code.co_filename)
        if user or (user is None and is_user_frame(caller)):
            callers.append((caller.f_code, caller.f_lasti))
        caller = caller.f_back
        budget -= 1
    return Origin(frame.f_code, frame.f_lasti, tuple(callers))


def _walk_to_user(hints: list[int]) -> FrameType | None:
    """Return the innermost user frame above ``_where``'s caller; note its depth in hints."""
    start = sys._getframe(3)
    found = first_user_frame(start)
    frame: FrameType | None = start
    depth = 2  # as seen from _where
    while frame is not None and frame is not found:
        frame = frame.f_back
        depth += 1
    if frame is not None:  # on this stack, not in a parent greenlet: note its depth
        hints[:] = [depth, *(hint for hint in hints if hint != depth)][:3]
    return found


def _origin(where: Origin, depth: int) -> Origin:
    """Return what ``_where()`` recorded, with at most ``depth`` frames."""
    if len(where.callers) < depth:
        return where
    return Origin(where.code, where.offset, where.callers[: depth - 1])


def _on_transaction(session: Session, transaction: SessionTransaction) -> None:
    if transaction.parent is None:
        t = tracker
        sessions = t.sessions
        sessions[id(session)] = (
            weakref.ref(session), _where(t.limit, _session_hints), time.monotonic(), next(t.numbers)
        )
        if len(sessions) > t.prune_at:
            t.prune()


def _checked_out(fairy: Any) -> bool:
    """Say whether a pool connection object is alive and still checked out of its pool."""
    return (
        fairy is not None
        and pool_record(fairy) is not None
        and fairy.dbapi_connection is not None
    )


def _on_checkout(dbapi_connection: Any, record: Any, fairy: Any) -> None:
    t = tracker
    seen = (
        weakref.ref(fairy, _unused), _where(t.limit, _checkout_hints), time.monotonic(), next(t.numbers)
    )
    checkouts = t.connections.get(record)
    if checkouts is None:
        t.connections[record] = [seen]
    else:
        # What was returned before this checkout is done with (a StaticPool keeps the rest).
        checkouts[:] = [c for c in checkouts if _checked_out(c[0]())]
        checkouts.append(seen)


def _on_returned(dbapi_connection: Any, record: Any) -> None:
    """Keep as collected each checkout of ``record`` whose object the garbage collector took.

    The checkout being returned is still alive here, and so are the other checkouts of a
    StaticPool's record: they stay, and whether they are open is read when asked.
    """
    checkouts = tracker.connections.get(record)
    if not checkouts:
        return
    alive = []
    for seen in checkouts:
        if seen[0]() is None:
            tracker.collected.append(seen)
        else:
            alive.append(seen)
    checkouts[:] = alive


def _listeners() -> tuple[tuple[type, str, Any], ...]:
    return (
        (Session, "after_transaction_create", _on_transaction),
        (Pool, "checkout", _on_checkout),
        (Pool, "checkin", _on_returned),
        (Pool, "detach", _on_returned),
    )


def _connections_of(session: Session) -> list[Any]:
    """Return the pool connections that the session's transaction holds."""
    transaction = session.get_transaction()
    if transaction is None:
        return []
    fairies: list[Any] = []
    for connection, _ in held_connections(transaction):
        fairy = pool_connection(connection)
        if fairy is not None and fairy not in fairies:
            fairies.append(fairy)
    return fairies


def _describe_session(session: Session) -> str:
    proxy = async_session_of(session)
    if proxy is not None:
        return f"an {type(proxy).__name__}"
    name = type(session).__name__
    return f"an {name}" if name[:1] in "AEIOU" else f"a {name}"


def _describe_connection(fairy: Any) -> str:
    dialect = getattr(getattr(getattr(fairy, "_pool", None), "_dialect", None), "name", None)
    return f"a pooled {dialect} connection" if dialect else "a pooled connection"


class LeakDetector:
    """Track every Session, AsyncSession and pooled connection opened while it runs.

    Use it as a context manager or with ``start()``/``stop()``; then ``open_resources()``
    lists what is still open and ``check()`` raises ``LeakError`` if anything is. A Session
    counts as open while it holds a transaction (and so, usually, a connection); one that
    was closed, or never used, is not a leak. Tracking holds every object weakly.
    ``capture_stack=False`` records only the opening line, not a few callers.
    """

    def __init__(self, capture_stack: bool = True) -> None:
        self.capture_stack = _flag("capture_stack", capture_stack)  # "no" would be true
        self._start = 0
        self._stop: int | None = None
        self._collected: list[_ConnectionSeen] = []
        self._running = False

    def __repr__(self) -> str:
        return f"<txguard.LeakDetector {'running' if self._running else 'stopped'}>"

    @property
    def running(self) -> bool:
        """Whether the detector is tracking now."""
        return self._running

    def start(self) -> LeakDetector:
        """Begin tracking (again, forgetting an earlier window); do nothing if running."""
        if not self._running:
            self._stop = None
            self._collected = []
            self._start = tracker.acquire(self)
            self._running = True
        return self

    def stop(self) -> None:
        """Stop tracking; what was opened meanwhile is still reported while it stays open."""
        if self._running:
            self._running = False
            self._stop, self._collected = tracker.release(self)

    def __enter__(self) -> LeakDetector:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def leaks(self) -> list[Leak]:
        """Return what is still open or was garbage-collected unclosed, in the order opened."""
        return self._leaks_since(None)

    def _mark(self) -> int:
        """Return a position in the detector's window, for ``_leaks_since()``."""
        return tracker.mark()

    def _listen(self) -> None:
        """While running, attach again the listeners that something else removed."""
        if self._running:
            with tracker.lock:
                tracker.listen()

    def _leaks_since(self, since: int | None) -> list[Leak]:
        """Return the leaks of the window, or of its part after ``since`` (from ``_mark()``)."""
        if self._running:
            stop = tracker.mark()
            collected = tracker.collected_between(self._start, stop)
        elif self._stop is not None:
            stop, collected = self._stop, self._collected
        else:
            return []
        start = self._start if since is None else max(self._start, since)
        depth = STACK_LIMIT if self.capture_stack else 1
        return tracker.leaks(start, stop, [c for c in collected if c[3] >= start], depth)

    def open_resources(self) -> list[Leak]:
        """Return the sessions and pooled connections opened while running and still open."""
        return [leak for leak in self.leaks() if not leak.collected]

    def check(self) -> None:
        """Raise ``LeakError`` (its ``.leaks`` lists them) if anything was left open."""
        __tracebackhide__ = True
        found = self.leaks()
        if found:
            raise LeakError(format_leaks(found, "while the leak detector ran"), list(found))


def format_leaks(leaks: list[Leak], during: str) -> str:
    """Describe leaks for a report: what, where, and how to fix it."""
    count = len(leaks)
    what = "session or connection was" if count == 1 else "sessions or connections were"
    return leak_report(
        f"{count} {what} opened {during} and never closed:",
        leaks,
        "Close each one where it is opened: `with Session(engine) as session:` (or "
        "txguard.unit_of_work()), `with engine.connect() as conn:`, or close() in a "
        "`finally:` block.",
    )


def leak_report(heading: str, leaks: list[Leak], advice: str) -> str:
    """Lay out a report of leaks: the heading, each leak as an indented item, the advice."""
    lines = [heading]
    for leak in leaks:
        first, *rest = str(leak).splitlines()
        lines.append(f"  - {first}")
        lines.extend(f"    {line.strip()}" for line in rest)
    lines.append(advice)
    return "\n".join(lines)
