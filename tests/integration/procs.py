"""Live processes on the host, for leak checks: (pid, command line) of every process that is
not a zombie, the test process itself excepted; and the host cgroups made for sandboxes."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path


def live_processes() -> Iterator[tuple[int, str]]:
    for pid in os.listdir("/proc"):
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state not in ("Z", "X"):
            yield int(pid), cmd


def sandbox_cgroups(prefix: str = "cocoon-sandbox-") -> list[str]:
    """Every host cgroup made for a sandbox (monitor.hostcgroup) that is left empty, in any
    hierarchy: none may outlive its sandbox. One that holds processes belongs to a sandbox that
    still runs (a leaked process is the process checks' to find), maybe another test run's."""
    found: list[str] = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        post = line.partition(" - ")[2].split()
        if post and post[0] in ("cgroup", "cgroup2"):
            for d, subdirs, _ in os.walk(line.split()[4]):
                found += [
                    os.path.join(d, s)
                    for s in subdirs
                    if s.startswith(prefix) and not _procs(os.path.join(d, s))
                ]
    return found


def _procs(cgroup: str) -> str:
    try:
        return Path(cgroup, "cgroup.procs").read_text().strip()
    except OSError:
        return ""


def cgroup_of(pid: int) -> dict[str, str]:
    """``/proc/<pid>/cgroup`` as {controllers: path} ("" is the v2 hierarchy)."""
    out: dict[str, str] = {}
    for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines():
        _, ctrls, path = line.split(":", 2)
        out[ctrls] = path
    return out
