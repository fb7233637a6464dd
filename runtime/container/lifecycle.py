"""The container lifecycle: what each runc verb does, over the sandbox, the agent and the shim.

create: reserve the id, load the bundle, boot the sandbox (one VM per container unless a pod
annotation says otherwise), bind the rootfs and volumes into the sandbox share, have the
agent create the container (crun create in the guest), start the shim (a child of the caller,
holding its stdio, and inside the container's network namespace), run the
prestart/createRuntime hooks, then bring the network namespace's interfaces into the guest
(the hooks may have just made them: docker's libnetwork), save the state, write the pid file
last. Any failure undoes all of it. A spec that asks for a new network namespace without a
path gets one made by cocoon (bound under <root>/netns/), removed again on delete. The other
verbs load the state, check the status rule, and ask the agent through the monitor.

May import: the standard library, grpc, cocoon.agent (stubs), cocoon.runtime.{config, devices,
errors, hooks, hostmount, ids, network (lazily), sandbox, sizing, spec, state, vm_pb2}.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import select
import signal
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from cocoon.agent import agent_pb2 as apb
from cocoon.runtime import vm_pb2 as vpb
from cocoon.runtime.config import Config, NetworkConfig, with_annotations
from cocoon.runtime.container import spec as specmod
from cocoon.runtime.container.hooks import run_hooks
from cocoon.runtime.container.ids import validate_id
from cocoon.runtime.container.state import ContainerState, Status, Store, pid_alive, wait_gone
from cocoon.runtime.errors import CocoonError, LifecycleError, SandboxError, StateError
from cocoon.runtime.resources import devices as devmod
from cocoon.runtime.resources import sizing
from cocoon.runtime.sandbox import hostmount
from cocoon.runtime.sandbox import launcher as sandbox


@dataclass(frozen=True)
class Ctx:
    cfg: Config
    root: Path
    log_file: Path | None = None
    log_format: str = "text"
    debug: bool = False

    @property
    def store(self) -> Store:
        return Store(self.root)


def _agent_error(what: str, exc: grpc.RpcError) -> LifecycleError:
    details = exc.details() if hasattr(exc, "details") else str(exc)
    return LifecycleError(f"{what}: {details}")


@contextlib.contextmanager
def _client(ctx: Ctx, st: ContainerState) -> Iterator[sandbox.Client]:
    d = sandbox.sandbox_dir(ctx.root, st.sandbox_id)
    try:
        c = sandbox.Client(d, ctx.cfg.agent.request_timeout_s)
    except StateError as exc:
        raise LifecycleError(f"container {st.id}: its sandbox is not running") from exc
    with c:
        yield c


def _write_pid_file(path: Path, pid: int) -> None:
    tmp = path.with_name(path.name + ".cocoon-tmp")
    tmp.write_text(str(pid))
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------- create
def create(
    ctx: Ctx,
    cid: str,
    bundle_path: Path,
    pid_file: Path | None,
    console_socket: str | None,
) -> ContainerState:
    return _create(ctx, cid, bundle_path, pid_file, console_socket)[0]


def _create(
    ctx: Ctx,
    cid: str,
    bundle_path: Path,
    pid_file: Path | None,
    console_socket: str | None,
    foreground_tty: bool = False,
) -> tuple[ContainerState, subprocess.Popen[bytes]]:
    validate_id(cid)
    store = ctx.store
    if store.path(cid).exists():
        raise StateError(f"container {cid} already exists")
    bundle = specmod.load_bundle(bundle_path)
    if bundle.terminal and not console_socket and not (foreground_tty and os.isatty(0)):
        raise LifecycleError("cannot allocate a terminal without --console-socket")
    resources = (bundle.spec.get("linux") or {}).get("resources") or {}
    size = sizing.size_for(ctx.cfg, resources)
    _check_fits(ctx, size)
    disks = devmod.block_devices(cid, bundle.spec)
    volumes = devmod.block_mounts(cid, bundle.spec)
    groups = devmod.vfio_groups(cid, bundle.spec, override=ctx.cfg.hypervisor.vfio_driver_override)
    net = with_annotations(ctx.cfg, bundle.annotations).network
    has_netns, netns = specmod.network_namespace(bundle.spec)
    if netns and not os.path.exists(netns):
        raise LifecycleError(f"network namespace {netns} does not exist")
    guest_network = has_netns and net.model != "none"
    store.reserve(cid)
    sb: sandbox.Sandbox | None = None
    shim: subprocess.Popen[bytes] | None = None
    owned_netns: Path | None = None
    try:
        if has_netns and not netns:
            from cocoon.runtime.network import netns as nsmod

            owned_netns = ctx.root / "netns" / cid
            nsmod.create_netns(owned_netns)
            netns = str(owned_netns)
        sb = sandbox.start(
            ctx.cfg,
            ctx.root,
            cid,
            log_file=ctx.log_file,
            log_format=ctx.log_format,
            debug=ctx.debug,
        )
        _share_in(sb.dir, cid, bundle)
        with sb.client(ctx.cfg.agent.request_timeout_s) as c:
            if size != sizing.boot_size(ctx.cfg):  # the VM boots at this size: nothing to plug
                _resize(c, cid, size)
            devices = _attach_devices(c, cid, disks, groups)
            sources = {v.index: _attach_disk(c, cid, v) for v in volumes}
            req = apb.CreateContainerRequest(
                container_id=cid,
                oci_spec_json=json.dumps(
                    specmod.guest_spec(bundle, cid, sources, guest_network)
                ).encode(),
                stdio=apb.StdioConfig(terminal=bundle.terminal, stdin=True),
                devices=devices,
            )
            try:
                c.agent.CreateContainer(req, timeout=120)
            except grpc.RpcError as exc:
                raise _agent_error(f"container {cid}", exc) from exc
        shim = spawn_shim(sb.dir, cid, "", bundle.terminal, console_socket, netns)
        st = ContainerState(
            id=cid,
            bundle=str(bundle.path),
            rootfs=str(bundle.rootfs),
            sandbox_id=cid,
            status=Status.CREATED.value,
            pid=shim.pid,
            annotations=bundle.annotations,
            terminal=bundle.terminal,
            resources=resources,
            disks=[d.disk_id for d in (*disks, *volumes)],
            vfio=[g.vfio_id for g in groups],
            netns=netns,
            netns_owned=owned_netns is not None,
        )
        state = st.oci()
        run_hooks("prestart", bundle.hooks("prestart"), state)
        run_hooks("createRuntime", bundle.hooks("createRuntime"), state)
        if guest_network:
            with sb.client(ctx.cfg.agent.request_timeout_s) as c:
                _attach_network(c, cid, netns, net)
        store.save(st)
        if pid_file is not None:
            _write_pid_file(pid_file, shim.pid)
        return st, shim
    except BaseException:
        if shim is not None and shim.poll() is None:
            shim.kill()
            shim.wait()
        _teardown_sandbox(ctx, cid)
        if owned_netns is not None:
            _remove_netns(owned_netns)
        store.remove(cid)
        raise


def _attach_network(c: sandbox.Client, cid: str, netns: str, net: NetworkConfig) -> None:
    try:
        r = c.vm.AttachNetwork(
            vpb.AttachNetworkRequest(netns_path=netns, model=net.model, queues=net.queues),
            timeout=120,
        )
    except grpc.RpcError as exc:
        raise _agent_error(f"container {cid}: network", exc) from exc
    for sk in r.skipped:
        logging.getLogger("cocoon").warning("container %s: %s", cid, sk.reason)


def _remove_netns(path: Path) -> None:
    from cocoon.runtime.network import netns as nsmod

    nsmod.remove_netns(path)


def _check_fits(ctx: Ctx, size: sizing.Size) -> None:
    sizing.check_fits(ctx.cfg, size, os.cpu_count() or 1, sandbox.host_memory_mib())


def _resize(c: sandbox.Client, cid: str, size: sizing.Size) -> None:
    try:
        c.vm.Resize(vpb.ResizeRequest(vcpus=size.vcpus, memory_mib=size.memory_mib), timeout=120)
    except grpc.RpcError as exc:
        raise _agent_error(
            f"container {cid}: sizing the sandbox to {size.vcpus} vCPUs and {size.memory_mib} MiB",
            exc,
        ) from exc


def _attach_devices(
    c: sandbox.Client,
    cid: str,
    disks: list[devmod.BlockDevice],
    groups: list[devmod.VfioGroup],
) -> list[apb.Device]:
    """Hot-plugs the container's block devices and VFIO groups; the agent's Device list."""
    out = [
        apb.Device(
            id=d.disk_id,
            type="blk",
            vm_path=_attach_disk(c, cid, d),
            container_path=d.container_path,
        )
        for d in disks
    ]
    for g in groups:
        try:
            v = c.vm.AttachVfio(
                vpb.AttachVfioRequest(id=g.vfio_id, host_bdfs=list(g.bdfs)), timeout=60
            )
        except grpc.RpcError as exc:
            raise _agent_error(f"container {cid}: VFIO group {g.group}", exc) from exc
        out += [apb.Device(id=g.vfio_id, type="vfio", vm_path=p) for p in v.guest_paths]
    return out


def _attach_disk(c: sandbox.Client, cid: str, d: devmod.BlockDevice) -> str:
    """Hot-plugs one host block device; its node in the guest."""
    try:
        r = c.vm.AttachDisk(vpb.AttachDiskRequest(id=d.disk_id, path=d.host_path), timeout=60)
    except grpc.RpcError as exc:
        raise _agent_error(f"container {cid}: {d.host_path} for {d.container_path}", exc) from exc
    return str(r.guest_path)


def _detach_devices(c: sandbox.Client, st: ContainerState) -> None:
    for disk_id in st.disks:
        with contextlib.suppress(grpc.RpcError):
            c.vm.DetachDisk(vpb.DetachDiskRequest(id=disk_id), timeout=60)
    for vfio_id in st.vfio:
        with contextlib.suppress(grpc.RpcError):
            c.vm.DetachVfio(vpb.DetachVfioRequest(id=vfio_id), timeout=60)


def _share_in(sandbox_dir: Path, cid: str, bundle: specmod.Bundle) -> None:
    base = sandbox_dir / "shared" / cid
    hostmount.bind(bundle.rootfs, base / "rootfs")
    for bm in bundle.binds:
        hostmount.bind(bm.source, base / "mounts" / bm.share_name)


def _teardown_sandbox(ctx: Ctx, sid: str) -> None:
    d = sandbox.sandbox_dir(ctx.root, sid)
    if d.exists():
        sandbox.stop(ctx.root, sid, ctx.cfg.runtime.shutdown_timeout_s)


def spawn_shim(
    sandbox_dir: Path,
    cid: str,
    exec_id: str,
    terminal: bool,
    console_socket: str | None,
    netns: str = "",
) -> subprocess.Popen[bytes]:
    """Starts a shim as our child (so it stays in the caller's tree) and waits until ready."""
    rfd, wfd = os.pipe()
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
    if terminal:
        argv.append("--terminal")
    if console_socket:
        argv += ["--console-socket", console_socket]
    if netns:
        argv += ["--netns", netns]
    try:
        proc = subprocess.Popen(argv, pass_fds=(wfd,), start_new_session=True)
    finally:
        os.close(wfd)
    try:
        ready, _, _ = select.select([rfd], [], [], 60)
        ok = bool(ready) and os.read(rfd, 16).startswith(b"ok")
    finally:
        os.close(rfd)
    if not ok:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        raise LifecycleError(f"container {cid}: the shim did not start (status {proc.returncode})")
    return proc


# ---------------------------------------------------------------------------------- start
def start(ctx: Ctx, cid: str) -> None:
    store = ctx.store
    with store.locked(cid):
        st = store.load(cid)
        eff = st.effective
        if not eff.can_start:
            raise LifecycleError(f"cannot start container {cid} in status {eff.value}")
        with _client(ctx, st) as c:
            try:
                c.agent.StartContainer(apb.StartContainerRequest(container_id=cid), timeout=120)
            except grpc.RpcError as exc:
                raise _agent_error(f"start {cid}", exc) from exc
        st.status = Status.RUNNING.value
        store.save(st)
    bundle = specmod.load_bundle(Path(st.bundle))
    run_hooks("poststart", bundle.hooks("poststart"), st.oci())


# ---------------------------------------------------------------------------------- state
def state(ctx: Ctx, cid: str) -> dict[str, Any]:
    return ctx.store.load(validate_id(cid)).oci()


def list_states(ctx: Ctx) -> list[ContainerState]:
    out = []
    for cid in ctx.store.ids():
        with contextlib.suppress(StateError):
            out.append(ctx.store.load(cid))
    return out


# ---------------------------------------------------------------------------------- kill
def kill(ctx: Ctx, cid: str, sig: int, all_processes: bool) -> None:
    st = ctx.store.load(validate_id(cid))
    if not st.effective.can_kill:
        return  # runc: killing a stopped container is not an error for the callers
    with _client(ctx, st) as c:
        try:
            c.agent.SignalProcess(
                apb.SignalProcessRequest(container_id=cid, signal=sig, all=all_processes),
                timeout=30,
            )
        except grpc.RpcError as exc:
            raise _agent_error(f"kill {cid}", exc) from exc


# ---------------------------------------------------------------------------------- delete
def delete(ctx: Ctx, cid: str, force: bool) -> None:
    validate_id(cid)
    store = ctx.store
    if not store.exists(cid):
        if force:
            # Nothing recorded, but a crashed create may have left a sandbox: clean it.
            with contextlib.suppress(CocoonError):
                _teardown_sandbox(ctx, cid)
            _remove_netns(ctx.root / "netns" / cid)
            store.remove(cid)
            return
        raise StateError(f"container {cid} does not exist")
    with store.locked(cid):
        st = store.load(cid)
        eff = st.effective
        if not eff.can_delete and not force:
            raise LifecycleError(f"cannot delete container {cid} that is not stopped: {eff.value}")
        if eff is not Status.STOPPED:
            with contextlib.suppress(CocoonError, grpc.RpcError), _client(ctx, st) as c:
                if eff is Status.PAUSED:
                    c.agent.ResumeContainer(
                        apb.ResumeContainerRequest(container_id=cid), timeout=30
                    )
                c.agent.SignalProcess(
                    apb.SignalProcessRequest(container_id=cid, signal=9, all=True), timeout=30
                )
            wait_gone(st.pid, 15)
        for pid in [st.pid, *st.exec_pids.values()]:
            if pid_alive(pid) and _is_shim(pid, cid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(CocoonError, grpc.RpcError), _client(ctx, st) as c:
            c.agent.RemoveContainer(apb.RemoveContainerRequest(container_id=cid), timeout=60)
            _detach_devices(c, st)
            if st.netns:
                c.vm.DetachNetwork(vpb.DetachNetworkRequest(), timeout=60)
        _teardown_sandbox(ctx, st.sandbox_id)  # undoes the network too, if DetachNetwork did not
        if st.netns_owned:
            _remove_netns(Path(st.netns))
        st.status = Status.STOPPED.value
        try:
            bundle = specmod.load_bundle(Path(st.bundle))
            run_hooks("poststop", bundle.hooks("poststop"), st.oci())
        except CocoonError:
            pass  # a bundle removed before delete does not block the delete
    store.remove(cid)


def _is_shim(pid: int, cid: str) -> bool:
    try:
        cmd = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return b"cocoon.shim.main" in cmd and cid.encode() in cmd


# ---------------------------------------------------------------------------------- exec
def exec_process(
    ctx: Ctx,
    cid: str,
    process: dict[str, Any],
    detach: bool,
    pid_file: Path | None,
    console_socket: str | None,
) -> int:
    store = ctx.store
    st = store.load(validate_id(cid))
    if not st.effective.can_exec:
        raise LifecycleError(f"cannot exec in container {cid}: it is {st.effective.value}")
    specmod.validate_process(process, "process")
    terminal = bool(process.get("terminal"))
    if terminal and detach and not console_socket:
        raise LifecycleError("cannot allocate a terminal without --console-socket")
    exec_id = uuid.uuid4().hex[:16]
    with _client(ctx, st) as c:
        try:
            c.agent.ExecProcess(
                apb.ExecProcessRequest(
                    container_id=cid,
                    exec_id=exec_id,
                    process_json=json.dumps(process).encode(),
                    stdio=apb.StdioConfig(terminal=terminal, stdin=True),
                ),
                timeout=120,
            )
        except grpc.RpcError as exc:
            raise _agent_error(f"exec in {cid}", exc) from exc
    d = sandbox.sandbox_dir(ctx.root, st.sandbox_id)
    shim = spawn_shim(d, cid, exec_id, terminal, console_socket)
    with store.locked(cid):
        st = store.load(cid)
        st.exec_pids = {k: v for k, v in st.exec_pids.items() if pid_alive(v)}
        st.exec_pids[exec_id] = shim.pid
        store.save(st)
    if pid_file is not None:
        _write_pid_file(pid_file, shim.pid)
    if detach:
        return 0
    return wait_forwarding(shim)


def wait_forwarding(proc: subprocess.Popen[bytes]) -> int:
    """Waits for a foreground shim, passing on the signals we get (as runc run/exec do)."""

    def fwd(signum: int, _frame: object) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signum)

    for s in (
        signal.SIGINT,
        signal.SIGTERM,
        signal.SIGHUP,
        signal.SIGQUIT,
        signal.SIGUSR1,
        signal.SIGUSR2,
        signal.SIGWINCH,
    ):
        signal.signal(s, fwd)
    rc = proc.wait()
    return 128 - rc if rc < 0 else rc


def build_process(
    base: dict[str, Any],
    args: list[str],
    tty: bool,
    env: list[str],
    cwd: str | None,
    user: str | None,
) -> dict[str, Any]:
    """An exec process from the container's own process and runc exec's flags."""
    p: dict[str, Any] = json.loads(json.dumps(base))
    p["args"] = args
    p["terminal"] = tty
    p["env"] = list(p.get("env") or []) + env
    if cwd:
        p["cwd"] = cwd
    if user:
        uid, _, gid = user.partition(":")
        try:
            p["user"] = {"uid": int(uid), "gid": int(gid or 0)}
        except ValueError:
            raise LifecycleError(f"user {user!r}: use UID[:GID]") from None
    return p


# ---------------------------------------------------------------------------------- others
def simple(ctx: Ctx, cid: str, verb: str) -> None:
    """pause / resume."""
    store = ctx.store
    with store.locked(validate_id(cid)):
        st = store.load(cid)
        eff = st.effective
        allowed = eff.can_pause if verb == "pause" else eff.can_resume
        if not allowed:
            raise LifecycleError(f"cannot {verb} container {cid} in status {eff.value}")
        with _client(ctx, st) as c:
            try:
                if verb == "pause":
                    c.agent.PauseContainer(apb.PauseContainerRequest(container_id=cid), timeout=60)
                else:
                    c.agent.ResumeContainer(
                        apb.ResumeContainerRequest(container_id=cid), timeout=60
                    )
            except grpc.RpcError as exc:
                raise _agent_error(f"{verb} {cid}", exc) from exc
        st.status = (Status.PAUSED if verb == "pause" else Status.RUNNING).value
        store.save(st)


def update(ctx: Ctx, cid: str, resources: dict[str, Any]) -> None:
    """Resizes the sandbox for the new resources, then applies them in the guest (crun
    update); growing resizes first (a cpuset needs its CPUs online), shrinking after."""
    store = ctx.store
    with store.locked(validate_id(cid)):
        st = store.load(cid)
        if st.effective is Status.STOPPED:
            raise LifecycleError(f"cannot update container {cid}: it is stopped")
        merged = sizing.merge(st.resources, resources)
        new, old = sizing.size_for(ctx.cfg, merged), sizing.size_for(ctx.cfg, st.resources)
        _check_fits(ctx, new)
        grows = new.vcpus > old.vcpus or new.memory_mib > old.memory_mib
        with _client(ctx, st) as c:
            if grows:
                _resize(c, cid, new)
            try:
                c.agent.UpdateContainer(
                    apb.UpdateContainerRequest(
                        container_id=cid, resources_json=json.dumps(resources).encode()
                    ),
                    timeout=60,
                )
            except grpc.RpcError as exc:
                if grows:
                    with contextlib.suppress(CocoonError):
                        _resize(c, cid, old)
                raise _agent_error(f"update {cid}", exc) from exc
            if not grows and new != old:
                _resize(c, cid, new)
        st.resources = merged
        store.save(st)


def stats(ctx: Ctx, cid: str) -> dict[str, Any]:
    st = ctx.store.load(validate_id(cid))
    if st.effective is Status.STOPPED:
        raise LifecycleError(f"container {cid} is stopped")
    with _client(ctx, st) as c:
        try:
            s = c.agent.StatsContainer(apb.StatsContainerRequest(container_id=cid), timeout=30)
        except grpc.RpcError as exc:
            raise _agent_error(f"stats {cid}", exc) from exc
    return {
        "cpu": {
            "usage": {
                "total": s.cpu.usage_total_ns,
                "kernel": s.cpu.usage_kernel_ns,
                "user": s.cpu.usage_user_ns,
            },
            "throttling": {
                "throttledPeriods": s.cpu.throttled_periods,
                "throttledTime": s.cpu.throttled_time_ns,
            },
        },
        "memory": {
            "usage": {
                "usage": s.memory.usage_bytes,
                "max": s.memory.max_usage_bytes,
                "limit": s.memory.limit_bytes,
                "failcnt": s.memory.failcnt,
            },
            "cache": s.memory.cache_bytes,
        },
        "pids": {"current": s.pids.current, "limit": s.pids.limit},
    }


def host_pids(ctx: Ctx, cid: str) -> list[int]:
    """The host pids that stand for the container's processes: its shims."""
    st = ctx.store.load(validate_id(cid))
    if st.effective is Status.STOPPED:
        return []
    return [p for p in [st.pid, *st.exec_pids.values()] if pid_alive(p)]


def run_foreground(
    ctx: Ctx,
    cid: str,
    bundle: Path,
    pid_file: Path | None,
    console_socket: str | None,
    detach: bool,
) -> int:
    """runc run: create + start; without -d, wait and delete, returning the status."""
    # In the foreground without --console-socket, a terminal is the caller's own (stdin).
    _, shim = _create(ctx, cid, bundle, pid_file, console_socket, foreground_tty=not detach)
    try:
        start(ctx, cid)
    except BaseException:
        with contextlib.suppress(CocoonError):
            delete(ctx, cid, force=True)
        raise
    if detach:
        return 0
    status = wait_forwarding(shim)
    with contextlib.suppress(CocoonError, SandboxError):
        delete(ctx, cid, force=True)
    return status
