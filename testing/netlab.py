"""Private networks for the pytest plugin's containers, made of real netns devices as a CNI
bridge plugin leaves them: a hub namespace holding a Linux bridge (``br0``, the network's
.1), and per container a namespace whose ``eth0`` is a veth with its other end on the bridge.
cocoon wires that ``eth0`` into the container's VM as it would a pod's CNI interface.

Every namespace is a file under the network's own directory (never /run/netns), so networks
of parallel pytest workers, or of two test runs, cannot collide; addresses may repeat across
networks because no two networks share a namespace.

May import: the standard library, cocoon.runtime.network.{netns, record}.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import shutil
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from cocoon.runtime.network import netns as N
from cocoon.runtime.network import record

T = TypeVar("T")

BRIDGE = "br0"
MAX_HOSTS = 250


@dataclass(frozen=True)
class Endpoint:
    """One container's place on a network: its namespace (for the OCI spec) and address."""

    netns: Path
    ip: str
    hub_port: str  # the veth's end on the bridge


class Network:
    """A private layer-2 network: containers attached to it reach each other by address."""

    def __init__(self, directory: Path, name: str, subnet: str = "10.89.0.0/24") -> None:
        self.name = name
        self.dir = directory
        self.subnet = ipaddress.ip_network(subnet)
        self.gateway = str(self.subnet.network_address + 1)
        self.hub = directory / "hub"
        self.endpoints: dict[str, Endpoint] = {}
        self._next = 2
        self._lock = threading.Lock()  # containers may be started from several threads
        directory.mkdir(parents=True)
        try:
            N.create_netns(self.hub)
            N.in_netns(str(self.hub), self._make_bridge)
        except BaseException:
            self.close()
            raise

    def __repr__(self) -> str:
        return f"<cocoon network {self.name} {self.subnet}>"

    def _make_bridge(self) -> None:
        with N.iproute() as ipr:
            ipr.link("add", ifname=BRIDGE, kind="bridge")
            idx = ipr.link_lookup(ifname=BRIDGE)[0]
            ipr.addr("add", index=idx, address=self.gateway, prefixlen=self.subnet.prefixlen)
            ipr.link("set", index=idx, state="up")
            for lo in ipr.link_lookup(ifname="lo"):
                ipr.link("set", index=lo, state="up")

    def attach(self, name: str) -> Endpoint:
        """A new namespace for container ``name`` with ``eth0`` on this network."""
        with self._lock:
            if name in self.endpoints:
                raise ValueError(f"{name} is on network {self.name} already")
            n = self._next
            if n > MAX_HOSTS:
                raise ValueError(f"network {self.name} is full ({MAX_HOSTS - 1} containers)")
            self._next += 1
        ip = str(self.subnet.network_address + n)
        ep = Endpoint(self.dir / f"c{n}", ip, f"v{n}")
        N.create_netns(ep.netns)
        try:
            self._wire(ep)
        except BaseException:
            N.remove_netns(ep.netns)
            raise
        with self._lock:
            self.endpoints[name] = ep
        return ep

    def _wire(self, ep: Endpoint) -> None:
        cfd = os.open(ep.netns, os.O_RDONLY | os.O_CLOEXEC)
        try:

            def add_pair() -> None:
                with N.iproute() as ipr:
                    ipr.link(
                        "add",
                        ifname=ep.hub_port,
                        kind="veth",
                        peer={"ifname": "eth0", "net_ns_fd": cfd},
                    )
                    port = ipr.link_lookup(ifname=ep.hub_port)[0]
                    bridge = ipr.link_lookup(ifname=BRIDGE)[0]
                    ipr.link("set", index=port, master=bridge, state="up")

            N.in_netns(str(self.hub), add_pair)
        finally:
            os.close(cfd)

        def address() -> None:
            with N.iproute() as ipr:
                idx = ipr.link_lookup(ifname="eth0")[0]
                ipr.addr("add", index=idx, address=ep.ip, prefixlen=self.subnet.prefixlen)
                ipr.link("set", index=idx, state="up")
                for lo in ipr.link_lookup(ifname="lo"):
                    ipr.link("set", index=lo, state="up")
                ipr.route("add", dst="0.0.0.0/0", gateway=self.gateway)

        N.in_netns(str(ep.netns), address)

    def leftovers(self, name: str) -> list[str]:
        """What cocoon left in container ``name``'s namespace (tap devices, qdiscs)."""
        return record.leftovers(str(self.endpoints[name].netns))

    def detach(self, name: str) -> None:
        """Removes the container's namespace (its veth, and so the bridge's end, go too)."""
        with self._lock:
            ep = self.endpoints.pop(name, None)
        if ep is not None:
            N.remove_netns(ep.netns)

    def run(self, fn: Callable[[], T]) -> T:
        """Runs ``fn`` on the network's hub (the bridge's address, ``gateway``): sockets it
        makes stay there, so the test itself can reach its containers."""
        return N.in_netns(str(self.hub), fn)

    def connect(self, ip: str, port: int, timeout: float = 30.0) -> socket.socket:
        """A TCP connection from the hub to ``ip:port`` on this network."""
        return self.run(lambda: socket.create_connection((ip, port), timeout=timeout))

    def close(self) -> None:
        for name in list(self.endpoints):
            self.detach(name)
        N.remove_netns(self.hub)
        with contextlib.suppress(FileNotFoundError):
            shutil.rmtree(self.dir)
