"""Containers in the guest: crun runs them; this module holds their processes and stdio.

Each container has a bundle in /run/cocoon/containers/<id> (config.json as the host rewrote
it: rootfs and volumes under the virtio-fs share mounted at /run/cocoon/shared). crun's own
messages go to a JSON log in the bundle, never to the workload's stdio. A process's stdio is
three pipes held here (or the pty master crun sends over a console socket when the spec asks
for a terminal); the host reads and writes them with the stream RPCs. Exit statuses are kept
until the container is removed.

Before crun sees the spec, the guest adds what only it knows (``specedit``: its device
numbers, device-cgroup rules, net.* sysctls of a container sharing the guest's network
namespace); this module does the lookups and writes those edits need. A container with a
network namespace of its own gets its loopback up, as runc does (crun leaves it down).

May import: the standard library, cocoon.agent.{errors, mounts, network, proc, libc, specedit}.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import json
import logging
import os
import re
import select
import shutil
import signal
import socket
import stat
import struct
import termios
import threading
import uuid
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cocoon.agent import libc, mounts, network, proc, specedit
from cocoon.agent.errors import ContainerError, ErrorKind

log = logging.getLogger("cocoon.agent.containers")

SHARED_TAG = "cocoon"
SHARED_DIR = "/run/cocoon/shared"
BUNDLES = Path("/run/cocoon/containers")
TTY_SOCKETS = Path("/run/cocoon/tty")
CGROUP_ROOT = Path("/sys/fs/cgroup")
CRUN = "/usr/bin/crun"
POD_SHM_FLAGS = libc.MS_NOSUID | libc.MS_NODEV | libc.MS_NOEXEC
# A process's stdout and stderr pipes: room for more than one spliced frame (RAW_SPLICE_MAX),
# so the workload keeps writing while a frame goes out. Linux's default is 64 KiB.
OUT_PIPE_SIZE = 1024 * 1024
_ID = re.compile(r"^[\w+\-.]{1,1024}$")


@dataclass
class Process:
    container_id: str
    exec_id: str
    terminal: bool
    pid: int = 0
    stdin: int | None = None
    stdout: int | None = None
    stderr: int | None = None
    master: int | None = None
    status: int | None = None  # exit code, or 128 + signal
    signaled: bool = False
    done: threading.Event = field(default_factory=threading.Event)
    args: list[str] = field(default_factory=list)

    def close_fds(self) -> None:
        for name in ("stdin", "stdout", "stderr", "master"):
            fd = getattr(self, name)
            if fd is not None:
                with contextlib.suppress(OSError):
                    os.close(fd)
                setattr(self, name, None)


@dataclass
class Container:
    id: str
    bundle: Path
    init: Process
    execs: dict[str, Process] = field(default_factory=dict)
    cgroup: str = ""


class Manager:
    def __init__(self, reaper: proc.Reaper, crun: str = CRUN, bundles: Path = BUNDLES) -> None:
        self._reaper = reaper
        self._crun_bin = crun
        self._bundles = bundles
        self._lock = threading.Lock()
        self._containers: dict[str, Container] = {}
        self._shared = threading.Lock()  # held while the share is mounted, the first time
        self._shared_up = False  # mounted: never unmounted while the guest runs

    # ------------------------------------------------------------------ helpers
    def _get(self, cid: str) -> Container:
        with self._lock:
            c = self._containers.get(cid)
        if c is None:
            raise ContainerError(
                ErrorKind.NOT_FOUND, f"container {cid} does not exist in the guest"
            )
        return c

    def _process(self, cid: str, exec_id: str) -> Process:
        c = self._get(cid)
        if not exec_id:
            return c.init
        p = c.execs.get(exec_id)
        if p is None:
            raise ContainerError(
                ErrorKind.NOT_FOUND, f"process {exec_id} of container {cid} not found"
            )
        return p

    def _crun_argv(self, bundle: Path, *args: str) -> list[str]:
        return [self._crun_bin, f"--log=file:{bundle / 'crun.log'}", "--log-format=json", *args]

    def _crun(self, bundle: Path, *args: str, timeout: float = 60.0) -> None:
        offset = _log_size(bundle)
        res = proc.run(self._reaper, self._crun_argv(bundle, *args), timeout=timeout)
        if not res.ok:
            raise ContainerError(
                ErrorKind.INTERNAL, f"crun {args[0]}: {_crun_error(bundle, res, offset)}"
            )

    def ensure_shared(self) -> None:
        """The share mounted at SHARED_DIR; looked up once (reading the mount table under
        TCG took 3-5 ms of every create)."""
        if self._shared_up:
            return
        with self._shared:
            if not mounts.is_mounted(SHARED_DIR):
                mounts.mount(SHARED_TAG, SHARED_DIR, "virtiofs", libc.MS_NODEV)
            self._shared_up = True

    # ------------------------------------------------------------------ lifecycle
    def create(
        self,
        cid: str,
        spec_json: bytes,
        stdin: bool,
        devices: Iterable[tuple[str, str]] = (),
        start: bool = False,
    ) -> Container:
        """``devices``: (guest device node, container path) of hot-plugged block devices.
        ``start``: the process is started too (a ``run``): by one ``crun run --detach`` when
        nothing has to be done to the container between its create and its start (mount
        propagation, a loopback to bring up), else by ``crun start`` right after those."""
        if not _ID.match(cid) or cid in (".", ".."):
            raise ContainerError(ErrorKind.INVALID, f"invalid container id {cid!r}")
        spec = specedit.parse(spec_json, f"container {cid}: spec")
        for vm_path, container_path in devices:
            specedit.bind_device(spec, container_path, *_block_device(vm_path))
        for source in specedit.device_mount_sources(spec):
            try:
                numbers = _block_device(source)
            except ContainerError:
                continue  # not a block device: nothing for the device cgroup to allow
            specedit.allow_block_device(spec, *numbers)
        apply_guest_net_sysctls(spec)
        specedit.join_container_namespaces(spec, lambda other: self._init_pid(cid, other))
        for shm in specedit.pod_shm_dirs(spec):
            try:
                if not mounts.is_mounted(shm):
                    mounts.mount("shm", shm, "tmpfs", POD_SHM_FLAGS, "mode=1777,size=65536k")
            except OSError as exc:
                raise ContainerError(ErrorKind.INTERNAL, f"container {cid}: {exc}") from exc
        with self._lock:
            if cid in self._containers:
                raise ContainerError(
                    ErrorKind.EXISTS, f"container {cid} already exists in the guest"
                )
        root_path = str(specedit.section(spec, "root").get("path", ""))
        if root_path.startswith(SHARED_DIR):
            try:
                self.ensure_shared()
            except OSError as exc:
                raise ContainerError(ErrorKind.INTERNAL, f"shared filesystem: {exc}") from exc
        root = Path(root_path)
        if not root.is_absolute() or not root.is_dir():
            raise ContainerError(
                ErrorKind.INVALID, f"container {cid}: rootfs {root} not found in the guest"
            )
        bundle = self._bundles / cid
        shutil.rmtree(bundle, ignore_errors=True)
        bundle.mkdir(parents=True)
        (bundle / "config.json").write_text(json.dumps(spec))
        process = specedit.section(spec, "process")
        terminal = bool(process.get("terminal"))
        p = Process(cid, "", terminal, args=list(process.get("args") or []))
        propagation = mounts.propagation_wanted(spec)
        at_once = start and not propagation and not specedit.own_netns(spec)
        verb = ["run", "--detach"] if at_once else ["create"]
        try:
            self._launch(p, bundle, [*verb, "--bundle", str(bundle)], cid, stdin)
            if not at_once:
                self._before_start(cid, spec, p.pid, propagation)
                if start:
                    self._crun(bundle, "start", cid)
        except BaseException:
            p.close_fds()
            with contextlib.suppress(ContainerError):
                self._crun(bundle, "delete", "--force", cid)
            shutil.rmtree(bundle, ignore_errors=True)
            raise
        how = (
            "crun run --detach"
            if at_once
            else "crun create, crun start"
            if start
            else "crun create"
        )
        log.info("container %s %s (%s)", cid, "started" if start else "created", how)
        cgroup = str(specedit.section(spec, "linux").get("cgroupsPath", ""))
        c = Container(cid, bundle, p, cgroup=cgroup)
        with self._lock:
            self._containers[cid] = c
        return c

    @staticmethod
    def _before_start(
        cid: str, spec: specedit.Spec, pid: int, propagation: list[tuple[str, int]]
    ) -> None:
        """What the guest does to a created container before it may start: the mounts'
        propagation (crun 1.8 leaves it), and the loopback of its own network namespace up."""
        try:
            mounts.apply_propagation(pid, propagation)
        except OSError as exc:
            raise ContainerError(ErrorKind.INTERNAL, f"container {cid}: {exc}") from exc
        if specedit.own_netns(spec):
            try:
                network.loopback_up_in(pid)
            except Exception as exc:
                raise ContainerError(
                    ErrorKind.INTERNAL,
                    f"loopback in the container's network namespace: {exc}",
                ) from exc

    def _init_pid(self, cid: str, other: str) -> int:
        """The guest pid of container ``other``'s init, whose namespaces ``cid`` joins."""
        with self._lock:
            c = self._containers.get(other)
        if c is None:
            raise ContainerError(
                ErrorKind.PRECONDITION,
                f"container {cid}: no container {other} in the guest to join",
            )
        if c.init.done.is_set() or not (Path("/proc") / str(c.init.pid)).exists():
            raise ContainerError(
                ErrorKind.PRECONDITION, f"container {cid}: container {other} has exited"
            )
        return c.init.pid

    def _launch(self, p: Process, bundle: Path, verb: list[str], cid: str, stdin: bool) -> None:
        """Runs ``crun create``, ``crun run --detach`` or ``crun exec --detach`` with the
        process's stdio attached:
        pipes held here, or a pty. Without ``stdin`` (the caller's was /dev/null) the process
        reads /dev/null, as under runc, and its stdin is as if closed: no stream to open."""
        tag = p.exec_id or "init"
        pid_file = bundle / f"{tag}.pid"
        pid_file.unlink(missing_ok=True)
        child: list[int] = []
        lsock = None
        argv = self._crun_argv(bundle, *verb, "--pid-file", str(pid_file))
        if p.terminal:
            # Not in the bundle: a long container id would overflow sun_path (107 bytes).
            TTY_SOCKETS.mkdir(parents=True, exist_ok=True)
            sock_path = TTY_SOCKETS / f"{uuid.uuid4().hex}.sock"
            lsock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            lsock.bind(str(sock_path))
            lsock.listen(1)
            argv += ["--console-socket", str(sock_path)]
            fds: tuple[int | None, int | None, int | None] = (None, None, None)
        else:
            in_r, p.stdin = os.pipe() if stdin else (None, None)
            p.stdout, out_w = os.pipe()
            p.stderr, err_w = os.pipe()
            for out in (out_w, err_w):  # room for a whole spliced frame (cocoon.agent.channel)
                with contextlib.suppress(OSError):  # over the user's pipe budget: the default
                    fcntl.fcntl(out, fcntl.F_SETPIPE_SZ, OUT_PIPE_SIZE)
            child = [fd for fd in (in_r, out_w, err_w) if fd is not None]
            fds = (in_r, out_w, err_w)
        argv.append(cid)
        offset = _log_size(bundle)
        try:
            pid = proc.spawn(argv, *fds)
        finally:
            for fd in child:
                os.close(fd)
        status: int | None = None
        try:
            if lsock is not None:
                status = self._receive_pty(p, lsock, pid)
        finally:
            if lsock is not None:
                lsock.close()
                sock_path.unlink(missing_ok=True)
        if status is None:
            status = self._reaper.wait(pid, 120)
        if status is None or not (os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0):
            res = proc.Result(status or 0, b"", b"")
            raise ContainerError(
                ErrorKind.INTERNAL, f"crun {verb[0]}: {_crun_error(bundle, res, offset)}"
            )
        try:
            p.pid = int(pid_file.read_text().strip())
        except (OSError, ValueError) as exc:
            raise ContainerError(ErrorKind.INTERNAL, f"crun {verb[0]}: no pid file: {exc}") from exc
        self._reaper.watch(p.pid, functools.partial(self._ended, p))

    def _receive_pty(self, p: Process, lsock: socket.socket, crun_pid: int) -> int | None:
        """Accepts crun's console-socket connection and takes the pty master from it."""
        for _ in range(1200):
            r, _, _ = select.select([lsock], [], [], 0.1)
            if r:
                conn, _ = lsock.accept()
                with conn:
                    _, fds, _, _ = socket.recv_fds(conn, 4096, 4)
                if not fds:
                    raise ContainerError(ErrorKind.INTERNAL, "crun sent no terminal")
                p.master = fds[0]
                for extra in fds[1:]:
                    os.close(extra)
                return None
            status = self._reaper.wait(crun_pid, 0)
            if status is not None:
                return status
        raise ContainerError(ErrorKind.INTERNAL, "crun did not send the terminal within 120s")

    @staticmethod
    def _ended(p: Process, status: int) -> None:
        """The process's exit, in the reaping thread: its waiters first, then the log line
        (a console line costs the guest milliseconds under TCG)."""
        p.signaled = os.WIFSIGNALED(status)
        p.status = proc.exit_code(status)
        p.done.set()
        log.info(
            "container %s process %s (pid %d) exited: %d",
            p.container_id,
            p.exec_id or "init",
            p.pid,
            p.status,
        )

    def start(self, cid: str) -> None:
        c = self._get(cid)
        self._crun(c.bundle, "start", cid)

    def exec(self, cid: str, exec_id: str, process_json: bytes, stdin: bool = True) -> Process:
        c = self._get(cid)
        if c.init.done.is_set():
            raise ContainerError(ErrorKind.PRECONDITION, f"container {cid} is not running")
        if not exec_id or exec_id in c.execs or not _ID.match(exec_id):
            raise ContainerError(ErrorKind.INVALID, f"bad or duplicate exec id {exec_id!r}")
        spec = specedit.parse(process_json, f"exec {exec_id}: process")
        pfile = c.bundle / f"{exec_id}.process.json"
        pfile.write_text(json.dumps(spec))
        p = Process(cid, exec_id, bool(spec.get("terminal")), args=list(spec.get("args") or []))
        try:
            self._launch(p, c.bundle, ["exec", "--detach", "--process", str(pfile)], cid, stdin)
        except BaseException:
            p.close_fds()
            raise
        c.execs[exec_id] = p
        return p

    def signal(self, cid: str, exec_id: str, sig: int, all_processes: bool) -> None:
        c = self._get(cid)
        if all_processes and not exec_id:
            self._crun(c.bundle, "kill", "--all", cid, str(sig))
            return
        p = self._process(cid, exec_id)
        if p.done.is_set():
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(p.pid, sig)

    def wait(self, cid: str, exec_id: str, alive: Callable[[], bool]) -> Process:
        """The process once it has ended. The waiter is the process's shim on the host, whose
        pid the caller holds as the process's own: a wait abandoned while the process runs
        means the shim is gone (SIGKILLed, as conmon does on an exec probe's timeout), and the
        process is killed with it, as that signal to the pid would kill it under runc."""
        p = self._process(cid, exec_id)
        while not p.done.wait(1.0):
            if not alive():
                log.warning(
                    "%s%s: its shim is gone; killed", cid, f" exec {exec_id}" if exec_id else ""
                )
                with contextlib.suppress(ProcessLookupError):
                    os.kill(p.pid, signal.SIGKILL)
                break
        return p

    def remove(self, cid: str) -> None:
        c = self._get(cid)
        self._crun(c.bundle, "delete", "--force", cid)
        for p in (c.init, *c.execs.values()):
            p.close_fds()
        with self._lock:
            self._containers.pop(cid, None)
        shutil.rmtree(c.bundle, ignore_errors=True)

    def pause(self, cid: str) -> None:
        self._crun(self._get(cid).bundle, "pause", cid)

    def resume(self, cid: str) -> None:
        self._crun(self._get(cid).bundle, "resume", cid)

    def update(self, cid: str, resources_json: bytes) -> None:
        c = self._get(cid)
        try:
            json.loads(resources_json)
        except ValueError as exc:
            raise ContainerError(
                ErrorKind.INVALID, f"update {cid}: resources are not JSON: {exc}"
            ) from exc
        f = c.bundle / "resources.json"
        f.write_bytes(resources_json)
        self._crun(c.bundle, "update", "--resources", str(f), cid)

    def cgroup_dir(self, cid: str) -> Path:
        c = self._get(cid)
        return CGROUP_ROOT / c.cgroup.lstrip("/")

    def pids(self, cid: str) -> list[int]:
        d = self.cgroup_dir(cid)
        out: list[int] = []
        for procs in sorted(d.rglob("cgroup.procs")) if d.is_dir() else []:
            with contextlib.suppress(OSError, ValueError):
                out.extend(int(x) for x in procs.read_text().split())
        return out

    def processes(self, cid: str) -> list[tuple[int, str, list[str]]]:
        c = self._get(cid)
        by_pid = {p.pid: p.exec_id for p in (c.init, *c.execs.values())}
        result = []
        for pid in self.pids(cid):
            try:
                args = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            result.append(
                (pid, by_pid.get(pid, ""), [a.decode(errors="replace") for a in args if a])
            )
        return result

    # ------------------------------------------------------------------ stdio
    def read_stream(
        self, cid: str, exec_id: str, which: str, alive: Callable[[], bool]
    ) -> Iterator[bytes]:
        """The process's output as chunks until EOF (lookup errors raise here, not lazily)."""
        fd = self.stream_fd(cid, exec_id, which)
        return _chunks(fd, alive) if fd is not None else iter(())

    def stream_fd(self, cid: str, exec_id: str, which: str) -> int | None:
        """The fd of the process's "stdout", "stderr" or "stdin" (a terminal's stdout and
        stdin are its master; it has no stderr: None; a closed stdin: None), which the gRPC
        calls or a raw stream (agent.channel) read or write."""
        p = self._process(cid, exec_id)
        if p.terminal and which != "stderr":
            return p.master
        fd: int | None = getattr(p, which)
        return fd

    def write_stdin(self, cid: str, exec_id: str, chunks: Iterable[bytes]) -> int:
        p = self._process(cid, exec_id)
        fd = p.master if p.terminal else p.stdin
        if fd is None:
            raise ContainerError(ErrorKind.PRECONDITION, "stdin is closed")
        n = 0
        for data in chunks:
            view = memoryview(data)
            while view:
                try:
                    w = os.write(fd, view)
                except BrokenPipeError:
                    return n
                view = view[w:]
                n += w
        return n

    def close_stdin(self, cid: str, exec_id: str) -> None:
        p = self._process(cid, exec_id)
        if p.terminal:
            return  # a terminal has no separate stdin to close
        if p.stdin is not None:
            os.close(p.stdin)
            p.stdin = None

    def resize(self, cid: str, exec_id: str, rows: int, cols: int) -> None:
        p = self._process(cid, exec_id)
        if p.master is None:
            raise ContainerError(ErrorKind.PRECONDITION, "process has no terminal")
        fcntl.ioctl(p.master, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))

    # ------------------------------------------------------------------ stats
    def stats(self, cid: str) -> dict[str, int]:
        d = self.cgroup_dir(cid)
        out: dict[str, int] = {}

        def read(name: str) -> str:
            try:
                return (d / name).read_text()
            except OSError:
                return ""

        for line in read("cpu.stat").splitlines():
            k, _, v = line.partition(" ")
            if k in ("usage_usec", "user_usec", "system_usec", "nr_throttled", "throttled_usec"):
                out[k] = int(v)
        for name, key in (
            ("memory.current", "memory"),
            ("memory.peak", "memory_peak"),
            ("pids.current", "pids"),
        ):
            v = read(name).strip()
            if v.isdigit():
                out[key] = int(v)
        for name, key in (("memory.max", "memory_limit"), ("pids.max", "pids_limit")):
            v = read(name).strip()
            out[key] = int(v) if v.isdigit() else 0
        for line in read("memory.stat").splitlines():
            k, _, v = line.partition(" ")
            if k == "file":
                out["cache"] = int(v)
        for line in read("memory.events").splitlines():
            k, _, v = line.partition(" ")
            if k == "oom_kill":
                out["oom_kill"] = int(v)
        return out


def _block_device(path: str) -> tuple[int, int]:
    """The (major, minor) of the guest's block device node ``path``."""
    try:
        st = os.stat(path)
    except OSError as exc:
        raise ContainerError(ErrorKind.INTERNAL, f"device {path}: {exc.strerror}") from exc
    if not stat.S_ISBLK(st.st_mode):
        raise ContainerError(ErrorKind.INTERNAL, f"device {path} is not a block device")
    return os.major(st.st_rdev), os.minor(st.st_rdev)


def apply_guest_net_sysctls(spec: dict[str, Any], root: Path = Path("/")) -> None:
    """A container without a network namespace of its own shares the guest's (the sandbox's
    NICs are there): its ``net.*`` sysctls are the guest's, taken out of ``spec`` and set
    here, since crun only sets them in a new network namespace (docker's bridge asks for
    net.ipv4.ip_unprivileged_port_start)."""
    for key, value in specedit.take_guest_net_sysctls(spec).items():
        path = root / "proc/sys" / key.replace(".", "/")
        try:
            path.write_text(value)
        except OSError as exc:
            raise ContainerError(
                ErrorKind.INVALID, f"sysctl {key}={value}: {exc.strerror}"
            ) from None


def _log_size(bundle: Path) -> int:
    try:
        return (bundle / "crun.log").stat().st_size
    except OSError:
        return 0


def _crun_error(bundle: Path, res: proc.Result, offset: int) -> str:
    """The last error crun logged since ``offset``, else its stderr, else its status."""
    msgs = []
    with contextlib.suppress(OSError), (bundle / "crun.log").open("rb") as f:
        f.seek(offset)
        for line in f.read().decode(errors="replace").splitlines():
            with contextlib.suppress(ValueError):
                rec = json.loads(line)
                if rec.get("level") in ("error", "fatal"):
                    msgs.append(str(rec.get("msg", "")))
    if msgs:
        return msgs[-1]
    err = res.stderr.decode(errors="replace").strip()
    return err.splitlines()[-1] if err else f"failed (wait status {res.status})"


def _chunks(fd: int, alive: Callable[[], bool]) -> Iterator[bytes]:
    while True:
        r, _, _ = select.select([fd], [], [], 1.0)
        if not r:
            if not alive():
                return
            continue
        try:
            data = os.read(fd, 65536)
        except OSError:  # EIO: the pty's last slave closed
            return
        if not data:
            return
        yield data
