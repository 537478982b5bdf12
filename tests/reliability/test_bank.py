"""The bank workload (as in Jepsen): concurrent transfers under injected faults keep every invariant.

16 threads move money between 10 accounts while a killer thread ends random busy server
connections (``pg_terminate_backend`` / ``KILL``), some transfers raise half-way (in the
owning unit, in a joined unit, or in a joined unit whose failure the owner swallows), and
transfers that lock the same two accounts in opposite order deadlock. Afterwards the total
is unchanged, every account reconciles with the log of applied transfers, no transfer is
applied twice or half, the on_commit callbacks ran exactly for the applied transfers, and
no pooled connection is left checked out.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections import Counter
from collections.abc import Iterator

import pytest
import sqlalchemy as sa
from sqlalchemy.exc import DBAPIError

import txguard
from tests.reliability.conftest import FIGURES, Account, Server, Transfer

pytestmark = pytest.mark.reliability

ACCOUNTS = 10
INITIAL = 1_000
THREADS = 16
TRANSFERS = 30  # per thread
RETRIES = 20
MAX_KILLS = 80
FAULTS = {"raise": 0.06, "raise_in_joined": 0.05, "swallowed_in_joined": 0.05}
DEADLOCK_CODES = ("40P01", "1213")


class InjectedFault(Exception):
    """An error a transfer raises on purpose, half-way through."""


@pytest.fixture
def quiet_pool() -> Iterator[None]:
    """Silence the pool's own log of resets that fail on killed connections (expected here)."""
    pool_logger = logging.getLogger("sqlalchemy.pool")
    level = pool_logger.level
    pool_logger.setLevel(logging.CRITICAL)
    yield
    pool_logger.setLevel(level)


def test_bank_transfers_keep_every_invariant_under_faults(server: Server, quiet_pool: None) -> None:
    """Kills, injected exceptions and deadlocks never change the total or half-apply a transfer."""
    server.reset({n: INITIAL for n in range(1, ACCOUNTS + 1)})
    registry = txguard.SessionRegistry(server.engine)
    lock = threading.Lock()
    outcomes: dict[int, str] = {}
    callbacks: list[int] = []
    attempts: Counter[int] = Counter()
    unexpected: list[BaseException] = []
    kills = 0
    done = threading.Event()

    @registry.transactional
    def credit(account: int, amount: int, fail: bool) -> None:
        session = registry.current_session()
        # The second row lock of the transfer: two transfers in opposite directions deadlock.
        session.scalar(sa.select(Account.balance).where(Account.id == account).with_for_update())
        session.execute(
            sa.update(Account).where(Account.id == account).values(balance=Account.balance + amount)
        )
        if fail:
            raise InjectedFault(f"credit of transfer to {account}")

    @registry.transactional(retries=RETRIES, backoff=0.005)
    def transfer(tid: int, src: int, dst: int, amount: int, fault: str | None) -> bool:
        with lock:
            attempts[tid] += 1
        session = registry.current_session()
        balance = session.scalar(
            sa.select(Account.balance).where(Account.id == src).with_for_update()
        )
        if balance < amount:
            return False
        session.execute(
            sa.update(Account).where(Account.id == src).values(balance=Account.balance - amount)
        )
        time.sleep(0.001)  # hold the first lock a moment: opposite transfers meet
        if fault == "raise":
            raise InjectedFault(f"transfer {tid}, after the debit")
        if fault == "swallowed_in_joined":
            try:
                credit(dst, amount, fail=True)
            except InjectedFault:
                pass  # swallowed: the transaction is rollback-only, the owner cannot commit
        else:
            credit(dst, amount, fail=fault == "raise_in_joined")
        session.add(Transfer(tid=tid, src=src, dst=dst, amount=amount))
        txguard.on_commit(lambda: callbacks.append(tid), registry=registry)
        return True

    def worker(n: int) -> None:
        rng = random.Random(n)
        for i in range(TRANSFERS):
            tid = n * 1_000 + i
            src, dst = rng.sample(range(1, ACCOUNTS + 1), 2)
            amount = rng.randint(1, 60)
            roll = rng.random()
            fault = None
            for name, share in FAULTS.items():
                if roll < share:
                    fault = name
                    break
                roll -= share
            try:
                outcome = "applied" if transfer(tid, src, dst, amount, fault) else "insufficient"
            except InjectedFault:
                outcome = "injected"
            except txguard.UnexpectedRollbackError:
                outcome = "swallowed"
            except DBAPIError as exc:
                notes = " ".join(getattr(exc, "__notes__", []))
                outcome = "unknown" if "unknown" in notes else "gave_up"
            except BaseException as exc:
                outcome = "unexpected"
                unexpected.append(exc)
            with lock:
                outcomes[tid] = f"{outcome}:{fault}" if fault else outcome

    def killer() -> None:
        nonlocal kills
        rng = random.Random(99)
        while not done.wait(rng.uniform(0.005, 0.03)) and kills < MAX_KILLS:
            busy = server.busy_ids()
            if busy:
                server.side.kill(rng.choice(busy), wait=False)
                kills += 1

    threads = [threading.Thread(target=worker, args=(n,), name=f"bank-{n}") for n in range(THREADS)]
    kill_thread = threading.Thread(target=killer, name="bank-killer")
    kill_thread.start()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(150)
    done.set()
    kill_thread.join(30)
    assert not any(t.is_alive() for t in [*threads, kill_thread]), "a thread did not finish"
    assert not unexpected, [f"{type(e).__name__}: {e}" for e in unexpected[:3]]

    leaked_connections = server.engine.pool.checkedout()
    # A KILL sent without waiting may land after its unit already returned the connection to
    # the pool: verify on fresh connections, not on one the killer may have ended.
    server.engine.dispose()
    with server.engine.connect() as conn:
        balances = {row[0]: row[1] for row in conn.execute(sa.select(Account.id, Account.balance))}
        log = conn.execute(sa.select(Transfer.tid, Transfer.src, Transfer.dst, Transfer.amount)).all()
    applied = [row[0] for row in log]
    kinds = Counter(o.split(":")[0] for o in outcomes.values())
    FIGURES[f"bank[{server.backend}]"] = {
        "transfers": len(outcomes),
        "outcomes": dict(kinds),
        "attempts": sum(attempts.values()),
        "faults": {
            "kills": kills,
            **{k: sum(1 for o in outcomes.values() if o.endswith(":" + k)) for k in FAULTS},
            "deadlocks": server.errors.count(*DEADLOCK_CODES),
        },
        "errors_seen": dict(server.errors.codes),
        "sum_before": ACCOUNTS * INITIAL,
        "sum_after": sum(balances.values()),
        "leaked_connections": leaked_connections,
    }

    assert len(outcomes) == THREADS * TRANSFERS
    assert sum(balances.values()) == ACCOUNTS * INITIAL
    assert min(balances.values()) >= 0
    assert len(applied) == len(set(applied)), "a transfer was applied twice"
    for account in balances:
        incoming = sum(row[3] for row in log if row[2] == account)
        outgoing = sum(row[3] for row in log if row[1] == account)
        assert balances[account] == INITIAL + incoming - outgoing, f"account {account} is off"
    for tid, outcome in outcomes.items():
        kind = outcome.split(":")[0]
        if kind == "applied":
            assert tid in applied
        elif kind != "unknown":  # only a commit whose outcome is unknown may have landed
            assert tid not in applied, f"transfer {tid} ({outcome}) was applied"
    assert sorted(callbacks) == sorted(t for t, o in outcomes.items() if o == "applied")
    assert kills > 0
    assert leaked_connections == 0
