"""Fault points: where a test can SIGKILL one of a sandbox's processes (or the CLI itself)
between two steps of a verb, to check that every crash leaves a truthful state and nothing
that ``delete --force`` cannot remove.

``COCOON_FAULT=<point>:<victim>`` in the CLI's environment arms one point; unset (always, in
use) ``point()`` is one dictionary lookup. Points: ``create:booted`` (the VM is up, nothing
of the container in it yet), ``create:in-guest`` (crun created it, no shim yet),
``create:shim`` (the shim runs, the state is not saved yet), ``start:before`` (before crun
start), ``exec:started`` (the exec's process and shim run), ``update:resized`` (the VM grew,
crun update not yet run), ``delete:killed`` (the workload killed, the container not yet
removed). With a pool (``POOL_POINTS``): ``create:claiming`` (a pooled VM taken and linked
to the sandbox's name, its monitor not yet asked to claim it). Victims: ``cli``, ``monitor``,
``qemu``, ``virtiofsd``, ``shim``.

May import: the standard library, cocoon.runtime.monitor.launch.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from pathlib import Path

from cocoon.runtime.monitor import launch as L

ENV = "COCOON_FAULT"
POINTS = (
    "create:booted",
    "create:in-guest",
    "create:shim",
    "start:before",
    "exec:started",
    "update:resized",
    "delete:killed",
)
POOL_POINTS = ("create:claiming",)  # reached only when a create takes a VM from the pool
VICTIMS = ("cli", "monitor", "qemu", "virtiofsd", "shim")


def point(name: str, sandbox_dir: Path | None = None, shim_pid: int = 0) -> None:
    armed = os.environ.get(ENV)
    if not armed or armed.rpartition(":")[0] != name:
        return
    victim = armed.rpartition(":")[2]
    if victim == "cli":
        os.kill(os.getpid(), signal.SIGKILL)
    pids = victims(victim, sandbox_dir, shim_pid)
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 5
    while any(_alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.01)


def victims(victim: str, d: Path | None, shim_pid: int) -> list[int]:
    if victim == "shim":
        return [shim_pid] if shim_pid else []
    if d is None:
        return []
    if victim in ("monitor", "qemu"):
        with contextlib.suppress(OSError, ValueError):
            return [int((d / (L.MONITOR_PID if victim == "monitor" else L.QEMU_PID)).read_text())]
        return []
    if victim == "virtiofsd":
        found = []
        for p in os.listdir("/proc"):
            if p.isdigit():
                with contextlib.suppress(OSError):
                    argv = Path(f"/proc/{p}/cmdline").read_bytes().split(b"\0")
                    if argv[0].endswith(b"virtiofsd") and str(d).encode() in b" ".join(argv):
                        found.append(int(p))
        return found
    raise ValueError(f"{ENV}: unknown victim {victim!r} (know {', '.join(VICTIMS)})")


def _alive(pid: int) -> bool:
    try:
        st = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return st not in ("Z", "X")
