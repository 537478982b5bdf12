"""txguard: transaction discipline for SQLAlchemy 2.x.

Units of work (``unit_of_work``, ``@transactional``) with Spring-style propagation over
the real ``Session``/``AsyncSession``, guards that catch mixed begin-once and
commit-as-you-go use, and a leak detector with a pytest plugin.
"""

from typing import TYPE_CHECKING, Any

from ._errors import (
    ConfigurationError,
    CrossTaskWarning,
    CrossThreadWarning,
    DisciplineError,
    LeakedConnectionWarning,
    LeakedSessionWarning,
    LeakError,
    LongTransactionWarning,
    MixedBeginError,
    MixedBeginWarning,
    ReadOnlyTransactionError,
    TransactionNotAllowedError,
    TransactionRequiredError,
    TxGuardError,
    TxGuardWarning,
    UncommittedWorkWarning,
    UnexpectedRollbackError,
)
from ._options import Mode, Propagation

if TYPE_CHECKING:
    from ._connect import connect
    from ._guards import install, uninstall
    from ._hooks import on_commit, on_rollback
    from ._leaks import Leak, LeakDetector
    from ._session_registry import SessionRegistry, configure, current_session, in_transaction
    from ._retry import is_retryable
    from ._transactional import transactional
    from ._unit import UnitOfWork, unit_of_work

# The rest loads on first use: `-W error::txguard.UncommittedWorkWarning` imports this
# package at interpreter start, and the pytest plugin imports it in every test run.
_LAZY = {
    "connect": "_connect",
    "install": "_guards",
    "uninstall": "_guards",
    "on_commit": "_hooks",
    "on_rollback": "_hooks",
    "Leak": "_leaks",
    "LeakDetector": "_leaks",
    "SessionRegistry": "_session_registry",
    "configure": "_session_registry",
    "current_session": "_session_registry",
    "in_transaction": "_session_registry",
    "is_retryable": "_retry",
    "transactional": "_transactional",
    "UnitOfWork": "_unit",
    "unit_of_work": "_unit",
}


def __getattr__(name: str) -> Any:
    module_name = _LAZY.get(name)
    if module_name is None:
        raise AttributeError(f"module 'txguard' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(f".{module_name}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


__version__ = "0.1.0.dev0"

__all__ = [
    "ConfigurationError",
    "CrossTaskWarning",
    "CrossThreadWarning",
    "DisciplineError",
    "Leak",
    "LeakDetector",
    "LeakError",
    "LeakedConnectionWarning",
    "LeakedSessionWarning",
    "LongTransactionWarning",
    "MixedBeginError",
    "MixedBeginWarning",
    "Mode",
    "Propagation",
    "ReadOnlyTransactionError",
    "SessionRegistry",
    "TransactionNotAllowedError",
    "TransactionRequiredError",
    "TxGuardError",
    "TxGuardWarning",
    "UncommittedWorkWarning",
    "UnexpectedRollbackError",
    "UnitOfWork",
    "configure",
    "connect",
    "current_session",
    "in_transaction",
    "install",
    "is_retryable",
    "on_commit",
    "on_rollback",
    "transactional",
    "uninstall",
    "unit_of_work",
]
