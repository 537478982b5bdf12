"""Every ```python block of README.md runs as written, on SQLite, so no snippet can drift.

The README itself is checked too: its size, its links, its commands. The runner below is
shared with ``tests/test_docs.py``, which runs the docs pages' blocks the same way.

How the blocks are run:

- A block belongs to the section of the nearest heading above it. The blocks of one
  section run in order in one namespace, as the README reads (a later block may use what
  an earlier one defined); each section starts afresh.
- The namespace starts with the application the README talks about (``APP`` below): an
  ``engine`` and an ``async_engine`` on the SQLite file ``app.db`` in a temporary working
  directory, with the tables of the models ``User``, ``Order`` and ``Line`` and the Core
  tables ``accounts`` and ``audit``, and the application's functions the snippets call
  (``notify``, ``reserve_stock``, ``create_user``, ...). The default registry is configured
  on ``engine`` before each section, as an application does at startup.
- A block with a top-level ``await`` / ``async with`` runs in an event loop (as in
  ``python -m asyncio``); async engines it creates are disposed in that loop.
- A comment line ``# SomeError: ...`` or ``# SomeWarning: ...`` naming a txguard exception
  or warning says what the block shows: the block must raise or emit it.
- ``<!-- not-run: reason -->`` on the line before a block skips it, with the reason. Keep
  such marks for snippets that truly cannot run here.
"""

from __future__ import annotations

import ast
import asyncio
import inspect
import re
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship
from sqlalchemy.pool import NullPool

import txguard
from txguard import _registry

README = Path(__file__).resolve().parent.parent / "README.md"
_SHOWS = re.compile(r"^# ([A-Za-z]+(?:Error|Warning)):", re.MULTILINE)
_NOT_RUN = re.compile(r"<!--\s*not-run:\s*(.+?)\s*-->")


@dataclass
class Block:
    line: int  # of its first line of code in its file
    code: str
    not_run: str | None
    path: Path = README


@dataclass
class Section:
    heading: str
    blocks: list[Block] = field(default_factory=list)


def readme_sections(path: Path = README) -> list[Section]:
    """Split a Markdown file into its sections' ```python blocks (other fences are skipped whole)."""
    sections = [Section("(top)")]
    fence: str | None = None  # the fence line's language while inside one
    indent = 0
    body: list[str] = []
    mark: str | None = None
    previous = ""
    for number, line in enumerate(path.read_text().splitlines(), 1):
        stripped = line.strip()
        if fence is not None:
            if stripped == "```":
                if fence == "python":
                    code = "\n".join(body)
                    sections[-1].blocks.append(Block(number - len(body), code, mark, path))
                fence, body, mark = None, [], None
            elif fence == "python":
                body.append(line[indent:])
        elif stripped.startswith("```"):
            fence = stripped[3:].strip()
            indent = len(line) - len(line.lstrip())
            found = _NOT_RUN.search(previous)
            mark = found.group(1) if found else None
        elif line.startswith("#"):
            sections.append(Section(line.lstrip("#").strip()))
        if stripped:
            previous = stripped
    return [section for section in sections if section.blocks]


# The application the README's snippets stand for.


class AppBase(DeclarativeBase):
    pass


class User(AppBase):
    __tablename__ = "users"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(sa.String(50))


class Order(AppBase):
    __tablename__ = "orders"

    id: Mapped[int] = mapped_column(primary_key=True)
    customer_id: Mapped[int]
    lines: Mapped[list[Line]] = relationship()


class Line(AppBase):
    __tablename__ = "order_lines"

    id: Mapped[int] = mapped_column(primary_key=True)
    order_id: Mapped[int] = mapped_column(sa.ForeignKey("orders.id"))
    sku: Mapped[str] = mapped_column(sa.String(20))
    quantity: Mapped[int]


accounts = sa.Table(
    "accounts",
    AppBase.metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("balance", sa.Integer),
)
audit = sa.Table(
    "audit",
    AppBase.metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("event", sa.String(50)),
)


class Storage:
    def __init__(self) -> None:
        self.deleted: list[str] = []

    def delete(self, path: str) -> None:
        self.deleted.append(path)


def app_namespace(engine: sa.Engine, async_engine: AsyncEngine) -> dict[str, Any]:
    """Return the names the README's snippets take as given, with a log of what ran."""
    ran: list[tuple[str, object]] = []

    @txguard.transactional
    def reserve_stock(lines: list[Line]) -> None:
        if any(line.quantity <= 0 for line in lines):
            raise ValueError("nothing to reserve")

    @txguard.transactional
    def create_user(name: str) -> User:
        user = User(name=name)
        txguard.current_session().add(user)
        return user

    def send_receipt() -> None:
        ran.append(("send_receipt", None))

    @txguard.transactional
    def place_order() -> None:
        txguard.current_session().add(Order(customer_id=1))
        txguard.on_commit(send_receipt)

    def run_the_job() -> None:
        with txguard.unit_of_work() as session:
            session.execute(sa.select(User.id))

    return {
        "__name__": "readme",
        "txguard": txguard,
        "engine": engine,
        "async_engine": async_engine,
        "User": User,
        "Order": Order,
        "Line": Line,
        "accounts": accounts,
        "audit": audit,
        "reserve_stock": reserve_stock,
        "create_user": create_user,
        "place_order": place_order,
        "send_receipt": send_receipt,
        "run_the_job": run_the_job,
        "notify": lambda order_id: ran.append(("notify", order_id)),
        "send_welcome_email": lambda user_id: ran.append(("send_welcome_email", user_id)),
        "refresh_cache": lambda: ran.append(("refresh_cache", None)),
        "storage": Storage(),
        "uploaded_path": "uploads/avatar.png",
        "ran": ran,
    }


@pytest.fixture
def app(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, Any]]:
    """Yield a fresh application namespace in a temporary working directory."""
    monkeypatch.chdir(tmp_path)
    engine = sa.create_engine("sqlite:///app.db")
    AppBase.metadata.create_all(engine)
    async_engine = create_async_engine("sqlite+aiosqlite:///app.db", poolclass=NullPool)
    txguard.configure(engine)
    try:
        yield app_namespace(engine, async_engine)
    finally:
        txguard.uninstall()
        _registry._reset_default_for_tests()
        engine.dispose()


def run_block(block: Block, namespace: dict[str, Any]) -> None:
    """Run one block in ``namespace``; expect what its ``# SomeError:`` comments show."""
    source = "\n" * (block.line - 1) + block.code  # tracebacks show the file's line numbers
    # dont_inherit: the snippet is compiled as a file of its own, without this module's
    # `from __future__ import annotations` (SQLAlchemy would look its annotations up by module).
    flags = ast.PyCF_ALLOW_TOP_LEVEL_AWAIT
    code = compile(source, str(block.path), "exec", flags=flags, dont_inherit=True)
    shown = [getattr(txguard, name) for name in _SHOWS.findall(block.code) if hasattr(txguard, name)]
    errors = tuple(c for c in shown if issubclass(c, BaseException))
    warnings_ = tuple(c for c in shown if issubclass(c, Warning))

    def run() -> None:
        result = eval(code, namespace)  # noqa: S307 - the README's own code
        if inspect.iscoroutine(result):
            asyncio.run(_finish(result, namespace))

    if errors:
        with pytest.raises(errors):
            run()
    elif warnings_:
        with pytest.warns(warnings_):
            run()
    else:
        run()


async def _finish(main: Any, namespace: dict[str, Any]) -> None:
    try:
        await main
    finally:
        for value in list(namespace.values()):
            if isinstance(value, AsyncEngine):
                await value.dispose()


SECTIONS = readme_sections()
ROOT = README.parent
_LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def _section(heading: str) -> Section:
    (section,) = [s for s in SECTIONS if s.heading == heading]
    return section


@pytest.mark.parametrize("section", SECTIONS, ids=[s.heading for s in SECTIONS])
def test_readme_section_runs(section: Section, app: dict[str, Any]) -> None:
    """Each README section's python blocks run in order, showing the errors they say they show."""
    for block in section.blocks:
        run_block(block, app)


def test_readme_runs_every_python_block() -> None:
    """The README has its quick start as python, and no block is marked not to run."""
    blocks = [block for section in SECTIONS for block in section.blocks]
    assert [block for block in blocks if block.not_run is not None] == []
    assert "Quick start" in [section.heading for section in SECTIONS]


def test_quick_start_commits_the_note(app: dict[str, Any], capsys: pytest.CaptureFixture[str]) -> None:
    """The quick start commits its note to its own SQLite file, then runs its on_commit callback."""
    (block,) = _section("Quick start").blocks
    run_block(block, app)
    assert capsys.readouterr().out == "committed note 1\n"
    assert str(app["engine"].url) == "sqlite:///notes.db"
    with app["engine"].connect() as conn:
        assert conn.execute(sa.select(app["Note"].text)).scalars().all() == ["hello"]


def test_readme_fits_in_12_kb() -> None:
    """A newcomer reads the README in five minutes: at most 12 KB, the rest is in docs/."""
    assert len(README.read_bytes()) <= 12 * 1024


def heading_anchors(path: Path) -> set[str]:
    """Return the anchors of a Markdown file's headings, slugged as MkDocs' toc (and GitHub) do."""
    anchors = set()
    fenced = False
    for line in path.read_text().splitlines():
        if line.lstrip().startswith("```"):
            fenced = not fenced
        elif not fenced and re.match(r"#{1,6} ", line):
            title = re.sub(r"[^\w\s-]", "", line.lstrip("#").strip()).strip().lower()
            anchors.add(re.sub(r"[-\s]+", "-", title))
    return anchors


def readme_links() -> list[str]:
    """Return the README's relative link targets (``docs/x.md#anchor``), in order."""
    return [target for target in _LINK.findall(README.read_text()) if "://" not in target]


def test_readme_links_resolve_inside_the_repository() -> None:
    """Every relative link of the README names a file of the checkout, and its anchor a heading there."""
    links = readme_links()
    assert len(links) >= 20
    broken = []
    for target in links:
        path, _, anchor = target.partition("#")
        resolved = (ROOT / path).resolve()
        if not resolved.is_relative_to(ROOT) or not resolved.is_file():
            broken.append(target)
        elif anchor and anchor not in heading_anchors(resolved):
            broken.append(target)
    assert broken == []


def test_readme_links_every_feature_page() -> None:
    """The feature list links each feature and recipe page of the docs site."""
    linked = {(ROOT / target.partition("#")[0]).resolve() for target in readme_links()}
    pages = [*(ROOT / "docs" / "features").glob("*.md"), *(ROOT / "docs" / "recipes").glob("*.md")]
    assert pages and [page.name for page in pages if page.resolve() not in linked] == []


def _make_targets() -> set[str]:
    makefile = (ROOT / "Makefile").read_text()
    return set(re.findall(r"^([a-z][\w-]*):", makefile, re.MULTILINE))


def test_the_two_commands_are_makefile_targets() -> None:
    """The README's two commands are `make demo` and `make test`, and the Makefile has both."""
    text = README.read_text()
    fence = text.index("```bash", text.index("## The two commands"))
    commands = re.findall(r"^make (\S+)", text[fence : text.index("```\n", fence + 3)], re.MULTILINE)
    assert commands == ["demo", "test"]
    assert set(commands) <= _make_targets()


def test_every_make_target_the_readme_names_exists() -> None:
    """Each `make X` the README mentions is a Makefile target."""
    named = set(re.findall(r"(?:`|^)make ([a-z][\w-]*)", README.read_text(), re.MULTILINE))
    assert named >= {"demo", "test", "docs"}
    assert named - _make_targets() == set()


def test_readme_says_how_to_open_the_docs() -> None:
    """The README's way to open the docs matches where mkdocs.yml builds them, as plain files."""
    mkdocs = (ROOT / "mkdocs.yml").read_text()
    assert re.search(r"^site_dir: site$", mkdocs, re.MULTILINE)
    assert re.search(r"^use_directory_urls: false", mkdocs, re.MULTILINE)
    assert "`make docs`" in _section_text("Documentation") and "`site/index.html`" in _section_text("Documentation")


def _section_text(heading: str) -> str:
    text = README.read_text()
    start = text.index(f"## {heading}\n")
    end = text.find("\n## ", start + 1)
    return text[start : end if end != -1 else None]


def _make_dry_run(*args: str) -> str:
    result = subprocess.run(["make", "-n", "test", *args], cwd=ROOT, capture_output=True, text=True, check=True)
    return result.stdout


def test_narrowed_make_test_skips_the_coverage_gate() -> None:
    """`make test` gates coverage at 90%; `make test PYTEST_ARGS=...` passes them on and reports only."""
    full, narrowed = _make_dry_run(), _make_dry_run("PYTEST_ARGS=tests/test_units.py -x")
    assert "coverage report --fail-under=90" in full
    assert "pytest tests/test_units.py -x" in narrowed and "--fail-under" not in narrowed
