"""Fixtures shared by the unit tests."""

from __future__ import annotations

import pytest

from cocoon.agent import libc
from tests.unit.fakes import FakeLibc


@pytest.fixture
def fake(monkeypatch: pytest.MonkeyPatch) -> FakeLibc:
    """A recording libc in place of the real one (cocoon.agent.libc.current)."""
    f = FakeLibc()
    monkeypatch.setattr(libc, "current", f)
    return f
