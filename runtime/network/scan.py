"""What is in a container's network namespace: its interfaces, as endpoints to bridge.

``scan`` lists the namespace's interfaces that the network model can bridge (MAC, MTU,
addresses, routes, permanent neighbours) and those it skips, with the reason. A namespace with
nothing but loopback (and cocoon's own taps) is told by the interface names alone, without
loading pyroute2 (~0.1 s of a create that has no network to wire).

May import: the standard library, cocoon.runtime.network.netns.
"""

from __future__ import annotations

import ipaddress
import socket
from dataclasses import dataclass, field
from typing import Any

from cocoon.runtime.network.netns import in_netns, iproute

BRIDGEABLE = {
    "tcfilter": {"veth", "macvlan", "ipvlan"},
    "macvtap": {"veth", "macvlan"},
    "tap": {"tun"},
}

TAP_PREFIX = "cctap"  # tcfilter taps

MACVTAP_PREFIX = "ccmvt"  # macvtaps
_RTPROT_KERNEL = 2
_NUD_PERMANENT = 0x80
_RT_TABLE_MAIN = 254


@dataclass
class Address:
    family: int  # 4 or 6
    address: str
    prefix: int


@dataclass
class Route:
    family: int
    dest: str  # "" for the default route
    prefix: int
    gateway: str
    source: str
    scope: int


@dataclass
class Neighbour:
    family: int
    ip: str
    lladdr: str


@dataclass
class Endpoint:
    name: str
    index: int
    kind: str
    mac: str
    mtu: int
    addresses: list[Address] = field(default_factory=list)
    routes: list[Route] = field(default_factory=list)
    neighbours: list[Neighbour] = field(default_factory=list)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Endpoint:
        return cls(
            name=d["name"],
            index=d["index"],
            kind=d["kind"],
            mac=d["mac"],
            mtu=d["mtu"],
            addresses=[Address(**a) for a in d.get("addresses", [])],
            routes=[Route(**r) for r in d.get("routes", [])],
            neighbours=[Neighbour(**n) for n in d.get("neighbours", [])],
        )


@dataclass
class Skipped:
    name: str
    kind: str
    reason: str


def _kind(link: Any) -> str:
    info = link.get("IFLA_LINKINFO")
    return str(info.get("IFLA_INFO_KIND") or "") if info else ""


def scan(netns: str, model: str) -> tuple[list[Endpoint], list[Skipped]]:
    """The namespace's interfaces that ``model`` can bridge, and those it skips."""
    return in_netns(netns, lambda: _scan_here(model))


def _ours_or_lo(name: str) -> bool:
    return name == "lo" or name.startswith((TAP_PREFIX, MACVTAP_PREFIX))


def _scan_here(model: str) -> tuple[list[Endpoint], list[Skipped]]:
    if all(_ours_or_lo(name) for _, name in socket.if_nameindex()):
        return [], []
    ok = BRIDGEABLE.get(model, set())
    eps: list[Endpoint] = []
    skipped: list[Skipped] = []
    with iproute() as ipr:
        for link in ipr.get_links():
            name = str(link.get("IFLA_IFNAME"))
            kind = _kind(link)
            if _ours_or_lo(name):
                continue
            if kind not in ok:
                what = kind or "physical or unknown"
                skipped.append(
                    Skipped(
                        name,
                        what,
                        f"model {model} bridges {', '.join(sorted(ok))} links only; "
                        f"{name} ({what}) gets no guest NIC",
                    )
                )
                continue
            idx = int(link["index"])
            eps.append(
                Endpoint(
                    name=name,
                    index=idx,
                    kind=kind,
                    mac=str(link.get("IFLA_ADDRESS")),
                    mtu=int(link.get("IFLA_MTU")),
                    addresses=_addresses(ipr, idx),
                    routes=_routes(ipr, idx),
                    neighbours=_neighbours(ipr, idx),
                )
            )
    return eps, skipped


def _fam(af: int) -> int:
    return 6 if af == socket.AF_INET6 else 4


def _addresses(ipr: Any, idx: int) -> list[Address]:
    out = []
    for a in ipr.get_addr(index=idx):
        ip = str(a.get("IFA_ADDRESS"))
        if a["family"] == socket.AF_INET6 and ipaddress.ip_address(ip).is_link_local:
            continue  # the guest makes its own
        out.append(Address(_fam(a["family"]), ip, int(a["prefixlen"])))
    return out


def _routes(ipr: Any, idx: int) -> list[Route]:
    out = []
    for af in (socket.AF_INET, socket.AF_INET6):
        for r in ipr.get_routes(family=af, table=_RT_TABLE_MAIN):
            if r.get("RTA_OIF") != idx or r["proto"] == _RTPROT_KERNEL:
                continue  # the guest makes its own prefix routes from the addresses
            dest = r.get("RTA_DST") or ""
            if af == socket.AF_INET6 and dest and ipaddress.ip_address(dest).is_multicast:
                continue
            out.append(
                Route(
                    family=_fam(af),
                    dest=str(dest),
                    prefix=int(r["dst_len"]),
                    gateway=str(r.get("RTA_GATEWAY") or ""),
                    source=str(r.get("RTA_PREFSRC") or ""),
                    scope=int(r["scope"]),
                )
            )
    # Routes through a gateway go after the routes that make the gateway reachable.
    out.sort(key=lambda r: bool(r.gateway))
    return out


def _neighbours(ipr: Any, idx: int) -> list[Neighbour]:
    out = []
    for n in ipr.get_neighbours(ifindex=idx):
        if not n["state"] & _NUD_PERMANENT or not n.get("NDA_LLADDR"):
            continue
        out.append(Neighbour(_fam(n["family"]), str(n.get("NDA_DST")), str(n.get("NDA_LLADDR"))))
    return out
