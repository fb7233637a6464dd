"""A process's parent and the cgroup it is in (live processes, mounts and sandbox cgroups,
for leak checks, are cocoon.testing.leaks, which the pytest plugin shares)."""

from __future__ import annotations

from pathlib import Path


def parent_of(pid: int) -> int:
    """``pid``'s parent, from /proc/<pid>/stat."""
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])


def cgroup_of(pid: int) -> dict[str, str]:
    """``/proc/<pid>/cgroup`` as {controllers: path} ("" is the v2 hierarchy)."""
    out: dict[str, str] = {}
    for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines():
        _, ctrls, path = line.split(":", 2)
        out[ctrls] = path
    return out
