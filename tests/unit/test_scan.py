"""The network scan's shortcut (cocoon.runtime.network.scan): a namespace that holds only
loopback and cocoon's own taps is told by its interface names, without pyroute2; any other
interface takes the full scan. Runs with the recording libc (no namespace is entered)."""

from __future__ import annotations

import contextlib
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from cocoon.runtime.network import scan
from tests.unit.fakes import FakeLibc


class _Ipr:
    def get_links(self) -> list[dict[str, Any]]:
        return []  # what the full scan found: nothing it bridges


@pytest.fixture
def ns(tmp_path: Path) -> str:
    p = tmp_path / "ns"
    p.touch()
    return str(p)


def _names(monkeypatch: pytest.MonkeyPatch, names: list[str]) -> list[str]:
    """The namespace's interfaces as ``names``; returns the log of full scans (iproute)."""
    opened: list[str] = []

    @contextlib.contextmanager
    def iproute() -> Iterator[_Ipr]:
        opened.append("iproute")
        yield _Ipr()

    monkeypatch.setattr(socket, "if_nameindex", lambda: list(enumerate(names, 1)))
    monkeypatch.setattr(scan, "iproute", iproute)
    return opened


@pytest.mark.parametrize("names", [["lo"], ["lo", "cctap0", "ccmvt1"]])
def test_only_loopback_and_our_taps_needs_no_netlink(
    fake: FakeLibc, monkeypatch: pytest.MonkeyPatch, ns: str, names: list[str]
) -> None:
    opened = _names(monkeypatch, names)
    assert scan.scan(ns, "tcfilter") == ([], [])
    assert opened == []
    assert [c.name for c in fake.calls] == ["setns"]  # it did look inside the namespace


def test_any_other_interface_takes_the_full_scan(
    fake: FakeLibc, monkeypatch: pytest.MonkeyPatch, ns: str
) -> None:
    opened = _names(monkeypatch, ["lo", "eth0"])
    assert scan.scan(ns, "tcfilter") == ([], [])
    assert opened == ["iproute"]
