"""The guest side of networking: a hot-plugged NIC takes the name, MTU, addresses, routes and
neighbours of the interface it stands for; the guest's hostname, /etc/hosts and
/etc/resolv.conf are set from the host. A container whose network the sandbox's NICs stand
for joins the guest's own network namespace, so what is set here is what it sees; a container
that asked for a new, empty namespace gets one from crun, with only its loopback brought up
here (``loopback_up_in``).

Through pyroute2 (Debian's 0.7 in the guest: only its long-stable IPRoute calls are used),
imported lazily, so the module loads where pyroute2 is missing (the host's unit tests).

May import: the standard library, pyroute2 (imported lazily), cocoon.agent.{errors, libc}.
"""

from __future__ import annotations

import contextlib
import fcntl
import ipaddress
import os
import socket
import struct
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cocoon.agent import libc
from cocoon.agent.errors import NetError

_SIOCGIFFLAGS = 0x8913
_SIOCSIFFLAGS = 0x8914
_IFF_UP = 0x1
_IFREQ = "16sh22x"  # struct ifreq: the name, then ifr_flags in the 24-byte union

IFA_F_NODAD = 0x02  # the host did duplicate address detection for these addresses already
NUD_PERMANENT = 0x80


@dataclass
class Iface:
    name: str
    mac: str
    mtu: int
    pci: str = ""
    addresses: list[tuple[int, str, int]] = field(default_factory=list)  # (4|6, ip, prefix)


@dataclass
class RouteSpec:
    family: int
    dest: str  # CIDR or "" for default
    gateway: str
    device: str
    source: str = ""
    scope: int = 0


@contextlib.contextmanager
def _ipr() -> Iterator[Any]:
    from pyroute2 import IPRoute

    ipr = IPRoute()
    try:
        yield ipr
    finally:
        ipr.close()


def _err(what: str, exc: Exception) -> NetError:
    code = getattr(exc, "code", None)
    return NetError(f"{what}: {os.strerror(code) if isinstance(code, int) else exc}")


class Network:
    def __init__(self, root: Path = Path("/")) -> None:
        self.root = root

    def loopback_up(self) -> None:
        """Sets ``lo`` up in the calling thread's network namespace."""
        loopback_up()

    def _find(self, ipr: Any, iface: Iface, timeout: float) -> int:
        """The NIC's ifindex: by MAC (QEMU gave it the interface's), else the net device
        behind its PCI root port."""
        end = time.monotonic() + timeout
        mac = iface.mac.lower()
        while True:
            for link in ipr.get_links():
                if str(link.get_attr("IFLA_ADDRESS") or "").lower() == mac:
                    return int(link["index"])
            if iface.pci:
                for net in (self.root / "sys/bus/pci/devices" / iface.pci).glob("*/net/*"):
                    found = ipr.link_lookup(ifname=net.name)
                    if found:
                        return int(found[0])
                # virtio-net behind a root port: .../<port>/<dev>/virtioN/net/<name>
                for net in (self.root / "sys/bus/pci/devices" / iface.pci).glob("*/virtio*/net/*"):
                    found = ipr.link_lookup(ifname=net.name)
                    if found:
                        return int(found[0])
            if time.monotonic() > end:
                raise NetError(f"no guest NIC with MAC {iface.mac} (PCI {iface.pci or '?'})")
            time.sleep(0.02)

    def update_interface(self, iface: Iface, timeout: float = 10.0) -> str:
        """Configures the NIC; returns its guest name."""
        self.loopback_up()
        with _ipr() as ipr:
            idx = self._find(ipr, iface, timeout)
            cur = str(ipr.get_links(idx)[0].get_attr("IFLA_IFNAME"))
            ipr.link("set", index=idx, state="down")
            if cur != iface.name:
                for other in ipr.link_lookup(ifname=iface.name):
                    if other != idx:  # the kernel gave the name to another NIC: move it away
                        ipr.link("set", index=other, state="down")
                        ipr.link("set", index=other, ifname=f"ccnic{other}")
                try:
                    ipr.link("set", index=idx, ifname=iface.name)
                except Exception as exc:
                    raise _err(f"rename {cur} to {iface.name}", exc) from None
            try:
                ipr.link("set", index=idx, mtu=iface.mtu)
            except Exception as exc:
                raise _err(f"{iface.name}: MTU {iface.mtu}", exc) from None
            try:
                ipr.link("set", index=idx, address=iface.mac)
            except Exception as exc:
                raise _err(f"{iface.name}: MAC {iface.mac}", exc) from None
            for fam, ip, prefix in iface.addresses:
                try:
                    ipr.addr(
                        "add",
                        index=idx,
                        address=ip,
                        prefixlen=prefix,
                        family=socket.AF_INET6 if fam == 6 else socket.AF_INET,
                        **({"flags": IFA_F_NODAD} if fam == 6 else {}),
                    )
                except Exception as exc:
                    if getattr(exc, "code", 0) != 17:  # EEXIST: already there
                        raise _err(f"{iface.name}: address {ip}/{prefix}", exc) from None
            ipr.link("set", index=idx, state="up")
        return iface.name

    def update_routes(self, routes: list[RouteSpec]) -> None:
        with _ipr() as ipr:
            for r in routes:
                found = ipr.link_lookup(ifname=r.device)
                if not found:
                    raise NetError(f"route {r.dest or 'default'}: no interface {r.device}")
                af = socket.AF_INET6 if r.family == 6 else socket.AF_INET
                kw: dict[str, Any] = {"oif": found[0], "family": af}
                if r.dest:
                    net = ipaddress.ip_network(r.dest, strict=False)
                    kw |= {"dst": str(net.network_address), "dst_len": net.prefixlen}
                if r.gateway:
                    kw["gateway"] = r.gateway
                if r.source:
                    kw["prefsrc"] = r.source
                if r.scope:
                    kw["scope"] = r.scope
                try:
                    ipr.route("replace", **kw)
                except Exception as exc:
                    via = r.gateway or r.device
                    raise _err(f"route {r.dest or 'default'} via {via}", exc) from None

    def add_neighbours(self, neighbours: list[tuple[str, str, str]]) -> None:
        """(ip, lladdr, device) each, added permanent."""
        with _ipr() as ipr:
            for ip, lladdr, dev in neighbours:
                found = ipr.link_lookup(ifname=dev)
                if not found:
                    raise NetError(f"neighbour {ip}: no interface {dev}")
                af = socket.AF_INET6 if ipaddress.ip_address(ip).version == 6 else socket.AF_INET
                try:
                    ipr.neigh(
                        "replace",
                        dst=ip,
                        lladdr=lladdr,
                        ifindex=found[0],
                        family=af,
                        state=NUD_PERMANENT,
                    )
                except Exception as exc:
                    raise _err(f"neighbour {ip} ({lladdr})", exc) from None

    def list_interfaces(self) -> list[Iface]:
        out = []
        with _ipr() as ipr:
            for link in ipr.get_links():
                idx = int(link["index"])
                addrs = [
                    (
                        6 if a["family"] == socket.AF_INET6 else 4,
                        str(a.get_attr("IFA_ADDRESS")),
                        int(a["prefixlen"]),
                    )
                    for a in ipr.get_addr(index=idx)
                ]
                out.append(
                    Iface(
                        name=str(link.get_attr("IFLA_IFNAME")),
                        mac=str(link.get_attr("IFLA_ADDRESS") or ""),
                        mtu=int(link.get_attr("IFLA_MTU") or 0),
                        addresses=addrs,
                    )
                )
        return out

    def set_identity(self, hostname: str, hosts: bytes, resolv_conf: bytes) -> None:
        if hostname:
            socket.sethostname(hostname)
            (self.root / "etc/hostname").write_text(hostname + "\n")
        for name, data in (("hosts", hosts), ("resolv.conf", resolv_conf)):
            if data:
                p = self.root / "etc" / name
                tmp = p.with_name(f".{name}.cocoon")
                tmp.write_bytes(data)
                os.replace(tmp, p)


def loopback_up() -> None:
    """``lo`` up in the calling thread's network namespace, with two ioctls (no netlink, so no
    pyroute2 import on the agent's boot path, where the guest's own namespace gets it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        req = fcntl.ioctl(s, _SIOCGIFFLAGS, struct.pack(_IFREQ, b"lo", 0))
        flags = struct.unpack(_IFREQ, req)[1]
        fcntl.ioctl(s, _SIOCSIFFLAGS, struct.pack(_IFREQ, b"lo", flags | _IFF_UP))


def loopback_up_in(pid: int) -> None:
    """Sets ``lo`` up in the network namespace of ``pid`` (a new one crun made), as runc does
    for a new network namespace; crun leaves it down. A thread of its own joins the
    namespace and ends (setns is per thread)."""

    def run() -> None:
        libc.join_netns(f"/proc/{pid}/ns/net")
        Network().loopback_up()

    libc.in_thread(run, "netns-lo")
