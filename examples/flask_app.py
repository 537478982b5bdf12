"""A Flask app whose requests each run in one unit of work (txguard.flask.TxGuard).

Run the demo (Flask's test client, no server): `.venv/bin/python examples/flask_app.py`
Serve it: `.venv/bin/flask --app examples/flask_app run`, then
`curl -X POST localhost:5000/notes/hello` and `curl localhost:5000/notes`.
Data goes to an SQLite file next to this script.
"""

from __future__ import annotations

from pathlib import Path

from flask import Flask, abort
from sqlalchemy import String, create_engine, select
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

import txguard
from txguard.flask import TxGuard


class Base(DeclarativeBase):
    pass


class Note(Base):
    __tablename__ = "notes"

    id: Mapped[int] = mapped_column(primary_key=True)
    text: Mapped[str] = mapped_column(String(100), unique=True)


engine = create_engine(f"sqlite:///{Path(__file__).with_name('flask_app.db')}")
Base.metadata.create_all(engine)
txguard.configure(engine)

app = Flask(__name__)
TxGuard(app)  # a unit per request: commit when the status is < 400, else roll back


def add_note(text: str) -> None:
    """A service: it finds the request's session itself."""
    txguard.current_session().add(Note(text=text))
    txguard.on_commit(lambda: print(f"  on_commit: {text!r} is committed"))


@app.post("/notes/<text>")
def create(text: str) -> tuple[dict[str, str], int]:
    add_note(text)
    if text == "forbidden":
        abort(403)  # an error status: the note is rolled back
    return {"created": text}, 201


@app.get("/notes")
def index() -> dict[str, list[str]]:
    return {"notes": list(txguard.current_session().scalars(select(Note.text)))}


if __name__ == "__main__":
    Base.metadata.drop_all(engine)
    Base.metadata.create_all(engine)
    app.logger.disabled = True  # Flask would log the failed commit's traceback
    client = app.test_client()
    for text in ("hello", "forbidden", "hello"):  # the second "hello" fails at COMMIT: a 500
        print(f"POST /notes/{text} -> {client.post(f'/notes/{text}').status_code}")
    print(f"GET /notes -> {client.get('/notes').get_json()}")
