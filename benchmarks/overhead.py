"""txguard's overhead per transaction, as a ratio to hand-written SQLAlchemy in the same run.

Run with `make bench` (or `python benchmarks/overhead.py --quick`). Variants of one row are
timed in interleaved rounds (A B C A B C ...) so that drift of the machine hits them alike;
each round times a batch of transactions, and we report the median and the min-max of the
per-transaction time, and the ratio of medians to the row's baseline.
"""

from __future__ import annotations

import argparse
import gc
import statistics
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
    for _ in range(rounds):
        for name, fn in case.variants.items():
            case.results[name].append(time_batch(fn, batch))


def report(cases: list[Case]) -> list[tuple[str, str, float, float | None]]:
    """Print the table; return (row, variant, ratio, budget) for every non-baseline variant."""
    ratios = []
    print(f"| {'row':<44} | {'variant':<26} | {'median µs':>9} | {'min–max µs':>15} | {'ratio':>6} | budget |")
    print(f"|{'-' * 46}|{'-' * 28}|{'-' * 11}|{'-' * 17}|{'-' * 8}|--------|")
    for case in cases:
        names = list(case.variants)
        base = statistics.median(case.results[names[0]])
        for name in names:
            samples = case.results[name]
            median = statistics.median(samples)
            ratio = median / base
            budget = "" if name == names[0] or case.budget is None else f"≤ {case.budget:.2f}"
            print(
                f"| {case.title if name == names[0] else '':<44} | {name:<26} | {median * 1e6:9.1f} | "
                f"{min(samples) * 1e6:6.1f}–{max(samples) * 1e6:<8.1f} | {ratio:6.3f} | {budget:<6} |"
            )
            if name != names[0]:
                ratios.append((case.title, name, ratio, case.budget))
    return ratios


def sqlite_cases() -> list[Case]:
    engine = sa.create_engine("sqlite://")
    Base.metadata.create_all(engine)
    registry = txguard.SessionRegistry(engine)

    def raw_select() -> None:
        with Session(engine) as s, s.begin():
            s.execute(SELECT_1)

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

    return [
        Case(
            "SQLite memory, SELECT 1",
            1.05,
            {"hand-written": raw_select, "@transactional": tx_select, "unit_of_work()": uow_select},
        ),
        Case(
            "SQLite memory, ORM insert",
            1.02,
            {"hand-written": raw_insert, "@transactional": tx_insert, "unit_of_work()": uow_insert},
        ),
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--batch", type=int, default=2000)
    parser.add_argument("--quick", action="store_true", help="fewer rounds, for a smoke run")
    args = parser.parse_args(argv)
    rounds, batch = (5, 300) if args.quick else (args.rounds, args.batch)
    cases = sqlite_cases()
    for case in cases:
        run_case(case, rounds, batch)
    print(f"\ntxguard overhead: {rounds} interleaved rounds x {batch} transactions, "
          f"Python {sys.version.split()[0]}, SQLAlchemy {sa.__version__}\n")
    ratios = report(cases)
    over = [r for r in ratios if r[3] is not None and r[2] > r[3]]
    print()
    for title, name, ratio, budget in over:
        print(f"over budget: {title} / {name}: {ratio:.3f} > {budget}")
    if not over:
        print("every row within budget")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
