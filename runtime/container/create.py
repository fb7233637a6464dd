"""runc create: a container made inside its sandbox, in named steps, all undone on failure.

The steps, in order:
1. ``_check``: everything that can be checked before anything is made (the id, the shared
   filesystem, the bundle, the terminal, the VM size, the host devices, the network
   namespace).
2. reserve the id in the state store.
3. ``_own_netns``: a spec that asks for a new network namespace without a path gets one made
   by cocoon (bound under <root>/netns/), removed again on delete.
4. ``_sandbox``: the VM. A container alone, or a pod's sandbox container, boots one (its
   processes under the parent of the container's cgroupsPath on the host); a pod's
   container (pod.membership: its annotations name its sandbox) goes into its pod's running
   VM, its namespaces mapped to the sandbox container's in the guest, its network the pod's
   (attached once, at the sandbox's create).
5. ``_prepare_guest``: the rootfs and volumes bound into the sandbox share, the VM resized
   (not for a pod's container: it runs in the pod's VM as it is), the container's disks and
   VFIO groups hot-plugged.
6. ``_create_in_guest``: the agent creates the container (crun create in the guest).
7. the shim (a child of the caller, holding its stdio, inside the container's netns),
   started before step 5 and held on a pipe until the container exists, so that its
   interpreter's start overlaps with the agent's work.
8. the prestart/createRuntime hooks, then the network namespace's interfaces brought into the
   guest (the hooks may have just made them: docker's libnetwork); none for a namespace
   cocoon made in step 3 and no hook could fill (it holds only lo).
9. the state saved, the pid file written last.
``run`` (``start=True``) of a container without those hooks attaches the network before step
6 and has the agent start the process in the same call (one ``crun run --detach``): nothing
is left to do between the create and the start, and a second crun process in the guest
(~0.13 s under TCG) is saved.
Any failure undoes all of it (``_undo``: a VM booted for it is stopped; a pod's container
leaves its pod's VM as it found it), and the id is free again.

May import: the standard library, cocoon.runtime.{config, errors, faults, fds, pids,
monitor.{hostcgroup, launch}, pod, container.{hooks, ids, shim, spec, state, seccomp},
resources, sandbox.{client, hostmount, launcher, paths, pool}, network.netns (lazily)}.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from cocoon.runtime import faults
from cocoon.runtime.config import ANNOTATION_PREFIX, NetworkConfig, with_annotations
from cocoon.runtime.container import seccomp
from cocoon.runtime.container import shim as shimmod
from cocoon.runtime.container import spec as specmod
from cocoon.runtime.container.hooks import run_hooks
from cocoon.runtime.container.ids import validate_id
from cocoon.runtime.container.state import ContainerState, Ctx, Status
from cocoon.runtime.errors import (
    CocoonError,
    ConfigError,
    LifecycleError,
    SpecError,
    StateError,
)
from cocoon.runtime.fds import is_dev_null
from cocoon.runtime.monitor import hostcgroup
from cocoon.runtime.monitor.launch import MONITOR_SOCK, drop_dangling
from cocoon.runtime.pids import start_time
from cocoon.runtime.pod.membership import (
    Membership,
    Role,
    guest_namespaces,
    membership,
    sandbox_ns_paths,
    shm_source,
)
from cocoon.runtime.pod.resources import vm_size
from cocoon.runtime.resources import attach, sizing
from cocoon.runtime.resources import devices as devmod
from cocoon.runtime.sandbox import hostmount, paths, pool
from cocoon.runtime.sandbox import launcher as sandbox
from cocoon.runtime.sandbox.client import CallError, Client, b64, rpc_error

log = logging.getLogger("cocoon")
CREATE_HOOKS = ("prestart", "createRuntime")  # run by create, on the host, in this order
LATER_HOOKS = ("poststart", "poststop")  # run by start and delete, from the state


@dataclass
class _Plan:
    """What create checked before it made anything."""

    cid: str
    bundle: specmod.Bundle
    resources: dict[str, object]
    size: sizing.Size
    disks: list[devmod.BlockDevice]
    volumes: list[devmod.BlockDevice]
    groups: list[devmod.VfioGroup]
    net: NetworkConfig
    cgroups_path: str  # the spec's: the VM booted for it runs under its parent on the host
    has_netns: bool
    netns: str  # the spec's path; "" when cocoon makes the namespace
    pod: Membership
    # A pod member: its sandbox container's state, and its namespaces as they are in the guest.
    pod_sandbox: ContainerState | None = None
    guest_namespaces: list[dict[str, object]] | None = None

    @property
    def member(self) -> bool:
        return self.pod_sandbox is not None

    @property
    def sandbox_id(self) -> str:
        """The VM it runs in: its own, or its pod's."""
        return self.pod_sandbox.sandbox_id if self.pod_sandbox else self.cid

    @property
    def guest_network(self) -> bool:
        if self.pod_sandbox is not None:  # the pod's network, attached at the sandbox's create
            return self.pod_sandbox.guest_network
        return self.has_netns and self.net.model != "none"


@dataclass
class _Made:
    """What create has made so far: ``_undo`` takes it apart in reverse."""

    sandbox_dir: Path | None = None  # the VM it was put in (booted for it, or its pod's)
    starting: shimmod.Starting | None = None  # the shim, held until the container exists
    shim: shimmod.Shim | None = None
    owned_netns: Path | None = None


def create(
    ctx: Ctx,
    cid: str,
    bundle_path: Path,
    pid_file: Path | None,
    console_socket: str | None,
    foreground_tty: bool = False,
    start: bool = False,
) -> tuple[ContainerState, shimmod.Shim]:
    """The container's state and its shim (``run`` waits for the shim). ``start`` (``run``):
    a container with no prestart or createRuntime hook is started by the same agent call
    that creates it, its network attached first (nothing on the host has to happen between
    its create and its start); its state is then RUNNING, and only poststart is left."""
    plan = _check(ctx, cid, bundle_path, console_socket, foreground_tty)
    hooked = any(plan.bundle.hooks(k) for k in CREATE_HOOKS)
    at_once = start and not hooked
    store = ctx.store
    store.reserve(cid)
    made = _Made()
    timeout = ctx.cfg.agent.request_timeout_s
    try:
        netns = _own_netns(ctx, plan, made)
        made.sandbox_dir = d = _sandbox(ctx, plan)
        faults.point("create:booted", d)
        # A namespace cocoon made just now holds only lo: nothing to bridge, unless a hook
        # between create and start puts something in it (docker's libnetwork does).
        network = plan.guest_network and not plan.member and (made.owned_netns is None or hooked)
        made.starting = shimmod.begin(
            d,
            cid,
            "",
            plan.bundle.terminal,
            console_socket,
            netns,
            _shim_namespaces(plan),
            held=True,
        )
        with Client(d, timeout) as c:
            devices, sources = _prepare_guest(ctx, c, plan, d)
            if at_once and network:
                _attach_network(c, cid, netns, plan.net)
            _create_in_guest(
                c, plan, devices, sources, ctx.cfg.runtime.guest_seccomp, start=at_once
            )
        faults.point("create:in-guest", d)
        made.shim = shimmod.finish(made.starting)
        made.starting = None
        faults.point("create:shim", d, made.shim.pid)
        st = _state(plan, made.shim.pid, netns, made.owned_netns is not None)
        if at_once:
            st.status = Status.RUNNING.value
        else:
            for kind in CREATE_HOOKS:
                run_hooks(kind, plan.bundle.hooks(kind), st.oci())
            if network:
                with Client(d, timeout) as c:
                    _attach_network(c, cid, netns, plan.net)
        store.save(st)
        if pid_file is not None:
            shimmod.write_pid_file(pid_file, made.shim.pid)
        return st, made.shim
    except BaseException:
        _undo(ctx, plan, made)
        store.remove(cid)
        raise


def _check(
    ctx: Ctx, cid: str, bundle_path: Path, console_socket: str | None, foreground_tty: bool
) -> _Plan:
    validate_id(cid)
    shared = ctx.cfg.hypervisor.shared_fs
    if shared != "virtio-fs":  # a VM of no container (`cocoon sandbox start`) boots with any
        why = "the guest kernel has no 9p" if shared == "virtio-9p" else "there is none"
        raise ConfigError(
            f'hypervisor.shared_fs = "{shared}" cannot run containers: their root filesystems '
            f'reach the guest through the shared filesystem and {why} (use "virtio-fs")'
        )
    if ctx.store.path(cid).exists():
        raise StateError(f"container {cid} already exists")
    bundle = specmod.load_bundle(bundle_path)
    if bundle.terminal and not console_socket and not (foreground_tty and os.isatty(0)):
        raise LifecycleError("cannot allocate a terminal without --console-socket")
    resources = (bundle.spec.get("linux") or {}).get("resources") or {}
    size = sizing.size_for(ctx.cfg, resources)
    pod = membership(cid, bundle.annotations)
    pod_sandbox = (
        _pod_sandbox(ctx, cid, bundle, pod.sandbox_id) if pod.role is Role.MEMBER else None
    )
    if pod_sandbox is None:  # a VM of its own: it must fit
        attach.check_fits(ctx.cfg, size)
    has_netns, netns = specmod.network_namespace(bundle.spec)
    plan = _Plan(
        cid=cid,
        bundle=bundle,
        resources=resources,
        size=size,
        disks=devmod.block_devices(cid, bundle.spec),
        volumes=devmod.block_mounts(cid, bundle.spec),
        groups=devmod.vfio_groups(
            cid, bundle.spec, override=ctx.cfg.hypervisor.vfio_driver_override
        ),
        net=with_annotations(ctx.cfg, bundle.annotations).network,
        cgroups_path=_cgroups_path(bundle),
        has_netns=has_netns,
        netns=netns,
        pod=pod,
        pod_sandbox=pod_sandbox,
    )
    if pod_sandbox is not None:
        plan.guest_namespaces = guest_namespaces(
            cid,
            (bundle.spec.get("linux") or {}).get("namespaces") or [],
            pod_sandbox.id,
            pod_sandbox.pid,
            pod_sandbox.ns_paths,
        )
    if netns and not os.path.exists(netns):
        raise LifecycleError(f"network namespace {netns} does not exist")
    return plan


def _cgroups_path(bundle: specmod.Bundle) -> str:
    path = str((bundle.spec.get("linux") or {}).get("cgroupsPath") or "")
    try:
        hostcgroup.pod_cgroup(path)
    except hostcgroup.CgroupError as exc:
        raise SpecError(f"{bundle.path / 'config.json'}: {exc}") from None
    return path


def _pod_sandbox(ctx: Ctx, cid: str, bundle: specmod.Bundle, sid: str) -> ContainerState:
    """The running sandbox container a pod's container joins."""
    try:
        sst = ctx.store.load(sid)
    except StateError:
        hint = ""
        if bundle.annotations.get("io.container.manager") == "cri-o":
            hint = (
                " (CRI-O creates no infra container for a pod that does not share its PID"
                " namespace unless crio.conf sets drop_infra_ctr = false; cocoon boots the"
                " pod's VM with it)"
            )
        raise LifecycleError(
            f"container {cid}: its pod's sandbox {sid} does not exist{hint}"
        ) from None
    # podman's pod infra container carries no sandbox annotation: any container whose create
    # booted its VM can be a pod's sandbox; one that joined another's VM cannot.
    if not sst.owns_sandbox:
        raise LifecycleError(
            f"container {cid}: {sid} is not a pod's sandbox container (it is in {sst.sandbox_id}'s)"
        )
    running = (paths.sandbox_dir(ctx.root, sst.sandbox_id) / MONITOR_SOCK).exists()
    if sst.effective is Status.STOPPED or not running:
        raise LifecycleError(f"container {cid}: its pod's sandbox {sid} is stopped")
    changes = sorted(k for k in bundle.annotations if k.startswith(ANNOTATION_PREFIX))
    if changes:
        raise LifecycleError(
            f"container {cid}: {', '.join(changes)} would change the VM of the running pod {sid}"
            " (set them on the pod's sandbox)"
        )
    return sst


def _own_netns(ctx: Ctx, plan: _Plan, made: _Made) -> str:
    """The container's network namespace path: the spec's, or one cocoon makes."""
    if not plan.has_netns or plan.netns or plan.member:
        return plan.netns
    from cocoon.runtime.network import netns as nsmod

    made.owned_netns = ctx.root / "netns" / plan.cid
    nsmod.create_netns(made.owned_netns)
    return str(made.owned_netns)


def _sandbox(ctx: Ctx, plan: _Plan) -> Path:
    """The VM the container goes into: its pod's (running), or one of its own (from the pool,
    or booted for it)."""
    if plan.member:
        return paths.sandbox_dir(ctx.root, plan.sandbox_id)
    sb = pool.start(
        ctx.cfg,
        ctx.root,
        plan.cid,
        log_file=ctx.log_file,
        log_format=ctx.log_format,
        debug=ctx.debug,
        cgroups_path=plan.cgroups_path,
    )
    return sb.dir


def _prepare_guest(
    ctx: Ctx, c: Client, plan: _Plan, sandbox_dir: Path
) -> tuple[list[dict[str, str]], dict[int, str]]:
    """Share in the rootfs and volumes, size the VM, plug the devices; the agent's Device list
    and each block volume's node in the guest."""
    share_in(sandbox_dir, plan.cid, plan.bundle)
    if plan.member:  # the pod's VM grows by what this container asks for
        attach.resize(c, plan.cid, vm_size(ctx, plan.sandbox_id, add=plan.resources))
    elif plan.size != sizing.boot_size(ctx.cfg):  # the VM boots at this size: nothing to plug
        attach.resize(c, plan.cid, plan.size)
    devices = attach.attach_devices(c, plan.cid, plan.disks, plan.groups)
    sources = {v.index: attach.attach_disk(c, plan.cid, v) for v in plan.volumes}
    return devices, sources


def _create_in_guest(
    c: Client,
    plan: _Plan,
    devices: list[dict[str, str]],
    sources: dict[int, str],
    guest_seccomp: bool = False,
    start: bool = False,
) -> None:
    spec = specmod.guest_spec(
        plan.bundle,
        plan.cid,
        sources,
        plan.guest_network,
        plan.guest_namespaces,
        _shm(plan),
    )
    if guest_seccomp:
        seccomp.with_default_profile(spec)
    req = {
        "container_id": plan.cid,
        "oci_spec_json": b64(json.dumps(spec).encode()),
        # The caller's stdin, which the shim inherits: /dev/null (containerd's and conmon's
        # for a container without stdin) is the guest's /dev/null, as runc passes it through,
        # and the shim opens no stdin stream (shim.main decides the same from the same fd).
        "stdio": {
            "terminal": plan.bundle.terminal,
            "stdin": plan.bundle.terminal or not is_dev_null(0),
        },
        "devices": devices,
        "start": start,
    }
    try:
        c.agent.CreateContainer(req, timeout=120)
    except CallError as exc:
        raise rpc_error(f"container {plan.cid}", exc) from exc


def _shm(plan: _Plan) -> str:
    """A pod's containers share the pod's /dev/shm; a container alone gets its own."""
    if plan.pod_sandbox is not None:
        return shm_source(plan.pod_sandbox.id)
    return shm_source(plan.cid) if plan.pod.role is Role.SANDBOX else ""


def _shim_namespaces(plan: _Plan) -> list[tuple[str, str]]:
    """The IPC, UTS and cgroup namespaces the shim stands for the container in: the spec's
    paths (a pod's sandbox's), or new ones where the spec asks for new ones."""
    nss = (plan.bundle.spec.get("linux") or {}).get("namespaces") or []
    return [
        (ns["type"], str(ns.get("path") or ""))
        for ns in nss
        if isinstance(ns, dict) and ns.get("type") in shimmod.SHIM_NAMESPACES
    ]


def _state(plan: _Plan, pid: int, netns: str, netns_owned: bool) -> ContainerState:
    namespaces = (plan.bundle.spec.get("linux") or {}).get("namespaces") or []
    return ContainerState(
        id=plan.cid,
        bundle=str(plan.bundle.path),
        rootfs=str(plan.bundle.rootfs),
        sandbox_id=plan.sandbox_id,
        status=Status.CREATED.value,
        pid=pid,
        pid_start=start_time(pid),
        annotations=plan.bundle.annotations,
        terminal=plan.bundle.terminal,
        resources=plan.resources,
        disks=[d.disk_id for d in (*plan.disks, *plan.volumes)],
        vfio=[g.vfio_id for g in plan.groups],
        netns=netns,
        netns_owned=netns_owned,
        ns_paths={} if plan.member else sandbox_ns_paths(namespaces),
        guest_network=plan.guest_network,
        hooks={k: plan.bundle.hooks(k) for k in LATER_HOOKS if plan.bundle.hooks(k)},
    )


def _attach_network(c: Client, cid: str, netns: str, net: NetworkConfig) -> None:
    try:
        r = c.vm.AttachNetwork(
            {"netns_path": netns, "model": net.model, "queues": net.queues}, timeout=120
        )
    except CallError as exc:
        raise rpc_error(f"container {cid}: network", exc) from exc
    for sk in r["skipped"]:
        log.warning("container %s: %s", cid, sk["reason"])


def _undo(ctx: Ctx, plan: _Plan, made: _Made) -> None:
    if made.starting is not None:  # never let go: it exits as its pipe closes
        shimmod.cancel(made.starting)
    if made.shim is not None and made.shim.poll() is None:
        made.shim.kill()
        made.shim.wait()
    if plan.member:  # the pod's VM and its other containers stay
        if made.sandbox_dir is not None:
            disks = [d.disk_id for d in (*plan.disks, *plan.volumes)]
            leave_sandbox(ctx, plan.sandbox_id, plan.cid, disks, [g.vfio_id for g in plan.groups])
    else:
        teardown_sandbox(ctx, plan.cid)
    if made.owned_netns is not None:
        remove_netns(made.owned_netns)


def leave_sandbox(ctx: Ctx, sandbox_id: str, cid: str, disks: list[str], vfio: list[str]) -> None:
    """A pod member out of its pod's running VM: its container removed in the guest (best
    effort: it may be gone already), its devices unplugged, what it asked for given back, its
    share unmounted."""
    d = paths.sandbox_dir(ctx.root, sandbox_id)
    with contextlib.suppress(CocoonError), Client(d, ctx.cfg.agent.request_timeout_s) as c:
        with contextlib.suppress(CallError):  # a create that failed early made none
            c.agent.RemoveContainer({"container_id": cid}, timeout=60)
        attach.detach_devices(c, disks, vfio)
        attach.resize(c, cid, vm_size(ctx, sandbox_id, drop=cid))
    hostmount.safe_rmtree(d / "shared" / cid)


def share_in(sandbox_dir: Path, cid: str, bundle: specmod.Bundle) -> None:
    """The container's rootfs and bind-mount sources, bound under the sandbox's share."""
    base = sandbox_dir / "shared" / cid
    hostmount.bind(bundle.rootfs, base / "rootfs")
    for bm in bundle.binds:
        hostmount.bind(bm.source, base / "mounts" / bm.share_name)


def teardown_sandbox(ctx: Ctx, sid: str) -> None:
    d = paths.sandbox_dir(ctx.root, sid)
    if d.exists():  # by its directory: a monitor that ended its sandbox may remove it meanwhile
        sandbox.stop_dir(d, ctx.cfg.runtime.shutdown_timeout_s)
    # A pooled VM taken by a create that died before the VM's monitor claimed it has no alias
    # for the monitor to remove: its name goes here, once the VM is gone.
    drop_dangling(paths.sandbox_path(ctx.root, sid))


def remove_netns(path: Path) -> None:
    from cocoon.runtime.network import netns as nsmod

    nsmod.remove_netns(path)
