"""Which process a pid names, across exits and pid reuse: alive (a zombie is not), when it
started (what names one process across pid reuse, as runc records it), and waiting for it to
be gone. Shared by the CLI's side (container state, the launcher) and the monitor (whose QEMU
uid markers record their holder the same way), which is why it is a leaf of its own.

May import: the standard library only.
"""

from __future__ import annotations

import os
import select
import time
from pathlib import Path


def start_time(pid: int) -> int:
    """When ``pid`` started, in clock ticks since boot (0 if it does not exist): with the pid,
    what names one process across pid reuse, as runc records it."""
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19])
    except (OSError, ValueError, IndexError):
        return 0


def pid_alive(pid: int) -> bool:
    """True if pid exists and is not a zombie."""
    if pid <= 0:
        return False
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")


def wait_gone(pid: int, timeout: float, interval: float = 0.05) -> bool:
    """Waits until ``pid`` is gone (or a zombie); False if it still lives after ``timeout``.
    Woken by the exit itself (a pidfd, Linux 5.3+); polled every ``interval`` where there is
    no pidfd to have."""
    if not pid_alive(pid):
        return True
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return True
    except (OSError, AttributeError):  # an older kernel or Python: poll
        return _poll_gone(pid, timeout, interval)
    try:
        p = select.poll()
        p.register(fd, select.POLLIN)
        end = time.monotonic() + timeout
        while True:  # readable once the process has exited
            left = end - time.monotonic()
            if p.poll(max(0, int(left * 1000)) + 1) or not pid_alive(pid):
                return True
            if left <= 0:
                return False
    finally:
        os.close(fd)


def _poll_gone(pid: int, timeout: float, interval: float) -> bool:
    end = time.monotonic() + timeout
    while pid_alive(pid):
        if time.monotonic() > end:
            return False
        time.sleep(interval)
    return True
