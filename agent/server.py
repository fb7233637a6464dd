"""The agent's gRPC service: what the host can ask of the guest.

This release answers health, version, guest details, time sync, file copy, logs, sandbox
teardown, containers and their processes, CPU/memory/device hot-plug and network
configuration (UpdateInterface, ListInterfaces, UpdateRoutes, AddARPNeighbors,
SetNetworkIdentity). Every other method of agent.proto answers UNIMPLEMENTED (the generated
base class does that; the status says which method was called), so a host that is newer than
the guest gets a clear error.

The agent's own errors (cocoon.agent.errors) come back to the host as the gRPC status of their
kind (``_CODES``) with their message as the details; any other OSError is INTERNAL.

May import: the standard library, grpc, cocoon.agent (AGENT_VERSION, api_hash),
cocoon.agent.{agent_pb2, agent_pb2_grpc, containers, devices, entropy, errors, guest, kmod,
logbuf, network}.
"""

from __future__ import annotations

import contextlib
import logging
import os
import platform
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc

from cocoon.agent import AGENT_VERSION, api_hash, entropy, guest
from cocoon.agent import agent_pb2 as pb
from cocoon.agent import agent_pb2_grpc as pbg
from cocoon.agent.containers import Manager
from cocoon.agent.devices import Devices
from cocoon.agent.errors import AgentError, ContainerError, ErrorKind
from cocoon.agent.kmod import LateModules
from cocoon.agent.logbuf import LogBuffer
from cocoon.agent.network import Iface, Network, RouteSpec

log = logging.getLogger("cocoon.agent")


class AgentService(pbg.AgentServiceServicer):
    def __init__(
        self,
        logs: LogBuffer,
        channel: str,
        poweroff: Callable[[], None],
        root: Path = Path("/"),
        containers: Manager | None = None,
        modules: LateModules | None = None,
    ) -> None:
        self._containers = containers
        self._modules = modules
        self._devices = Devices(root)
        self._network = Network(root)
        self._logs = logs
        self._channel = channel
        self._poweroff = poweroff
        self._root = root
        self._ready_uptime = 0.0
        self._api_hash = api_hash()

    @property
    def containers(self) -> Manager:
        if self._containers is None:
            raise ContainerError(ErrorKind.PRECONDITION, "this agent runs no containers")
        return self._containers

    @property
    def ready_uptime(self) -> float:
        return self._ready_uptime

    def mark_ready(self) -> None:
        self._ready_uptime = guest.read_facts(self._root).uptime

    def _devices_loaded(self) -> None:
        """Calls that need a late kernel module (the share, disks, NICs, virtio-mem) wait
        for them (kmod.LateModules); OSError if one failed to load."""
        if self._modules is not None:
            self._modules.wait()

    def Check(self, request: pb.CheckRequest, context: grpc.ServicerContext) -> pb.CheckResponse:
        return pb.CheckResponse(status=pb.CheckResponse.SERVING)

    def Version(
        self, request: pb.VersionRequest, context: grpc.ServicerContext
    ) -> pb.VersionResponse:
        return pb.VersionResponse(
            agent_version=AGENT_VERSION,
            api_hash=self._api_hash,
            python_version=platform.python_version(),
            grpc_version=grpc.__version__,
        )

    def GetGuestDetails(
        self, request: pb.GuestDetailsRequest, context: grpc.ServicerContext
    ) -> pb.GuestDetailsResponse:
        f = guest.read_facts(self._root)
        return pb.GuestDetailsResponse(
            kernel_release=f.kernel_release,
            kernel_version=f.kernel_version,
            machine=f.machine,
            cpus_online=f.cpus_online,
            cpus_possible=f.cpus_possible,
            mem_total_bytes=f.mem_total,
            mem_free_bytes=f.mem_free,
            mem_available_bytes=f.mem_available,
            memory=pb.MemoryBlockInfo(
                block_size_bytes=f.memory_block_size,
                hotplug_probe=(self._root / "sys/devices/system/memory/probe").exists(),
            ),
            agent_version=AGENT_VERSION,
            uptime_seconds=f.uptime,
            agent_ready_uptime_seconds=self._ready_uptime,
            channel=self._channel,
        )

    def SetGuestDateTime(
        self, request: pb.SetGuestDateTimeRequest, context: grpc.ServicerContext
    ) -> pb.Empty:
        try:
            time.clock_settime(time.CLOCK_REALTIME, request.sec + request.usec / 1e6)
        except OSError as exc:
            context.abort(grpc.StatusCode.INTERNAL, f"set guest time: {exc}")
        return pb.Empty()

    def ReseedRandomDev(
        self, request: pb.ReseedRandomDevRequest, context: grpc.ServicerContext
    ) -> pb.Empty:
        try:
            entropy.reseed(request.data)
        except ValueError as exc:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        except OSError as exc:
            context.abort(grpc.StatusCode.INTERNAL, f"reseed the guest's RNG: {exc}")
        log.info("RNG reseeded with %d bytes from the host", len(request.data))
        return pb.Empty()

    def CopyFile(self, request: pb.CopyFileRequest, context: grpc.ServicerContext) -> pb.Empty:
        path = Path(request.path)
        if not path.is_absolute() or ".." in path.parts:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"copy file: bad path {request.path!r}")
        target = self._root / path.relative_to("/")
        try:
            target.parent.mkdir(parents=True, exist_ok=True, mode=request.dir_mode or 0o755)
            fd = os.open(
                target, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, request.file_mode or 0o644
            )
            try:
                if request.offset == 0:
                    os.ftruncate(fd, 0)
                os.pwrite(fd, request.data, request.offset)
                os.fchown(fd, request.uid, request.gid)
            finally:
                os.close(fd)
        except OSError as exc:
            context.abort(grpc.StatusCode.INTERNAL, f"copy file {request.path}: {exc}")
        return pb.Empty()

    def ReadLogs(
        self, request: pb.ReadLogsRequest, context: grpc.ServicerContext
    ) -> Iterator[pb.LogRecord]:
        for rec in self._logs.records(follow=request.follow, alive=context.is_active):
            yield pb.LogRecord(time=rec.time, level=rec.level, message=rec.message)

    def DestroySandbox(
        self, request: pb.DestroySandboxRequest, context: grpc.ServicerContext
    ) -> pb.Empty:
        # Everything written is on the host before the answer (through virtio-fs and the
        # disks): the monitor then ends QEMU at once (QMP quit, as Kata does) instead of
        # waiting for the guest's own shutdown. Power off shortly after too, for a host that
        # does not quit it; answer first so that the reply reaches the host.
        # sync() only when the guest holds something to write: through virtio-fs a sync() is
        # also FUSE_SYNCFS, which virtiofsd answers with syncfs() of the host's filesystem,
        # waiting for all the host's own dirty data on it (a second on a host busy writing).
        # Writes through virtio-fs without a writeback cache are on the host already, as
        # runc's are in its page cache; what a sync is for here (the disks, and pages of
        # shared mappings of virtio-fs files) is counted as dirty.
        dirty = guest.dirty_bytes(self._root)
        if dirty:
            what = "unknown" if dirty < 0 else f"{dirty} bytes"
            log.info("sandbox destroy requested: %s dirty, syncing, then powering off", what)
            os.sync()
        else:
            log.info("sandbox destroy requested: nothing dirty, powering off")
        threading.Timer(0.05, self._poweroff).start()
        return pb.Empty()

    # ------------------------------------------------------------------ containers
    def CreateContainer(
        self, request: pb.CreateContainerRequest, context: grpc.ServicerContext
    ) -> pb.Empty:
        with _errors(context):
            self._devices_loaded()
            self.containers.create(
                request.container_id,
                request.oci_spec_json,
                request.stdio.stdin,
                [(d.vm_path, d.container_path) for d in request.devices if d.type == "blk"],
                start=request.start,
            )
        return pb.Empty()

    def StartContainer(
        self, request: pb.StartContainerRequest, context: grpc.ServicerContext
    ) -> pb.Empty:
        with _errors(context):
            self.containers.start(request.container_id)
        return pb.Empty()

    def RemoveContainer(
        self, request: pb.RemoveContainerRequest, context: grpc.ServicerContext
    ) -> pb.Empty:
        with _errors(context):
            self.containers.remove(request.container_id)
        return pb.Empty()

    def PauseContainer(
        self, request: pb.PauseContainerRequest, context: grpc.ServicerContext
    ) -> pb.Empty:
        with _errors(context):
            self.containers.pause(request.container_id)
        return pb.Empty()

    def ResumeContainer(
        self, request: pb.ResumeContainerRequest, context: grpc.ServicerContext
    ) -> pb.Empty:
        with _errors(context):
            self.containers.resume(request.container_id)
        return pb.Empty()

    def UpdateContainer(
        self, request: pb.UpdateContainerRequest, context: grpc.ServicerContext
    ) -> pb.Empty:
        with _errors(context):
            self.containers.update(request.container_id, request.resources_json)
        return pb.Empty()

    def StatsContainer(
        self, request: pb.StatsContainerRequest, context: grpc.ServicerContext
    ) -> pb.StatsContainerResponse:
        with _errors(context):
            st = self.containers.stats(request.container_id)
        usage = st.get("usage_usec", 0) * 1000
        return pb.StatsContainerResponse(
            cpu=pb.CpuStats(
                usage_total_ns=usage,
                usage_user_ns=st.get("user_usec", 0) * 1000,
                usage_kernel_ns=st.get("system_usec", 0) * 1000,
                throttled_periods=st.get("nr_throttled", 0),
                throttled_time_ns=st.get("throttled_usec", 0) * 1000,
            ),
            memory=pb.MemoryStats(
                usage_bytes=st.get("memory", 0),
                max_usage_bytes=st.get("memory_peak", 0),
                limit_bytes=st.get("memory_limit", 0),
                cache_bytes=st.get("cache", 0),
                failcnt=st.get("oom_kill", 0),
            ),
            pids=pb.PidsStats(current=st.get("pids", 0), limit=st.get("pids_limit", 0)),
        )

    def ListProcesses(
        self, request: pb.ListProcessesRequest, context: grpc.ServicerContext
    ) -> pb.ListProcessesResponse:
        with _errors(context):
            procs = self.containers.processes(request.container_id)
        return pb.ListProcessesResponse(
            processes=[pb.ProcessInfo(pid=pid, exec_id=e, args=a) for pid, e, a in procs]
        )

    def ExecProcess(
        self, request: pb.ExecProcessRequest, context: grpc.ServicerContext
    ) -> pb.Empty:
        with _errors(context):
            self.containers.exec(
                request.container_id, request.exec_id, request.process_json, request.stdio.stdin
            )
        return pb.Empty()

    def SignalProcess(
        self, request: pb.SignalProcessRequest, context: grpc.ServicerContext
    ) -> pb.Empty:
        with _errors(context):
            self.containers.signal(
                request.container_id, request.exec_id, request.signal, request.all
            )
        return pb.Empty()

    def WaitProcess(
        self, request: pb.WaitProcessRequest, context: grpc.ServicerContext
    ) -> pb.WaitProcessResponse:
        with _errors(context):
            p = self.containers.wait(request.container_id, request.exec_id, context.is_active)
        if p.status is None:
            context.abort(grpc.StatusCode.CANCELLED, "wait abandoned")
        return pb.WaitProcessResponse(status=p.status or 0, signaled=p.signaled)

    def WriteStdin(
        self, request_iterator: Iterator[pb.WriteStreamRequest], context: grpc.ServicerContext
    ) -> pb.WriteStreamResponse:
        first = next(request_iterator, None)
        if first is None:
            return pb.WriteStreamResponse(written=0)

        def chunks() -> Iterator[bytes]:
            yield first.data
            for r in request_iterator:
                yield r.data

        with _errors(context):
            n = self.containers.write_stdin(first.container_id, first.exec_id, chunks())
        return pb.WriteStreamResponse(written=n)

    def CloseStdin(self, request: pb.CloseStdinRequest, context: grpc.ServicerContext) -> pb.Empty:
        with _errors(context):
            self.containers.close_stdin(request.container_id, request.exec_id)
        return pb.Empty()

    def ReadStdout(
        self, request: pb.ReadStreamRequest, context: grpc.ServicerContext
    ) -> Iterator[pb.ReadStreamResponse]:
        return self._read(request, context, "stdout")

    def ReadStderr(
        self, request: pb.ReadStreamRequest, context: grpc.ServicerContext
    ) -> Iterator[pb.ReadStreamResponse]:
        return self._read(request, context, "stderr")

    def _read(
        self, request: pb.ReadStreamRequest, context: grpc.ServicerContext, which: str
    ) -> Iterator[pb.ReadStreamResponse]:
        with _errors(context):
            stream = self.containers.read_stream(
                request.container_id, request.exec_id, which, context.is_active
            )
        for data in stream:
            yield pb.ReadStreamResponse(data=data)

    def TtyWinResize(
        self, request: pb.TtyWinResizeRequest, context: grpc.ServicerContext
    ) -> pb.Empty:
        with _errors(context):
            self.containers.resize(
                request.container_id, request.exec_id, request.rows, request.columns
            )
        return pb.Empty()

    # ------------------------------------------------------------------ resources, devices
    def OnlineCPUMem(
        self, request: pb.OnlineCPUMemRequest, context: grpc.ServicerContext
    ) -> pb.OnlineCPUMemResponse:
        with _errors(context):
            online = self._devices.online_cpus(request.nb_cpus)
            if request.online_memory:
                self._devices_loaded()
                self._devices.online_memory()
        return self._cpumem(online)

    def OfflineCPUs(
        self, request: pb.OfflineCPUsRequest, context: grpc.ServicerContext
    ) -> pb.OnlineCPUMemResponse:
        with _errors(context):
            online = self._devices.offline_cpus(request.keep_online)
        return self._cpumem(online)

    def _cpumem(self, online: int) -> pb.OnlineCPUMemResponse:
        facts = guest.read_facts(self._root)
        return pb.OnlineCPUMemResponse(cpus_online=online, mem_total_bytes=facts.mem_total)

    def WaitDevice(
        self, request: pb.WaitDeviceRequest, context: grpc.ServicerContext
    ) -> pb.WaitDeviceResponse:
        timeout = (request.timeout_ms or 10000) / 1000
        with _errors(context):
            self._devices_loaded()
            path = self._devices.wait_device(request.type, request.address, timeout)
        if request.type in ("pci", "virtiofs"):
            return pb.WaitDeviceResponse(sysfs_path=path)
        return pb.WaitDeviceResponse(guest_path=path)

    # ------------------------------------------------------------------ network
    def UpdateInterface(
        self, request: pb.UpdateInterfaceRequest, context: grpc.ServicerContext
    ) -> pb.Interface:
        i = request.interface
        iface = Iface(
            name=i.name,
            mac=i.hw_addr,
            mtu=i.mtu,
            pci=i.pci_path,
            addresses=[
                (6 if a.family == pb.IPAddress.V6 else 4, a.address, a.prefix_len)
                for a in i.addresses
            ],
        )
        with _errors(context):
            self._devices_loaded()
            device = self._network.update_interface(iface)
        out = pb.Interface()
        out.CopyFrom(i)
        out.device = device
        return out

    def ListInterfaces(
        self, request: pb.ListInterfacesRequest, context: grpc.ServicerContext
    ) -> pb.Interfaces:
        with _errors(context):
            self._devices_loaded()
            ifaces = self._network.list_interfaces()
        return pb.Interfaces(
            interfaces=[
                pb.Interface(
                    device=f.name,
                    name=f.name,
                    hw_addr=f.mac,
                    mtu=f.mtu,
                    addresses=[
                        pb.IPAddress(
                            family=pb.IPAddress.V6 if fam == 6 else pb.IPAddress.V4,
                            address=ip,
                            prefix_len=prefix,
                        )
                        for fam, ip, prefix in f.addresses
                    ],
                )
                for f in ifaces
            ]
        )

    def UpdateRoutes(
        self, request: pb.UpdateRoutesRequest, context: grpc.ServicerContext
    ) -> pb.Routes:
        routes = [
            RouteSpec(
                family=6 if r.family == pb.IPAddress.V6 else 4,
                dest=r.dest,
                gateway=r.gateway,
                device=r.device,
                source=r.source,
                scope=r.scope,
            )
            for r in request.routes.routes
        ]
        with _errors(context):
            self._network.update_routes(routes)
        return request.routes

    def AddARPNeighbors(
        self, request: pb.AddARPNeighborsRequest, context: grpc.ServicerContext
    ) -> pb.Empty:
        with _errors(context):
            self._network.add_neighbours(
                [(n.to_ip, n.ll_addr, n.device) for n in request.neighbors]
            )
        return pb.Empty()

    def SetNetworkIdentity(
        self, request: pb.SetNetworkIdentityRequest, context: grpc.ServicerContext
    ) -> pb.Empty:
        with _errors(context):
            self._network.set_identity(request.hostname, request.hosts, request.resolv_conf)
        return pb.Empty()


_CODES = {
    ErrorKind.NOT_FOUND: grpc.StatusCode.NOT_FOUND,
    ErrorKind.EXISTS: grpc.StatusCode.ALREADY_EXISTS,
    ErrorKind.INVALID: grpc.StatusCode.INVALID_ARGUMENT,
    ErrorKind.PRECONDITION: grpc.StatusCode.FAILED_PRECONDITION,
    ErrorKind.INTERNAL: grpc.StatusCode.INTERNAL,
}


@contextlib.contextmanager
def _errors(context: grpc.ServicerContext) -> Iterator[None]:
    """Turns the agent's errors into the gRPC status of their kind, with their message
    (ContainerError: its own kind; DeviceError: FAILED_PRECONDITION; NetError:
    INVALID_ARGUMENT), and any other OSError into INTERNAL."""
    try:
        yield
    except AgentError as exc:
        context.abort(_CODES[exc.kind], str(exc))
    except OSError as exc:
        context.abort(grpc.StatusCode.INTERNAL, str(exc))
