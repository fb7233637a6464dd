"""The monitor's VM service (runtime/vm.proto), table-driven: one short handler per RPC.

``TABLE`` maps each RPC name to a handler ``(Service, request) -> response`` (for Events, an
async iterator of events). Handlers never touch the gRPC context: a refusal is an exception,
and ``status_for()`` is the one place that turns it into a gRPC status: a ``Refused`` carries
its own, a ``HotplugError``'s ``ErrorKind`` picks one from ``CODES``, a ``NetworkError`` is
INVALID_ARGUMENT. ``handler()`` serves the table with request and response types taken from
vm.proto's descriptor, the way monitor.forward serves the agent's service.

Everything a handler reaches is injected into ``Service``: the VM's lifecycle (``VmControl``),
the QMP command function, the QMP event waiter and the agent calls, so unit tests drive the
table with a fake QEMU and a fake agent.

May import: the standard library, grpc, qemu.qmp (QMPError), cocoon.runtime.vm_pb2,
cocoon.runtime.errors, cocoon.runtime.monitor.{hotplug, launch, netattach}.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import os
import stat
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, Protocol

import grpc
import grpc.aio
from qemu.qmp.error import QMPError

from cocoon.runtime import vm_pb2 as vpb
from cocoon.runtime.errors import ErrorKind, HotplugError, NetworkError
from cocoon.runtime.monitor import hotplug, netattach
from cocoon.runtime.monitor import launch as L

log = logging.getLogger("cocoon.monitor.service")

SERVICE = vpb.DESCRIPTOR.services_by_name["VM"]

CODES = {
    ErrorKind.INVALID: grpc.StatusCode.INVALID_ARGUMENT,
    ErrorKind.LIMIT: grpc.StatusCode.RESOURCE_EXHAUSTED,
    ErrorKind.FAILED: grpc.StatusCode.ABORTED,
}


class Refused(Exception):
    """A handler's refusal with its own gRPC status."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(details)
        self.code = code
        self.details = details


def status_for(exc: Refused | HotplugError | NetworkError) -> tuple[grpc.StatusCode, str]:
    if isinstance(exc, Refused):
        return exc.code, exc.details
    if isinstance(exc, HotplugError):
        return CODES[exc.kind], str(exc)
    return grpc.StatusCode.INVALID_ARGUMENT, str(exc)


class VmControl(Protocol):
    """What the service sees of the VM's lifecycle (monitor.vm.Vm)."""

    state: str
    boot_seconds: float
    subscribers: list[asyncio.Queue[vpb.Event | None]]
    done: asyncio.Event

    @property
    def qemu_pid(self) -> int: ...
    async def stop(self, timeout: float) -> str: ...
    async def claim(self, spec: L.LaunchSpec, nice: int) -> None: ...
    async def claim_settled(self) -> None: ...


class Agent(hotplug.GuestAgent, netattach.NetAgent, Protocol):
    """The agent calls the handlers make (monitor.agentcalls.AgentCalls)."""


class Service:
    """What the handlers work with."""

    def __init__(
        self,
        spec: L.LaunchSpec,
        vm: VmControl,
        qmp: hotplug.QmpFn,
        wait_event: hotplug.EventWaiter,
        agent: Agent,
        pass_fd: hotplug.FdFn | None = None,
        device_timeout_s: float = 20.0,
        add_fd: hotplug.FdSetFn | None = None,
        grant_vfio: hotplug.GrantFn | None = None,
    ) -> None:
        self.spec = spec
        self.vm = vm
        self.qmp = qmp
        self.agent = agent
        self.hotplug = hotplug.Hotplug(
            spec.limits,
            qmp,
            wait_event,
            agent,
            device_timeout_s,
            pass_fd=pass_fd,
            add_fd=add_fd,
            grant_vfio=grant_vfio,
        )
        self.net_lock = asyncio.Lock()

    async def settled(self, refuse: bool = True) -> None:
        """A claim's cgroup move done (Vm.claim goes on with it after its answer); its
        failure is the next call's (Refused ABORTED), once, or only logged (``refuse`` false:
        a Shutdown, which must not be refused for it)."""
        try:
            await self.vm.claim_settled()
        except OSError as exc:
            what = f"claiming VM for sandbox {self.spec.sandbox_id}: {exc}"
            if not refuse:
                log.warning("%s", what)
                return
            raise Refused(grpc.StatusCode.ABORTED, what) from exc

    def running(self) -> hotplug.Hotplug:
        """Hot-plug, if the VM can take it now."""
        if self.vm.state != "running":
            raise Refused(grpc.StatusCode.FAILED_PRECONDITION, "the VM is not running")
        return self.hotplug


@contextlib.asynccontextmanager
async def _hotplug_failures() -> AsyncIterator[None]:
    """QEMU or the agent failing under a hot-plug step is a FAILED hot-plug."""
    try:
        yield
    except (grpc.aio.AioRpcError, QMPError) as exc:
        raise HotplugError(ErrorKind.FAILED, f"hot-plug failed: {exc}") from exc


# ---------------------------------------------------------------------- lifecycle
async def status(svc: Service, req: vpb.StatusRequest) -> vpb.StatusResponse:
    return vpb.StatusResponse(
        sandbox_id=svc.spec.sandbox_id,
        state=svc.vm.state,
        qemu_pid=svc.vm.qemu_pid,
        monitor_pid=os.getpid(),
        accel=svc.spec.accel,
        channel=svc.spec.channel,
        boot_seconds=svc.vm.boot_seconds,
    )


async def shutdown(svc: Service, req: vpb.ShutdownRequest) -> vpb.ShutdownResponse:
    how = await svc.vm.stop(float(req.timeout_seconds or svc.spec.shutdown_timeout_s))
    svc.vm.done.set()
    return vpb.ShutdownResponse(how=how)


async def events(svc: Service, req: vpb.EventsRequest) -> AsyncIterator[vpb.Event]:
    return _subscription(svc.vm)


async def _subscription(vm: VmControl) -> AsyncIterator[vpb.Event]:
    q: asyncio.Queue[vpb.Event | None] = asyncio.Queue()
    vm.subscribers.append(q)
    try:
        while (ev := await q.get()) is not None:
            yield ev
    finally:
        vm.subscribers.remove(q)


async def qmp(svc: Service, req: vpb.QmpRequest) -> vpb.QmpResponse:
    try:
        args = json.loads(req.arguments_json) if req.arguments_json else None
    except ValueError as exc:
        raise Refused(grpc.StatusCode.INVALID_ARGUMENT, f"arguments_json: {exc}") from exc
    try:
        ret = await svc.qmp(req.command, args)
    except QMPError as exc:
        raise Refused(grpc.StatusCode.FAILED_PRECONDITION, f"QMP {req.command}: {exc}") from exc
    return vpb.QmpResponse(return_json=json.dumps(ret))


# ---------------------------------------------------------------------- hot-plug
@contextlib.asynccontextmanager
async def _plugging(svc: Service) -> AsyncIterator[hotplug.Hotplug]:
    """The running VM's hot-plug, with its failures mapped (``_hotplug_failures``)."""
    hp = svc.running()
    async with _hotplug_failures():
        yield hp


async def resize(svc: Service, req: vpb.ResizeRequest) -> vpb.ResizeResponse:
    hp = svc.running()
    timing = hotplug.Timing()
    async with _hotplug_failures():
        await hp.resize(req.vcpus, req.memory_mib, timing)
        total = await hp.agent_memory_total()
    return vpb.ResizeResponse(
        vcpus_online=hp.cpus_online,
        memory_mib=hp.memory_mib,
        guest_mem_total_bytes=total,
        seconds=timing.steps,
    )


async def attach_disk(svc: Service, req: vpb.AttachDiskRequest) -> vpb.AttachDiskResponse:
    hp = svc.running()
    try:
        is_block = stat.S_ISBLK(os.stat(req.path).st_mode)
    except OSError as exc:
        raise Refused(grpc.StatusCode.INVALID_ARGUMENT, f"disk {req.path}: {exc.strerror}") from exc
    timing = hotplug.Timing()
    async with _hotplug_failures():
        d = await hp.attach_disk(req.id, req.path, req.readonly, is_block, timing)
    return vpb.AttachDiskResponse(
        guest_path=d.guest_path, scsi_target=d.target, seconds=timing.steps
    )


async def detach_disk(svc: Service, req: vpb.DetachDiskRequest) -> vpb.DetachDiskResponse:
    async with _plugging(svc) as hp:
        await hp.detach_disk(req.id)
    return vpb.DetachDiskResponse()


async def attach_vfio(svc: Service, req: vpb.AttachVfioRequest) -> vpb.AttachVfioResponse:
    async with _plugging(svc) as hp:
        paths = await hp.attach_vfio(req.id, list(req.host_bdfs), req.group)
    return vpb.AttachVfioResponse(guest_paths=paths)


async def detach_vfio(svc: Service, req: vpb.DetachVfioRequest) -> vpb.DetachVfioResponse:
    async with _plugging(svc) as hp:
        await hp.detach_vfio(req.id)
    return vpb.DetachVfioResponse()


# ---------------------------------------------------------------------- networking
async def attach_network(svc: Service, req: vpb.AttachNetworkRequest) -> vpb.AttachNetworkResponse:
    hp = svc.running()
    async with svc.net_lock:
        if netattach.attached(svc.spec.dir):
            raise Refused(grpc.StatusCode.FAILED_PRECONDITION, "the sandbox has a network already")
        try:
            return await netattach.attach(hp, svc.agent, svc.spec.dir, req)
        except grpc.aio.AioRpcError as exc:
            raise Refused(
                grpc.StatusCode.ABORTED, f"configuring the guest NIC: {exc.details()}"
            ) from exc


async def detach_network(svc: Service, req: vpb.DetachNetworkRequest) -> vpb.DetachNetworkResponse:
    hp = svc.running()
    async with svc.net_lock, _hotplug_failures():
        await netattach.detach(hp, svc.spec.dir)
    return vpb.DetachNetworkResponse()


# ---------------------------------------------------------------------- the pool
async def claim(svc: Service, req: vpb.ClaimRequest) -> vpb.ClaimResponse:
    spec = svc.spec
    if not spec.pool_key or spec.alias:
        what = "was not booted for the pool" if not spec.pool_key else "is claimed already"
        raise Refused(grpc.StatusCode.FAILED_PRECONDITION, f"VM {spec.sandbox_id} {what}")
    svc.running()
    try:
        cgroup = L.HostCgroup(**json.loads(req.cgroup_json or "{}"))
    except (ValueError, TypeError) as exc:
        raise Refused(grpc.StatusCode.INVALID_ARGUMENT, f"cgroup_json: {exc}") from exc
    new = dataclasses.replace(
        spec,
        sandbox_id=req.sandbox_id,
        alias=req.alias,
        cgroup=cgroup,
        log_file=req.log_file,
        log_format=req.log_format or "text",
        debug=req.debug,
    )
    try:
        await svc.vm.claim(new, req.nice)
    except OSError as exc:  # a cgroup that cannot be joined, a launch file not written
        raise Refused(grpc.StatusCode.ABORTED, f"claiming VM {spec.sandbox_id}: {exc}") from exc
    svc.spec = new
    return vpb.ClaimResponse()


# ---------------------------------------------------------------------- the table
Handler = Callable[[Service, Any], Awaitable[Any]]

TABLE: dict[str, Handler] = {
    "Status": status,
    "Shutdown": shutdown,
    "Events": events,
    "Qmp": qmp,
    "Resize": resize,
    "AttachDisk": attach_disk,
    "DetachDisk": detach_disk,
    "AttachVfio": attach_vfio,
    "DetachVfio": detach_vfio,
    "AttachNetwork": attach_network,
    "DetachNetwork": detach_network,
    "Claim": claim,
}


async def call(svc: Service, name: str, request: Any, context: Any) -> Any:
    """Runs RPC ``name``'s handler; a refusal becomes the context's abort with its status."""
    try:
        return await TABLE[name](svc, request)
    except (Refused, HotplugError, NetworkError) as exc:
        await context.abort(*status_for(exc))
        raise AssertionError("unreachable") from exc


def handler(svc: Service) -> grpc.GenericRpcHandler:
    """The VM service: every RPC of vm.proto, each served by its entry in ``TABLE``."""
    names = {m.name for m in SERVICE.methods}
    if names != TABLE.keys():
        raise AssertionError(f"TABLE does not match vm.proto: {sorted(names ^ TABLE.keys())}")
    methods: dict[str, grpc.RpcMethodHandler] = {}
    for m in SERVICE.methods:
        types = {
            "request_deserializer": getattr(vpb, m.input_type.name).FromString,
            "response_serializer": getattr(vpb, m.output_type.name).SerializeToString,
        }
        if m.server_streaming:
            methods[m.name] = grpc.unary_stream_rpc_method_handler(_stream(svc, m.name), **types)
        else:
            methods[m.name] = grpc.unary_unary_rpc_method_handler(_unary(svc, m.name), **types)
    return grpc.method_handlers_generic_handler(SERVICE.full_name, methods)


# grpc.aio tells a coroutine handler from an async generator one by inspecting the function.
def _unary(svc: Service, name: str) -> Callable[[Any, Any], Awaitable[Any]]:
    async def h(request: Any, context: Any) -> Any:
        return await call(svc, name, request, context)

    return h


def _stream(svc: Service, name: str) -> Callable[[Any, Any], AsyncIterator[Any]]:
    async def h(request: Any, context: Any) -> AsyncIterator[Any]:
        async for msg in await call(svc, name, request, context):
            yield msg

    return h
