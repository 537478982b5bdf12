"""The mistake typed sessions exist for: an async session's call without ``await``."""
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import create_async_engine

import txguard

db = txguard.configure(create_async_engine("sqlite+aiosqlite://"))


async def forgot() -> None:
    async with db.unit_of_work() as session:
        session.execute(sa.text("select 1"))
