"""Hot-plug over QMP, serialised by the monitor: vCPUs, memory, virtio-scsi disks, VFIO.

Every operation checks its limits (maxcpus, maxmem, DIMM slots, SCSI targets, root ports)
before it changes anything, and undoes what it did when a later step fails, so a refused or
failed request leaves the VM as it was. What QEMU 7.2 does under TCG shapes the choices
(../shared/reference/qemu-hotplug-findings.md): vCPUs are added one socket each and only
taken offline in the guest when the sandbox shrinks (a vCPU device_del there corrupts QEMU),
unless ``cpu_hotunplug`` says the hypervisor is safe; memory grows and shrinks by resizing the
pre-created virtio-mem device, or by one pc-dimm per increase (unplugged whole, which works
because the guest onlines hot-added memory as movable); disks are scsi-hd on the virtio-scsi
controller; VFIO devices and NICs go on the pre-created PCIe root ports (one allocation for
both). QEMU opens nothing on the host after boot, so that it can run unprivileged
(monitor.qemuuser): a disk is opened here and its fd handed over (SCM_RIGHTS, then ``add-fd``;
QEMU opens ``/dev/fdset/N``), a NIC's tap and vhost-net fds likewise (``getfd``), and a VFIO
group's node is handed to QEMU's uid by the ``grant_vfio`` callback for as long as it is plugged.

The limits are the launch contract's ``VmLimits`` (what QEMU's command line was built for).
The QMP command function, the QMP event waiter and the agent calls are passed in, so unit
tests drive this module with a fake QEMU and a fake agent.

May import: the standard library, cocoon.runtime.errors, cocoon.runtime.monitor.launch.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from cocoon.runtime.errors import ErrorKind, HotplugError
from cocoon.runtime.monitor.launch import MIB, ROOT_PORT_SLOT, VMEM_BLOCK_MIB, VmLimits

log = logging.getLogger("cocoon.monitor.hotplug")

DIMM_ALIGN_MIB = 128  # the guest's memory block size: smaller DIMMs cannot be onlined
MAX_SCSI_TARGET = 255

QmpFn = Callable[[str, dict[str, Any] | None], Awaitable[Any]]
FdFn = Callable[[int, str], Awaitable[None]]  # hand QEMU an fd under a name (getfd)
FdSetFn = Callable[[int, str], Awaitable[int]]  # hand QEMU an fd in a new fd set (add-fd): its id
GrantFn = Callable[[str], Callable[[], None]]  # give QEMU a VFIO group's node; returns the undo
VHOST_NET = "/dev/vhost-net"


class EventWaiter(Protocol):
    def __call__(
        self, name: str, match: Callable[[dict[str, Any]], bool], timeout: float
    ) -> Awaitable[dict[str, Any] | None]: ...


class GuestAgent(Protocol):
    async def online_cpus(self, count: int) -> int: ...
    async def offline_cpus(self, keep: int) -> int: ...
    async def memory_total(self) -> int: ...
    async def wait_device(self, kind: str, address: str, timeout_ms: int) -> str: ...


@dataclass
class Disk:
    node: str
    device: str
    target: int
    guest_path: str = ""
    fdset: int = -1


@dataclass
class Timing:
    """What one operation cost: QMP command to guest-visible, in seconds."""

    steps: dict[str, float] = field(default_factory=dict)

    @contextlib.asynccontextmanager
    async def step(self, name: str) -> Any:
        t = time.monotonic()
        try:
            yield
        finally:
            self.steps[name] = self.steps.get(name, 0.0) + time.monotonic() - t


def root_port_address(index: int) -> str:
    """The guest PCI address of root port ``index`` (its slot.function on pcie.0)."""
    return f"0000:00:{ROOT_PORT_SLOT + index // 8:02x}.{index % 8}"


class Hotplug:
    def __init__(
        self,
        limits: VmLimits,
        qmp: QmpFn,
        wait_event: EventWaiter,
        agent: GuestAgent,
        device_timeout_s: float = 20.0,
        pass_fd: FdFn | None = None,
        add_fd: FdSetFn | None = None,
        grant_vfio: GrantFn | None = None,
    ) -> None:
        self.limits = limits
        self._qmp = qmp
        self._wait_event = wait_event
        self._agent = agent
        self._timeout = device_timeout_s
        self._pass_fd = pass_fd
        self._add_fd = add_fd
        self._grant_vfio = grant_vfio
        self._lock = asyncio.Lock()
        self.cpus_plugged = limits.vcpus  # QEMU vCPU devices present (boot ones included)
        self.cpus_online = limits.vcpus
        self.vmem_mib = 0  # virtio-mem requested size
        self.dimms: list[tuple[str, str, int]] = []  # (device id, backend id, MiB), in order
        self.disks: dict[str, Disk] = {}
        self.vfio: dict[str, list[tuple[str, int]]] = {}  # id -> [(device id, root port)]
        self.vfio_undo: dict[str, Callable[[], None]] = {}  # id -> gives the group's node back
        self.nics: dict[str, tuple[str, str, int]] = {}  # id -> (device id, netdev id, port)
        self._seq = 0

    # ------------------------------------------------------------------ helpers
    def _next(self, prefix: str) -> str:
        self._seq += 1
        return f"{prefix}{self._seq}"

    @property
    def memory_mib(self) -> int:
        return self.limits.memory_mib + self.vmem_mib + sum(s for _, _, s in self.dimms)

    def _check(self, vcpus: int, memory_mib: int) -> None:
        lim = self.limits
        if vcpus < 1:
            raise HotplugError(ErrorKind.INVALID, f"vCPUs must be at least 1, got {vcpus}")
        if vcpus > lim.max_vcpus:
            raise HotplugError(
                ErrorKind.LIMIT,
                f"{vcpus} vCPUs asked, the sandbox holds at most {lim.max_vcpus} "
                "(hypervisor.default_maxvcpus)",
            )
        if memory_mib < 1:
            raise HotplugError(ErrorKind.INVALID, f"memory must be positive, got {memory_mib} MiB")
        if memory_mib > lim.max_memory_mib:
            raise HotplugError(
                ErrorKind.LIMIT,
                f"{memory_mib} MiB of memory asked, the sandbox holds at most "
                f"{lim.max_memory_mib} MiB (hypervisor.max_memory_mib)",
            )
        grows = memory_mib > self.memory_mib
        if lim.memory_hotplug == "pc-dimm" and grows and len(self.dimms) >= lim.memory_slots:
            raise HotplugError(
                ErrorKind.LIMIT,
                f"no free memory slot: all {lim.memory_slots} are in use (hypervisor.memory_slots)",
            )

    async def agent_memory_total(self) -> int:
        """MemTotal in the guest, in bytes."""
        return await self._agent.memory_total()

    # ------------------------------------------------------------------ CPU and memory
    async def resize(self, vcpus: int, memory_mib: int, timing: Timing | None = None) -> None:
        """Brings the VM to ``vcpus`` online vCPUs and ``memory_mib`` of RAM (>= boot RAM)."""
        timing = timing or Timing()
        memory_mib = max(memory_mib, self.limits.memory_mib)
        async with self._lock:
            self._check(vcpus, memory_mib)
            before = (self.cpus_online, self.memory_mib)
            try:
                async with timing.step("cpu"):
                    await self._set_cpus(vcpus)
                async with timing.step("memory"):
                    await self._set_memory(memory_mib)
            except Exception as exc:
                log.warning("resize to %d vCPUs / %d MiB failed; rolling back", vcpus, memory_mib)
                with contextlib.suppress(Exception):
                    await self._set_memory(before[1])
                with contextlib.suppress(Exception):
                    await self._set_cpus(before[0])
                if isinstance(exc, HotplugError):
                    raise
                raise HotplugError(ErrorKind.FAILED, f"resize: {exc}") from exc

    async def _set_cpus(self, target: int) -> None:
        if target > self.cpus_plugged:
            await self._add_cpus(target - self.cpus_plugged)
        if target > self.cpus_online:
            online = await self._agent.online_cpus(target)
            self.cpus_online = online
            if online < target:
                raise HotplugError(
                    ErrorKind.FAILED, f"the guest brought only {online} of {target} vCPUs online"
                )
        elif target < self.cpus_online:
            self.cpus_online = await self._agent.offline_cpus(target)
            if self.limits.cpu_hotunplug:
                await self._remove_cpus(self.cpus_plugged - target)

    async def _add_cpus(self, count: int) -> None:
        slots = await self._qmp("query-hotpluggable-cpus", None)
        free = sorted(
            (s for s in slots if not s.get("qom-path")),
            key=lambda s: s["props"].get("socket-id", 0),
        )
        if len(free) < count:
            raise HotplugError(
                ErrorKind.LIMIT, f"{count} vCPUs to add, QEMU has {len(free)} free slots"
            )
        for slot in free[:count]:
            props = slot["props"]
            args = {"driver": slot["type"], "id": f"vcpu{props.get('socket-id', 0)}", **props}
            args.pop("node-id", None)
            try:
                await self._qmp("device_add", args)
            except Exception as exc:
                raise HotplugError(ErrorKind.FAILED, f"vCPU hot-add: {exc}") from exc
            self.cpus_plugged += 1

    async def _remove_cpus(self, count: int) -> None:
        for socket in range(self.cpus_plugged - 1, self.cpus_plugged - 1 - count, -1):
            if socket < self.limits.vcpus:
                break  # boot vCPUs are not hot-pluggable devices
            with contextlib.suppress(Exception):
                await self._qmp("device_del", {"id": f"vcpu{socket}"})
                self.cpus_plugged -= 1

    async def _set_memory(self, target_mib: int) -> None:
        if target_mib == self.memory_mib:
            return
        if self.limits.memory_hotplug == "virtio-mem":
            await self._resize_vmem(target_mib - self.limits.memory_mib)
        elif target_mib > self.memory_mib:
            await self._add_dimm(target_mib - self.memory_mib)
        else:
            await self._remove_dimms(target_mib)

    async def _resize_vmem(self, want_mib: int) -> None:
        want = (want_mib + VMEM_BLOCK_MIB - 1) // VMEM_BLOCK_MIB * VMEM_BLOCK_MIB
        path = "/machine/peripheral/vm0"
        await self._qmp(
            "qom-set", {"path": path, "property": "requested-size", "value": want * MIB}
        )
        end = time.monotonic() + self._timeout
        size = -1
        while time.monotonic() < end:
            size = int(await self._qmp("qom-get", {"path": path, "property": "size"}))
            if size == want * MIB:
                break
            await asyncio.sleep(0.05)
        if size != want * MIB:
            # Give back the request: the guest keeps what it could not release (or add).
            with contextlib.suppress(Exception):
                await self._qmp(
                    "qom-set", {"path": path, "property": "requested-size", "value": size}
                )
            self.vmem_mib = max(size, 0) // MIB
            raise HotplugError(
                ErrorKind.FAILED,
                f"the guest reached {max(size, 0) // MIB} MiB of hot-plugged memory, not "
                f"{want} MiB, within {self._timeout:g}s",
            )
        self.vmem_mib = want
        await self._agent.memory_total()  # onlines anything left offline

    async def _add_dimm(self, mib: int) -> None:
        size = (mib + DIMM_ALIGN_MIB - 1) // DIMM_ALIGN_MIB * DIMM_ALIGN_MIB
        if self.memory_mib + size > self.limits.max_memory_mib:
            size = (
                (self.limits.max_memory_mib - self.memory_mib) // DIMM_ALIGN_MIB * (DIMM_ALIGN_MIB)
            )
            if size < mib:
                raise HotplugError(
                    ErrorKind.LIMIT,
                    f"{mib} MiB more memory does not fit in {DIMM_ALIGN_MIB} MiB DIMMs under "
                    f"the {self.limits.max_memory_mib} MiB ceiling",
                )
        mem, dimm = self._next("mem"), self._next("dimm")
        backend = "memory-backend-memfd" if self.limits.shared_memory else "memory-backend-ram"
        props: dict[str, Any] = {"size": size * MIB}
        if self.limits.shared_memory:
            props["share"] = True
        try:
            await self._qmp("object-add", {"qom-type": backend, "id": mem, **props})
        except Exception as exc:
            raise HotplugError(ErrorKind.FAILED, f"memory backend: {exc}") from exc
        try:
            await self._qmp("device_add", {"driver": "pc-dimm", "id": dimm, "memdev": mem})
        except Exception as exc:
            with contextlib.suppress(Exception):
                await self._qmp("object-del", {"id": mem})
            raise HotplugError(ErrorKind.FAILED, f"pc-dimm hot-add: {exc}") from exc
        self.dimms.append((dimm, mem, size))
        await self._agent.memory_total()

    async def _remove_dimms(self, target_mib: int) -> None:
        while self.dimms and self.memory_mib - self.dimms[-1][2] >= target_mib:
            dimm, mem, _size = self.dimms[-1]
            await self._device_del(dimm)
            with contextlib.suppress(Exception):
                await self._qmp("object-del", {"id": mem})
            self.dimms.pop()

    async def _device_del(self, dev: str) -> None:
        """device_del, then DEVICE_DELETED (the guest let go), or an error naming the wait."""
        waiter = asyncio.ensure_future(
            self._wait_event("DEVICE_DELETED", lambda d: d.get("device") == dev, self._timeout)
        )
        try:
            await self._qmp("device_del", {"id": dev})
        except Exception as exc:
            waiter.cancel()
            raise HotplugError(ErrorKind.FAILED, f"device_del {dev}: {exc}") from exc
        if await waiter is None:
            raise HotplugError(
                ErrorKind.FAILED, f"the guest did not release {dev} within {self._timeout:g}s"
            )

    # ------------------------------------------------------------------ disks
    async def attach_disk(
        self, disk_id: str, path: str, readonly: bool, is_block: bool, timing: Timing | None = None
    ) -> Disk:
        timing = timing or Timing()
        async with self._lock:
            if disk_id in self.disks:
                raise HotplugError(ErrorKind.INVALID, f"disk {disk_id} is already attached")
            used = {d.target for d in self.disks.values()}
            free = [t for t in range(1, MAX_SCSI_TARGET + 1) if t not in used]
            if not free:
                raise HotplugError(ErrorKind.LIMIT, "all SCSI targets of the controller are in use")
            d = Disk(node=f"drive-{disk_id}", device=f"scsi-{disk_id}", target=free[0])
            d.fdset = await self._open_for_qemu(path, readonly)
            file = {
                "driver": "host_device" if is_block else "file",
                "filename": f"/dev/fdset/{d.fdset}",
            }
            try:
                async with timing.step("qmp"):
                    await self._qmp(
                        "blockdev-add",
                        {"driver": "raw", "node-name": d.node, "read-only": readonly, "file": file},
                    )
            except Exception as exc:
                await self._remove_fdset(d.fdset)
                raise HotplugError(ErrorKind.FAILED, f"disk {path}: {exc}") from exc
            try:
                async with timing.step("qmp"):
                    await self._qmp(
                        "device_add",
                        {
                            "driver": "scsi-hd",
                            "id": d.device,
                            "bus": "scsi0.0",
                            "drive": d.node,
                            "channel": 0,
                            "scsi-id": d.target,
                            "lun": 0,
                            "serial": disk_id[:36],
                        },
                    )
                try:
                    async with timing.step("guest"):
                        d.guest_path = await self._agent.wait_device(
                            "scsi", f"0:{d.target}:0", int(self._timeout * 1000)
                        )
                except Exception:
                    with contextlib.suppress(Exception):
                        await self._device_del(d.device)
                    raise
            except Exception as exc:
                with contextlib.suppress(Exception):
                    await self._qmp("blockdev-del", {"node-name": d.node})
                await self._remove_fdset(d.fdset)
                if isinstance(exc, HotplugError):
                    raise
                raise HotplugError(ErrorKind.FAILED, f"disk {path}: {exc}") from exc
            self.disks[disk_id] = d
            return d

    async def detach_disk(self, disk_id: str) -> None:
        async with self._lock:
            d = self.disks.get(disk_id)
            if d is None:
                raise HotplugError(ErrorKind.INVALID, f"disk {disk_id} is not attached")
            await self._device_del(d.device)
            with contextlib.suppress(Exception):
                await self._qmp("blockdev-del", {"node-name": d.node})
            await self._remove_fdset(d.fdset)
            del self.disks[disk_id]

    async def _open_for_qemu(self, path: str, readonly: bool) -> int:
        """Opens a disk here and hands QEMU the fd in a fd set of its own: its id."""
        if self._add_fd is None:
            raise HotplugError(ErrorKind.FAILED, "this monitor cannot pass fds to QEMU")
        mode = os.O_RDONLY if readonly else os.O_RDWR
        try:
            fd = os.open(path, mode | os.O_CLOEXEC)
        except OSError as exc:
            raise HotplugError(ErrorKind.INVALID, f"disk {path}: {exc.strerror}") from exc
        try:
            return await self._add_fd(fd, path)
        except Exception as exc:
            raise HotplugError(ErrorKind.FAILED, f"disk {path}: handing it to QEMU: {exc}") from exc
        finally:
            os.close(fd)  # QEMU holds its own copy

    async def _remove_fdset(self, fdset: int) -> None:
        """Closes QEMU's copy of a disk's fd (once the block node that used it is gone)."""
        with contextlib.suppress(Exception):
            await self._qmp("remove-fd", {"fdset-id": fdset})

    # ------------------------------------------------------------------ VFIO
    def _free_ports(self) -> list[int]:
        used = {port for devs in self.vfio.values() for _, port in devs}
        used |= {port for _, _, port in self.nics.values()}
        return [p for p in range(self.limits.root_ports) if p not in used]

    async def attach_vfio(self, vfio_id: str, host_bdfs: list[str], group: str = "") -> list[str]:
        """Plugs each PCI function of VFIO group ``group`` onto a free root port; returns the
        guest sysfs paths of the devices once the guest sees them."""
        async with self._lock:
            if vfio_id in self.vfio:
                raise HotplugError(ErrorKind.INVALID, f"VFIO device {vfio_id} is already attached")
            free = self._free_ports()
            if len(free) < len(host_bdfs):
                raise HotplugError(
                    ErrorKind.LIMIT,
                    f"{len(host_bdfs)} PCI devices to plug, {len(free)} free root ports "
                    "(hypervisor.hotplug_root_ports)",
                )
            plugged: list[tuple[str, int]] = []
            paths: list[str] = []
            undo: Callable[[], None] = lambda: None  # noqa: E731
            try:
                if self._grant_vfio is not None:
                    try:
                        undo = self._grant_vfio(group)
                    except Exception as exc:
                        raise HotplugError(ErrorKind.FAILED, f"VFIO group {group}: {exc}") from exc
                for bdf, port in zip(host_bdfs, free, strict=False):
                    dev = f"vfio-{vfio_id}-{len(plugged)}"
                    try:
                        await self._qmp(
                            "device_add",
                            {"driver": "vfio-pci", "id": dev, "host": bdf, "bus": f"rp{port}"},
                        )
                    except Exception as exc:
                        raise HotplugError(ErrorKind.FAILED, f"VFIO device {bdf}: {exc}") from exc
                    plugged.append((dev, port))
                    paths.append(
                        await self._agent.wait_device(
                            "pci", root_port_address(port), int(self._timeout * 1000)
                        )
                    )
            except Exception:
                for dev, _ in reversed(plugged):
                    with contextlib.suppress(Exception):
                        await self._device_del(dev)
                undo()
                raise
            self.vfio[vfio_id] = plugged
            self.vfio_undo[vfio_id] = undo
            return paths

    async def detach_vfio(self, vfio_id: str) -> None:
        async with self._lock:
            devs = self.vfio.get(vfio_id)
            if devs is None:
                raise HotplugError(ErrorKind.INVALID, f"VFIO device {vfio_id} is not attached")
            for dev, _ in reversed(devs):
                await self._device_del(dev)
            del self.vfio[vfio_id]
            self.vfio_undo.pop(vfio_id, lambda: None)()

    # ------------------------------------------------------------------ NICs
    async def attach_nic(
        self, nic_id: str, fds: list[int], mac: str, vhost: bool
    ) -> tuple[int, str]:
        """Plugs a virtio-net NIC on a free root port with the tap's queue fds (one per
        queue pair); returns the root port and the guest sysfs path once the guest sees it.
        The fds stay the caller's: QEMU holds its own copies."""
        if self._pass_fd is None:
            raise HotplugError(ErrorKind.FAILED, "this monitor cannot pass fds to QEMU")
        async with self._lock:
            if nic_id in self.nics:
                raise HotplugError(ErrorKind.INVALID, f"NIC {nic_id} is already attached")
            free = self._free_ports()
            if not free:
                raise HotplugError(
                    ErrorKind.LIMIT,
                    f"no free root port for NIC {nic_id} (hypervisor.hotplug_root_ports = "
                    f"{self.limits.root_ports}, all in use)",
                )
            port = free[0]
            names = [f"{nic_id}-q{i}" for i in range(len(fds))]
            vnames = [f"{nic_id}-v{i}" for i in range(len(fds))] if vhost else []
            netdev, dev = f"hn-{nic_id}", f"nic-{nic_id}"
            added: list[tuple[str, dict[str, Any]]] = []
            try:
                for fd, name in zip(fds, names, strict=True):
                    await self._pass_fd(fd, name)
                    added.append(("closefd", {"fdname": name}))
                for name in vnames:  # QEMU may not open /dev/vhost-net itself (non-root)
                    vfd = os.open(VHOST_NET, os.O_RDWR | os.O_CLOEXEC)
                    try:
                        await self._pass_fd(vfd, name)
                    finally:
                        os.close(vfd)
                    added.append(("closefd", {"fdname": name}))
                nd: dict[str, Any] = {"type": "tap", "id": netdev, "vhost": vhost}
                if len(fds) > 1:
                    nd["fds"] = ":".join(names)
                else:
                    nd["fd"] = names[0]
                if len(vnames) > 1:
                    nd["vhostfds"] = ":".join(vnames)
                elif vnames:
                    nd["vhostfd"] = vnames[0]
                await self._qmp("netdev_add", nd)
                added = [("netdev_del", {"id": netdev})]  # QEMU took the named fds
                da: dict[str, Any] = {
                    "driver": "virtio-net-pci",
                    "id": dev,
                    "netdev": netdev,
                    "mac": mac,
                    "bus": f"rp{port}",
                    "romfile": "",
                }
                if len(fds) > 1:
                    da |= {"mq": True, "vectors": 2 * len(fds) + 2}
                await self._qmp("device_add", da)
                added.append(("device", {"id": dev}))
                path = await self._agent.wait_device(
                    "pci", root_port_address(port), int(self._timeout * 1000)
                )
            except Exception as exc:
                for what, args in reversed(added):
                    with contextlib.suppress(Exception):
                        if what == "device":
                            await self._device_del(args["id"])
                        else:
                            await self._qmp(what, args)
                if isinstance(exc, HotplugError):
                    raise
                raise HotplugError(ErrorKind.FAILED, f"NIC {nic_id} ({mac}): {exc}") from exc
            self.nics[nic_id] = (dev, netdev, port)
            return port, path

    async def detach_nic(self, nic_id: str) -> None:
        async with self._lock:
            entry = self.nics.get(nic_id)
            if entry is None:
                raise HotplugError(ErrorKind.INVALID, f"NIC {nic_id} is not attached")
            dev, netdev, _ = entry
            await self._device_del(dev)
            with contextlib.suppress(Exception):
                await self._qmp("netdev_del", {"id": netdev})
            del self.nics[nic_id]
