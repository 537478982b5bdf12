"""Checked by tests/test_typing.py with mypy: types must survive @transactional."""
import sqlalchemy as sa
import txguard
reg = txguard.SessionRegistry(sa.create_engine("sqlite://"))
@txguard.transactional
def a(x: int, *, y: str = "") -> float: return 1.0
@txguard.transactional(retries=2)
async def b(x: int) -> str: return ""
@reg.transactional
def c(x: int) -> bytes: return b""
@reg.transactional(read_only=True)
def d(x: int) -> int: return x
reveal_type(a); reveal_type(b); reveal_type(c); reveal_type(d)
a("no")
