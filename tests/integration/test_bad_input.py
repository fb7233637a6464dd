"""Each way a sandbox can fail to start gives one clear error and leaves nothing behind
(the state_root fixture checks processes and state dirs after every test)."""

from __future__ import annotations

from pathlib import Path

import pytest

from cocoon.runtime.config import Config
from cocoon.runtime.errors import HostError, SandboxError, StateError
from cocoon.runtime.sandbox import launcher as sandbox

from .conftest import with_

pytestmark = [pytest.mark.qemu, pytest.mark.root]


def files_cfg(cfg: Config, kernel: Path, initrd: Path, rootfs: Path) -> Config:
    return with_(cfg, "image", kernel=str(kernel), initrd=str(initrd), rootfs=str(rootfs))


def start_error(cfg: Config, root: Path, sid: str) -> str:
    """The one SandboxError a sandbox that cannot start gives (its message and details)."""
    with pytest.raises(SandboxError) as err:
        sandbox.start(cfg, root, sid)
    return str(err.value)


def test_missing_kernel(
    cfg: Config, state_root: Path, image: sandbox.GuestFiles, tmp_path: Path
) -> None:
    bad = files_cfg(cfg, tmp_path / "no-such-vmlinuz", image.initrd, image.rootfs)
    with pytest.raises(HostError, match=r"no-such-vmlinuz.*does not exist"):
        sandbox.start(bad, state_root, "nokernel")


def test_corrupt_kernel(
    cfg: Config, state_root: Path, image: sandbox.GuestFiles, tmp_path: Path
) -> None:
    junk = tmp_path / "vmlinuz"
    junk.write_bytes(b"\x7fNOT A KERNEL" * 1000)
    bad = files_cfg(cfg, junk, image.initrd, image.rootfs)
    msg = start_error(with_(bad, "agent", ready_timeout_s=20.0), state_root, "badkernel")
    # Either QEMU refuses the file or the guest never comes up: both name the cause.
    assert "QEMU exited" in msg or "did not answer" in msg, msg


def test_corrupt_root_image(
    cfg: Config, state_root: Path, image: sandbox.GuestFiles, tmp_path: Path
) -> None:
    junk = tmp_path / "rootfs.img"
    with junk.open("wb") as f:
        f.truncate(64 * 1024 * 1024)
    bad = files_cfg(cfg, image.kernel, image.initrd, junk)
    msg = start_error(bad, state_root, "badroot")
    assert "QEMU exited with status 0 before the agent was ready" in msg, msg
    assert "cocoon-init: FATAL: mount root image" in msg, "console tail must show the cause"


def test_missing_qemu_binary(cfg: Config, state_root: Path, image: sandbox.GuestFiles) -> None:
    bad = with_(cfg, "hypervisor", path="/nonexistent/qemu-system-x86_64")
    with pytest.raises(HostError, match="/nonexistent/qemu-system-x86_64"):
        sandbox.start(bad, state_root, "noqemu")


def test_qemu_bad_option(cfg: Config, state_root: Path, image: sandbox.GuestFiles) -> None:
    bad = with_(cfg, "hypervisor", machine_type="no-such-machine")
    msg = start_error(bad, state_root, "badopt")
    assert "QEMU exited with status 1" in msg, msg
    assert "unsupported machine type" in msg, "QEMU's stderr tail must be in the error"


def test_agent_deadline(cfg: Config, state_root: Path, image: sandbox.GuestFiles) -> None:
    bad = with_(cfg, "agent", ready_timeout_s=1.0)
    msg = start_error(bad, state_root, "slow")
    assert "did not answer within 1s" in msg, msg
    assert "guest console" in msg or "QEMU stderr" in msg or "did not answer" in msg


def test_duplicate_and_bad_ids(cfg: Config, state_root: Path, image: sandbox.GuestFiles) -> None:
    (state_root / "sandboxes" / "dup").mkdir(parents=True)
    with pytest.raises(StateError, match="already exists"):
        sandbox.start(cfg, state_root, "dup")
    (state_root / "sandboxes" / "dup").rmdir()
    for bad_id in ("", "../x", "a/b", "..", "x" * 2000):
        with pytest.raises(StateError, match="invalid sandbox id"):
            sandbox.start(cfg, state_root, bad_id)


def test_missing_virtiofsd(cfg: Config, state_root: Path, image: sandbox.GuestFiles) -> None:
    bad = with_(cfg, "hypervisor", virtiofsd_path="/nonexistent/virtiofsd")
    with pytest.raises(SandboxError, match="cannot run virtiofsd /nonexistent/virtiofsd"):
        sandbox.start(bad, state_root, "novfsd")
