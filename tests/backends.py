"""Where the test databases are, and whether they can be reached.

SQLite always runs. PostgreSQL and MariaDB run when reachable (URLs overridable with
``TXGUARD_PG_URL`` / ``TXGUARD_MYSQL_URL``); on a laptop without them their tests are
skipped with the reason, and under ``CI=true`` an unreachable server fails the run.
"""

from __future__ import annotations

import functools
import os

import pytest
import sqlalchemy as sa

CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")

# Under `pytest -n N` (pytest-xdist) each worker ("gw0", "gw1", ...) runs on a database of
# its own, named after the configured one, which it creates: the tests create, empty and
# drop the same tables, and two workers on one database would undo each other's rows.
WORKER = os.environ.get("PYTEST_XDIST_WORKER", "")


def _for_this_process(url: str) -> str:
    if not WORKER:
        return url
    parsed = sa.make_url(url)
    return parsed.set(database=f"{parsed.database}_{WORKER}").render_as_string(hide_password=False)


CONFIGURED_URLS = {
    "postgresql": os.environ.get(
        "TXGUARD_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
    ),
    "mariadb": os.environ.get("TXGUARD_MYSQL_URL", "mysql+pymysql://root@127.0.0.1:3306/test"),
}
SYNC_URLS = {backend: _for_this_process(url) for backend, url in CONFIGURED_URLS.items()}

ASYNC_DRIVERS = {
    "postgresql": ("postgresql+asyncpg", "postgresql+psycopg_async"),
    "mariadb": ("mysql+aiomysql",),
}


def async_urls(backend: str) -> list[str]:
    """Return the async URLs for ``backend``, derived from its sync URL."""
    url = sa.make_url(SYNC_URLS[backend])
    return [url.set(drivername=d).render_as_string(hide_password=False) for d in ASYNC_DRIVERS[backend]]


@functools.cache
def unreachable_reason(backend: str) -> str | None:
    """Return why ``backend`` cannot be used, or None when it answers."""
    url = SYNC_URLS[backend]
    args = {"connect_timeout": 3}
    engine = sa.create_engine(url, connect_args=args, poolclass=sa.pool.NullPool)
    try:
        if WORKER:
            _create_database(sa.make_url(CONFIGURED_URLS[backend]), engine.url.database)
        with engine.connect() as conn:
            conn.execute(sa.text("SELECT 1"))
        claimed = _claim(url)
    except Exception as exc:  # any failure to connect means "not here"
        return f"{backend} not reachable at {sa.make_url(url).render_as_string()}: {type(exc).__name__}"
    finally:
        engine.dispose()
    if not claimed:
        pytest.exit(
            f"another test run is using {sa.make_url(url).render_as_string()}: the tests empty "
            "and drop the same tables, so two runs on one database undo each other's rows "
            "(a committed row 'lost', another run's rows 'found'). Give this run a database "
            "of its own (TXGUARD_PG_URL / TXGUARD_MYSQL_URL).",
            returncode=3,
        )
    return None


# The connection holding each database's claim, open until this process ends.
_CLAIMS: list[sa.Connection] = []


def _claim(url: str) -> bool:
    """Claim the database for this test run (a lock held by a connection kept open until the
    process ends); False when another run holds it."""
    conn = sa.create_engine(url, poolclass=sa.pool.NullPool).connect()
    if sa.make_url(url).get_backend_name() == "postgresql":  # advisory locks are per database
        query = "SELECT pg_try_advisory_lock(hashtext('txguard-tests'))"
    else:  # a MariaDB lock is per server
        query = "SELECT GET_LOCK(CONCAT('txguard-tests:', DATABASE()), 0)"
    claimed = bool(conn.exec_driver_sql(query).scalar())
    conn.commit()
    _CLAIMS.append(conn)
    return claimed


def _create_database(configured: sa.URL, name: str | None) -> None:
    """Create database ``name`` (a worker's) on the server of the configured database."""
    admin = sa.create_engine(
        configured, isolation_level="AUTOCOMMIT", poolclass=sa.pool.NullPool,
        connect_args={"connect_timeout": 3},
    )
    try:
        with admin.connect() as conn:
            if configured.get_backend_name() == "postgresql":
                found = conn.execute(
                    sa.text("SELECT 1 FROM pg_database WHERE datname = :name"), {"name": name}
                ).first()
                if found is None:
                    conn.exec_driver_sql(f'CREATE DATABASE "{name}"')
            else:
                conn.exec_driver_sql(f"CREATE DATABASE IF NOT EXISTS `{name}`")
    finally:
        admin.dispose()


def require(backend: str) -> None:
    """Skip (or, under CI=true, fail) the current test when ``backend`` is unreachable."""
    if backend == "sqlite":
        return
    reason = unreachable_reason(backend)
    if reason is None:
        return
    if CI:
        pytest.fail(f"CI=true requires every backend: {reason}", pytrace=False)
    pytest.skip(reason)
