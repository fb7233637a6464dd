"""File descriptors of long-lived processes (monitor, shim): close what callers leak in, and
the one-line report a started process writes on its ready pipe.

Callers leak their sockets into the runtime (containerd's create has a socket on fd 3); a
process that outlives the call must not hold them, or the caller's peers never see EOF.

May import: the standard library only. The shim imports it: nothing here may import more
than ``os`` and ``stat`` at module level (``json`` only in ``report``, which the shim never
calls).
"""

from __future__ import annotations

import os
import stat

DEV_NULL = os.makedev(1, 3)


def close_inherited(keep: set[int]) -> None:
    """Closes every fd above 2 except those in ``keep``."""
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        if fd > 2 and fd not in keep:
            try:
                os.close(fd)
            except OSError:
                pass


def is_dev_null(fd: int) -> bool:
    """Whether ``fd`` is /dev/null (a caller's stdin for a process that has none: containerd's
    and conmon's)."""
    try:
        st = os.fstat(fd)
    except OSError:
        return False
    return stat.S_ISCHR(st.st_mode) and st.st_rdev == DEV_NULL


def report(fd: int, payload: dict[str, object]) -> None:
    """One JSON line written to ``fd`` (a ready pipe), which is then closed; a reader gone
    already is no error."""
    import json

    try:
        os.write(fd, (json.dumps(payload) + "\n").encode())
        os.close(fd)
    except OSError:
        pass
