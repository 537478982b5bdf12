"""The guards read one settings object that install() and uninstall() replace (issue 15)."""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Iterator

import pytest
import sqlalchemy as sa
from sqlalchemy.orm import Session

import txguard
import txguard._origin
import txguard._registry  # noqa: F401  (conftest's reset reaches for it; txguard loads lazily)
from tests.helpers import this_line
from txguard import _guard_records, _guard_sessions


@pytest.fixture(autouse=True)
def _uninstall() -> Iterator[None]:
    yield
    txguard.uninstall()


def test_install_puts_one_settings_object_in_force() -> None:
    """install() makes the guards read a Settings with the levels it was given."""
    txguard.install(mixed_begin="error", leaks="off", cross_task="off", long_transaction=5)
    settings = _guard_records.settings
    assert settings is not None
    assert (settings.mixed_begin, settings.leaks, settings.cross_task) == ("error", "off", "off")
    assert (settings.wraps_begin, settings.watches_tasks, settings.watches_age) == (
        True, False, True,
    )


def test_settings_cannot_be_changed_in_place() -> None:
    """The settings in force are frozen: only another install() changes what the guards do."""
    txguard.install()
    with pytest.raises(dataclasses.FrozenInstanceError):
        _guard_records.settings.leaks = "off"  # type: ignore[misc, union-attr]


def test_install_twice_takes_the_second_threshold(sqlite_engine: sa.Engine) -> None:
    """A second install() replaces the first's settings: its long_transaction threshold counts."""
    txguard.install(long_transaction=600)
    first = _guard_records.settings
    txguard.install(long_transaction=0.5, cross_task="off")
    second = _guard_records.settings
    assert second is not first and second is not None
    assert (second.long_transaction, second.watches_tasks) == (0.5, False)
    with Session(sqlite_engine) as session:
        session.execute(sa.text("SELECT 1"))
        record = _guard_sessions.record_of(session)
        assert record is not None and record.task is None


def test_uninstall_restores_everything_the_settings_turned_on(sqlite_engine: sa.Engine) -> None:
    """uninstall() leaves no settings in force, no watched transaction, and no stale record."""
    txguard.install(long_transaction=600)
    session = Session(sqlite_engine)
    session.execute(sa.text("SELECT 1"))
    assert _guard_sessions.record_of(session) is not None
    txguard.uninstall()
    assert _guard_records.settings is None
    assert not _guard_records.open_transactions
    assert _guard_sessions.record_of(session) is None
    session.close()


def test_an_origin_decodes_the_line_it_was_taken_at_after_the_code_ran_on() -> None:
    """An Origin keeps an instruction offset; shown later, it names the line it was taken at."""
    taken_at = this_line() + 1
    origin = txguard._origin.capture(0)
    for _ in range(3):
        pass  # the frame runs on: its current line is no longer the one captured
    assert origin.lineno == taken_at
    assert str(origin).endswith(
        f"test_guard_settings.py:{taken_at} in {sys._getframe().f_code.co_name}()"
    )
