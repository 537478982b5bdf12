"""Where each Session was created, for the leak reports of the guards and the detector.

A leaked Session is easiest to fix from where it was created, which is often not where its
transaction began (a factory or a fixture creates it, other code runs the first statement).
SessionEvents has no creation event, so while the leak guard or a leak detector wants it,
``Session.__init__`` is wrapped (a reversible patch, as ``Session.begin`` is). The wrapper
notes the user's line in a WeakKeyDictionary: nothing is kept on the Session, and nothing
keeps it alive.
"""

from __future__ import annotations

import functools
import sys
import weakref
from collections.abc import Callable
from types import FrameType
from typing import Any

from sqlalchemy.orm import Session

from ._origin import Origin, caller_origin

__all__ = ["created_at", "want"]

_created: weakref.WeakKeyDictionary[Session, Origin] = weakref.WeakKeyDictionary()
_users: set[str] = set()
_original: Callable[..., None] | None = None  # Session.__init__ while wrapped
_wrapper: Callable[..., None] | None = None


def created_at(session: Session) -> Origin | None:
    """Return where ``session`` was created, if it was created while someone wanted to know."""
    return _created.get(session)


def want(user: str, on: bool) -> None:
    """Say whether ``user`` ("guards", "detector") wants creation sites; wrap while anyone does.

    A wrapper that something else replaced by the original is put back.
    """
    global _original, _wrapper
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
        _created.clear()


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
        if frame is not None:
            try:
                _created[self] = caller_origin(frame)
            except TypeError:  # a subclass that defines __eq__ without __hash__
                pass

    return __init__
