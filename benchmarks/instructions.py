"""txguard's overhead in instructions per transaction, counted by callgrind in one process.

Wall-clock ratios on a shared VM spread by several percent between processes, so they
cannot judge a 1% budget; an instruction count can. This script runs every variant in one
process under ``valgrind --tool=callgrind --instr-atstart=no``: each variant's loop is
bracketed by callgrind client requests (a ten-line C shim built here from valgrind's
``callgrind.h`` and loaded with ctypes), and the variants are interleaved A B C … C B A so
that whatever the process does over time (caches warming, allocator state) hits them alike.

Run ``make bench-instructions`` (or ``python benchmarks/instructions.py``): it re-executes
itself under ``setarch -R valgrind`` with a fixed ``PYTHONHASHSEED`` and prints a Markdown
table with each row's budget and whether it holds. ``--seeds 0,1,2`` measures one process
per hash seed (the layout a seed gives moves a count by ~1%) and shows each figure's median
over them, with the differences seed by seed; ``--json FILE`` also writes the numbers
(the table in docs/performance.md is made from them), ``--keep DIR`` keeps the callgrind dumps for
``callgrind_annotate``, and ``--check`` exits with 1 when a budget does not hold.
"""

from __future__ import annotations

import argparse
import asyncio
import contextvars
import ctypes
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncSession, create_async_engine
from sqlalchemy.orm import Session

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import txguard  # noqa: E402
from overhead import SELECT_1, Base, Row, hand_written_select  # noqa: E402  (the timed benchmark's tables)

SHIM = r"""
#include <valgrind/callgrind.h>
void txg_start(void) { CALLGRIND_START_INSTRUMENTATION; }
void txg_zero(void) { CALLGRIND_ZERO_STATS; }
void txg_toggle(void) { CALLGRIND_TOGGLE_COLLECT; }
void txg_dump(const char *name) { CALLGRIND_DUMP_STATS_AT(name); }
"""

HEADER_HELP = (
    "valgrind's client-request header valgrind/callgrind.h was not found: install it with "
    "`apt-get install valgrind` (Debian, Ubuntu), `dnf install valgrind-devel` (Fedora) or "
    "`brew install valgrind`, or point CPATH at the folder holding valgrind/"
)


@dataclass(frozen=True)
class Budget:
    """What a variant may cost: a ratio to the row's baseline, or instructions more than it."""

    ratio: float | None = None
    plus: float | None = None

    def holds(self, ratio: float, difference: float) -> bool:
        if self.ratio is not None:
            return ratio <= self.ratio
        return self.plus is not None and difference <= self.plus

    def __str__(self) -> str:
        return f"≤ {self.ratio:.2f}x" if self.ratio is not None else f"≤ +{self.plus:,.0f}"


@dataclass(frozen=True)
class Variant:
    name: str
    run: Callable[[], None]
    budget: Budget | None = None


@dataclass(frozen=True)
class Comparison:
    """One table row: its first variant is the baseline the others are compared with."""

    title: str
    variants: list[Variant]


def build_shim(folder: Path) -> ctypes.CDLL:
    """Compile the client-request shim and load it."""
    source = folder / "shim.c"
    library = folder / "shim.so"
    source.write_text(SHIM)
    built = subprocess.run(["cc", "-O1", "-shared", "-fPIC", "-o", str(library), str(source)],
                           capture_output=True, text=True)
    if built.returncode:
        sys.exit(f"{built.stderr}\n{HEADER_HELP}" if "callgrind.h" in built.stderr else built.stderr)
    shim = ctypes.CDLL(str(library))
    shim.txg_dump.argtypes = [ctypes.c_char_p]
    return shim


def header_found() -> bool:
    """Say whether the C compiler finds valgrind/callgrind.h (checked before valgrind starts)."""
    probe = subprocess.run(["cc", "-E", "-x", "c", "-"], input="#include <valgrind/callgrind.h>\n",
                           capture_output=True, text=True)
    return probe.returncode == 0


def sync_rows() -> list[Comparison]:
    """The rows on SQLite memory; both sides run on the same txguard-registered engine."""
    plain = sa.create_engine("sqlite://")
    engine = sa.create_engine("sqlite://")
    Base.metadata.create_all(engine)
    registry = txguard.SessionRegistry(engine)
    one_percent = Budget(ratio=1.01)
    raw_select = hand_written_select(engine)

    @registry.transactional
    def tx_select() -> None:
        registry.current_session().execute(SELECT_1)

    def uow_select() -> None:
        with registry.unit_of_work() as s:
            s.execute(SELECT_1)

    def raw_insert() -> None:
        with Session(engine) as s, s.begin():
            s.add(Row(name="x"))

    def uow_insert() -> None:
        with registry.unit_of_work() as s:
            s.add(Row(name="x"))

    @registry.transactional
    def tx_insert() -> None:
        registry.current_session().add(Row(name="x"))

    def raw_two_functions() -> None:
        def inner(s: Session) -> None:
            s.execute(SELECT_1)

        with Session(engine) as s, s.begin():
            s.execute(SELECT_1)
            inner(s)

    @registry.transactional
    def joined_inner() -> None:
        registry.current_session().execute(SELECT_1)

    def uow_joined() -> None:
        with registry.unit_of_work() as s:
            s.execute(SELECT_1)
            joined_inner()

    return [
        Comparison("SELECT 1", [Variant("hand-written", raw_select),
                                Variant("@transactional", tx_select, one_percent),
                                Variant("unit_of_work()", uow_select, one_percent)]),
        Comparison("ORM insert", [Variant("hand-written", raw_insert),
                                  Variant("@transactional", tx_insert, one_percent),
                                  Variant("unit_of_work()", uow_insert, one_percent)]),
        Comparison("REQUIRED join (2 SELECT 1)", [
            Variant("hand-written, one session", raw_two_functions),
            Variant("unit_of_work() + joined @transactional", uow_joined, Budget(plus=2000))]),
        Comparison("SELECT 1, hand-written, the engine itself", [
            Variant("plain engine", hand_written_select(plain)),
            Variant("engine given to txguard", raw_select)]),
    ]


class _Where:
    __slots__ = ("code", "offset")

    def __init__(self, code: object, offset: int) -> None:
        self.code = code
        self.offset = offset


class _Frame:
    __slots__ = ("where", "previous", "thread", "state", "transaction", "token")


class _Transaction:
    __slots__ = ("where", "parent", "session", "begun", "state", "callbacks", "failures")

    def __init__(self, where: _Where, session: Session) -> None:
        self.where = where
        self.parent = None
        self.session = session
        self.state = 1
        self.callbacks = ()
        self.failures = ()


class _SealedSession(Session):
    pass


def floor_rows() -> list[Comparison]:
    """What the pieces a unit is made of cost, written inline with no call and no check.

    A minimal unit (a context variable set around a begin-once session) costs less than the
    hand-written code, whose two ``with`` exits cost more than ``commit()`` and ``close()``;
    the next variant adds the three objects a unit needs (its frame, where it was opened,
    its transaction), the last the seal that makes a kept session refuse its next
    transaction. What a real unit costs above the last is its calls and its checks.
    """
    engine = sa.create_engine("sqlite://")
    registry = txguard.SessionRegistry(engine)
    stack: contextvars.ContextVar[object] = contextvars.ContextVar("floor", default=None)

    def minimal() -> None:
        stack.get()
        s = Session(engine)
        begun = s.begin()
        token = stack.set(s)
        s.execute(SELECT_1)
        stack.reset(token)
        begun.commit()
        s.close()

    def with_objects(seal: bool) -> Callable[[], None]:
        def unit() -> None:
            caller = sys._getframe(0)
            frame = _Frame()
            frame.where = _Where(caller.f_code, caller.f_lasti)
            del caller
            frame.previous = stack.get()
            frame.thread = threading.get_ident()
            s = Session(engine)
            tx = frame.transaction = _Transaction(frame.where, s)
            tx.begun = s.begin()
            frame.token = stack.set(frame)
            frame.state = 1
            s.execute(SELECT_1)
            frame.state = 2
            stack.reset(frame.token)
            tx.begun.commit()
            tx.state = 3
            s.close()
            if seal:
                s.__class__ = _SealedSession
                s._txguard_closed_by = frame.where  # type: ignore[attr-defined]

        return unit

    def uow_select() -> None:
        with registry.unit_of_work() as s:
            s.execute(SELECT_1)

    return [Comparison("SELECT 1, the floor of a unit", [
        Variant("hand-written", hand_written_select(engine)),
        Variant("a context variable around a session", minimal),
        Variant("+ the frame, its origin, its transaction", with_objects(seal=False)),
        Variant("+ the seal", with_objects(seal=True)),
        Variant("unit_of_work()", uow_select)])]


def async_rows(loop: asyncio.AbstractEventLoop) -> list[Comparison]:
    """aiosqlite end to end: a plain engine, and hand-written code and a unit on a registry's.

    The plain engine is ``create_async_engine("sqlite+aiosqlite://")`` never given to
    txguard: it sends no BEGIN before a SELECT (the driver's legacy mode), so its savepoints
    are not undone by a rollback. The middle variant splits the gap into what txguard does
    to the engine (the real BEGIN) and what the unit costs on top.
    """
    plain = create_async_engine("sqlite+aiosqlite://")
    guarded = create_async_engine("sqlite+aiosqlite://")
    registry = txguard.SessionRegistry(guarded)

    async def raw_plain() -> None:
        async with AsyncSession(plain) as s, s.begin():
            await s.execute(SELECT_1)

    async def raw_guarded() -> None:
        async with AsyncSession(guarded) as s, s.begin():
            await s.execute(SELECT_1)

    async def uow() -> None:
        async with registry.unit_of_work() as s:
            await s.execute(SELECT_1)

    @registry.transactional
    async def tx() -> None:
        await registry.current_session().execute(SELECT_1)

    def driven(fn: Callable[[], Awaitable[None]]) -> Callable[[], None]:
        return lambda: loop.run_until_complete(fn())

    end_to_end = Budget(ratio=1.05)
    return [Comparison("aiosqlite SELECT 1, end to end", [
        Variant("plain aiosqlite engine", driven(raw_plain)),
        Variant("hand-written, engine given to txguard", driven(raw_guarded)),
        Variant("unit_of_work()", driven(uow), end_to_end),
        Variant("async @transactional", driven(tx), end_to_end)])]


def guard_rows() -> list[Comparison]:
    """Guards installed: units against hand-written code, both under the same guards."""
    engine = sa.create_engine("sqlite://")
    registry = txguard.SessionRegistry(engine)

    def uow_select() -> None:
        with registry.unit_of_work() as s:
            s.execute(SELECT_1)

    return [Comparison("SELECT 1, every guard at \"warn\"", [
        Variant("hand-written", hand_written_select(engine)),
        Variant("unit_of_work()", uow_select, Budget(ratio=1.01))])]


def measure(shim: ctypes.CDLL, rows: list[Comparison], rounds: int, batch: int) -> None:
    """Run each row's variants interleaved; each loop is one callgrind dump."""
    for row in rows:
        order = list(row.variants)
        for variant in order:  # warm up: caches, specialisation, the pool
            for _ in range(batch // 4 or 1):
                variant.run()
        for r in range(rounds):
            for variant in order:
                shim.txg_zero()
                shim.txg_toggle()
                for _ in range(batch):
                    variant.run()
                shim.txg_toggle()
                shim.txg_dump(f"{row.title}|{variant.name}|{r}".encode())
            order.reverse()


def child(args: argparse.Namespace) -> None:
    folder = Path(args.workdir)
    shim = build_shim(folder)
    loop = asyncio.new_event_loop()

    def chosen(rows: list[Comparison]) -> list[Comparison]:
        return [row for row in rows if row.title.startswith(tuple(args.only.split("|")))]

    rows = chosen(sync_rows()) + chosen(floor_rows()) + chosen(async_rows(loop))
    guards = chosen(guard_rows())
    shim.txg_start()
    measure(shim, rows, args.rounds, args.batch)
    txguard.install(mixed_begin="warn", leaks="warn", cross_thread="warn", cross_task="warn")
    try:
        measure(shim, guards, args.rounds, args.batch)
    finally:
        txguard.uninstall()
    loop.close()
    meta = [{"row": row.title, "variants": [[v.name, None if v.budget is None else
                                              [v.budget.ratio, v.budget.plus]] for v in row.variants]}
            for row in rows + guards]
    (folder / "rows.json").write_text(json.dumps(meta))


_DESC = re.compile(r"^desc: Trigger: Client Request: (.*)$", re.M)
_TOTALS = re.compile(r"^(?:totals|summary): (\d+)", re.M)


def collect(folder: Path, batch: int) -> dict[tuple[str, str], list[float]]:
    """Read the dumps: instructions per transaction, per (row, variant), one per round."""
    counts: dict[tuple[str, str], list[float]] = {}
    for dump in folder.glob("callgrind.out*"):
        text = dump.read_text(errors="replace")
        desc, totals = _DESC.search(text), _TOTALS.search(text)
        if not desc or not totals or "|" not in desc.group(1):
            continue
        title, name, _ = desc.group(1).rsplit("|", 2)
        counts.setdefault((title, name), []).append(int(totals.group(1)) / batch)
    return counts


def tabulate(rows: list[dict[str, Any]], runs: list[dict[tuple[str, str], list[float]]]) -> list[dict[str, Any]]:
    """One entry per variant: its least count over the rounds, ratio, difference, budget.

    With several runs (one per hash seed) each figure is the median over the runs; a ratio
    and a difference are taken within a run, against the baseline measured beside it.
    """
    table: list[dict[str, Any]] = []
    for row in rows:
        title = row["row"]
        bases = [min(counts[(title, row["variants"][0][0])]) for counts in runs]
        for name, limits in row["variants"]:
            values = [min(counts[(title, name)]) for counts in runs]
            differences = [value - base for value, base in zip(values, bases)]
            ratio = statistics.median(value / base for value, base in zip(values, bases))
            difference = statistics.median(differences)
            budget = None if limits is None else Budget(*limits)
            table.append({
                "row": title, "variant": name, "instructions": round(statistics.median(values)),
                "ratio": round(ratio, 4), "difference": round(difference),
                "per_seed": [round(value) for value in values],
                "differences_per_seed": [round(d) for d in differences],
                "rounds_within": max(round((max(counts[(title, name)]) - value) / value, 5)
                                     for counts, value in zip(runs, values)),
                "budget": None if budget is None else str(budget),
                "holds": None if budget is None else budget.holds(ratio, difference),
            })
    return table


def markdown(table: list[dict[str, Any]]) -> str:
    """The table as docs/performance.md shows it, with the differences seed by seed if several."""
    several = len(table[0]["per_seed"]) > 1
    lines = ["| row | variant | instructions | ratio | difference | budget | holds |"
             + (" difference per seed |" if several else ""),
             "| --- | --- | ---: | ---: | ---: | --- | --- |" + (" ---: |" if several else "")]
    previous = None
    for entry in table:
        title = entry["row"] if entry["row"] != previous else ""
        previous = entry["row"]
        holds = "" if entry["holds"] is None else "yes" if entry["holds"] else "**no**"
        per_seed = ", ".join(f"{d:+,}" for d in entry["differences_per_seed"])
        lines.append(f"| {title} | {entry['variant']} | {entry['instructions']:,} | "
                     f"{entry['ratio']:.3f} | {entry['difference']:+,} | {entry['budget'] or ''} | {holds} |"
                     + (f" {per_seed} |" if several else ""))
    return "\n".join(lines)


def run(args: argparse.Namespace, seed: str, folder: Path) -> dict[tuple[str, str], list[float]]:
    """Measure one process under callgrind with this hash seed; its counts per variant."""
    command = [
        "valgrind", "--tool=callgrind", "--instr-atstart=no", "--collect-atstart=no",
        f"--callgrind-out-file={folder}/callgrind.out.%p",
        sys.executable, __file__, "--child", "--workdir", str(folder),
        "--rounds", str(args.rounds), "--batch", str(args.batch), "--only", args.only,
    ]
    if shutil.which("setarch"):
        command = ["setarch", os.uname().machine, "-R", *command]
    env = {**os.environ, "PYTHONHASHSEED": seed}
    subprocess.run(command, check=True, env=env, stderr=subprocess.DEVNULL)
    return collect(folder, args.batch)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds per row")
    parser.add_argument("--batch", type=int, default=200, help="transactions per loop")
    parser.add_argument("--seeds", "--seed", default="0",
                        help="PYTHONHASHSEED of the measured process; several, comma-separated "
                             "(0,1,2), measure one process each and show the medians")
    parser.add_argument("--json", help="also write the numbers to this file")
    parser.add_argument("--keep", help="keep the callgrind dumps in this folder")
    parser.add_argument("--only", default="", help="run only the rows whose title begins with this text, or with "
                             "one of several separated by | ('SELECT 1|REQUIRED': the sync rows)")
    parser.add_argument("--check", action="store_true", help="exit with 1 when a budget does not hold")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--workdir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return 0
    if shutil.which("valgrind") is None:
        sys.exit("valgrind is needed: apt-get install valgrind (dnf install valgrind valgrind-devel)")
    if not header_found():
        sys.exit(HEADER_HELP)
    seeds = args.seeds.split(",")
    with tempfile.TemporaryDirectory() as scratch:
        runs = []
        for seed in seeds:  # one after the other: a count does not depend on the load, but the wait does
            folder = Path(args.keep or scratch) / f"seed{seed}"
            folder.mkdir(parents=True, exist_ok=True)
            runs.append(run(args, seed, folder))
        table = tabulate(json.loads((folder / "rows.json").read_text()), runs)
    print(f"instructions per transaction (callgrind, Python {platform.python_version()}, "
          f"SQLAlchemy {sa.__version__}, PYTHONHASHSEED={args.seeds}, {args.rounds} rounds x {args.batch}, "
          f"the least round of each{', the median over the seeds' if len(seeds) > 1 else ''})\n")
    print(markdown(table))
    if args.json:
        Path(args.json).write_text(json.dumps({
            "python": platform.python_version(), "sqlalchemy": sa.__version__, "seeds": seeds,
            "rounds": args.rounds, "batch": args.batch, "rows": table}, indent=2))
    return 1 if args.check and any(entry["holds"] is False for entry in table) else 0


if __name__ == "__main__":
    sys.exit(main())
