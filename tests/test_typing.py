"""Types users see: decorated signatures survive, sessions are typed by their registry."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

mypy_api = pytest.importorskip("mypy.api")

HERE = Path(__file__).parent / "typing"
SAMPLE = HERE / "decorated.py"


@pytest.fixture(scope="module")
def mypy_output() -> str:
    stdout, stderr, _ = mypy_api.run(["--strict", "--no-incremental", str(SAMPLE)])
    return stdout + stderr


@pytest.mark.parametrize(
    "revealed",
    [
        'def (x: builtins.int, *, y: builtins.str =) -> builtins.float"',
        'def (x: builtins.int) -> typing.Coroutine[Any, Any, builtins.str]"',
        'def (x: builtins.int) -> builtins.bytes"',
        'def (x: builtins.int) -> builtins.int"',
    ],
    ids=["bare", "async-with-options", "registry-bare", "registry-with-options"],
)
def test_decorated_signatures_are_kept(mypy_output: str, revealed: str) -> None:
    """mypy reveals the decorated function's parameters and return type unchanged."""
    plain = revealed.replace("builtins.", "")
    assert revealed in mypy_output or plain in mypy_output, mypy_output


def test_wrong_arguments_are_still_caught(mypy_output: str) -> None:
    """Calling a decorated function with a wrong argument type is a mypy error."""
    assert 'Argument 1 to "a" has incompatible type "str"; expected "int"' in mypy_output
    assert mypy_output.count("error:") == 1, mypy_output


# Typed sessions: user-style apps under both checkers.

APPS = [HERE / name for name in ("sync_app.py", "async_app.py", "service.py")]
MISTAKE = HERE / "missing_await.py"


@pytest.fixture(scope="module")
def apps_mypy() -> str:
    stdout, stderr, _ = mypy_api.run(["--strict", "--no-incremental", *map(str, APPS)])
    return stdout + stderr


@pytest.fixture(scope="module")
def apps_pyright() -> str:
    return _pyright(*APPS)


def _pyright(*files: Path) -> str:
    if shutil.which("pyright") is None and not (Path(sys.executable).parent / "pyright").exists():
        pytest.skip("pyright is not installed (it is in the test extra)")
    exe = shutil.which("pyright") or str(Path(sys.executable).parent / "pyright")
    done = subprocess.run(
        [exe, "--pythonpath", sys.executable, *map(str, files)],
        capture_output=True, text=True, cwd=HERE.parent.parent,
    )
    return done.stdout + done.stderr


SESSION_TYPES = [
    ("sync_app.py:23", "Session"),
    ("sync_app.py:26", "Session"),
    ("sync_app.py:27", "AppSession"),
    ("sync_app.py:28", "Session"),
    ("sync_app.py:29", "Session | AsyncSession"),
    ("sync_app.py:31", "Connection"),
    ("async_app.py:12", "AsyncSession"),
    ("async_app.py:14", "AsyncSession"),
    ("async_app.py:16", "AsyncConnection"),
    ("service.py:13", "AsyncSession"),
]
SESSION_IDS = [
    "with-unit_of_work", "registry-current_session", "sessionmaker-subclass",
    "current_session-given-registry", "current_session-default", "with-connect",
    "async-with-unit_of_work", "async-registry-current_session", "async-with-connect",
    "async_sessionmaker-service",
]


def _revealed(output: str, where: str) -> str:
    """The type a checker revealed at ``file:line``, with module paths stripped."""
    for text in output.splitlines():
        if f"{where}:" in text and ("Revealed type is" in text or "Type of" in text):
            found = text.rsplit(" is ", 1)[1].strip().strip('"')
            return " | ".join(part.rsplit(".", 1)[-1] for part in found.split(" | "))
    return f"<nothing revealed at {where}>"


@pytest.mark.parametrize(("where", "expected"), SESSION_TYPES, ids=SESSION_IDS)
def test_mypy_sees_the_session_class(apps_mypy: str, where: str, expected: str) -> None:
    """mypy --strict reveals the registry's session (or connection) class, never Any."""
    assert _revealed(apps_mypy, where) == expected, apps_mypy


@pytest.mark.parametrize(("where", "expected"), SESSION_TYPES, ids=SESSION_IDS)
def test_pyright_sees_the_session_class(apps_pyright: str, where: str, expected: str) -> None:
    """pyright reveals the registry's session (or connection) class, never Any."""
    assert _revealed(apps_pyright, where) == expected, apps_pyright


def test_user_style_apps_type_check_cleanly(apps_mypy: str, apps_pyright: str) -> None:
    """The sample apps, which use sessions as the README does, have no type errors."""
    assert "error:" not in apps_mypy, apps_mypy
    assert " - error:" not in apps_pyright and "0 errors" in apps_pyright, apps_pyright


def test_mypy_reports_a_missing_await() -> None:
    """An AsyncSession call without ``await`` is an error under mypy --strict."""
    stdout, stderr, _ = mypy_api.run(["--strict", "--no-incremental", str(MISTAKE)])
    assert "missing_await.py:12: error:" in stdout and "unused-coroutine" in stdout, stdout + stderr


def test_pyright_reports_a_missing_await() -> None:
    """An AsyncSession call without ``await`` is reported by pyright."""
    output = _pyright(MISTAKE)
    assert "missing_await.py:12:" in output and "reportUnusedCoroutine" in output, output
