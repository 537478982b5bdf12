"""A Flask app run by tests/test_flask_integration.py, in-process and under waitress.

Run it as a server with ``TXGUARD_FLASK_DB_URL=<url> python -m tests.apps.flask_app``: it
installs the guards at "error", binds a free port on 127.0.0.1 and prints it.
"""

from __future__ import annotations

import os
import sys
import threading
import warnings
from collections.abc import Iterator
from typing import Any

import sqlalchemy as sa
from flask import Flask, Response, abort, got_request_exception, stream_with_context

import txguard
from tests.models import Base, Item
from txguard.flask import TxGuard

DEFERRED_TABLES = {
    # Violated only at COMMIT: the failure of the commit itself.
    "postgresql": [
        "CREATE TABLE txg_flask_deferred (v INTEGER NOT NULL, "
        "CONSTRAINT txg_flask_deferred_v UNIQUE (v) DEFERRABLE INITIALLY DEFERRED)",
    ],
    "sqlite": [
        "CREATE TABLE txg_flask_parent (id INTEGER PRIMARY KEY)",
        "CREATE TABLE txg_flask_deferred (v INTEGER NOT NULL REFERENCES txg_flask_parent (id) "
        "DEFERRABLE INITIALLY DEFERRED)",
    ],
}
DEFERRED_NAMES = ("txg_flask_deferred", "txg_flask_parent")


def create_engine(url: str) -> sa.Engine:
    """Create the app's engine; SQLite enforces foreign keys and waits for its write lock."""
    if url.startswith("sqlite"):
        engine = sa.create_engine(url, pool_size=25, connect_args={"timeout": 30})
        sa.event.listen(engine, "connect", _sqlite_pragmas)
        return engine
    return sa.create_engine(url, pool_size=25, max_overflow=10)


def _sqlite_pragmas(dbapi_connection: Any, record: Any) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.close()


def create_schema(engine: sa.Engine) -> None:
    """(Re)create the tables the app uses, empty."""
    with engine.begin() as conn:
        for name in DEFERRED_NAMES:
            conn.execute(sa.text(f"DROP TABLE IF EXISTS {name}"))
        for ddl in DEFERRED_TABLES.get(engine.dialect.name, []):
            conn.execute(sa.text(ddl))
    Base.metadata.create_all(engine)
    with engine.begin() as conn:
        conn.execute(sa.delete(Item))


class Stats:
    """What the app saw: guard findings, and the on_commit callbacks and what they read."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.guard_findings: list[str] = []
        self.committed: list[str] = []
        self.seen_after_commit = 0

    def finding(self, what: BaseException | str) -> None:
        with self.lock:
            self.guard_findings.append(repr(what))


def _is_guard_finding(exc: BaseException) -> bool:
    return isinstance(exc, (txguard.TxGuardWarning, txguard.MixedBeginError))


def create_item(name: str, registry: txguard.SessionRegistry | None = None) -> Item:
    """A service: it finds the request's session itself."""
    item = Item(name=name)
    txguard.current_session(registry).add(item)
    return item


def create_app(engine: sa.Engine, registry: txguard.SessionRegistry | None = None) -> Flask:
    """Build the app on ``engine``; ``registry=None`` configures the default registry."""
    if registry is None:
        txguard.configure(engine)
    app = Flask(__name__)
    TxGuard(app, registry=registry)
    stats = app.extensions["test_stats"] = Stats()
    reg = registry

    def record_commit(name: str) -> None:
        # Runs after the commit: a new unit sees the row from another transaction.
        with txguard.unit_of_work(registry=reg) as session:
            seen = session.scalar(sa.select(sa.func.count()).where(Item.name == name))
        with stats.lock:
            stats.committed.append(name)
            stats.seen_after_commit += seen == 1

    def on_exception(sender: Flask, exception: Exception, **extra: Any) -> None:
        if _is_guard_finding(exception):
            stats.finding(exception)

    got_request_exception.connect(on_exception, app, weak=False)

    def add(name: str) -> None:
        create_item(name, reg)
        txguard.on_commit(lambda: record_commit(name), registry=reg)

    @app.post("/items/<name>")
    def post_item(name: str) -> tuple[dict[str, str], int]:
        add(name)
        return {"name": name}, 201

    @app.post("/raise/<name>")
    def raise_error(name: str) -> str:
        add(name)
        raise RuntimeError("the view failed")

    @app.post("/abort/<name>")
    def abort_400(name: str) -> str:
        add(name)
        txguard.current_session(reg).flush()
        abort(400)

    @app.post("/conflict/<name>")
    def conflict(name: str) -> tuple[str, int]:
        add(name)
        txguard.current_session(reg).flush()
        return "conflict", 409

    @app.post("/commit-fails/<name>")
    def commit_fails(name: str) -> tuple[dict[str, str], int]:
        add(name)
        session = txguard.current_session(reg)
        session.flush()
        if engine.dialect.name == "sqlite":  # a child without its parent, checked at COMMIT
            session.execute(sa.text("INSERT INTO txg_flask_deferred (v) VALUES (999)"))
        elif engine.dialect.name == "postgresql":  # a duplicate, checked at COMMIT
            session.execute(sa.text("INSERT INTO txg_flask_deferred (v) VALUES (1), (1)"))
        else:  # MariaDB checks every constraint at once: end the session's connection instead
            connection_id = session.scalar(sa.text("SELECT CONNECTION_ID()"))
            with engine.connect() as killer:
                killer.execute(sa.text(f"KILL CONNECTION {int(connection_id)}"))
        return {"name": name}, 201

    @app.post("/session-commit/<name>")
    def session_commit(name: str) -> str:
        add(name)
        txguard.current_session(reg).commit()
        return "committed by hand"

    @app.get("/stream/<name>")
    def stream(name: str) -> Response:
        add(name)

        def body() -> Iterator[str]:
            yield "in unit: "
            yield str(txguard.in_transaction(reg))

        return Response(stream_with_context(body()))

    @app.get("/stats")
    def get_stats() -> dict[str, Any]:
        checkedout = engine.pool.checkedout()  # before this request's own query
        session = txguard.current_session(reg)
        with stats.lock:
            return {
                "guard_findings": list(stats.guard_findings),
                "committed": len(stats.committed),
                "seen_after_commit": stats.seen_after_commit,
                "items": sorted(session.scalars(sa.select(Item.name))),
                "checkedout": checkedout,
            }

    return app


def serve() -> None:
    """Serve the app with waitress on a free port of 127.0.0.1 (20 threads); print the port."""
    import waitress

    warnings.filterwarnings("error", category=txguard.TxGuardWarning)
    txguard.install(mixed_begin="error", leaks="warn", cross_thread="error", cross_task="error")
    engine = create_engine(os.environ["TXGUARD_FLASK_DB_URL"])
    registry = txguard.SessionRegistry(engine) if os.environ.get("TXGUARD_FLASK_REGISTRY") else None
    app = create_app(engine, registry)
    stats: Stats = app.extensions["test_stats"]
    previous_hook = sys.unraisablehook

    def unraisable(args: Any) -> None:  # a warning raised by the garbage collector
        if args.exc_value is not None and _is_guard_finding(args.exc_value):
            stats.finding(args.exc_value)
        previous_hook(args)

    sys.unraisablehook = unraisable
    server = waitress.create_server(app, host="127.0.0.1", port=0, threads=20)
    print(server.effective_port, flush=True)  # type: ignore[union-attr]
    server.run()


if __name__ == "__main__":
    serve()
