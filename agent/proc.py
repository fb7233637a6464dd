"""Spawning and reaping processes in the guest, where the agent is PID 1.

PID 1 reaps every child (orphans are re-parented to it, container init processes among them),
so nothing may use ``Popen.wait``: a status taken by the reaper would be lost. Every spawn goes
through ``spawn`` (posix_spawn with an empty signal mask: the agent blocks the signals it
takes with sigwait, and children must not inherit that mask) and every wait through
``Reaper.wait``.

May import: the standard library only.
"""

from __future__ import annotations

import os
import select
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

MAX_UNCLAIMED = 10000


class Reaper:
    """Reaps every child; a waiter picks up the status of its pid (before or after the exit),
    or a watcher is called with it (``watch``: no thread waits for a long-lived process)."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._statuses: dict[int, int] = {}
        self._watchers: dict[int, Callable[[int], None]] = {}

    def reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            with self._cond:
                watcher = self._watchers.pop(pid, None)
                if watcher is None:
                    if len(self._statuses) >= MAX_UNCLAIMED:
                        self._statuses.pop(next(iter(self._statuses)))
                    self._statuses[pid] = status
                    self._cond.notify_all()
            if watcher is not None:
                watcher(status)

    def watch(self, pid: int, watcher: Callable[[int], None]) -> None:
        """``watcher(status)`` once ``pid`` is reaped, in the reaping thread; at once, in this
        one, if it was reaped already. It must not block: the reaping waits for it."""
        with self._cond:
            status = self._statuses.pop(pid, None)
            if status is None:
                self._watchers[pid] = watcher
                return
        watcher(status)

    def wait(self, pid: int, timeout: float | None = None) -> int | None:
        """The raw wait status of ``pid``, or None on timeout."""
        with self._cond:
            self._cond.wait_for(lambda: pid in self._statuses, timeout)
            return self._statuses.pop(pid, None)


def exit_code(status: int) -> int:
    """Shell convention: the exit status, or 128 + signal number."""
    if os.WIFSIGNALED(status):
        return 128 + os.WTERMSIG(status)
    return os.WEXITSTATUS(status)


def spawn(
    argv: Sequence[str],
    stdin: int | None = None,
    stdout: int | None = None,
    stderr: int | None = None,
    env: Mapping[str, str] | None = None,
) -> int:
    """Starts argv with the given fds as 0/1/2 (None: /dev/null) and a clean signal mask."""
    devnull = os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)
    try:
        actions = [
            (os.POSIX_SPAWN_DUP2, fd if fd is not None else devnull, target)
            for target, fd in ((0, stdin), (1, stdout), (2, stderr))
        ]
        return os.posix_spawn(
            argv[0],
            list(argv),
            dict(env if env is not None else os.environ),
            file_actions=actions,
            setsigmask=(),
            setsigdef=(),
        )
    finally:
        os.close(devnull)


@dataclass(frozen=True)
class Result:
    status: int
    stdout: bytes
    stderr: bytes

    @property
    def ok(self) -> bool:
        return os.WIFEXITED(self.status) and os.WEXITSTATUS(self.status) == 0


def run(reaper: Reaper, argv: Sequence[str], timeout: float = 60.0, stdin: bytes = b"") -> Result:
    """Runs argv to completion, capturing its output (through the reaper, not waitpid)."""
    in_r, in_w = os.pipe()
    out_r, out_w = os.pipe()
    err_r, err_w = os.pipe()
    try:
        pid = spawn(argv, in_r, out_w, err_w)
    finally:
        for fd in (in_r, out_w, err_w):
            os.close(fd)
    if stdin:
        os.write(in_w, stdin)
    os.close(in_w)
    out, err = _drain(out_r, err_r, time.monotonic() + timeout)
    status = reaper.wait(pid, max(0.0, timeout))
    if status is None:
        os.kill(pid, 9)
        status = reaper.wait(pid, 10) or 9
        err += f"\n(timed out after {timeout:g}s)".encode()
    return Result(status, out, err)


def _drain(out_r: int, err_r: int, deadline: float) -> tuple[bytes, bytes]:
    bufs = {out_r: bytearray(), err_r: bytearray()}
    open_fds = set(bufs)
    while open_fds and time.monotonic() < deadline:
        ready, _, _ = select.select(list(open_fds), [], [], max(0.0, deadline - time.monotonic()))
        for fd in ready:
            data = os.read(fd, 65536)
            if data:
                bufs[fd] += data
            else:
                open_fds.discard(fd)
    for fd in bufs:
        os.close(fd)
    return bytes(bufs[out_r]), bytes(bufs[err_r])
