"""txguard: transaction discipline for SQLAlchemy 2.x.

Units of work (``unit_of_work``, ``@transactional``) with Spring-style propagation over
the real ``Session``/``AsyncSession``, guards that catch mixed begin-once and
commit-as-you-go use, and a leak detector with a pytest plugin.
"""

from ._connect import connect
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
from ._guards import install, uninstall
from ._hooks import on_commit, on_rollback
from ._leaks import Leak, LeakDetector
from ._options import Mode, Propagation
from ._registry import SessionRegistry, configure, current_session, in_transaction
from ._retry import is_retryable
from ._transactional import transactional
from ._unit import UnitOfWork, unit_of_work

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
