"""Cheap capture of where something happened in the user's code, formatted only when shown.

A transaction origin is recorded on every unit of work, so it must cost next to nothing:
we keep ``(code, lineno)`` pairs of the first few frames outside txguard, SQLAlchemy and
the test runner, never frame objects (they would keep locals alive) and never a formatted
traceback (``traceback.extract_stack`` costs tens of microseconds).
"""

from __future__ import annotations

import importlib
import os
import sys
import warnings
from types import CodeType, FrameType
from typing import Any, Final

import sqlalchemy

__all__ = [
    "Origin",
    "capture",
    "code_origin",
    "is_user_frame",
    "parent_greenlet",
    "shorten_sql",
    "user_frame",
    "warn_at",
    "warn_at_user",
]


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
    os.sep + "xdist" + os.sep,  # pytest-xdist's workers, and execnet, which runs them
    os.sep + "execnet" + os.sep,
)
_library_cache: dict[str, bool] = {}
# Per file: is it the user's code? Shared by every capture (units, guards, leak detector),
# and read directly on their hot paths. Generated code ("<string>") is not cached: only
# its module globals tell SQLAlchemy's wrappers from the user's `python -c` code.
_user_files: dict[str, bool] = {}


def _runner_files() -> tuple[str, ...]:
    """Files that start programs and test runs (``python -m pytest``): not the user's code."""
    files = [os.path.join(_STDLIB, "runpy.py")]
    for name in ("pytest", "pytest_asyncio"):
        module = sys.modules.get(name)
        if module is not None and module.__file__:
            files.append(_package_dir(module.__file__))
    return tuple(files)


def _is_library(filename: str) -> bool:
    try:
        return _library_cache[filename]
    except KeyError:
        verdict = (
            filename.startswith(_LIBRARY_PREFIXES)
            or any(m in filename for m in _RUNNER_MARKERS)
            or filename.startswith("<frozen")
            or filename.startswith(_runner_files())
        )
        _library_cache[filename] = verdict
        return verdict


def _is_library_frame(frame: FrameType) -> bool:
    """Say whether ``frame`` runs library code, including code SQLAlchemy generates.

    SQLAlchemy compiles some wrappers at import time; their file is ``<string>`` (2.0) or
    ``<sqlalchemy generated ...>`` (2.1), but their module globals still name SQLAlchemy.
    """
    filename = frame.f_code.co_filename
    if _is_library(filename):
        return True
    if filename[:1] != "<":
        return False
    module = frame.f_globals.get("__name__")
    return isinstance(module, str) and module.startswith(("sqlalchemy.", "txguard."))


def is_user_frame(frame: FrameType) -> bool:
    """Say whether ``frame`` runs the user's code (cached per file in ``_user_files``)."""
    filename = frame.f_code.co_filename
    verdict = _user_files.get(filename)
    if verdict is None:
        verdict = not _is_library_frame(frame)
        if filename[:1] != "<" or filename.startswith("<sqlalchemy generated"):
            _user_files[filename] = verdict
    return verdict


_greenlet: Any = None  # the module, once found; False when it cannot be imported


def parent_greenlet(glet: Any = None) -> Any:
    """Return the greenlet that spawned ``glet`` (the running one by default), or None.

    We keep our own reference to the module: a test runner may drop it from
    ``sys.modules`` (pytester does) while SQLAlchemy still runs greenlets from it.
    """
    global _greenlet
    if glet is None:
        if _greenlet is None:
            try:
                _greenlet = importlib.import_module("greenlet")
            except ImportError:  # pragma: no cover - SQLAlchemy's asyncio needs greenlet
                _greenlet = False
        if not _greenlet:
            return None
        glet = _greenlet.getcurrent()
    return glet.parent


def user_frame(depth: int = 1) -> FrameType | None:
    """Return the innermost frame outside txguard and SQLAlchemy, above ``depth`` callers.

    SQLAlchemy's asyncio bridge runs sync code in a child greenlet whose frame chain ends
    at the spawn point; the user's coroutine is then in the parent greenlet's frames.
    """
    try:
        frame: FrameType | None = sys._getframe(depth + 1)
    except ValueError:  # called from a shallower stack than depth (e.g. module level)
        frame = None
    return _user_frame_from(frame)


def _user_frame_from(frame: FrameType | None) -> FrameType | None:
    glet = None
    while True:
        while frame is not None:
            if is_user_frame(frame):
                return frame
            frame = frame.f_back
        glet = parent_greenlet(glet)
        if glet is None:
            return None
        frame = glet.gr_frame


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


class _CallerOrigin(Origin):
    """An Origin of one frame, kept as its code and instruction offset.

    Looking up a line number decodes the code's line table, the largest part of a
    capture's cost; most origins are never shown, so the lookup waits until one is.
    """

    __slots__ = ("code", "offset")

    code: CodeType
    offset: int

    @property
    def frames(self) -> tuple[tuple[CodeType, int], ...]:  # type: ignore[override]
        return ((self.code, line_of(self.code, self.offset)),)


def line_of(code: CodeType, offset: int) -> int:
    """Return the line of the instruction at byte ``offset`` of ``code`` (``f_lasti``)."""
    for start, end, line in code.co_lines():
        if start <= offset < end:
            return code.co_firstlineno if line is None else line
    return code.co_firstlineno


_UNKNOWN: Final = Origin(())
_new_origin = object.__new__


def code_origin(code: CodeType, offset: int) -> Origin:
    """Return the Origin of the instruction at ``offset`` of ``code``, its line looked up
    only if it is shown."""
    origin = _new_origin(_CallerOrigin)
    origin.code = code
    origin.offset = offset
    return origin


def caller_origin(frame: FrameType) -> Origin:
    """Return the Origin of ``frame`` if it runs the user's code, else of the nearest above."""
    code = frame.f_code
    if _user_files.get(code.co_filename):
        origin = _new_origin(_CallerOrigin)
        origin.code = code
        origin.offset = frame.f_lasti
        return origin
    user = _user_frame_from(frame)
    if user is None:
        return _UNKNOWN
    return Origin(((user.f_code, user.f_lineno),))


def capture(depth: int = 1, limit: int = 1) -> Origin:
    """Record up to ``limit`` user frames, starting ``depth`` callers above this call."""
    if limit == 1:
        try:
            return caller_origin(sys._getframe(depth + 1))
        except ValueError:  # called from a shallower stack than depth (e.g. module level)
            return _UNKNOWN
    frame = user_frame(depth + 1)
    if frame is None:
        return _UNKNOWN
    frames: list[tuple[CodeType, int]] = []
    current: FrameType | None = frame
    while current is not None and len(frames) < limit:
        if is_user_frame(current):
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


def warn_at(
    origin: Origin, message: str, category: type[Warning], registry: dict[Any, Any]
) -> None:
    """Emit ``message`` as if raised at ``origin``: for findings made away from the user's
    code (the garbage collector, a background thread), where the origin is the useful line.
    """
    if not origin.frames:
        warnings.warn(message, category, stacklevel=2)
        return
    warnings.warn_explicit(message, category, origin.filename, origin.lineno, registry=registry)


def shorten_sql(statement: str, limit: int = 80) -> str:
    """Collapse whitespace and cut SQL text; it never contains bound parameter values."""
    text = " ".join(statement.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"
