"""FastAPI integration: one unit of work per request, committed before the response is sent.

    from txguard.fastapi import session as unit_session

    @app.post("/orders")
    async def create(order: OrderIn, session: AsyncSession = unit_session()) -> OrderOut:
        session.add(Order(...))             # or txguard.current_session() in the services
        ...

``session(**unit options, registry=None)`` is a dependency marker, like ``Query()`` or
``Security()``: use it as a parameter default or in ``Annotated[AsyncSession, session()]``.

Decisions (Django's ``ATOMIC_REQUESTS`` where the SPEC is silent):

- The dependency is a yield dependency with ``scope="function"`` (FastAPI 0.121 and later,
  the minimum this module accepts): FastAPI ends it after the endpoint returned and its
  response was built, **before** the response is sent. The default scope ("request") ends
  after the response is sent, so a failed COMMIT would follow a 200 already on the wire.
  A failed COMMIT raises out of the request: the client gets a 500 (or your exception
  handler's answer), never the success.
- The endpoint raising (``HTTPException`` included, whatever its status) rolls the unit
  back as its ``rollback_for``/``no_rollback_for`` say (rolled back by default). As with
  ``ATOMIC_REQUESTS``, a *returned* response is not inspected: returning
  ``JSONResponse(status_code=409)`` commits. Raise ``HTTPException`` to roll back, or use
  ``txguard.asgi.UnitOfWorkMiddleware``, which judges the response status (as pyramid_tm).
- One unit per request and registry, however many parameters and sub-dependencies ask
  for it: ``session()`` returns the same dependency for the same options and registry
  (cached weakly: a marker nothing uses any more keeps no registry alive), and FastAPI
  caches a dependency per request. Two ``session()`` with *different* options in
  one request (say ``read_only=True`` on the router and the default on the endpoint) are
  refused with ``ConfigurationError``: one request runs in one unit; open a nested
  ``txguard.unit_of_work(propagation=...)`` in code for the part that differs.
- ``txguard.current_session()`` works in the endpoint and in the services it calls, in
  ``async def`` and ``def`` endpoints alike: FastAPI runs ``def`` endpoints in worker
  threads with a copy of the request's context, one step at a time, and the request's
  unit follows that context.
- Async registries (AsyncEngine): the unit opens and commits on the event loop. Sync
  registries (Engine): the unit opens on the event loop (no SQL unless ``read_only`` or
  ``isolation_level`` need a statement at BEGIN) and commits or rolls back in a worker
  thread, so COMMIT never blocks the loop; use ``def`` endpoints with a sync registry.
- In a websocket endpoint the unit spans the socket and ends when the endpoint sends its
  close: the close goes out after the COMMIT, or with code 1011 when it fails (the error
  is raised from ``websocket.close()``), as under ``txguard.asgi.UnitOfWorkMiddleware``.
  An endpoint that returns without closing commits then; a socket refused (closed or
  returned before ``accept``, a 403 for its client) rolls back, as an error status does.
- Background tasks run after the response is sent, so after the commit, outside the unit:
  one that needs the database opens its own ``txguard.unit_of_work()``. The same holds for
  a ``StreamingResponse`` body.
- Messages about the request's unit (a guard's, a ``DisciplineError``) say it was opened at
  the endpoint's definition, the user's line, not at FastAPI's code entering the dependency.
- Options are validated when ``session()`` is called (at import of your routes), not per
  request. ``registry=None`` uses the default registry, looked up at each request.
"""

from __future__ import annotations

import inspect
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable, Hashable
from typing import Any, Final

import anyio
from fastapi import Depends
from starlette.requests import HTTPConnection
from starlette.types import Message
from starlette.websockets import WebSocket

import txguard
from txguard import ConfigurationError, SessionRegistry
from txguard._options import UNIT_OPTION_NAMES, check_names
from txguard._origin import Origin, capture, definition_of
from txguard._registry import Registry, resolve
from txguard._responses import acommit, aveto, commit, veto
from txguard._transaction import Role
from txguard._unit import UnitOfWork, current_unit, follow_context

__all__ = ["session"]

if "scope" not in inspect.signature(Depends).parameters:  # FastAPI before 0.121
    raise ImportError(
        "txguard.fastapi needs FastAPI 0.121 or later (Depends(scope='function') commits "
        "before the response is sent); upgrade: pip install 'txguard[fastapi]'."
    )

_UNITS: Final = "txguard.fastapi.units"  # in the request's ASGI scope: registry -> options key
# (id(registry), options) -> the dependency serving them. Weak: only the routes that use a
# dependency keep it, and with it its registry (so the id stays that registry's meanwhile).
_dependencies: weakref.WeakValueDictionary[tuple[Hashable, ...], Callable[..., AsyncIterator[Any]]] = (
    weakref.WeakValueDictionary()
)


def session(*, registry: SessionRegistry[Any] | None = None, **unit_options: Any) -> Any:
    """Declare a parameter that receives the request's session (see the module docstring).

    ``unit_options`` are those of ``txguard.unit_of_work`` (``mode``, ``read_only``,
    ``isolation_level``, ...), checked here, once. Typed ``Any``, as FastAPI's own
    ``Depends()``, so that ``session: AsyncSession = session()`` type-checks.
    """
    check_names("txguard.fastapi.session()", unit_options, UNIT_OPTION_NAMES)
    txguard.unit_of_work(registry=registry, **unit_options)  # validates every value
    key = (id(registry), *sorted((name, _hashable(value)) for name, value in unit_options.items()))
    dependency = _dependencies.get(key)
    if dependency is None:
        dependency = _dependencies[key] = _dependency(registry, unit_options, key)
    return Depends(dependency, scope="function")


def _hashable(value: object) -> Hashable:
    return (type(value), tuple(value) if isinstance(value, list) else value)


def _dependency(
    registry: SessionRegistry[Any] | None, options: dict[str, Any], key: tuple[Hashable, ...]
) -> Callable[..., AsyncIterator[Any]]:
    described = ", ".join(f"{name}=..." for name in sorted(options)) or "no options"

    async def txguard_unit_session(connection: HTTPConnection) -> AsyncIterator[Any]:
        owner = resolve(registry)
        units: dict[object, tuple[tuple[Hashable, ...], str]] = connection.scope.setdefault(
            _UNITS, {}
        )
        other = units.setdefault(owner, (key, described))
        if other[0] != key:
            raise ConfigurationError(
                f"This request asks for txguard.fastapi.session() twice on {owner!r} with "
                f"different options ({other[1]}; and {described}): one request runs in one "
                "unit. Declare the same options everywhere, or open "
                "txguard.unit_of_work(propagation=...) in code for the part that differs."
            )
        unit = txguard.unit_of_work(registry=owner, **options)
        unit.where = _endpoint(connection)
        if owner.is_async:
            active = unit.session if await unit.aenter(owner) else None
            follow_context(unit)
            socket = _socket_unit(connection, unit, owner, _async_ends(unit))
            try:
                yield active
            except BaseException as exc:
                if socket is None or socket.open:
                    with anyio.CancelScope(shield=True):
                        await unit.__aexit__(type(exc), exc, exc.__traceback__)
                raise
            if socket is not None:
                await socket.end()
            else:
                with anyio.CancelScope(shield=True):
                    await acommit(unit)
            return
        # A sync unit opens here, on the loop, and ends in a worker thread (COMMIT is
        # blocking IO), with its own limiter as FastAPI's sync yield dependencies: an exit
        # never waits for a thread behind requests that wait for the connection it holds.
        # Both ends are shielded: a cancelled request (a timeout's cancel scope) must still
        # roll back and return its connection; older FastAPI releases do not shield them.
        sync_session = unit.session if unit.enter(owner) else None
        follow_context(unit)
        limiter = anyio.CapacityLimiter(1)
        socket = _socket_unit(connection, unit, owner, _sync_ends(unit, limiter))
        try:
            yield sync_session
        except BaseException as exc:
            if socket is None or socket.open:
                with anyio.CancelScope(shield=True):
                    await anyio.to_thread.run_sync(
                        unit.__exit__, type(exc), exc, exc.__traceback__, limiter=limiter
                    )
            raise
        if socket is not None:
            await socket.end()
        else:
            with anyio.CancelScope(shield=True):
                await anyio.to_thread.run_sync(commit, unit, limiter=limiter)

    return txguard_unit_session


_Ends = tuple[Callable[[], Awaitable[None]], Callable[[], Awaitable[None]]]


def _async_ends(unit: UnitOfWork) -> _Ends:
    """How an async unit commits, and how it rolls back as a refused request."""
    return (lambda: acommit(unit)), (lambda: aveto(unit, "the websocket was refused"))


def _sync_ends(unit: UnitOfWork, limiter: anyio.CapacityLimiter) -> _Ends:
    """``_async_ends`` for a sync unit, which ends in a worker thread (COMMIT is blocking IO)."""

    async def commits() -> None:
        await anyio.to_thread.run_sync(commit, unit, limiter=limiter)

    async def refused() -> None:
        await anyio.to_thread.run_sync(veto, unit, "the websocket was refused", limiter=limiter)

    return commits, refused


def _socket_unit(
    connection: HTTPConnection, unit: UnitOfWork, registry: Registry, ends: _Ends
) -> _SocketUnit | None:
    """Hold the close of a websocket endpoint whose unit began here (not one that joined the
    unit of ``UnitOfWorkMiddleware``, which holds the close itself)."""
    if not isinstance(connection, WebSocket) or unit.role is not Role.BEGINS:
        return None
    return _SocketUnit(connection, unit, registry, ends)


class _SocketUnit:
    """A websocket endpoint's unit, ended when the endpoint sends its close, before it goes
    out: the close follows the COMMIT, or is 1011 when it fails."""

    def __init__(
        self, websocket: WebSocket, unit: UnitOfWork, registry: Registry, ends: _Ends
    ) -> None:
        self.unit = unit
        self.registry = registry
        self.commits, self.refused = ends
        self.open = True
        self.accepted = False
        self.downstream = websocket.send
        websocket.send = self.send  # type: ignore[method-assign]

    async def send(self, message: Message) -> None:
        if message["type"] == "websocket.accept":
            self.accepted = True
        elif (
            message["type"] == "websocket.close"
            and self.open
            and current_unit(self.registry) is self.unit
        ):  # a close sent inside a unit nested in the socket's goes out at once
            try:
                await self.end()
            except BaseException:
                await self.downstream({"type": "websocket.close", "code": 1011})
                raise
        await self.downstream(message)

    async def end(self) -> None:
        """Commit an accepted socket's work; roll a refused one's back (its client gets a
        403, an error status)."""
        if not self.open:
            return
        self.open = False
        with anyio.CancelScope(shield=True):
            await (self.commits() if self.accepted else self.refused())


def _endpoint(connection: HTTPConnection) -> Origin:
    """Where the request's unit is said to be opened in messages: its endpoint's definition
    (the user's line, rather than FastAPI's code that enters the dependency)."""
    code = definition_of(connection.scope.get("endpoint"))
    return capture() if code is None else Origin.of_code(code)
