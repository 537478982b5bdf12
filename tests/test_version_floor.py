"""The minimum SQLAlchemy is stated once: pyproject.toml, the matrix's floor cell and the docs agree."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def declared_floor() -> str:
    """Return the minimum of pyproject.toml's ``sqlalchemy>=X,<Y`` dependency."""
    found = re.findall(r'"sqlalchemy>=([0-9.]+),<[0-9.]+"', (ROOT / "pyproject.toml").read_text())
    assert len(found) == 1, found
    return found[0]


def test_the_matrix_floor_cell_runs_the_declared_minimum() -> None:
    """noxfile.py's SQLALCHEMY_FLOOR, which the py311-sa20-floor cell installs, is pyproject.toml's."""
    found = re.findall(r'^SQLALCHEMY_FLOOR = "([0-9.]+)"$', (ROOT / "noxfile.py").read_text(), re.M)
    assert found == [declared_floor()]


@pytest.mark.parametrize(
    "page", ["README.md", "docs/quickstart.md", "docs/development.md", "docs/decisions.md"]
)
def test_the_docs_state_the_declared_minimum(page: str) -> None:
    """Every 2.0.x release a page names as the minimum is pyproject.toml's."""
    text = (ROOT / page).read_text()
    stated = set(re.findall(r"\[?(2\.0\.[0-9]+) or later|sqlalchemy>=(2\.0\.[0-9]+)|minimum is (2\.0\.[0-9]+)", text))
    assert {next(v for v in match if v) for match in stated} == {declared_floor()}
