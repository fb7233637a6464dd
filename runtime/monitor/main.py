"""The sandbox monitor process: ``python -m cocoon.runtime.monitor.main --launch FILE``.

Start-up: virtiofsd (if the share is virtio-fs), QEMU, QMP, the agent channel, an agent
health check and an API-hash check, then the monitor's own socket. Whatever the outcome, one
JSON line goes to ``--ready-fd``: ``{"ok": true, ...}`` or ``{"ok": false, "error": ...,
"details": ...}`` (QEMU's stderr and console tails). A failed start tears everything down and
removes the state directory before reporting; so does the end of a sandbox, orderly or not.

May import: the standard library, grpc, qemu.qmp, cocoon.agent (proto, mux),
cocoon.runtime.{vm_pb2, vm_pb2_grpc, fds, hostmount, logs, errors, network, monitor.*}
(network lazily: pyroute2 is imported only by a sandbox that gets a network).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import signal
import stat
import sys
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
from qemu.qmp import QMPClient
from qemu.qmp.error import QMPError

from cocoon.agent import agent_pb2 as apb
from cocoon.agent import api_hash
from cocoon.runtime import fds, logs
from cocoon.runtime import vm_pb2 as vpb
from cocoon.runtime import vm_pb2_grpc as vpbg
from cocoon.runtime.errors import (
    ChannelError,
    ErrorKind,
    HostError,
    HotplugError,
    NetworkError,
    StartError,
)
from cocoon.runtime.monitor import forward, hotplug
from cocoon.runtime.monitor import launch as L
from cocoon.runtime.monitor.channel import SerialMuxHost, VsockRelay
from cocoon.runtime.sandbox import hostmount

log = logging.getLogger("cocoon.monitor")

AGENT_SERVICE = "/cocoon.agent.v1.AgentService/"


def tail(path: Path, lines: int) -> str:
    try:
        data = path.read_bytes()[-64 * 1024 :]
    except OSError:
        return ""
    text = data.decode("utf-8", "replace").replace("\r", "")
    return "\n".join(text.strip().splitlines()[-lines:])


def describe_exit(rc: int) -> str:
    if rc < 0:
        return f"killed by {signal.Signals(-rc).name}"
    return f"exited with status {rc}"


class Monitor(vpbg.VMServicer):
    def __init__(self, spec: L.LaunchSpec) -> None:
        self.spec = spec
        self.dir = spec.dir
        self.state = "booting"
        self.qemu: asyncio.subprocess.Process | None = None
        self.virtiofsd: asyncio.subprocess.Process | None = None
        self.qmp = QMPClient(f"sandbox-{spec.sandbox_id}")
        self.qmp_lock = asyncio.Lock()
        self.link: SerialMuxHost | VsockRelay | None = None
        self.agent: grpc.aio.Channel | None = None
        self.server: grpc.aio.Server | None = None
        self.subscribers: list[asyncio.Queue[vpb.Event | None]] = []
        self.done = asyncio.Event()
        self.stop_task: asyncio.Task[str] | None = None
        self.qemu_exit: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self.t_spawn = 0.0
        self.boot_seconds = 0.0
        self.tasks: list[asyncio.Task[None]] = []
        self.event_waiters: list[
            tuple[str, Callable[[dict[str, Any]], bool], asyncio.Future[dict[str, Any]]]
        ] = []
        self.hotplug: hotplug.Hotplug | None = None
        self.agent_calls: AgentCalls | None = None  # hot-plug's and networking's agent RPCs
        self.net_lock = asyncio.Lock()

    # ------------------------------------------------------------------ events
    def publish(self, kind: str, detail: str, data: object = None) -> None:
        ev = vpb.Event(
            time=time.time(),
            kind=kind,
            detail=detail,
            data_json=json.dumps(data) if data is not None else "",
        )
        log.info("event %s: %s", kind, detail)
        for q in self.subscribers:
            q.put_nowait(ev)

    # ------------------------------------------------------------------ start-up
    async def start(self) -> None:
        spec = self.spec
        deadline = time.monotonic() + spec.ready_timeout_s
        if spec.shared_fs == "virtio-fs":
            await self._start_virtiofsd()
        self.t_spawn = time.monotonic()
        self.qemu = await self._spawn(list(spec.argv), L.QEMU_LOG, "QEMU")
        (self.dir / L.QEMU_PID).write_text(f"{self.qemu.pid}\n")
        self.tasks.append(asyncio.create_task(self._watch_qemu()))
        await self._race(self._connect_qmp(deadline), "QMP")
        await self._race(self._connect_agent(deadline), "agent")
        self.boot_seconds = time.monotonic() - self.t_spawn
        self.state = "running"
        self.tasks.append(asyncio.create_task(self._qmp_events()))
        if self.spec.hotplug:
            self._start_hotplug()

    async def _race(self, coro: Any, what: str) -> None:
        """Runs ``coro`` but fails at once, with QEMU's reason, if QEMU exits meanwhile."""
        task = asyncio.ensure_future(coro)
        await asyncio.wait({task, self.qemu_exit}, return_when=asyncio.FIRST_COMPLETED)
        if task.done() and task.exception() is None:
            return
        if task.done():
            # A broken socket is usually QEMU going away: give its exit a moment to land
            # so the error names the real cause.
            await asyncio.wait({self.qemu_exit}, timeout=1.0)
            if not self.qemu_exit.done():
                task.result()
        task.cancel()
        with contextlib.suppress(BaseException):
            await task
        raise StartError(
            f"QEMU {describe_exit(self.qemu_exit.result())} before the {what} was ready"
        )

    async def _spawn(self, argv: list[str], log_name: str, what: str) -> asyncio.subprocess.Process:
        """Starts a helper in its own session with stdout/stderr in a state-dir log file."""
        out = open(self.dir / log_name, "wb")  # noqa: SIM115 - handed to the child
        try:
            return await asyncio.create_subprocess_exec(
                *argv,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=out,
                stderr=out,
                start_new_session=True,
            )
        except OSError as exc:
            raise StartError(f"cannot run {what} {argv[0]}: {exc.strerror}") from exc
        finally:
            out.close()

    async def _start_virtiofsd(self) -> None:
        share = self.dir / "shared"
        share.mkdir(exist_ok=True)
        sock = self.dir / "virtiofsd.sock"
        self.virtiofsd = await self._spawn(
            [
                self.spec.virtiofsd,
                f"--socket-path={sock}",
                "-o",
                f"source={share}",
                "-o",
                "cache=auto",
            ],
            L.VIRTIOFSD_LOG,
            "virtiofsd",
        )
        for _ in range(500):
            if sock.exists():
                return
            if self.virtiofsd.returncode is not None:
                break
            await asyncio.sleep(0.01)
        raise StartError(
            f"virtiofsd did not come up: {tail(self.dir / L.VIRTIOFSD_LOG, 5) or 'no output'}"
        )

    async def _connect_qmp(self, deadline: float) -> None:
        path = str(self.dir / "qmp.sock")
        while True:
            try:
                await self.qmp.connect(path)
                return
            except (QMPError, OSError) as exc:
                if time.monotonic() > deadline:
                    raise StartError(f"QMP socket {path}: {exc}") from exc
                await asyncio.sleep(0.02)

    async def _connect_agent(self, deadline: float) -> None:
        spec = self.spec
        listen = self.dir / L.AGENT_SOCK
        if spec.channel == "vsock":
            self.link = VsockRelay(spec.vsock_cid, 1024, listen)
        else:
            self.link = SerialMuxHost(self.dir / "agent-port.sock", listen)
        try:
            await self.link.connect(deadline)
        except ChannelError as exc:
            raise StartError(
                f"the guest agent did not answer within {spec.ready_timeout_s:g}s ({exc})"
            ) from exc
        await self.link.serve()
        self.agent = grpc.aio.insecure_channel(f"unix:{listen}")
        check = self.agent.unary_unary(
            AGENT_SERVICE + "Version",
            request_serializer=apb.VersionRequest.SerializeToString,
            response_deserializer=apb.VersionResponse.FromString,
        )
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise StartError(f"the guest agent did not answer within {spec.ready_timeout_s:g}s")
            try:
                ver = await check(apb.VersionRequest(), timeout=min(left, 5.0))
                break
            except grpc.aio.AioRpcError as exc:
                log.debug("agent not ready yet: %s", exc.code())
                await asyncio.sleep(0.05)
        want = api_hash()
        if ver.api_hash != want:
            raise StartError(
                f"guest agent {ver.agent_version} speaks another API (hash {ver.api_hash[:12]}, "
                f"host {want[:12]}): rebuild the guest image (`cocoon image build`)"
            )
        log.info("agent %s ready after %.2fs", ver.agent_version, time.monotonic() - self.t_spawn)

    async def _watch_qemu(self) -> None:
        assert self.qemu is not None
        rc = await self.qemu.wait()
        self.qemu_exit.set_result(rc)
        if self.state in ("running",) and self.stop_task is None:
            detail = f"QEMU {describe_exit(rc)} unexpectedly"
            log.error("sandbox %s: %s", self.spec.sandbox_id, detail)
            self.state = "stopped"
            self.publish("qemu-exited", detail, {"status": rc})
            await asyncio.sleep(0.3)  # let event subscribers read it
            self.done.set()

    async def _qmp_events(self) -> None:
        with contextlib.suppress(QMPError, asyncio.CancelledError):
            async for ev in self.qmp.events:
                name = str(ev.get("event", ""))
                raw = ev.get("data")
                data: dict[str, Any] = raw if isinstance(raw, dict) else {}
                for waiter in list(self.event_waiters):
                    if waiter[0] == name and not waiter[2].done() and waiter[1](data):
                        waiter[2].set_result(data)
                self.publish("qmp", name, data)

    async def wait_event(
        self, name: str, match: Callable[[dict[str, Any]], bool], timeout: float
    ) -> dict[str, Any] | None:
        """The next QMP event ``name`` whose data matches, or None after ``timeout``."""
        fut: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        entry = (name, match, fut)
        self.event_waiters.append(entry)
        try:
            return await asyncio.wait_for(fut, timeout)
        except TimeoutError:
            return None
        finally:
            self.event_waiters.remove(entry)

    async def qmp_command(self, command: str, args: dict[str, Any] | None) -> Any:
        async with self.qmp_lock:
            return await self.qmp.execute(command, args)

    def _start_hotplug(self) -> None:
        assert self.agent is not None
        self.agent_calls = AgentCalls(self.agent, self.spec.request_timeout_s)
        self.hotplug = hotplug.Hotplug(
            hotplug.Limits.from_dict(self.spec.hotplug),
            self.qmp_command,
            self.wait_event,
            self.agent_calls,
            pass_fd=self._pass_fd,
        )

    async def _pass_fd(self, fd: int, name: str) -> None:
        async with self.qmp_lock:
            self.qmp.send_fd_scm(fd)
            await self.qmp.execute("getfd", {"fdname": name})

    # ------------------------------------------------------------------ stop
    async def stop(self, timeout: float) -> str:
        if self.stop_task is None:
            self.stop_task = asyncio.create_task(self._do_stop(timeout))
        return await asyncio.shield(self.stop_task)

    async def _wait_qemu(self, timeout: float) -> bool:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(self.qemu_exit), timeout)
            return True
        return False

    async def _do_stop(self, timeout: float) -> str:
        if self.qemu is None or self.qemu_exit.done():
            return "already-dead"
        self.state = "stopping"
        self.publish("stopping", "orderly shutdown")
        how = "sigkill"
        if self.agent is not None:
            destroy = self.agent.unary_unary(
                AGENT_SERVICE + "DestroySandbox",
                request_serializer=apb.DestroySandboxRequest.SerializeToString,
                response_deserializer=apb.Empty.FromString,
            )
            with contextlib.suppress(grpc.aio.AioRpcError):
                await destroy(apb.DestroySandboxRequest(), timeout=min(timeout, 5.0))
            if await self._wait_qemu(timeout):
                how = "agent"
        if how == "sigkill" and self.qmp.runstate.name == "RUNNING":
            with contextlib.suppress(QMPError, OSError):
                async with self.qmp_lock:
                    await asyncio.wait_for(self.qmp.execute("quit"), timeout)
            if await self._wait_qemu(timeout):
                how = "qmp-quit"
        if how == "sigkill":
            with contextlib.suppress(ProcessLookupError):
                self.qemu.kill()
            await self._wait_qemu(30)
        self.state = "stopped"
        log.info("sandbox %s stopped (%s)", self.spec.sandbox_id, how)
        return how

    async def teardown(self) -> None:
        """Releases everything. Safe to call in any state, more than once."""
        if self.qemu is not None and not self.qemu_exit.done():
            with contextlib.suppress(ProcessLookupError):
                self.qemu.kill()
            await self._wait_qemu(30)
        if (self.dir / L.NETWORK_RECORD).exists():  # QEMU is gone: so are its tap fds
            from cocoon.runtime.network import record

            await asyncio.to_thread(record.unplumb_recorded, self.dir / L.NETWORK_RECORD)
        for q in self.subscribers:
            q.put_nowait(None)
        if self.server is not None:
            await self.server.stop(grace=1.0)
        if self.agent is not None:
            await self.agent.close()
        if self.link is not None:
            await self.link.close()
        with contextlib.suppress(Exception):
            await self.qmp.disconnect()
        if self.virtiofsd is not None and self.virtiofsd.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.virtiofsd.terminate()
            try:
                await asyncio.wait_for(self.virtiofsd.wait(), 3)
            except TimeoutError:
                self.virtiofsd.kill()
                await self.virtiofsd.wait()

    def diagnostics(self) -> str:
        parts = []
        q = tail(self.dir / L.QEMU_LOG, 15)
        if q:
            parts.append("QEMU stderr (last lines):\n" + q)
        c = tail(self.dir / "console.log", 25)
        if c:
            parts.append("guest console (last lines):\n" + c)
        v = tail(self.dir / L.VIRTIOFSD_LOG, 5)
        vfs = self.virtiofsd
        if v and vfs is not None and vfs.returncode not in (None, 0):
            parts.append("virtiofsd (last lines):\n" + v)
        return "\n".join(parts)

    # ------------------------------------------------------------------ VM service
    async def Status(self, request: vpb.StatusRequest, context: Any) -> vpb.StatusResponse:
        return vpb.StatusResponse(
            sandbox_id=self.spec.sandbox_id,
            state=self.state,
            qemu_pid=self.qemu.pid if self.qemu else 0,
            monitor_pid=os.getpid(),
            accel=self.spec.accel,
            channel=self.spec.channel,
            boot_seconds=self.boot_seconds,
        )

    async def Shutdown(self, request: vpb.ShutdownRequest, context: Any) -> vpb.ShutdownResponse:
        how = await self.stop(float(request.timeout_seconds or self.spec.shutdown_timeout_s))
        self.done.set()
        return vpb.ShutdownResponse(how=how)

    async def Events(self, request: vpb.EventsRequest, context: Any) -> AsyncIterator[vpb.Event]:
        q: asyncio.Queue[vpb.Event | None] = asyncio.Queue()
        self.subscribers.append(q)
        try:
            while (ev := await q.get()) is not None:
                yield ev
        finally:
            self.subscribers.remove(q)

    async def Qmp(self, request: vpb.QmpRequest, context: Any) -> vpb.QmpResponse:
        try:
            args = json.loads(request.arguments_json) if request.arguments_json else None
        except ValueError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"arguments_json: {exc}")
        try:
            async with self.qmp_lock:
                ret = await self.qmp.execute(request.command, args)
        except QMPError as exc:
            await context.abort(
                grpc.StatusCode.FAILED_PRECONDITION, f"QMP {request.command}: {exc}"
            )
        return vpb.QmpResponse(return_json=json.dumps(ret))

    # ------------------------------------------------------------------ hot-plug
    async def _hp(self, context: Any) -> hotplug.Hotplug:
        if self.hotplug is None or self.state != "running":
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, "the VM is not running")
        assert self.hotplug is not None
        return self.hotplug

    async def Resize(self, request: vpb.ResizeRequest, context: Any) -> vpb.ResizeResponse:
        hp = await self._hp(context)
        timing = hotplug.Timing()
        async with _hotplug_errors(context):
            await hp.resize(request.vcpus, request.memory_mib, timing)
        total = await hp.agent_memory_total()
        return vpb.ResizeResponse(
            vcpus_online=hp.cpus_online,
            memory_mib=hp.memory_mib,
            guest_mem_total_bytes=total,
            seconds=timing.steps,
        )

    async def AttachDisk(
        self, request: vpb.AttachDiskRequest, context: Any
    ) -> vpb.AttachDiskResponse:
        hp = await self._hp(context)
        try:
            is_block = stat.S_ISBLK(os.stat(request.path).st_mode)
        except OSError as exc:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT, f"disk {request.path}: {exc.strerror}"
            )
        timing = hotplug.Timing()
        async with _hotplug_errors(context):
            d = await hp.attach_disk(request.id, request.path, request.readonly, is_block, timing)
        return vpb.AttachDiskResponse(
            guest_path=d.guest_path, scsi_target=d.target, seconds=timing.steps
        )

    async def DetachDisk(
        self, request: vpb.DetachDiskRequest, context: Any
    ) -> vpb.DetachDiskResponse:
        hp = await self._hp(context)
        async with _hotplug_errors(context):
            await hp.detach_disk(request.id)
        return vpb.DetachDiskResponse()

    async def AttachVfio(
        self, request: vpb.AttachVfioRequest, context: Any
    ) -> vpb.AttachVfioResponse:
        hp = await self._hp(context)
        async with _hotplug_errors(context):
            paths = await hp.attach_vfio(request.id, list(request.host_bdfs))
        return vpb.AttachVfioResponse(guest_paths=paths)

    async def DetachVfio(
        self, request: vpb.DetachVfioRequest, context: Any
    ) -> vpb.DetachVfioResponse:
        hp = await self._hp(context)
        async with _hotplug_errors(context):
            await hp.detach_vfio(request.id)
        return vpb.DetachVfioResponse()

    async def AttachNetwork(
        self, request: vpb.AttachNetworkRequest, context: Any
    ) -> vpb.AttachNetworkResponse:
        hp = await self._hp(context)

        async with self.net_lock:
            if (self.dir / L.NETWORK_RECORD).exists():
                await context.abort(
                    grpc.StatusCode.FAILED_PRECONDITION, "the sandbox has a network already"
                )
            try:
                return await self._attach_network(hp, request)
            except NetworkError as exc:
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
            except HotplugError as exc:
                await context.abort(_HOTPLUG_CODES[exc.kind], str(exc))
            except grpc.aio.AioRpcError as exc:
                await context.abort(
                    grpc.StatusCode.ABORTED, f"configuring the guest NIC: {exc.details()}"
                )
            raise AssertionError("unreachable")

    async def _attach_network(
        self, hp: hotplug.Hotplug, request: vpb.AttachNetworkRequest
    ) -> vpb.AttachNetworkResponse:
        from cocoon.runtime.network import models, record, scan  # pyroute2 only when needed

        t0 = time.monotonic()
        seconds: dict[str, float] = {}
        netns, model = request.netns_path, request.model
        eps, skipped = await asyncio.to_thread(scan.scan, netns, model)
        for sk in skipped:
            log.warning("network: %s", sk.reason)
        seconds["scan"] = time.monotonic() - t0
        queues = min(request.queues or hp.cpus_online, 8)
        plumbed = await asyncio.to_thread(models.plumb, netns, eps, model, queues, self.dir)
        record_path = self.dir / L.NETWORK_RECORD
        record.save_record(record_path, netns, plumbed)
        seconds["plumb"] = time.monotonic() - t0 - seconds["scan"]
        agent = self.agent_calls
        assert agent is not None  # made with self.hotplug
        vhost = os.path.exists("/dev/vhost-net")
        out = []
        attached: list[str] = []
        try:
            for i, p in enumerate(plumbed):
                nic = f"net{i}"
                try:
                    port, _ = await hp.attach_nic(nic, p.fds, p.endpoint.mac, vhost)
                finally:
                    record.close_fds(p)
                attached.append(nic)
                pci = hotplug.root_port_address(port)
                await agent.configure_interface(p.endpoint, pci)
                out.append(
                    vpb.NetworkInterface(
                        name=p.endpoint.name,
                        mac=p.endpoint.mac,
                        mtu=p.endpoint.mtu,
                        host_device=p.device,
                        guest_pci=pci,
                        queues=queues,
                        addresses=[f"{a.address}/{a.prefix}" for a in p.endpoint.addresses],
                    )
                )
            seconds["nics"] = time.monotonic() - t0 - seconds["scan"] - seconds["plumb"]
            await agent.configure_routes(plumbed)
        except BaseException:
            for p in plumbed:
                record.close_fds(p)
            for nic in reversed(attached):
                with contextlib.suppress(Exception):
                    await hp.detach_nic(nic)
            await asyncio.to_thread(record.unplumb_recorded, record_path)
            raise
        seconds["total"] = time.monotonic() - t0
        log.info("network: %d NICs (%s) in %.3fs", len(out), model, seconds["total"])
        return vpb.AttachNetworkResponse(
            interfaces=out,
            skipped=[
                vpb.SkippedInterface(name=s.name, kind=s.kind, reason=s.reason) for s in skipped
            ],
            seconds=seconds,
        )

    async def DetachNetwork(
        self, request: vpb.DetachNetworkRequest, context: Any
    ) -> vpb.DetachNetworkResponse:
        hp = await self._hp(context)
        from cocoon.runtime.network import record

        async with self.net_lock:
            for nic in reversed(list(hp.nics)):
                async with _hotplug_errors(context):
                    await hp.detach_nic(nic)
            await asyncio.to_thread(record.unplumb_recorded, self.dir / L.NETWORK_RECORD)
        return vpb.DetachNetworkResponse()

    async def serve(self) -> None:
        self.server = grpc.aio.server()
        vpbg.add_VMServicer_to_server(self, self.server)
        self.server.add_generic_rpc_handlers((forward.handlers(lambda: self.agent),))
        sock = self.dir / L.MONITOR_SOCK
        self.server.add_insecure_port(f"unix:{sock}")
        await self.server.start()


_HOTPLUG_CODES = {
    ErrorKind.INVALID: grpc.StatusCode.INVALID_ARGUMENT,
    ErrorKind.LIMIT: grpc.StatusCode.RESOURCE_EXHAUSTED,
    ErrorKind.FAILED: grpc.StatusCode.ABORTED,
}


@contextlib.asynccontextmanager
async def _hotplug_errors(context: Any) -> AsyncIterator[None]:
    try:
        yield
    except HotplugError as exc:
        await context.abort(_HOTPLUG_CODES[exc.kind], str(exc))
    except (grpc.aio.AioRpcError, QMPError) as exc:
        await context.abort(grpc.StatusCode.ABORTED, f"hot-plug failed: {exc}")


class AgentCalls:
    """The agent RPCs hot-plug needs, over the monitor's own agent connection."""

    def __init__(self, channel: grpc.aio.Channel, timeout: float) -> None:
        self._ch = channel
        self._timeout = timeout

    def _call(self, name: str, req: Any, resp: Any) -> Any:
        return self._ch.unary_unary(
            AGENT_SERVICE + name,
            request_serializer=type(req).SerializeToString,
            response_deserializer=resp.FromString,
        )(req, timeout=self._timeout)

    async def online_cpus(self, count: int) -> int:
        r = await self._call(
            "OnlineCPUMem", apb.OnlineCPUMemRequest(nb_cpus=count), apb.OnlineCPUMemResponse
        )
        return int(r.cpus_online)

    async def offline_cpus(self, keep: int) -> int:
        r = await self._call(
            "OfflineCPUs", apb.OfflineCPUsRequest(keep_online=keep), apb.OnlineCPUMemResponse
        )
        return int(r.cpus_online)

    async def memory_total(self) -> int:
        r = await self._call(
            "OnlineCPUMem",
            apb.OnlineCPUMemRequest(nb_cpus=1, online_memory=True),
            apb.OnlineCPUMemResponse,
        )
        return int(r.mem_total_bytes)

    async def configure_interface(self, ep: Any, pci: str) -> None:
        """The guest NIC (found by MAC, or behind root port ``pci``) takes the interface's
        name, MTU and addresses."""
        await self._call(
            "UpdateInterface",
            apb.UpdateInterfaceRequest(
                interface=apb.Interface(
                    name=ep.name,
                    hw_addr=ep.mac,
                    mtu=ep.mtu,
                    pci_path=pci,
                    addresses=[
                        apb.IPAddress(
                            family=apb.IPAddress.V6 if a.family == 6 else apb.IPAddress.V4,
                            address=a.address,
                            prefix_len=a.prefix,
                        )
                        for a in ep.addresses
                    ],
                )
            ),
            apb.Interface,
        )

    async def configure_routes(self, plumbed: list[Any]) -> None:
        """Every interface's routes in one call (a gateway may sit behind another NIC),
        then the permanent neighbours."""
        routes = [
            apb.Route(
                dest=f"{r.dest}/{r.prefix}" if r.dest else "",
                gateway=r.gateway,
                device=p.endpoint.name,
                source=r.source,
                scope=r.scope,
                family=apb.IPAddress.V6 if r.family == 6 else apb.IPAddress.V4,
            )
            for p in plumbed
            for r in p.endpoint.routes
        ]
        if routes:
            await self._call(
                "UpdateRoutes",
                apb.UpdateRoutesRequest(routes=apb.Routes(routes=routes)),
                apb.Routes,
            )
        neigh = [
            apb.ARPNeighbor(to_ip=n.ip, device=p.endpoint.name, ll_addr=n.lladdr)
            for p in plumbed
            for n in p.endpoint.neighbours
        ]
        if neigh:
            await self._call(
                "AddARPNeighbors", apb.AddARPNeighborsRequest(neighbors=neigh), apb.Empty
            )

    async def wait_device(self, kind: str, address: str, timeout_ms: int) -> str:
        r = await self._ch.unary_unary(
            AGENT_SERVICE + "WaitDevice",
            request_serializer=apb.WaitDeviceRequest.SerializeToString,
            response_deserializer=apb.WaitDeviceResponse.FromString,
        )(
            apb.WaitDeviceRequest(type=kind, address=address, timeout_ms=timeout_ms),
            timeout=timeout_ms / 1000 + 5,
        )
        return str(r.guest_path or r.sysfs_path)


def _remove_dir(d: Path) -> None:
    try:
        hostmount.safe_rmtree(d)
    except (OSError, HostError) as exc:
        log.error("cannot remove %s: %s", d, exc)


def report(fd: int, payload: dict[str, object]) -> None:
    with contextlib.suppress(OSError):
        os.write(fd, (json.dumps(payload) + "\n").encode())
        os.close(fd)


async def amain(spec: L.LaunchSpec, ready_fd: int) -> int:
    loop = asyncio.get_running_loop()
    mon = Monitor(spec)
    stop_signal = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop_signal.set)
    loop.add_signal_handler(signal.SIGHUP, lambda: None)
    try:
        await mon.start()
        await mon.serve()
    except (StartError, OSError, QMPError) as exc:
        details = mon.diagnostics()
        log.error("sandbox %s failed to start: %s", spec.sandbox_id, exc)
        await mon.teardown()
        _remove_dir(spec.dir)
        report(ready_fd, {"ok": False, "error": str(exc), "details": details})
        return 1
    report(ready_fd, {"ok": True, "boot_seconds": mon.boot_seconds, "pid": os.getpid()})

    sig_wait = asyncio.create_task(stop_signal.wait())
    done_wait = asyncio.create_task(mon.done.wait())
    await asyncio.wait({sig_wait, done_wait}, return_when=asyncio.FIRST_COMPLETED)
    if stop_signal.is_set():
        await mon.stop(spec.shutdown_timeout_s)
    await mon.teardown()
    _remove_dir(spec.dir)
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="cocoon-monitor")
    ap.add_argument("--launch", required=True, type=Path)
    ap.add_argument("--ready-fd", type=int, default=-1)
    args = ap.parse_args(argv)
    fds.close_inherited({args.ready_fd})
    spec = L.LaunchSpec.read(args.launch)
    logs.setup(Path(spec.log_file) if spec.log_file else None, spec.log_format, spec.debug)
    # Everything at info level also goes to the state dir's monitor.log via stderr.
    logging.getLogger().handlers[-1].setLevel(logging.DEBUG if spec.debug else logging.INFO)
    (spec.dir / L.MONITOR_PID).write_text(f"{os.getpid()}\n")
    return asyncio.run(amain(spec, args.ready_fd))


if __name__ == "__main__":
    sys.exit(main())
