"""Resizing the VM and hot-plugging a container's host devices, through the monitor.

``check_fits`` refuses a size the host or the VM's ceilings cannot hold before anything is
touched; ``resize`` asks the monitor for vCPUs and memory; ``attach_devices`` hot-plugs the
container's block devices and VFIO groups and returns the agent's Device list;
``attach_disk`` one block device (its node in the guest); ``detach_devices`` undoes them on
delete, best effort.

May import: the standard library, cocoon.runtime.{sandbox.client, sandbox.launcher,
resources.devices, resources.sizing, config}.
"""

from __future__ import annotations

import contextlib
import os

from cocoon.runtime.config import Config
from cocoon.runtime.resources import devices as devmod
from cocoon.runtime.resources import sizing
from cocoon.runtime.sandbox.client import CallError, Client, rpc_error
from cocoon.runtime.sandbox.launcher import host_memory_mib


def check_fits(cfg: Config, size: sizing.Size) -> None:
    sizing.check_fits(cfg, size, os.cpu_count() or 1, host_memory_mib())


def resize(c: Client, cid: str, size: sizing.Size) -> None:
    try:
        c.vm.Resize({"vcpus": size.vcpus, "memory_mib": size.memory_mib}, timeout=120)
    except CallError as exc:
        raise rpc_error(
            f"container {cid}: sizing the sandbox to {size.vcpus} vCPUs and {size.memory_mib} MiB",
            exc,
        ) from exc


def attach_devices(
    c: Client,
    cid: str,
    disks: list[devmod.BlockDevice],
    groups: list[devmod.VfioGroup],
) -> list[dict[str, str]]:
    """Hot-plugs the container's block devices and VFIO groups; the agent's Device list."""
    out = [
        {
            "id": d.disk_id,
            "type": "blk",
            "vm_path": attach_disk(c, cid, d),
            "container_path": d.container_path,
        }
        for d in disks
    ]
    for g in groups:
        try:
            v = c.vm.AttachVfio(
                {"id": g.vfio_id, "host_bdfs": list(g.bdfs), "group": g.group}, timeout=60
            )
        except CallError as exc:
            raise rpc_error(f"container {cid}: VFIO group {g.group}", exc) from exc
        out += [{"id": g.vfio_id, "type": "vfio", "vm_path": p} for p in v["guest_paths"]]
    return out


def attach_disk(c: Client, cid: str, d: devmod.BlockDevice) -> str:
    """Hot-plugs one host block device; its node in the guest."""
    try:
        r = c.vm.AttachDisk({"id": d.disk_id, "path": d.host_path}, timeout=60)
    except CallError as exc:
        raise rpc_error(f"container {cid}: {d.host_path} for {d.container_path}", exc) from exc
    return str(r["guest_path"])


def detach_devices(c: Client, disks: list[str], vfio: list[str]) -> None:
    """Unplugs the container's disks and VFIO devices, best effort (delete goes on)."""
    for disk_id in disks:
        with contextlib.suppress(CallError):
            c.vm.DetachDisk({"id": disk_id}, timeout=60)
    for vfio_id in vfio:
        with contextlib.suppress(CallError):
            c.vm.DetachVfio({"id": vfio_id}, timeout=60)
