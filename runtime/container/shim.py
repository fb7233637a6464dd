"""The host side of a container's shim: spawning it, waiting for it, recognising it.

A shim is one host process per container process (``cocoon.shim.main``); its pid stands for
the workload. ``spawn`` starts one as our child (so it stays in the caller's process tree,
which containerd-shim and conmon reap as subreapers) and waits for its ready line. A
foreground exec's shim is forked rather than started (``fork=True``): this process waits for
it anyway, so it shares our pages while it runs and skips a second interpreter's start (~45
ms); a shim that outlives us is always a fresh interpreter, which holds none of the CLI's
memory;
``wait_forwarding`` waits for a foreground one, passing on the signals we get (as runc run
and exec do); ``write_pid_file`` writes its pid where the caller asked, atomically and last.

May import: the standard library, cocoon.runtime.errors, cocoon.shim.main (in a forked shim).
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cocoon.runtime.errors import LifecycleError

# What a foreground run or exec passes on to its shim.
FORWARDED = (
    signal.SIGINT,
    signal.SIGTERM,
    signal.SIGHUP,
    signal.SIGQUIT,
    signal.SIGUSR1,
    signal.SIGUSR2,
    signal.SIGWINCH,
)


SHIM_NAMESPACES = ("ipc", "uts", "cgroup")  # what a running shim can join or unshare
SHIM_MODULE = "cocoon.shim.main"
FORKED_COMM = "cocoon-shim"  # a forked shim's name (/proc/PID/comm): its cmdline is ours
# How a shim's interpreter starts (``command``): isolated from the caller's PYTHON* variables
# (-I), without ``site`` (-S: the venv's .pth files, setuptools' distutils hook) and without
# ``runpy`` (-c, not -m: runpy imports importlib.util, contextlib, collections and functools),
# ~0.7 MiB less private memory in every shim (docs/performance.md). The package root this
# CLI runs from comes first among its arguments, so the shim runs the same tree.
SHIM_BOOT = f"import sys; sys.path.insert(0, sys.argv.pop(1)); from {SHIM_MODULE} import run; run()"
PACKAGE_ROOT = str(Path(__file__).absolute().parents[3])  # as imported (.pkg/...), unresolved


class Forked:
    """A shim forked from this process, waited for like a ``Popen``."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.returncode: int | None = None

    def poll(self) -> int | None:
        if self.returncode is None:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode

    def wait(self) -> int:
        if self.returncode is None:
            _, status = os.waitpid(self.pid, 0)  # retried after a signal's handler (PEP 475)
            self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, signal.SIGKILL)


Shim = subprocess.Popen[bytes] | Forked


def command(args: Sequence[str]) -> list[str]:
    """The argv of a shim started with ``args`` (its options)."""
    return [sys.executable, "-I", "-S", "-c", SHIM_BOOT, PACKAGE_ROOT, *args]


def _fork(args: list[str]) -> Forked:
    """Runs the shim's main in a child of ours, in a session of its own (as Popen's
    start_new_session), named FORKED_COMM so that ``is_shim`` knows it. It closes what it
    inherits (but the ready and process fds), as a started shim does."""
    for out in (sys.stdout, sys.stderr):  # or the child writes our buffered output again
        out.flush()
    pid = os.fork()
    if pid:
        return Forked(pid)
    try:
        os.setsid()
        with open("/proc/self/comm", "w") as f:
            f.write(FORKED_COMM)
        from cocoon.shim import main as shim_main

        shim_main.run(args)  # flushes and leaves with main()'s status
    except BaseException as exc:  # never back into the caller's code
        with contextlib.suppress(Exception):
            print(f"cocoon-shim: {exc!r}", file=sys.stderr, flush=True)
    finally:
        os._exit(255)


@dataclass
class Starting:
    """A shim started and not yet ready (``begin``): ``finish`` waits for its ready line,
    ``cancel`` ends it."""

    proc: Shim
    cid: str
    ready_fd: int
    go_fd: int = -1  # held back until "go" (``begin(held=True)``)


def spawn(
    sandbox_dir: Path,
    cid: str,
    exec_id: str,
    terminal: bool,
    console_socket: str | None,
    netns: str = "",
    namespaces: Sequence[tuple[str, str]] = (),
    process: bytes = b"",
    timeout: float = 60.0,
    fork: bool = False,
) -> Shim:
    """Starts a shim as our child (so it stays in the caller's tree) and waits until ready.
    ``namespaces``: (kind, path) of the IPC, UTS and cgroup namespaces it joins (an empty path:
    a new one). ``process``: an exec's process as JSON, which the shim starts itself (the
    agent's refusal is the LifecycleError ``exec in ID: why``). ``fork``: for a shim we wait
    for (a foreground exec), forked from this process if it has no other thread (a fork
    copies only the caller's: a lock another one held would stay taken in the child)."""
    s = begin(sandbox_dir, cid, exec_id, terminal, console_socket, netns, namespaces, process, fork)
    return finish(s, timeout)


def begin(
    sandbox_dir: Path,
    cid: str,
    exec_id: str,
    terminal: bool,
    console_socket: str | None,
    netns: str = "",
    namespaces: Sequence[tuple[str, str]] = (),
    process: bytes = b"",
    fork: bool = False,
    held: bool = False,
) -> Starting:
    """``spawn``'s first half: the shim started, not waited for. ``held``: it waits for
    ``finish``'s "go" before it does anything (``create`` starts it before the container
    exists, so that its interpreter's start overlaps with the agent's create)."""
    rfd, wfd = os.pipe()
    pfd = gr = gw = -1
    if process:
        pfd = os.memfd_create("cocoon-exec-process", os.MFD_CLOEXEC)
        os.write(pfd, process)
    if held:
        gr, gw = os.pipe()
    argv = [
        "--sandbox-dir",
        str(sandbox_dir),
        "--container",
        cid,
        "--ready-fd",
        str(wfd),
    ]
    if exec_id:
        argv += ["--exec-id", exec_id]
    if pfd >= 0:
        argv += ["--process-fd", str(pfd)]
    if gr >= 0:
        argv += ["--go-fd", str(gr)]
    if terminal:
        argv.append("--terminal")
    if console_socket:
        argv += ["--console-socket", console_socket]
    if netns:
        argv += ["--netns", netns]
    for kind, path in namespaces:
        argv += ["--ns", f"{kind}={path}" if path else kind]
    keep = tuple(fd for fd in (wfd, pfd, gr) if fd >= 0)
    proc: Shim
    try:
        if fork and len(os.listdir("/proc/self/task")) == 1:  # gRPC's C threads count too
            proc = _fork(argv)
        else:
            proc = subprocess.Popen(command(argv), pass_fds=keep, start_new_session=True)
    except BaseException:
        for fd in (rfd, gw):
            if fd >= 0:
                os.close(fd)
        raise
    finally:
        for fd in keep:
            os.close(fd)
    return Starting(proc, cid, rfd, gw)


def finish(s: Starting, timeout: float = 60.0) -> Shim:
    """Lets a held shim go, then waits for its ready line: the shim, ready; or
    LifecycleError (the shim ended)."""
    proc, cid = s.proc, s.cid
    try:
        if s.go_fd >= 0:
            with contextlib.suppress(BrokenPipeError):  # it died: its status says so below
                os.write(s.go_fd, b"go")
            os.close(s.go_fd)
            s.go_fd = -1
        ready, _, _ = select.select([s.ready_fd], [], [], timeout)
        said = os.read(s.ready_fd, 65536) if ready else b""
    finally:
        os.close(s.ready_fd)
        s.ready_fd = -1
    if not said.startswith(b"ok"):
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        if said.startswith(b"fail "):
            raise LifecycleError(said[5:].decode(errors="replace").strip())
        why = said[6:].decode(errors="replace").strip() if said.startswith(b"error ") else ""
        raise LifecycleError(
            f"container {cid}: the shim did not start: {why}"
            if why
            else f"container {cid}: the shim did not start (status {proc.returncode})"
        )
    return proc


def cancel(s: Starting) -> None:
    """A shim that ``finish`` never let go: its pipes closed (a held one exits on that) and
    the process waited for."""
    held = s.go_fd >= 0
    for fd in (s.go_fd, s.ready_fd):
        if fd >= 0:
            os.close(fd)
    s.go_fd = s.ready_fd = -1
    if held and isinstance(s.proc, subprocess.Popen):
        with contextlib.suppress(subprocess.TimeoutExpired):
            s.proc.wait(timeout=5)
    if s.proc.poll() is None:
        s.proc.kill()
    s.proc.wait()


def wait_forwarding(proc: Shim) -> int:
    """Waits for a foreground shim, passing on the signals we get (as runc run/exec do)."""

    def fwd(signum: int, _frame: object) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signum)

    for s in FORWARDED:
        signal.signal(s, fwd)
    rc = proc.wait()
    return 128 - rc if rc < 0 else rc


def is_shim(pid: int, cid: str) -> bool:
    """Whether ``pid`` is still a shim of container ``cid`` (pids are reused)."""
    try:
        cmd = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        forked = Path(f"/proc/{pid}/comm").read_bytes().rstrip(b"\n") == FORKED_COMM.encode()
    except OSError:
        return False
    started = SHIM_BOOT.encode() in cmd or SHIM_MODULE.encode() in cmd  # -m: an older CLI's
    return (forked or started) and cid.encode() in cmd


def write_pid_file(path: Path, pid: int) -> None:
    """Callers treat the pid file as "create done": written atomically, and last."""
    tmp = path.with_name(path.name + ".cocoon-tmp")
    tmp.write_text(str(pid))
    os.replace(tmp, path)
