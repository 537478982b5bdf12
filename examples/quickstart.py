"""txguard in two minutes: run with `make demo`.

Creates an embedded SQLite file next to this script, then tells the story of what
txguard did: a unit committed, a nested savepoint rolled back, an on_commit hook fired,
and a misuse stopped with its fix.
"""

from __future__ import annotations

import textwrap
from pathlib import Path

from sqlalchemy import String, create_engine, func, select
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

import txguard


class Base(DeclarativeBase):
    pass


class Account(Base):
    __tablename__ = "accounts"

    id: Mapped[int] = mapped_column(primary_key=True)
    owner: Mapped[str] = mapped_column(String(50))
    balance: Mapped[int]


def say(step: str, text: str) -> None:
    print(f"  {step:<12} {text}")


@txguard.transactional
def open_account(owner: str, balance: int) -> int:
    """Open an account; joins the caller's unit when there is one."""
    account = Account(owner=owner, balance=balance)
    txguard.current_session().add(account)
    txguard.current_session().flush()
    txguard.on_commit(lambda: say("on_commit", f"welcome e-mail queued for {owner}"))
    return account.id


@txguard.transactional(propagation="nested")
def risky_bonus(account_id: int) -> None:
    """Credit a bonus in a savepoint, then fail: only the savepoint is undone."""
    account = txguard.current_session().get_one(Account, account_id)
    account.balance += 1_000_000
    txguard.current_session().flush()
    raise ValueError("bonus rejected by the fraud check")


def total(engine_url: str) -> int:
    engine = create_engine(engine_url)
    with engine.connect() as conn:
        result = conn.scalar(select(func.coalesce(func.sum(Account.balance), 0)))
    engine.dispose()
    return int(result or 0)


def main() -> None:
    path = Path(__file__).with_name("quickstart.db")
    path.unlink(missing_ok=True)
    url = f"sqlite:///{path}"
    engine = create_engine(url)
    Base.metadata.create_all(engine)
    txguard.configure(engine, expire_on_commit=False)
    print(f"txguard {txguard.__version__} on {url}\n")

    print("1. A unit of work that commits")
    with txguard.unit_of_work() as session:
        alice = open_account("alice", 100)
        bob = open_account("bob", 50)
        say("in unit", f"opened accounts {alice} and {bob} in one transaction")
    say("committed", f"total balance in the database: {total(url)}")

    print("\n2. A nested savepoint that rolls back, while its owner commits")
    with txguard.unit_of_work() as session:
        try:
            risky_bonus(alice)
        except ValueError as exc:
            say("savepoint", f"rolled back ({exc})")
        session.get_one(Account, bob).balance += 10
    say("committed", f"bob got 10, alice kept 100: total is {total(url)}")

    print("\n3. A misuse, stopped with its fix")
    try:
        with txguard.unit_of_work() as session:
            session.get_one(Account, alice).balance = 0
            session.commit()
    except txguard.DisciplineError as exc:
        say("refused", f"{type(exc).__name__}:")
        print(textwrap.fill(str(exc), width=88, initial_indent=" " * 15, subsequent_indent=" " * 15))
    say("rolled back", f"alice's balance untouched: total is still {total(url)}")

    print("\n4. A joined unit whose failure was swallowed")
    try:
        with txguard.unit_of_work():
            open_account("carol", 70)
            try:
                with txguard.unit_of_work():
                    raise LookupError("carol's referrer does not exist")
            except LookupError:
                pass
    except txguard.UnexpectedRollbackError as exc:
        say("refused", f"{type(exc).__name__} (caused by {type(exc.__cause__).__name__})")
    say("rolled back", f"no carol, no e-mail: total is still {total(url)}")

    engine.dispose()


if __name__ == "__main__":
    main()
