"""Framework integrations are optional: the core imports no framework (SPEC section 10)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

FRAMEWORKS = ("flask", "celery", "fastapi", "starlette")
INTEGRATIONS = ("flask", "celery", "fastapi", "asgi")  # txguard modules named for a framework
ROOT = Path(__file__).resolve().parent.parent

CHECK = f"""
import importlib, pkgutil, sys
import txguard
for module in pkgutil.iter_modules(txguard.__path__):
    if module.name not in {INTEGRATIONS!r}:
        importlib.import_module("txguard." + module.name)
for name in txguard.__all__:
    getattr(txguard, name)
print(sorted(m for m in sys.modules if m.split(".")[0] in {FRAMEWORKS!r}))
"""


def test_importing_txguard_and_every_core_module_imports_no_framework() -> None:
    """`import txguard` (every core module, every public name) loads no web or task framework."""
    result = subprocess.run(
        [sys.executable, "-c", CHECK], cwd=ROOT, capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == "[]"


def test_each_integration_imports_only_its_own_framework() -> None:
    """Each integration loads its own framework only: Flask, none, FastAPI (with Starlette), none."""
    script = (
        "import sys, importlib; importlib.import_module(sys.argv[1]); "
        f"print(sorted(m for m in {FRAMEWORKS!r} if m in sys.modules))"
    )
    found = {
        module: subprocess.run(
            [sys.executable, "-c", script, module], cwd=ROOT, capture_output=True, text=True,
            check=True,
        ).stdout.strip()
        for module in ("txguard.flask", "txguard.celery", "txguard.fastapi", "txguard.asgi")
    }
    assert found == {
        "txguard.flask": "['flask']",
        "txguard.celery": "[]",
        "txguard.fastapi": "['fastapi', 'starlette']",
        "txguard.asgi": "[]",
    }
