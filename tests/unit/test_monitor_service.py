"""The monitor's VM service (cocoon.runtime.monitor.service) through its table, with a fake QEMU,
a fake agent and a fake VM: what each RPC answers, which gRPC status each refusal gets (one per
ErrorKind), that nothing reaches QEMU when a request is refused, and the same over a real gRPC
socket (the descriptor-built handler)."""

from __future__ import annotations

import asyncio
import dataclasses
import json
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
import pytest
from qemu.qmp.error import QMPError

from cocoon.runtime import vm_pb2 as vpb
from cocoon.runtime import vm_pb2_grpc as vpbg
from cocoon.runtime.errors import ErrorKind, HotplugError, NetworkError
from cocoon.runtime.monitor import launch as L
from cocoon.runtime.monitor import service
from tests.unit.fakes import MIB, FakeAgent, FakeQemu, launch_spec, limits, no_event

S = grpc.StatusCode


class FakeVm:
    """The VM's lifecycle as the service sees it (service.VmControl)."""

    def __init__(self) -> None:
        self.state = "running"
        self.boot_seconds = 1.25
        self.subscribers: list[asyncio.Queue[vpb.Event | None]] = []
        self.done = asyncio.Event()
        self.stopped_with: list[float] = []

    @property
    def qemu_pid(self) -> int:
        return 4242

    async def stop(self, timeout: float) -> str:
        self.stopped_with.append(timeout)
        self.state = "stopped"
        return "agent"

    async def claim(self, spec: L.LaunchSpec, nice: int) -> None:
        if spec.cgroup.join == ["/unjoinable"]:
            raise OSError(13, "Permission denied")
        self.claimed = (spec, nice)

    # A claim's cgroup move, which Vm.claim leaves running after its answer: a test sets
    # ``moving`` (released by ``moved``), ``move_error`` for one that fails.
    moving: asyncio.Event | None = None
    move_error: OSError | None = None

    async def claim_settled(self) -> None:
        moving, self.moving = self.moving, None
        if moving is not None:
            await moving.wait()
            err, self.move_error = self.move_error, None
            if err is not None:
                raise err


class Aborted(Exception):
    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(f"{code}: {details}")
        self.code, self.details = code, details


class FakeContext:
    async def abort(self, code: grpc.StatusCode, details: str) -> None:
        raise Aborted(code, details)


class Rig:
    def __init__(self, state_dir: Path, qemu: FakeQemu | None = None, **kw: Any) -> None:
        self.qemu = qemu or FakeQemu()
        self.agent = FakeAgent(self.qemu)
        self.vm = FakeVm()
        self.spec = launch_spec(state_dir, limits=limits(**kw))
        self.svc = service.Service(
            self.spec,
            self.vm,
            self.qemu,
            no_event,
            self.agent,
            pass_fd=self.qemu.pass_fd,
            device_timeout_s=0.3,
            add_fd=self.qemu.add_fd,
        )

    def rpc(self, name: str, request: Any) -> Any:
        """RPC ``name`` through the table, as the gRPC handler runs it."""
        return asyncio.run(service.call(self.svc, name, request, FakeContext()))

    def refused(self, name: str, request: Any) -> Aborted:
        with pytest.raises(Aborted) as info:
            self.rpc(name, request)
        return info.value


@pytest.fixture
def rig(tmp_path: Path) -> Rig:
    return Rig(tmp_path)


# ----------------------------------------------------------------------------- the table
def test_the_table_serves_every_rpc_of_vm_proto_and_nothing_else() -> None:
    assert set(service.TABLE) == {m.name for m in service.SERVICE.methods}
    assert len(service.TABLE) == 12


def test_every_error_kind_has_its_status() -> None:
    assert service.CODES == {
        ErrorKind.INVALID: S.INVALID_ARGUMENT,
        ErrorKind.LIMIT: S.RESOURCE_EXHAUSTED,
        ErrorKind.FAILED: S.ABORTED,
    }
    assert set(service.CODES) == set(ErrorKind)
    assert service.status_for(NetworkError("no such netns")) == (
        S.INVALID_ARGUMENT,
        "no such netns",
    )
    assert service.status_for(HotplugError(ErrorKind.LIMIT, "full")) == (
        S.RESOURCE_EXHAUSTED,
        "full",
    )


def test_an_unexpected_exception_is_not_turned_into_a_status(rig: Rig) -> None:
    rig.svc.qmp = _raising(RuntimeError("bug"))
    with pytest.raises(RuntimeError, match="bug"):
        rig.rpc("Qmp", vpb.QmpRequest(command="query-status"))


# ----------------------------------------------------------------------------- lifecycle
def test_status(rig: Rig) -> None:
    r = rig.rpc("Status", vpb.StatusRequest())
    assert (r.sandbox_id, r.state, r.qemu_pid, r.accel, r.channel, r.boot_seconds) == (
        "sb1",
        "running",
        4242,
        "tcg",
        "virtio-serial",
        1.25,
    )
    assert r.monitor_pid > 0


@pytest.mark.parametrize(("asked", "used"), [(0, 7.0), (3, 3.0)])
def test_shutdown_stops_with_the_asked_or_configured_timeout(
    rig: Rig, asked: int, used: float
) -> None:
    r = rig.rpc("Shutdown", vpb.ShutdownRequest(timeout_seconds=asked))
    assert r.how == "agent" and rig.vm.stopped_with == [used] and rig.vm.done.is_set()


def test_qmp_passthrough(rig: Rig) -> None:
    r = rig.rpc("Qmp", vpb.QmpRequest(command="query-hotpluggable-cpus"))
    assert len(json.loads(r.return_json)) == 4
    r = rig.rpc("Qmp", vpb.QmpRequest(command="qom-get", arguments_json='{"path": "/x"}'))
    assert json.loads(r.return_json) == 0 and rig.qemu.calls[-1] == ("qom-get", {"path": "/x"})


def test_qmp_bad_arguments_and_qemu_errors(rig: Rig) -> None:
    e = rig.refused("Qmp", vpb.QmpRequest(command="qom-get", arguments_json="{nope"))
    assert e.code == S.INVALID_ARGUMENT and e.details.startswith("arguments_json: ")
    assert rig.qemu.calls == []
    rig.svc.qmp = _raising(QMPError("no such command"))
    e = rig.refused("Qmp", vpb.QmpRequest(command="frob"))
    assert (e.code, e.details) == (S.FAILED_PRECONDITION, "QMP frob: no such command")


# ----------------------------------------------------------------------------- hot-plug
def test_resize_grows_and_reports(rig: Rig) -> None:
    r = rig.rpc("Resize", vpb.ResizeRequest(vcpus=3, memory_mib=1024))
    assert (r.vcpus_online, r.memory_mib) == (3, 1024)
    assert r.guest_mem_total_bytes == 256 * MIB + 768 * MIB  # the agent's MemTotal
    assert set(r.seconds) == {"cpu", "memory"}
    assert [a["id"] for a in rig.qemu.sent("device_add")] == ["vcpu1", "vcpu2"]
    assert rig.agent.online == 3


@pytest.mark.parametrize(
    ("vcpus", "memory_mib", "fail", "code", "details"),
    [
        (0, 256, "", S.INVALID_ARGUMENT, "vCPUs must be at least 1, got 0"),
        (5, 256, "", S.RESOURCE_EXHAUSTED, "5 vCPUs asked, the sandbox holds at most 4"),
        (1, 4096, "", S.RESOURCE_EXHAUSTED, "the sandbox holds at most 2048 MiB"),
        (2, 256, "device_add", S.ABORTED, "vCPU hot-add: device_add refused"),
    ],
)
def test_resize_refusals_get_their_kinds_status(
    tmp_path: Path, vcpus: int, memory_mib: int, fail: str, code: grpc.StatusCode, details: str
) -> None:
    rig = Rig(tmp_path, FakeQemu(fail=lambda c, a: f"{c} refused" if c == fail else ""))
    e = rig.refused("Resize", vpb.ResizeRequest(vcpus=vcpus, memory_mib=memory_mib))
    assert e.code == code and details in e.details
    if code != S.ABORTED:
        assert rig.qemu.calls == []  # refused before anything reached QEMU
    assert rig.svc.hotplug.cpus_online == 1


def test_attach_and_detach_disk(rig: Rig, tmp_path: Path) -> None:
    img = tmp_path / "disk.img"
    img.write_bytes(b"\0" * 4096)
    r = rig.rpc("AttachDisk", vpb.AttachDiskRequest(id="d0", path=str(img), readonly=True))
    assert (r.guest_path, r.scsi_target) == ("/dev/sda", 1) and set(r.seconds) == {"qmp", "guest"}
    add = rig.qemu.sent("blockdev-add")[0]
    assert add["read-only"] and add["file"] == {"driver": "file", "filename": "/dev/fdset/1"}
    assert rig.qemu.fdsets == {1: str(img)}
    e = rig.refused("AttachDisk", vpb.AttachDiskRequest(id="d0", path=str(img)))
    assert (e.code, e.details) == (S.INVALID_ARGUMENT, "disk d0 is already attached")
    assert isinstance(rig.rpc("DetachDisk", vpb.DetachDiskRequest(id="d0")), vpb.DetachDiskResponse)
    assert rig.qemu.nodes == set() and rig.qemu.devices == set() and rig.qemu.fdsets == {}
    e = rig.refused("DetachDisk", vpb.DetachDiskRequest(id="d0"))
    assert (e.code, e.details) == (S.INVALID_ARGUMENT, "disk d0 is not attached")


def test_attach_disk_missing_file_is_refused_before_qmp(rig: Rig, tmp_path: Path) -> None:
    missing = tmp_path / "nope.img"
    e = rig.refused("AttachDisk", vpb.AttachDiskRequest(id="d0", path=str(missing)))
    assert (e.code, e.details) == (S.INVALID_ARGUMENT, f"disk {missing}: No such file or directory")
    assert rig.qemu.calls == []


def test_vfio_attach_limit_and_detach(tmp_path: Path) -> None:
    rig = Rig(tmp_path, root_ports=2)
    r = rig.rpc("AttachVfio", vpb.AttachVfioRequest(id="v0", host_bdfs=["0000:03:00.0"]))
    assert list(r.guest_paths) == ["/sys/bus/pci/devices/0000:00:10.0/x"]
    two = ["0000:04:00.0", "0000:04:00.1"]
    e = rig.refused("AttachVfio", vpb.AttachVfioRequest(id="v1", host_bdfs=two))
    assert (
        e.code == S.RESOURCE_EXHAUSTED and "2 PCI devices to plug, 1 free root ports" in e.details
    )
    rig.rpc("DetachVfio", vpb.DetachVfioRequest(id="v0"))
    assert rig.qemu.devices == set()
    e = rig.refused("DetachVfio", vpb.DetachVfioRequest(id="v0"))
    assert (e.code, e.details) == (S.INVALID_ARGUMENT, "VFIO device v0 is not attached")


def test_agent_failure_under_hotplug_is_aborted_and_rolled_back(rig: Rig) -> None:
    rig.agent.device_error = grpc.aio.AioRpcError(
        S.DEADLINE_EXCEEDED, grpc.aio.Metadata(), grpc.aio.Metadata(), details="too slow"
    )
    e = rig.refused("AttachVfio", vpb.AttachVfioRequest(id="v0", host_bdfs=["0000:03:00.0"]))
    assert e.code == S.ABORTED and e.details.startswith("hot-plug failed: ")
    assert rig.qemu.devices == set() and rig.svc.hotplug.vfio == {}


@pytest.mark.parametrize("state", ["booting", "stopping", "stopped"])
@pytest.mark.parametrize(
    ("name", "req"),
    [
        ("Resize", vpb.ResizeRequest(vcpus=2, memory_mib=512)),
        ("AttachDisk", vpb.AttachDiskRequest(id="d0", path="/dev/null")),
        ("DetachDisk", vpb.DetachDiskRequest(id="d0")),
        ("AttachVfio", vpb.AttachVfioRequest(id="v0", host_bdfs=["0000:03:00.0"])),
        ("DetachVfio", vpb.DetachVfioRequest(id="v0")),
        ("AttachNetwork", vpb.AttachNetworkRequest(netns_path="/x", model="tcfilter")),
        ("DetachNetwork", vpb.DetachNetworkRequest()),
    ],
)
def test_hotplug_refused_unless_running(rig: Rig, state: str, name: str, req: Any) -> None:
    rig.vm.state = state
    e = rig.refused(name, req)
    assert (e.code, e.details) == (S.FAILED_PRECONDITION, "the VM is not running")
    assert rig.qemu.calls == [] and rig.agent.devices_seen == {}


# ----------------------------------------------------------------------------- networking
def test_attach_network_bad_netns_is_invalid_argument(rig: Rig, tmp_path: Path) -> None:
    ns = tmp_path / "no-such-netns"
    e = rig.refused("AttachNetwork", vpb.AttachNetworkRequest(netns_path=str(ns), model="tcfilter"))
    assert (e.code, e.details) == (
        S.INVALID_ARGUMENT,
        f"network namespace {ns}: No such file or directory",
    )
    assert rig.qemu.calls == [] and not (tmp_path / L.NETWORK_RECORD).exists()


def test_attach_network_twice_is_refused(rig: Rig, tmp_path: Path) -> None:
    (tmp_path / L.NETWORK_RECORD).write_text('{"netns": "", "records": []}')
    e = rig.refused("AttachNetwork", vpb.AttachNetworkRequest(netns_path="/x", model="tcfilter"))
    assert (e.code, e.details) == (S.FAILED_PRECONDITION, "the sandbox has a network already")


def test_detach_network_unplugs_every_nic_and_drops_the_record(rig: Rig, tmp_path: Path) -> None:
    hp = rig.svc.hotplug
    asyncio.run(hp.attach_nic("net0", [7], "02:00:00:00:00:01", False))
    asyncio.run(hp.attach_nic("net1", [8], "02:00:00:00:00:02", False))
    (tmp_path / L.NETWORK_RECORD).write_text('{"netns": "", "records": []}')
    rig.rpc("DetachNetwork", vpb.DetachNetworkRequest())
    dels = [a["id"] for a in rig.qemu.sent("device_del")]
    assert dels == ["nic-net1", "nic-net0"] and hp.nics == {} and rig.qemu.netdevs == set()
    assert not (tmp_path / L.NETWORK_RECORD).exists()


# ----------------------------------------------------------------------------- on the wire
def test_the_descriptor_built_handler_over_a_real_socket(rig: Rig, tmp_path: Path) -> None:
    async def scenario() -> None:
        server = grpc.aio.server()
        server.add_generic_rpc_handlers((service.handler(rig.svc),))
        server.add_insecure_port(f"unix:{tmp_path}/vm.sock")
        await server.start()
        try:
            async with grpc.aio.insecure_channel(f"unix:{tmp_path}/vm.sock") as ch:
                stub = vpbg.VMStub(ch)
                st = await stub.Status(vpb.StatusRequest(), timeout=10)
                assert (st.sandbox_id, st.state) == ("sb1", "running")
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    await stub.Resize(vpb.ResizeRequest(vcpus=9, memory_mib=256), timeout=10)
                assert info.value.code() == S.RESOURCE_EXHAUSTED
                assert "at most 4" in (info.value.details() or "")
                events = stub.Events(vpb.EventsRequest(), timeout=10)
                await _until(lambda: bool(rig.vm.subscribers))
                (q,) = rig.vm.subscribers
                q.put_nowait(vpb.Event(kind="qmp", detail="RESET"))
                q.put_nowait(None)  # the end of the sandbox ends the stream
                got = [(ev.kind, ev.detail) async for ev in events]
                assert got == [("qmp", "RESET")]
                await _until(lambda: not rig.vm.subscribers)
        finally:
            await server.stop(grace=None)

    asyncio.run(scenario())


# ----------------------------------------------------------------------------- helpers
def _raising(exc: Exception) -> Callable[[str, dict[str, Any] | None], Awaitable[Any]]:
    async def qmp(command: str, args: dict[str, Any] | None) -> Any:
        raise exc

    return qmp


async def _until(cond: Callable[[], bool], timeout: float = 5.0) -> None:
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while not cond():
        assert loop.time() < end, "condition not reached"
        await asyncio.sleep(0.01)


# ----------------------------------------------------------------------------- pool claims
def claim_request(**kw: Any) -> vpb.ClaimRequest:
    base: dict[str, Any] = dict(
        sandbox_id="web",
        alias="/run/x/sandboxes/web",
        cgroup_json=json.dumps({"join": ["/sys/fs/cgroup/pod/x"], "home": [], "made": []}),
        log_file="/b/log.json",
        log_format="json",
        nice=0,
    )
    return vpb.ClaimRequest(**(base | kw))


def pooled_rig(tmp_path: Path) -> Rig:
    r = Rig(tmp_path)
    r.svc.spec = dataclasses.replace(r.spec, sandbox_id="p-1", pool_key="k1")
    return r


def test_claim_makes_a_pooled_vm_the_sandboxs(tmp_path: Path) -> None:
    r = pooled_rig(tmp_path)
    r.rpc("Claim", claim_request(nice=3))
    spec, nice = r.vm.claimed
    assert (spec.sandbox_id, spec.alias, spec.log_file, spec.log_format, nice) == (
        "web",
        "/run/x/sandboxes/web",
        "/b/log.json",
        "json",
        3,
    )
    assert spec.cgroup.join == ["/sys/fs/cgroup/pod/x"] and spec.pool_key == "k1"
    assert r.svc.spec is spec
    assert r.rpc("Status", vpb.StatusRequest()).sandbox_id == "web"
    again = r.refused("Claim", claim_request(sandbox_id="other"))
    assert again.code == S.FAILED_PRECONDITION and "claimed already" in again.details


def test_claim_of_a_vm_not_booted_for_the_pool_is_refused(rig: Rig) -> None:
    err = rig.refused("Claim", claim_request())
    assert err.code == S.FAILED_PRECONDITION and "not booted for the pool" in err.details
    assert not hasattr(rig.vm, "claimed")


def test_claim_with_bad_cgroup_or_stopped_vm_is_refused(tmp_path: Path) -> None:
    r = pooled_rig(tmp_path)
    bad = r.refused("Claim", claim_request(cgroup_json="{not json"))
    assert bad.code == S.INVALID_ARGUMENT and "cgroup_json" in bad.details
    bad = r.refused("Claim", claim_request(cgroup_json=json.dumps({"joinn": []})))
    assert bad.code == S.INVALID_ARGUMENT
    denied = r.refused("Claim", claim_request(cgroup_json=json.dumps({"join": ["/unjoinable"]})))
    assert denied.code == S.ABORTED and "Permission denied" in denied.details
    assert r.svc.spec.sandbox_id == "p-1"  # nothing changed
    r.vm.state = "stopped"
    assert r.refused("Claim", claim_request()).code == S.FAILED_PRECONDITION
