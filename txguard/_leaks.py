"""Leak detector (SPEC section 7). Being written: see issue 4."""

from __future__ import annotations

__all__ = ["Leak", "LeakDetector"]


class Leak:
    pass


class LeakDetector:
    pass
