"""Every ```python block of the docs site (docs/**/*.md) runs as written, on SQLite.

The blocks of one page run in order in one namespace, the application namespace of
``tests/test_readme.py`` (its ``engine``, models and functions), with the same
``# SomeError:`` expectations and ``<!-- not-run: reason -->`` marks. The site must also
stay inside the repository: no page links to a file outside it, and the API reference
covers every public name.
"""

from __future__ import annotations

import re
from pathlib import Path
from collections.abc import Callable
from typing import Any

import pytest
import sqlalchemy as sa

import txguard
import txguard.testing

from .test_readme import README, Block, Line, Order, app, readme_sections, run_block

__all__ = ["app"]  # the fixture, imported to be used here

ROOT = README.parent
DOCS = ROOT / "docs"
PAGES = sorted(DOCS.rglob("*.md"))


def page_blocks(page: Path) -> list[Block]:
    """Return the ```python blocks of one docs page, in order."""
    return [block for section in readme_sections(page) for block in section.blocks]


@pytest.mark.parametrize("page", PAGES, ids=[str(p.relative_to(DOCS)) for p in PAGES])
def test_docs_page_runs(page: Path, app: dict[str, Any]) -> None:
    """Each docs page's python blocks run in order, showing the errors they say they show."""
    for block in page_blocks(page):
        if block.not_run is None:
            run_block(block, app)




@pytest.mark.parametrize("page", PAGES, ids=[str(p.relative_to(DOCS)) for p in PAGES])
def test_docs_page_marks_at_most_one_block_not_run(page: Path) -> None:
    """A page skips at most one python block with a not-run mark."""
    skipped = [b for b in page_blocks(page) if b.not_run is not None]
    assert len(skipped) <= 1, [f"{page}:{b.line}: {b.not_run}" for b in skipped]


def test_docs_have_runnable_examples() -> None:
    """The site's examples are code that runs: the feature and recipe pages hold many blocks."""
    assert sum(len(page_blocks(page)) for page in PAGES) >= 25


_OUTSIDE = re.compile(r"\]\((?:\.\./)+shared/|\.\./shared/")


@pytest.mark.parametrize("path", [README, *PAGES], ids=lambda p: str(Path(p).relative_to(ROOT)))
def test_no_link_leaves_the_repository(path: Path) -> None:
    """README and docs point into the project's own docs, never at ../shared/ outside a clone."""
    assert not _OUTSIDE.search(path.read_text()), f"{path} links outside the repository"


def test_api_reference_documents_every_public_name() -> None:
    """Each name in txguard.__all__ has its entry in the generated API reference."""
    reference = (DOCS / "reference" / "api.md").read_text()
    missing = [name for name in txguard.__all__ if f"::: txguard.{name}\n" not in reference]
    assert missing == []


def test_testing_reference_documents_the_helpers_and_fixtures() -> None:
    """txguard.testing's public names and the plugin's fixtures are in the reference."""
    reference = (DOCS / "reference" / "testing.md").read_text()
    names = [*txguard.testing.__all__, "txguard_leak_detector", "txguard_bind", "txguard_rollback"]
    assert [name for name in names if name not in reference] == []


def test_glance_example_returns_the_id_and_notifies_after_commit(app: dict[str, Any]) -> None:
    """The home page's place_order returns the new order's id, and notify() gets it after the commit."""
    (block,) = [b for s in readme_sections(DOCS / "index.md") if s.heading == "At a glance" for b in s.blocks]
    run_block(block, app)
    place_order: Callable[..., int] = app["place_order"]
    order_id = place_order(7, [Line(sku="tea", quantity=2)])
    assert isinstance(order_id, int)
    assert app["ran"] == [("notify", order_id)]
    with app["engine"].connect() as conn:
        assert conn.execute(sa.select(Order.customer_id).where(Order.id == order_id)).scalar() == 7
        assert conn.execute(sa.select(sa.func.count()).select_from(Line)).scalar() == 1


_TEST_FUNCTION = re.compile(r"^(?:async )?def test_", re.MULTILINE)


def _test_module_blocks() -> list[Block]:
    """The testing guide's runnable blocks that are whole test modules (they define tests)."""
    blocks = page_blocks(DOCS / "recipes" / "testing.md")
    return [block for block in blocks if block.not_run is None and _TEST_FUNCTION.search(block.code)]


@pytest.mark.parametrize("block", _test_module_blocks(), ids=lambda b: f"testing.md:{b.line}")
def test_testing_guide_modules_pass_under_pytest(block: Block, pytester: pytest.Pytester) -> None:
    """The testing guide's test modules, run by pytest with the txguard plugin, pass."""
    pytester.makepyfile(test_recipe=block.code)
    tests = len(_TEST_FUNCTION.findall(block.code))
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-o", "asyncio_mode=auto")
    result.assert_outcomes(passed=tests)


def test_testing_guide_has_test_modules() -> None:
    """The testing guide's recipes (plain sync, async, FastAPI, Flask, Flask-SQLAlchemy) all
    run as test modules."""
    assert len(_test_module_blocks()) >= 5
