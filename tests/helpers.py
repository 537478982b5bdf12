"""Small helpers shared by the tests."""

from __future__ import annotations

import sqlalchemy as sa

from tests.models import Item


def names(engine: sa.Engine) -> list[str]:
    """Return the item names committed in the database, sorted."""
    with engine.connect() as conn:
        return sorted(conn.scalars(sa.select(Item.name)))


def this_line() -> int:
    """Return the line number of the caller."""
    import sys

    return sys._getframe(1).f_lineno


def once_inside(session: object, name: str, fn: object) -> None:
    """Call ``fn`` once, from inside ``session``'s next call that fires the event ``name``."""
    from sqlalchemy import event

    calls: list[None] = []

    def hook(*args: object) -> None:
        if not calls:
            calls.append(None)
            fn()  # type: ignore[operator]

    event.listen(session, name, hook)
