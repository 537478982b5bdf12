"""An async app as users write it: checked by tests/test_typing.py with mypy and pyright."""
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import create_async_engine

import txguard

db = txguard.SessionRegistry(create_async_engine("sqlite+aiosqlite://"))


async def main() -> None:
    async with txguard.unit_of_work(registry=db) as session:
        reveal_type(session)
        await session.execute(sa.text("select 1"))
    reveal_type(db.current_session())
    async with txguard.connect(registry=db) as conn:
        reveal_type(conn)
        await conn.execute(sa.text("select 1"))
