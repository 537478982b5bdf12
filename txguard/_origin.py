"""Cheap capture of where something happened in the user's code, formatted only when shown.

A transaction origin is recorded on every unit of work, so it must cost next to nothing:
an ``Origin`` keeps the code object and instruction offset of the first few frames outside
txguard, SQLAlchemy and the test runner, and decodes their line numbers only when shown;
never frame objects (they would keep locals alive) and never a formatted traceback
(``traceback.extract_stack`` costs tens of microseconds). Units, guards and the leak
detector all record this one kind of origin.
"""

from __future__ import annotations

import importlib
import inspect
import os
import sys
import warnings
from types import CodeType, FrameType
from typing import Any, Callable, Final

import sqlalchemy

__all__ = [
    "UNKNOWN",
    "DeferredOrigin",
    "Origin",
    "caller_origin",
    "failure_site",
    "line_of",
    "capture",
    "code_origin",
    "definition_of",
    "describe_location",
    "first_user_frame",
    "is_user_frame",
    "parent_greenlet",
    "past_txguard",
    "shorten_sql",
    "user_frame",
    "warn_at",
    "warn_at_user",
]


def _package_dir(module_file: str | None) -> str:
    return os.path.dirname(os.path.abspath(module_file or "")) + os.sep


_STDLIB = os.path.dirname(os.__file__)
_TXGUARD_DIR: Final = _package_dir(__file__)
_LIBRARY_PREFIXES: Final[tuple[str, ...]] = (
    _TXGUARD_DIR,
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


def past_txguard(frame: FrameType | None) -> FrameType | None:
    """Return ``frame``, or the first frame above it that is not txguard's own code: who
    called SQLAlchemy through txguard (a ``connect()`` block's ``conn.begin()``, which a
    statement's autobegin calls too)."""
    while frame is not None and frame.f_code.co_filename.startswith(_TXGUARD_DIR):
        frame = frame.f_back
    return frame


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
    return first_user_frame(frame)


def first_user_frame(frame: FrameType | None) -> FrameType | None:
    """Return ``frame`` if it runs the user's code, else the nearest caller that does.

    The one frame walker of txguard: units, guards and the leak detector all find the user's
    line with it. Past the outermost frame of a greenlet that SQLAlchemy's asyncio bridge
    spawned, it goes on in the parent greenlet, where the user's coroutine runs.
    """
    glet = None
    user_files = _user_files
    while True:
        while frame is not None:
            # is_user_frame's cache read inline: the walk passes several frames per call
            verdict = user_files.get(frame.f_code.co_filename)
            if verdict or (verdict is None and is_user_frame(frame)):
                return frame
            frame = frame.f_back
        glet = parent_greenlet(glet)
        if glet is None:
            return None
        frame = glet.gr_frame


_DEFINITION: Final = -1  # an offset no instruction has: it decodes to the code's first line


class Origin:
    """Where something began: the user's innermost frame, then a few of its callers.

    Each frame is kept as its code object and instruction offset (``f_lasti``), which cost
    nothing to take; the line number is decoded from the code's line table only when the
    origin is shown (``str()``, ``lineno``, a warning), and most never are. No frame object
    is kept (it would keep locals alive). ``code`` is None for an unknown origin.
    """

    __slots__ = ("code", "offset", "callers")

    def __init__(
        self,
        code: CodeType | None,
        offset: int = _DEFINITION,
        callers: tuple[tuple[CodeType, int], ...] = (),
    ) -> None:
        self.code = code
        self.offset = offset
        self.callers = callers  # (code, offset) of the callers worth showing, innermost first

    @classmethod
    def of_code(cls, code: CodeType) -> Origin:
        """Name a function by its definition (used for ``@transactional`` functions)."""
        return cls(code)

    @property
    def frames(self) -> tuple[tuple[CodeType, int], ...]:
        """The recorded frames as ``(code, line)`` pairs, innermost first (lines decoded)."""
        if self.code is None:
            return ()
        sites = ((self.code, self.offset), *self.callers)
        return tuple((code, line_of(code, offset)) for code, offset in sites)

    @property
    def filename(self) -> str:
        return "<unknown>" if self.code is None else self.code.co_filename

    @property
    def lineno(self) -> int:
        return 0 if self.code is None else line_of(self.code, self.offset)

    @property
    def function(self) -> str:
        return "<unknown>" if self.code is None else self.code.co_name

    def same_line_as(self, other: Origin) -> bool:
        """Say whether both origins name the same line of the same code (innermost frame)."""
        return (
            self.code is not None
            and self.code is other.code
            and (self.offset == other.offset or self.lineno == other.lineno)
        )

    def __str__(self) -> str:
        if self.code is None:
            return "<unknown location>"
        return describe_location(self.filename, self.lineno, self.function)

    def __repr__(self) -> str:
        return f"<Origin {self}>"

    def format_stack(self) -> str:
        """Return the recorded frames, outermost last, one per line."""
        return "\n".join(
            "  " + describe_location(code.co_filename, lineno, code.co_name)
            for code, lineno in self.frames
        )


class DeferredOrigin(Origin):
    """An origin named when it is shown, by a lookup that may only succeed later.

    A web request's unit opens before the framework has routed the request, so the
    endpoint that a message should name is not known yet: ``find`` returns the endpoint's
    code once it is (a function's definition), and until then, or if it never is, the
    origin is ``fallback``.
    """

    __slots__ = ("_find", "_fallback")

    def __init__(self, find: Callable[[], CodeType | None], fallback: Origin) -> None:
        self._find = find
        self._fallback = fallback

    def _found(self) -> Origin:
        code = self._find()
        return self._fallback if code is None else Origin(code)

    @property
    def code(self) -> CodeType | None:  # type: ignore[override]
        return self._found().code

    @property
    def offset(self) -> int:  # type: ignore[override]
        return self._found().offset

    @property
    def callers(self) -> tuple[tuple[CodeType, int], ...]:  # type: ignore[override]
        return self._found().callers


def describe_location(filename: str, lineno: int, function: str) -> str:
    """Name a line as every txguard message does: ``path:line in function()``."""
    return f"{_short_path(filename)}:{lineno} in {function}()"


def line_of(code: CodeType, offset: int) -> int:
    """Return the line of the instruction at byte ``offset`` of ``code`` (``f_lasti``)."""
    for start, end, line in code.co_lines():
        if start <= offset < end:
            return code.co_firstlineno if line is None else line
    return code.co_firstlineno


UNKNOWN: Final = Origin(None)


def definition_of(fn: object) -> CodeType | None:
    """Return the code of the function ``fn`` names, past decorators that set ``__wrapped__``.

    None when ``fn`` is not a function (None, a class, a callable object). The web
    integrations name a request's unit by its view's or endpoint's definition with it.
    """
    if not callable(fn):
        return None
    code = getattr(inspect.unwrap(fn), "__code__", None)
    return code if isinstance(code, CodeType) else None


def code_origin(code: CodeType, offset: int) -> Origin:
    """Return the Origin of the instruction at ``offset`` of ``code``."""
    return Origin(code, offset)


def caller_origin(frame: FrameType) -> Origin:
    """Return the Origin of ``frame`` if it runs the user's code, else of the nearest above."""
    code = frame.f_code
    if _user_files.get(code.co_filename):
        return Origin(code, frame.f_lasti)
    user = first_user_frame(frame)
    if user is None:
        return UNKNOWN
    return Origin(user.f_code, user.f_lasti)


def capture(depth: int = 1, limit: int = 1) -> Origin:
    """Record up to ``limit`` user frames, starting ``depth`` callers above this call."""
    if limit == 1:
        try:
            return caller_origin(sys._getframe(depth + 1))
        except ValueError:  # called from a shallower stack than depth (e.g. module level)
            return UNKNOWN
    frame = user_frame(depth + 1)
    if frame is None:
        return UNKNOWN
    callers: list[tuple[CodeType, int]] = []
    current = frame.f_back
    while current is not None and len(callers) < limit - 1:
        if is_user_frame(current):
            callers.append((current.f_code, current.f_lasti))
        current = current.f_back
    return Origin(frame.f_code, frame.f_lasti, tuple(callers))


def failure_site(exc: BaseException) -> Origin:
    """Return the innermost user frame of ``exc``'s traceback."""
    tb = exc.__traceback__
    site: Origin = UNKNOWN
    while tb is not None:
        code = tb.tb_frame.f_code
        if not _is_library(code.co_filename):
            site = Origin(code, tb.tb_lasti)
        tb = tb.tb_next
    return site


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
    filename = frame.f_code.co_filename
    warnings.warn_explicit(
        message,
        category,
        filename,
        frame.f_lineno,
        module=module_globals.get("__name__", "<unknown>"),
        registry=module_globals.setdefault("__warningregistry__", {}),
        # Only a file's loader can give its source to the warning's display: code run from
        # a string (`python -c`, pytest-xdist's worker) has a loader that raises instead.
        module_globals=None if filename[:1] == "<" else module_globals,
    )


def warn_at(
    origin: Origin, message: str, category: type[Warning], registry: dict[Any, Any]
) -> None:
    """Emit ``message`` as if raised at ``origin``: for findings made away from the user's
    code (the garbage collector, a background thread), where the origin is the useful line.
    """
    if origin.code is None:
        warnings.warn(message, category, stacklevel=2)
        return
    warnings.warn_explicit(message, category, origin.filename, origin.lineno, registry=registry)


def shorten_sql(statement: str, limit: int = 80) -> str:
    """Collapse whitespace and cut SQL text; it never contains bound parameter values."""
    text = " ".join(statement.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"
