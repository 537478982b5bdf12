"""Flask integration: one unit of work per request, committed before the response is returned.

    app = Flask(__name__)
    txguard.flask.TxGuard(app, registry=registry)       # or TxGuard(registry=...).init_app(app)

    @app.post("/orders")
    def create_order():
        txguard.current_session().add(Order(...))       # in the view and the services it calls
        return {"ok": True}, 201

Decisions (Django's ``ATOMIC_REQUESTS`` and pyramid_tm where the SPEC is silent):

- The unit opens in ``before_request`` and ends in ``after_request``, on the final response:
  a status below 400 commits, 400 and above (``abort(400)``, a returned 409, an error
  handler's response) rolls back whatever ``rollback_for`` says, as pyramid_tm's commit veto.
  TxGuard's ``after_request`` runs after the ones registered later (Flask runs them in
  reverse), so create it before registering your own.
- An exception that no error handler handles ends the unit at once (Flask's
  ``got_request_exception``), judged by the unit's ``rollback_for``/``no_rollback_for``
  (rolled back by default), before the 500 response is made or, under ``TESTING``, the
  exception propagates: the same outcome in tests and in production. An exception an error
  handler turns into a response is judged by that response's status.
- A failed COMMIT raises out of ``after_request``, so Flask answers 500 (or, under
  ``TESTING``, the test client raises it): the client never gets the success response.
  ``on_commit`` callbacks run right after the commit, before the response is returned; one
  that raises gives a 500 too, although the data stays committed (SPEC section 4).
- ``teardown_request`` closes a unit still open (a ``BaseException``, a failure in Flask
  itself) by rolling it back: by then the response may be gone, so teardown never commits.
- Streaming responses are decided at the start, as in Django: the unit commits (or rolls
  back) when the view returns the response, before the body is produced. A generator that
  needs the database opens its own ``txguard.unit_of_work()``.
- Begin once (the default): a view calling ``session.commit()`` gets ``DisciplineError``
  (a 500; the unit rolls back). Opt into commit-as-you-go for every request with
  ``TxGuard(app, mode="commit_as_you_go")``, or for one piece of work with
  ``with txguard.unit_of_work(propagation="requires_new", mode="commit_as_you_go")``.
- Flask calls views synchronously, so the registry must be a sync one (an ``Engine`` or a
  ``sessionmaker``). ``registry=None`` uses the default registry (``txguard.configure``),
  looked up at each request.

Flask-SQLAlchemy: build the registry on its engine and session class inside the app context,
and use ``txguard.current_session()`` in views (``db.session`` stays Flask-SQLAlchemy's own
session, outside the unit)::

    with app.app_context():
        registry = txguard.SessionRegistry(
            sessionmaker(db.engine, class_=flask_sqlalchemy.session.Session, db=db)
        )
    TxGuard(app, registry=registry)
"""

from __future__ import annotations

from typing import Any, Final

from flask import Flask, Response, current_app, got_request_exception, request

import txguard
from txguard import ConfigurationError, SessionRegistry, UnitOfWork
from txguard._options import UNIT_OPTION_NAMES, check_names
from txguard._origin import Origin, capture, definition_of
from txguard._registry import Registry, resolve
from txguard._responses import end_by_status, veto

__all__ = ["TxGuard"]

_KEY: Final = "txguard"
_UNIT: Final = "txguard.unit"  # the request's unit, in the WSGI environ (one per request)


class TxGuard:
    """Run each request of a Flask app in one unit of work (see the module docstring).

    ``unit_options`` are those of ``txguard.unit_of_work`` (``mode``, ``read_only``,
    ``isolation_level``, ...), checked here, once.
    """

    def __init__(
        self, app: Flask | None = None, registry: SessionRegistry[Any] | None = None, **unit_options: Any
    ) -> None:
        check_names("TxGuard()", unit_options, UNIT_OPTION_NAMES)
        txguard.unit_of_work(registry=registry, **unit_options)  # validates every value
        if registry is not None:
            _refuse_async(registry)
        self.registry = registry
        self.unit_options = unit_options
        if app is not None:
            self.init_app(app)

    def init_app(self, app: Flask) -> None:
        """Register the request hooks on ``app``; its state lives in ``app.extensions``."""
        if _KEY in app.extensions:
            raise ConfigurationError(
                f"The Flask app {app.name!r} already has a txguard.flask.TxGuard; call "
                "init_app() once per app."
            )
        app.extensions[_KEY] = self
        self.where = capture()  # the user's TxGuard(app) or init_app(app)
        app.before_request(self._begin)
        app.after_request(self._end)
        app.teardown_request(self._close)
        got_request_exception.connect(self._failed, app, weak=False)

    def _begin(self) -> None:
        registry = resolve(self.registry)
        _refuse_async(registry)
        unit = txguard.unit_of_work(registry=registry, **self.unit_options)
        unit.where = _view_origin(self.where)
        unit.enter(registry)
        request.environ[_UNIT] = unit

    def _end(self, response: Response) -> Response:
        unit = _take_unit()
        if unit is not None:
            end_by_status(unit, response.status_code)  # a failed COMMIT raises: Flask answers 500
        return response

    def _failed(self, sender: Flask, exception: Exception, **extra: Any) -> None:
        unit = _take_unit()
        if unit is not None:
            unit.__exit__(type(exception), exception, exception.__traceback__)

    def _close(self, exc: BaseException | None) -> None:
        unit = _take_unit()
        if unit is not None:
            veto(unit, "the request ended without a response")


def _refuse_async(registry: Registry) -> None:
    if registry.is_async:
        raise ConfigurationError(
            f"TxGuard got the async registry {registry!r}, but Flask calls views "
            "synchronously: build the registry on a sync Engine or sessionmaker."
        )


def _view_origin(installed_at: Origin) -> Origin:
    """Where the request's unit is said to be opened in messages: its view's definition
    (the user's line, rather than Flask's dispatch code that runs before_request), or, for
    a request no view matched (a 404 or 405 its error handler answers), the line that
    installed TxGuard on the app."""
    view = current_app.view_functions.get(request.endpoint or "")
    view_class = getattr(view, "view_class", None)  # a class-based view (View.as_view)
    if view_class is not None:
        view = getattr(view_class, request.method.lower(), None) or view_class.dispatch_request
    code = definition_of(view)
    return installed_at if code is None else Origin.of_code(code)


def _take_unit() -> UnitOfWork | None:
    unit: UnitOfWork | None = request.environ.pop(_UNIT, None)
    return unit
