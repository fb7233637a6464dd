"""The plugin's host checks without a VM: each reason a host cannot run sandboxes names what
is missing and what fixes it, root first."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import pytest

from cocoon.runtime.config import Config
from cocoon.testing import plugin


def with_(cfg: Config, section: str, **kw: object) -> Config:
    return dataclasses.replace(cfg, **{section: dataclasses.replace(getattr(cfg, section), **kw)})


def test_not_root_is_the_first_reason(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    cfg = with_(Config(), "hypervisor", path="/nonexistent/qemu")
    assert plugin._missing(cfg).startswith("needs root")


def test_no_qemu_names_the_package(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    why = plugin._missing(with_(Config(), "hypervisor", path="/nonexistent/qemu"))
    assert why.startswith("no QEMU at /nonexistent/qemu") and "qemu-system-x86" in why


def test_no_image_names_the_build_command(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    cfg = with_(Config(), "hypervisor", path="/bin/true")
    why = plugin._missing(with_(cfg, "image", cache_dir=str(tmp_path)))
    assert why.startswith("no guest image (not built: ") and "`cocoon image build`" in why
