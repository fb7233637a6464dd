"""Live processes on the host, for leak checks (cocoon.testing.leaks, which the pytest plugin
shares), and the cgroup a process is in."""

from __future__ import annotations

from pathlib import Path

from cocoon.testing.leaks import live_processes, mounts_under, sandbox_cgroups

__all__ = ["cgroup_of", "live_processes", "mounts_under", "sandbox_cgroups"]


def cgroup_of(pid: int) -> dict[str, str]:
    """``/proc/<pid>/cgroup`` as {controllers: path} ("" is the v2 hierarchy)."""
    out: dict[str, str] = {}
    for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines():
        _, ctrls, path = line.split(":", 2)
        out[ctrls] = path
    return out
