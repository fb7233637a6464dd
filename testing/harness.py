"""The pytest plugin's API: throwaway VM-isolated containers, driven through the cocoon CLI as
any caller drives a runtime. A container is ``cocoon run --keep`` in the foreground (so its
handle holds the workload's exit status), with ``exec``, ``kill`` and ``delete`` beside it.

``Cocoon`` is what the fixtures hand out: ``run()`` starts a container in a VM of its own,
``pod()`` a pod whose containers share one VM and network, ``network()`` a private bridge its
containers and pods reach each other on. ``close()`` removes everything a ``Cocoon`` made and
returns what any of it left on the host (processes, mounts, netns devices, state, cgroups).

The images: None is a busybox root filesystem made on the fly (from the host's
busybox-static); a directory with a config.json is an OCI bundle (its process and settings
kept, the options applied over them); any other directory is a root filesystem. A bundle's or
a directory's root filesystem is used in place, as runc would: the container's writes land in
it.

May import: the standard library, cocoon.runtime.{errors, cli.oci, container.{busybox, ids,
spec, state}, sandbox.{launcher, paths}}, cocoon.testing.{leaks, netlab}.
"""

from __future__ import annotations

import contextlib
import io
import itertools
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cocoon.runtime.cli.oci import parse_signal, parse_size
from cocoon.runtime.container import busybox
from cocoon.runtime.container.ids import validate_id
from cocoon.runtime.container.spec import default_spec
from cocoon.runtime.container.state import Store
from cocoon.runtime.errors import CocoonError
from cocoon.runtime.sandbox import paths
from cocoon.testing import leaks
from cocoon.testing.netlab import Network

CRI_TYPE = "io.kubernetes.cri.container-type"
CRI_SANDBOX = "io.kubernetes.cri.sandbox-id"
FOREVER = ["sleep", "2147483647"]  # the default workload: a container to exec into
CPU_PERIOD = 100_000
LOG_TAIL = 200  # lines of each log attached to a failing test's report
# Every capability of Linux 6.1 (the guest kernel): what a privileged container holds.
ALL_CAPS = [
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_DAC_READ_SEARCH",
    "CAP_FOWNER",
    "CAP_FSETID",
    "CAP_KILL",
    "CAP_SETGID",
    "CAP_SETUID",
    "CAP_SETPCAP",
    "CAP_LINUX_IMMUTABLE",
    "CAP_NET_BIND_SERVICE",
    "CAP_NET_BROADCAST",
    "CAP_NET_ADMIN",
    "CAP_NET_RAW",
    "CAP_IPC_LOCK",
    "CAP_IPC_OWNER",
    "CAP_SYS_MODULE",
    "CAP_SYS_RAWIO",
    "CAP_SYS_CHROOT",
    "CAP_SYS_PTRACE",
    "CAP_SYS_PACCT",
    "CAP_SYS_ADMIN",
    "CAP_SYS_BOOT",
    "CAP_SYS_NICE",
    "CAP_SYS_RESOURCE",
    "CAP_SYS_TIME",
    "CAP_SYS_TTY_CONFIG",
    "CAP_MKNOD",
    "CAP_LEASE",
    "CAP_AUDIT_WRITE",
    "CAP_AUDIT_CONTROL",
    "CAP_SETFCAP",
    "CAP_MAC_OVERRIDE",
    "CAP_MAC_ADMIN",
    "CAP_SYSLOG",
    "CAP_WAKE_ALARM",
    "CAP_BLOCK_SUSPEND",
    "CAP_AUDIT_READ",
    "CAP_PERFMON",
    "CAP_BPF",
    "CAP_CHECKPOINT_RESTORE",
]


class CocoonTestError(Exception):
    """A container the test asked for could not be made or used; the message says why."""


@dataclass(frozen=True)
class ExecResult:
    exit_code: int
    stdout: str
    stderr: str
    stdout_bytes: bytes = b""

    @property
    def ok(self) -> bool:
        return self.exit_code == 0

    def __str__(self) -> str:
        return f"exit {self.exit_code}\n--- stdout\n{self.stdout}--- stderr\n{self.stderr}"


class Runtime:
    """The cocoon CLI on one private state root: one per pytest session (per xdist worker)."""

    def __init__(
        self,
        root: Path,
        work: Path,
        config: Path | None = None,
        binary: str | None = None,
        debug: bool = False,
        timeout: float = 300.0,
    ) -> None:
        self.root, self.work, self.config = root, work, config
        self.binary = binary or default_binary()
        self.debug, self.timeout = debug, timeout
        self.tag = f"{os.getpid():x}"  # ids and host cgroups are host-wide: the pid parts them
        self._n = itertools.count(1)
        self._lock = threading.Lock()
        root.mkdir(parents=True, exist_ok=True)
        work.mkdir(parents=True, exist_ok=True)

    def argv(self, log: Path | None = None) -> list[str]:
        a = [self.binary, "--root", str(self.root)]
        if self.config:
            a += ["--config", str(self.config)]
        if log:
            a += ["--log", str(log), "--log-format", "json"]
        if self.debug:
            a.append("--debug")
        return a

    def call(
        self, *args: str, input: bytes | None = None, timeout: float | None = None
    ) -> tuple[subprocess.CompletedProcess[bytes], str]:
        """Runs a verb; returns its result and the runtime's own error (none: "")."""
        with tempfile.NamedTemporaryFile(dir=self.work, prefix="call-", suffix=".json") as log:
            r = subprocess.run(
                [*self.argv(Path(log.name)), *args],
                input=input,
                stdin=None if input is not None else subprocess.DEVNULL,
                capture_output=True,
                timeout=timeout or self.timeout,
            )
            return r, runtime_error(Path(log.name))

    def new_id(self, name: str) -> str:
        __tracebackhide__ = True
        with self._lock:
            n = next(self._n)
        try:
            return validate_id(f"{name}-{self.tag}-{n}")
        except CocoonError as exc:
            raise CocoonTestError(f"name {name!r}: {exc}") from None

    def exec_hint(self, cid: str) -> str:
        return " ".join([*self.argv(), "exec", "-t", cid, "sh"])

    def remove_hint(self) -> str:
        argv = " ".join(self.argv())
        return f"remove them with: {argv} delete --force <id> (a pod's members before its sandbox)"


def default_binary() -> str:
    """The cocoon beside this Python (the same install as the plugin), else the one on PATH."""
    here = Path(sys.executable).parent / "cocoon"
    return str(here) if here.exists() else shutil.which("cocoon") or "cocoon"


def runtime_error(log: Path) -> str:
    """The last error line of a runc-style JSON log, or ""."""
    try:
        text = log.read_text()
    except OSError:
        return ""
    msg = ""
    for line in text.splitlines():
        with contextlib.suppress(ValueError):
            entry = json.loads(line)
            if isinstance(entry, dict) and entry.get("level") == "error":
                msg = str(entry.get("msg", ""))
    return msg


@dataclass(frozen=True)
class Options:
    """What a test may set on one container, checked before anything is made."""

    cpus: float | None = None
    memory: int | None = None
    privileged: bool = False
    sysctls: dict[str, str] | None = None
    env: dict[str, str] | None = None
    cwd: str | None = None
    hostname: str | None = None
    readonly: bool = False

    @staticmethod
    def make(
        cpus: float | None = None,
        memory: int | str | None = None,
        privileged: bool = False,
        sysctls: dict[str, Any] | None = None,
        env: dict[str, Any] | None = None,
        cwd: str | None = None,
        hostname: str | None = None,
        readonly: bool = False,
    ) -> Options:
        __tracebackhide__ = True
        if cpus is not None and (
            isinstance(cpus, bool) or not isinstance(cpus, int | float) or not 0 < cpus <= 4096
        ):
            raise CocoonTestError(f"cpus={cpus!r}: a number of vCPUs above 0 (e.g. 1, 2, 0.5)")
        mem: int | None = None
        if memory is not None:
            if isinstance(memory, bool) or not isinstance(memory, int | str):
                raise CocoonTestError(f"memory={memory!r}: bytes or a size such as '512M'")
            try:
                mem = memory if isinstance(memory, int) else parse_size(memory)
            except CocoonError as exc:
                raise CocoonTestError(f"memory={memory!r}: {exc}") from None
            if mem < 4 << 20:
                raise CocoonTestError(f"memory={memory!r}: below 4 MiB no container runs")
        for what, d in (("sysctls", sysctls), ("env", env)):
            if d is not None and not isinstance(d, dict):
                raise CocoonTestError(f"{what}={d!r}: a dict of names to values")
        return Options(
            cpus=cpus,
            memory=mem,
            privileged=bool(privileged),
            sysctls={str(k): str(v) for k, v in (sysctls or {}).items()} or None,
            env={str(k): str(v) for k, v in (env or {}).items()} or None,
            cwd=cwd,
            hostname=hostname,
            readonly=bool(readonly),
        )


def _command(cmd: str | list[str] | tuple[str, ...] | None) -> list[str] | None:
    """A command: an argv list, or a string run by the image's ``sh -c``."""
    __tracebackhide__ = True
    if cmd is None:
        return None
    if isinstance(cmd, str):
        return ["sh", "-c", cmd]
    if isinstance(cmd, list | tuple) and cmd and all(isinstance(a, str) for a in cmd):
        return list(cmd)
    raise CocoonTestError(f"cmd={cmd!r}: a non-empty list of strings, or a shell string")


def write_bundle(
    bundle: Path, image: str | Path | None, cmd: list[str] | None, opts: Options
) -> dict[str, Any]:
    """Makes ``bundle`` (config.json, and rootfs/ for the default image) and returns the spec."""
    __tracebackhide__ = True
    bundle.mkdir(parents=True)
    if image is None:
        try:
            busybox.make_rootfs(bundle / "rootfs")
        except CocoonError as exc:
            raise CocoonTestError(f"the default busybox image: {exc}") from None
        spec = default_spec()
        spec["root"] = {"path": "rootfs"}
        cmd = cmd or FOREVER
    else:
        src = Path(image)
        if (src / "config.json").is_file():
            try:
                spec = json.loads((src / "config.json").read_text())
                rootfs = Path(spec["root"]["path"])
            except (OSError, ValueError, KeyError, TypeError) as exc:
                raise CocoonTestError(f"image {src}: unreadable config.json: {exc}") from None
            spec["root"]["path"] = str((src / rootfs).resolve())
        elif src.is_dir():
            if cmd is None:
                raise CocoonTestError(f"image {src}: give a cmd (a root filesystem names none)")
            spec = default_spec()
            spec["root"] = {"path": str(src.resolve())}
        else:
            raise CocoonTestError(
                f"image {src}: no such OCI bundle (a directory with config.json) "
                "or root filesystem directory"
            )
        if not Path(spec["root"]["path"]).is_dir():
            raise CocoonTestError(f"image {src}: root filesystem {spec['root']['path']} is missing")
        if cmd is None and not (spec.get("process") or {}).get("args"):
            raise CocoonTestError(f"image {src}: give a cmd (the image names none)")
    process = spec.setdefault("process", {})
    if cmd:
        process["args"] = cmd
    process["terminal"] = False
    process.setdefault("cwd", "/")
    process.setdefault("user", {"uid": 0, "gid": 0})
    if opts.env:
        process["env"] = [
            *(e for e in process.get("env", []) if e.split("=", 1)[0] not in opts.env),
            *(f"{k}={v}" for k, v in opts.env.items()),
        ]
    if opts.cwd:
        process["cwd"] = opts.cwd
    spec["root"]["readonly"] = opts.readonly
    if opts.hostname:
        spec["hostname"] = opts.hostname
    linux = spec.setdefault("linux", {})
    res = linux.setdefault("resources", {})
    if opts.cpus is not None:
        res["cpu"] = {"quota": int(opts.cpus * CPU_PERIOD), "period": CPU_PERIOD}
    if opts.memory is not None:
        res["memory"] = {"limit": opts.memory}
    if opts.sysctls:
        linux["sysctl"] = {**linux.get("sysctl", {}), **opts.sysctls}
    if opts.privileged:
        _privileged(spec)
    return spec


def _privileged(spec: dict[str, Any]) -> None:
    """What ``docker run --privileged`` changes: every capability, no seccomp, no masked or
    read-only paths, every device allowed, /sys writable. The guest kernel is the container's
    alone, so this reaches the VM's kernel, never the host's."""
    process, linux = spec["process"], spec["linux"]
    process["capabilities"] = {
        k: list(ALL_CAPS) for k in ("bounding", "effective", "permitted", "ambient")
    }
    process["noNewPrivileges"] = False
    for key in ("seccomp", "maskedPaths", "readonlyPaths"):
        linux.pop(key, None)
    linux["resources"]["devices"] = [{"allow": True, "access": "rwm"}]
    for m in spec.get("mounts", []):
        if m.get("type") in ("sysfs", "cgroup", "cgroup2") and "ro" in m.get("options", []):
            m["options"] = [o for o in m["options"] if o != "ro"] + ["rw"]


def _set_namespace(spec: dict[str, Any], kind: str, path: str | None) -> None:
    nss = [ns for ns in spec["linux"].get("namespaces", []) if ns.get("type") != kind]
    nss.append({"type": kind, "path": path} if path else {"type": kind})
    spec["linux"]["namespaces"] = nss


class Container:
    """One container of a test, running in a VM (its own, or its pod's)."""

    def __init__(
        self,
        rt: Runtime,
        cid: str,
        name: str,
        bundle: Path,
        ip: str | None,
        network: Network | None = None,
        pod: Pod | None = None,
    ) -> None:
        self.rt, self.id, self.name, self.bundle = rt, cid, name, bundle
        self.ip, self.network, self.pod = ip, network, pod
        self.proc: subprocess.Popen[bytes] | None = None
        self.owns_vm = pod is None or pod.sandbox is None  # its own VM, or its pod's
        self.vm_dir: Path | None = None  # the VM's state directory, when this container owns it
        self.sandbox_id = ""
        self.removed = False
        self._log = bundle.parent / f"{bundle.name}.log.json"

    def __repr__(self) -> str:
        return f"<cocoon container {self.name} ({self.id})>"

    def _start(self, timeout: float) -> None:
        __tracebackhide__ = True
        pid_file = self.bundle.parent / f"{self.bundle.name}.pid"
        with (
            open(self.bundle.parent / f"{self.bundle.name}.out", "wb") as out,
            open(self.bundle.parent / f"{self.bundle.name}.err", "wb") as err,
        ):
            self.proc = subprocess.Popen(
                [
                    *self.rt.argv(self._log),
                    "run",
                    "--keep",
                    "--pid-file",
                    str(pid_file),
                    "--bundle",
                    str(self.bundle),
                    self.id,
                ],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=err,
                start_new_session=True,  # a test's ^C is the plugin's to handle
            )
        deadline = time.monotonic() + timeout
        while True:
            done = self.proc.poll() is not None
            if done or pid_file.exists():
                status = self.status
                if status in ("running", "stopped", "paused"):
                    break
                if done:
                    why = runtime_error(self._log) or self._stderr_tail()
                    raise CocoonTestError(f"cocoon could not run {self.name}: {why}")
            if time.monotonic() > deadline:
                self.proc.kill()
                self.proc.wait()
                raise CocoonTestError(f"{self.name} was not running after {timeout:.0f} s")
            time.sleep(0.05)
        with contextlib.suppress(CocoonError, OSError):
            self.sandbox_id = Store(self.rt.root).load(self.id).sandbox_id
        if self.owns_vm and self.sandbox_id:
            self.vm_dir = paths.sandbox_dir(self.rt.root, self.sandbox_id)

    @property
    def pooled(self) -> bool:
        """Whether its VM was a pre-booted one claimed from the pool (a warm start)."""
        return self.vm_dir is not None and self.vm_dir.parent.name == "pool"

    def _stderr_tail(self) -> str:
        text = self.stderr()
        return text.strip().splitlines()[-1] if text.strip() else "(no error logged)"

    @property
    def status(self) -> str:
        """created, running, paused, stopped; or "removed"."""
        if self.removed:
            return "removed"
        r, _ = self.rt.call("state", self.id, timeout=60)
        if r.returncode:
            return "removed"
        return str(json.loads(r.stdout)["status"])

    @property
    def pid(self) -> int:
        """The container's pid on the host (its shim's, as runc's callers see it)."""
        return Store(self.rt.root).load(self.id).pid

    def exec(
        self,
        cmd: str | list[str] | tuple[str, ...],
        *,
        input: bytes | str | None = None,
        env: dict[str, Any] | None = None,
        cwd: str | None = None,
        user: str | None = None,
        timeout: float = 120.0,
        check: bool = False,
    ) -> ExecResult:
        """Runs ``cmd`` in the container; its exit code, stdout and stderr. A string runs
        under ``sh -c``. ``check`` turns a non-zero exit into a CocoonTestError. A command the
        runtime cannot start (not found, the container not running) is a CocoonTestError."""
        __tracebackhide__ = True
        argv = _command(cmd)
        assert argv is not None
        flags: list[str] = []
        for k, v in (env or {}).items():
            flags += ["--env", f"{k}={v}"]
        if cwd:
            flags += ["--cwd", cwd]
        if user:
            flags += ["--user", user]
        data = input.encode() if isinstance(input, str) else input
        try:
            r, error = self.rt.call("exec", *flags, self.id, *argv, input=data, timeout=timeout)
        except subprocess.TimeoutExpired:
            raise CocoonTestError(
                f"exec {argv!r} in {self.name}: no exit after {timeout:.0f} s"
            ) from None
        if error:
            raise CocoonTestError(f"exec {argv!r} in {self.name}: {error}")
        res = ExecResult(
            r.returncode,
            r.stdout.decode(errors="replace"),
            r.stderr.decode(errors="replace"),
            r.stdout,
        )
        if check and not res.ok:
            raise CocoonTestError(f"exec {argv!r} in {self.name}: {res}")
        return res

    def copy_in(self, src: str | Path, dst: str) -> None:
        """Copies a host file or directory to path ``dst`` in the container (its parent is
        made). Needs ``sh``, ``mkdir`` and ``tar`` in the image (busybox has them)."""
        __tracebackhide__ = True
        src = Path(src)
        if not src.exists():
            raise CocoonTestError(f"copy_in: {src} does not exist")
        if not dst.startswith("/") or dst.rstrip("/") == "":
            raise CocoonTestError(f"copy_in: {dst!r} is not an absolute path below /")
        parent, base = os.path.split(dst.rstrip("/"))
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w") as tar:
            tar.add(src, arcname=base)
        script = 'mkdir -p "$1" && tar -x -f - -C "$1"'
        self.exec(["sh", "-c", script, "copy_in", parent or "/"], input=buf.getvalue(), check=True)

    def copy_out(self, src: str, dst: str | Path) -> Path:
        """Copies file or directory ``src`` of the container to host path ``dst``; returns
        ``dst``. Needs ``tar`` in the image. Links and special files pointing out of ``dst``
        are refused (tarfile's data filter): the container's output is untrusted."""
        __tracebackhide__ = True
        dst = Path(dst)
        parent, base = os.path.split(src.rstrip("/"))
        if not src.startswith("/") or not base:
            raise CocoonTestError(f"copy_out: {src!r} is not an absolute path below /")
        r = self.exec(["tar", "-c", "-f", "-", "-C", parent or "/", base])
        if not r.ok:
            raise CocoonTestError(f"copy_out {src} from {self.name}: {r.stderr.strip()}")
        with tempfile.TemporaryDirectory(dir=dst.parent if dst.parent.exists() else None) as t:
            with tarfile.open(fileobj=io.BytesIO(r.stdout_bytes)) as tar:
                tar.extractall(t, filter="data")
            shutil.move(os.path.join(t, base), dst)
        return dst

    def stdout(self) -> str:
        """What the workload wrote to stdout so far."""
        return _read(self.bundle.parent / f"{self.bundle.name}.out")

    def stderr(self) -> str:
        return _read(self.bundle.parent / f"{self.bundle.name}.err")

    def logs(self) -> str:
        """The workload's stdout, then its stderr."""
        return self.stdout() + self.stderr()

    def kill(self, sig: str | int = "TERM") -> None:
        __tracebackhide__ = True
        try:
            parse_signal(str(sig))
        except CocoonError as exc:
            raise CocoonTestError(f"kill {self.name}: {exc}") from None
        r, error = self.rt.call("kill", self.id, str(sig), timeout=60)
        if r.returncode:
            raise CocoonTestError(f"kill {self.name}: {error or r.stderr.decode().strip()}")

    def wait(self, timeout: float | None = 60.0) -> int:
        """Waits for the workload to exit; its exit status (128+n for signal n)."""
        __tracebackhide__ = True
        assert self.proc is not None
        try:
            rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise CocoonTestError(f"{self.name} still runs after {timeout} s") from None
        return 128 - rc if rc < 0 else rc

    def diagnostics(self) -> dict[str, str]:
        """The tails of what tells why a test failed: the workload's stdout and stderr, the
        VM's console, the guest agent's log and the monitor's log."""
        out = {"stdout": _tail(self.stdout()), "stderr": _tail(self.stderr())}
        vm = self.vm_dir or (self.pod.sandbox.vm_dir if self.pod and self.pod.sandbox else None)
        if vm is not None:
            out |= vm_logs(vm)
        return {k: v for k, v in out.items() if v.strip()}

    def remove(self) -> list[str]:
        """Deletes the container (and, for a pod's sandbox, the pod's VM); then what it left:
        processes, mounts, state, host cgroups, cocoon's devices in its namespace."""
        if self.removed:
            return []
        self.removed = True
        problems: list[str] = []
        r, error = self.rt.call("delete", "--force", self.id, timeout=120)
        if r.returncode:
            problems.append(f"delete {self.id}: {error or r.stderr.decode().strip()}")
        if self.proc is not None:
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                problems.append(f"cocoon run {self.id} did not exit after its delete")
        problems += self.leaks()
        if self.network is not None:
            self.network.detach(self.id)
        shutil.rmtree(self.bundle.parent, ignore_errors=True)
        return problems

    def leaks(self) -> list[str]:
        root = self.rt.root
        found = [f"process left: {p}" for p in leaks.processes_left(f" {self.id} ")]
        left = [root / "containers" / self.id, root / "netns" / self.id]
        if self.owns_vm and self.sandbox_id:
            left.append(paths.sandbox_path(root, self.sandbox_id))
        if self.vm_dir is not None:
            found += [f"process left: {p}" for p in leaks.processes_left(f"{self.vm_dir}/")]
            found += [f"mount left: {m}" for m in leaks.mounts_under(self.vm_dir)]
            found += [
                f"host cgroup left: {g}"
                for g in leaks.sandbox_cgroups(exact=leaks.SANDBOX_CGROUP_PREFIX + self.sandbox_id)
            ]
            left.append(self.vm_dir)
        found += [f"state left: {p}" for p in left if os.path.lexists(p)]
        found += [f"mount left: {m}" for m in leaks.mounts_under(self.bundle)]
        if self.network is not None and self.owns_vm:
            found += [f"netns device left: {d}" for d in self.network.leftovers(self.id)]
        return found


def vm_logs(vm: Path, lines: int = LOG_TAIL) -> dict[str, str]:
    """The tails of a VM's logs, from its state directory: the console without the agent's
    lines, the agent's log (its lines on the console) and the monitor's log."""
    console = _read(vm / "console.log").splitlines()
    agent = [x for x in console if x.startswith("cocoon-agent:")]
    rest = [x for x in console if not x.startswith("cocoon-agent:")]
    return {
        "console": _tail("\n".join(rest), lines),
        "agent log": _tail("\n".join(agent), lines),
        "monitor log": _tail(_read(vm / "monitor.log"), lines),
    }


def _read(p: Path) -> str:
    try:
        return p.read_bytes().decode(errors="replace")
    except OSError:
        return ""


def _tail(text: str, lines: int = LOG_TAIL) -> str:
    return "\n".join(text.splitlines()[-lines:])


class Pod:
    """Containers in one VM sharing the pod's network (127.0.0.1 between them, one address
    on its network), IPC and hostname, as a Kubernetes pod on cocoon is."""

    def __init__(self, owner: Cocoon, name: str) -> None:
        self.owner, self.name = owner, name
        self.sandbox: Container | None = None
        self.containers: list[Container] = []

    def __repr__(self) -> str:
        return f"<cocoon pod {self.name}>"

    @property
    def ip(self) -> str | None:
        return self.sandbox.ip if self.sandbox else None

    @property
    def id(self) -> str:
        return self.sandbox.id if self.sandbox else ""

    def run(
        self,
        image: str | Path | None = None,
        cmd: str | list[str] | None = None,
        *,
        name: str = "c",
        cpus: float | None = None,
        memory: int | str | None = None,
        privileged: bool = False,
        env: dict[str, Any] | None = None,
        cwd: str | None = None,
        readonly: bool = False,
        timeout: float = 300.0,
    ) -> Container:
        """A container in the pod's VM (the pod's network, IPC and hostname)."""
        __tracebackhide__ = True
        if self.sandbox is None or self.sandbox.removed:
            raise CocoonTestError(f"pod {self.name} is removed")
        opts = Options.make(cpus, memory, privileged, None, env, cwd, None, readonly)
        c = self.owner._launch(name, image, _command(cmd), opts, None, self, timeout)
        self.containers.append(c)
        return c

    def remove(self) -> list[str]:
        """Its containers, then the sandbox (the VM)."""
        problems: list[str] = []
        for c in reversed(self.containers):
            problems += c.remove()
        if self.sandbox is not None:
            problems += self.sandbox.remove()
        return problems


class Cocoon:
    """What the ``cocoon`` fixtures hand a test: containers, pods and networks that are all
    removed (and checked for leaks) when the fixture's scope ends."""

    def __init__(self, rt: Runtime, label: str = "") -> None:
        self.rt, self.label = rt, label
        self.failed = False  # a test using it failed (the plugin's report hook sets it)
        self._items: list[Container | Pod | Network] = []
        self._lock = threading.Lock()

    def containers(self) -> list[Container]:
        """Every container made here, pod members included, oldest first."""
        out: list[Container] = []
        for item in self._items:
            if isinstance(item, Container):
                out.append(item)
            elif isinstance(item, Pod):
                out += [c for c in (item.sandbox, *item.containers) if c is not None]
        return out

    def network(self, name: str = "net") -> Network:
        """A private network: containers and pods given it reach each other by ``ip``."""
        __tracebackhide__ = True
        nid = self.rt.new_id(name)
        net = Network(self.rt.work / "networks" / nid, name)
        self._add(net)
        return net

    def run(
        self,
        image: str | Path | None = None,
        cmd: str | list[str] | None = None,
        *,
        name: str = "c",
        cpus: float | None = None,
        memory: int | str | None = None,
        privileged: bool = False,
        sysctls: dict[str, Any] | None = None,
        network: Network | None = None,
        env: dict[str, Any] | None = None,
        cwd: str | None = None,
        hostname: str | None = None,
        readonly: bool = False,
        timeout: float = 300.0,
    ) -> Container:
        """A running container in a VM of its own. ``image``: None (busybox), an OCI bundle
        or a root filesystem directory. ``cmd``: an argv list or a shell string (default: a
        long sleep, to exec into). ``network``: None (loopback only) or a ``network()``."""
        __tracebackhide__ = True
        opts = Options.make(cpus, memory, privileged, sysctls, env, cwd, hostname, readonly)
        c = self._launch(name, image, _command(cmd), opts, network, None, timeout)
        self._add(c)
        return c

    def pod(
        self,
        *,
        name: str = "pod",
        cpus: float | None = None,
        memory: int | str | None = None,
        sysctls: dict[str, Any] | None = None,
        network: Network | None = None,
        hostname: str | None = None,
        timeout: float = 300.0,
    ) -> Pod:
        """A pod: its sandbox boots the VM; ``pod.run()`` adds containers to it."""
        __tracebackhide__ = True
        opts = Options.make(cpus, memory, False, sysctls, None, None, hostname or name, False)
        pod = Pod(self, name)
        pod.sandbox = self._launch(name, None, FOREVER, opts, network, pod, timeout)
        self._add(pod)
        return pod

    def _add(self, item: Container | Pod | Network) -> None:
        with self._lock:
            self._items.append(item)

    def _launch(
        self,
        name: str,
        image: str | Path | None,
        cmd: list[str] | None,
        opts: Options,
        network: Network | None,
        pod: Pod | None,
        timeout: float,
    ) -> Container:
        __tracebackhide__ = True
        if network is not None and not isinstance(network, Network):
            raise CocoonTestError(f"network={network!r}: None or a cocoon.network()")
        cid = self.rt.new_id(name)
        bundle = self.rt.work / "containers" / cid / "bundle"
        c: Container | None = None
        try:
            spec = write_bundle(bundle, image, cmd, opts)
            ip = None
            if pod is not None and pod.sandbox is not None:  # a member: the sandbox's namespaces
                sandbox = pod.sandbox
                spec.pop("hostname", None)
                spec["annotations"] = {
                    **spec.get("annotations", {}),
                    CRI_TYPE: "container",
                    CRI_SANDBOX: sandbox.id,
                }
                for kind, ns in (("network", "net"), ("ipc", "ipc"), ("uts", "uts")):
                    _set_namespace(spec, kind, f"/proc/{sandbox.pid}/ns/{ns}")
                ip = sandbox.ip
            else:
                if pod is not None:
                    spec["annotations"] = {
                        **spec.get("annotations", {}),
                        CRI_TYPE: "sandbox",
                        CRI_SANDBOX: cid,
                    }
                try:
                    ep = network.attach(cid) if network is not None else None
                except ValueError as exc:
                    raise CocoonTestError(str(exc)) from None
                _set_namespace(spec, "network", str(ep.netns) if ep else None)
                ip = ep.ip if ep else None
            (bundle / "config.json").write_text(json.dumps(spec, indent=1))
            c = Container(self.rt, cid, name, bundle, ip, network, pod)
            c._start(timeout)
            return c
        except BaseException as exc:
            left = c.remove() if c is not None else []
            if network is not None:
                network.detach(cid)
            shutil.rmtree(bundle.parent, ignore_errors=True)
            if left and isinstance(exc, CocoonTestError):
                raise CocoonTestError(f"{exc}; and it left: {'; '.join(left)}") from None
            raise

    def close(self, keep: bool = False) -> list[str]:
        """Removes everything made here, newest first; what any of it left behind. With
        ``keep`` nothing is removed (the test failed and ``--cocoon-keep`` was given)."""
        if keep:
            return []
        problems: list[str] = []
        with self._lock:
            items, self._items = list(reversed(self._items)), []
        for item in items:
            if isinstance(item, Network):
                item.close()
            else:
                problems += item.remove()
        return problems

    def keep_hints(self) -> list[str]:
        """How to reach each container left up."""
        return [f"{c.name}: {self.rt.exec_hint(c.id)}" for c in self.containers() if not c.removed]
