"""Kernel modules the guest loads after the agent serves (``late-modules.list``).

The first stage loads only what the boot needs (the PCI transport, the agent's port, the root
image, the vsock transport); disks, the share, NICs, virtio-mem and the balloon are loaded by
``LateModules`` in a thread of the agent once it answers the host, while the host works on its
side of a start, instead of before the agent starts. Every call that needs one of them (a
container's share, a device wait, memory onlining, a NIC, a storage) first ``wait``s for the
set. A module that fails to load is logged and counted: ``wait`` then raises, naming it.
Once the balloon is in, the command line's free page reporting order is set again
(``reapply_reporting_order``). The loading thread runs at nice ``LOAD_NICE``: on a guest's one
vCPU it otherwise took half the CPU from the host's first calls (the agent's first gRPC call
runs code TCG has not translated yet); nothing else competes with it for long, since nothing a
workload needs is there before it is done.

May import: the standard library, cocoon.agent.libc.
"""

from __future__ import annotations

import errno
import logging
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path

from cocoon.agent import libc

log = logging.getLogger("cocoon.agent.kmod")

LIST = Path("/usr/lib/cocoon/late-modules.list")  # names, in load order (the image's build)
DIR = Path("/usr/lib/cocoon/modules")
LOAD_NICE = 19  # the loading thread's: the agent's calls first


REPORTING_PARAM = "page_reporting.page_reporting_order"
REPORTING_ORDER = Path("/sys/module/page_reporting/parameters/page_reporting_order")
COMPACT = Path("/proc/sys/vm/compact_memory")


def reapply_reporting_order(
    cmdline: Path = Path("/proc/cmdline"),
    param: Path = REPORTING_ORDER,
    compact: Path = COMPACT,
) -> int | None:
    """The kernel command line's ``page_reporting.page_reporting_order=N`` (the last one), set
    again once the balloon driver has registered: Linux 6.1's registration overwrites it with
    the pageblock order (2 MiB blocks), and free page reporting then also waits until the zone
    has 64 MiB free above its low watermark, so a guest gives back little of what its boot
    touched. Then memory is compacted, which frees blocks and so starts a reporting pass.
    Returns the order set, or None (not asked for, no balloon, or the kernel refused)."""
    try:
        words = cmdline.read_text().split()
    except OSError:
        return None
    asked = [w.partition("=")[2] for w in words if w.startswith(REPORTING_PARAM + "=")]
    if not asked or not asked[-1].isdigit() or not param.exists():
        return None
    try:
        if param.read_text().strip() != asked[-1]:
            param.write_text(asked[-1])
            compact.write_text("1")
    except OSError as exc:
        log.warning("free page reporting order %s: %s", asked[-1], exc)
        return None
    return int(asked[-1])


class LateModules:
    def __init__(
        self,
        listing: Path = LIST,
        directory: Path = DIR,
        after: Callable[[], object] = reapply_reporting_order,
    ) -> None:
        """``after`` runs once the modules are in, before the calls waiting for them go on."""
        self._listing, self._dir, self._after = listing, directory, after
        self._done = threading.Event()
        self.failed: list[str] = []
        self.seconds = 0.0

    def start(self) -> None:
        threading.Thread(target=self._load_all, name="late-modules", daemon=True).start()

    def _load_all(self) -> None:
        t = time.monotonic()
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), LOAD_NICE)  # this thread's
        try:
            names = self._listing.read_text().split() if self._listing.exists() else []
            for name in names:
                try:
                    fd = os.open(self._dir / name, os.O_RDONLY | os.O_CLOEXEC)
                    try:
                        libc.finit_module(fd)
                    finally:
                        os.close(fd)
                except OSError as exc:
                    if exc.errno != errno.EEXIST:  # built in, or loaded already
                        log.error("module %s: %s", name, exc)
                        self.failed.append(name)
            self.seconds = time.monotonic() - t
            log.info("%d late modules loaded in %.2fs", len(names), self.seconds)
            self._after()
        finally:
            self._done.set()

    def wait(self, timeout: float = 60.0) -> None:
        """Returns once every late module is in (OSError if one is not, or on timeout)."""
        if not self._done.wait(timeout):
            raise OSError(errno.ETIMEDOUT, f"kernel modules still loading after {timeout:g}s")
        if self.failed:
            raise OSError(errno.ENOENT, f"kernel modules failed to load: {', '.join(self.failed)}")
