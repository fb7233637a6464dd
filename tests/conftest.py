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


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    root_reason = "needs root" if os.geteuid() != 0 else ""
    qemu_reason = _qemu_missing()
    for item in items:
        if "qemu" in item.keywords and qemu_reason:
            item.add_marker(pytest.mark.skip(reason=qemu_reason))
        elif "root" in item.keywords and root_reason:
            item.add_marker(pytest.mark.skip(reason=root_reason))
