"""Celery tasks enqueued only after the unit of work commits (txguard.celery).

Run the demo: `.venv/bin/python examples/celery_app.py` (tasks run in-process, "eager").
With a real worker and Redis: `CELERY_BROKER_URL=redis://127.0.0.1:6379/0
.venv/bin/celery -A examples.celery_app worker --pool=solo` in one shell, the same
`CELERY_BROKER_URL=... .venv/bin/python -m examples.celery_app` in another.
Data goes to an SQLite file next to this script.
"""

from __future__ import annotations

import os
from pathlib import Path

from celery import Celery
from sqlalchemy import String, create_engine
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

import txguard
from txguard.celery import delay_on_commit


class Base(DeclarativeBase):
    pass


class User(Base):
    __tablename__ = "users"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(50))


engine = create_engine(f"sqlite:///{Path(__file__).with_name('celery_app.db')}")
Base.metadata.create_all(engine)
txguard.configure(engine)

broker = os.environ.get("CELERY_BROKER_URL")
app = Celery("example", broker=broker or "memory://")
app.conf.task_always_eager = broker is None


@app.task(name="example.send_welcome")
def send_welcome(user_id: int) -> None:
    with txguard.unit_of_work() as session:  # the worker's own unit: the user is committed
        user = session.get(User, user_id)
        print(f"  task: welcome, {user.name if user else '(no such user: rolled back?)'}")


def sign_up(name: str, fail: bool = False) -> None:
    with txguard.unit_of_work() as session:
        user = User(name=name)
        session.add(user)
        session.flush()
        delay_on_commit(send_welcome, user.id)  # sent after the COMMIT, never on rollback
        print(f"  {name} added (id {user.id}), task not sent yet")
        if fail:
            raise RuntimeError("payment declined")


if __name__ == "__main__":
    Base.metadata.drop_all(engine)
    Base.metadata.create_all(engine)
    print("sign_up('ada'):")
    sign_up("ada")
    print("sign_up('bob', fail=True):")
    try:
        sign_up("bob", fail=True)
    except RuntimeError as exc:
        print(f"  rolled back ({exc}); no task was sent")
