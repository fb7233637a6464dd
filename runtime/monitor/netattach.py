"""Networking a running sandbox: every interface of a network namespace becomes a guest NIC.

``attach()`` scans the namespace, plumbs each interface with the network model (tcfilter,
macvtap) and saves the record of what it made, hot-plugs one virtio-net NIC per interface
with its tap's queue fds, and has the agent give each NIC the interface's name, MTU and
addresses, then every route and neighbour. Any failure rolls back all of it: NICs unplugged,
fds closed, the namespace restored from the record. ``detach()`` undoes a whole attach.
pyroute2 (through cocoon.runtime.network) is imported only when a sandbox gets a network.

May import: the standard library, cocoon.runtime.vm_pb2,
cocoon.runtime.network.{models, record, scan} (lazily),
cocoon.runtime.monitor.{hotplug, launch}.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from pathlib import Path
from typing import Any, Protocol

from cocoon.runtime import vm_pb2 as vpb
from cocoon.runtime.monitor import hotplug
from cocoon.runtime.monitor import launch as L

log = logging.getLogger("cocoon.monitor")

MAX_QUEUES = 8  # queue pairs per NIC


class NetAgent(Protocol):
    async def configure_interface(self, ep: Any, pci: str) -> None: ...
    async def configure_routes(self, plumbed: list[Any]) -> None: ...


def attached(state_dir: Path) -> bool:
    """Whether the sandbox has a network (its record is the proof, until detach)."""
    return (state_dir / L.NETWORK_RECORD).exists()


async def attach(
    hp: hotplug.Hotplug, agent: NetAgent, state_dir: Path, request: vpb.AttachNetworkRequest
) -> vpb.AttachNetworkResponse:
    from cocoon.runtime.network import models, record, scan  # pyroute2 only when needed

    t0 = time.monotonic()
    seconds: dict[str, float] = {}
    netns, model = request.netns_path, request.model
    eps, skipped = await asyncio.to_thread(scan.scan, netns, model)
    for sk in skipped:
        log.warning("network: %s", sk.reason)
    seconds["scan"] = time.monotonic() - t0
    queues = min(request.queues or hp.cpus_online, MAX_QUEUES)
    plumbed = await asyncio.to_thread(models.plumb, netns, eps, model, queues, state_dir)
    record_path = state_dir / L.NETWORK_RECORD
    record.save_record(record_path, netns, plumbed)
    seconds["plumb"] = time.monotonic() - t0 - seconds["scan"]
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
            out.append(_interface(p, pci, queues))
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
        skipped=[vpb.SkippedInterface(name=s.name, kind=s.kind, reason=s.reason) for s in skipped],
        seconds=seconds,
    )


def _interface(p: Any, pci: str, queues: int) -> vpb.NetworkInterface:
    """What the reply says of one plumbed interface (``network.models.Plumbed``)."""
    ep = p.endpoint
    return vpb.NetworkInterface(
        name=ep.name,
        mac=ep.mac,
        mtu=ep.mtu,
        host_device=p.device,
        guest_pci=pci,
        queues=queues,
        addresses=[f"{a.address}/{a.prefix}" for a in ep.addresses],
    )


async def detach(hp: hotplug.Hotplug, state_dir: Path) -> None:
    """Unplugs every NIC (last first), then restores the namespace from the record."""
    from cocoon.runtime.network import record

    for nic in reversed(list(hp.nics)):
        await hp.detach_nic(nic)
    await asyncio.to_thread(record.unplumb_recorded, state_dir / L.NETWORK_RECORD)
