"""What a sandbox can leave on the host, found from outside: live processes by command line,
mounts under a directory, host cgroups made for sandboxes. The pytest plugin's teardown and
cocoon's own integration tests check these after every container.

May import: the standard library.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path

SANDBOX_CGROUP_PREFIX = "cocoon-sandbox-"  # monitor.hostcgroup's name for a sandbox's cgroup


def live_processes() -> Iterator[tuple[int, str]]:
    """(pid, command line) of every process that is not a zombie, this process excepted."""
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


def processes_mentioning(*needles: str) -> list[str]:
    """ "pid: command line" of each live process whose command line holds every needle."""
    return [
        f"{pid}: {cmd[:200]}" for pid, cmd in live_processes() if all(n in cmd for n in needles)
    ]


def processes_left(*needles: str, grace: float = 15.0) -> list[str]:
    """The processes mentioning every needle that are still there after ``grace`` seconds
    (a VM's QEMU and virtiofsd go a moment after the delete that stopped them)."""
    deadline = time.monotonic() + grace
    while (left := processes_mentioning(*needles)) and time.monotonic() < deadline:
        time.sleep(0.1)
    return left


def mounts_under(d: Path) -> list[str]:
    """Mount points at or below ``d``."""
    prefix = str(d.resolve())
    with open("/proc/self/mountinfo") as f:
        mps = [line.split()[4] for line in f]
    return [m for m in mps if m == prefix or m.startswith(prefix + "/")]


def sandbox_cgroups(prefix: str = SANDBOX_CGROUP_PREFIX, exact: str = "") -> list[str]:
    """Every host cgroup made for a sandbox (monitor.hostcgroup) that is left empty, in any
    hierarchy (only the one named ``exact`` when given): none may outlive its sandbox. One
    that holds processes belongs to a sandbox that still runs (a leaked process is the process
    checks' to find), maybe another test run's."""
    found: list[str] = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        post = line.partition(" - ")[2].split()
        if post and post[0] in ("cgroup", "cgroup2"):
            for d, subdirs, _ in os.walk(line.split()[4]):
                found += [
                    os.path.join(d, s)
                    for s in subdirs
                    if (s == exact if exact else s.startswith(prefix))
                    and not _procs(os.path.join(d, s))
                ]
    return found


def _procs(cgroup: str) -> str:
    try:
        return Path(cgroup, "cgroup.procs").read_text().strip()
    except OSError:
        return ""
