"""The CLI's calls to a sandbox as framed JSON (cocoon.runtime.monitor.calls, served by the
stdio endpoint; cocoon.runtime.sandbox.client calling it): the VM service's answers and
refusals with their gRPC status names, agent methods forwarded to a gRPC agent with their
requests intact, deadlines, a client that goes away cancelling its call, a Shutdown answered
while the endpoint closes, and bad input closing only its own connection."""

from __future__ import annotations

import asyncio
import base64
import json
import socket
import threading
import time
from collections.abc import Awaitable, Iterator
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
import pytest

from cocoon.agent import agent_pb2 as apb
from cocoon.runtime.errors import StateError
from cocoon.runtime.monitor import calls as calls_mod
from cocoon.runtime.monitor import launch as L
from cocoon.runtime.monitor import stdio
from cocoon.runtime.sandbox.client import CallError, Client, b64
from tests.unit.test_monitor_service import Rig, _until


class FakeAgent:
    """The guest agent's gRPC service: Version, UpdateContainer (records what it got) and
    WaitProcess (blocks until released; notes when its caller cancels)."""

    def __init__(self) -> None:
        self.updates: list[apb.UpdateContainerRequest] = []
        self.release = asyncio.Event()
        self.waiting = asyncio.Event()
        self.cancelled = asyncio.Event()

    def handler(self) -> grpc.GenericRpcHandler:
        def unary(fn: Any, req: Any, resp: Any) -> grpc.RpcMethodHandler:
            return grpc.unary_unary_rpc_method_handler(
                fn, request_deserializer=req.FromString, response_serializer=resp.SerializeToString
            )

        return grpc.method_handlers_generic_handler(
            "cocoon.agent.v1.AgentService",
            {
                "Version": unary(self.version, apb.VersionRequest, apb.VersionResponse),
                "UpdateContainer": unary(self.update, apb.UpdateContainerRequest, apb.Empty),
                "WaitProcess": unary(self.wait, apb.WaitProcessRequest, apb.WaitProcessResponse),
            },
        )

    async def version(self, req: Any, ctx: Any) -> apb.VersionResponse:
        return apb.VersionResponse(agent_version="9.9", api_hash="h")

    async def update(self, req: apb.UpdateContainerRequest, ctx: Any) -> apb.Empty:
        if req.container_id == "missing":
            await ctx.abort(grpc.StatusCode.NOT_FOUND, "no container missing")
        self.updates.append(req)
        return apb.Empty()

    async def wait(self, req: Any, ctx: Any) -> apb.WaitProcessResponse:
        self.waiting.set()
        try:
            await self.release.wait()
        except asyncio.CancelledError:
            self.cancelled.set()
            raise
        return apb.WaitProcessResponse(status=137, signaled=True)


class Monitor:
    """An endpoint serving ``<dir>/stdio.sock`` in a thread of its own, with a Rig's VM
    service and a fake agent behind it; ``do`` runs a coroutine in its loop."""

    def __init__(self, d: Path, rig: Rig, agent_connected: bool = True) -> None:
        self.dir, self.rig = d, rig
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.agent: FakeAgent = self.do(self._agent())
        self.channel: grpc.aio.Channel | None = self.do(self._channel())
        connected = agent_connected
        self.endpoint = stdio.Endpoint(lambda: self.channel if connected else None, 5.0)
        self.endpoint.calls = calls_mod.Calls(rig.svc, lambda: self.channel if connected else None)
        self.do(self.endpoint.serve(d / L.STDIO_SOCK))

    def do(self, coro: Awaitable[Any], timeout: float = 20) -> Any:
        fut: Future[Any] = asyncio.run_coroutine_threadsafe(coro, self.loop)  # type: ignore[arg-type]
        return fut.result(timeout)

    async def _agent(self) -> FakeAgent:
        agent = FakeAgent()
        self.server = grpc.aio.server()
        self.server.add_generic_rpc_handlers((agent.handler(),))
        self.server.add_insecure_port(f"unix:{self.dir}/agent.sock")
        await self.server.start()
        return agent

    async def _channel(self) -> grpc.aio.Channel:
        return grpc.aio.insecure_channel(f"unix:{self.dir}/agent.sock")

    def close(self) -> None:
        async def shut() -> None:
            await self.endpoint.close()
            if self.channel is not None:
                await self.channel.close()
            await self.server.stop(grace=None)

        self.do(shut())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


@pytest.fixture
def mon(tmp_path: Path) -> Iterator[Monitor]:
    m = Monitor(tmp_path, Rig(tmp_path))
    yield m
    m.close()


# ----------------------------------------------------------------------------- the VM service
def test_a_vm_call_answers_every_field_in_the_protos_names(mon: Monitor) -> None:
    st = Client(mon.dir).vm.Status()
    assert (st["sandbox_id"], st["state"], st["qemu_pid"], st["boot_seconds"]) == (
        "sb1",
        "running",
        4242,
        1.25,
    )
    r = Client(mon.dir).vm.Resize({"vcpus": 2, "memory_mib": 256}, timeout=10)
    assert r["vcpus_online"] == 2
    assert r["memory_mib"] == "256"  # a uint64: a string in protobuf's JSON mapping
    r = Client(mon.dir).vm.Qmp({"command": "qom-get", "arguments_json": '{"path": "/x"}'})
    assert json.loads(r["return_json"]) == 0
    assert mon.rig.qemu.calls[-1] == ("qom-get", {"path": "/x"})


def test_a_refusal_carries_its_status_name_and_details(mon: Monitor) -> None:
    with pytest.raises(CallError) as info:
        Client(mon.dir).vm.Resize({"vcpus": 9, "memory_mib": 256}, timeout=10)
    assert info.value.code == "RESOURCE_EXHAUSTED"
    assert "at most 4" in info.value.details
    assert mon.rig.qemu.calls == []  # refused before QEMU heard of it


def test_a_handlers_unexpected_exception_is_unknown_and_the_endpoint_carries_on(
    mon: Monitor,
) -> None:
    async def broken(command: str, args: Any) -> Any:
        raise RuntimeError("bug")

    mon.rig.svc.qmp = broken
    with pytest.raises(CallError) as info:
        Client(mon.dir).vm.Qmp({"command": "query-status"})
    assert (info.value.code, info.value.details) == ("UNKNOWN", "RuntimeError: bug")
    assert Client(mon.dir).vm.Status()["state"] == "running"


def test_a_request_that_does_not_parse_is_invalid_argument(mon: Monitor) -> None:
    for bad in ({"vcpus": "many"}, {"no_such_field": 1}):
        with pytest.raises(CallError) as info:
            Client(mon.dir).vm.Resize(bad)
        assert info.value.code == "INVALID_ARGUMENT"
    assert mon.rig.qemu.calls == []


def test_a_streaming_method_is_left_to_grpc(mon: Monitor) -> None:
    with pytest.raises(CallError) as info:
        Client(mon.dir).vm.Events()
    assert info.value.code == "UNIMPLEMENTED"


def test_shutdown_is_answered_though_the_endpoint_closes_under_it(mon: Monitor) -> None:
    async def stop(timeout: float) -> str:
        await asyncio.sleep(0.2)
        return "agent"

    mon.rig.vm.stop = stop  # type: ignore[method-assign]
    done: list[Any] = []
    t = threading.Thread(
        target=lambda: done.append(Client(mon.dir).vm.Shutdown({"timeout_seconds": 3}))
    )
    t.start()
    mon.do(_until(lambda: bool(mon.endpoint.calling)))
    mon.do(mon.endpoint.close())  # as the monitor's teardown does, right after the stop
    t.join(10)
    assert done == [{"how": "agent"}]


# ----------------------------------------------------------------------------- the agent
def test_an_agent_call_is_forwarded_with_its_request_intact(mon: Monitor) -> None:
    assert Client(mon.dir).agent.Version()["agent_version"] == "9.9"
    res = json.dumps({"cpu": {"shares": 512}}).encode()
    assert (
        Client(mon.dir).agent.UpdateContainer({"container_id": "c", "resources_json": b64(res)})
        == {}
    )
    (got,) = mon.agent.updates
    assert (got.container_id, got.resources_json) == ("c", res)
    with pytest.raises(CallError) as info:
        Client(mon.dir).agent.UpdateContainer({"container_id": "missing"})
    assert (info.value.code, info.value.details) == ("NOT_FOUND", "no container missing")


def test_a_claims_cgroup_move_is_awaited_before_the_next_answer_and_fails_it_once(
    mon: Monitor,
) -> None:
    """Vm.claim answers before its processes' cgroup move is done: an agent call (the
    create) is forwarded meanwhile and answered once the move is; a move that failed is
    that call's ABORTED refusal, and the calls after it are answered as usual."""
    vm = mon.rig.vm
    moved = asyncio.Event()
    vm.moving = moved
    answered: list[str] = []

    def call() -> None:
        Client(mon.dir).agent.UpdateContainer({"container_id": "c"})
        answered.append("update")

    t = threading.Thread(target=call)
    t.start()
    mon.do(_until(lambda: bool(mon.agent.updates), 10))
    assert len(mon.agent.updates) == 1  # forwarded while the move runs
    time.sleep(0.2)
    assert answered == []  # but not answered before it is done
    mon.loop.call_soon_threadsafe(moved.set)
    t.join(10)
    assert answered == ["update"]

    failed = asyncio.Event()
    vm.moving, vm.move_error = failed, OSError(2, "No such file or directory")
    mon.loop.call_soon_threadsafe(failed.set)
    with pytest.raises(CallError) as info:
        Client(mon.dir).vm.Status({})
    assert info.value.code == "ABORTED"
    assert "claiming VM for sandbox" in info.value.details and "No such file" in info.value.details
    assert Client(mon.dir).vm.Status({})["state"] == "running"  # reported once


def test_a_shutdown_after_a_failed_claim_move_is_not_refused(
    mon: Monitor, caplog: pytest.LogCaptureFixture
) -> None:
    """The sandbox must still be stoppable in order: the failure is only logged there."""
    failed = asyncio.Event()
    mon.rig.vm.moving, mon.rig.vm.move_error = failed, OSError(2, "No such file or directory")
    mon.loop.call_soon_threadsafe(failed.set)
    with caplog.at_level("WARNING", logger="cocoon.monitor.service"):
        assert Client(mon.dir).vm.Shutdown({"timeout_seconds": 3}) == {"how": "agent"}
    assert mon.rig.vm.stopped_with == [3]
    assert any("claiming VM for sandbox" in r.getMessage() for r in caplog.records)


def test_a_call_past_its_deadline_is_deadline_exceeded_and_cancelled(mon: Monitor) -> None:
    with pytest.raises(CallError) as info:
        Client(mon.dir).agent.WaitProcess({"container_id": "c"}, timeout=0.5)
    assert info.value.code == "DEADLINE_EXCEEDED"
    mon.do(asyncio.wait_for(mon.agent.cancelled.wait(), 5))


def test_a_client_that_goes_away_cancels_its_call(mon: Monitor) -> None:
    body = b'{"container_id": "c"}'
    with socket.socket(socket.AF_UNIX) as s:
        s.connect(str(mon.dir / L.STDIO_SOCK))
        head = {"call": "AgentService/WaitProcess", "size": len(body), "timeout": 60}
        s.sendall(json.dumps(head).encode() + b"\n" + body)
        mon.do(asyncio.wait_for(mon.agent.waiting.wait(), 5))
    mon.do(asyncio.wait_for(mon.agent.cancelled.wait(), 5))
    mon.do(_until(lambda: not mon.endpoint.calling))


def test_an_agent_not_connected_is_unavailable(tmp_path: Path) -> None:
    m = Monitor(tmp_path, Rig(tmp_path), agent_connected=False)
    try:
        with pytest.raises(CallError) as info:
            Client(tmp_path).agent.Version()
        assert info.value.code == "UNAVAILABLE"
        assert Client(tmp_path).vm.Status()["state"] == "running"  # the VM service still is
    finally:
        m.close()


# ----------------------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    "head",
    [
        {"call": "VM/NoSuchMethod", "size": 2, "timeout": 1},
        {"call": "Nope/Status", "size": 2, "timeout": 1},
        {"call": "VM/Status", "size": -1, "timeout": 1},
        {"call": "VM/Status", "size": calls_mod.CALL_MAX + 1, "timeout": 1},
        {"call": "VM/Status", "size": 2, "timeout": 0},
        {"call": "VM/Status", "size": 2, "timeout": "soon"},
        {"call": "VM/Status", "size": 2, "timeout": 1, "extra": True},
        {"call": ["VM", "Status"], "size": 2, "timeout": 1},
    ],
)
def test_a_bad_call_line_closes_its_connection_unanswered(mon: Monitor, head: Any) -> None:
    with pytest.raises(calls_mod.BadCall):
        calls_mod.parse_header(dict(head))
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(10)
        s.connect(str(mon.dir / L.STDIO_SOCK))
        s.sendall(json.dumps(head).encode() + b"\n{}")
        assert s.recv(100) == b""
    assert Client(mon.dir).vm.Status()["state"] == "running"


def test_a_sandbox_without_a_monitor(tmp_path: Path) -> None:
    with pytest.raises(StateError, match="not running"):
        Client(tmp_path)
    with socket.socket(socket.AF_UNIX) as s:  # a socket left behind, nobody listening
        s.bind(str(tmp_path / L.STDIO_SOCK))
    with pytest.raises(CallError) as info:
        Client(tmp_path).vm.Status()
    assert info.value.code == "UNAVAILABLE"


def test_b64_is_protobufs_bytes_mapping() -> None:
    assert base64.b64decode(b64(b"\x00\xffspec")) == b"\x00\xffspec"
