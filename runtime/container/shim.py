"""The host side of a container's shim: spawning it, waiting for it, recognising it.

A shim is one host process per container process (``cocoon.shim.main``); its pid stands for
the workload. ``spawn`` starts one as our child (so it stays in the caller's process tree,
which containerd-shim and conmon reap as subreapers) and waits for its ready line;
``wait_forwarding`` waits for a foreground one, passing on the signals we get (as runc run
and exec do); ``write_pid_file`` writes its pid where the caller asked, atomically and last.

May import: the standard library, cocoon.runtime.errors.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import subprocess
import sys
from collections.abc import Sequence
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
) -> subprocess.Popen[bytes]:
    """Starts a shim as our child (so it stays in the caller's tree) and waits until ready.
    ``namespaces``: (kind, path) of the IPC, UTS and cgroup namespaces it joins (an empty path:
    a new one). ``process``: an exec's process as JSON, which the shim starts itself (the
    agent's refusal is the LifecycleError ``exec in ID: why``)."""
    rfd, wfd = os.pipe()
    pfd = -1
    if process:
        pfd = os.memfd_create("cocoon-exec-process", os.MFD_CLOEXEC)
        os.write(pfd, process)
    argv = [
        sys.executable,
        "-m",
        "cocoon.shim.main",
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
    if terminal:
        argv.append("--terminal")
    if console_socket:
        argv += ["--console-socket", console_socket]
    if netns:
        argv += ["--netns", netns]
    for kind, path in namespaces:
        argv += ["--ns", f"{kind}={path}" if path else kind]
    try:
        proc = subprocess.Popen(
            argv, pass_fds=(wfd,) if pfd < 0 else (wfd, pfd), start_new_session=True
        )
    finally:
        os.close(wfd)
        if pfd >= 0:
            os.close(pfd)
    try:
        ready, _, _ = select.select([rfd], [], [], timeout)
        said = os.read(rfd, 65536) if ready else b""
    finally:
        os.close(rfd)
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


def wait_forwarding(proc: subprocess.Popen[bytes]) -> int:
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
    except OSError:
        return False
    return b"cocoon.shim.main" in cmd and cid.encode() in cmd


def write_pid_file(path: Path, pid: int) -> None:
    """Callers treat the pid file as "create done": written atomically, and last."""
    tmp = path.with_name(path.name + ".cocoon-tmp")
    tmp.write_text(str(pid))
    os.replace(tmp, path)
