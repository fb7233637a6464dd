"""What the guest is: kernel, CPUs, memory, read from /proc and /sys.

Pure readers over a root path so unit tests can point them at a fake tree.

May import: the standard library only.
"""

from __future__ import annotations

import errno
import os
from dataclasses import dataclass
from pathlib import Path


def parse_cpu_list(text: str) -> set[int]:
    """Parses the kernel's CPU list format ("0-3,5,7-8")."""
    cpus: set[int] = set()
    for part in text.strip().split(","):
        if not part:
            continue
        lo, _, hi = part.partition("-")
        cpus.update(range(int(lo), int(hi or lo) + 1))
    return cpus


def parse_meminfo(text: str) -> dict[str, int]:
    """/proc/meminfo as bytes per key."""
    out: dict[str, int] = {}
    for line in text.splitlines():
        key, _, rest = line.partition(":")
        fields = rest.split()
        if not fields:
            continue
        value = int(fields[0])
        out[key.strip()] = value * 1024 if fields[1:] == ["kB"] else value
    return out


WAITING_WRITEBACK = ("Dirty", "Writeback", "WritebackTmp")  # /proc/meminfo's keys


def dirty_bytes(root: Path = Path("/")) -> int:
    """Bytes of file data the guest's page cache holds that are not yet written to their disk
    or through virtio-fs (``WAITING_WRITEBACK``), read once the per-CPU counters are folded
    into the totals (writing vm.stat_refresh: a few pages could hide in them otherwise).
    -1 when that cannot be known. tmpfs pages are never counted: they have nowhere to go."""
    try:
        (root / "proc/sys/vm/stat_refresh").write_text("1")
    except OSError as exc:
        if exc.errno != errno.EINVAL:  # older kernels fold, then say EINVAL for a negative one
            return -1
    try:
        mem = parse_meminfo((root / "proc/meminfo").read_text())
    except (OSError, ValueError):
        return -1
    if not all(k in mem for k in WAITING_WRITEBACK):
        return -1
    return sum(mem[k] for k in WAITING_WRITEBACK)


@dataclass(frozen=True)
class GuestFacts:
    kernel_release: str
    kernel_version: str
    machine: str
    cpus_online: int
    cpus_possible: int
    mem_total: int
    mem_free: int
    mem_available: int
    memory_block_size: int
    uptime: float


def read_facts(root: Path = Path("/")) -> GuestFacts:
    uts = os.uname()
    cpu = root / "sys/devices/system/cpu"
    mem = parse_meminfo((root / "proc/meminfo").read_text())
    block = root / "sys/devices/system/memory/block_size_bytes"
    return GuestFacts(
        kernel_release=uts.release,
        kernel_version=uts.version,
        machine=uts.machine,
        cpus_online=len(parse_cpu_list((cpu / "online").read_text())),
        cpus_possible=len(parse_cpu_list((cpu / "possible").read_text())),
        mem_total=mem.get("MemTotal", 0),
        mem_free=mem.get("MemFree", 0),
        mem_available=mem.get("MemAvailable", 0),
        memory_block_size=int(block.read_text().strip(), 16) if block.exists() else 0,
        uptime=float((root / "proc/uptime").read_text().split()[0]),
    )
