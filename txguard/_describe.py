"""Name the user's objects in messages and log lines without their repr.

A repr can carry a secret: a URL string's shows its password, an Engine's its query string
(``?password=...``), a sessionmaker's its ``info=``, a ``functools.partial``'s the arguments
bound into it, an exception's the values the database echoed. Messages name such objects
by their type, an engine by its URL without password or query, a callable by its
qualified name.
"""

from __future__ import annotations

import enum
import functools
import re
import sys
from typing import Any, Final, cast

from sqlalchemy import Engine
from sqlalchemy.orm import sessionmaker

__all__ = ["describe", "name_of", "option_value"]

_WORD: Final = re.compile(r"[A-Za-z_][A-Za-z0-9_ -]{0,39}")


def describe(value: object) -> str:
    """Say what ``value`` is, for "got ..." in a message: its type, never its contents."""
    engine = getattr(value, "sync_engine", value)  # an AsyncEngine's
    if isinstance(engine, Engine):
        url = engine.url.set(query={}).render_as_string(hide_password=True)
        return f"{type(value).__name__}({url})"
    bind = cast(Any, value).kw.get("bind") if isinstance(value, _makers()) else None
    if bind is not None:
        return f"{type(value).__name__}(bind={describe(bind)})"
    if value is None or isinstance(value, (bool, int, float)):
        return repr(value)
    if isinstance(value, type):
        return f"the class {value.__qualname__}"
    name = type(value).__name__
    return f"{'an' if name[:1] in 'aeiouAEIO' else 'a'} {name}"  # "a URL", "an int"


def option_value(value: object, names: bool = False) -> str:
    """Show an option's value: a number, class or enum as is, anything else by its type.

    With ``names=True`` (an option whose values are names, such as ``mode=``) a string of
    word characters (``'begin-once'``) is shown too: it is a mistyped name, no URL or
    token. A string given to any other option is shown as ``<a str>``.
    """
    if isinstance(value, list):
        return f"[{', '.join(option_value(v, names) for v in value)}]"
    if isinstance(value, tuple):
        inner = ", ".join(option_value(v, names) for v in value)
        return f"({inner}{',' if len(value) == 1 else ''})"
    if isinstance(value, type):
        return value.__qualname__
    if (
        value is None
        or isinstance(value, (bool, int, float, enum.Enum))
        or (names and isinstance(value, str) and _WORD.fullmatch(value))
    ):
        return repr(value)
    return f"<{describe(value)}>"


def name_of(fn: object) -> str:
    """Name a callable by its module and qualified name (a partial by its function's)."""
    while isinstance(fn, functools.partial):
        fn = fn.func
    if not hasattr(fn, "__qualname__"):
        fn = type(fn)  # an object with __call__
    module = getattr(fn, "__module__", None)
    qualname: str = getattr(fn, "__qualname__", "?")
    return f"{module}.{qualname}" if module and module != "builtins" else qualname


def _makers() -> tuple[type, ...]:
    # An async_sessionmaker exists only once its module is loaded: never load it here.
    ext = sys.modules.get("sqlalchemy.ext.asyncio")
    return (sessionmaker, ext.async_sessionmaker) if ext is not None else (sessionmaker,)
