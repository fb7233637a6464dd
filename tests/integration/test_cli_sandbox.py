"""The cocoon command driving a real sandbox: check, sandbox start/details/stop."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from cocoon.runtime.sandbox import launcher as sandbox

pytestmark = [pytest.mark.qemu, pytest.mark.root]
CLI = [sys.executable, "-m", "cocoon.runtime.cli.main"]


def cli(root: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*CLI, "--root", str(root), *args], capture_output=True, text=True, timeout=180
    )


def test_check_reports_every_capability(state_root: Path, image: sandbox.GuestFiles) -> None:
    r = cli(state_root, "check")
    assert r.returncode == 0, r.stdout + r.stderr
    for name in ("qemu", "kvm", "vsock", "vhost-net", "tun", "macvtap", "9p", "image", "template"):
        assert any(line.split()[1:2] == [name] for line in r.stdout.splitlines()), name
    if not os.path.exists("/dev/vhost-vsock"):
        assert "virtio-serial" in r.stdout  # says what the missing device means


def test_check_fails_without_qemu(state_root: Path, tmp_path: Path) -> None:
    conf = tmp_path / "c.toml"
    conf.write_text('[hypervisor]\npath = "/nonexistent/qemu"\n')
    r = cli(state_root, "--config", str(conf), "check")
    assert r.returncode == 1
    assert "FAIL" in r.stdout and "/nonexistent/qemu" in r.stdout


def test_sandbox_verbs(state_root: Path, image: sandbox.GuestFiles) -> None:
    r = cli(state_root, "sandbox", "start", "c1")
    assert r.returncode == 0, r.stderr
    started = json.loads(r.stdout)
    assert started["id"] == "c1" and started["boot_seconds"] > 0
    try:
        r = cli(state_root, "sandbox", "list")
        assert r.stdout.split() == ["c1"]
        r = cli(state_root, "sandbox", "details", "c1")
        assert r.returncode == 0, r.stderr
        details = json.loads(r.stdout)
        assert details["kernel_release"] != os.uname().release
        assert details["cpus_online"] == 1
        r = cli(state_root, "sandbox", "start", "c1")
        assert r.returncode == 1 and "already exists" in r.stderr
    finally:
        r = cli(state_root, "sandbox", "stop", "c1")
    assert r.returncode == 0 and r.stdout.strip() == "agent", r.stderr
    r = cli(state_root, "sandbox", "details", "c1")
    assert r.returncode == 1 and "c1" in r.stderr


def test_demo_runs_the_default_bundle_in_a_vm(state_root: Path) -> None:
    r = cli(state_root, "demo")
    assert r.returncode == 0, r.stdout + r.stderr
    guest = [ln.split(":", 1)[1].strip() for ln in r.stdout.splitlines() if "guest kernel" in ln]
    assert guest and guest[0] != os.uname().release
    assert "hello from a container inside a cocoon VM" in r.stdout
    r = cli(state_root, "demo", "sh", "-c", "echo custom; exit 4")
    assert r.returncode == 4 and "custom" in r.stdout
