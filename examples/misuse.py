"""Each txguard guard catching one misuse, on SQLite in memory. Run: `make misuse`.

Every block below is a mistake the SQLAlchemy session guides warn about; with
`txguard.install()` each one is reported with where the transaction began and what to do.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import sys
import textwrap
import threading
import time
import warnings
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncSession, create_async_engine
from sqlalchemy.orm import Session
from sqlalchemy.pool import StaticPool

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import txguard  # noqa: E402

# One in-memory database that every thread may use, so each misuse reaches its guard.
engine = sa.create_engine(
    "sqlite://", poolclass=StaticPool, connect_args={"check_same_thread": False}
)
with engine.begin() as conn:
    conn.execute(sa.text("CREATE TABLE users (id INTEGER PRIMARY KEY, name TEXT)"))


def show(message: Any, category: type[Warning], filename: str, lineno: int, *args: Any) -> None:
    """Print a warning as a short, wrapped paragraph."""
    where = Path(filename).name
    print(f"  {category.__name__} at {where}:{lineno}")
    print(textwrap.fill(str(message), width=96, initial_indent="    ", subsequent_indent="    "))


def title(text: str) -> None:
    print(f"\n== {text} ==")


def mixed_begin() -> None:
    title("mixed_begin: session.begin() after the session autobegan")
    session = Session(engine)
    session.execute(sa.text("SELECT name FROM users WHERE id = :id"), {"id": 1})
    try:
        session.begin()  # too late: the SELECT above already began a transaction
    except sa.exc.InvalidRequestError as exc:
        print(f"  ... and then SQLAlchemy raised as usual: {exc}")
    finally:
        session.close()


def leaks() -> None:
    title("leaks: a Session dropped without close()")

    def handler() -> None:
        session = Session(engine)
        session.execute(sa.text("SELECT count(*) FROM users"))
        # forgot session.close(): the transaction and the pooled connection stay held

    handler()
    gc.collect()  # a Session with an open transaction is freed by the cycle collector


def cross_thread() -> None:
    title("cross_thread: a worker thread using the Session while its owner is inside it")
    session = Session(engine)
    session.execute(sa.text("SELECT 1"))

    def worker() -> None:
        session.execute(sa.text("INSERT INTO users (name) VALUES ('from a thread')"))

    @sa.event.listens_for(session, "do_orm_execute", once=True)
    def wait_for_worker(state: Any) -> None:  # the owner is in the middle of a statement
        thread = threading.Thread(target=worker, name="worker-1")
        thread.start()
        thread.join()

    session.execute(sa.text("SELECT 2"))
    session.rollback()
    session.close()


def cross_task() -> None:
    title("cross_task: a child task using its parent's AsyncSession")

    async def main() -> None:
        async_engine = create_async_engine("sqlite+aiosqlite://")
        async with AsyncSession(async_engine) as session:
            await session.execute(sa.text("SELECT 1"))

            async def child() -> None:
                await session.execute(sa.text("SELECT 2"))

            await asyncio.gather(child())  # gather runs child() in a task of its own
        await async_engine.dispose()

    asyncio.run(main())


def long_transaction() -> None:
    title("long_transaction: a transaction kept open across slow work (threshold 0.2 s)")
    with Session(engine) as session:
        session.execute(sa.text("SELECT name FROM users"))
        time.sleep(0.5)  # e.g. an HTTP call made while the transaction stays open
        session.commit()


def main() -> None:
    warnings.showwarning = show
    warnings.simplefilter("always", txguard.TxGuardWarning)
    logging.basicConfig(
        level=logging.INFO, stream=sys.stdout, format="  log %(name)s %(levelname)s: %(message)s"
    )
    txguard.install(long_transaction=0.2)
    try:
        mixed_begin()
        leaks()
        cross_thread()
        cross_task()
        long_transaction()
    finally:
        txguard.uninstall()
    print("\nEach report names where the transaction began and what to do instead.")


if __name__ == "__main__":
    main()
