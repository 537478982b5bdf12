"""Cheap capture of where something happened in the user's code, formatted only when shown.

A transaction origin is recorded on every unit of work, so it must cost next to nothing:
we keep ``(code, lineno)`` pairs of the first few frames outside txguard, SQLAlchemy and
the test runner, never frame objects (they would keep locals alive) and never a formatted
traceback (``traceback.extract_stack`` costs tens of microseconds).
"""

from __future__ import annotations

import os
import sys
import warnings
from types import CodeType, FrameType
from typing import Final

import sqlalchemy

__all__ = ["Origin", "capture", "user_frame", "warn_at_user", "shorten_sql"]


def _package_dir(module_file: str | None) -> str:
    return os.path.dirname(os.path.abspath(module_file or "")) + os.sep


_STDLIB = os.path.dirname(os.__file__)
_LIBRARY_PREFIXES: Final[tuple[str, ...]] = (
    _package_dir(__file__),
    _package_dir(sqlalchemy.__file__),
    os.path.join(_STDLIB, "asyncio") + os.sep,
    os.path.join(_STDLIB, "concurrent") + os.sep,
    os.path.join(_STDLIB, "contextlib.py"),
    os.path.join(_STDLIB, "threading.py"),
    os.path.join(_STDLIB, "weakref.py"),
)
_RUNNER_MARKERS: Final[tuple[str, ...]] = (
    os.sep + "_pytest" + os.sep,
    os.sep + "pluggy" + os.sep,
    os.sep + "greenlet" + os.sep,
)
_library_cache: dict[str, bool] = {}


def _is_library(filename: str) -> bool:
    try:
        return _library_cache[filename]
    except KeyError:
        verdict = filename.startswith(_LIBRARY_PREFIXES) or any(
            m in filename for m in _RUNNER_MARKERS
        ) or filename.startswith("<frozen")
        _library_cache[filename] = verdict
        return verdict


def _outer_greenlet_frame() -> FrameType | None:
    """Return the frame that spawned the current greenlet, if we run inside one.

    SQLAlchemy's asyncio bridge runs sync code in a child greenlet whose frame chain ends
    at the spawn point; the user's coroutine is in the parent greenlet's frames.
    """
    greenlet = sys.modules.get("greenlet")
    if greenlet is None:
        return None
    parent = greenlet.getcurrent().parent
    return None if parent is None else parent.gr_frame


def user_frame(depth: int = 1) -> FrameType | None:
    """Return the innermost frame outside txguard and SQLAlchemy, above ``depth`` callers."""
    frame: FrameType | None = sys._getframe(depth + 1)
    hops = 0
    while True:
        while frame is not None:
            if not _is_library(frame.f_code.co_filename):
                return frame
            frame = frame.f_back
        hops += 1
        if hops > 4:
            return None
        frame = _outer_greenlet_frame() if hops == 1 else None
        if frame is None:
            return None


class Origin:
    """Where something began: the user's innermost frame first, then a few of its callers."""

    __slots__ = ("frames",)

    def __init__(self, frames: tuple[tuple[CodeType, int], ...]) -> None:
        self.frames = frames

    @classmethod
    def of_code(cls, code: CodeType) -> Origin:
        """Name a function by its definition (used for ``@transactional`` functions)."""
        return cls(((code, code.co_firstlineno),))

    @property
    def filename(self) -> str:
        return self.frames[0][0].co_filename if self.frames else "<unknown>"

    @property
    def lineno(self) -> int:
        return self.frames[0][1] if self.frames else 0

    @property
    def function(self) -> str:
        return self.frames[0][0].co_name if self.frames else "<unknown>"

    def __str__(self) -> str:
        if not self.frames:
            return "<unknown location>"
        return f"{_short_path(self.filename)}:{self.lineno} in {self.function}()"

    def __repr__(self) -> str:
        return f"<Origin {self}>"

    def format_stack(self) -> str:
        """Return the recorded frames, outermost last, one per line."""
        return "\n".join(
            f"  {_short_path(code.co_filename)}:{lineno} in {code.co_name}()"
            for code, lineno in self.frames
        )


_UNKNOWN: Final = Origin(())


def capture(depth: int = 1, limit: int = 1) -> Origin:
    """Record up to ``limit`` user frames, starting ``depth`` callers above this call."""
    frame = user_frame(depth + 1)
    if frame is None:
        return _UNKNOWN
    if limit == 1:
        return Origin(((frame.f_code, frame.f_lineno),))
    frames: list[tuple[CodeType, int]] = []
    current: FrameType | None = frame
    while current is not None and len(frames) < limit:
        if not _is_library(current.f_code.co_filename):
            frames.append((current.f_code, current.f_lineno))
        current = current.f_back
    return Origin(tuple(frames))


def _short_path(filename: str) -> str:
    try:
        relative = os.path.relpath(filename)
    except ValueError:
        return filename
    return filename if relative.startswith(".." + os.sep + "..") else relative


def warn_at_user(message: str, category: type[Warning]) -> None:
    """Emit ``message`` as if raised at the user's line, never at txguard's."""
    frame = user_frame(1)
    if frame is None:
        warnings.warn(message, category, stacklevel=2)
        return
    module_globals = frame.f_globals
    warnings.warn_explicit(
        message,
        category,
        frame.f_code.co_filename,
        frame.f_lineno,
        module=module_globals.get("__name__", "<unknown>"),
        registry=module_globals.setdefault("__warningregistry__", {}),
        module_globals=module_globals,
    )


def shorten_sql(statement: str, limit: int = 80) -> str:
    """Collapse whitespace and cut SQL text; it never contains bound parameter values."""
    text = " ".join(statement.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"
