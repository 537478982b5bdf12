"""The version matrix: Python 3.10–3.13 × SQLAlchemy 2.0.x and 2.1.x (``make matrix``).

SQLAlchemy 2.1 needs Python ≥ 3.11, so 3.10 runs 2.0 only; ``py311-sa20-floor`` runs the
oldest SQLAlchemy that ``pyproject.toml`` allows (``SQLALCHEMY_FLOOR``). Each cell runs the
suite serially without coverage against its own PostgreSQL and MariaDB databases (created
here when missing, e.g. ``test_nox_311_21``) and its own Redis db (the floor cell shares
3.11 × 2.0's), so cells never share state with each other or with ``make test``. Run one
cell with ``nox -s py313-sa21``, CI's two corners with ``nox -t corners``.
"""

from __future__ import annotations

import os
from pathlib import Path

import nox

__all__ = ["CELLS", "CORNERS", "SQLALCHEMY_FLOOR"]

nox.options.default_venv_backend = "venv"
nox.options.reuse_existing_virtualenvs = True
# A missing interpreter skips its cells on a laptop; under CI=true (nox's default) it fails.

PYENV_VERSIONS = Path(os.environ.get("PYENV_ROOT", str(Path.home() / ".pyenv"))) / "versions"

# The oldest SQLAlchemy the suite passes on, which pyproject.toml declares as its minimum
# (docs/development.md says why): the py311-sa20-floor cell runs exactly it.
SQLALCHEMY_FLOOR = "2.0.55"
SQLALCHEMY = {
    "sa20": f"sqlalchemy>={SQLALCHEMY_FLOOR},<2.1",
    "sa20-floor": f"sqlalchemy=={SQLALCHEMY_FLOOR}",
    "sa21": "sqlalchemy>=2.1,<2.2",
}

CELLS = [
    ("3.10", "sa20"),
    ("3.11", "sa20"),
    ("3.11", "sa21"),
    ("3.12", "sa20"),
    ("3.12", "sa21"),
    ("3.13", "sa20"),
    ("3.13", "sa21"),
    ("3.11", "sa20-floor"),
]
# The fastest representative corners (oldest × oldest, newest × newest): CI's `nox -t corners`.
CORNERS = [("3.10", "sa20"), ("3.13", "sa21")]

DEFAULT_URLS = {
    "TXGUARD_PG_URL": "postgresql+psycopg://postgres@127.0.0.1:5432/test",
    "TXGUARD_MYSQL_URL": "mysql+pymysql://root@127.0.0.1:3306/test",
}
ADMIN_DATABASE = {"TXGUARD_PG_URL": "postgres", "TXGUARD_MYSQL_URL": "mysql"}
REDIS_HOST = "redis://127.0.0.1:6379"
# Cells take Redis dbs 9-15: above `make test`'s 8 (tests/apps/celery_app.py) and the low
# numbers a developer's own runs use; the Celery tests flush their db. Redis has 16 dbs, so
# the floor cell shares 3.11 × 2.0's (nox runs the cells one after another).
REDIS_FIRST_DB = 9


def _add_pyenv_to_path() -> None:
    """Put each pyenv interpreter on PATH so nox finds ``python3.1x`` without pyenv shims."""
    if not PYENV_VERSIONS.is_dir():
        return
    bins = [str(v / "bin") for v in sorted(PYENV_VERSIONS.iterdir()) if (v / "bin").is_dir()]
    os.environ["PATH"] = os.pathsep.join([*bins, os.environ.get("PATH", "")])


def _ensure_database(url: str, admin_database: str) -> str | None:
    """Create the database ``url`` names when it is missing; return why not when the server is away."""
    import sqlalchemy as sa

    target = sa.make_url(url)
    name = target.database
    admin = sa.create_engine(
        target.set(database=admin_database),
        isolation_level="AUTOCOMMIT",
        poolclass=sa.pool.NullPool,
        connect_args={"connect_timeout": 3},
    )
    try:
        with admin.connect() as conn:
            if target.get_backend_name() == "postgresql":
                found = conn.execute(
                    sa.text("SELECT 1 FROM pg_database WHERE datname = :name"), {"name": name}
                ).first()
                if found is None:
                    conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
            else:
                conn.execute(sa.text(f"CREATE DATABASE IF NOT EXISTS `{name}`"))
    except sa.exc.OperationalError as exc:
        return f"{target.get_backend_name()} not reachable: {type(exc).__name__}"
    finally:
        admin.dispose()
    return None


def _cell_env(session: nox.Session, python: str, sqlalchemy: str) -> dict[str, str]:
    """Return the environment of one cell: its own databases and Redis db."""
    import sqlalchemy as sa

    name = f"test_nox_{python.replace('.', '')}_{sqlalchemy.removeprefix('sa').replace('-', '')}"
    redis_db = REDIS_FIRST_DB + CELLS.index((python, sqlalchemy.removesuffix("-floor")))
    env = {"TXGUARD_CELERY_REDIS_URL": f"{REDIS_HOST}/{redis_db}"}
    for variable, default in DEFAULT_URLS.items():
        base = sa.make_url(os.environ.get(variable, default))
        url = base.set(database=name).render_as_string(hide_password=False)
        problem = _ensure_database(url, ADMIN_DATABASE[variable])
        if problem is not None:
            session.warn(f"{problem}; its tests skip (or fail under CI=true)")
        env[variable] = url
    return env


def _run_cell(session: nox.Session, python: str, sqlalchemy: str) -> None:
    """Run the suite on one Python × SQLAlchemy cell, serially and without coverage."""
    session.install("-e", ".[test]", SQLALCHEMY[sqlalchemy])
    session.run("python", "-c", "import sqlalchemy; print('SQLAlchemy', sqlalchemy.__version__)")
    session.run(
        "python",
        "-m",
        "pytest",
        "-q",
        "-p",
        "no:cacheprovider",
        "-x",
        *session.posargs,
        env=_cell_env(session, python, sqlalchemy),
    )


def _register(python: str, sqlalchemy: str) -> None:
    """Register the cell as the nox session ``py3XX-saYY`` (tagged ``corners`` for CI's two)."""
    name = f"py{python.replace('.', '')}-{sqlalchemy}"
    tags = ["corners"] if (python, sqlalchemy) in CORNERS else []

    def cell(session: nox.Session) -> None:
        _run_cell(session, python, sqlalchemy)

    cell.__doc__ = f"The suite on Python {python} with {SQLALCHEMY[sqlalchemy]}."
    nox.session(python=python, name=name, tags=tags)(cell)


_add_pyenv_to_path()
for _python, _sqlalchemy in CELLS:
    _register(_python, _sqlalchemy)
