"""A monitor's memory offered to KSM (``[runtime] mergeable_monitors``).

Monitors forked from one fork server run the same code to the same point, so most of the pages
each one has copied from the server hold the same bytes in every monitor (reference counts
raised and lowered again, code objects quickened alike: docs/performance.md). Kernel samepage
merging folds identical pages into one, but only in memory a process marked mergeable. This
marks the monitor's private anonymous mappings with ``madvise(MADV_MERGEABLE)``: in a forked
monitor those are the ones it inherited, where the copies are. It does not use
``prctl(PR_SET_MEMORY_MERGE)`` (Linux 6.4), which would cover later mappings too: that
setting is inherited by children and kept across ``execve``, so it would offer QEMU's and
virtiofsd's memory as well, and QEMU's holds guest-derived data (TCG's translations of guest
code): merging that across VMs is the cross-VM timing side channel that Kata leaves KSM off
for. Nothing merges unless the host runs KSM (``/sys/kernel/mm/ksm/run``), the operator's
choice; the guests' RAM is a shared memfd, which KSM never scans (docs/security.md).

May import: the standard library only.
"""

from __future__ import annotations

import ctypes
from pathlib import Path

MADV_MERGEABLE = 12


def mergeable() -> int:
    """Marks this process's private anonymous mappings mergeable; how many took the mark.
    Later mappings are not marked, nor is anything of a process this one execs."""
    lib = ctypes.CDLL(None, use_errno=True)
    lib.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    marked = 0
    for line in Path("/proc/self/maps").read_text().splitlines():
        parts = line.split()
        perms, name = parts[1], parts[5] if len(parts) > 5 else ""
        if not perms.startswith("rw") or perms[3] != "p" or name not in ("", "[heap]"):
            continue
        lo, hi = (int(x, 16) for x in parts[0].split("-"))
        marked += lib.madvise(lo, hi - lo, MADV_MERGEABLE) == 0
    return marked
