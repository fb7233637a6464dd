"""VM templates without a VM: the snapshot steps' QMP conversations (monitor.snapshot), the
sparse copy of a template's RAM, the template directory's checks, build, reuse and failure
memory (sandbox.template), the agent's reseed (agent.entropy) and its virtio-fs device wait."""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path
from typing import Any

import pytest

from cocoon.agent import entropy
from cocoon.agent.devices import Devices
from cocoon.runtime.config import Config, FactoryConfig
from cocoon.runtime.errors import SandboxError, StartError
from cocoon.runtime.monitor import launch as L
from cocoon.runtime.monitor import snapshot
from cocoon.runtime.sandbox import launcher, template

MIB = 1024 * 1024


# ---------------------------------------------------------------------- the RAM copy
def sparse_file(p: Path, size: int, pieces: dict[int, bytes]) -> None:
    with open(p, "wb") as f:
        f.truncate(size)
        for off, data in pieces.items():
            f.seek(off)
            f.write(data)


@pytest.mark.parametrize("where", ["same-fs", "tmpfs"])
def test_copy_memory_copies_data_and_keeps_holes(tmp_path: Path, where: str) -> None:
    if where == "tmpfs" and not Path("/dev/shm").is_dir():
        pytest.skip("no /dev/shm here")
    src = tmp_path / "memory"
    pieces = {0: b"a" * 4096, 64 * MIB: os.urandom(3 * MIB), 256 * MIB - 4096: b"z" * 4096}
    sparse_file(src, 256 * MIB, pieces)
    dst = tmp_path / "copy" if where == "same-fs" else Path(f"/dev/shm/cocoon-test-{os.getpid()}")
    try:
        copied = snapshot.copy_memory(src, dst)
        assert dst.stat().st_size == 256 * MIB
        assert oct(dst.stat().st_mode & 0o777) == "0o600"
        with open(dst, "rb") as f:
            for off, data in pieces.items():
                f.seek(off)
                assert f.read(len(data)) == data
            f.seek(32 * MIB)
            assert f.read(4096) == bytes(4096)  # a hole reads as zeros
        assert 3 * MIB < copied < 32 * MIB  # extents, not the whole file
        assert dst.stat().st_blocks * 512 < 32 * MIB  # and the holes stayed holes
        with pytest.raises(FileExistsError):  # never over another VM's RAM
            snapshot.copy_memory(src, dst)
    finally:
        dst.unlink(missing_ok=True)


def test_copy_memory_of_a_missing_template_leaves_nothing(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        snapshot.copy_memory(tmp_path / "gone", tmp_path / "copy")
    assert not (tmp_path / "copy").exists()


# ---------------------------------------------------------------------- QMP conversations
class FakeQmp:
    def __init__(self, statuses: list[dict[str, Any]]) -> None:
        self.calls: list[tuple[str, Any]] = []
        self.fds: list[tuple[str, int]] = []  # (name, inode) of what was passed
        self.statuses = statuses

    async def qmp(self, cmd: str, args: dict[str, Any] | None) -> Any:
        self.calls.append((cmd, args))
        if cmd == "query-migrate":
            return self.statuses.pop(0) if len(self.statuses) > 1 else self.statuses[0]
        return {}

    async def pass_fd(self, fd: int, name: str) -> None:
        self.fds.append((name, os.fstat(fd).st_ino))  # open while it is handed over


def test_save_pauses_and_migrates_devices_only_to_a_new_file(tmp_path: Path) -> None:
    q = FakeQmp([{"status": "active"}, {"status": "completed"}])
    state = tmp_path / "state"
    asyncio.run(snapshot.save(q.qmp, q.pass_fd, state, 5))
    cmds = [c for c, _ in q.calls]
    assert cmds[:3] == ["stop", "migrate-set-capabilities", "migrate"]
    assert q.calls[1][1] == {"capabilities": [{"capability": "x-ignore-shared", "state": True}]}
    assert q.calls[2][1] == {"uri": f"fd:{snapshot.STATE_FD}"}
    assert q.fds == [(snapshot.STATE_FD, state.stat().st_ino)]
    assert cmds.count("query-migrate") == 2
    with pytest.raises(FileExistsError):  # a template's state is never overwritten
        asyncio.run(snapshot.save(q.qmp, q.pass_fd, state, 5))


def test_load_feeds_the_state_to_a_deferred_incoming(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.write_bytes(b"QEVM")
    q = FakeQmp([{"status": "completed"}])
    asyncio.run(snapshot.load(q.qmp, q.pass_fd, state, 5))
    assert [c for c, _ in q.calls] == [
        "migrate-set-capabilities",
        "migrate-incoming",
        "query-migrate",
    ]
    assert q.fds == [(snapshot.STATE_FD, state.stat().st_ino)]


@pytest.mark.parametrize(
    "statuses, match",
    [
        ([{"status": "failed", "error-desc": "load of migration failed"}], "load of migration"),
        ([{"status": "cancelled"}], "cancelled"),
        ([{"status": "active"}], "not done after"),
    ],
)
def test_a_failed_or_stuck_migration_is_a_start_error(
    tmp_path: Path, statuses: list[dict[str, Any]], match: str
) -> None:
    state = tmp_path / "state"
    state.write_bytes(b"QEVM")
    q = FakeQmp(statuses)
    with pytest.raises(StartError, match=match):
        asyncio.run(snapshot.load(q.qmp, q.pass_fd, state, 0.05))


def test_plug_share_hands_qemu_a_connected_socket(tmp_path: Path) -> None:
    import socket

    path = tmp_path / "virtiofsd.sock"
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(str(path))
    srv.listen(1)
    q = FakeQmp([{}])
    try:
        asyncio.run(snapshot.plug_share(q.qmp, q.pass_fd, path))
        conn, _ = srv.accept()  # the monitor connected, not QEMU
        conn.close()
    finally:
        srv.close()
    assert [n for n, _ in q.fds] == [snapshot.SHARE_FD]
    (add, chardev), (dev, device) = q.calls
    assert add == "chardev-add" and chardev["backend"]["data"]["addr"] == {
        "type": "fd",
        "data": {"str": snapshot.SHARE_FD},
    }
    assert dev == "device_add" and device["bus"] == L.FS_PORT_ID and device["tag"] == "cocoon"
    with pytest.raises(FileNotFoundError):  # virtiofsd gone: an OSError, the restore fails
        asyncio.run(snapshot.plug_share(q.qmp, q.pass_fd, tmp_path / "nobody.sock"))


# ---------------------------------------------------------------------- the template dir
@pytest.fixture
def host(tmp_path: Path) -> launcher.HostFacts:
    img = tmp_path / "img"
    img.mkdir()
    for name in ("vmlinuz", "initrd.img", "rootfs.img"):
        (img / name).write_bytes(b"x" * 4096)
    files = launcher.GuestFiles(img / "vmlinuz", img / "initrd.img", img / "rootfs.img", None)
    return launcher.HostFacts(files, "tcg", "virtio-serial", True)


class FakeBoot:
    """launcher.boot as a template build calls it: the monitor's save, without a VM."""

    def __init__(self, fail: bool = False) -> None:
        self.calls: list[Path] = []
        self.fail = fail

    def __call__(self, cfg: Config, d: Path, sid: str, host: Any, **kw: Any) -> Any:
        out = kw["save_to"]
        self.calls.append(out)
        if self.fail:
            raise SandboxError(f"sandbox {sid}: the guest agent did not answer", "")
        sparse_file(out / L.TEMPLATE_MEMORY, 256 * MIB, {0: b"ram"})
        (out / L.TEMPLATE_STATE).write_bytes(b"QEVM" + os.urandom(1000))
        return launcher.Sandbox(sid, d, 0, 4.2, "tcg", None)


def on() -> Config:
    return Config(factory=FactoryConfig(template=True))


def test_ensure_builds_once_then_reuses(
    tmp_path: Path, host: launcher.HostFacts, monkeypatch: pytest.MonkeyPatch
) -> None:
    boot = FakeBoot()
    monkeypatch.setattr(launcher, "boot", boot)
    root = tmp_path / "root"
    d = template.ensure(on(), root, host)
    assert d is not None and d.name == template.key(on(), host)
    meta = json.loads((d / L.TEMPLATE_META).read_text())
    assert meta["memory_size"] == 256 * MIB and meta["boot_seconds"] == 4.2
    assert template.check(d, d.name) == ""
    assert template.ensure(on(), root, host) == d
    assert len(boot.calls) == 1
    assert sorted(p.name for p in (root / "template").iterdir()) == sorted([template.LOCK, d.name])


def test_a_template_of_another_configuration_is_never_used_and_goes_at_the_next_build(
    tmp_path: Path, host: launcher.HostFacts, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(launcher, "boot", FakeBoot())
    root = tmp_path / "root"
    old = template.ensure(on(), root, host)
    assert old is not None
    other = Config(factory=FactoryConfig(template=True))
    other = other.__class__(
        hypervisor=other.hypervisor.__class__(default_memory_mib=512), factory=other.factory
    )
    assert template.key(other, host) != old.name
    assert "made for key" in template.check(old, template.key(other, host))
    new = template.ensure(other, root, host)
    assert new is not None and new != old and not old.exists()
    st = template.status(other, root, host)
    assert st["ready"] and st["stale"] == []


@pytest.mark.parametrize("damage", ["truncate-memory", "edit-state", "no-meta", "bad-meta"])
def test_a_damaged_template_is_refused_and_rebuilt(
    tmp_path: Path, host: launcher.HostFacts, monkeypatch: pytest.MonkeyPatch, damage: str
) -> None:
    boot = FakeBoot()
    monkeypatch.setattr(launcher, "boot", boot)
    root = tmp_path / "root"
    d = template.ensure(on(), root, host)
    assert d is not None
    if damage == "truncate-memory":
        os.truncate(d / L.TEMPLATE_MEMORY, MIB)
    elif damage == "edit-state":
        data = bytearray((d / L.TEMPLATE_STATE).read_bytes())
        data[10] ^= 0xFF
        (d / L.TEMPLATE_STATE).write_bytes(bytes(data))
    elif damage == "no-meta":
        (d / L.TEMPLATE_META).unlink()
    else:
        (d / L.TEMPLATE_META).write_text("[1, 2")
    assert template.check(d, d.name) != ""
    assert not template.status(on(), root, host)["ready"]
    assert template.ensure(on(), root, host) == d
    assert len(boot.calls) == 2 and template.check(d, d.name) == ""


def test_a_failed_build_boots_cold_and_is_not_retried_at_once(
    tmp_path: Path, host: launcher.HostFacts, monkeypatch: pytest.MonkeyPatch
) -> None:
    boot = FakeBoot(fail=True)
    monkeypatch.setattr(launcher, "boot", boot)
    root = tmp_path / "root"
    assert template.ensure(on(), root, host) is None
    assert template.ensure(on(), root, host) is None
    assert len(boot.calls) == 1  # remembered: the second start did not build again
    st = template.status(on(), root, host)
    assert "did not answer" in str(st["failed"]) and not st["ready"]
    base = root / "template"
    assert sorted(p.name for p in base.iterdir()) == sorted(
        [template.LOCK, f"{st['key']}.failed"]
    )  # nothing half-built left
    failed = base / f"{st['key']}.failed"
    old = failed.stat().st_mtime - template.RETRY_AFTER_S - 1
    os.utime(failed, (old, old))
    boot.fail = False
    assert template.ensure(on(), root, host) is not None  # retried once the time is up
    assert not failed.exists()


def test_drop_removes_every_template(
    tmp_path: Path, host: launcher.HostFacts, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(launcher, "boot", FakeBoot())
    root = tmp_path / "root"
    assert template.ensure(on(), root, host) is not None
    (root / "template" / "junk.new").mkdir()
    assert template.drop(root) == 2
    assert [p.name for p in (root / "template").iterdir()] == [template.LOCK]


def test_launch_spec_of_a_restore_keeps_the_cold_boot_to_fall_back_to(
    tmp_path: Path, host: launcher.HostFacts
) -> None:
    d = tmp_path / "sandboxes" / "s1"
    tdir = tmp_path / "template" / "k"
    spec = launcher.launch_spec(on(), d, "s1", host, L.HostCgroup(), template=tdir)
    assert spec.template == "restore" and spec.template_dir == str(tdir)
    assert spec.memory_file == str(launcher.clone_memory_file(d))
    assert "-incoming" in spec.argv and "-incoming" not in spec.cold_argv
    assert any("memory-backend-memfd,id=ram0" in a for a in spec.cold_argv)
    assert f"mem-path={spec.memory_file}" in " ".join(spec.argv)
    plain = launcher.launch_spec(on(), d, "s1", host, L.HostCgroup())
    assert plain.template == "" and plain.cold_argv == [] and plain.memory_file == ""
    assert plain.argv == spec.cold_argv


# ---------------------------------------------------------------------- the guest side
@pytest.mark.parametrize("size", [0, entropy.MIN_BYTES - 1, entropy.MAX_BYTES + 1])
def test_reseed_refuses_a_size_out_of_range(size: int) -> None:
    with pytest.raises(ValueError, match="reseed takes"):
        entropy.reseed(b"x" * size)


def test_reseed_of_something_that_is_no_random_device_fails(tmp_path: Path) -> None:
    f = tmp_path / "urandom"
    f.write_bytes(b"")
    with pytest.raises(OSError):  # ENOTTY: the ioctls reached a regular file
        entropy.reseed(os.urandom(64), str(f))


@pytest.mark.skipif(os.geteuid() != 0, reason="RNDADDENTROPY needs CAP_SYS_ADMIN (not root)")
def test_reseed_credits_and_rekeys_the_kernel_rng() -> None:
    # The ioctl numbers and the rand_pool_info layout against the running kernel: a wrong
    # number is ENOTTY/EINVAL, a wrong layout EINVAL.
    entropy.reseed(os.urandom(64))


def test_find_virtiofs_waits_for_the_driver(tmp_path: Path) -> None:
    port = tmp_path / "sys/devices/pci0000:00" / L.FS_PORT_ADDRESS
    dev = port / "0000:01:00.0"
    (dev / "virtio5").mkdir(parents=True)
    links = tmp_path / "sys/bus/pci/devices"
    links.mkdir(parents=True)
    (links / L.FS_PORT_ADDRESS).symlink_to(port)
    (links / "0000:01:00.0").symlink_to(dev)
    devices = Devices(tmp_path)
    assert devices.find_pci(L.FS_PORT_ADDRESS) == "/sys/bus/pci/devices/0000:01:00.0"
    assert devices.find_virtiofs(L.FS_PORT_ADDRESS) is None  # no driver bound yet
    drivers = tmp_path / "sys/bus/virtio/drivers"
    (drivers / "virtio_net").mkdir(parents=True)
    (dev / "virtio5" / "driver").symlink_to(drivers / "virtio_net")
    assert devices.find_virtiofs(L.FS_PORT_ADDRESS) is None  # another driver's device
    (dev / "virtio5" / "driver").unlink()
    (drivers / "virtiofs").mkdir()
    (dev / "virtio5" / "driver").symlink_to(drivers / "virtiofs")
    assert devices.find_virtiofs(L.FS_PORT_ADDRESS) == "/sys/bus/pci/devices/0000:01:00.0"
