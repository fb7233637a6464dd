"""The agent mounts the virtio-fs share once, on the first container that needs it, and never
reads the mount table again (each read cost 3-5 ms of a create under TCG)."""

from __future__ import annotations

import threading
from typing import Any

import pytest

from cocoon.agent import containers, mounts


def test_the_share_is_mounted_once_and_looked_up_once(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[str, str]] = []

    def is_mounted(target: str) -> bool:
        calls.append(("lookup", target))
        return False

    def mount(source: str, target: str, fstype: str, flags: int, data: str = "") -> None:
        calls.append(("mount", fstype))

    monkeypatch.setattr(mounts, "is_mounted", is_mounted)
    monkeypatch.setattr(mounts, "mount", mount)
    m = containers.Manager(reaper=Any)  # type: ignore[arg-type]
    threads = [threading.Thread(target=m.ensure_shared) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    m.ensure_shared()
    assert calls == [("lookup", containers.SHARED_DIR), ("mount", "virtiofs")]


def test_a_share_already_mounted_is_not_mounted_again(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[str] = []

    def is_mounted(target: str) -> bool:
        seen.append(target)
        return True

    monkeypatch.setattr(mounts, "is_mounted", is_mounted)
    monkeypatch.setattr(mounts, "mount", lambda *a, **k: pytest.fail("mounted twice"))
    m = containers.Manager(reaper=Any)  # type: ignore[arg-type]
    m.ensure_shared()
    m.ensure_shared()
    assert seen == [containers.SHARED_DIR]
