"""The cgroup a process is in (live processes, mounts and sandbox cgroups, for leak checks,
are cocoon.testing.leaks, which the pytest plugin shares)."""

from __future__ import annotations

from pathlib import Path


def cgroup_of(pid: int) -> dict[str, str]:
    """``/proc/<pid>/cgroup`` as {controllers: path} ("" is the v2 hierarchy)."""
    out: dict[str, str] = {}
    for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines():
        _, ctrls, path = line.split(":", 2)
        out[ctrls] = path
    return out
