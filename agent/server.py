"""The agent's gRPC service: what the host can ask of the guest.

This release answers health, version, guest details, time sync, file copy, logs and sandbox
teardown. Every other method of agent.proto answers UNIMPLEMENTED (the generated base class
does that; the status says which method was called), so a host that is newer than the guest
gets a clear error.

May import: the standard library, grpc, cocoon.agent.{agent_pb2, agent_pb2_grpc, guest, logbuf}.
"""

from __future__ import annotations

import logging
import os
import platform
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc

from cocoon.agent import AGENT_VERSION, api_hash, guest
from cocoon.agent import agent_pb2 as pb
from cocoon.agent import agent_pb2_grpc as pbg
from cocoon.agent.logbuf import LogBuffer

log = logging.getLogger("cocoon.agent")


class AgentService(pbg.AgentServiceServicer):
    def __init__(
        self,
        logs: LogBuffer,
        channel: str,
        poweroff: Callable[[], None],
        root: Path = Path("/"),
    ) -> None:
        self._logs = logs
        self._channel = channel
        self._poweroff = poweroff
        self._root = root
        self._ready_uptime = 0.0
        self._api_hash = api_hash()

    @property
    def ready_uptime(self) -> float:
        return self._ready_uptime

    def mark_ready(self) -> None:
        self._ready_uptime = guest.read_facts(self._root).uptime

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
        log.info("sandbox destroy requested: powering off")
        # Answer first; power off shortly after so the reply reaches the host.
        threading.Timer(0.05, self._poweroff).start()
        return pb.Empty()
