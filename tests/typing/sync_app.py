"""A sync app as users write it: checked by tests/test_typing.py with mypy and pyright."""
import sqlalchemy as sa
from sqlalchemy.orm import Session, sessionmaker

import txguard


class AppSession(Session):
    pass


db = txguard.configure(sa.create_engine("sqlite://"))
custom = txguard.SessionRegistry(sessionmaker(class_=AppSession))


@db.transactional
def count() -> int:
    return len(db.current_session().execute(sa.text("select 1")).all())


def main() -> None:
    with txguard.unit_of_work() as session:
        reveal_type(session)
        session.execute(sa.text("select 1"))
    with db.unit_of_work(read_only=True):
        reveal_type(db.current_session())
    reveal_type(custom.current_session())
    reveal_type(txguard.current_session(db))
    reveal_type(txguard.current_session())
    with txguard.connect() as conn:
        reveal_type(conn)
    with db.connect() as conn:
        conn.execute(sa.text("select 1"))
