"""Celery integration: enqueue a task only once the current unit of work has committed.

    with txguard.unit_of_work() as session:
        session.add(user)
        session.flush()
        txguard.celery.delay_on_commit(send_welcome, user.id)
    # send_welcome is enqueued here, after the COMMIT; never if the unit rolled back

Decisions:

- The enqueue is an ``on_commit`` callback (SPEC section 4): it runs after the outermost
  transaction commits, is dropped if it (or the savepoint it was registered in) rolls back,
  and runs at once outside any transaction. A worker can never pick up a task whose rows are
  not committed yet, or were rolled back.
- ``delay_on_commit(task, *args, **kwargs)`` passes every keyword to the task, so it has no
  ``registry=`` of its own: it uses the default registry. For another registry, use
  ``apply_async_on_commit(task, args, kwargs, registry=registry)``, whose ``registry`` is
  keyword-only and is not a Celery option (the other keywords go to ``apply_async``).
- Both return None, as Celery's own ``delay_on_commit`` (``celery.contrib.django``) does:
  there is no ``AsyncResult`` before the commit. To know the task's id in advance, pass
  ``task_id=celery.uuid()`` to ``apply_async_on_commit`` and build
  ``AsyncResult(task_id)`` from it.
- Async units: the callback runs where the unit's ``async with`` block ends, after the
  commit, and calls ``apply_async`` directly rather than in a thread. Publishing to the
  broker is one short network write; doing it inline keeps the order of the callbacks,
  lets a broker error reach the caller (the data stays committed) as any ``on_commit``
  error does, and means the task is enqueued once the block has exited. An unreachable
  broker blocks for Celery's publish retry policy: pass ``retry=False`` (or a short
  ``retry_policy``) to ``apply_async_on_commit`` where that matters.
- A failed enqueue raises to the code that ended the unit, after the commit; the task is
  not retried by txguard (Celery's ``retry`` option does that).
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from typing import Any

import txguard
from txguard import ConfigurationError, SessionRegistry

__all__ = ["apply_async_on_commit", "delay_on_commit"]


def delay_on_commit(task: Any, /, *args: Any, **kwargs: Any) -> None:
    """Call ``task.delay(*args, **kwargs)`` once the current unit (default registry) commits."""
    apply_async_on_commit(task, args, kwargs)


def apply_async_on_commit(
    task: Any,
    args: Sequence[Any] | None = None,
    kwargs: Mapping[str, Any] | None = None,
    *,
    registry: SessionRegistry[Any] | None = None,
    **options: Any,
) -> None:
    """Call ``task.apply_async(args, kwargs, **options)`` once the current unit commits.

    The unit is the current one of ``registry`` (the default registry when None).
    """
    apply_async = getattr(task, "apply_async", None)
    if not callable(apply_async):
        raise ConfigurationError(
            f"apply_async_on_commit() needs a Celery task (an object with apply_async()), not "
            f"{task!r}; decorate the function with @app.task or @shared_task."
        )
    txguard.on_commit(functools.partial(apply_async, args, kwargs, **options), registry=registry)
