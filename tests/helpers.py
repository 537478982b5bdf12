"""Small helpers shared by the tests."""

from __future__ import annotations

import sqlalchemy as sa

from tests.models import Item


# The id of a seed row that a test's duplicate insert collides with: far above any id a
# sequence or AUTO_INCREMENT hands out in a run (their counters survive the DELETE between
# tests, so a small one would be drawn by some test's own insert while the seed row exists).
SEED_ID = 2_000_000_011


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


# The server's id of the session a connection runs in, and what of it still holds a
# transaction (PostgreSQL's view is live; InnoDB's is a snapshot up to 0.1 s old).
SERVER_SESSION_ID = {"postgresql": "SELECT pg_backend_pid()", "mariadb": "SELECT CONNECTION_ID()"}
_IN_TRANSACTION = {
    "postgresql": "SELECT state FROM pg_stat_activity WHERE pid = :id AND xact_start IS NOT NULL",
    "mariadb": (
        "SELECT CONCAT(p.COMMAND, ' ', p.STATE) FROM information_schema.innodb_trx t "
        "JOIN information_schema.PROCESSLIST p ON p.ID = t.trx_mysql_thread_id WHERE p.ID = :id"
    ),
}


def transaction_left_open(engine: sa.Engine, backend: str, ident: int) -> str | None:
    """Wait (up to 10 s) until server session ``ident`` holds no transaction; return what it
    is doing if it still holds one then, None once it does not (or has gone)."""
    import time

    state = None
    for _ in range(50):
        with engine.connect() as conn:
            state = conn.execute(sa.text(_IN_TRANSACTION[backend]), {"id": ident}).scalar()
        if state is None:
            return None
        time.sleep(0.2)
    return str(state)
