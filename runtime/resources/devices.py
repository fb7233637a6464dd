"""Host devices a container asks for in ``linux.devices``: which to hot-plug, and checks.

Block devices (``type "b"``) are found on the host by their major:minor (``/sys/dev/block``),
or by the entry's path when it names a host block device; each is hot-plugged as a scsi-hd
and re-made in the container with the guest's numbers. A ``/dev/vfio/N`` entry is a VFIO
group: its PCI functions (``/sys/kernel/iommu_groups/N/devices``) must all be bound to
vfio-pci (or, with ``hypervisor.vfio_driver_override``, are rebound with driver_override)
before they are hot-plugged onto root ports; the guest kernel then drives them. Everything is
checked before the VM is touched; sysfs and /dev are parameters so unit tests use a fake tree.

May import: the standard library, cocoon.runtime.{errors, container.spec}.
"""

from __future__ import annotations

import hashlib
import os
import re
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cocoon.runtime.container.spec import is_bind_mount, is_vfio_group
from cocoon.runtime.errors import DeviceError

_BDF = re.compile(r"^[0-9a-f]{4}:[0-9a-f]{2}:[0-9a-f]{2}\.[0-7]$")


@dataclass(frozen=True)
class BlockDevice:
    index: int  # in linux.devices
    container_path: str
    host_path: str
    disk_id: str  # QMP-safe, unique per container


@dataclass(frozen=True)
class VfioGroup:
    index: int
    group: str
    bdfs: tuple[str, ...]
    vfio_id: str


def _disk_id(cid: str, kind: str, index: int) -> str:
    return f"{kind}{index}-{hashlib.sha256(cid.encode()).hexdigest()[:10]}"


def _check_block(path: str, what: str) -> None:
    try:
        st = os.stat(path)
    except OSError as exc:
        raise DeviceError(f"{what} {path}: {exc.strerror}") from exc
    if not stat.S_ISBLK(st.st_mode):
        raise DeviceError(f"{what} {path} is not a block device")


def _host_block(entry: dict[str, Any], where: str, sysfs: Path, dev: Path) -> str | None:
    """The host device a linux.devices entry names, or None when its major:minor is on no
    host device: then it is only a node for the container, made by crun in the guest as runc
    makes it (the runtime spec: the runtime creates the device nodes the entries list)."""
    major, minor = entry.get("major"), entry.get("minor")
    if isinstance(major, int) and isinstance(minor, int):
        uevent = sysfs / "dev/block" / f"{major}:{minor}" / "uevent"
        try:
            fields = dict(
                line.split("=", 1) for line in uevent.read_text().splitlines() if "=" in line
            )
        except OSError:
            return None
        name = fields.get("DEVNAME")
        if not name:
            raise DeviceError(f"{where}: block device {major}:{minor} has no name in {uevent}")
        return str(dev / name)
    return str(entry.get("path"))  # no major:minor: the path names the host device


def block_devices(
    cid: str, spec: dict[str, Any], sysfs: Path = Path("/sys"), dev: Path = Path("/dev")
) -> list[BlockDevice]:
    out = []
    for i, entry in enumerate(((spec.get("linux") or {}).get("devices")) or []):
        where = f"linux.devices[{i}]"
        if not isinstance(entry, dict) or not isinstance(entry.get("path"), str):
            raise DeviceError(f"{where} needs a path")
        if entry.get("type") != "b":
            continue
        host = _host_block(entry, where, sysfs, dev)
        if host is None:
            continue  # a node only: the guest spec keeps the entry for crun to make
        _check_block(host, f"{where}: host device")
        out.append(BlockDevice(i, entry["path"], host, _disk_id(cid, "d", i)))
    return out


def block_mounts(cid: str, spec: dict[str, Any]) -> list[BlockDevice]:
    """Mounts whose source is a host block device (a block-backed volume): each is
    hot-plugged and mounted by crun in the guest from the guest's node."""
    out = []
    for i, m in enumerate(spec.get("mounts") or []):
        src = m.get("source") if isinstance(m, dict) else None
        if not isinstance(src, str) or not src.startswith("/dev/") or is_bind_mount(m):
            continue
        _check_block(src, f"mounts[{i}]: source")
        out.append(BlockDevice(i, str(m.get("destination")), src, _disk_id(cid, "m", i)))
    return out


def vfio_groups(
    cid: str, spec: dict[str, Any], sysfs: Path = Path("/sys"), override: bool = False
) -> list[VfioGroup]:
    out = []
    for i, entry in enumerate(((spec.get("linux") or {}).get("devices")) or []):
        if not is_vfio_group(entry):
            continue
        group = entry["path"].rsplit("/", 1)[1]
        bdfs = group_devices(group, sysfs)
        check_bound(group, bdfs, sysfs, override)
        out.append(VfioGroup(i, group, tuple(bdfs), _disk_id(cid, "v", i)))
    return out


def group_devices(group: str, sysfs: Path = Path("/sys")) -> list[str]:
    if not group.isdigit():
        raise DeviceError(f"VFIO group {group!r}: not a group number (/dev/vfio/N)")
    d = sysfs / "kernel/iommu_groups" / group / "devices"
    if not d.is_dir():
        raise DeviceError(
            f"VFIO group {group} does not exist on this host (no {d}; is the IOMMU on?)"
        )
    bdfs = sorted(p.name for p in d.iterdir())
    if not bdfs:
        raise DeviceError(f"VFIO group {group} has no devices")
    for b in bdfs:
        if not _BDF.match(b):
            raise DeviceError(f"VFIO group {group}: unexpected entry {b} in {d}")
    return bdfs


def _driver(bdf: str, sysfs: Path) -> str:
    link = sysfs / "bus/pci/devices" / bdf / "driver"
    return os.path.basename(os.readlink(link)) if link.is_symlink() else ""


def check_bound(group: str, bdfs: list[str], sysfs: Path, override: bool) -> None:
    """Every function of the group on vfio-pci (the group is then viable), or an error."""
    wrong = {b: _driver(b, sysfs) for b in bdfs if _driver(b, sysfs) != "vfio-pci"}
    if not wrong:
        return
    if not override:
        listed = ", ".join(f"{b} ({drv or 'no driver'})" for b, drv in wrong.items())
        raise DeviceError(
            f"VFIO group {group} is not viable: not bound to vfio-pci: {listed} "
            "(bind them, or set hypervisor.vfio_driver_override = true)"
        )
    for b, drv in wrong.items():
        dev = sysfs / "bus/pci/devices" / b
        try:
            (dev / "driver_override").write_text("vfio-pci")
            if drv:
                (dev / "driver" / "unbind").write_text(b)
            (sysfs / "bus/pci/drivers_probe").write_text(b)
        except OSError as exc:
            raise DeviceError(f"VFIO device {b}: cannot rebind to vfio-pci: {exc}") from exc
    still = [b for b in bdfs if _driver(b, sysfs) != "vfio-pci"]
    if still:
        raise DeviceError(
            f"VFIO group {group}: {', '.join(still)} did not bind to vfio-pci "
            "(is the vfio-pci module loaded?)"
        )
