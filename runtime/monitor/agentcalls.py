"""The calls the monitor itself makes to the guest agent, over its one agent connection.

Start-up's version check (and a restored clone's reseed and clock), shutdown's DestroySandbox,
hot-plug's vCPU/memory onlining and device waits (``hotplug.GuestAgent``), and networking's
interface, route and neighbour set-up (``netattach.NetAgent``). Clients' own agent calls do not
come here: monitor.forward passes them through unchanged.

May import: the standard library, grpc, cocoon.agent.agent_pb2.
"""

from __future__ import annotations

from typing import Any

import grpc
import grpc.aio

from cocoon.agent import agent_pb2 as apb

SERVICE = apb.DESCRIPTOR.services_by_name["AgentService"]
AGENT_SERVICE = f"/{SERVICE.full_name}/"


def cardinality(m: Any) -> str:
    """A method's (from SERVICE) gRPC cardinality, as grpc names its multicallables and
    handlers: "unary_unary", "unary_stream", "stream_unary" or "stream_stream"."""
    return f"{'stream' if m.client_streaming else 'unary'}_" + (
        "stream" if m.server_streaming else "unary"
    )


class Stub:
    """The agent's methods as grpc.aio multicallables, each made from agent.proto's descriptor
    on first use: what agent_pb2_grpc's generated stub gives, without importing its 1,300
    lines (~1.6 MiB of every monitor's private memory)."""

    def __init__(self, channel: grpc.aio.Channel) -> None:
        self._ch = channel

    def __getattr__(self, name: str) -> Any:
        m = SERVICE.methods_by_name.get(name)
        if m is None:
            raise AttributeError(name)
        call = getattr(self._ch, cardinality(m))(
            AGENT_SERVICE + name,
            request_serializer=getattr(apb, m.input_type.name).SerializeToString,
            response_deserializer=getattr(apb, m.output_type.name).FromString,
        )
        setattr(self, name, call)
        return call


class AgentCalls:
    """The agent RPCs the monitor needs; ``timeout`` is the default per-call deadline."""

    def __init__(self, channel: grpc.aio.Channel, timeout: float) -> None:
        self._ch = channel
        self._timeout = timeout

    def _call(self, name: str, req: Any, resp: Any, timeout: float | None = None) -> Any:
        return self._ch.unary_unary(
            AGENT_SERVICE + name,
            request_serializer=type(req).SerializeToString,
            response_deserializer=resp.FromString,
        )(req, timeout=self._timeout if timeout is None else timeout)

    # ------------------------------------------------------------------ lifecycle
    async def version(self, timeout: float) -> apb.VersionResponse:
        r: apb.VersionResponse = await self._call(
            "Version", apb.VersionRequest(), apb.VersionResponse, timeout
        )
        return r

    async def destroy_sandbox(self, timeout: float) -> None:
        """Asks the guest to power off (the agent answers before it goes)."""
        await self._call("DestroySandbox", apb.DestroySandboxRequest(), apb.Empty, timeout)

    async def set_clone_apart(self, entropy: bytes, now: float) -> None:
        """A VM restored from a template: its RNG reseeded with ``entropy`` (host bytes) and
        its clock set to ``now`` (the host's), before anything else runs in it."""
        await self._call("ReseedRandomDev", apb.ReseedRandomDevRequest(data=entropy), apb.Empty)
        sec = int(now)
        req = apb.SetGuestDateTimeRequest(sec=sec, usec=int((now - sec) * 1e6))
        await self._call("SetGuestDateTime", req, apb.Empty)

    # ------------------------------------------------------------------ hot-plug
    async def online_cpus(self, count: int) -> int:
        """The vCPUs online after onlining up to ``count``: the guest's count, never more than
        asked (a guest may have more online; the monitor counts only what it plugged and
        asked for, so a reply cannot take its books past the VM's limits)."""
        r = await self._call(
            "OnlineCPUMem", apb.OnlineCPUMemRequest(nb_cpus=count), apb.OnlineCPUMemResponse
        )
        online = int(r.cpus_online)
        return min(online, count) if count > 0 else online

    async def offline_cpus(self, keep: int) -> int:
        """The vCPUs online after taking all but ``keep`` offline: never taken as more than
        ``keep`` (as for online_cpus, a reply cannot take the books past what was asked)."""
        r = await self._call(
            "OfflineCPUs", apb.OfflineCPUsRequest(keep_online=keep), apb.OnlineCPUMemResponse
        )
        return min(int(r.cpus_online), keep)

    async def memory_total(self) -> int:
        r = await self._call(
            "OnlineCPUMem",
            apb.OnlineCPUMemRequest(nb_cpus=1, online_memory=True),
            apb.OnlineCPUMemResponse,
        )
        return int(r.mem_total_bytes)

    async def wait_device(self, kind: str, address: str, timeout_ms: int) -> str:
        r = await self._call(
            "WaitDevice",
            apb.WaitDeviceRequest(type=kind, address=address, timeout_ms=timeout_ms),
            apb.WaitDeviceResponse,
            timeout_ms / 1000 + 5,
        )
        path = str(r.guest_path or r.sysfs_path)
        if not path.startswith("/") or "\0" in path:
            # A reply that names no device is the agent failing the call (hot-plug then
            # unplugs the device and reports a failed hot-plug).
            raise grpc.aio.AioRpcError(
                grpc.StatusCode.INTERNAL,
                grpc.aio.Metadata(),
                grpc.aio.Metadata(),
                f"the guest agent named no device node for {kind} {address}: {path!r}",
            )
        return path

    # ------------------------------------------------------------------ networking
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
