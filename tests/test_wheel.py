"""The built wheel works on its own: installed into a fresh venv, run from outside the repo.

The sdist and, from it, the wheel are built once per run (with build isolation, as a user's ``pip install`` would)
and installed with its declared dependencies into a new virtual environment; the pip cache
keeps that fast. Without a reachable package index or cache the tests skip with the reason,
except under ``CI=true``, where they must run.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
import textwrap
from dataclasses import dataclass
from pathlib import Path

import pytest

from .backends import CI
from .test_readme import readme_links, readme_sections

ROOT = Path(__file__).resolve().parent.parent

LEAKY_TESTS = """
import sqlalchemy as sa
from sqlalchemy.orm import Session

ENGINE = sa.create_engine("sqlite://")
KEPT = []


def test_clean():
    with Session(ENGINE) as session, session.begin():
        session.execute(sa.text("SELECT 1"))


def test_leaks_a_session():
    session = Session(ENGINE)
    session.execute(sa.text("SELECT 1"))
    KEPT.append(session)
"""


@dataclass(frozen=True)
class InstalledWheel:
    """A fresh venv with the wheel installed, and a working directory outside the repo."""

    python: Path
    cwd: Path
    sdist: Path

    def run(self, *args: str) -> subprocess.CompletedProcess[str]:
        """Run the venv's python with ``args`` in ``cwd``, with nothing of the repo on the path."""
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "COVERAGE_PROCESS_START")}
        return subprocess.run(
            [str(self.python), *args], cwd=self.cwd, env=env, capture_output=True, text=True, timeout=300
        )


def _run(*args: str | Path, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(a) for a in args], cwd=cwd, capture_output=True, text=True, timeout=300)


def _unavailable(reason: str, result: subprocess.CompletedProcess[str]) -> None:
    """Skip (or, under CI=true, fail) because the wheel could not be built or installed."""
    detail = (result.stdout + result.stderr).strip().splitlines()[-5:]
    message = f"{reason} (no package index or pip cache reachable?):\n" + "\n".join(detail)
    if CI:
        pytest.fail(f"CI=true requires the wheel test: {message}", pytrace=False)
    pytest.skip(message)


@pytest.fixture(scope="session")
def installed_wheel(tmp_path_factory: pytest.TempPathFactory) -> InstalledWheel:
    """Build the sdist and, from it, the wheel once; install the wheel, its dependencies and pytest into a fresh venv."""
    base = tmp_path_factory.mktemp("wheel")
    dist = base / "dist"
    built = _run(sys.executable, "-m", "build", "--outdir", dist, ROOT)
    if built.returncode != 0:
        _unavailable("building the wheel failed", built)
    (wheel,) = dist.glob("txguard-*.whl")
    (sdist,) = dist.glob("txguard-*.tar.gz")
    venv = base / "venv"
    _run(sys.executable, "-m", "venv", venv).check_returncode()
    python = venv / "bin" / "python"
    installed = _run(python, "-m", "pip", "install", "--quiet", "--disable-pip-version-check", wheel, "pytest")
    if installed.returncode != 0:
        _unavailable("installing the wheel failed", installed)
    cwd = base / "outside"
    cwd.mkdir()
    return InstalledWheel(python=python, cwd=cwd, sdist=sdist)


@pytest.fixture(scope="session")
def plugin_run(installed_wheel: InstalledWheel) -> subprocess.CompletedProcess[str]:
    """Run the installed pytest plugin with the leak check on over one clean and one leaking test."""
    (installed_wheel.cwd / "test_leaky.py").write_text(LEAKY_TESTS)
    return installed_wheel.run("-m", "pytest", "-p", "no:cacheprovider", "-rA", "--txguard-leaks=fail", "test_leaky.py")


def test_txguard_is_imported_from_the_venv_not_the_repo(installed_wheel: InstalledWheel) -> None:
    """Outside the repo, ``import txguard`` finds the installed wheel's package."""
    result = installed_wheel.run("-c", "import txguard; print(txguard.__file__)")
    assert result.returncode == 0, result.stderr
    assert Path(result.stdout.strip()).is_relative_to(installed_wheel.python.parent.parent)


def test_wheel_ships_py_typed(installed_wheel: InstalledWheel) -> None:
    """The installed package carries its ``py.typed`` marker, so type checkers read its hints."""
    result = installed_wheel.run(
        "-c", "import pathlib, txguard; print(pathlib.Path(txguard.__file__).with_name('py.typed').is_file())"
    )
    assert result.stdout.strip() == "True", result.stderr


def test_demo_runs_from_the_installed_wheel(installed_wheel: InstalledWheel) -> None:
    """``make demo``'s examples/quickstart.py, copied outside the repo, runs to the end on the installed wheel."""
    shutil.copy(ROOT / "examples" / "quickstart.py", installed_wheel.cwd / "quickstart.py")
    result = installed_wheel.run("quickstart.py")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1. A unit of work that commits" in result.stdout


def test_readme_quick_start_runs_from_the_installed_wheel(installed_wheel: InstalledWheel) -> None:
    """The README's quick start, written to a file outside the repo, runs on the installed wheel."""
    (block,) = [block for section in readme_sections() if section.heading == "Quick start" for block in section.blocks]
    (installed_wheel.cwd / "readme_quick_start.py").write_text(block.code)
    result = installed_wheel.run("readme_quick_start.py")
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout == "committed note 1\n"


def test_sdist_holds_every_file_the_readme_links(installed_wheel: InstalledWheel) -> None:
    """The README of an unpacked sdist has no dead link: the docs pages and LICENSE come with it."""
    with tarfile.open(installed_wheel.sdist) as sdist:
        names = {name.partition("/")[2] for name in sdist.getnames()}
    linked = {target.partition("#")[0] for target in readme_links()}
    assert "docs/index.md" in linked
    assert sorted(linked - names) == []


def test_installed_plugin_passes_a_clean_test(plugin_run: subprocess.CompletedProcess[str]) -> None:
    """The plugin, loaded from the wheel's entry point, lets a test that closes its session pass."""
    assert "PASSED test_leaky.py::test_clean" in plugin_run.stdout, plugin_run.stdout + plugin_run.stderr


def test_installed_plugin_fails_the_run_naming_the_leak(plugin_run: subprocess.CompletedProcess[str]) -> None:
    """The plugin from the wheel fails a run whose test leaves a session open, and names that test."""
    assert plugin_run.returncode != 0
    leak_line = "txguard: test_leaky.py::test_leaks_a_session left 1 session or connection open"
    assert leak_line in plugin_run.stdout, textwrap.shorten(plugin_run.stdout, 2000)
