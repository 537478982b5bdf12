"""Which statements change data or schema: one classifier, for read_only and discard warnings.

SQLAlchemy knows the kind of a statement it compiled (``context.isinsert``, ``isupdate``,
``isdelete``, ``isddl``) or was given (``statement.is_dml``, a DDL construct), and is asked
first. SQL text (``text()``, ``exec_driver_sql()``, the compiled string of anything else)
is classified by its main keyword: leading comments and parentheses are skipped, and so is
a ``WITH [RECURSIVE]`` clause, whose CTE bodies are classified too (PostgreSQL runs
``WITH t AS (DELETE ... RETURNING ...) SELECT ...``), and ``EXPLAIN ANALYZE``, which runs
its statement; each statement of a multi-statement string counts. Strings, quoted
identifiers and comments are lexed, so a keyword inside a literal is not taken for one.
Function calls that write (``SELECT f()``, ``CALL``) cannot be seen in the text; the
server's READ ONLY transaction covers them on PostgreSQL and MariaDB.

The same lexing tells SQL that ends the current transaction (``COMMIT``, ``END``,
``ROLLBACK`` but not ``ROLLBACK TO SAVEPOINT``, ``ABORT``, ``PREPARE TRANSACTION``) from SQL
that merely contains the word; ``ENDS_FIRST`` is the cheap test a caller on every statement
makes first.
"""

from __future__ import annotations

import re
from typing import Any, Final

from sqlalchemy.orm.context import FromStatement
from sqlalchemy.schema import ExecutableDDLElement
from sqlalchemy.sql.elements import TextClause
from sqlalchemy.sql.selectable import TextualSelect

__all__ = [
    "ENDS_FIRST", "WRITE_KEYWORDS", "ends_transaction", "is_write_sql", "is_write_statement",
    "is_write_execution",
]

WRITE_KEYWORDS: Final = frozenset(
    {
        "INSERT", "UPDATE", "DELETE", "MERGE", "REPLACE", "UPSERT", "CREATE", "DROP", "ALTER",
        "TRUNCATE", "RENAME", "GRANT", "REVOKE", "COMMENT",
    }
)

# The common case: plain SQL whose first word decides and which holds no second statement.
_HEAD: Final = re.compile(r"\s*([A-Za-z_]\w*)")

# What the tokenizer blanks out: comments (group 1) become a space, and literals and quoted
# names one opaque token. Two readings: standard SQL (PostgreSQL, SQLite; E'' strings are
# PostgreSQL's escape strings) and MySQL/MariaDB, where ``#`` starts a comment, a backslash
# escapes a quote and ``/*! ... */`` runs its content. SQL with one of those characters is
# classified under both, and a write in either counts.
_OPAQUE: Final = r"""
    ( --[^\n]* | {mysql_comments} /\*.*?(?:\*/|\Z) )
  | [Ee]'(?:''|\\.|[^'\\])*'? | {string}
  | "(?:""|[^"])*"? | `(?:``|[^`])*`?
  | \$(?P<tag>[A-Za-z_]\w*|)\$.*?(?:\$(?P=tag)\$|\Z)
"""
_STANDARD: Final = re.compile(
    _OPAQUE.format(mysql_comments="", string=r"'(?:''|[^'])*'?"), re.VERBOSE | re.DOTALL
)
_MYSQL: Final = re.compile(
    _OPAQUE.format(
        mysql_comments=r"\#[^\n]* | /\*M?!\d* | \*/ |", string=r"'(?:''|\\.|[^'\\])*'?"
    ),
    re.VERBOSE | re.DOTALL,
)
_MYSQL_SYNTAX: Final = re.compile(r"[\\#]|/\*M?!")
_PUNCTUATION: Final = re.compile(r"([(),;])")
_TEXT_WRAPPERS: Final = (TextualSelect, FromStatement)
_LOOK_FURTHER: Final = frozenset({"WITH", "EXPLAIN", "ANALYZE"})  # the first word does not decide


def is_write_sql(sql: str) -> bool:
    """Say whether SQL text changes data or schema (INSERT, UPDATE, DELETE, DDL, ...)."""
    head = _HEAD.match(sql)
    if head is not None:
        keyword = head.group(1).upper()
        if keyword in WRITE_KEYWORDS:
            return True
        if keyword not in _LOOK_FURTHER and ";" not in sql:
            return False
    return _writes(_tokens(sql, _STANDARD)) or (
        _MYSQL_SYNTAX.search(sql) is not None and _writes(_tokens(sql, _MYSQL))
    )


_END_KEYWORDS: Final = frozenset({"COMMIT", "END", "ROLLBACK", "ABORT", "PREPARE"})
# The first character of SQL that may end the transaction in its first statement (a later
# one follows a semicolon): a keyword above, blank space, a comment or a parenthesis.
ENDS_FIRST: Final = frozenset("CcEeRrAaPp \t\r\n(/-#")


def ends_transaction(sql: str) -> str | None:
    """Return the statement (``COMMIT``, ``ROLLBACK``, ...) of ``sql`` that ends the current
    transaction, or None. A ``CREATE`` (a procedure's or trigger's body) ends nothing."""
    head = _HEAD.match(sql)
    if head is not None:
        keyword = head.group(1).upper()
        if keyword == "CREATE" or (keyword not in _END_KEYWORDS and ";" not in sql):
            return None
    found = _ending(_tokens(sql, _STANDARD))
    if found is None and _MYSQL_SYNTAX.search(sql) is not None:
        found = _ending(_tokens(sql, _MYSQL))
    return found


def _ending(tokens: list[str]) -> str | None:
    """Return the first top-level statement of ``tokens`` that ends the transaction."""
    start = depth = 0
    for index, token in enumerate([*tokens, ";"]):
        if token == "(":
            depth += 1
        elif token == ")":
            depth = max(depth - 1, 0)
        elif token == ";" and depth == 0:
            statement = tokens[start:index]
            if start == 0 and statement[:1] == ["CREATE"]:
                return None
            found = _statement_ends(statement)
            if found is not None:
                return found
            start = index + 1
    return None


def _statement_ends(tokens: list[str]) -> str | None:
    head = _at(tokens, 0)
    if head not in _END_KEYWORDS:
        return None
    rest = [token for token in tokens[1:] if token not in ("WORK", "TRANSACTION")]
    if head == "PREPARE":
        return "PREPARE TRANSACTION" if _at(tokens, 1) == "TRANSACTION" else None
    if head in ("ROLLBACK", "ABORT") and _at(rest, 0) == "TO":
        return None  # ROLLBACK TO [SAVEPOINT] name: the transaction goes on
    if _at(rest, 0) == "PREPARED":
        return None  # COMMIT/ROLLBACK PREPARED 'id': another, prepared transaction
    if head == "END" and rest[:1] not in ([], ["AND"]):
        return None  # END of something else (END IF, END LOOP, END $$ ...)
    return head


def is_write_statement(statement: Any) -> bool:
    """Say whether a statement given to ``Session.execute`` (a construct or ``text()``) writes."""
    if getattr(statement, "is_dml", False) or isinstance(statement, ExecutableDDLElement):
        return True
    if isinstance(statement, _TEXT_WRAPPERS):  # text(...).columns(), select().from_statement()
        statement = statement.element
    return isinstance(statement, TextClause) and is_write_sql(statement.text)


def is_write_execution(context: Any, statement: str) -> bool:
    """Say whether a statement about to reach the cursor writes (``before_cursor_execute``)."""
    if context is not None and (
        context.isinsert or context.isupdate or context.isdelete or context.isddl
    ):
        return True
    return is_write_sql(statement)


def _tokens(sql: str, opaque: re.Pattern[str]) -> list[str]:
    """Return the words of ``sql`` upper-cased, ``( ) , ;`` apart, and ``''`` per literal."""
    blanked = opaque.sub(_blank, sql)
    return _PUNCTUATION.sub(r" \1 ", blanked).upper().split()


def _blank(match: re.Match[str]) -> str:
    return " " if match.group(1) is not None else " '' "


def _writes(tokens: list[str]) -> bool:
    """Say whether any statement of ``tokens`` (split at top-level semicolons) writes."""
    start = depth = 0
    for index, token in enumerate(tokens):
        if token == "(":
            depth += 1
        elif token == ")":
            depth = max(depth - 1, 0)
        elif token == ";" and depth == 0:
            if _statement_writes(tokens[start:index]):
                return True
            start = index + 1
    return _statement_writes(tokens[start:])


def _statement_writes(tokens: list[str]) -> bool:
    """Classify one statement by its main keyword, looking through a WITH clause."""
    index = 0
    while index < len(tokens) and tokens[index] == "(":
        index += 1
    head = _at(tokens, index)
    if head == "EXPLAIN" or head == "ANALYZE":
        return _analyzed_statement_writes(tokens, index)
    if head != "WITH":
        return head in WRITE_KEYWORDS
    index += 1
    if _at(tokens, index) == "RECURSIVE":
        index += 1
    while index < len(tokens):
        index += 1  # the CTE's name
        if _at(tokens, index) == "(":
            index = _after_group(tokens, index)  # its column list
        if _at(tokens, index) != "AS":
            return False  # not a CTE list SQL knows; no keyword of a write here
        index += 1
        if _at(tokens, index) == "NOT":
            index += 1
        if _at(tokens, index) == "MATERIALIZED":
            index += 1
        if _at(tokens, index) != "(":
            return False
        end = _after_group(tokens, index)
        if _writes(tokens[index + 1 : end - 1]):
            return True
        index = end
        if _at(tokens, index) != ",":
            break
        index += 1
    return _statement_writes(tokens[index:])


def _analyzed_statement_writes(tokens: list[str], index: int) -> bool:
    """Classify ``EXPLAIN ANALYZE stmt`` (PostgreSQL, MySQL) and ``ANALYZE stmt`` (MariaDB),
    which run the statement; a plain ``EXPLAIN`` only plans it."""
    for position in range(index + 1, len(tokens)):
        token = tokens[position]
        if token in WRITE_KEYWORDS or token == "WITH":
            analyzed = tokens[index] == "ANALYZE" or "ANALYZE" in tokens[index + 1 : position]
            return analyzed and _statement_writes(tokens[position:])
    return False


def _after_group(tokens: list[str], index: int) -> int:
    """Return the index after the parenthesised group that opens at ``index``."""
    depth = 0
    for position in range(index, len(tokens)):
        token = tokens[position]
        if token == "(":
            depth += 1
        elif token == ")":
            depth -= 1
            if depth == 0:
                return position + 1
    return len(tokens)


def _at(tokens: list[str], index: int) -> str:
    return tokens[index] if index < len(tokens) else ""
