"""Flask-SQLAlchemy's documented patterns run clean under every guard at "error" (SPEC §6)."""

from __future__ import annotations

import gc
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

import txguard
from tests.backends import SYNC_URLS

flask = pytest.importorskip("flask")
flask_sqlalchemy = pytest.importorskip("flask_sqlalchemy")

STRICT = dict(
    mixed_begin="error", leaks="error", cross_thread="error", cross_task="error",
    long_transaction=600,
)


@pytest.fixture
def app(backend: str, tmp_path: Path) -> Iterator[tuple[Any, Any, Any]]:
    """A Flask app with Flask-SQLAlchemy on ``backend``, its ``db`` and its model."""
    url = f"sqlite:///{tmp_path / 'flask.db'}" if backend == "sqlite" else SYNC_URLS[backend]

    class Base(sa.orm.DeclarativeBase):
        pass

    db = flask_sqlalchemy.SQLAlchemy(model_class=Base)

    class Note(db.Model):  # type: ignore[name-defined,misc]
        __tablename__ = "txguard_flask_notes"
        id: sa.orm.Mapped[int] = sa.orm.mapped_column(primary_key=True)
        text: sa.orm.Mapped[str] = sa.orm.mapped_column(sa.String(50), unique=True)

    app = flask.Flask(__name__)
    app.config["SQLALCHEMY_DATABASE_URI"] = url
    db.init_app(app)

    @app.post("/notes/<text>")
    def create(text: str) -> tuple[dict[str, Any], int]:
        note = Note(text=text)
        db.session.add(note)
        db.session.commit()
        return {"id": note.id, "text": note.text}, 201

    @app.get("/notes/<int:note_id>")
    def show(note_id: int) -> dict[str, Any]:
        note = db.get_or_404(Note, note_id)
        return {"id": note.id, "text": note.text}

    @app.get("/notes")
    def index() -> dict[str, Any]:
        page = db.paginate(db.select(Note).order_by(Note.id), per_page=2)
        return {"texts": [n.text for n in page.items], "total": page.total}

    @app.post("/rename/<int:note_id>/<text>")
    def rename(note_id: int, text: str) -> dict[str, Any]:
        note = db.session.execute(db.select(Note).filter_by(id=note_id)).scalar_one()
        note.text = text
        try:
            db.session.commit()
        except sa.exc.IntegrityError:
            db.session.rollback()
            return {"error": "taken"}
        return {"text": note.text}

    @app.post("/explicit/<text>")
    def explicit(text: str) -> tuple[dict[str, Any], int]:
        db.session.rollback()  # end the autobegun transaction, then begin once
        with db.session.begin():
            db.session.add(Note(text=text))
        return {"text": text}, 201

    @app.post("/mixed")
    def mixed() -> dict[str, Any]:
        db.session.execute(sa.text("SELECT 1"))
        db.session.begin()  # wrong: the SELECT already autobegan a transaction
        return {}

    @app.post("/fail/<text>")
    def fail(text: str) -> None:
        db.session.add(Note(text=text))
        db.session.flush()
        raise RuntimeError("the view failed after a flush")

    with app.app_context():
        db.drop_all()
        db.create_all()
    yield app, db, Note
    with app.app_context():
        db.drop_all()
        db.engine.dispose()


@pytest.fixture
def strict() -> Iterator[list[BaseException | None]]:
    """Install every guard at "error", make every warning an error, and collect unraisables
    (this test's: earlier tests' garbage is collected first)."""
    gc.collect()
    txguard.install(**STRICT)
    unraisable: list[BaseException | None] = []
    previous_hook = sys.unraisablehook
    sys.unraisablehook = lambda args: unraisable.append(args.exc_value)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            yield unraisable
            gc.collect()
    finally:
        sys.unraisablehook = previous_hook
        txguard.uninstall()


def test_flask_sqlalchemy_patterns_raise_and_warn_nothing(
    app: tuple[Any, Any, Any], strict: list[BaseException | None]
) -> None:
    """Commit in a view, get_or_404, paginate, a caught IntegrityError, begin() after rollback."""
    flask_app, db, Note = app
    client = flask_app.test_client()
    assert client.post("/notes/alpha").status_code == 201
    assert client.post("/notes/beta").status_code == 201
    assert client.post("/notes/gamma").status_code == 201
    assert client.get("/notes/1").get_json() == {"id": 1, "text": "alpha"}
    assert client.get("/notes/99").status_code == 404
    assert client.get("/notes").get_json() == {"texts": ["alpha", "beta"], "total": 3}
    assert client.post("/rename/1/beta").get_json() == {"error": "taken"}
    assert client.post("/rename/1/delta").get_json() == {"text": "delta"}
    assert client.post("/explicit/epsilon").status_code == 201
    flask_app.config["PROPAGATE_EXCEPTIONS"] = False
    assert client.post("/fail/zeta").status_code == 500
    with flask_app.app_context():
        texts = db.session.scalars(db.select(Note.text).order_by(Note.id)).all()
        assert texts == ["delta", "beta", "gamma", "epsilon"]
        db.session.remove()
        assert db.engine.pool.checkedout() == 0
    assert strict == []


def test_flask_sqlalchemy_misuse_is_still_caught(
    app: tuple[Any, Any, Any], strict: list[BaseException | None]
) -> None:
    """begin() after a query in a view raises MixedBeginError naming the view's line."""
    flask_app, db, _ = app
    flask_app.config["PROPAGATE_EXCEPTIONS"] = True
    with pytest.raises(txguard.MixedBeginError, match=r"called at tests/test_flask_sqlalchemy_guards.py:\d+ in mixed\(\)") as caught:
        flask_app.test_client().post("/mixed")
    assert "autobegun" in str(caught.value) or "autobegin" in str(caught.value)
    with flask_app.app_context():
        assert db.engine.pool.checkedout() == 0
