"""runc's verbs after create: start, kill, delete, pause/resume, update, stats, ps, run.

Each verb loads the container's state, asks its Status the verb's rule (``can_start``,
``can_kill``...), and asks the agent (through the sandbox's monitor) to do it; ``create``
lives in ``create`` (it is the long one), ``state``/``list`` in ``state`` and ``exec`` in
``execproc`` (they need no sandbox call). ``run`` is create + start and, in the foreground, wait +
delete.

May import: the standard library, cocoon.runtime.{errors, faults, pids, container.{create, ids,
shim, spec, state, hooks}, pod.resources, resources.{attach, sizing}, sandbox.{client, paths}}.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from cocoon.runtime import faults
from cocoon.runtime.container import create as create_mod
from cocoon.runtime.container import shim as shimmod
from cocoon.runtime.container import spec as specmod
from cocoon.runtime.container.hooks import run_hooks
from cocoon.runtime.container.ids import validate_id
from cocoon.runtime.container.state import ContainerState, Ctx, Status
from cocoon.runtime.errors import CocoonError, LifecycleError, SandboxError, StateError
from cocoon.runtime.pids import pid_alive, wait_gone
from cocoon.runtime.pod.resources import in_pod, members, vm_size
from cocoon.runtime.resources import attach, sizing
from cocoon.runtime.sandbox import paths
from cocoon.runtime.sandbox.client import CallError, Client, b64, rpc_error


def _dir(ctx: Ctx, st: ContainerState) -> Path:
    return paths.sandbox_dir(ctx.root, st.sandbox_id)


@contextlib.contextmanager
def _client(ctx: Ctx, st: ContainerState) -> Iterator[Client]:
    d = paths.sandbox_dir(ctx.root, st.sandbox_id)
    try:
        c = Client(d, ctx.cfg.agent.request_timeout_s)
    except StateError as exc:
        raise LifecycleError(f"container {st.id}: its sandbox is not running") from exc
    with c:
        yield c


# ---------------------------------------------------------------------------------- start
def start(ctx: Ctx, cid: str) -> None:
    store = ctx.store
    with store.locked(cid):
        st = store.load(cid)
        eff = st.effective
        if not eff.can_start:
            raise LifecycleError(f"cannot start container {cid} in status {eff.value}")
        faults.point("start:before", _dir(ctx, st), st.pid)
        with _client(ctx, st) as c:
            try:
                c.agent.StartContainer({"container_id": cid}, timeout=120)
            except CallError as exc:
                raise rpc_error(f"start {cid}", exc) from exc
        st.status = Status.RUNNING.value
        store.save(st)
    run_hooks("poststart", st.hooks.get("poststart", []), st.oci())


# ---------------------------------------------------------------------------------- kill
def kill(ctx: Ctx, cid: str, sig: int, all_processes: bool) -> None:
    st = ctx.store.load(validate_id(cid))
    if not st.effective.can_kill:
        if all_processes:  # containerd sends `kill --all` after every exit: 0, as runc
            return
        raise LifecycleError("container not running")  # runc's words: callers match them
    with _client(ctx, st) as c:
        try:
            c.agent.SignalProcess(
                {"container_id": cid, "signal": sig, "all": all_processes}, timeout=30
            )
        except CallError as exc:
            raise rpc_error(f"kill {cid}", exc) from exc


# ---------------------------------------------------------------------------------- delete
def delete(ctx: Ctx, cid: str, force: bool) -> None:
    validate_id(cid)
    store = ctx.store
    if not store.exists(cid):
        if force:
            # Nothing recorded, but a crashed create may have left a sandbox: clean it.
            with contextlib.suppress(CocoonError):
                create_mod.teardown_sandbox(ctx, cid)
            create_mod.remove_netns(ctx.root / "netns" / cid)
            store.remove(cid)
            return
        raise StateError(f"container {cid} does not exist")
    with contextlib.ExitStack() as held:
        try:
            held.enter_context(store.locked(cid))
            gone = not store.exists(cid)  # a concurrent delete removed it while we waited
        except StateError:
            gone = True
        if gone:
            if force:
                return
            raise StateError(f"container {cid} does not exist")
        st = store.load(cid)
        eff = st.effective
        if not eff.can_delete and not force:
            raise LifecycleError(f"cannot delete container {cid} that is not stopped: {eff.value}")
        if st.owns_sandbox:  # a pod's containers go before its sandbox (and their VM) does
            for member in members(ctx, st.sandbox_id):
                delete(ctx, member.id, force=True)
        if eff is not Status.STOPPED:
            with contextlib.suppress(CocoonError, CallError), _client(ctx, st) as c:
                if eff is Status.PAUSED:
                    c.agent.ResumeContainer({"container_id": cid}, timeout=30)
                c.agent.SignalProcess({"container_id": cid, "signal": 9, "all": True}, timeout=30)
            wait_gone(st.pid, 15)
        faults.point("delete:killed", _dir(ctx, st), st.pid)
        for pid in [st.pid, *st.exec_pids.values()]:
            if pid_alive(pid) and shimmod.is_shim(pid, cid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        if st.owns_sandbox:
            # Its VM goes next, and the container with it: nothing is removed in the guest
            # first. VFIO devices are unplugged so that their host driver is given back; the
            # sandbox's teardown undoes the network (from its record, once QEMU is gone).
            if st.disks or st.vfio:
                with contextlib.suppress(CocoonError, CallError), _client(ctx, st) as c:
                    attach.detach_devices(c, st.disks, st.vfio)
            create_mod.teardown_sandbox(ctx, st.sandbox_id)
        else:  # a pod's container: the pod's VM and its other containers stay
            create_mod.leave_sandbox(ctx, st.sandbox_id, cid, st.disks, st.vfio)
        if st.netns_owned:
            create_mod.remove_netns(Path(st.netns))
        st.status = Status.STOPPED.value
        run_hooks("poststop", st.hooks.get("poststop", []), st.oci())  # failures: logged
        # Removed under the lock: a delete waiting on it then finds the id gone, never
        # a state that vanishes between its check and its load.
        store.remove(cid)


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
                method = c.agent.PauseContainer if verb == "pause" else c.agent.ResumeContainer
                method({"container_id": cid}, timeout=60)
            except CallError as exc:
                raise rpc_error(f"{verb} {cid}", exc) from exc
        if verb == "pause":  # a created container may be paused too, as under runc
            st.paused_from, st.status = eff.value, Status.PAUSED.value
        else:
            st.status, st.paused_from = st.paused_from or Status.RUNNING.value, ""
        store.save(st)


def update(ctx: Ctx, cid: str, resources: dict[str, Any]) -> None:
    """Resizes the sandbox for the new resources, then applies them in the guest (crun
    update); growing resizes first (a cpuset needs its CPUs online), shrinking after."""
    store = ctx.store
    specmod.validate_resources(resources, "resources")
    with store.locked(validate_id(cid)):
        st = store.load(cid)
        if st.effective is Status.STOPPED:
            raise LifecycleError(f"cannot update container {cid}: it is stopped")
        merged = sizing.merge(st.resources, resources)
        if in_pod(ctx, st.sandbox_id):  # the pod's VM, by this container's difference
            old = vm_size(ctx, st.sandbox_id)
            new = vm_size(ctx, st.sandbox_id, drop=cid, add=merged)
        else:
            new, old = sizing.size_for(ctx.cfg, merged), sizing.size_for(ctx.cfg, st.resources)
            attach.check_fits(ctx.cfg, new)
        grows = new.vcpus > old.vcpus or new.memory_mib > old.memory_mib
        with _client(ctx, st) as c:
            if grows:
                attach.resize(c, cid, new)
            faults.point("update:resized", _dir(ctx, st), st.pid)
            try:
                c.agent.UpdateContainer(
                    {"container_id": cid, "resources_json": b64(json.dumps(resources).encode())},
                    timeout=60,
                )
            except CallError as exc:
                if grows:
                    with contextlib.suppress(CocoonError):
                        attach.resize(c, cid, old)
                raise rpc_error(f"update {cid}", exc) from exc
            if not grows and new != old:
                attach.resize(c, cid, new)
        st.resources = merged
        store.save(st)


def stats(ctx: Ctx, cid: str) -> dict[str, Any]:
    st = ctx.store.load(validate_id(cid))
    if st.effective is Status.STOPPED:
        raise LifecycleError(f"container {cid} is stopped")
    with _client(ctx, st) as c:
        try:
            s = c.agent.StatsContainer({"container_id": cid}, timeout=30)
        except CallError as exc:
            raise rpc_error(f"stats {cid}", exc) from exc
    # A message the agent left out is missing; 64-bit fields come as strings.
    cpu, mem, pids = s.get("cpu", {}), s.get("memory", {}), s.get("pids", {})
    return {
        "cpu": {
            "usage": {
                "total": _n(cpu, "usage_total_ns"),
                "kernel": _n(cpu, "usage_kernel_ns"),
                "user": _n(cpu, "usage_user_ns"),
            },
            "throttling": {
                "throttledPeriods": _n(cpu, "throttled_periods"),
                "throttledTime": _n(cpu, "throttled_time_ns"),
            },
        },
        "memory": {
            "usage": {
                "usage": _n(mem, "usage_bytes"),
                "max": _n(mem, "max_usage_bytes"),
                "limit": _n(mem, "limit_bytes"),
                "failcnt": _n(mem, "failcnt"),
            },
            "cache": _n(mem, "cache_bytes"),
        },
        "pids": {"current": _n(pids, "current"), "limit": _n(pids, "limit")},
    }


def _n(msg: dict[str, Any], field: str) -> int:
    return int(msg.get(field, 0))


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
    keep: bool = False,
) -> int:
    """runc run: create + start; without -d, wait and delete (unless ``keep``: runc's --keep
    leaves the stopped container for state, exec-less inspection and delete), returning the
    workload's status."""
    # In the foreground without --console-socket, a terminal is the caller's own (stdin).
    st, shim = create_mod.create(
        ctx, cid, bundle, pid_file, console_socket, foreground_tty=not detach, start=True
    )
    try:
        if st.status == Status.CREATED.value:  # it has hooks to run between create and start
            start(ctx, cid)
        else:
            run_hooks("poststart", st.hooks.get("poststart", []), st.oci())
    except BaseException:
        with contextlib.suppress(CocoonError):
            delete(ctx, cid, force=True)
        raise
    if detach:
        return 0
    status = shimmod.wait_forwarding(shim)
    if not keep:
        with contextlib.suppress(CocoonError, SandboxError):
            delete(ctx, cid, force=True)
    return status
