"""Misuse guards (SPEC section 6). Being written: see issue 3."""

from __future__ import annotations

from typing import Any

__all__ = ["install", "uninstall"]


def install(**levels: Any) -> None:
    raise NotImplementedError("txguard.install() lands with the guards issue")


def uninstall() -> None:
    raise NotImplementedError("txguard.uninstall() lands with the guards issue")
