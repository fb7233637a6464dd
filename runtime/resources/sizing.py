"""How big a sandbox must be for its container's resources, as Kata sizes its VMs.

vCPUs: the CPU quota over its period, rounded up (``quota 150000 / period 100000`` is 2),
else the number of CPUs in the cpuset, else the configured default; never fewer than the
default the VM boots with. Memory: the container's memory limit plus the configured base
(the guest kernel, agent and page cache need room of their own); no limit means the base.
Bad values (negative, zero periods, unparsable cpusets, sizes no VM holds) are errors here,
before anything is hot-plugged.

May import: the standard library, cocoon.runtime.{config, errors}.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from cocoon.runtime.config import Config
from cocoon.runtime.errors import SizingError

MIB = 1024 * 1024
MAX_BYTES = 1 << 50  # 1 PiB: anything above is a typo, not a limit


@dataclass(frozen=True)
class Size:
    vcpus: int
    memory_mib: int


def _int(res: dict[str, Any], key: str, where: str) -> int | None:
    v = res.get(key)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int):
        raise SizingError(f"{where}.{key} must be an integer, got {v!r}")
    return v


def cpuset_count(text: str) -> int:
    cpus: set[int] = set()
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        lo, sep, hi = part.partition("-")
        if not lo.isdigit() or (sep and not hi.isdigit()):
            raise SizingError(f"cpu.cpus {text!r} is not a CPU list (e.g. 0-1,3)")
        first, last = int(lo), int(hi) if sep else int(lo)
        if last < first or last > 4095:
            raise SizingError(f"cpu.cpus {text!r} is not a CPU list (e.g. 0-1,3)")
        cpus.update(range(first, last + 1))
    return len(cpus)


def vcpus_for(cpu: dict[str, Any]) -> int | None:
    """vCPUs the CPU resources ask for, or None when they ask for none in particular."""
    quota = _int(cpu, "quota", "cpu")
    period = _int(cpu, "period", "cpu")
    if quota is not None and quota > 0:
        if period is not None and period <= 0:
            raise SizingError(f"cpu.period must be positive with a quota, got {period}")
        return math.ceil(quota / (period or 100000))
    if quota is not None and quota not in (0, -1):
        raise SizingError(f"cpu.quota must be positive or -1 (no limit), got {quota}")
    cpus = cpu.get("cpus")
    if cpus:
        if not isinstance(cpus, str):
            raise SizingError(f"cpu.cpus must be a string, got {cpus!r}")
        return cpuset_count(cpus)
    return None


def memory_limit(mem: dict[str, Any]) -> int | None:
    limit = _int(mem, "limit", "memory")
    if limit is None or limit == -1 or limit == 0:
        return None
    if limit < 0:
        raise SizingError(f"memory.limit must be positive or -1 (no limit), got {limit}")
    if limit > MAX_BYTES:
        raise SizingError(f"memory.limit {limit} is absurd (over 1 PiB)")
    return limit


def boot_size(cfg: Config) -> Size:
    """The size every sandbox boots with."""
    return Size(cfg.hypervisor.default_vcpus, cfg.hypervisor.default_memory_mib)


def asked(resources: dict[str, Any] | None) -> Size:
    """What the resources ask for in particular: vCPUs (0: none) and MiB of memory limit."""
    res = resources or {}
    if not isinstance(res, dict):
        raise SizingError("linux.resources must be an object")
    cpu = res.get("cpu") or {}
    mem = res.get("memory") or {}
    if not isinstance(cpu, dict) or not isinstance(mem, dict):
        raise SizingError("linux.resources.cpu and .memory must be objects")
    limit = memory_limit(mem)
    return Size(vcpus_for(cpu) or 0, math.ceil(limit / MIB) if limit else 0)


def size_for(cfg: Config, resources: dict[str, Any] | None) -> Size:
    """The VM of one container: the boot size, grown to its CPUs, plus its memory limit."""
    return pod_size(cfg, [resources])


def pod_size(cfg: Config, every: list[dict[str, Any] | None]) -> Size:
    """The VM of a pod, as Kata sizes it: the boot vCPUs grown to the sum of its containers'
    CPUs, and the base memory plus the sum of their memory limits."""
    h = cfg.hypervisor
    sizes = [asked(res) for res in every]
    return Size(
        max(sum(s.vcpus for s in sizes), h.default_vcpus),
        h.default_memory_mib + sum(s.memory_mib for s in sizes),
    )


def clamp(cfg: Config, size: Size, host_cpus: int, host_memory_mib: int) -> tuple[Size, str]:
    """``size`` within what the VM can ever hold, and a warning when it was not (a pod's
    limits above the host's are accepted, as runc and Kubernetes accept them)."""
    max_vcpus, max_memory = cfg.hypervisor.ceilings(host_cpus, host_memory_mib)
    out = Size(min(size.vcpus, max_vcpus), min(size.memory_mib, max_memory))
    if out == size:
        return out, ""
    return out, (
        f"the pod asks for {size.vcpus} CPUs and {size.memory_mib} MiB; its VM holds at most "
        f"{max_vcpus} and {max_memory} MiB: sized to {out.vcpus} CPUs and {out.memory_mib} MiB"
    )


def check_fits(cfg: Config, size: Size, host_cpus: int, host_memory_mib: int) -> None:
    """Refuses, before a VM is booted, a size that the VM could never reach."""
    h = cfg.hypervisor
    max_vcpus, max_memory = h.ceilings(host_cpus, host_memory_mib)
    if size.vcpus > max_vcpus:
        raise SizingError(
            f"the container asks for {size.vcpus} CPUs, a sandbox holds at most {max_vcpus} "
            "(hypervisor.default_maxvcpus)"
        )
    if size.memory_mib > max_memory:
        raise SizingError(
            f"the container needs {size.memory_mib} MiB (its memory limit plus the "
            f"{h.default_memory_mib} MiB base), a sandbox holds at most {max_memory} MiB "
            "(hypervisor.max_memory_mib)"
        )


def merge(base: dict[str, Any] | None, update: dict[str, Any]) -> dict[str, Any]:
    """The resources after ``update`` (runc update semantics: given keys replace, per table)."""
    out: dict[str, Any] = {
        k: (dict(v) if isinstance(v, dict) else v) for k, v in (base or {}).items()
    }
    for k, v in update.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = {**out[k], **v}
        else:
            out[k] = v
    return out
