"""The Celery app that tests/test_celery_integration.py runs a real worker for.

Broker and result backend: Redis at ``TXGUARD_CELERY_REDIS_URL`` (db 8 of 127.0.0.1:6379 by
default). The tasks get the database URL as an argument, so one worker serves every backend.
"""

from __future__ import annotations

import functools
import os

import sqlalchemy as sa
from celery import Celery

from tests.models import Item



def _redis_url() -> str:
    """The broker: TXGUARD_CELERY_REDIS_URL (db 8 by default), one db further for each
    pytest-xdist worker (gw1: db 9), as each worker has its own databases (tests/backends.py):
    the tests count and flush the queue, and a worker consumes from it. The Celery worker
    a test starts inherits the variable, so it reads the same db."""
    url = os.environ.get("TXGUARD_CELERY_REDIS_URL", "redis://127.0.0.1:6379/8")
    worker = os.environ.get("PYTEST_XDIST_WORKER", "")
    if not worker.startswith("gw"):
        return url
    base, _, db = url.rpartition("/")
    return f"{base}/{int(db) + int(worker[2:])}"


REDIS_URL = _redis_url()

app = Celery("txguard_tests", broker=REDIS_URL, backend=REDIS_URL)
app.conf.update(broker_connection_retry_on_startup=True, task_acks_late=False)

runs = sa.Table(
    "txg_celery_runs",
    sa.MetaData(),
    sa.Column("label", sa.String(100), nullable=False),
    sa.Column("saw_row", sa.Integer, nullable=False),
)


@functools.cache
def _engine(url: str) -> sa.Engine:
    return sa.create_engine(url, poolclass=sa.pool.NullPool)


@app.task(name="txguard_tests.record")
def record(url: str, label: str) -> int:
    """Record that the task ran, and whether it saw the Item named ``label`` committed."""
    with _engine(url).begin() as conn:
        saw_row = conn.scalar(sa.select(sa.func.count()).where(Item.name == label))
        conn.execute(runs.insert().values(label=label, saw_row=saw_row))
    return int(saw_row or 0)
