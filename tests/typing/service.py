"""A FastAPI-style async service: the registry configured once, sessions used in handlers."""
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import async_sessionmaker, create_async_engine

import txguard

db = txguard.configure(async_sessionmaker(create_async_engine("sqlite+aiosqlite://")))


@db.transactional
async def create_user(name: str) -> int:
    session = db.current_session()
    reveal_type(session)
    result = await session.execute(sa.text("select 1"))
    return len(result.all())


async def handler(name: str) -> dict[str, int]:
    return {"id": await create_user(name)}
