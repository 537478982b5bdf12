"""txguard's overhead in instructions per transaction, counted by callgrind in one process.

Wall-clock ratios on a shared VM spread by several percent between processes, so they
cannot judge a 1% budget; an instruction count can. This script runs every variant in one
process under ``valgrind --tool=callgrind --instr-atstart=no``: each variant's loop is
bracketed by callgrind client requests (a ten-line C shim built here from valgrind's
``callgrind.h`` and loaded with ctypes), and the variants are interleaved A B C … C B A so
that whatever the process does over time (caches warming, allocator state) hits them alike.

Run ``make bench-instructions`` (or ``python benchmarks/instructions.py``): it re-executes
itself under ``setarch -R valgrind`` with a fixed ``PYTHONHASHSEED`` and prints one table;
``--json FILE`` also writes the numbers. Without valgrind the client requests are no-ops.
"""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import sqlalchemy as sa
from sqlalchemy.orm import Session

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import txguard  # noqa: E402
from overhead import SELECT_1, Base, Row  # noqa: E402  (the same tables as the timed benchmark)

SHIM = r"""
#include <valgrind/callgrind.h>
void txg_start(void) { CALLGRIND_START_INSTRUMENTATION; }
void txg_zero(void) { CALLGRIND_ZERO_STATS; }
void txg_toggle(void) { CALLGRIND_TOGGLE_COLLECT; }
void txg_dump(const char *name) { CALLGRIND_DUMP_STATS_AT(name); }
"""


Variant = Callable[[], None]


def build_shim(folder: Path) -> ctypes.CDLL:
    """Compile the client-request shim and load it."""
    source = folder / "shim.c"
    library = folder / "shim.so"
    source.write_text(SHIM)
    subprocess.run(["cc", "-O1", "-shared", "-fPIC", "-o", str(library), str(source)], check=True)
    shim = ctypes.CDLL(str(library))
    shim.txg_dump.argtypes = [ctypes.c_char_p]
    return shim


def sync_rows() -> list[tuple[str, float | None, dict[str, Variant]]]:
    """The rows on SQLite memory; both sides run on the same txguard-registered engine."""
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
        ("SELECT 1", 1.01, {"hand-written": raw_select, "@transactional": tx_select,
                            "unit_of_work()": uow_select}),
        ("ORM insert", 1.01, {"hand-written": raw_insert, "@transactional": tx_insert,
                              "unit_of_work()": uow_insert}),
        ("REQUIRED join (two functions)", None, {"hand-written": raw_two_functions,
                                                 "unit_of_work() + joined @transactional": uow_joined}),
    ]


def guard_rows() -> list[tuple[str, float | None, dict[str, Variant]]]:
    """Guards installed: units against hand-written code, both under the same guards."""
    engine = sa.create_engine("sqlite://")
    registry = txguard.SessionRegistry(engine)

    def raw_select() -> None:
        with Session(engine) as s, s.begin():
            s.execute(SELECT_1)

    def uow_select() -> None:
        with registry.unit_of_work() as s:
            s.execute(SELECT_1)

    return [("SELECT 1 under install() (all guards warn)", None,
             {"hand-written": raw_select, "unit_of_work()": uow_select})]


def async_rows() -> tuple[list[tuple[str, float | None, dict[str, Variant]]], Callable[[], None]]:
    """aiosqlite end to end: a plain engine against a txguard registry's engine."""
    from sqlalchemy.ext.asyncio import AsyncSession, create_async_engine

    loop = asyncio.new_event_loop()
    plain = create_async_engine("sqlite+aiosqlite://")
    guarded = create_async_engine("sqlite+aiosqlite://")
    registry = txguard.SessionRegistry(guarded)

    async def raw() -> None:
        async with AsyncSession(plain) as s, s.begin():
            await s.execute(SELECT_1)

    async def uow() -> None:
        async with registry.unit_of_work() as s:
            await s.execute(SELECT_1)

    def close() -> None:
        loop.run_until_complete(plain.dispose())
        loop.run_until_complete(guarded.dispose())
        loop.close()

    return [("aiosqlite SELECT 1 (plain engine vs registry)", 1.05,
             {"plain aiosqlite": lambda: loop.run_until_complete(raw()),
              "unit_of_work()": lambda: loop.run_until_complete(uow())})], close


def measure(shim: ctypes.CDLL, rows: list[tuple[str, float | None, dict[str, Variant]]],
            rounds: int, batch: int) -> None:
    """Run each row's variants interleaved; each loop is one callgrind dump."""
    for title, _, variants in rows:
        order = list(variants.items())
        for _, fn in order:  # warm up: caches, specialisation, the pool
            for _ in range(batch // 4 or 1):
                fn()
        for r in range(rounds):
            for name, fn in order:
                shim.txg_zero()
                shim.txg_toggle()
                for _ in range(batch):
                    fn()
                shim.txg_toggle()
                shim.txg_dump(f"{title}|{name}|{r}".encode())
            order.reverse()


def child(args: argparse.Namespace) -> None:
    folder = Path(args.workdir)
    shim = build_shim(folder)

    def chosen(rows: list[tuple[str, float | None, dict[str, Variant]]]) -> list[tuple[str, float | None, dict[str, Variant]]]:
        return [row for row in rows if args.only in row[0]]

    rows = chosen(sync_rows())
    arows, close = async_rows()
    arows = chosen(arows)
    guards = chosen(guard_rows())
    shim.txg_start()
    measure(shim, rows + arows, args.rounds, args.batch)
    txguard.install(mixed_begin="warn", leaks="warn", cross_thread="warn", cross_task="warn")
    try:
        measure(shim, guards, args.rounds, args.batch)
    finally:
        txguard.uninstall()
    close()
    meta = [(title, budget, list(variants)) for title, budget, variants in rows + arows + guards]
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds per row")
    parser.add_argument("--batch", type=int, default=200, help="transactions per loop")
    parser.add_argument("--seed", default="0", help="PYTHONHASHSEED of the measured process")
    parser.add_argument("--json", help="also write the numbers to this file")
    parser.add_argument("--only", default="", help="run only the rows whose title has this text")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--workdir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return
    if shutil.which("valgrind") is None:
        sys.exit("valgrind is needed: apt-get install valgrind")
    with tempfile.TemporaryDirectory() as workdir:
        folder = Path(workdir)
        command = [
            "valgrind", "--tool=callgrind", "--instr-atstart=no", "--collect-atstart=no",
            f"--callgrind-out-file={folder}/callgrind.out.%p",
            sys.executable, __file__, "--child", "--workdir", workdir,
            "--rounds", str(args.rounds), "--batch", str(args.batch), "--only", args.only,
        ]
        if shutil.which("setarch"):
            command = ["setarch", os.uname().machine, "-R", *command]
        env = {**os.environ, "PYTHONHASHSEED": args.seed}
        subprocess.run(command, check=True, env=env, stderr=subprocess.DEVNULL)
        counts = collect(folder, args.batch)
        rows = json.loads((folder / "rows.json").read_text())
    report = []
    print(f"instructions per transaction (callgrind, PYTHONHASHSEED={args.seed}, "
          f"{args.rounds} rounds x {args.batch})")
    for title, budget, names in rows:
        base = min(counts[(title, names[0])])
        print(f"\n{title}" + (f"  (budget {budget:.2f}x)" if budget else ""))
        for name in names:
            values = counts[(title, name)]
            value = min(values)
            spread = (max(values) - value) / value
            print(f"  {name:<42} {value:>10,.0f}  {value / base:6.3f}x  {value - base:+9,.0f}"
                  f"  (rounds within {spread:.2%})")
            report.append({"row": title, "variant": name, "instructions": value,
                           "ratio": value / base, "budget": budget})
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
