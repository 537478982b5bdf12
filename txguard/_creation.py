"""Where each Session was created, for the leak reports of the guards and the detector.

A leaked Session is easiest to fix from where it was created, which is often not where its
transaction began (a factory or a fixture creates it, other code runs the first statement).
SessionEvents has no creation event, so while the leak guard or a leak detector wants it,
``Session.__init__`` is wrapped (a reversible patch, as ``Session.begin`` is). The wrapper
notes the user's line in the Session's ``__dict__``, as the guards keep their record of its
transaction: it goes away with the Session and keeps nothing alive (an ``Origin`` holds
code objects only); a generation number tells the sites noted before everyone stopped
wanting them, which are then forgotten. A WeakKeyDictionary cost ~40 bytecodes and a weak
reference more per Session, and a callback when the Session goes.
"""

from __future__ import annotations

import functools
import os
import sys
from collections.abc import Callable
from types import FrameType
from typing import Any, Final

from sqlalchemy.orm import Session

from ._origin import Origin, caller_origin

__all__ = ["created_at", "want"]

KEY: Final = "_txguard_created"  # the Session attribute: (where it was created, _generation)
_generation = 0  # bumped when nobody wants creation sites any more: those noted are stale
_OWN_FILES: Final = os.path.dirname(os.path.abspath(__file__)) + os.sep
_users: set[str] = set()
_original: Callable[..., None] | None = None  # Session.__init__ while wrapped
_wrapper: Callable[..., None] | None = None


def created_at(session: Session) -> Origin | None:
    """Return where ``session`` was created, if it was created while someone wanted to know;
    for the session of a unit of work, while the unit runs, where the unit began."""
    noted: tuple[Origin, int] | None = session.__dict__.get(KEY)
    if noted is not None:
        return noted[0] if noted[1] == _generation else None
    unit = session.__dict__.get("_txguard_unit")  # a unit's session: created where it began
    where: Origin | None = None if unit is None else unit.where
    return where


def want(user: str, on: bool) -> None:
    """Say whether ``user`` ("guards", "detector") wants creation sites; wrap while anyone does.

    A wrapper that something else replaced by the original is put back.
    """
    global _original, _wrapper, _generation
    if on:
        _users.add(user)
    else:
        _users.discard(user)
    current = Session.__dict__["__init__"]
    if _users:
        if _wrapper is None:
            _original = current
            _wrapper = _wrap(current)
            setattr(Session, "__init__", _wrapper)
        elif current is _original:
            setattr(Session, "__init__", _wrapper)
    elif _wrapper is not None:
        if current is _wrapper:  # someone who wrapped it after us keeps their wrapper
            setattr(Session, "__init__", _original)
        _original = _wrapper = None
        _generation += 1


def _wrap(original: Callable[..., None]) -> Callable[..., None]:
    @functools.wraps(original)
    def __init__(self: Session, *args: Any, **kw: Any) -> None:
        original(self, *args, **kw)
        frame: FrameType | None = sys._getframe(1)
        # A subclass's __init__ calling super().__init__() is not where the Session was made.
        while frame is not None and frame.f_code.co_name == "__init__" and (
            frame.f_locals.get("self") is self
        ):
            frame = frame.f_back
        # A unit's session (created by txguard's own code) is not noted: its unit knows
        # where it began, which saves the walk up to the user's frame.
        if frame is not None and not frame.f_code.co_filename.startswith(_OWN_FILES):
            self.__dict__[KEY] = (caller_origin(frame), _generation)

    return __init__
