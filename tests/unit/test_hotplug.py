"""Hot-plug logic against a fake QEMU (QMP) and a fake agent: what is sent, in which order,
what is refused before anything is sent, and what is rolled back. Also sizing and the host
device checks (block devices, VFIO groups on a fake sysfs)."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import Any

import pytest

from cocoon.runtime import errors
from cocoon.runtime.config import Config
from cocoon.runtime.errors import ErrorKind, HotplugError
from cocoon.runtime.monitor import hotplug as hp
from cocoon.runtime.resources import devices, sizing
from tests.unit.fakes import MIB, FakeAgent, FakeQemu, limits, no_event


def make(
    qemu: FakeQemu, grant: hp.GrantFn | None = None, **kw: Any
) -> tuple[hp.Hotplug, FakeAgent]:
    agent = FakeAgent(qemu)
    h = hp.Hotplug(
        limits(**kw),
        qemu,
        no_event,
        agent,
        device_timeout_s=0.3,
        pass_fd=qemu.pass_fd,
        add_fd=qemu.add_fd,
        grant_vfio=grant,
    )
    return h, agent


@pytest.fixture
def img(tmp_path: Path) -> str:
    p = tmp_path / "img"
    p.write_bytes(b"\0" * 4096)
    return str(p)


@pytest.fixture(autouse=True)
def fake_vhost_net(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    p = tmp_path / "vhost-net"
    p.write_bytes(b"")
    monkeypatch.setattr(hp, "VHOST_NET", str(p))
    return p


def run(coro: Any) -> Any:
    return asyncio.run(coro)


# ----------------------------------------------------------------------------- CPU, memory
def test_grow_adds_one_socket_per_vcpu_and_onlines() -> None:
    q = FakeQemu()
    h, agent = make(q)
    run(h.resize(3, 256))
    adds = q.sent("device_add")
    assert [(a["driver"], a["socket-id"], a["id"]) for a in adds] == [
        ("max-x86_64-cpu", 1, "vcpu1"),
        ("max-x86_64-cpu", 2, "vcpu2"),
    ]
    assert all("node-id" not in a for a in adds)
    assert agent.online == 3 and h.cpus_online == 3


def test_shrink_offlines_but_keeps_qemu_vcpus() -> None:
    q = FakeQemu()
    h, agent = make(q)
    run(h.resize(3, 256))
    run(h.resize(1, 256))
    assert agent.online == 1 and not q.sent("device_del")  # QEMU 7.2 TCG: never device_del
    q.calls.clear()
    run(h.resize(2, 256))  # reuses the plugged vCPU: no new device
    assert not q.sent("device_add") and agent.online == 2


def test_cpu_hotunplug_when_configured() -> None:
    q = FakeQemu()
    h, _ = make(q, cpu_hotunplug=True)
    run(h.resize(3, 256))
    run(h.resize(1, 256))
    assert [a["id"] for a in q.sent("device_del")] == ["vcpu2", "vcpu1"]


def test_virtio_mem_resize_both_ways() -> None:
    q = FakeQemu()
    h, _ = make(q)
    run(h.resize(1, 1024))
    assert q.sent("qom-set")[-1]["value"] == 768 * MIB and h.memory_mib == 1024
    run(h.resize(1, 512))
    assert q.sent("qom-set")[-1]["value"] == 256 * MIB and h.memory_mib == 512


@pytest.mark.parametrize(
    ("vcpus", "mem", "kind"),
    [(5, 256, ErrorKind.LIMIT), (0, 256, ErrorKind.INVALID), (1, 4096, ErrorKind.LIMIT)],
)
def test_limits_refused_before_any_qmp(vcpus: int, mem: int, kind: ErrorKind) -> None:
    q = FakeQemu()
    h, _ = make(q)
    with pytest.raises(HotplugError) as info:
        run(h.resize(vcpus, mem))
    assert info.value.kind == kind
    assert q.calls == []


def test_failed_memory_rolls_back_the_cpus() -> None:
    q = FakeQemu()
    q.vmem_cap = 0
    h, agent = make(q)
    q.vmem_cap = None

    def fail(cmd: str, a: dict[str, Any]) -> str:
        return "no memory" if cmd == "qom-set" and a["value"] > 0 else ""

    q.fail = fail
    with pytest.raises(HotplugError):
        run(h.resize(3, 1024))
    assert agent.online == 1 and h.cpus_online == 1  # back where it was


def test_shrink_the_guest_cannot_finish_reports_what_it_reached() -> None:
    q = FakeQemu()
    h, _ = make(q)
    run(h.resize(1, 1024))
    q.vmem_cap = 512 * MIB  # the guest cannot give back more
    with pytest.raises(HotplugError, match="reached 512 MiB"):
        run(h.resize(1, 256))
    assert h.memory_mib == 1024  # rolled back to where it was


def test_pc_dimm_add_and_remove_whole_dimms() -> None:
    q = FakeQemu()
    h, _ = make(q, memory_hotplug="pc-dimm")
    run(h.resize(1, 400))  # +144 MiB -> one 256 MiB DIMM (128 MiB blocks)
    assert [a["qom-type"] for a in q.sent("object-add")] == ["memory-backend-memfd"]
    assert q.sent("object-add")[0]["size"] == 256 * MIB and q.sent("object-add")[0]["share"]
    assert h.memory_mib == 512
    run(h.resize(1, 640))
    assert len(h.dimms) == 2
    with pytest.raises(HotplugError, match="no free memory slot"):
        run(h.resize(1, 1024))
    run(h.resize(1, 256))
    assert h.dimms == [] and q.objects == set() and len(q.sent("device_del")) == 2


# ----------------------------------------------------------------------------- disks
def test_disk_attach_detach(img: str) -> None:
    """QEMU opens no host path: the disk goes over as an fd in a fd set of its own, which is
    removed once the block node is."""
    q = FakeQemu()
    h, _ = make(q)
    d = run(h.attach_disk("d0", img, False, False))
    assert d.guest_path == "/dev/sda" and d.target == 1
    assert q.fdsets == {d.fdset: img}
    add = q.sent("blockdev-add")[0]
    assert add["file"] == {"driver": "file", "filename": f"/dev/fdset/{d.fdset}"}
    assert not add["read-only"]
    dev = q.sent("device_add")[0]
    assert (dev["driver"], dev["bus"], dev["scsi-id"], dev["drive"]) == (
        "scsi-hd",
        "scsi0.0",
        1,
        "drive-d0",
    )
    d2 = run(h.attach_disk("d1", img, True, True))
    assert d2.target == 2 and q.sent("blockdev-add")[1]["file"]["driver"] == "host_device"
    assert q.sent("blockdev-add")[1]["read-only"] and len(q.fdsets) == 2
    run(h.detach_disk("d0"))
    assert q.nodes == {"drive-d1"} and "scsi-d0" not in q.devices
    assert list(q.fdsets) == [d2.fdset]
    names = [c for c, _ in q.calls]
    assert names.index("blockdev-del") < names.index("remove-fd")


def test_disk_that_cannot_be_opened_sends_nothing(tmp_path: Path) -> None:
    q = FakeQemu()
    h, _ = make(q)
    with pytest.raises(HotplugError, match="No such file") as info:
        run(h.attach_disk("d0", str(tmp_path / "absent"), False, False))
    assert info.value.kind == ErrorKind.INVALID and q.calls == [] and h.disks == {}


def test_disk_the_guest_never_sees_is_rolled_back(img: str) -> None:
    q = FakeQemu()
    h, agent = make(q)
    agent.missing.add("0:1:0")
    with pytest.raises(HotplugError, match="did not appear"):
        run(h.attach_disk("d0", img, False, False))
    assert q.nodes == set() and q.devices == set() and h.disks == {} and q.fdsets == {}


@pytest.mark.parametrize("failing", ["blockdev-add", "device_add"])
def test_disk_qemu_refuses_is_rolled_back(img: str, failing: str) -> None:
    q = FakeQemu(fail=lambda c, a: "Could not open" if c == failing else "")
    h, _ = make(q)
    with pytest.raises(HotplugError, match="Could not open"):
        run(h.attach_disk("d0", img, False, False))
    assert q.nodes == set() and q.fdsets == {}


# ----------------------------------------------------------------------------- VFIO
def test_vfio_functions_go_on_free_root_ports() -> None:
    q = FakeQemu()
    h, agent = make(q, root_ports=3)
    paths = run(h.attach_vfio("v0", ["0000:03:00.0", "0000:03:00.1"]))
    assert [(a["driver"], a["host"], a["bus"]) for a in q.sent("device_add")] == [
        ("vfio-pci", "0000:03:00.0", "rp0"),
        ("vfio-pci", "0000:03:00.1", "rp1"),
    ]
    assert list(agent.devices_seen) == ["0000:00:10.0", "0000:00:10.1"] and len(paths) == 2
    with pytest.raises(HotplugError, match="free root ports") as info:
        run(h.attach_vfio("v1", ["0000:04:00.0", "0000:05:00.0"]))
    assert info.value.kind == ErrorKind.LIMIT and len(q.sent("device_add")) == 2  # refused up front
    run(h.detach_vfio("v0"))
    assert q.devices == set()


def test_vfio_group_is_granted_while_plugged_and_given_back() -> None:
    """A non-root QEMU gets the group's node before its devices are plugged, and loses it
    when they are unplugged, or when the plug fails."""
    q = FakeQemu(fail=lambda c, a: "no such host device" if a.get("host") == "0000:09:00.0" else "")
    held: list[str] = []

    def grant(group: str) -> Any:
        held.append(group)
        vfio_id = {"7": "v0", "9": "v1"}[group]
        assert f"vfio-{vfio_id}-0" not in q.devices, "granted after its device was plugged"
        return lambda: held.remove(group)

    h, _ = make(q, grant)
    run(h.attach_vfio("v0", ["0000:03:00.0"], "7"))
    assert held == ["7"]
    with pytest.raises(HotplugError, match="no such host device"):
        run(h.attach_vfio("v1", ["0000:09:00.0"], "9"))
    assert held == ["7"]
    run(h.detach_vfio("v0"))
    assert held == [] and q.devices == set()


def test_vfio_group_that_cannot_be_granted_plugs_nothing() -> None:
    q = FakeQemu()

    def grant(group: str) -> Any:
        raise OSError(f"/dev/vfio/{group} does not exist")

    h, _ = make(q, grant)
    with pytest.raises(HotplugError, match="VFIO group 7: /dev/vfio/7 does not exist"):
        run(h.attach_vfio("v0", ["0000:03:00.0"], "7"))
    assert q.calls == [] and h.vfio == {}


def test_vfio_partial_failure_unplugs_what_was_plugged() -> None:
    q = FakeQemu(
        fail=lambda c, a: (
            "vfio 0000:03:00.1: no such host device" if a.get("host") == "0000:03:00.1" else ""
        )
    )
    h, _ = make(q)
    with pytest.raises(HotplugError, match="no such host device"):
        run(h.attach_vfio("v0", ["0000:03:00.0", "0000:03:00.1"]))
    assert q.devices == set() and h.vfio == {}


def test_nic_passes_its_fds_and_shares_root_ports_with_vfio() -> None:
    q = FakeQemu()
    h, _agent = make(q, root_ports=3)
    run(h.attach_vfio("v0", ["0000:03:00.0"]))  # takes rp0
    port, _ = run(h.attach_nic("net0", [7, 8], "02:00:00:00:00:01", False))
    assert port == 1 and q.passed == [7, 8]
    nd = q.sent("netdev_add")[0]
    assert nd == {"type": "tap", "id": "hn-net0", "vhost": False, "fds": "net0-q0:net0-q1"}
    dev = next(a for a in q.sent("device_add") if a["driver"] == "virtio-net-pci")
    assert (dev["bus"], dev["mac"], dev["mq"], dev["vectors"]) == (
        "rp1",
        "02:00:00:00:00:01",
        True,
        6,
    )
    port, _ = run(h.attach_nic("net1", [9], "02:00:00:00:00:02", True))
    assert port == 2 and q.sent("netdev_add")[1]["fd"] == "net1-q0"
    # vhost: the monitor opens /dev/vhost-net for QEMU (which may run unprivileged)
    assert q.sent("netdev_add")[1]["vhost"] is True
    assert q.sent("netdev_add")[1]["vhostfd"] == "net1-v0" and len(q.passed) == 4
    assert "mq" not in q.sent("device_add")[-1]
    with pytest.raises(HotplugError, match="no free root port") as info:
        run(h.attach_nic("net2", [10], "02:00:00:00:00:03", False))
    assert info.value.kind == ErrorKind.LIMIT and len(q.passed) == 4  # refused before any fd
    run(h.detach_nic("net0"))
    run(h.detach_vfio("v0"))
    run(h.detach_nic("net1"))
    assert q.devices == set() and q.netdevs == set() and q.fds == set()


@pytest.mark.parametrize("failing", ["netdev_add", "device_add", "guest"])
def test_nic_failure_leaves_qemu_as_it_was(failing: str) -> None:
    q = FakeQemu(fail=lambda c, a: f"{c} refused" if c == failing else "")
    h, agent = make(q)
    if failing == "guest":
        agent.missing.add(hp.root_port_address(0))
    with pytest.raises(HotplugError) as info:
        run(h.attach_nic("net0", [5], "02:00:00:00:00:01", False))
    assert info.value.kind == ErrorKind.FAILED and "02:00:00:00:00:01" in str(info.value)
    assert q.devices == set() and q.netdevs == set() and q.fds == set() and h.nics == {}


def test_root_port_addresses_match_the_argv_layout() -> None:
    assert hp.root_port_address(0) == "0000:00:10.0"
    assert hp.root_port_address(9) == "0000:00:11.1"


# ----------------------------------------------------------------------------- sizing
def test_sizing_from_quota_cpuset_and_limit() -> None:
    cfg = Config()
    assert sizing.size_for(cfg, None) == sizing.Size(1, 256)
    r = {"cpu": {"quota": 150000, "period": 100000}, "memory": {"limit": 512 * MIB}}
    assert sizing.size_for(cfg, r) == sizing.Size(2, 768)
    assert sizing.size_for(cfg, {"cpu": {"cpus": "0-2,5"}}) == sizing.Size(4, 256)
    assert sizing.size_for(cfg, {"cpu": {"quota": -1}, "memory": {"limit": -1}}).vcpus == 1


@pytest.mark.parametrize(
    ("res", "msg"),
    [
        ({"cpu": {"quota": -5}}, "cpu.quota"),
        ({"cpu": {"quota": 100, "period": 0}}, "cpu.period"),
        ({"cpu": {"cpus": "3-1"}}, "CPU list"),
        ({"cpu": {"cpus": "x"}}, "CPU list"),
        ({"memory": {"limit": -7}}, "memory.limit"),
        ({"memory": {"limit": 1 << 60}}, "absurd"),
        ({"memory": {"limit": "1G"}}, "integer"),
    ],
)
def test_sizing_rejects_bad_values(res: dict[str, Any], msg: str) -> None:
    with pytest.raises(errors.SizingError, match=msg):
        sizing.size_for(Config(), res)


def test_sizing_fits_or_refuses() -> None:
    cfg = Config()
    sizing.check_fits(cfg, sizing.Size(2, 1024), host_cpus=2, host_memory_mib=4096)
    with pytest.raises(errors.SizingError, match="at most 2"):
        sizing.check_fits(cfg, sizing.Size(3, 256), host_cpus=2, host_memory_mib=4096)
    with pytest.raises(errors.SizingError, match="4096 MiB"):
        sizing.check_fits(cfg, sizing.Size(1, 8192), host_cpus=2, host_memory_mib=4096)


def test_update_merges_per_table() -> None:
    base = {"memory": {"limit": 1, "swap": 2}, "cpu": {"shares": 5}}
    assert sizing.merge(base, {"memory": {"limit": 3}}) == {
        "memory": {"limit": 3, "swap": 2},
        "cpu": {"shares": 5},
    }
    assert base["memory"] == {"limit": 1, "swap": 2}


# ----------------------------------------------------------------------------- host devices
def _fake_sysfs(root: Path, drivers: dict[str, str]) -> Path:
    sysfs = root / "sys"
    grp = sysfs / "kernel/iommu_groups/7/devices"
    grp.mkdir(parents=True)
    (sysfs / "bus/pci/drivers").mkdir(parents=True)
    for bdf, drv in drivers.items():
        dev = sysfs / "bus/pci/devices" / bdf
        dev.mkdir(parents=True)
        (grp / bdf).symlink_to(dev)
        (dev / "driver_override").write_text("")
        if drv:
            d = sysfs / "bus/pci/drivers" / drv
            d.mkdir(exist_ok=True)
            (d / "unbind").write_text("")
            (dev / "driver").symlink_to(d)
    (sysfs / "bus/pci/drivers_probe").write_text("")
    return sysfs


def vfio_spec(group: str) -> dict[str, Any]:
    return {"linux": {"devices": [{"path": f"/dev/vfio/{group}", "type": "c"}]}}


def test_vfio_group_bound_to_vfio_pci(tmp_path: Path) -> None:
    sysfs = _fake_sysfs(tmp_path, {"0000:03:00.0": "vfio-pci", "0000:03:00.1": "vfio-pci"})
    (g,) = devices.vfio_groups("c1", vfio_spec("7"), sysfs)
    assert g.group == "7" and g.bdfs == ("0000:03:00.0", "0000:03:00.1")


def test_vfio_group_not_bound_is_refused_naming_the_devices(tmp_path: Path) -> None:
    sysfs = _fake_sysfs(tmp_path, {"0000:03:00.0": "vfio-pci", "0000:03:00.1": "snd_hda_intel"})
    with pytest.raises(errors.DeviceError, match=r"0000:03:00.1 \(snd_hda_intel\)"):
        devices.vfio_groups("c1", vfio_spec("7"), sysfs)


def test_vfio_driver_override_rebinds(tmp_path: Path) -> None:
    sysfs = _fake_sysfs(tmp_path, {"0000:03:00.0": "nouveau"})
    dev = sysfs / "bus/pci/devices/0000:03:00.0"
    # The fake kernel: drivers_probe does not bind, so the override is written and the
    # result is still checked (and reported).
    with pytest.raises(errors.DeviceError, match="did not bind to vfio-pci"):
        devices.vfio_groups("c1", vfio_spec("7"), sysfs, override=True)
    assert (dev / "driver_override").read_text() == "vfio-pci"
    assert (sysfs / "bus/pci/drivers/nouveau/unbind").read_text() == "0000:03:00.0"
    assert (sysfs / "bus/pci/drivers_probe").read_text() == "0000:03:00.0"


@pytest.mark.parametrize(("group", "msg"), [("9", "does not exist"), ("x", "not a group")])
def test_vfio_missing_or_bad_group(tmp_path: Path, group: str, msg: str) -> None:
    sysfs = _fake_sysfs(tmp_path, {"0000:03:00.0": "vfio-pci"})
    with pytest.raises(errors.DeviceError, match=msg):
        devices.vfio_groups("c1", vfio_spec(group), sysfs)


def test_block_device_by_major_minor(tmp_path: Path) -> None:
    sysfs = tmp_path / "sys"
    (sysfs / "dev/block/7:0").mkdir(parents=True)
    (sysfs / "dev/block/7:0/uevent").write_text("MAJOR=7\nMINOR=0\nDEVNAME=nullblk\n")
    dev = tmp_path / "dev"
    dev.mkdir()
    os.symlink("/dev/null", dev / "nullblk")  # a char device: refused as not a block device
    spec = {"linux": {"devices": [{"path": "/dev/xvdb", "type": "b", "major": 7, "minor": 0}]}}
    with pytest.raises(errors.DeviceError, match="not a block device"):
        devices.block_devices("c1", spec, sysfs, dev)
    # A major:minor no host device has: a node for crun to make in the container, as runc
    # makes it; nothing to hot-plug.
    spec["linux"]["devices"][0]["major"] = 250
    assert devices.block_devices("c1", spec, sysfs, dev) == []
