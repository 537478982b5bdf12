"""ASGI integration: a unit of work per HTTP request, for any ASGI app.

    app.add_middleware(txguard.asgi.UnitOfWorkMiddleware, registry=registry)   # Starlette, FastAPI
    app = txguard.asgi.UnitOfWorkMiddleware(app, registry=registry)           # Litestar, Quart, ...

Decisions (pyramid_tm and advanced-alchemy's Litestar "autocommit" handler where the SPEC
is silent):

- A pure ASGI middleware: it wraps ``send`` and decides when ``http.response.start`` goes
  out. A status below 400 commits first, then the start is sent; 400 and above rolls
  back, whatever ``rollback_for`` says (a commit veto, as pyramid_tm). The response's
  status is the judge, so an exception the framework turned into a 404 or 422 response
  rolls back, and one it turned into a redirect commits.
- A failed COMMIT replaces the response: the client gets a bare 500, the rest of the
  app's response is dropped, and the error is logged (logger ``txguard``, level ERROR)
  rather than raised: raised after a response, the server would drop the connection.
- An exception that leaves the app before the response started ends the unit as its
  ``rollback_for``/``no_rollback_for`` say (rolled back by default). An app that returns
  without sending a response rolls back.
- Streaming responses are decided at the start: the unit has ended before the body is
  produced, so the body runs outside it (a body that needs the database opens its own
  ``txguard.unit_of_work()``). Background tasks run after the response, so after the commit.
- The unit begins and ends in the middleware's own task, and the app runs in a task of its
  own that the middleware's task awaits (cancelled with it: a cancelled request rolls back).
  The response's start, from whichever task the framework sends it (Starlette sends a
  stream's and a file's from a child task when the server speaks ASGI < 2.4, as uvicorn
  does), waits there while the middleware's task commits or rolls back, then goes out. So
  the COMMIT never runs in a framework's child task, which Starlette may cancel when the
  client disconnects, and the cross_task guard sees the task that began the transaction
  end it.
- The request's unit follows its context (``follow_context``), for threads and for the
  cross_task guard: frameworks move a request between tasks (``BaseHTTPMiddleware`` runs
  the endpoint in ``call_next``'s child task, Quart runs handlers in tasks of their own),
  so a task started inside the request may take its turn with the session while the task
  holding it waits outside SQLAlchemy. Concurrent use is still reported: a second task
  while the first still holds it (``asyncio.gather`` of two services), a task started
  outside the request, and any use while another task is inside SQLAlchemy (a statement,
  flush or COMMIT in flight), the unit's own COMMIT included: at "error" it is refused
  while a task the endpoint did not await is still inside the session. Units opened in
  code keep the guard's stricter rule (a child task may use the session only while its
  parent awaits it alone in library code): there the child task is the user's choice, here
  the framework's.
- Only ``http`` scopes get a unit by default; ``lifespan`` never does, and ``websocket``
  scopes do when asked (``scope_types=("http", "websocket")``): a websocket's unit commits
  when the app sends ``websocket.close`` (the close goes out after the COMMIT, as an HTTP
  start does; a failed COMMIT closes with 1011 instead) or returns without one, and rolls
  back when the app raises first. A websocket the app refused (closed or returned before
  ``websocket.accept``: its client gets a 403) rolls back, as an error status does. The
  session is closed for good once the close went out.
  A close sent from inside a unit nested in the socket's (a ``txguard.fastapi.session()``
  dependency, which joins it, or a ``unit_of_work()`` block) goes out at once, and the
  unit commits when the app returns: committing under a unit still open would end that
  unit's transaction beneath it.
- The registry must be an async one (an AsyncEngine or async_sessionmaker): an ASGI app's
  handlers run on the event loop, where a sync Session's IO would block every request.
  A sync registry is refused with ``ConfigurationError``. For sync ``def`` endpoints in
  FastAPI use ``txguard.fastapi.session()``, which serves sync registries.
- ``txguard.current_session()`` works in the handlers and the services they call
  (Starlette's ``def`` handlers included: they run in worker threads with a copy of the
  request's context, and the unit follows it). Options are validated when the middleware
  is created; ``registry=None`` uses the default registry, looked up at each request.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Collection, MutableMapping
from functools import partial
from types import CodeType
from typing import Any, Final

import txguard
from txguard import ConfigurationError, SessionRegistry
from txguard._async import completed
from txguard._options import UNIT_OPTION_NAMES, check_names
from txguard._origin import DeferredOrigin, capture, definition_of
from txguard._registry import Registry, resolve
from txguard._responses import acommit, aend_by_status, aveto
from txguard._unit import UnitOfWork, current_unit, follow_context

__all__ = ["UnitOfWorkMiddleware"]

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

logger = logging.getLogger("txguard")

_SCOPE_TYPES: Final = frozenset({"http", "websocket"})
_ERROR_BODY: Final = b"Internal Server Error"
# What the unit ends before it goes out: an HTTP response's start, a websocket's close.
_HELD: Final = {True: "http.response.start", False: "websocket.close"}


class UnitOfWorkMiddleware:
    """Run each HTTP request of an ASGI app in one unit of work (see the module docstring)."""

    def __init__(
        self,
        app: ASGIApp,
        /,  # as Starlette's _MiddlewareFactory, or mypy refuses app.add_middleware(this, ...)
        registry: SessionRegistry[Any] | None = None,
        *,
        scope_types: Collection[str] = ("http",),
        **unit_options: Any,
    ) -> None:
        check_names("UnitOfWorkMiddleware()", unit_options, UNIT_OPTION_NAMES)
        txguard.unit_of_work(registry=registry, **unit_options)  # validates every value
        unknown = sorted(set(scope_types) - _SCOPE_TYPES)
        if unknown or isinstance(scope_types, str):
            raise ConfigurationError(
                "UnitOfWorkMiddleware(scope_types=...) takes a collection of 'http' and "
                "'websocket'; lifespan scopes never get a unit."
            )
        if registry is not None:
            _check_async(registry)
        self.app = app
        self.registry = registry
        self.scope_types = frozenset(scope_types)
        self.unit_options = unit_options

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in self.scope_types:
            await self.app(scope, receive, send)
            return
        registry = _check_async(resolve(self.registry))
        unit = txguard.unit_of_work(registry=registry, **self.unit_options)
        unit.where = DeferredOrigin(partial(_endpoint_code, scope), capture())
        await unit.aenter(registry)
        follow_context(unit)
        request = _Request(unit, registry, send, scope["type"] == "http")
        await request.run(self.app(scope, receive, request.send))


def _endpoint_code(scope: Scope) -> CodeType | None:
    """The code of the endpoint the framework routed the request to, once it has.

    Messages about the request's unit name it rather than the framework's code that ran
    the middleware: Starlette and FastAPI put the endpoint in ``scope["endpoint"]``,
    Litestar its handler in ``scope["route_handler"]``.
    """
    endpoint = scope.get("endpoint")
    if endpoint is None:
        endpoint = getattr(scope.get("route_handler"), "fn", None)
    return definition_of(endpoint)


class _Request:
    """One request: its unit, the app's task, and the ``send`` that holds the response's
    start until the middleware's task has ended the unit."""

    def __init__(self, unit: UnitOfWork, registry: Registry, send: Send, http: bool) -> None:
        loop = asyncio.get_running_loop()
        self.unit = unit
        self.registry = registry
        self.downstream = send
        self.http = http
        self.open = True  # the unit has not ended yet
        # The message the unit waits for: the response's start, or a websocket's close.
        self.start: Message | None = None
        self.woken: asyncio.Future[None] = loop.create_future()  # the start came, or the app ended
        self.decided: asyncio.Future[None] = loop.create_future()  # the unit ended: the start may go
        self.dropped = False  # the app's messages go nowhere (a failed COMMIT answered 500)
        self.failed = False  # the COMMIT failed: the start's sender answers 500 (or 1011) instead
        self.accepted = False  # a websocket's handshake was accepted (else it was refused: 403)

    async def run(self, app: Awaitable[None]) -> None:
        """Run the app in a task of its own, and end the unit in this one.

        This task waits for the app's task alone (it runs no app code), so the unit begins
        and ends in the task that opened it, wherever the app sends the start from.
        """
        task = asyncio.ensure_future(app)
        task.add_done_callback(self._wake)
        try:
            await self.woken
            if self.start is not None:
                await self._decide(self.start)
            await task
        except BaseException as exc:
            if not task.done():  # this task was cancelled: so is the app's, to its end
                task.cancel()
                await completed(task)
            if self.open:
                self.open = False
                await self.unit.__aexit__(type(exc), exc, exc.__traceback__)
            raise
        finally:
            if not self.decided.done():  # never sent: the app's start and body go nowhere
                self.dropped = True
                self.decided.set_result(None)
        if self.open:
            self.open = False
            if self.http:  # returned without a response
                await aveto(self.unit, "the app sent no response")
            else:  # a websocket that returned
                await self._end_socket()

    def _wake(self, _: object = None) -> None:
        if not self.woken.done():
            self.woken.set_result(None)

    async def _decide(self, start: Message) -> None:
        """End the unit as the response's status says (an accepted websocket's close
        commits), then let the start (the close) go out."""
        self.open = False
        try:
            if self.http:
                await aend_by_status(self.unit, start["status"])
            else:
                await self._end_socket()
        except Exception:
            self.dropped = self.failed = True
            answer = "answered 500" if self.http else "closed the websocket with 1011"
            logger.error("txguard: the request's COMMIT failed; %s", answer, exc_info=True)
        finally:
            self.decided.set_result(None)

    async def _end_socket(self) -> None:
        """Commit an accepted websocket's work (in either mode); roll a refused one's back,
        as the 403 its client gets is an error status."""
        if self.accepted:
            await acommit(self.unit)
        else:
            await aveto(self.unit, "the websocket was refused")

    async def send(self, message: Message) -> None:
        if self.dropped:
            return
        if not self.http and message["type"] == "websocket.accept":
            self.accepted = True
        if self.start is None and message["type"] == _HELD[self.http] and (
            self.http or current_unit(self.registry) is self.unit
        ):  # a close sent from inside a unit nested in the socket's goes out at once
            self.start = message
            self._wake()
            await asyncio.shield(self.decided)
            if self.dropped:
                if self.failed:
                    await _send_error(self.downstream, self.http)
                return
        await self.downstream(message)


async def _send_error(send: Send, http: bool) -> None:
    if not http:  # 1011: the server met an error that kept it from fulfilling the request
        await send({"type": "websocket.close", "code": 1011})
        return
    headers = [(b"content-type", b"text/plain; charset=utf-8"),
               (b"content-length", str(len(_ERROR_BODY)).encode())]
    await send({"type": "http.response.start", "status": 500, "headers": headers})
    await send({"type": "http.response.body", "body": _ERROR_BODY})


def _check_async(registry: Registry) -> Registry:
    if not registry.is_async:
        raise ConfigurationError(
            f"UnitOfWorkMiddleware got the sync registry {registry!r}, but an ASGI app's "
            "handlers run on the event loop: build the registry on an AsyncEngine or "
            "async_sessionmaker (for sync FastAPI endpoints, use txguard.fastapi.session())."
        )
    return registry
