"""txguard.celery: tasks are enqueued after the commit, proven with a real Celery worker."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa

import txguard
from tests.apps.celery_app import REDIS_URL, record, runs
from tests.backends import CI
from tests.conftest import AsyncDatabase
from tests.models import Item
from txguard.celery import apply_async_on_commit, delay_on_commit

ROOT = Path(__file__).resolve().parent.parent
QUEUE = "celery"  # Celery's default queue: a Redis list while tasks wait in it


@pytest.fixture(scope="module")
def broker() -> Iterator[object]:
    """An empty Redis database as broker and result backend."""
    import redis

    client = redis.Redis.from_url(REDIS_URL)
    try:
        client.flushdb()
    except redis.exceptions.ConnectionError as exc:
        if CI:
            pytest.fail(f"CI=true requires Redis at {REDIS_URL}: {exc}", pytrace=False)
        pytest.skip(f"Redis not reachable at {REDIS_URL}")
    yield client
    client.flushdb()
    client.close()


@pytest.fixture(scope="module")
def worker(broker: object, tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """A real worker (solo pool: one task at a time, in queue order), always stopped."""
    log = (tmp_path_factory.mktemp("celery") / "worker.log").open("w")
    process = subprocess.Popen(
        [
            sys.executable, "-m", "celery", "-A", "tests.apps.celery_app", "worker",
            "--pool=solo", "--loglevel=INFO", "--without-gossip", "--without-mingle",
            "--without-heartbeat",
        ],
        cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, stdout=log, stderr=log,
    )
    try:
        yield
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.close()


def url_of(engine: sa.Engine) -> str:
    return engine.url.render_as_string(hide_password=False)


@pytest.fixture
def db(engine: sa.Engine, worker: None) -> str:
    """The backend's URL, with an empty table of task runs."""
    runs.create(engine, checkfirst=True)
    with engine.begin() as conn:
        conn.execute(runs.delete())
    return url_of(engine)


def runs_after_the_queue_drains(url: str) -> list[tuple[str, int]]:
    """Wait for a task sent now (the solo worker runs tasks in order), then list the runs."""
    record.delay(url, "sentinel").get(timeout=60)
    engine = sa.create_engine(url, poolclass=sa.pool.NullPool)
    with engine.connect() as conn:
        rows = conn.execute(sa.select(runs.c.label, runs.c.saw_row)).all()
    engine.dispose()
    return [(label, saw) for label, saw in rows if label != "sentinel"]


def queued(broker: object) -> int:
    return int(broker.llen(QUEUE))  # type: ignore[attr-defined]


def test_a_task_enqueued_in_a_unit_that_commits_runs_once_and_sees_the_row(
    engine: sa.Engine, db: str, broker: object
) -> None:
    """Nothing reaches the broker before the COMMIT; then the task runs once, seeing the row."""
    txguard.configure(engine)
    with txguard.unit_of_work() as session:
        session.add(Item(name="ada"))
        session.flush()
        delay_on_commit(record, db, "ada")
        assert queued(broker) == 0
    assert runs_after_the_queue_drains(db) == [("ada", 1)]


def test_a_task_enqueued_in_a_unit_that_rolls_back_never_runs(
    engine: sa.Engine, db: str
) -> None:
    """The enqueue is dropped with the transaction."""
    txguard.configure(engine)
    with pytest.raises(RuntimeError), txguard.unit_of_work() as session:
        session.add(Item(name="bob"))
        delay_on_commit(record, db, "bob")
        raise RuntimeError("roll back")
    assert runs_after_the_queue_drains(db) == []


def test_a_task_enqueued_in_a_savepoint_that_rolls_back_never_runs(
    engine: sa.Engine, db: str
) -> None:
    """A rolled-back nested unit drops its enqueue; the outer unit's own task still runs."""
    txguard.configure(engine)
    with txguard.unit_of_work() as session:
        session.add(Item(name="cy"))
        delay_on_commit(record, db, "cy")
        with pytest.raises(KeyError), txguard.unit_of_work(propagation="nested"):
            delay_on_commit(record, db, "dropped")
            raise KeyError("savepoint")
    assert runs_after_the_queue_drains(db) == [("cy", 1)]


def test_outside_any_unit_the_task_is_enqueued_at_once(engine: sa.Engine, db: str) -> None:
    """With no transaction to wait for, delay_on_commit is delay()."""
    txguard.configure(engine)
    assert delay_on_commit(record, db, "dee") is None
    assert runs_after_the_queue_drains(db) == [("dee", 0)]


def test_delay_on_commit_passes_every_keyword_to_the_task(engine: sa.Engine, db: str) -> None:
    """delay_on_commit has no keyword of its own, so none can clash with the task's."""
    txguard.configure(engine)
    with txguard.unit_of_work() as session:
        session.add(Item(name="kw"))
        delay_on_commit(record, url=db, label="kw")
    assert runs_after_the_queue_drains(db) == [("kw", 1)]


def test_apply_async_on_commit_passes_celery_options_and_a_registry(
    engine: sa.Engine, db: str, broker: object
) -> None:
    """registry= picks the unit; the other keywords reach apply_async (here task_id)."""
    from celery.result import AsyncResult

    registry = txguard.SessionRegistry(engine)
    with registry.unit_of_work() as session:
        session.add(Item(name="eve"))
        apply_async_on_commit(record, (db, "eve"), registry=registry, task_id="txguard-eve")
        assert queued(broker) == 0
    assert AsyncResult("txguard-eve", app=record.app).get(timeout=60) == 1
    assert runs_after_the_queue_drains(db) == [("eve", 1)]


async def test_in_an_async_unit_the_task_is_enqueued_after_the_commit(
    async_db: AsyncDatabase, worker: None, broker: object
) -> None:
    """An async unit (AsyncSession) enqueues after its COMMIT too, and drops on rollback."""
    url = url_of(async_db.sync)
    runs.create(async_db.sync, checkfirst=True)
    with async_db.sync.begin() as conn:
        conn.execute(runs.delete())
    registry = txguard.SessionRegistry(async_db.engine)
    async with registry.unit_of_work() as session:
        session.add(Item(name="fay"))
        apply_async_on_commit(record, (url, "fay"), registry=registry)
        await session.flush()
        assert queued(broker) == 0
    with pytest.raises(RuntimeError):
        async with registry.unit_of_work() as session:
            session.add(Item(name="gus"))
            apply_async_on_commit(record, (url, "gus"), registry=registry)
            raise RuntimeError("roll back")
    assert runs_after_the_queue_drains(url) == [("fay", 1)]


def test_something_that_is_not_a_task_is_refused_at_once() -> None:
    """A plain function fails where it is passed, not after the commit."""
    with pytest.raises(txguard.ConfigurationError, match="needs a Celery task"):
        delay_on_commit(print, "hello")


def test_the_celery_example_runs() -> None:
    """examples/celery_app.py (eager tasks) sends the welcome only for the committed sign-up."""
    env = {k: v for k, v in os.environ.items() if k != "CELERY_BROKER_URL"}
    result = subprocess.run(
        [sys.executable, "examples/celery_app.py"], cwd=ROOT, env=env, capture_output=True,
        text=True, check=True, timeout=60,
    )
    assert result.stdout.count("task: welcome") == 1
    assert "no task was sent" in result.stdout
