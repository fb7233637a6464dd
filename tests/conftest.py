"""Shared test set-up: markers that skip with a reason when the host lacks what they need."""

from __future__ import annotations

import os
import shutil

import pytest

from cocoon.runtime.config import Config


def _qemu_missing() -> str:
    if os.geteuid() != 0:
        return "needs root"
    if shutil.which(Config().hypervisor.path) is None and not os.access(
        Config().hypervisor.path, os.X_OK
    ):
        return f"needs QEMU at {Config().hypervisor.path}"
    if shutil.which("mmdebstrap") is None:
        return "needs mmdebstrap to build the guest image"
    return ""


def _daemon_missing(item: pytest.Item) -> str:
    """For ``@pytest.mark.daemon("containerd", ...)``: why one of the callers cannot run."""
    from tests.integration.callers import NEEDS, missing

    marker = item.get_closest_marker("daemon")
    assert marker is not None
    names = marker.args or tuple(NEEDS)
    for name in names:
        if name not in NEEDS:
            raise pytest.UsageError(f"{item.nodeid}: unknown daemon {name!r} (know {list(NEEDS)})")
        reason = missing(name)
        if reason:
            return f"{name}: {reason}"
    return ""


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    root_reason = "needs root" if os.geteuid() != 0 else ""
    qemu_reason = _qemu_missing()
    for item in items:
        if "qemu" in item.keywords and qemu_reason:
            item.add_marker(pytest.mark.skip(reason=qemu_reason))
        elif "root" in item.keywords and root_reason:
            item.add_marker(pytest.mark.skip(reason=root_reason))
        elif "daemon" in item.keywords and (daemon_reason := _daemon_missing(item)):
            item.add_marker(pytest.mark.skip(reason=daemon_reason))
