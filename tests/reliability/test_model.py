"""Property-based: random trees of units against a pure model of SPEC sections 2 and 4.

Hypothesis draws programs: trees of units with random propagation values, writes, on_commit
registrations, raise points, and catch points (a unit whose exception its parent catches).
A pure model, written from the SPEC and knowing nothing of txguard or SQLAlchemy, predicts
which rows survive, which callbacks run and in what order, which errors are caught where,
what escapes, and how many UncommittedWorkWarnings are emitted. The real run must match.

On SQLite the model also knows the database's single-writer lock: a write while another,
suspended transaction holds the write lock would fail with "database is locked" (a SQLite
limitation, not a txguard one), so the model marks those writes and both runs skip them.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Union

import pytest
import sqlalchemy as sa
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import txguard
from tests.backends import SYNC_URLS, require
from tests.reliability.conftest import FIGURES, RelBase, Row
from tests.reliability.faults import bound_lock_waits

pytestmark = pytest.mark.reliability

PROPAGATIONS = [p.value for p in txguard.Propagation]


# The programs.


@dataclass(frozen=True)
class Insert:
    pass


@dataclass(frozen=True)
class OnCommit:
    pass


@dataclass(frozen=True)
class Raise:
    pass


@dataclass(frozen=True)
class Unit:
    propagation: str
    body: tuple[Step, ...]
    caught: bool  # the parent catches what escapes this unit


Step = Union[Insert, OnCommit, Raise, Unit]

leaves = st.sampled_from([Insert(), Insert(), Insert(), OnCommit(), OnCommit(), Raise()])
# At the top, mandatory and never mostly just fail at once: draw them less often there.
TOP_PROPAGATIONS = [*PROPAGATIONS, "required", "requires_new", "nested", "supports"]


def _units(
    children: st.SearchStrategy[Step], propagations: list[str] = PROPAGATIONS
) -> st.SearchStrategy[Unit]:
    return st.builds(
        Unit,
        st.sampled_from(propagations),
        st.lists(children, max_size=4).map(tuple),
        st.booleans(),
    )


steps = st.recursive(leaves, _units, max_leaves=16)
programs = st.lists(_units(steps, TOP_PROPAGATIONS), min_size=1, max_size=3)


class Boom(Exception):
    """The exception a Raise step raises."""


# The model.


@dataclass(eq=False)
class Tx:
    """A transaction (root), a SAVEPOINT, or a commit-as-you-go session outside any transaction."""

    kind: str  # "root", "savepoint", "cayg"
    parent: Tx | None = None
    rows: list[str] = field(default_factory=list)
    callbacks: list[str] = field(default_factory=list)
    rollback_only: bool = False
    began: bool = False  # cayg: the session has autobegun (it wrote)
    locked: bool = False  # root/cayg: holds SQLite's write lock (it wrote)

    @property
    def root(self) -> Tx:
        return self if self.parent is None else self.parent.root


@dataclass(eq=False)
class Frame:
    tx: Tx
    kind: str  # "root", "join", "savepoint"

    @property
    def transactional(self) -> bool:
        return self.tx.kind != "cayg"


class ModelError(Exception):
    def __init__(self, name: str) -> None:
        self.name = name


@dataclass
class Outcome:
    rows: set[str] = field(default_factory=set)
    ran: list[str] = field(default_factory=list)
    events: list[str] = field(default_factory=list)  # caught errors, and what escaped each program unit
    warnings: int = 0
    skipped: set[str] = field(default_factory=set)


class Model:
    """What SPEC sections 2 and 4 say a program does."""

    def __init__(self, sqlite: bool) -> None:
        self.sqlite = sqlite
        self.out = Outcome()
        self.live_roots: list[Tx] = []

    def run(self, program: list[Unit]) -> Outcome:
        for n, unit in enumerate(program):
            try:
                self.unit(unit, None, str(n))
            except ModelError as err:
                self.out.events.append(f"escaped {err.name}")
            else:
                self.out.events.append("returned")
        return self.out

    def unit(self, unit: Unit, current: Frame | None, path: str) -> None:
        active = current if current is not None and current.transactional else None
        p = unit.propagation
        frame: Frame | None
        if p == "required":
            frame = Frame(active.tx, "join") if active else self.begin("root")
        elif p == "requires_new":
            frame = self.begin("root")
        elif p == "nested":
            frame = Frame(Tx("savepoint", parent=active.tx), "savepoint") if active else self.begin("root")
        elif p == "mandatory":
            if active is None:
                raise ModelError("TransactionRequiredError")
            frame = Frame(active.tx, "join")
        elif p == "never":
            if active is not None:
                raise ModelError("TransactionNotAllowedError")
            frame = None
        elif p == "supports":
            frame = Frame(current.tx, "join") if current else self.begin("cayg")
        else:  # not_supported
            frame = self.begin("cayg")
        error: ModelError | None = None
        try:
            self.body(unit.body, frame or current, path)
        except ModelError as err:
            error = err
        self.settle(frame, error)

    def begin(self, kind: str) -> Frame:
        tx = Tx(kind)
        self.live_roots.append(tx)
        return Frame(tx, "root")

    def body(self, body: tuple[Step, ...], frame: Frame | None, path: str) -> None:
        for n, step in enumerate(body):
            name = f"{path}.{n}"
            if isinstance(step, Insert):
                if frame is None:
                    raise ModelError("TransactionRequiredError")
                root = frame.tx.root
                if self.sqlite and any(r.locked for r in self.live_roots if r is not root):
                    self.out.skipped.add(name)
                    continue
                frame.tx.rows.append(name)
                root.locked = root.began = True
            elif isinstance(step, OnCommit):
                if frame is None or not (frame.transactional or frame.tx.began):
                    self.out.ran.append(name)
                else:
                    frame.tx.callbacks.append(name)
            elif isinstance(step, Raise):
                raise ModelError("Boom")
            else:
                try:
                    self.unit(step, frame, name)
                except ModelError as err:
                    if not step.caught:
                        raise
                    self.out.events.append(f"caught {err.name} at {name}")

    def settle(self, frame: Frame | None, error: ModelError | None) -> None:
        if frame is None:
            if error:
                raise error
            return
        tx = frame.tx
        if frame.kind == "join":
            if error:
                tx.rollback_only = True
                raise error
            return
        if frame.kind == "savepoint":
            parent = tx.parent
            assert parent is not None  # noqa: S101
            if error:
                raise error
            if tx.rollback_only:
                raise ModelError("UnexpectedRollbackError")
            parent.rows += tx.rows
            parent.callbacks += tx.callbacks
            return
        self.live_roots.remove(tx)
        if tx.kind == "cayg":
            if error is None and tx.began:
                self.out.warnings += 1  # the work it never committed is rolled back
            if error:
                raise error
            return
        if error:
            raise error
        if tx.rollback_only:
            raise ModelError("UnexpectedRollbackError")
        self.out.rows.update(tx.rows)
        self.out.ran.extend(tx.callbacks)


# The real run.


class Real:
    """Run a program with txguard on a real database."""

    def __init__(self, registry: txguard.SessionRegistry, skipped: set[str]) -> None:
        self.registry = registry
        self.skipped = skipped
        self.out = Outcome()

    def run(self, program: list[Unit]) -> Outcome:
        with warnings.catch_warnings(record=True) as record:
            warnings.simplefilter("always")
            for n, unit in enumerate(program):
                try:
                    self.unit(unit, str(n))
                except Exception as exc:
                    self.out.events.append(f"escaped {type(exc).__name__}")
                else:
                    self.out.events.append("returned")
        self.out.warnings = sum(
            1 for w in record if issubclass(w.category, txguard.UncommittedWorkWarning)
        )
        return self.out

    def unit(self, unit: Unit, path: str) -> None:
        with self.registry.unit_of_work(propagation=unit.propagation):
            self.body(unit.body, path)

    def body(self, body: tuple[Step, ...], path: str) -> None:
        for n, step in enumerate(body):
            name = f"{path}.{n}"
            if isinstance(step, Insert):
                if name in self.skipped:
                    continue
                session = self.registry.current_session()
                session.add(Row(name=name))
                session.flush()
            elif isinstance(step, OnCommit):
                self.registry.on_commit(lambda name=name: self.out.ran.append(name))
            elif isinstance(step, Raise):
                raise Boom(name)
            elif step.caught:
                try:
                    self.unit(step, name)
                except Exception as exc:
                    self.out.events.append(f"caught {type(exc).__name__} at {name}")
            else:
                self.unit(step, name)


# The property, on SQLite and PostgreSQL.


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def model_engine(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[sa.Engine]:
    """Yield an engine with the suite's tables, shared by every example of the module."""
    backend: str = request.param
    require(backend)
    if backend == "sqlite":
        path = tmp_path_factory.mktemp("model") / "model.db"
        # A lock conflict the model missed fails at once instead of after 5 s.
        engine = sa.create_engine(f"sqlite:///{path}", connect_args={"timeout": 0.5})
    else:
        engine = sa.create_engine(SYNC_URLS[backend])
        sa.event.listen(engine, "connect", bound_lock_waits)
    RelBase.metadata.create_all(engine)
    yield engine
    RelBase.metadata.drop_all(engine)
    engine.dispose()


EXAMPLES = {"sqlite": 300, "postgresql": 150}
_stats: dict[str, dict[str, int]] = {}


def test_unit_trees_match_the_model(model_engine: sa.Engine) -> None:
    """Rows, callbacks, caught and escaping errors, and warnings match the pure model."""
    backend = model_engine.dialect.name
    stats = _stats.setdefault(backend, {"programs": 0, "units": 0, "rows": 0, "callbacks": 0})

    @settings(
        max_examples=EXAMPLES[backend],
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
    )
    @given(program=programs)
    def check(program: list[Unit]) -> None:
        with model_engine.begin() as conn:
            conn.execute(sa.delete(Row))
        expected = Model(sqlite=backend == "sqlite").run(program)
        registry = txguard.SessionRegistry(model_engine)
        actual = Real(registry, expected.skipped).run(program)
        with model_engine.connect() as conn:
            actual.rows = set(conn.scalars(sa.select(Row.name)))
        assert actual.events == expected.events
        assert actual.rows == expected.rows
        assert actual.ran == expected.ran
        assert actual.warnings == expected.warnings
        assert model_engine.pool.checkedout() == 0
        stats["programs"] += 1
        stats["units"] += _count_units(program)
        stats["rows"] += len(expected.rows)
        stats["callbacks"] += len(expected.ran)

    check()
    FIGURES[f"model[{backend}]"] = dict(stats)


def _count_units(steps: list[Unit] | tuple[Step, ...]) -> int:
    return sum(1 + _count_units(s.body) for s in steps if isinstance(s, Unit))
