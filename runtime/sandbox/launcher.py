"""Starting, reaching and stopping a sandbox (one VM under one monitor process).

``start()`` resolves the guest image, accel and channel, writes the launch file, has the
monitor started in its own session (sandbox.spawn: forked by the state root's fork server, or
a fresh interpreter, a child of the caller), and waits for the monitor's one-line ready report
(``client.Client`` then reaches it).
``stop()`` asks for an orderly shutdown and waits until the monitor and its state directory
are gone.

May import: the standard library, cocoon.guest_image, cocoon.runtime.{config, errors,
monitor.{hostcgroup, launch, qemuuser}, pids, network.record (lazily)},
cocoon.runtime.sandbox.{client, hostmount, paths, probe, qemu_argv, spawn}.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import json
import os
import random
import signal
import subprocess
from dataclasses import dataclass
from pathlib import Path

from cocoon.guest_image import build as image_build
from cocoon.runtime.config import Config
from cocoon.runtime.errors import CocoonError, HostError, SandboxError, StateError
from cocoon.runtime.monitor import hostcgroup, qemuuser
from cocoon.runtime.monitor import launch as L
from cocoon.runtime.pids import pid_alive, wait_gone
from cocoon.runtime.sandbox import client as client_mod
from cocoon.runtime.sandbox import hostmount, probe, qemu_argv, spawn
from cocoon.runtime.sandbox.paths import sandbox_dir, sandbox_path, sandboxes_dir

# Unix socket paths (sun_path) hold at most 107 bytes; paths.MAX_DIR_NAME keeps the sandbox
# directory's name short, and a --root too long for the sockets below it is refused.
SUN_PATH_MAX = 107
LONGEST_SOCKET = "agent-port.sock"
# A restored VM's RAM (a copy of its template's) lives on tmpfs: guest RAM in a file on disk
# would be written back. The monitor unlinks it as soon as QEMU has it mapped.
CLONE_MEMORY_DIR = Path("/dev/shm")


def clone_memory_file(d: Path) -> Path:
    """Where the VM of state directory ``d`` gets its copy of a template's RAM."""
    name = "cocoon-" + hashlib.sha256(str(d.absolute()).encode()).hexdigest()[:20] + ".mem"
    return CLONE_MEMORY_DIR / name if CLONE_MEMORY_DIR.is_dir() else d / "memory"


def check_socket_room(d: Path) -> None:
    longest = len(str(d / LONGEST_SOCKET).encode())
    if longest > SUN_PATH_MAX:
        raise HostError(
            f"state root {d.parent.parent} is too long: socket paths under it would take "
            f"{longest} bytes, unix sockets allow {SUN_PATH_MAX} (use a shorter --root)"
        )


@dataclass(frozen=True)
class GuestFiles:
    kernel: Path
    initrd: Path
    rootfs: Path
    floor_initrd: Path | None


def guest_files(cfg: Config, build_output: object = None) -> GuestFiles:
    """The configured guest files, or the built image (built first when allowed)."""
    im = cfg.image
    if im.kernel:
        files = GuestFiles(Path(im.kernel), Path(im.initrd), Path(im.rootfs), None)
        for p in (files.kernel, files.initrd, files.rootfs):
            if not p.is_file():
                raise HostError(f"guest file {p} (from image.kernel/initrd/rootfs) does not exist")
        return files
    cache = Path(im.cache_dir)
    try:
        target = image_build.image_dir(cache)  # hashes the image's inputs: once a call
        if (target / "manifest.json").exists():
            img = image_build.GuestImage.load(target)
        elif not im.auto_build:
            raise HostError(
                f"guest image not built ({target}) and image.auto_build is off: "
                "run `cocoon image build`"
            )
        else:
            img = image_build.ensure(cache, out=build_output)  # type: ignore[arg-type]
    except image_build.ImageError as exc:
        raise HostError(str(exc)) from exc
    return GuestFiles(img.kernel, img.initrd, img.rootfs, img.floor_initrd)


def meminfo_mib(key: str, default: int) -> int:
    """A /proc/meminfo figure in MiB."""
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith(f"{key}:"):
                return int(line.split()[1]) // 1024
    return default


def host_memory_mib() -> int:
    return meminfo_mib("MemTotal", 4096)


def resolve_host(cfg: Config, files: GuestFiles) -> tuple[str, str, str, bool]:
    """(accel, why, channel, seccomp) for this host."""
    host = probe.RealHost()
    qemu = cfg.hypervisor.path
    if not os.access(qemu, os.X_OK):
        raise HostError(f"QEMU binary {qemu} not found or not executable (hypervisor.path)")

    if files.floor_initrd is None:

        def kvm() -> probe.KvmProbe:
            return probe.KvmProbe(False, "no floor initrd to probe KVM with")
    else:
        kvm = probe.kvm_prober(cfg, host, files.kernel, files.floor_initrd)
    accel, why = probe.resolve_accel(cfg.hypervisor.accel, kvm)
    channel = probe.resolve_channel(cfg.agent.channel, host)
    seccomp = cfg.hypervisor.seccomp_sandbox and probe.seccomp_sandbox_supported(
        host, qemu, probe.default_qemu_cache(cfg)
    )
    return accel, why, channel, seccomp


@dataclass(frozen=True)
class HostFacts:
    """What a boot needs that depends on the host, not on the sandbox: the guest files, the
    accelerator, the agent channel and whether QEMU's seccomp sandbox is on."""

    files: GuestFiles
    accel: str
    channel: str
    seccomp: bool


def host_facts(cfg: Config, build_output: object = None) -> HostFacts:
    files = guest_files(cfg, build_output)
    accel, _why, channel, seccomp = resolve_host(cfg, files)
    return HostFacts(files, accel, channel, seccomp)


@dataclass
class Sandbox:
    sandbox_id: str
    dir: Path
    monitor_pid: int
    boot_seconds: float
    accel: str
    process: spawn.Process | None = None
    pooled: bool = False  # claimed from the pool (sandbox.pool), not booted for it
    restored: bool = False  # restored from a template (sandbox.template), not booted
    restore_failure: str = ""  # why a restore fell back to a cold boot

    def client(self, timeout: float = 30.0) -> client_mod.Client:
        return client_mod.Client(self.dir, timeout)


def start(
    cfg: Config,
    root: Path,
    sandbox_id: str,
    *,
    log_file: Path | None = None,
    log_format: str = "text",
    debug: bool = False,
    build_output: object = None,
    cgroups_path: str = "",
    host: HostFacts | None = None,
    template: Path | None = None,
) -> Sandbox:
    """Boots the sandbox (or restores it from the template directory ``template``); its
    processes run under the parent of ``cgroups_path`` on the host (monitor.hostcgroup),
    when one is given."""
    d = sandbox_path(root, sandbox_id)
    check_socket_room(d)
    host = host or host_facts(cfg, build_output)
    L.drop_dangling(d)  # a claimed pooled VM's link left by a crash
    return boot(
        cfg, d, sandbox_id, host, log_file, log_format, debug, cgroups_path, template=template
    )


def boot(
    cfg: Config,
    d: Path,
    sandbox_id: str,
    host: HostFacts,
    log_file: Path | None = None,
    log_format: str = "text",
    debug: bool = False,
    cgroups_path: str = "",
    pool_key: str = "",
    template: Path | None = None,
    save_to: Path | None = None,
) -> Sandbox:
    """A VM booted in the new state directory ``d`` (an existing one is an error): restored
    from the template directory ``template``, or booted and saved as a template into
    ``save_to`` (the monitor then ends), or plainly booted."""
    d.parent.mkdir(parents=True, exist_ok=True, mode=0o711)
    try:
        d.mkdir(mode=0o700)
    except FileExistsError:
        raise StateError(f"sandbox {sandbox_id} already exists ({d})") from None
    hc = L.HostCgroup()
    try:
        hc = hostcgroup.make(cgroups_path, sandbox_id)
        spec = launch_spec(
            cfg, d, sandbox_id, host, hc, pool_key=pool_key, template=template, save_to=save_to
        )
        spec = dataclasses.replace(
            spec, log_file=str(log_file) if log_file else "", log_format=log_format, debug=debug
        )
        return _launch(cfg, spec, host)
    except hostcgroup.CgroupError as exc:
        _remove_dir(d)
        raise HostError(str(exc)) from None
    except BaseException:
        _remove_dir(d)
        hostcgroup.remove(hc)  # the monitor never got to leave it (it removes it when it does)
        raise


def launch_spec(
    cfg: Config,
    d: Path,
    sandbox_id: str,
    host: HostFacts,
    cgroup: L.HostCgroup,
    *,
    vsock_cid: int | None = None,
    pool_key: str = "",
    template: Path | None = None,
    save_to: Path | None = None,
) -> L.LaunchSpec:
    """What the monitor is told: QEMU's argv for this host and configuration, and the rest
    (with ``template``, the argv restores that template and the boot is the fallback; with
    ``save_to``, the VM is booted to be saved there as a template)."""
    if vsock_cid is None:
        vsock_cid = random.randrange(3, 2**31) if host.channel == "vsock" else 0
    files = host.files
    mode, memory = "", ""
    if template is not None:
        mode, memory = "restore", str(clone_memory_file(d))
    elif save_to is not None:
        mode, memory = "save", str(save_to / L.TEMPLATE_MEMORY)
    plan = functools.partial(
        qemu_argv.plan,
        cfg,
        sandbox_id=sandbox_id,
        state_dir=d,
        kernel=files.kernel,
        initrd=files.initrd,
        rootfs_image=files.rootfs,
        rootfs_size=files.rootfs.stat().st_size,
        accel=host.accel,
        channel=host.channel,
        seccomp=host.seccomp,
        host_cpus=os.cpu_count() or 1,
        host_memory_mib=host_memory_mib(),
        vsock_cid=vsock_cid,
    )
    vm = plan(template=mode, memory_path=memory)
    return L.LaunchSpec(
        sandbox_id=sandbox_id,
        state_dir=str(d),
        argv=qemu_argv.build_argv(vm),
        accel=host.accel,
        channel=host.channel,
        vsock_cid=vsock_cid,
        shared_fs=cfg.hypervisor.shared_fs,
        virtiofsd=cfg.hypervisor.virtiofsd_path,
        ready_timeout_s=cfg.agent.ready_timeout_s,
        request_timeout_s=cfg.agent.request_timeout_s,
        shutdown_timeout_s=cfg.runtime.shutdown_timeout_s,
        limits=vm.limits,
        cgroup=cgroup,
        pool_key=pool_key,
        qemu_uids=(
            [cfg.hypervisor.rootless_uid_first, cfg.hypervisor.rootless_uid_count]
            if cfg.hypervisor.rootless
            else []
        ),
        template=mode,
        template_dir=str(template or save_to or ""),
        memory_file=memory if mode == "restore" else "",
        cold_argv=qemu_argv.build_argv(plan()) if mode == "restore" else [],
        mergeable=cfg.runtime.mergeable_monitors,
    )


def boot_key(
    cfg: Config,
    host: HostFacts,
    d: Path,
    name: str,
    *extra: object,
    save_to: Path | None = None,
) -> str:
    """A hash of what a VM of this configuration is booted from (a pooled VM's and a
    template's identity: sandbox.pool, sandbox.template): the launch spec it would get in the
    fixed directory ``d`` under the fixed name ``name``, with one vsock CID for all."""
    cid = 3 if host.channel == "vsock" else 0
    spec = launch_spec(cfg, d, name, host, L.HostCgroup(), vsock_cid=cid, save_to=save_to)
    return spec_key(spec, host.files, *extra)


def spec_key(spec: L.LaunchSpec, files: GuestFiles, *extra: object) -> str:
    """A hash of what a VM is booted from: its launch spec with the sandbox's own names left
    out, the guest files as they are on disk, and ``extra``."""
    raw = dataclasses.asdict(spec)
    for name in ("sandbox_id", "state_dir", "log_file", "log_format", "debug", "cgroup"):
        raw.pop(name)
    stats = []
    for p in (files.kernel, files.initrd, files.rootfs):
        st = p.stat()
        stats.append([str(p), st.st_size, st.st_mtime_ns])
    blob = json.dumps([raw, stats, *extra], sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def _launch(cfg: Config, spec: L.LaunchSpec, host: HostFacts) -> Sandbox:
    d, sandbox_id = spec.dir, spec.sandbox_id
    spec.write(d / L.LAUNCH_FILE)
    if cfg.hypervisor.shared_fs != "none":
        hostmount.make_shared(d / "shared")
    rfd, wfd = os.pipe()
    try:
        proc = spawn.monitor(
            d.parent.parent,  # the state root: every VM's directory is <root>/<kind>/<name>
            ["--launch", str(d / L.LAUNCH_FILE)],
            d / L.MONITOR_LOG,
            wfd,
            fork=cfg.runtime.fork_monitors,
        )
    finally:
        os.close(wfd)
    try:
        line = spawn.read_line(rfd, cfg.agent.ready_timeout_s + 30)
    finally:
        os.close(rfd)
    report: dict[str, object] = {}
    with contextlib.suppress(ValueError):
        report = json.loads(line) if line else {}
    if report.get("ok"):
        return Sandbox(
            sandbox_id,
            d,
            proc.pid,
            float(report["boot_seconds"]),  # type: ignore[arg-type]
            host.accel,
            proc,
            restored=bool(report.get("restored")),
            restore_failure=str(report.get("restore_failure") or ""),
        )
    # Failed: the monitor cleaned up after itself; make sure, whatever happened to it.
    mon_log = _tail_file(d / L.MONITOR_LOG)
    _kill_leftovers(d, proc)
    if report:
        raise SandboxError(
            f"sandbox {sandbox_id}: {report.get('error')}", str(report.get("details") or "")
        )
    raise SandboxError(
        f"sandbox {sandbox_id}: the monitor exited without reporting (status {proc.returncode})",
        mon_log,
    )


def _remove_dir(d: Path) -> None:
    with contextlib.suppress(OSError, HostError):
        hostmount.safe_rmtree(d)


def _tail_file(p: Path, n: int = 20) -> str:
    try:
        return "\n".join(p.read_text(errors="replace").strip().splitlines()[-n:])
    except OSError:
        return ""


def _pid_in(d: Path, name: str) -> int | None:
    try:
        return int((d / name).read_text().strip())
    except (OSError, ValueError):
        return None


def _kill_leftovers(d: Path, proc: spawn.Process | None) -> None:
    """Kills a monitor that did not finish and its QEMU; removes the state dir."""
    if proc is not None and proc.poll() is None:
        proc.kill()
    if proc is not None:
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(10)
    qpid = _pid_in(d, L.QEMU_PID)
    if qpid and _is_our_qemu(qpid, d):
        with contextlib.suppress(ProcessLookupError):
            os.kill(qpid, signal.SIGKILL)
        wait_gone(qpid, 10, 0.02)
    uid = _pid_in(d, L.QEMU_UID)
    if uid:  # a non-root QEMU's uid, whose monitor could not give it back
        qemuuser.release_stale(uid)
    with contextlib.suppress(FileNotFoundError):  # a restore's RAM copy, not yet handed over
        clone_memory_file(d).unlink()
    if (d / L.NETWORK_RECORD).exists():  # the monitor died before undoing the network
        from cocoon.runtime.network import record

        record.unplumb_recorded(d / L.NETWORK_RECORD)
    _remove_dir(d)


def our_monitor(d: Path) -> int | None:
    """The pid in monitor.pid if it is still this sandbox's monitor (after a host reboot the
    file may name another process, which must never be waited for or killed)."""
    pid = _pid_in(d, L.MONITOR_PID)
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes() if pid else b""
    except OSError:
        return None
    ours = b"cocoon.runtime.monitor.main" in cmdline and str(d).encode() in cmdline
    return pid if ours else None


def _is_our_qemu(pid: int, d: Path) -> bool:
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
    return str(d).encode() in cmdline


def list_sandboxes(root: Path) -> list[str]:
    """The sandboxes' ids (a long id's directory has a shortened name: its launch file has
    the id)."""
    d = sandboxes_dir(root)
    ids = []
    for p in d.iterdir() if d.is_dir() else ():
        if p.is_symlink() and not p.exists():
            continue  # a claimed pooled VM's link, its VM gone
        try:
            ids.append(str(json.loads((p / L.LAUNCH_FILE).read_text())["sandbox_id"]))
        except (OSError, ValueError, KeyError, TypeError):
            ids.append(p.name)  # a launch not written yet, or one being removed
    return sorted(ids)


def stop(root: Path, sandbox_id: str, timeout: float = 10.0) -> str:
    """Orderly stop; returns how QEMU ended. Missing sandbox: StateError."""
    d = sandbox_dir(root, sandbox_id)
    if not d.exists():
        raise StateError(f"sandbox {sandbox_id} does not exist")
    return stop_dir(d, timeout)


def stop_dir(d: Path, timeout: float = 10.0) -> str:
    """``stop`` of the sandbox whose state directory is ``d``."""
    mpid = our_monitor(d)
    how = "unknown"
    try:
        with client_mod.Client(d) as c:
            how = c.vm.Shutdown({"timeout_seconds": int(timeout)}, timeout=timeout * 3 + 10)["how"]
    except (client_mod.CallError, CocoonError):
        how = "forced"
    if mpid:
        wait_gone(mpid, timeout + 10)
    if (mpid and pid_alive(mpid)) or d.exists():
        _force(d, mpid)
    return how


def _force(d: Path, mpid: int | None) -> None:
    if mpid and pid_alive(mpid):
        with contextlib.suppress(ProcessLookupError):
            os.kill(mpid, signal.SIGKILL)
        wait_gone(mpid, 10, 0.02)  # so that what it held (its QEMU's uid) is seen as free
    cgroup, alias = L.HostCgroup(), ""
    with contextlib.suppress(OSError, ValueError, TypeError, KeyError):
        spec = L.LaunchSpec.read(d / L.LAUNCH_FILE)
        cgroup, alias = spec.cgroup, spec.alias
    _kill_leftovers(d, None)
    hostcgroup.remove(cgroup)  # a killed monitor did not leave it
    if alias:
        L.drop_dangling(Path(alias))
