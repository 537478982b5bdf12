"""on_commit / on_rollback from a thread running in a copy of a unit's context.

``asyncio.to_thread``, ``copy_context().run`` in a thread pool and Starlette's
``run_in_threadpool`` give a thread the context of the unit that started it. The thread may
not use that unit's session, but what it registers follows the unit's transaction: after its
COMMIT, dropped when it rolls back. The unit may be ending while the thread registers: the
callback is then taken by that end or handled as registered after it, never lost, never
run twice, never run before COMMIT.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import pytest
import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.orm import Session

import txguard
from tests.conftest import AsyncDatabase
from tests.helpers import names
from tests.models import Item
from txguard import _unit
from txguard._callbacks import BlockCallbacks
from txguard._transaction import Transaction

T = TypeVar("T")
WAIT_S = 20


@pytest.fixture
def registry(engine: sa.Engine) -> txguard.SessionRegistry[Session]:
    return txguard.configure(engine)


def in_worker(fn: Callable[..., T], *args: Any) -> T:
    """Run ``fn`` in a new worker thread, in a copy of the caller's context (as asyncio.to_thread)."""
    with ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(contextvars.copy_context().run, fn, *args).result()


def where() -> str:
    return "owner" if threading.current_thread() is threading.main_thread() else "worker"


class Worker:
    """A thread started inside a unit, in a copy of its context, that registers when told to."""

    def __init__(self, register: Callable[[], object]) -> None:
        self.go, self.done = threading.Event(), threading.Event()
        self.error: BaseException | None = None
        self._register = register
        self.thread = threading.Thread(target=contextvars.copy_context().run, args=(self._run,))
        self.thread.start()

    def _run(self) -> None:
        try:
            if not self.go.wait(WAIT_S):
                raise TimeoutError("never told to register")
            self._register()
        except BaseException as exc:
            self.error = exc
        finally:
            self.done.set()

    def register_now(self, *args: object) -> None:
        """Let the thread register, and wait until it has (an event hook's signature)."""
        self.go.set()
        if not self.done.wait(WAIT_S):
            raise TimeoutError("the worker did not register")

    def join(self) -> None:
        self.go.set()
        self.thread.join(WAIT_S)
        if self.error is not None:
            raise self.error


# In a live unit: after its COMMIT, never at once.


def test_on_commit_from_a_worker_thread_runs_after_the_units_commit(
    registry: txguard.SessionRegistry[Session], engine: sa.Engine
) -> None:
    """The callback does not run when the thread registers it, but once the row is committed."""
    seen: list[object] = []
    with txguard.unit_of_work() as session:
        session.add(Item(name="a"))
        session.flush()
        in_worker(txguard.on_commit, lambda: seen.append((names(engine), where())))
        in_worker(txguard.on_rollback, lambda: seen.append("rolled back"))
        assert seen == []
    assert seen == [(["a"], "owner")]


def test_on_commit_from_a_worker_thread_is_dropped_when_the_unit_rolls_back(
    registry: txguard.SessionRegistry[Session], engine: sa.Engine
) -> None:
    seen: list[str] = []
    with pytest.raises(RuntimeError), txguard.unit_of_work() as session:
        session.add(Item(name="declined"))
        in_worker(txguard.on_commit, lambda: seen.append("sent"))
        in_worker(txguard.on_rollback, lambda: seen.append("rolled back"))
        raise RuntimeError("payment declined")
    assert seen == ["rolled back"]
    assert names(engine) == []


def test_the_worker_thread_still_cannot_use_the_units_session(
    registry: txguard.SessionRegistry[Session],
) -> None:
    """Only callbacks join: the thread sees no unit, and a unit it opens is its own."""

    def worker() -> tuple[bool, Session]:
        with pytest.raises(txguard.TransactionRequiredError):
            txguard.current_session()
        outside = txguard.in_transaction()
        with txguard.unit_of_work() as own:
            return outside, own

    with txguard.unit_of_work() as session:
        outside, own = in_worker(worker)
    assert outside is False
    assert own is not session


def test_a_unit_the_worker_opens_keeps_its_own_callbacks(
    registry: txguard.SessionRegistry[Session], engine: sa.Engine
) -> None:
    """Inside its own unit, the thread's callback follows that unit's commit, not the caller's."""
    seen: list[object] = []

    def worker() -> None:
        with txguard.unit_of_work() as own:
            own.add(Item(name="worker"))
            txguard.on_commit(lambda: seen.append(names(engine)))
        assert seen == [["worker"]]

    with txguard.unit_of_work() as session:
        session.add(Item(name="caller"))
        in_worker(worker)
    assert seen == [["worker"]]


def test_a_worker_callback_in_a_savepoint_that_rolls_back_is_dropped(
    registry: txguard.SessionRegistry[Session], engine: sa.Engine
) -> None:
    seen: list[str] = []
    with txguard.unit_of_work() as session:
        session.add(Item(name="kept"))
        with pytest.raises(RuntimeError), txguard.unit_of_work(propagation="nested") as inner:
            inner.add(Item(name="undone"))
            in_worker(txguard.on_commit, lambda: seen.append("undone sent"))
            in_worker(txguard.on_rollback, lambda: seen.append("undone rolled back"))
            raise RuntimeError
        in_worker(txguard.on_commit, lambda: seen.append("kept sent"))
        assert seen == []
    assert seen == ["undone rolled back", "kept sent"]
    assert names(engine) == ["kept"]


def test_a_worker_callback_in_a_released_savepoint_follows_the_outer_commit(
    registry: txguard.SessionRegistry[Session], engine: sa.Engine
) -> None:
    seen: list[object] = []
    with txguard.unit_of_work() as session:
        with txguard.unit_of_work(propagation="nested") as inner:
            inner.add(Item(name="a"))
            in_worker(txguard.on_commit, lambda: seen.append(names(engine)))
        assert seen == []
        session.add(Item(name="b"))
    assert seen == [["a", "b"]]


def test_transactional_in_a_thread_pool_with_a_copied_context(
    registry: txguard.SessionRegistry[Session], engine: sa.Engine
) -> None:
    """``pool.submit(copy_context().run, ...)`` inside a ``@transactional`` function."""
    seen: list[object] = []

    @txguard.transactional
    def place() -> None:
        txguard.current_session().add(Item(name="order"))
        with ThreadPoolExecutor(2) as pool:
            for label in ("email", "audit"):
                pool.submit(
                    contextvars.copy_context().run, txguard.on_commit,
                    lambda label=label: seen.append((label, names(engine))),
                ).result()
        assert seen == []

    place()
    assert seen == [("email", ["order"]), ("audit", ["order"])]


def test_a_worker_callback_in_a_connect_block_follows_its_commit(
    registry: txguard.SessionRegistry[Session], engine: sa.Engine
) -> None:
    seen: list[object] = []
    with txguard.unit_of_work(), txguard.connect() as conn:
        conn.execute(sa.insert(Item).values(name="a"))
        in_worker(txguard.on_commit, lambda: seen.append(names(engine)))
        assert seen == []
    assert seen == [["a"]]


def test_commit_as_you_go_unit_takes_worker_callbacks_at_its_next_commit(
    registry: txguard.SessionRegistry[Session], engine: sa.Engine
) -> None:
    """As the unit's own callbacks: each session.commit() runs those registered before it,
    session.rollback() drops them."""
    seen: list[object] = []
    with txguard.unit_of_work(mode="commit_as_you_go") as session:
        session.add(Item(name="a"))
        session.flush()
        in_worker(txguard.on_commit, lambda: seen.append(names(engine)))
        assert seen == []
        session.commit()
        assert seen == [["a"]]
        in_worker(txguard.on_commit, lambda: seen.append(names(engine)))
        session.add(Item(name="b"))
        session.commit()
        assert seen == [["a"], ["a", "b"]]
        session.add(Item(name="c"))
        session.flush()
        in_worker(txguard.on_commit, lambda: seen.append("never committed"))
        in_worker(txguard.on_rollback, lambda: seen.append("rolled back"))
        session.rollback()
    assert seen == [["a"], ["a", "b"], "rolled back"]


def test_a_unit_that_follows_its_context_takes_callbacks_registered_during_its_commit(
    registry: txguard.SessionRegistry[Session], engine: sa.Engine
) -> None:
    """A framework's unit (follow_context: usable by every thread with the context): a
    thread that registers while the unit's COMMIT runs gets the callback after it."""
    seen: list[object] = []
    with txguard.unit_of_work() as session:
        unit = _unit.current_unit(registry)
        assert unit is not None
        _unit.follow_context(unit)
        session.add(Item(name="a"))
        worker = Worker(lambda: txguard.on_commit(lambda: seen.append((names(engine), where()))))
        event.listen(session, "after_commit", worker.register_now)
    worker.join()
    assert seen == [(["a"], "owner")]


def test_a_failing_robust_worker_callback_is_logged_by_its_own_name(
    registry: txguard.SessionRegistry[Session], caplog: pytest.LogCaptureFixture
) -> None:
    def send_receipt() -> None:
        raise RuntimeError("mail server down")

    with caplog.at_level(logging.ERROR, logger="txguard"):
        with txguard.unit_of_work() as session:
            session.add(Item(name="a"))
            in_worker(lambda: txguard.on_commit(send_receipt, robust=True))
    assert "on_commit callback" in caplog.text
    assert "send_receipt" in caplog.text


def test_capture_on_commit_collects_the_workers_callback_itself(
    registry: txguard.SessionRegistry[Session],
) -> None:
    from txguard.testing import capture_on_commit

    def notify() -> None:
        raise AssertionError("captured, not run")

    with capture_on_commit() as callbacks:
        with txguard.unit_of_work() as session:
            session.add(Item(name="a"))
            in_worker(txguard.on_commit, notify)
    assert callbacks == [notify]


# After the unit ended: the rules for code that outlived its unit.


def test_after_the_unit_committed_the_worker_runs_on_commit_at_once(
    registry: txguard.SessionRegistry[Session], engine: sa.Engine
) -> None:
    seen: list[object] = []
    with txguard.unit_of_work() as session:
        session.add(Item(name="a"))
        worker = Worker(lambda: txguard.on_commit(lambda: seen.append((names(engine), where()))))
    worker.register_now()
    worker.join()
    assert seen == [(["a"], "worker")]


def test_after_the_unit_rolled_back_the_worker_drops_its_callbacks(
    registry: txguard.SessionRegistry[Session], engine: sa.Engine
) -> None:
    """As for a task that outlived a unit that rolled back: what it registers was meant to
    follow a COMMIT that never came."""
    seen: list[str] = []

    def register() -> None:
        txguard.on_commit(lambda: seen.append("sent"))
        txguard.on_rollback(lambda: seen.append("late rollback"))

    with pytest.raises(RuntimeError), txguard.unit_of_work() as session:
        session.add(Item(name="declined"))
        worker = Worker(register)
        raise RuntimeError("payment declined")
    worker.register_now()
    worker.join()
    assert seen == []


# Registering while the unit ends (deterministic: the owner's end waits for the worker).


@pytest.fixture
def seed(engine: sa.Engine) -> None:
    """A committed row, so that the unit's session holds a persistent object until it closes."""
    with engine.begin() as conn:
        conn.execute(sa.insert(Item).values(id=1, name="seed"))


def test_registered_while_the_commit_runs_the_callback_follows_that_commit(
    registry: txguard.SessionRegistry[Session], engine: sa.Engine
) -> None:
    """Registered from inside COMMIT (the end has not taken the callbacks yet): run once, by
    the end, after the COMMIT."""
    seen: list[object] = []
    with txguard.unit_of_work() as session:
        session.add(Item(name="a"))
        worker = Worker(lambda: txguard.on_commit(lambda: seen.append((names(engine), where()))))
        event.listen(session, "after_commit", worker.register_now)
        assert seen == []
    worker.join()
    assert seen == [(["a"], "owner")]


def test_registered_while_the_rollback_runs_on_commit_is_dropped(
    registry: txguard.SessionRegistry[Session], engine: sa.Engine
) -> None:
    seen: list[str] = []

    def register() -> None:
        txguard.on_commit(lambda: seen.append("sent"))
        txguard.on_rollback(lambda: seen.append(f"rolled back, seen by the {where()}"))

    with pytest.raises(RuntimeError), txguard.unit_of_work() as session:
        session.add(Item(name="declined"))
        session.flush()
        worker = Worker(register)
        event.listen(session, "after_rollback", worker.register_now)
        raise RuntimeError("payment declined")
    worker.join()
    assert seen == ["rolled back, seen by the owner"]
    assert names(engine) == []


@pytest.mark.usefixtures("seed")
def test_registered_after_the_commit_but_before_the_end_took_callbacks_runs_at_once(
    registry: txguard.SessionRegistry[Session], engine: sa.Engine
) -> None:
    """Registered while the unit closes its session (COMMIT done, callbacks not taken): it
    counts as after the end and runs at once in the thread, and the end does not run it again."""
    seen: list[object] = []
    with txguard.unit_of_work() as session:
        session.get(Item, 1)  # persistent until the session closes
        session.add(Item(name="a"))
        worker = Worker(lambda: txguard.on_commit(lambda: seen.append((names(engine), where()))))
        event.listen(session, "persistent_to_detached", worker.register_now, once=True)
    worker.join()
    assert seen == [(["a", "seed"], "worker")]


@pytest.mark.usefixtures("seed")
def test_registered_after_the_rollback_but_before_the_end_took_callbacks_is_dropped(
    registry: txguard.SessionRegistry[Session], engine: sa.Engine
) -> None:
    seen: list[str] = []

    def register() -> None:
        txguard.on_commit(lambda: seen.append("sent"))
        txguard.on_rollback(lambda: seen.append("late rollback"))

    with pytest.raises(RuntimeError), txguard.unit_of_work() as session:
        session.get(Item, 1)
        session.add(Item(name="declined"))
        worker = Worker(register)
        event.listen(session, "persistent_to_detached", worker.register_now, once=True)
        raise RuntimeError("payment declined")
    worker.join()
    assert seen == []
    assert names(engine) == ["seed"]


class PausedCheck:
    """Hold a registering thread between adding its callback and asking whether the end
    took it, the one window no SQLAlchemy event reaches; the owner ends the unit meanwhile."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, target: type) -> None:
        self.added, self.resume = threading.Event(), threading.Event()
        original = target.takes  # type: ignore[attr-defined]

        def takes(this: object, token: object) -> bool:
            if threading.current_thread() is not threading.main_thread():
                self.added.set()
                if not self.resume.wait(WAIT_S):
                    raise TimeoutError("the owner never let the worker go on")
            return original(this, token)  # type: ignore[no-any-return]

        monkeypatch.setattr(target, "takes", takes)

    def wait_added(self) -> None:
        if not self.added.wait(WAIT_S):
            raise TimeoutError("the worker never added its callback")


def test_added_before_the_end_and_checked_after_it_runs_once_by_the_end(
    registry: txguard.SessionRegistry[Session], engine: sa.Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The end took the callback and ran it before the thread looked: the thread does not
    run it again."""
    paused = PausedCheck(monkeypatch, Transaction)
    seen: list[object] = []
    with txguard.unit_of_work() as session:
        session.add(Item(name="a"))
        worker = Worker(lambda: txguard.on_commit(lambda: seen.append((names(engine), where()))))
        worker.go.set()
        paused.wait_added()
    assert seen == [(["a"], "owner")]
    paused.resume.set()
    worker.join()
    assert seen == [(["a"], "owner")]


def test_taken_by_the_end_but_claimed_by_the_thread_first_runs_once_in_the_thread(
    registry: txguard.SessionRegistry[Session], engine: sa.Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The end took the callback but had not run it yet (an earlier callback runs) when the
    thread found the unit ended: whichever claims it first runs it, the other skips it."""
    paused = PausedCheck(monkeypatch, Transaction)
    seen: list[object] = []

    def first() -> None:
        seen.append("first")
        paused.resume.set()
        worker.thread.join(WAIT_S)

    with txguard.unit_of_work() as session:
        session.add(Item(name="a"))
        txguard.on_commit(first)
        worker = Worker(lambda: txguard.on_commit(lambda: seen.append((names(engine), where()))))
        worker.go.set()
        paused.wait_added()
    worker.join()
    assert seen == ["first", (["a"], "worker")]


def test_added_before_a_rollback_and_checked_after_it_is_dropped(
    registry: txguard.SessionRegistry[Session], engine: sa.Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    paused = PausedCheck(monkeypatch, Transaction)
    seen: list[str] = []

    def register() -> None:
        txguard.on_commit(lambda: seen.append("sent"))

    with pytest.raises(RuntimeError), txguard.unit_of_work() as session:
        session.add(Item(name="declined"))
        worker = Worker(register)
        worker.go.set()
        paused.wait_added()
        raise RuntimeError
    paused.resume.set()
    worker.join()
    assert seen == []


def test_on_rollback_added_before_a_rollback_and_checked_after_it_runs_once(
    registry: txguard.SessionRegistry[Session], engine: sa.Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    paused = PausedCheck(monkeypatch, Transaction)
    seen: list[str] = []
    with pytest.raises(RuntimeError), txguard.unit_of_work() as session:
        session.add(Item(name="declined"))
        worker = Worker(lambda: txguard.on_rollback(lambda: seen.append(where())))
        worker.go.set()
        paused.wait_added()
        raise RuntimeError
    paused.resume.set()
    worker.join()
    assert seen == ["owner"]


def test_added_to_a_commit_as_you_go_unit_as_it_commits_runs_once(
    registry: txguard.SessionRegistry[Session], engine: sa.Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """session.commit() took the callback before the thread looked: once, after that commit."""
    paused = PausedCheck(monkeypatch, Transaction)
    seen: list[object] = []
    with txguard.unit_of_work(mode="commit_as_you_go") as session:
        session.add(Item(name="a"))
        session.flush()
        worker = Worker(lambda: txguard.on_commit(lambda: seen.append((names(engine), where()))))
        worker.go.set()
        paused.wait_added()
        session.commit()
        assert seen == [(["a"], "owner")]
        paused.resume.set()
        worker.join()
    assert seen == [(["a"], "owner")]


def test_added_to_a_connect_block_as_it_ends_runs_once(
    registry: txguard.SessionRegistry[Session], engine: sa.Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    paused = PausedCheck(monkeypatch, BlockCallbacks)
    seen: list[object] = []
    with txguard.connect() as conn:
        conn.execute(sa.insert(Item).values(name="a"))
        worker = Worker(lambda: txguard.on_commit(lambda: seen.append((names(engine), where()))))
        worker.go.set()
        paused.wait_added()
    paused.resume.set()
    worker.join()
    assert seen == [(["a"], "owner")]


def test_many_threads_registering_as_units_end_run_each_callback_once_after_commit(
    registry: txguard.SessionRegistry[Session], engine: sa.Engine
) -> None:
    """No pause: the thread and the end race freely. Every callback of a committed unit runs
    exactly once and sees its row committed; none of a rolled-back unit runs."""
    ran: list[tuple[int, bool]] = []
    rounds = 40

    def callback(i: int) -> None:
        with engine.connect() as conn:
            found = conn.execute(sa.select(Item.id).where(Item.name == f"n{i}")).first()
        ran.append((i, found is not None))

    for i in range(rounds):
        barrier = threading.Barrier(2, timeout=WAIT_S)

        def register(i: int = i, barrier: threading.Barrier = barrier) -> None:
            barrier.wait()
            txguard.on_commit(lambda: callback(i))

        fails = bool(i % 2)
        with pytest.raises(RuntimeError) if fails else contextlib.nullcontext():
            with txguard.unit_of_work() as session:
                session.add(Item(name=f"n{i}"))
                session.flush()
                worker = Worker(register)
                worker.go.set()
                barrier.wait()
                if fails:
                    raise RuntimeError
        worker.join()
    assert sorted(ran) == [(i, True) for i in range(0, rounds, 2)]


def test_a_task_context_registering_before_the_units_commit_follows_it(
    registry: txguard.SessionRegistry[Session], engine: sa.Engine
) -> None:
    """A copy of the unit's context (a task's) registers from code the end runs before
    COMMIT (a before_commit listener), once the block has left the stack: the callback
    follows that COMMIT instead of running before it."""
    seen: list[object] = []
    with txguard.unit_of_work() as session:
        session.add(Item(name="a"))
        task_context = contextvars.copy_context()
        event.listen(
            session, "before_commit",
            lambda s: task_context.run(txguard.on_commit, lambda: seen.append(names(engine))),
        )
    assert seen == [["a"]]


# Async units: asyncio.to_thread, async @transactional, Starlette's run_in_threadpool.


async def test_to_thread_in_an_async_unit_joins_its_commit(async_db: AsyncDatabase) -> None:
    """Sync and async callbacks registered from the thread: the unit awaits the async one
    after its COMMIT, in order."""
    registry = txguard.SessionRegistry(async_db.engine)
    seen: list[object] = []

    async def notify() -> None:
        await asyncio.sleep(0)
        seen.append(("async", names(async_db.sync)))

    def work() -> None:
        txguard.on_commit(lambda: seen.append(("sync", names(async_db.sync))), registry=registry)
        txguard.on_commit(notify, registry=registry)
        txguard.on_rollback(lambda: seen.append("rolled back"), registry=registry)

    async with registry.unit_of_work() as session:
        session.add(Item(name="a"))
        await session.flush()
        await asyncio.to_thread(work)
        assert seen == []
    assert seen == [("sync", ["a"]), ("async", ["a"])]


async def test_to_thread_in_an_async_unit_that_rolls_back_drops_on_commit(
    async_db: AsyncDatabase,
) -> None:
    registry = txguard.SessionRegistry(async_db.engine)
    seen: list[str] = []

    async def notify() -> None:
        seen.append("async sent")

    def work() -> None:
        txguard.on_commit(lambda: seen.append("sent"), registry=registry)
        txguard.on_commit(notify, registry=registry)
        txguard.on_rollback(lambda: seen.append("rolled back"), registry=registry)

    with pytest.raises(RuntimeError):
        async with registry.unit_of_work() as session:
            session.add(Item(name="declined"))
            await asyncio.to_thread(work)
            raise RuntimeError("payment declined")
    assert seen == ["rolled back"]
    assert names(async_db.sync) == []


async def test_to_thread_in_an_async_transactional_function(async_db: AsyncDatabase) -> None:
    registry = txguard.SessionRegistry(async_db.engine)
    seen: list[object] = []

    @txguard.transactional(registry=registry)
    async def place(fail: bool) -> None:
        registry.current_session().add(Item(name="failed" if fail else "order"))
        before = len(seen)
        await asyncio.to_thread(
            txguard.on_commit, lambda: seen.append(names(async_db.sync)), registry=registry
        )
        assert len(seen) == before
        if fail:
            raise RuntimeError

    await place(False)
    with pytest.raises(RuntimeError):
        await place(True)
    assert seen == [["order"]]


async def test_starlette_run_in_threadpool_without_hand_over_joins_the_unit(
    async_db: AsyncDatabase,
) -> None:
    from starlette.concurrency import run_in_threadpool

    registry = txguard.SessionRegistry(async_db.engine)
    seen: list[object] = []

    def service() -> None:
        with pytest.raises(txguard.TransactionRequiredError):
            registry.current_session()
        txguard.on_commit(lambda: seen.append(names(async_db.sync)), registry=registry)

    async with registry.unit_of_work() as session:
        session.add(Item(name="a"))
        await run_in_threadpool(service)
        assert seen == []
    assert seen == [["a"]]


async def test_registered_while_an_async_units_commit_runs_follows_it(
    async_db: AsyncDatabase,
) -> None:
    registry = txguard.SessionRegistry(async_db.engine)
    seen: list[object] = []

    async def notify() -> None:
        seen.append(("async", names(async_db.sync)))

    def register() -> None:
        txguard.on_commit(notify, registry=registry)

    async with registry.unit_of_work() as session:
        session.add(Item(name="a"))
        worker = Worker(register)
        event.listen(session.sync_session, "after_commit", worker.register_now)
    worker.join()
    assert seen == [("async", ["a"])]
