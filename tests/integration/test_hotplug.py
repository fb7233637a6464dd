"""Hot-plug with real guests: what the workload sees when the spec or `update` sizes its VM,
a file-backed disk from linux.devices, attach/detach at the monitor, and the refusals."""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from cocoon.runtime import config as config_mod
from cocoon.runtime.container import busybox
from cocoon.runtime.sandbox import client
from cocoon.runtime.sandbox import launcher as sandbox
from tests.integration.cli import Cli

pytestmark = [pytest.mark.qemu, pytest.mark.root]
MIB = 1024 * 1024
HOST_CPUS = os.cpu_count() or 1


def bundle(tmp: Path, args: list[str], resources: dict[str, Any] | None = None) -> Path:
    b = busybox.make_bundle(tmp / "bundle", args)
    spec = json.loads((b / "config.json").read_text())
    spec["linux"]["resources"].update(resources or {})
    (b / "config.json").write_text(json.dumps(spec))
    return b


needs_2_cpus = pytest.mark.skipif(HOST_CPUS < 2, reason="needs a host with 2 CPUs or more")


@needs_2_cpus
def test_spec_sizes_the_vm_at_start(cli: Cli, tmp_path: Path) -> None:
    limit = 512 * MIB
    b = bundle(
        tmp_path,
        ["sleep", "1000"],
        {"cpu": {"quota": 200000, "period": 100000}, "memory": {"limit": limit}},
    )
    assert cli.create("c1", b).returncode == 0
    cli.ok("start", "c1")
    cpus, mem = cli.sees("c1")
    assert cpus == 2
    assert mem >= 256 + 512 - 64  # the base plus the limit (MemTotal omits the kernel's own)
    assert cli.ok("exec", "c1", "cat", "/sys/fs/cgroup/memory.max").strip() == str(limit)
    cli.ok("delete", "--force", "c1")


@needs_2_cpus
def test_update_grows_then_shrinks_what_the_workload_sees(cli: Cli, tmp_path: Path) -> None:
    assert cli.create("c1", bundle(tmp_path, ["sleep", "1000"])).returncode == 0
    cli.ok("start", "c1")
    cpus0, mem0 = cli.sees("c1")
    assert cpus0 == 1
    grow = {"cpu": {"quota": 200000, "period": 100000}, "memory": {"limit": 768 * MIB}}
    cli.ok("update", "--resources", "-", "c1", input=json.dumps(grow))
    cpus1, mem1 = cli.sees("c1")
    assert cpus1 == 2 and mem1 >= mem0 + 700
    assert cli.ok("exec", "c1", "cat", "/sys/fs/cgroup/cpu.max").split() == ["200000", "100000"]
    # the flag form, as `docker update` users type it
    cli.ok("update", "--cpu-quota", "100000", "--memory", "128M", "c1")
    cpus2, mem2 = cli.sees("c1")
    assert cpus2 == 1 and mem2 < mem1 - 500
    cli.ok("delete", "--force", "c1")


def test_absurd_update_is_refused_and_changes_nothing(cli: Cli, tmp_path: Path) -> None:
    assert cli.create("c1", bundle(tmp_path, ["sleep", "1000"])).returncode == 0
    cli.ok("start", "c1")
    before = cli.sees("c1")
    for res, why in (
        ({"memory": {"limit": 1 << 45}}, "holds at most"),
        ({"memory": {"limit": -5}}, "memory.limit"),
        ({"cpu": {"quota": 6400000, "period": 100000}}, "CPUs"),
    ):
        r = cli("update", "--resources", "-", "c1", input=json.dumps(res))
        assert r.returncode == 1, res
        assert why in cli.last_error(), cli.last_error()
    assert cli.sees("c1") == before
    cli.ok("delete", "--force", "c1")


@pytest.mark.parametrize(
    ("resources", "why"),
    [
        ({"cpu": {"quota": 6400000, "period": 100000}}, "64 CPUs"),
        ({"memory": {"limit": -3}}, "memory.limit"),
    ],
)
def test_impossible_sizes_refused_at_create(
    cli: Cli, tmp_path: Path, resources: dict[str, Any], why: str
) -> None:
    r = cli.create("c1", bundle(tmp_path, ["true"], resources))
    assert r.returncode == 1 and why in r.stderr, r.stderr
    assert why in cli.last_error()
    assert cli.ok("list", "-q") == ""


@pytest.fixture
def loop_device(tmp_path: Path) -> Iterator[tuple[Path, str]]:
    img = tmp_path / "disk.img"
    with open(img, "wb") as f:
        f.truncate(64 * MIB)
    dev = subprocess.run(
        ["losetup", "--find", "--show", str(img)], capture_output=True, text=True, check=True
    ).stdout.strip()
    try:
        yield img, dev
    finally:
        subprocess.run(["losetup", "-d", dev], check=False)


def test_file_backed_disk_appears_and_takes_a_filesystem(
    cli: Cli, tmp_path: Path, loop_device: tuple[Path, str]
) -> None:
    img, dev = loop_device
    st = os.stat(dev)
    major, minor = os.major(st.st_rdev), os.minor(st.st_rdev)
    b = bundle(
        tmp_path,
        ["sh", "-c", "mke2fs -q -L cocoon-test /dev/xvdb && echo MKFS-OK; exec sleep 1000"],
        {
            "devices": [
                {"allow": False, "access": "rwm"},
                {"allow": True, "type": "b", "major": major, "minor": minor, "access": "rwm"},
            ]
        },
    )
    spec = json.loads((b / "config.json").read_text())
    spec["linux"]["devices"] = [{"path": "/dev/xvdb", "type": "b", "major": major, "minor": minor}]
    (b / "config.json").write_text(json.dumps(spec))
    assert cli.create("c1", b).returncode == 0
    cli.ok("start", "c1")
    end = time.monotonic() + 60
    while "MKFS-OK" not in (tmp_path / "c1.out").read_text() and time.monotonic() < end:
        time.sleep(0.2)
    assert "MKFS-OK" in (tmp_path / "c1.out").read_text()
    # a block device node in the container, with the guest's own numbers
    assert cli.ok("exec", "c1", "stat", "-c", "%F", "/dev/xvdb").strip() == "block special file"
    cli.ok("delete", "--force", "c1")
    # the filesystem was written through to the host's file: ext2 magic at 1080
    with open(img, "rb") as f:
        f.seek(1080)
        assert f.read(2) == b"\x53\xef"


def test_block_backed_volume_is_mounted_in_the_container(
    cli: Cli, tmp_path: Path, loop_device: tuple[Path, str]
) -> None:
    _img, dev = loop_device
    subprocess.run(["mkfs.ext4", "-q", "-F", dev], check=True, timeout=60)
    b = bundle(tmp_path, ["sh", "-c", "echo written-in-vm > /data/f && grep /data /proc/mounts"])
    spec = json.loads((b / "config.json").read_text())
    spec["mounts"].append({"destination": "/data", "type": "ext4", "source": dev, "options": []})
    (b / "config.json").write_text(json.dumps(spec))
    r = cli("run", "--bundle", str(b), "c1")
    assert r.returncode == 0, r.stderr
    assert " /data ext4 " in r.stdout, r.stdout
    out = subprocess.run(
        ["debugfs", "-R", "cat /f", dev], capture_output=True, text=True, timeout=60
    ).stdout
    assert out.strip() == "written-in-vm"


def test_bad_devices_are_refused(cli: Cli, tmp_path: Path) -> None:
    b = bundle(tmp_path, ["true"])
    spec = json.loads((b / "config.json").read_text())
    for devs, why in (
        ([{"path": "/dev/null", "type": "b"}], "not a block device"),
        ([{"path": "/dev/nope", "type": "b"}], "No such file"),
        ([{"path": "/dev/vfio/4242", "type": "c"}], "VFIO group 4242 does not exist"),
    ):
        spec["linux"]["devices"] = devs
        (b / "config.json").write_text(json.dumps(spec))
        r = cli.create("c1", b)
        assert r.returncode == 1 and why in r.stderr, (devs, r.stderr)
        assert cli.ok("list", "-q") == ""


# ------------------------------------------------------------------------------- monitor level
@pytest.fixture
def running(
    state_root: Path, image: sandbox.GuestFiles, cfg: config_mod.Config
) -> Iterator[client.Client]:
    sb = sandbox.start(cfg, state_root, "hp1")
    try:
        with sb.client() as c:
            yield c
    finally:
        sandbox.stop(state_root, "hp1")


def _qmp(c: client.Client, cmd: str, **args: Any) -> Any:
    return json.loads(
        c.vm.Qmp({"command": cmd, "arguments_json": json.dumps(args)}, timeout=30)["return_json"]
    )


def test_disk_attach_then_detach_leaves_neither_guest_nor_qemu_holding_it(
    running: client.Client, tmp_path: Path
) -> None:
    img = tmp_path / "d.img"
    with open(img, "wb") as f:
        f.truncate(16 * MIB)
    r = running.vm.AttachDisk({"id": "t1", "path": str(img)}, timeout=60)
    assert r["guest_path"].startswith("/dev/sd") and r["scsi_target"] == 1
    assert "qmp" in r["seconds"] and "guest" in r["seconds"]
    assert any(b.get("node-name") == "drive-t1" for b in _qmp(running, "query-named-block-nodes"))
    seen = running.agent.WaitDevice(
        {"type": "scsi", "address": "0:1:0", "timeout_ms": 1000}, timeout=30
    )
    assert seen["guest_path"] == r["guest_path"]
    running.vm.DetachDisk({"id": "t1"}, timeout=60)
    assert not any(
        b.get("node-name") == "drive-t1" for b in _qmp(running, "query-named-block-nodes")
    )
    with pytest.raises(client.CallError) as info:
        running.agent.WaitDevice(
            {"type": "scsi", "address": "0:1:0", "timeout_ms": 500}, timeout=30
        )
    assert "did not appear" in info.value.details


def test_vfio_device_that_does_not_exist_gives_a_clear_error(running: client.Client) -> None:
    """A non-root QEMU (the default) is lent the group's node first: there is none. (A root
    QEMU's own error is tested in test_rootless.py.)"""
    with pytest.raises(client.CallError) as info:
        running.vm.AttachVfio(
            {"id": "v1", "host_bdfs": ["0000:7f:1f.7"], "group": "4242"}, timeout=60
        )
    details = info.value.details
    assert "VFIO group 4242: /dev/vfio/4242 does not exist" in details, details
    # nothing half-attached: no vfio device left in QEMU
    peripherals = [p["name"] for p in _qmp(running, "qom-list", path="/machine/peripheral")]
    assert not [p for p in peripherals if p.startswith("vfio-")], peripherals


def test_resize_beyond_the_vm_is_refused(running: client.Client) -> None:
    with pytest.raises(client.CallError) as info:
        running.vm.Resize({"vcpus": HOST_CPUS + 1, "memory_mib": 256}, timeout=60)
    assert info.value.code == "RESOURCE_EXHAUSTED"
    d = running.agent.GetGuestDetails(timeout=30)
    assert d["cpus_online"] == 1
