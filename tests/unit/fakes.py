"""Fakes shared by the unit tests: a QEMU that answers hot-plug's QMP commands, an agent that
answers the monitor's agent calls, the VM's limits and launch file as the launcher writes
them, and a libc
that records what the host and the agent ask of the kernel."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cocoon.runtime.monitor.launch import LaunchSpec, VmLimits

MIB = 1024 * 1024


def limits(**kw: Any) -> VmLimits:
    """Small test limits: 1 vCPU of 4, 256 MiB of 2048, 2 DIMM slots, 2 root ports."""
    base: dict[str, Any] = dict(
        vcpus=1, max_vcpus=4, memory_mib=256, max_memory_mib=2048, memory_slots=2, root_ports=2
    )
    return VmLimits(**(base | kw))


def launch_spec(state_dir: Path, **kw: Any) -> LaunchSpec:
    """A launch file for sandbox "sb1" with small limits (``limits()``); ``kw`` replaces
    fields."""
    base: dict[str, Any] = dict(
        sandbox_id="sb1",
        state_dir=str(state_dir),
        argv=["qemu-system-x86_64"],
        accel="tcg",
        channel="virtio-serial",
        vsock_cid=0,
        shared_fs="virtio-fs",
        virtiofsd="virtiofsd",
        ready_timeout_s=30.0,
        request_timeout_s=10.0,
        shutdown_timeout_s=7.0,
        limits=limits(),
    )
    return LaunchSpec(**(base | kw))


class FakeQemu:
    """Answers the QMP commands hot-plug uses, records them, fails on request."""

    def __init__(self, max_cpus: int = 4, fail: Callable[[str, dict[str, Any]], str] | None = None):
        self.calls: list[tuple[str, dict[str, Any]]] = []
        self.max_cpus = max_cpus
        self.cpus = {0}
        self.devices: set[str] = set()
        self.objects: set[str] = set()
        self.nodes: set[str] = set()
        self.vmem = 0
        self.fail = fail or (lambda c, a: "")
        self.vmem_cap: int | None = None  # the guest gives back no more than this
        self.fds: set[str] = set()  # named fds QEMU holds (getfd)
        self.netdevs: set[str] = set()
        self.passed: list[int] = []
        self.fdsets: dict[int, str] = {}  # fd set id -> what the fd was opened on (add-fd)

    async def pass_fd(self, fd: int, name: str) -> None:
        self.passed.append(fd)
        await self("getfd", {"fdname": name})

    async def add_fd(self, fd: int, opaque: str) -> int:
        os.fstat(fd)  # an open fd, as SCM_RIGHTS needs
        reply = await self("add-fd", {"opaque": opaque})
        return int(reply["fdset-id"])

    async def __call__(self, cmd: str, args: dict[str, Any] | None) -> Any:
        a = args or {}
        self.calls.append((cmd, a))
        err = self.fail(cmd, a)
        if err:
            raise RuntimeError(err)
        if cmd == "query-hotpluggable-cpus":
            return [
                {
                    "props": {"socket-id": s, "core-id": 0, "thread-id": 0, "node-id": 0},
                    "vcpus-count": 1,
                    "type": "max-x86_64-cpu",
                    **({"qom-path": f"/machine/cpu{s}"} if s in self.cpus else {}),
                }
                for s in range(self.max_cpus)
            ]
        if cmd == "device_add":
            if a["id"] in self.devices:
                raise RuntimeError(f"Duplicate device ID '{a['id']}'")
            self.devices.add(a["id"])
            if a["driver"].endswith("-cpu"):
                self.cpus.add(a["socket-id"])
            return {}
        if cmd == "device_del":
            self.devices.discard(a["id"])
            return {}
        if cmd == "object-add":
            self.objects.add(a["id"])
            return {}
        if cmd == "object-del":
            self.objects.discard(a["id"])
            return {}
        if cmd == "add-fd":
            fdset = max(self.fdsets, default=0) + 1
            self.fdsets[fdset] = a["opaque"]
            return {"fdset-id": fdset, "fd": 40 + fdset}
        if cmd == "remove-fd":
            if a["fdset-id"] not in self.fdsets:
                raise RuntimeError(f"File descriptor named '{a['fdset-id']}' not found")
            del self.fdsets[a["fdset-id"]]
            return {}
        if cmd == "blockdev-add":
            filename = a["file"]["filename"]
            if filename.startswith("/dev/fdset/"):
                assert int(filename.rsplit("/", 1)[1]) in self.fdsets, f"{filename} not added"
            self.nodes.add(a["node-name"])
            return {}
        if cmd == "blockdev-del":
            self.nodes.discard(a["node-name"])
            return {}
        if cmd == "qom-set":
            self.vmem = int(a["value"])
            if self.vmem_cap is not None:
                self.vmem = max(self.vmem, self.vmem_cap)
            return {}
        if cmd == "qom-get":
            return self.vmem
        if cmd == "getfd":
            self.fds.add(a["fdname"])
            return {}
        if cmd == "closefd":
            self.fds.discard(a["fdname"])
            return {}
        if cmd == "netdev_add":
            names = a["fds"].split(":") if "fds" in a else [a["fd"]]
            names += a["vhostfds"].split(":") if "vhostfds" in a else []
            names += [a["vhostfd"]] if "vhostfd" in a else []
            assert all(n in self.fds for n in names), f"netdev {a['id']}: fds not passed"
            self.fds -= set(names)  # QEMU takes the named fds
            self.netdevs.add(a["id"])
            return {}
        if cmd == "netdev_del":
            self.netdevs.discard(a["id"])
            return {}
        raise AssertionError(f"unexpected QMP {cmd}")

    def sent(self, cmd: str) -> list[dict[str, Any]]:
        return [a for c, a in self.calls if c == cmd]


class FakeAgent:
    def __init__(self, qemu: FakeQemu) -> None:
        self.qemu = qemu
        self.online = 1
        self.devices_seen: dict[str, str] = {}
        self.missing: set[str] = set()
        self.device_error: Exception | None = None  # what wait_device raises, when set
        self.interfaces: list[tuple[str, str]] = []  # (name, guest PCI address) configured
        self.routes_for: list[list[str]] = []

    async def online_cpus(self, count: int) -> int:
        self.online = min(count, len(self.qemu.cpus))
        return self.online

    async def offline_cpus(self, keep: int) -> int:
        self.online = max(1, keep)
        return self.online

    async def memory_total(self) -> int:
        return 256 * MIB + self.qemu.vmem

    async def wait_device(self, kind: str, address: str, timeout_ms: int) -> str:
        if address in self.missing:
            raise RuntimeError(f"{kind} device {address} did not appear")
        if self.device_error is not None:
            raise self.device_error
        path = "/dev/sda" if kind == "scsi" else f"/sys/bus/pci/devices/{address}/x"
        self.devices_seen[address] = path
        return path

    async def configure_interface(self, ep: Any, pci: str) -> None:
        self.interfaces.append((ep.name, pci))

    async def configure_routes(self, plumbed: list[Any]) -> None:
        self.routes_for.append([p.endpoint.name for p in plumbed])


async def no_event(name: str, match: Callable[[dict[str, Any]], bool], timeout: float) -> Any:
    return {"device": "x"}


@dataclass
class Call:
    name: str
    args: tuple[object, ...]
    thread: str  # the calling thread's name
    thread_id: int
    fd_target: str = ""  # for setns: what the fd pointed at during the call


@dataclass
class FakeLibc:
    """Stands in for cocoon.agent.libc's ``current``: records every call (with its thread),
    fails the ones ``fail`` names with that errno."""

    calls: list[Call] = field(default_factory=list)
    fail: dict[str, int] = field(default_factory=dict)

    def _record(self, name: str, *args: object, fd_target: str = "") -> None:
        t = threading.current_thread()
        self.calls.append(Call(name, args, t.name, t.ident or 0, fd_target))
        if name in self.fail:
            err = self.fail[name]
            raise OSError(err, os.strerror(err), name)

    def setns(self, fd: int, nstype: int) -> None:
        self._record("setns", fd, nstype, fd_target=os.readlink(f"/proc/self/fd/{fd}"))

    def unshare(self, flags: int) -> None:
        self._record("unshare", flags)

    def mount(
        self, source: str | None, target: str, fstype: str | None, flags: int, data: str | None
    ) -> None:
        self._record("mount", source, target, fstype, flags, data)

    def umount2(self, target: str, flags: int) -> None:
        self._record("umount2", target, flags)

    def reboot(self, cmd: int) -> None:
        self._record("reboot", cmd)

    def finit_module(self, fd: int) -> None:
        self._record("finit_module", os.readlink(f"/proc/self/fd/{fd}"))
