"""Helpers of the tests of raw stdio streams (test_forwarding over the mux, test_vsock_raw over
vsock's stand-in): a process's pipes as the agent's stream source sees them, and waiting."""

from __future__ import annotations

import contextlib
import os
import threading
import time
import tty
from collections.abc import Callable

Key = tuple[str, str, str]  # (container id, exec id, stream), as the stream source is asked


def wait_for(cond: Callable[[], bool], timeout: float, what: str) -> None:
    end = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > end:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.01)


def pipe_writer(fds: dict[Key, int], key: Key, data: bytes) -> threading.Thread:
    """A process writing ``data`` to the pipe whose read end is the stream's (``fds[key]``);
    it stops at EPIPE, as a workload would see it."""
    r, w = os.pipe()
    fds[key] = r

    def write() -> None:
        with os.fdopen(w, "wb") as f, contextlib.suppress(BrokenPipeError):
            f.write(data)

    t = threading.Thread(target=write, daemon=True)
    t.start()
    return t


def pipe_reader(fds: dict[Key, int], key: Key) -> tuple[int, bytearray, threading.Event]:
    """A pipe whose write end is the process's stdin (``fds[key]``); its bytes gathered once
    ``go`` is set."""
    r, w = os.pipe()
    fds[key] = w
    got, go = bytearray(), threading.Event()

    def read() -> None:
        go.wait(30)
        with os.fdopen(r, "rb") as f:
            while chunk := f.read1(65536):
                got.extend(chunk)

    threading.Thread(target=read, daemon=True).start()
    return w, got, go


def pty_writer(fds: dict[Key, int], key: Key, data: bytes) -> tuple[int, threading.Thread]:
    """A process writing ``data`` to a terminal whose master is the stream's (``fds[key]``,
    returned too), raw (no newline translation); it closes its side half a second after, so
    that the master is drained before it reads EIO."""
    master, slave = os.openpty()
    tty.setraw(slave)
    fds[key] = master

    def write() -> None:
        with os.fdopen(slave, "wb") as f:
            f.write(data)
            f.flush()
            time.sleep(0.5)

    t = threading.Thread(target=write, daemon=True)
    t.start()
    return master, t
