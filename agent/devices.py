"""Hot-plugged resources in the guest: onlining vCPUs and memory, finding new devices.

CPUs hot-added by the host arrive offline: ``online_cpus`` writes 1 to each new
``/sys/devices/system/cpu/cpuN/online`` until the wanted number is online (waiting for the
kernel to create the directory first); ``offline_cpus`` takes the highest ones offline.
Memory is onlined movable by the kernel (``memhp_default_state=online_movable``); blocks left
offline are onlined movable here, so they can be unplugged again.

``wait_device`` finds a disk by SCSI address (channel:target:lun on the virtio-scsi host), a PCI
device behind a root port, or a virtio-fs device there once its driver is bound, waiting for the
kernel's uevent with pyudev when it is not there yet (no udevd runs in the guest: the netlink
source is the kernel's own).

Paths are relative to a root so unit tests can use a fake sysfs.

May import: the standard library, pyudev (imported lazily: only device waits need it),
cocoon.agent.{errors, guest}.
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from cocoon.agent.errors import DeviceError
from cocoon.agent.guest import parse_cpu_list

log = logging.getLogger("cocoon.agent.devices")


class Devices:
    def __init__(self, root: Path = Path("/")) -> None:
        self.root = root
        self.cpu_dir = root / "sys/devices/system/cpu"
        self.mem_dir = root / "sys/devices/system/memory"

    # ------------------------------------------------------------------ CPUs
    def online_set(self) -> set[int]:
        return parse_cpu_list((self.cpu_dir / "online").read_text())

    def online_cpus(self, want: int, timeout: float = 10.0) -> int:
        """Onlines present CPUs until ``want`` are online (0: all present); returns the count."""
        end = time.monotonic() + timeout
        while True:
            present = parse_cpu_list((self.cpu_dir / "present").read_text())
            online = self.online_set()
            goal = want or len(present)
            if len(online) >= goal:
                return len(online)
            for n in sorted(present - online):
                if len(online) >= goal:
                    break
                ctl = self.cpu_dir / f"cpu{n}" / "online"
                try:
                    ctl.write_text("1")
                    online.add(n)
                except OSError as exc:
                    log.debug("cpu%d not onlined yet: %s", n, exc)
            if len(self.online_set()) >= goal or time.monotonic() > end:
                return len(self.online_set())
            time.sleep(0.02)

    def offline_cpus(self, keep: int) -> int:
        """Takes the highest CPUs offline until ``keep`` remain online (cpu0 stays)."""
        keep = max(keep, 1)
        for n in sorted(self.online_set(), reverse=True):
            if len(self.online_set()) <= keep or n == 0:
                break
            ctl = self.cpu_dir / f"cpu{n}" / "online"
            try:
                ctl.write_text("0")
            except OSError as exc:
                raise DeviceError(f"cannot take cpu{n} offline: {exc.strerror}") from exc
        return len(self.online_set())

    # ------------------------------------------------------------------ memory
    def online_memory(self) -> int:
        """Onlines (movable) every offline memory block; returns how many it onlined."""
        count = 0
        if not self.mem_dir.is_dir():
            return 0
        for block in sorted(self.mem_dir.glob("memory[0-9]*")):
            state = block / "state"
            with contextlib.suppress(OSError):
                if state.read_text().strip() == "offline":
                    state.write_text("online_movable")
                    count += 1
        return count

    # ------------------------------------------------------------------ devices
    def find_scsi(self, address: str) -> str | None:
        """/dev/sdX of the disk at ``channel:target:lun`` on any SCSI host, if present."""
        devs = self.root / "sys/bus/scsi/devices"
        if not devs.is_dir():
            return None
        for d in devs.iterdir():
            parts = d.name.split(":")
            if len(parts) == 4 and ":".join(parts[1:]) == address:
                blocks = list((d / "block").glob("*")) if (d / "block").is_dir() else []
                if blocks:
                    return f"/dev/{blocks[0].name}"
        return None

    def find_pci(self, port_address: str) -> str | None:
        """The sysfs path of the device behind the root port at ``port_address``."""
        port = self.root / "sys/bus/pci/devices" / port_address
        if not port.exists():
            return None
        for child in sorted(port.resolve().iterdir()):
            if child.name.count(":") == 2 and child.name.endswith(".0") and child.is_dir():
                return str(Path("/sys/bus/pci/devices") / child.name)
        return None

    def find_virtiofs(self, port_address: str) -> str | None:
        """The device behind the root port at ``port_address`` once the virtiofs driver is
        bound to it (its tag can be mounted from then on), as ``find_pci`` names it."""
        found = self.find_pci(port_address)
        if found is None:
            return None
        dev = self.root / found.lstrip("/")
        for child in dev.glob("virtio*"):
            with contextlib.suppress(OSError):
                if (child / "driver").resolve().name == "virtiofs":
                    return found
        return None

    def wait_device(self, kind: str, address: str, timeout: float) -> str:
        finders: dict[str, Callable[[str], str | None]] = {
            "scsi": self.find_scsi,
            "pci": self.find_pci,
            "virtiofs": self.find_virtiofs,
        }
        find = finders.get(kind)
        if find is None:
            raise DeviceError(f"unknown device kind {kind!r} (scsi, pci, virtiofs)")
        found = find(address)
        if found:
            return found
        end = time.monotonic() + timeout
        with _uevents() as fileno:
            while True:
                found = find(address)
                if found:
                    if kind == "scsi":
                        _wait_node(found, end)
                    return found
                left = end - time.monotonic()
                if left <= 0:
                    raise DeviceError(f"{kind} device {address} did not appear in {timeout:g}s")
                if fileno is not None:
                    r, _, _ = select.select([fileno], [], [], min(left, 0.5))
                    if r:
                        _drain(fileno)
                else:
                    time.sleep(min(left, 0.02))


@contextlib.contextmanager
def _uevents() -> Iterator[int | None]:
    """A kernel-uevent netlink socket through pyudev (None where pyudev is missing)."""
    try:
        import pyudev

        context = pyudev.Context()
        monitor = pyudev.Monitor.from_netlink(context, source="kernel")
        monitor.start()
    except (ImportError, OSError) as exc:
        log.debug("no uevent monitor (%s): polling", exc)
        yield None
        return
    try:
        yield monitor.fileno()
    finally:
        del monitor  # closes the netlink socket


def _drain(fileno: int) -> None:
    with contextlib.suppress(OSError):
        while select.select([fileno], [], [], 0)[0]:
            os.read(fileno, 65536)


def _wait_node(dev: str, end: float) -> None:
    """devtmpfs creates the node right after the uevent; wait the moment it may take."""
    while not os.path.exists(dev) and time.monotonic() < end:
        time.sleep(0.01)
