"""Non-root QEMU ([hypervisor] rootless, runtime/monitor/qemuuser.py) with real guests: QEMU
drops root before the guest runs a single instruction, each sandbox's QEMU has a uid of its
own, it cannot open a root-only host file, what it needs later (disks, memory, NICs) still
reaches it, and the uid is given back when the sandbox ends."""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from cocoon.runtime import config as config_mod
from cocoon.runtime.errors import StateError
from cocoon.runtime.monitor import launch as L
from cocoon.runtime.monitor import qemuuser
from cocoon.runtime.sandbox import client
from cocoon.runtime.sandbox import launcher as sandbox
from tests.integration.cli import Cli
from tests.integration.conftest import with_
from tests.integration.test_network import HTTP_PORT, Lab, fetch_from, lab, server_bundle

pytestmark = [pytest.mark.qemu, pytest.mark.root]
MIB = 1024 * 1024
__all__ = ["lab"]  # the network fixture, shared with test_network


@pytest.fixture
def rootless(cfg: config_mod.Config) -> config_mod.Config:
    return with_(cfg, "hypervisor", rootless=True)


def status(pid: int) -> dict[str, str]:
    lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    return {k: v.strip() for k, _, v in (line.partition(":") for line in lines)}


def qmp(c: client.Client, cmd: str, **args: Any) -> Any:
    r = c.vm.Qmp({"command": cmd, "arguments_json": json.dumps(args)}, timeout=30)
    return json.loads(r["return_json"])


@pytest.fixture
def two(
    state_root: Path, image: sandbox.GuestFiles, rootless: config_mod.Config
) -> Iterator[list[Path]]:
    dirs = []
    try:
        for sid in ("rl1", "rl2"):
            dirs.append(sandbox.start(rootless, state_root, sid).dir)
        yield dirs
    finally:
        for sid in ("rl1", "rl2"):
            with contextlib.suppress(StateError):  # stopped by the test
                sandbox.stop(state_root, sid)


def test_each_qemu_drops_root_to_a_uid_of_its_own_and_gives_it_back(
    two: list[Path], rootless: config_mod.Config, state_root: Path
) -> None:
    h = rootless.hypervisor
    uids = []
    for d in two:
        pid = int((d / L.QEMU_PID).read_text())
        uid = int((d / L.QEMU_UID).read_text())
        assert h.rootless_uid_first <= uid < h.rootless_uid_first + h.rootless_uid_count
        st = status(pid)
        assert st["Uid"].split() == [str(uid)] * 4 and st["Gid"].split() == [str(uid)] * 4
        assert st["Groups"].split() == [str(uid)]  # root's supplementary groups dropped too
        assert int(st["CapPrm"], 16) == 0 and int(st["CapEff"], 16) == 0
        assert st["NoNewPrivs"] == "1" and st["Seccomp"] == "2"
        # the uid is marked as this monitor's, host-wide
        marker = qemuuser.UID_DIR / str(uid)
        assert marker.read_text().split()[0] == (d / L.MONITOR_PID).read_text().strip()
        with client.Client(d) as c:
            assert qmp(c, "query-status")["status"] == "running"  # resumed after the check
        uids.append(uid)
    assert len(set(uids)) == 2
    for sid in ("rl1", "rl2"):
        sandbox.stop(state_root, sid)
    for uid in uids:
        assert not (qemuuser.UID_DIR / str(uid)).exists()
        assert not qemuuser.uid_in_use(uid)


def test_qemu_cannot_open_a_root_only_file_but_gets_it_as_a_disk(
    two: list[Path], tmp_path: Path
) -> None:
    """QEMU asked to open a 0600 root file itself is refused by the kernel; the same file
    attached as a disk reaches the guest, opened by the monitor and handed over as an fd."""
    img = tmp_path / "secret.img"
    with open(img, "wb") as f:
        f.truncate(16 * MIB)
    img.chmod(0o600)
    with client.Client(two[0]) as c:
        with pytest.raises(client.CallError) as info:
            qmp(
                c,
                "blockdev-add",
                **{
                    "driver": "raw",
                    "node-name": "x",
                    "file": {"driver": "file", "filename": str(img)},
                },
            )
        assert "Permission denied" in info.value.details
        r = c.vm.AttachDisk({"id": "t1", "path": str(img)}, timeout=60)
        assert r["guest_path"].startswith("/dev/sd")
        sets = qmp(c, "query-fdsets")
        assert len(sets) == 1 and sets[0]["fds"][0]["opaque"] == str(img)
        c.vm.DetachDisk({"id": "t1"}, timeout=60)
        assert qmp(c, "query-fdsets") == []  # QEMU's copy of the fd is closed
        # memory still grows: virtio-mem's memfd was made before QEMU dropped root
        grown = c.vm.Resize({"vcpus": 1, "memory_mib": 512}, timeout=60)
        assert grown["memory_mib"] == "512"  # a uint64: a string in protobuf's JSON mapping


def test_container_with_network_and_resizes_under_a_non_root_qemu(
    cli: Cli, lab: Lab, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    conf = tmp_path / "rootless.toml"
    conf.write_text("[hypervisor]\nrootless = true\n")
    monkeypatch.setenv("COCOON_CONFIG", str(conf))
    b = server_bundle(tmp_path, str(lab.netns))
    assert cli.create("n1", b).returncode == 0
    cli.ok("start", "n1")
    sb = cli.root / "sandboxes" / "n1"
    pid = int((sb / L.QEMU_PID).read_text())
    assert status(pid)["Uid"].split()[0] == (sb / L.QEMU_UID).read_text().strip() != "0"
    # the NIC's tap fds were handed to the unprivileged QEMU: traffic flows both ways
    lk = lab.links[0]
    assert fetch_from(lk.peer_ns, lk.v4, HTTP_PORT) == b"hello from the guest\n"
    _, mem0 = cli.sees("n1")
    cli.ok("update", "--memory", "512M", "n1")
    _, mem1 = cli.sees("n1")
    assert mem1 >= mem0 + 400
    cli.ok("delete", "--force", "n1")
    assert not os.path.exists(sb)


def test_root_qemu_when_rootless_is_off(
    state_root: Path, image: sandbox.GuestFiles, cfg: config_mod.Config
) -> None:
    """hypervisor.rootless = false: QEMU keeps root under the stricter seccomp filter (no
    set*id at all), takes no uid, and opens what hot-plug names itself (a VFIO device that
    does not exist is QEMU's own error)."""
    sb = sandbox.start(with_(cfg, "hypervisor", rootless=False), state_root, "root1")
    try:
        pid = int((sb.dir / L.QEMU_PID).read_text())
        st = status(pid)
        assert st["Uid"].split() == ["0"] * 4 and st["Seccomp"] == "2"
        assert not (sb.dir / L.QEMU_UID).exists()
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        assert b"-runas" not in argv and b"-S" not in argv
        assert any(b"elevateprivileges=deny" in a for a in argv)
        with client.Client(sb.dir) as c:
            with pytest.raises(client.CallError) as info:
                c.vm.AttachVfio(
                    {"id": "v1", "host_bdfs": ["0000:7f:1f.7"], "group": "4242"}, timeout=60
                )
            details = info.value.details
            assert "0000:7f:1f.7" in details, details
            peripherals = [p["name"] for p in qmp(c, "qom-list", path="/machine/peripheral")]
            assert not [p for p in peripherals if p.startswith("vfio-")], peripherals
    finally:
        sandbox.stop(state_root, "root1")
