"""Real callers of cocoon for the integration tests: a private containerd, dockerd and podman,
each started with its own state dirs, sockets and data root under a pytest tmp dir, plus the
image plumbing (a busybox rootfs as a layer tar, an OCI image archive for ``ctr images import``)
and a leak check of cocoon's own processes, mounts and state under a state root.

Nothing here touches the host's default daemons: every caller gets absolute paths to its own
binary and explicit paths for every piece of state it would otherwise put in /var or /run
(containerd's shim sockets under /run/containerd/s are named by a hash of the private address).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import pty
import resource
import select
import shutil
import signal
import subprocess
import tarfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from cocoon.runtime.container import busybox
from cocoon.testing.leaks import live_processes, sandbox_cgroups

COCOON = "/usr/local/bin/cocoon"
CONTAINERD = "/usr/bin/containerd"
CONTAINERD_SHIM = "/usr/bin/containerd-shim-runc-v2"
CTR = "/usr/bin/ctr"
DOCKERD = "/usr/sbin/dockerd"
NSENTER = "/usr/bin/nsenter"
DOCKER = "/usr/bin/docker"  # Debian's docker.io client (/usr/local/bin may hold another one)
PODMAN = "/usr/bin/podman"
CONMON = "/usr/bin/conmon"
RUNC = "/usr/sbin/runc"
SCRIPT = "/usr/bin/script"
PODMAN_ROOT = Path("/run/cocoon")  # podman passes no --root: cocoon's default state root

# What each caller needs on the host, by the Debian package that ships it.
NEEDS: dict[str, dict[str, str]] = {
    "containerd": {CONTAINERD: "containerd", CONTAINERD_SHIM: "containerd", CTR: "containerd"},
    # dockerd runs on the tests' private containerd (started and checked with ctr).
    "dockerd": {
        DOCKERD: "docker.io",
        DOCKER: "docker.io",
        CONTAINERD: "containerd",
        CONTAINERD_SHIM: "containerd",
        CTR: "containerd",
    },
    "podman": {PODMAN: "podman", CONMON: "conmon"},
    # CRI-O itself, pinns and crictl are not Debian's (tests/integration/crio.py finds them).
    "crio": {
        CONMON: "conmon",
        RUNC: "runc",
        "/usr/lib/cni/bridge": "containernetworking-plugins",
        "/usr/lib/cni/host-local": "containernetworking-plugins",
        "/usr/lib/cni/loopback": "containernetworking-plugins",
    },
}
# cocoon's own processes, as they appear in /proc/*/cmdline.
COCOON_PROCESSES = ("qemu-system", "cocoon.runtime.monitor", "cocoon.shim", "virtiofsd")


def missing(caller: str) -> str:
    """Why ``caller`` cannot run here ("" if it can): the first missing binary."""
    for path, package in NEEDS[caller].items():
        if not os.access(path, os.X_OK):
            return f"needs {path} (Debian package {package}; COCOON_DEV=1 scripts/setup)"
    if not os.access(COCOON, os.X_OK):
        return f"needs {COCOON} (scripts/setup)"
    return ""


def run(
    argv: Sequence[str | Path],
    *,
    timeout: float = 120,
    input: str | None = None,
    env: dict[str, str] | None = None,
) -> subprocess.CompletedProcess[str]:
    """Runs a command to completion with a timeout, capturing text output."""
    return subprocess.run(
        [str(a) for a in argv],
        capture_output=True,
        text=True,
        timeout=timeout,
        input=input,
        stdin=None if input is not None else subprocess.DEVNULL,
        env=env,
    )


def wait_for(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(0.2)


def run_pty(
    argv: Sequence[str | Path],
    send: bytes = b"",
    *,
    prompt: bytes = b"# ",
    timeout: float = 120,
    env: dict[str, str] | None = None,
) -> tuple[int, str]:
    """Runs ``argv`` with a pseudo-terminal as its stdin/stdout/stderr (a session of its own, the
    pty its controlling terminal, as under a terminal emulator), writes ``send`` once the output
    shows ``prompt`` (or after 20 s), and returns (exit status, everything printed)."""
    pid, fd = pty.fork()
    if pid == 0:  # child: exec at once, nothing else (pty.fork made us a session leader)
        try:
            os.execve(str(argv[0]), [str(a) for a in argv], dict(env or os.environ, TERM="xterm"))
        finally:
            os._exit(127)
    out = bytearray()
    deadline = time.monotonic() + timeout
    sent = False
    started = time.monotonic()
    status: int | None = None
    try:
        while time.monotonic() < deadline:
            if not sent and (prompt in out or time.monotonic() - started > 20):
                if send:
                    os.write(fd, send)
                sent = True
            ready, _, _ = select.select([fd], [], [], 0.2)
            if ready:
                try:
                    chunk = os.read(fd, 4096)
                except OSError:  # EIO: the other side closed
                    chunk = b""
                if not chunk:
                    break
                out += chunk
            done, st = os.waitpid(pid, os.WNOHANG)
            if done:
                status = st
                with contextlib.suppress(OSError):  # drain what is left
                    while select.select([fd], [], [], 0.2)[0] and (c := os.read(fd, 4096)):
                        out += c
                break
        if status is None:
            if time.monotonic() >= deadline:
                os.kill(pid, signal.SIGKILL)
            _, status = os.waitpid(pid, 0)
    finally:
        os.close(fd)
    return os.waitstatus_to_exitcode(status), out.decode(errors="replace")


def leaks(state_root: Path, *extra: Path) -> list[str]:
    """What cocoon left behind for ``state_root``: its processes (QEMU, monitor, shim,
    virtiofsd, anything naming the root or ``extra`` dirs), mounts under it, and state dirs."""
    found: list[str] = []
    needles = [str(state_root), *(str(e) for e in extra)]
    for pid, cmd in live_processes():
        if any(p in cmd for p in COCOON_PROCESSES) and any(n in cmd for n in needles):
            found.append(f"process {pid}: {cmd[:200]}")
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        point = line.split()[4]
        if point == str(state_root) or point.startswith(str(state_root) + "/"):
            found.append(f"mount {point}")
    for sub in ("containers", "sandboxes"):
        d = state_root / sub
        if d.is_dir():
            found += [f"state {p}" for p in sorted(d.iterdir())]
    found += [f"host cgroup {c}" for c in sandbox_cgroups()]
    return found


def assert_no_leaks(state_root: Path, *extra: Path, timeout: float = 20) -> None:
    """Waits (callers clean up asynchronously) and then asserts that nothing is left."""
    deadline = time.monotonic() + timeout
    while leaks(state_root, *extra) and time.monotonic() < deadline:
        time.sleep(0.25)
    left = leaks(state_root, *extra)
    assert not left, f"left behind under {state_root}: {left}"


# ---- images -----------------------------------------------------------------------------


def layer_tar(rootfs: Path, out: Path) -> Path:
    """An uncompressed tar of ``rootfs`` (owned by root, symlinks kept): one image layer."""

    def as_root(info: tarfile.TarInfo) -> tarfile.TarInfo:
        info.uid = info.gid = 0
        info.uname = info.gname = "root"
        return info

    with tarfile.open(out, "w", format=tarfile.PAX_FORMAT) as tar:
        for entry in sorted(rootfs.rglob("*")):
            tar.add(entry, arcname=str(entry.relative_to(rootfs)), recursive=False, filter=as_root)
    return out


def busybox_rootfs(dest: Path) -> Path:
    return busybox.make_rootfs(dest)


def _blob(tar: tarfile.TarFile, data: bytes) -> dict[str, Any]:
    digest = hashlib.sha256(data).hexdigest()
    info = tarfile.TarInfo(f"blobs/sha256/{digest}")
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))
    return {"digest": f"sha256:{digest}", "size": len(data)}


def _add_file(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def oci_archive(layer: Path, out: Path, name: str, cmd: Sequence[str] = ("/bin/sh",)) -> Path:
    """An OCI image layout tarball (oci-layout, index.json, blobs/) of one layer, named ``name``
    (a full reference such as docker.io/library/busybox:cocoon), for ``ctr images import``."""
    layer_bytes = layer.read_bytes()
    layer_digest = "sha256:" + hashlib.sha256(layer_bytes).hexdigest()
    config = {
        "architecture": "amd64",
        "os": "linux",
        "config": {"Env": ["PATH=/bin:/usr/bin"], "Cmd": list(cmd), "WorkingDir": "/"},
        "rootfs": {"type": "layers", "diff_ids": [layer_digest]},
        "history": [{"created_by": "cocoon tests: busybox.make_rootfs"}],
    }
    with tarfile.open(out, "w") as tar:
        _add_file(tar, "oci-layout", json.dumps({"imageLayoutVersion": "1.0.0"}).encode())
        config_desc = _blob(tar, json.dumps(config).encode())
        layer_desc = _blob(tar, layer_bytes)
        manifest = {
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json", **config_desc},
            "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar", **layer_desc}],
        }
        manifest_desc = _blob(tar, json.dumps(manifest).encode())
        index = {
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.index.v1+json",
            "manifests": [
                {
                    "mediaType": "application/vnd.oci.image.manifest.v1+json",
                    **manifest_desc,
                    "platform": {"architecture": "amd64", "os": "linux"},
                    "annotations": {
                        "io.containerd.image.name": name,
                        "org.opencontainers.image.ref.name": name.rsplit(":", 1)[1],
                    },
                }
            ],
        }
        _add_file(tar, "index.json", json.dumps(index).encode())
    return out


# ---- daemons ----------------------------------------------------------------------------


@dataclass
class Daemon:
    """A daemon process started by the tests, its log file, and how to tell it is up."""

    name: str
    proc: subprocess.Popen[bytes]
    log: Path
    log_file: IO[bytes] = field(repr=False)

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def check_alive(self) -> None:
        if self.proc.poll() is not None:
            raise RuntimeError(
                f"{self.name} exited with {self.proc.returncode}:\n{self.log_tail()}"
            )

    def stop(self, timeout: float = 30) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.log_file.close()


def start_daemon(
    name: str,
    argv: Sequence[str | Path],
    log: Path,
    ready: Callable[[], bool],
    *,
    timeout: float = 60,
    env: dict[str, str] | None = None,
) -> Daemon:
    log_file = log.open("ab")
    proc = subprocess.Popen(
        [str(a) for a in argv],
        stdin=subprocess.DEVNULL,
        stdout=log_file,
        stderr=subprocess.STDOUT,
        env=env,
        start_new_session=True,
    )
    d = Daemon(name, proc, log, log_file)

    def up() -> bool:
        d.check_alive()
        return ready()

    try:
        wait_for(up, timeout, f"{name} to serve (log {log})")
    except BaseException:
        d.stop()
        raise
    return d


def pids_mentioning(needle: str) -> list[int]:
    """Live processes whose command line contains ``needle`` (a private path of the tests)."""
    return [pid for pid, cmd in live_processes() if needle in cmd]


def kill_stragglers(needle: str) -> list[int]:
    """SIGKILLs what is still running with ``needle`` (a private path) in its command line: only
    processes the tests' own daemons started. Returns their pids (for the report)."""
    pids = pids_mentioning(needle)
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    return pids


def unmount_under(path: Path) -> None:
    """Lazily unmounts whatever is still mounted under ``path`` (deepest first)."""
    points = [
        line.split()[4]
        for line in Path("/proc/self/mountinfo").read_text().splitlines()
        if line.split()[4].startswith(str(path) + "/")
    ]
    for p in sorted(points, key=len, reverse=True):
        subprocess.run(["umount", "-l", p], capture_output=True, timeout=30)


def _socket_ok(path: Path) -> bool:
    return path.is_socket()


@dataclass
class Containerd:
    """A private containerd: its own root, state, gRPC/ttrpc/debug sockets; CRI disabled."""

    base: Path
    daemon: Daemon

    @property
    def address(self) -> Path:
        return self.base / "containerd.sock"

    @property
    def runc_root(self) -> Path:
        """What ctr gives the runc shim as ``--runc-root``; the shim passes cocoon
        ``--root <runc-root>/<namespace>``."""
        return self.base / "cocoon"

    def ctr(
        self, *args: str | Path, timeout: float = 120, input: str | None = None
    ) -> subprocess.CompletedProcess[str]:
        self.daemon.check_alive()
        return run([CTR, "--address", self.address, *args], timeout=timeout, input=input)


def containerd_config(base: Path, cri: Sequence[str] = ()) -> Path:
    """A private containerd's config.toml: its own root, state and sockets under ``base``.
    Without ``cri`` (the CRI plugin's tables, tests/integration/cri.py) the CRI plugin is off:
    it wants a CNI set-up and a sandbox image, and the ctr/docker/podman tests need neither."""
    conf = base / "config.toml"
    conf.write_text(
        "\n".join(
            [
                "version = 2",
                f'root = "{base}/root"',
                f'state = "{base}/state"',
                *([] if cri else ['disabled_plugins = ["io.containerd.grpc.v1.cri"]']),
                "[grpc]",
                f'  address = "{base}/containerd.sock"',
                "[ttrpc]",
                f'  address = "{base}/containerd.sock.ttrpc"',
                "[debug]",
                f'  address = "{base}/debug.sock"',
                "[metrics]",
                '  address = ""',
                *cri,
                "",
            ]
        )
    )
    return conf


def start_containerd(base: Path) -> Containerd:
    base.mkdir(parents=True, exist_ok=True)
    conf = containerd_config(base)
    sock = base / "containerd.sock"
    d = start_daemon(
        "containerd",
        [CONTAINERD, "--config", conf, "--log-level", "info"],
        base / "containerd.log",
        lambda: (
            _socket_ok(sock)
            and run([CTR, "--address", sock, "version"], timeout=10).returncode == 0
        ),
    )
    return Containerd(base, d)


def stop_containerd(c: Containerd) -> None:
    """Removes every task and container left in every namespace, then stops the daemon."""
    if c.daemon.proc.poll() is None:
        namespaces = c.ctr("namespaces", "list", "-q", timeout=30).stdout.split()
        for ns in namespaces:
            for task in c.ctr("-n", ns, "tasks", "list", "-q", timeout=30).stdout.split():
                c.ctr("-n", ns, "tasks", "kill", "-s", "SIGKILL", task, timeout=30)
                c.ctr("-n", ns, "tasks", "delete", "-f", task, timeout=60)
            for cont in c.ctr("-n", ns, "containers", "list", "-q", timeout=30).stdout.split():
                c.ctr("-n", ns, "containers", "delete", cont, timeout=60)
    c.daemon.stop()
    kill_stragglers(str(c.address))  # shims: `containerd-shim-runc-v2 ... -address ADDR`
    unmount_under(c.base)


@contextlib.contextmanager
def containerd(base: Path) -> Iterator[Containerd]:
    c = start_containerd(base)
    try:
        yield c
    finally:
        stop_containerd(c)


def remove_tree(path: Path) -> None:
    unmount_under(path)
    shutil.rmtree(path, ignore_errors=True)


@dataclass
class Dockerd:
    """A private dockerd on a private containerd: own data root, exec root, pid file, socket;
    no bridge, no iptables; cocoon added as runtime ``cocoon``."""

    base: Path
    daemon: Daemon
    namespace: str = "moby"  # dockerd's containerd namespace

    @property
    def host(self) -> str:
        return f"unix://{self.base}/docker.sock"

    @property
    def exec_root(self) -> Path:
        return self.base / "x"

    @property
    def runtime_root(self) -> Path:
        """The --root dockerd 20.10 gives all runtimes: <exec-root>/runtime-runc/<namespace>."""
        return self.exec_root / "runtime-runc" / self.namespace

    def docker(
        self, *args: str | Path, timeout: float = 120, input: str | None = None
    ) -> subprocess.CompletedProcess[str]:
        self.daemon.check_alive()
        return run([DOCKER, "-H", self.host, *args], timeout=timeout, input=input, env=DOCKER_ENV)


# The client reads no ~/.docker config and asks no one else.
DOCKER_ENV = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "DOCKER_CONFIG": "/nonexistent"}


def start_dockerd(base: Path, containerd_address: Path, netns: Path | None = None) -> Dockerd:
    """``netns``: run dockerd in that network namespace with its default bridge network,
    iptables and userland proxy (as dockerd runs on a host), on containerd namespace
    ``mb``; without it, no bridge and no iptables."""
    base.mkdir(parents=True, exist_ok=True)
    conf = base / "daemon.json"
    conf.write_text("{}\n")  # not /etc/docker/daemon.json
    sock = base / "docker.sock"
    if netns is not None:
        prefix: list[str | Path] = [NSENTER, f"--net={netns}"]
        net_flags: list[str | Path] = ["--containerd-namespace", "mb"]
    else:
        prefix = []
        net_flags = ["--bridge=none", "--iptables=false", "--ip-masq=false"]
        net_flags.append("--userland-proxy=false")
    d = start_daemon(
        "dockerd",
        [
            *prefix,
            DOCKERD,
            "--config-file",
            conf,
            "--data-root",
            base / "data",
            "--exec-root",
            base / "x",
            "--pidfile",
            base / "docker.pid",
            "-H",
            f"unix://{sock}",
            "--containerd",
            containerd_address,
            *net_flags,
            "--storage-driver",
            "overlay2",
            "--add-runtime",
            f"cocoon={COCOON}",
        ],
        base / "dockerd.log",
        lambda: (
            sock.is_socket()
            and run([DOCKER, "-H", f"unix://{sock}", "info"], timeout=20, env=DOCKER_ENV).returncode
            == 0
        ),
        env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin"},
    )
    return Dockerd(base, d, "mb" if netns is not None else "moby")


def stop_dockerd(dk: Dockerd) -> None:
    if dk.daemon.proc.poll() is None:
        ids = dk.docker("ps", "-aq", timeout=30).stdout.split()
        if ids:
            dk.docker("rm", "-f", *ids, timeout=120)
    dk.daemon.stop(60)
    unmount_under(dk.base)


@contextlib.contextmanager
def dockerd(base: Path, containerd_address: Path, netns: Path | None = None) -> Iterator[Dockerd]:
    dk = start_dockerd(base, containerd_address, netns)
    try:
        yield dk
    finally:
        stop_dockerd(dk)


@dataclass
class Podman:
    """podman with everything private: storage (--root/--runroot), --tmpdir, events file, CNI
    config dir, and its containers.conf/storage.conf/registries.conf given by environment.
    podman passes cocoon no --root: cocoon keeps state in its default, /run/cocoon."""

    base: Path

    @property
    def env(self) -> dict[str, str]:
        return {
            "PATH": "/usr/sbin:/usr/bin:/sbin:/bin",
            "HOME": str(self.base),
            "CONTAINERS_CONF": str(self.base / "containers.conf"),
            "CONTAINERS_STORAGE_CONF": str(self.base / "storage.conf"),
            "CONTAINERS_REGISTRIES_CONF": str(self.base / "registries.conf"),
        }

    @property
    def argv(self) -> list[str]:
        b = self.base
        return [
            PODMAN,
            "--root", f"{b}/root",
            "--runroot", f"{b}/runroot",
            "--tmpdir", f"{b}/tmp",
            "--runtime", COCOON,
            "--cgroup-manager", "cgroupfs",
            "--events-backend", "file",
        ]  # fmt: skip

    def podman(
        self, *args: str | Path, timeout: float = 120, input: str | None = None
    ) -> subprocess.CompletedProcess[str]:
        return run([*self.argv, *args], timeout=timeout, input=input, env=self.env)


def podman_config(base: Path) -> Podman:
    """Writes the private configuration. Quirks of these hosts: no CAP_SYS_RESOURCE, so the
    default ulimits must stay within the host's hard limits (podman's own default raises
    nofile to 1048576 and the container fails to start)."""
    base.mkdir(parents=True, exist_ok=True)
    (base / "tmp").mkdir(exist_ok=True)
    (base / "net").mkdir(exist_ok=True)
    nofile = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    nproc = resource.getrlimit(resource.RLIMIT_NPROC)[1]
    limits = [f"nofile={nofile}:{nofile}"] + ([f"nproc={nproc}:{nproc}"] if nproc > 0 else [])
    (base / "containers.conf").write_text(
        "\n".join(
            [
                "[containers]",
                f"default_ulimits = {json.dumps(limits)}",
                'log_driver = "k8s-file"',
                "[engine]",
                'cgroup_manager = "cgroupfs"',
                'events_logger = "file"',
                f'events_logfile_path = "{base}/events.log"',
                f'tmp_dir = "{base}/tmp"',
                "[network]",
                'network_backend = "cni"',
                f'network_config_dir = "{base}/net"',
                "",
            ]
        )
    )
    (base / "storage.conf").write_text(
        f'[storage]\ndriver = "overlay"\ngraphroot = "{base}/root"\nrunroot = "{base}/runroot"\n'
    )
    (base / "registries.conf").write_text("")
    return Podman(base)


def stop_podman(pm: Podman) -> None:
    """Removes every container and image, then unmounts what storage left mounted."""
    pm.podman("rm", "-af", "-t", "5", timeout=180)
    pm.podman("rmi", "-af", timeout=60)
    unmount_under(pm.base)
    kill_stragglers(str(pm.base))  # conmon processes of ours, if any survived


@contextlib.contextmanager
def podman(base: Path) -> Iterator[Podman]:
    pm = podman_config(base)
    try:
        yield pm
    finally:
        stop_podman(pm)
