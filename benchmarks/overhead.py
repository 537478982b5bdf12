"""txguard's overhead per transaction, as a ratio to hand-written SQLAlchemy in the same run.

Run with `make bench` (or `python benchmarks/overhead.py --quick`). Variants of one row are
timed in interleaved rounds (A B C, C B A, ...) so that drift of the machine hits them
alike; each round times a batch of transactions. We report the median and the min-max of
the per-transaction time, and the ratio to the row's baseline: the median over rounds of
the variant's time divided by the baseline's in the same round. Rows run in several fresh
processes (see pool_processes); "per process" gives the min-max of each process's own ratio.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import sqlalchemy as sa
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import txguard  # noqa: E402


class Base(DeclarativeBase):
    pass


class Row(Base):
    __tablename__ = "bench_rows"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(sa.String(20))


SELECT_1 = sa.text("SELECT 1")


@dataclass
class Case:
    """One table row: a baseline and the txguard variants compared with it."""

    title: str
    budget: float | None
    variants: dict[str, Callable[[], None]]
    results: dict[str, list[float]] = field(default_factory=dict)
    layouts: dict[str, list[float]] = field(default_factory=dict)  # the ratio in each process
    finish: Callable[[], None] | None = None  # undo process-wide machinery after the row


def time_batch(fn: Callable[[], None], batch: int) -> float:
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        start = time.perf_counter()
        for _ in range(batch):
            fn()
        return (time.perf_counter() - start) / batch
    finally:
        if gc_was_enabled:
            gc.enable()


def run_case(case: Case, rounds: int, batch: int) -> None:
    for fn in case.variants.values():
        time_batch(fn, max(10, batch // 10))
    case.results = {name: [] for name in case.variants}
    order = list(case.variants.items())
    for _ in range(rounds):
        for name, fn in order:
            case.results[name].append(time_batch(fn, batch))
        order.reverse()  # A B C, C B A, ...: no variant always runs right after another
    if case.finish is not None:
        case.finish()


def ratio(case: Case, name: str) -> float:
    """Median over rounds of the variant's time divided by the baseline's in the same round.

    Pairing each round with its own baseline cancels the machine's slow drift (and the
    bursts of a shared host) that a ratio of two medians would keep.
    """
    return paired_ratio(case.results[next(iter(case.variants))], case.results[name])


def paired_ratio(base: list[float], samples: list[float]) -> float:
    return statistics.median(t / b for t, b in zip(samples, base))


def report(cases: list[Case]) -> list[tuple[str, str, float, float | None]]:
    """Print the table; return (row, variant, ratio, budget) for every non-baseline variant."""
    ratios = []
    print(f"| {'row':<44} | {'variant':<26} | {'median µs':>9} | {'min–max µs':>15} | {'ratio':>6} "
          f"| {'per process':>11} | budget |")
    print(f"|{'-' * 46}|{'-' * 28}|{'-' * 11}|{'-' * 17}|{'-' * 8}|{'-' * 13}|--------|")
    for case in cases:
        names = list(case.variants)
        for name in names:
            samples = case.results[name]
            median = statistics.median(samples)
            paired = ratio(case, name)
            budget = "" if name == names[0] or case.budget is None else f"≤ {case.budget:.2f}"
            layouts = case.layouts.get(name, [])
            spread = f"{min(layouts):.3f}–{max(layouts):.3f}" if len(layouts) > 1 else ""
            print(
                f"| {case.title if name == names[0] else '':<44} | {name:<26} | {median * 1e6:9.1f} | "
                f"{min(samples) * 1e6:6.1f}–{max(samples) * 1e6:<8.1f} | {paired:6.3f} | {spread:>11} "
                f"| {budget:<6} |"
            )
            if name != names[0]:
                ratios.append((case.title, name, paired, case.budget))
    return ratios


def hand_written_select(engine: sa.Engine) -> Callable[[], None]:
    """The baseline of the SELECT 1 rows: one transaction written with SQLAlchemy alone."""

    def select() -> None:
        with Session(engine) as s, s.begin():
            s.execute(SELECT_1)

    return select


def unit_cases(engine: sa.Engine, label: str, registry: txguard.SessionRegistry) -> list[Case]:
    """The sync rows on one engine: bare units, nested joins, savepoints, Core connections."""
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

    @registry.transactional
    def tx_insert() -> None:
        registry.current_session().add(Row(name="x"))

    def uow_insert() -> None:
        with registry.unit_of_work() as s:
            s.add(Row(name="x"))

    def raw_two_functions() -> None:
        def inner(s: Session) -> None:
            s.execute(SELECT_1)

        with Session(engine) as s, s.begin():
            s.execute(SELECT_1)
            inner(s)

    @registry.transactional
    def joined_inner() -> None:
        registry.current_session().execute(SELECT_1)

    @registry.transactional
    def tx_joined() -> None:
        registry.current_session().execute(SELECT_1)
        joined_inner()

    def raw_savepoint() -> None:
        with Session(engine) as s, s.begin():
            with s.begin_nested():
                s.execute(SELECT_1)

    @registry.transactional(propagation="nested")
    def savepoint_inner() -> None:
        registry.current_session().execute(SELECT_1)

    @registry.transactional
    def tx_savepoint() -> None:
        savepoint_inner()

    def raw_core() -> None:
        with engine.begin() as conn:
            conn.execute(SELECT_1)

    def tx_core() -> None:
        with txguard.connect(engine) as conn:
            conn.execute(SELECT_1)

    return [
        Case(
            f"{label}, SELECT 1",
            1.05,
            {"hand-written": raw_select, "@transactional": tx_select, "unit_of_work()": uow_select},
        ),
        Case(
            f"{label}, ORM insert",
            1.02,
            {"hand-written": raw_insert, "@transactional": tx_insert, "unit_of_work()": uow_insert},
        ),
        Case(
            f"{label}, nested REQUIRED join (2 SELECT 1)",
            1.05,
            {"hand-written, one session": raw_two_functions, "@transactional x2": tx_joined},
        ),
        Case(
            f"{label}, savepoint",
            1.05,
            {"begin_nested()": raw_savepoint, 'propagation="nested"': tx_savepoint},
        ),
        Case(
            f"{label}, Core connection",
            1.05,
            {"engine.begin()": raw_core, "txguard.connect()": tx_core},
        ),
    ]


def sqlite_engine() -> tuple[sa.Engine, txguard.SessionRegistry]:
    engine = sa.create_engine("sqlite://")
    Base.metadata.create_all(engine)
    return engine, txguard.SessionRegistry(engine)


def postgresql_engine() -> tuple[sa.Engine, txguard.SessionRegistry] | None:
    url = os.environ.get("TXGUARD_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
    engine = sa.create_engine(url, pool_size=64, max_overflow=0, connect_args={"connect_timeout": 3})
    try:
        with engine.begin() as conn:
            conn.execute(sa.text("DROP TABLE IF EXISTS bench_rows"))
        Base.metadata.create_all(engine)
    except sa.exc.OperationalError as exc:
        print(f"PostgreSQL not reachable ({type(exc.orig).__name__}); its rows are skipped")
        return None
    return engine, txguard.SessionRegistry(engine)


def async_case(url: str, label: str) -> Case:
    """Hand-written async units against @transactional on an AsyncEngine, in one event loop."""
    import asyncio

    from sqlalchemy.ext.asyncio import AsyncSession, create_async_engine

    loop = asyncio.new_event_loop()
    engine = create_async_engine(url)
    registry = txguard.SessionRegistry(engine)

    async def raw() -> None:
        async with AsyncSession(engine) as s, s.begin():
            await s.execute(SELECT_1)

    @registry.transactional
    async def tx() -> None:
        await registry.current_session().execute(SELECT_1)

    return Case(
        f"{label}, async SELECT 1",
        1.05,
        {"hand-written async": lambda: loop.run_until_complete(raw()),
         "async @transactional": lambda: loop.run_until_complete(tx())},
    )


def scale_depth(registry: txguard.SessionRegistry, depths: tuple[int, ...], batch: int) -> None:
    """Time per unit when units join an active one, at several nesting depths."""

    @registry.transactional
    def level(depth: int) -> None:
        registry.current_session().execute(SELECT_1)
        if depth > 1:
            level(depth - 1)

    print("\nnesting depth (REQUIRED joins, SELECT 1 in each): time per unit")
    for depth in depths:
        samples = [time_batch(lambda: level(depth), max(5, batch // depth)) / depth for _ in range(5)]
        print(f"  depth {depth:>3}: {statistics.median(samples) * 1e6:8.1f} µs per unit")


def scale_threads(engine: sa.Engine, registry: txguard.SessionRegistry, counts: tuple[int, ...], total: int) -> None:
    """Time per unit with several threads running units at once (no global lock in txguard)."""
    import threading

    @registry.transactional
    def tx() -> None:
        registry.current_session().execute(SELECT_1)

    raw = hand_written_select(engine)

    def run(fn: Callable[[], None], threads: int) -> float:
        barrier = threading.Barrier(threads + 1)
        units = max(total // threads, 50)  # about the same total work at every count

        def worker() -> None:
            barrier.wait()
            for _ in range(units):
                fn()

        pool = [threading.Thread(target=worker) for _ in range(threads)]
        for t in pool:
            t.start()
        barrier.wait()
        start = time.perf_counter()
        for t in pool:
            t.join()
        return (time.perf_counter() - start) / (threads * units)

    print("\nconcurrent threads on PostgreSQL (SELECT 1 units): wall time per unit")
    for threads in counts:
        raw_runs: list[float] = []
        tx_runs: list[float] = []
        for _ in range(5):  # alternate the two, as the ratio rows do
            raw_runs.append(run(raw, threads))
            tx_runs.append(run(tx, threads))
        raw_t, tx_t = statistics.median(raw_runs), statistics.median(tx_runs)
        print(f"  {threads:>2} threads: hand-written {raw_t * 1e6:7.1f} µs, "
              f"@transactional {tx_t * 1e6:7.1f} µs, ratio {tx_t / raw_t:5.3f}")


def chart(cases: list[Case], path: Path) -> None:
    """Draw the ratios as a bar chart (needs the optional `bench` extra: matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed (pip install -e '.[bench]'); no chart drawn")
        return
    labels, ratios, budgets = [], [], []
    for case in cases:
        names = list(case.variants)
        for name in names[1:]:
            labels.append(f"{case.title}\n{name}")
            ratios.append(ratio(case, name))
            budgets.append(case.budget or 0)
    fig, ax = plt.subplots(figsize=(9, 0.45 * len(labels) + 1.2))
    y = range(len(labels))
    colors = ["tab:green" if r <= b or not b else "tab:red" for r, b in zip(ratios, budgets)]
    ax.barh(list(y), [r - 1 for r in ratios], left=1, color=colors)
    ax.scatter(budgets, list(y), marker="|", s=200, color="black", label="budget")
    ax.axvline(1.0, color="grey", linewidth=0.8)
    ax.set_yticks(list(y), labels, fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("time per transaction, ratio to hand-written SQLAlchemy (1.0 = no overhead)")
    ax.set_title("txguard overhead (median of paired ratios over interleaved rounds)")
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"chart written to {path}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds per process")
    parser.add_argument("--batch", type=int, default=1000)
    parser.add_argument("--processes", type=int, default=12,
                        help="run the ratio rows in this many fresh processes (hash seeds 1, 2, ...) "
                             "and pool their rounds")
    parser.add_argument("--quick", action="store_true", help="fewer rounds, one process, for a smoke run")
    parser.add_argument("--no-postgresql", action="store_true")
    parser.add_argument("--no-scale", action="store_true")
    parser.add_argument("--chart", type=Path, default=Path(__file__).with_name("overhead.png"))
    parser.add_argument("--no-pin", action="store_true", help="do not pin the ratio rows to one CPU")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    rounds, batch = (5, 200) if args.quick else (args.rounds, args.batch)
    processes = 1 if args.quick or args.worker else max(1, args.processes)

    engine, registry = sqlite_engine()
    cases = unit_cases(engine, "SQLite memory", registry)
    cases += extra_cases(engine, registry)
    cases.append(async_case("sqlite+aiosqlite://", "SQLite memory"))
    pg = None if args.no_postgresql else postgresql_engine()
    if pg is not None:
        cases += unit_cases(pg[0], "PostgreSQL loopback", pg[1])[:2]
        url = pg[0].url.set(drivername="postgresql+asyncpg").render_as_string(hide_password=False)
        cases.append(async_case(url, "PostgreSQL loopback"))

    if processes == 1:
        unpin = (lambda: None) if args.no_pin else pin_to_one_cpu()
        for case in cases:
            run_case(case, rounds, batch)
        unpin()
    else:
        pool_processes(cases, processes, argv if argv is not None else sys.argv[1:])
    if args.worker:
        print("\n" + json.dumps({case.title: case.results for case in cases}))
        return 0

    pinned = "" if args.no_pin else ", pinned to one CPU"
    print(f"\ntxguard overhead: {processes} process(es) x {rounds} interleaved rounds x {batch} "
          f"transactions, Python {sys.version.split()[0]}, SQLAlchemy {sa.__version__}, "
          f"{os.cpu_count()} cores{pinned}\n")
    ratios = report(cases)
    over = [r for r in ratios if r[3] is not None and r[2] > r[3]]
    print()
    for title, name, value, budget in over:
        print(f"over budget: {title} / {name}: {value:.3f} > {budget}")
    if not over:
        print("every row within budget")
    chart(cases, args.chart)

    if not args.no_scale:
        scale_depth(registry, (1, 4, 16, 64), batch)
        if pg is not None:
            scale_threads(pg[0], pg[1], (1, 8, 64), max(20, batch * 2))
    if pg is not None:
        with pg[0].begin() as conn:
            conn.execute(sa.text("DROP TABLE IF EXISTS bench_rows"))
        pg[0].dispose()
    return 0


def pool_processes(cases: list[Case], processes: int, argv: list[str]) -> None:
    """Run every ratio row in ``processes`` fresh interpreters and pool their rounds.

    Where a process's strings and types land in memory (which its hash seed decides) sets
    which attribute lookups collide in CPython's type cache, and that shifts a row by a
    few percent for the process's whole life: more rounds in one process cannot average it
    out, more processes do. Process n runs with PYTHONHASHSEED=n, so a rerun draws the same
    layouts; rounds stay paired with the baseline of their own process.
    """
    for case in cases:
        case.results = {name: [] for name in case.variants}
        case.layouts = {name: [] for name in case.variants}
    for number in range(1, processes + 1):
        print(f"process {number} of {processes} ...", file=sys.stderr, flush=True)
        done = subprocess.run(
            [sys.executable, __file__, *argv, "--worker", "--no-scale"],
            capture_output=True, text=True, check=True,
            env={**os.environ, "PYTHONHASHSEED": str(number)},
        )
        measured = json.loads(done.stdout.splitlines()[-1])  # after any notes the rows print
        for case in cases:
            base = measured[case.title][next(iter(case.variants))]
            for name, samples in measured[case.title].items():
                case.results[name].extend(samples)
                case.layouts[name].append(paired_ratio(base, samples))


def pin_to_one_cpu() -> Callable[[], None]:
    """Pin this process to one CPU while the ratio rows run; return the undo.

    A migration between CPUs costs the interpreter its warm caches, which shows up as
    noise of a few percent, the size of the budgets. The scale rows run unpinned.
    """
    if not hasattr(os, "sched_setaffinity"):
        return lambda: None
    cpus = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {max(cpus)})
    return lambda: os.sched_setaffinity(0, cpus)


def extra_cases(engine: sa.Engine, registry: txguard.SessionRegistry) -> list[Case]:
    """Rows that switch on process-wide machinery (guards, leak detector).

    Each variant switches the machinery on (or off) at its first call of a batch, so the
    cost is amortised over the batch and every other row runs without it.
    """
    return [sqlite_begin_case(engine), guards_case(engine), leak_detector_case(engine)]


def sqlite_begin_case(engine: sa.Engine) -> Case:
    """What txguard's SQLite BEGIN costs the application's own, hand-written transactions.

    Every other SQLite row runs both sides on the engine given to txguard, so this cost is
    in their baselines, not in their ratios; this row shows it against a plain engine
    (whose driver sends no BEGIN before a SELECT, and whose savepoints are not safe).
    """
    plain = sa.create_engine("sqlite://")
    plain_select, recipe_select = hand_written_select(plain), hand_written_select(engine)

    return Case(
        "SQLite memory, SELECT 1, hand-written code on txguard's engine",
        1.05,
        {"plain engine": plain_select, "engine given to txguard": recipe_select},
        finish=plain.dispose,
    )


def guards_case(engine: sa.Engine) -> Case:
    from txguard import _guard_records

    def raw_select() -> None:
        if _guard_records.settings is not None:
            txguard.uninstall()
        with Session(engine) as s, s.begin():
            s.execute(SELECT_1)

    def guarded_select() -> None:
        if _guard_records.settings is None:
            txguard.install(long_transaction=60)  # every guard on, at "warn"
        with Session(engine) as s, s.begin():
            s.execute(SELECT_1)

    return Case(
        "SQLite memory, SELECT 1, all guards on",
        1.15,
        {"hand-written": raw_select, "install(), every guard": guarded_select},
        finish=txguard.uninstall,
    )


def leak_detector_case(engine: sa.Engine) -> Case:
    detector = txguard.LeakDetector(capture_stack=True)

    def raw_select() -> None:
        if detector.running:
            detector.stop()
        with Session(engine) as s, s.begin():
            s.execute(SELECT_1)

    def detected_select() -> None:
        if not detector.running:
            detector.start()
        with Session(engine) as s, s.begin():
            s.execute(SELECT_1)

    return Case(
        "SQLite memory, SELECT 1, leak detector",
        1.25,
        {"hand-written": raw_select, "LeakDetector, stacks": detected_select},
        finish=detector.stop,
    )


if __name__ == "__main__":
    raise SystemExit(main())
