"""A FastAPI app whose requests each run in one unit of work (txguard.fastapi.session()).

Run the demo (FastAPI's TestClient, no server): `.venv/bin/python examples/fastapi_app.py`
Serve it: `.venv/bin/uvicorn examples.fastapi_app:app`, then
`curl -X POST localhost:8000/notes/hello` and `curl localhost:8000/notes`.
Data goes to an SQLite file next to this script.
"""

from pathlib import Path

from fastapi import BackgroundTasks, FastAPI, HTTPException
from fastapi.testclient import TestClient
from sqlalchemy import String, create_engine, select
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

import txguard
from txguard.fastapi import session as unit_session


class Base(DeclarativeBase):
    pass


class Note(Base):
    __tablename__ = "notes"

    id: Mapped[int] = mapped_column(primary_key=True)
    text: Mapped[str] = mapped_column(String(100), unique=True)


engine = create_engine(f"sqlite:///{Path(__file__).with_name('fastapi_app.db')}")
Base.metadata.create_all(engine)
txguard.configure(engine)
app = FastAPI()


def add_note(text: str) -> None:
    """A service: it finds the request's session itself."""
    txguard.current_session().add(Note(text=text))
    txguard.on_commit(lambda: print(f"  on_commit: {text!r} is committed"))


@app.post("/notes/{text}", status_code=201)
def create(text: str, tasks: BackgroundTasks, session: Session = unit_session()) -> dict[str, str]:
    add_note(text)
    if text == "forbidden":
        raise HTTPException(403)  # the endpoint raised: the note is rolled back
    tasks.add_task(print, f"  background task: after the commit of {text!r}")
    return {"created": text}  # committed before this response is sent


@app.get("/notes")
def index(session: Session = unit_session(read_only=True)) -> dict[str, list[str]]:
    return {"notes": list(session.scalars(select(Note.text)))}


if __name__ == "__main__":
    Base.metadata.drop_all(engine)
    Base.metadata.create_all(engine)
    client = TestClient(app, raise_server_exceptions=False)
    for text in ("hello", "forbidden", "hello"):  # the second "hello" fails at COMMIT: a 500
        print(f"POST /notes/{text} -> {client.post(f'/notes/{text}').status_code}")
    print(f"GET /notes -> {client.get('/notes').json()}")
