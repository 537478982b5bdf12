"""The ASGI recipe's calls as users write them: checked by tests/test_adversary_adv3.py with
mypy --strict (no error expected). FastAPI's add_middleware is Starlette's."""
from starlette.applications import Starlette
from sqlalchemy.ext.asyncio import create_async_engine

import txguard
from txguard.asgi import UnitOfWorkMiddleware

registry = txguard.SessionRegistry(create_async_engine("sqlite+aiosqlite://"))

app = Starlette()
app.add_middleware(UnitOfWorkMiddleware, registry=registry)
app.add_middleware(UnitOfWorkMiddleware, registry=registry, scope_types=("http", "websocket"))
app.add_middleware(UnitOfWorkMiddleware, registry=registry, mode="commit_as_you_go")
wrapped = UnitOfWorkMiddleware(Starlette(), registry=registry)  # Litestar, Quart: wrap the app
positional = UnitOfWorkMiddleware(Starlette(), registry)
