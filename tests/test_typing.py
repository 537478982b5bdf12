"""Type hints survive decoration: mypy sees the wrapped function's own signature."""

from __future__ import annotations

from pathlib import Path

import pytest

mypy_api = pytest.importorskip("mypy.api")

SAMPLE = Path(__file__).parent / "typing" / "decorated.py"


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
