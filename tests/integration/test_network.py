"""Networking with real guests, in private network namespaces: a container namespace holding
veths whose other ends sit in peer namespaces, as CNI leaves them. A peer reaches a TCP server
in the container and the container reaches one in the peer, over IPv4 and IPv6, on two
interfaces at once, for tcfilter and macvtap; a spec asking for a new namespace gets one that
a prestart hook fills (docker's libnetwork way); bad input leaves nothing behind."""

from __future__ import annotations

import json
import os
import socket
import stat
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from pyroute2 import IPRoute

from cocoon.runtime.container import busybox
from cocoon.runtime.network import netns as N
from cocoon.runtime.network import record, scan
from tests.integration.cli import Cli

pytestmark = [pytest.mark.qemu, pytest.mark.root]

HTTP_PORT = 8080


@dataclass
class Link:
    name: str  # in the container namespace
    peer_ns: Path
    v4: str  # the container's address; the peer is .1
    v6: str
    mac: str = ""

    @property
    def peer_v4(self) -> str:
        return self.v4.rsplit(".", 1)[0] + ".1"

    @property
    def peer_v6(self) -> str:
        return self.v6.rsplit(":", 1)[0] + ":1"


@dataclass
class Lab:
    netns: Path
    links: list[Link]


def _make_link(netns: Path, link: Link, mtu: int, default_route: bool) -> None:
    N.create_netns(link.peer_ns)
    cfd = os.open(netns, os.O_RDONLY)
    pfd = os.open(link.peer_ns, os.O_RDONLY)
    try:
        with IPRoute() as ipr:
            ipr.link(
                "add",
                ifname=f"t{os.getpid() % 10000}{link.name}",
                kind="veth",
                net_ns_fd=cfd,
                peer={"ifname": "peer0", "net_ns_fd": pfd},
            )
    finally:
        os.close(cfd)
        os.close(pfd)

    def inside(name: str, addrs: list[tuple[str, int]], gw: tuple[str, str] | None) -> str:
        with IPRoute() as ipr:
            idx = ipr.link_lookup(ifname=name)[0]
            ipr.link("set", index=idx, mtu=mtu, state="up")
            for a, plen in addrs:
                fam = socket.AF_INET6 if ":" in a else socket.AF_INET
                ipr.addr("add", index=idx, address=a, prefixlen=plen, family=fam, flags=0x02)
            for lo in ipr.link_lookup(ifname="lo"):
                ipr.link("set", index=lo, state="up")
            if gw:
                ipr.route("add", dst="0.0.0.0/0", gateway=gw[0])
                ipr.route("add", dst="::/0", gateway=gw[1], family=socket.AF_INET6)
            return str(ipr.get_links(idx)[0].get_attr("IFLA_ADDRESS"))

    tmp = f"t{os.getpid() % 10000}{link.name}"

    def rename() -> None:
        with IPRoute() as ipr:
            ipr.link("set", index=ipr.link_lookup(ifname=tmp)[0], ifname=link.name)

    N.in_netns(str(netns), rename)
    gw = (link.peer_v4, link.peer_v6) if default_route else None
    link.mac = N.in_netns(str(netns), lambda: inside(link.name, [(link.v4, 24), (link.v6, 64)], gw))
    N.in_netns(
        str(link.peer_ns), lambda: inside("peer0", [(link.peer_v4, 24), (link.peer_v6, 64)], None)
    )


@pytest.fixture
def lab(tmp_path: Path) -> Iterator[Lab]:
    """A container namespace with eth0 (default routes) and eth1, each to its own peer."""
    netns = tmp_path / "ns-container"
    N.create_netns(netns)
    links = [
        Link("eth0", tmp_path / "ns-peer0", "10.77.1.2", "fd77:1::2"),
        Link("eth1", tmp_path / "ns-peer1", "10.77.2.2", "fd77:2::2"),
    ]
    try:
        _make_link(netns, links[0], 1400, True)
        _make_link(netns, links[1], 1500, False)
        before = scan.scan(str(netns), "tcfilter")[0]
        assert {ep.name: ep.mac for ep in before} == {lk.name: lk.mac for lk in links}
        yield Lab(netns, links)
        assert record.leftovers(str(netns)) == [], "cocoon's devices left in the namespace"
        # MACs, MTUs, addresses, routes, neighbours: as they were
        assert scan.scan(str(netns), "tcfilter")[0] == before, "the veths were not restored"
    finally:
        for p in [netns, *(lk.peer_ns for lk in links)]:
            N.remove_netns(p)


class PeerServer:
    """A TCP server in a peer namespace answering each connection with a line."""

    def __init__(self, ns: Path, host: str, port: int, reply: bytes) -> None:
        fam = socket.AF_INET6 if ":" in host else socket.AF_INET

        def bind() -> socket.socket:
            s = socket.socket(fam, socket.SOCK_STREAM)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind((host, port))
            s.listen(8)
            return s

        self.sock = N.in_netns(str(ns), bind)
        self.reply = reply
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn:
                conn.settimeout(5)
                try:
                    conn.recv(4096)
                    conn.sendall(
                        b"HTTP/1.0 200 OK\r\nContent-Length: %d\r\n\r\n%s"
                        % (len(self.reply), self.reply)
                    )
                except OSError:
                    pass

    def close(self) -> None:
        self.sock.close()


def fetch_from(ns: Path, host: str, port: int, path: str = "/", wait: float = 30) -> bytes:
    """An HTTP GET from inside namespace ``ns``; the body. A refused or reset connection is
    retried for ``wait`` seconds: `start` returns before the workload has bound its port, and a
    port publisher in front of it (docker-proxy) accepts, then resets until it has."""

    def get() -> bytes:
        fam = socket.AF_INET6 if ":" in host else socket.AF_INET
        deadline = time.monotonic() + wait
        while True:
            with socket.socket(fam, socket.SOCK_STREAM) as s:
                s.settimeout(20)
                data = b""
                try:
                    s.connect((host, port))
                    s.sendall(f"GET {path} HTTP/1.0\r\n\r\n".encode())
                    while chunk := s.recv(65536):
                        data += chunk
                except (ConnectionRefusedError, ConnectionResetError):
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.2)
                    continue
            return data.split(b"\r\n\r\n", 1)[-1]

    return N.in_netns(str(ns), get)


def server_bundle(tmp: Path, netns: str | None, annotations: dict[str, str] | None = None) -> Path:
    b = busybox.make_bundle(tmp / "bundle", ["httpd", "-f", "-p", str(HTTP_PORT), "-h", "/www"])
    www = b / "rootfs" / "www"
    www.mkdir(exist_ok=True)
    (www / "index.html").write_text("hello from the guest\n")
    spec = json.loads((b / "config.json").read_text())
    for ns in spec["linux"]["namespaces"]:
        if ns["type"] == "network" and netns is not None:
            ns["path"] = netns
    if annotations:
        spec["annotations"] = annotations
    (b / "config.json").write_text(json.dumps(spec))
    return b


@pytest.mark.parametrize("model", ["tcfilter", "macvtap"])
def test_two_interfaces_both_ways_ipv4_and_ipv6(
    cli: Cli, lab: Lab, tmp_path: Path, model: str
) -> None:
    b = server_bundle(tmp_path, str(lab.netns), {"io.cocoon.config.network.model": model})
    r = cli.create("n1", b)
    assert r.returncode == 0, r.stderr
    cli.ok("start", "n1")
    servers = []
    try:
        for lk in lab.links:
            # The guest NIC carries the interface's name, MAC, MTU and addresses.
            sysfs = cli.ok(
                "exec", "n1", "cat", f"/sys/class/net/{lk.name}/address",
                f"/sys/class/net/{lk.name}/mtu",
            ).split()  # fmt: skip
            assert sysfs == [lk.mac, "1400" if lk.name == "eth0" else "1500"]
            addrs = cli.ok("exec", "n1", "ip", "addr", "show", lk.name)
            assert f"{lk.v4}/24" in addrs and f"{lk.v6}/64" in addrs
            for host in (lk.peer_v4, lk.peer_v6):
                reply = f"peer {lk.name} {host}".encode()
                servers.append(PeerServer(lk.peer_ns, host, 9090, reply))
                url = f"http://[{host}]:9090/" if ":" in host else f"http://{host}:9090/"
                got = cli.ok("exec", "n1", "wget", "-q", "-O", "-", url)
                assert got == reply.decode(), (model, host)
            for host in (lk.v4, lk.v6):
                assert fetch_from(lk.peer_ns, host, HTTP_PORT) == b"hello from the guest\n"
        routes = cli.ok("exec", "n1", "ip", "route")
        assert f"default via {lab.links[0].peer_v4} dev eth0" in routes
        routes6 = cli.ok("exec", "n1", "ip", "-6", "route")
        assert f"default via {lab.links[0].peer_v6} dev eth0" in routes6
        # Beyond the peer's subnet the default route is used: the peer answers for it.
        if model == "tcfilter":
            host_side = record.leftovers(str(lab.netns))
            assert len([x for x in host_side if "ingress" in x]) == 4, host_side
    finally:
        for s in servers:
            s.close()
    cli.ok("delete", "--force", "n1")


def _attach_lines(cli: Cli) -> list[str]:
    """The monitors' reports of a network attached, from the CLI's JSON log."""
    if not cli.log.exists():
        return []
    msgs = [json.loads(line).get("msg", "") for line in cli.log.read_text().splitlines()]
    return [m for m in msgs if m.startswith("network: ")]


def test_new_namespace_filled_by_a_prestart_hook(cli: Cli, tmp_path: Path) -> None:
    """docker's libnetwork: the spec asks for a new netns; a prestart hook finds it through
    the state's pid and moves a configured veth in. cocoon makes the namespace, the hook
    fills it, the guest gets the interface; delete removes the namespace. Without a hook to
    fill it, the namespace cocoon made holds only lo: nothing is attached."""
    r = cli.create("n0", server_bundle(tmp_path, None))
    assert r.returncode == 0, r.stderr
    cli.ok("start", "n0")
    assert (cli.root / "netns" / "n0").exists()
    assert _attach_lines(cli) == []
    cli.ok("delete", "--force", "n0")
    assert not (cli.root / "netns" / "n0").exists()
    peer = tmp_path / "ns-peer"
    N.create_netns(peer)
    hook = tmp_path / "hook.py"
    hook.write_text(
        textwrap.dedent(
            f"""\
            #!{sys.executable}
            import json, os, socket, sys
            from pyroute2 import IPRoute
            from cocoon.runtime.network import netns as N
            state = json.load(sys.stdin)
            target = f"/proc/{{state['pid']}}/ns/net"
            fd = os.open(target, os.O_RDONLY)
            pfd = os.open("{peer}", os.O_RDONLY)
            with IPRoute() as ipr:
                ipr.link("add", ifname="hk0", kind="veth", net_ns_fd=fd,
                         peer={{"ifname": "peer0", "net_ns_fd": pfd}})
            def conf(name, addr):
                with IPRoute() as ipr:
                    i = ipr.link_lookup(ifname=name)[0]
                    if name == "hk0":
                        ipr.link("set", index=i, ifname="eth0")
                    ipr.link("set", index=i, state="up")
                    ipr.addr("add", index=i, address=addr, prefixlen=24)
            N.in_netns(target, lambda: conf("hk0", "10.78.0.2"))
            N.in_netns("{peer}", lambda: conf("peer0", "10.78.0.1"))
            """
        )
    )
    hook.chmod(hook.stat().st_mode | stat.S_IXUSR)
    b = server_bundle(tmp_path, None)
    spec: dict[str, Any] = json.loads((b / "config.json").read_text())
    spec["hooks"] = {"prestart": [{"path": str(hook)}]}
    (b / "config.json").write_text(json.dumps(spec))
    try:
        r = cli.create("n2", b)
        assert r.returncode == 0, r.stderr
        owned = cli.root / "netns" / "n2"
        assert owned.exists()
        assert [m.split(" (")[0] for m in _attach_lines(cli)] == ["network: 1 NICs"]
        cli.ok("start", "n2")
        assert fetch_from(peer, "10.78.0.2", HTTP_PORT) == b"hello from the guest\n"
        cli.ok("delete", "--force", "n2")
        assert not owned.exists()
    finally:
        N.remove_netns(peer)


def test_bad_network_input_fails_cleanly(cli: Cli, lab: Lab, tmp_path: Path) -> None:
    missing = tmp_path / "no-such-netns"
    r = cli.create("n3", server_bundle(tmp_path, str(missing)))
    assert r.returncode == 1
    assert f"network namespace {missing} does not exist" in cli.last_error()
    r = cli.create(
        "n3", server_bundle(tmp_path, str(lab.netns), {"io.cocoon.config.network.model": "x"})
    )
    assert r.returncode == 1 and "io.cocoon.config.network.model" in cli.last_error()
    r = cli.create(
        "n3",
        server_bundle(tmp_path, str(lab.netns), {"io.cocoon.config.hypervisor.path": "/bin/sh"}),
    )
    assert r.returncode == 1 and "cannot be set by an annotation" in cli.last_error()

    # An MTU the tap refuses (the tun driver's limit is below 65535): the create fails,
    # naming it, and the namespace is as it was (the lab fixture checks).
    def set_mtu(mtu: int) -> None:
        with IPRoute() as ipr:
            ipr.link("set", index=ipr.link_lookup(ifname="eth1")[0], mtu=mtu)

    N.in_netns(str(lab.netns), lambda: set_mtu(65535))
    r = cli.create("n3", server_bundle(tmp_path, str(lab.netns)))
    assert r.returncode == 1
    assert "eth1: MTU 65535 on its tap" in cli.last_error()
    assert record.leftovers(str(lab.netns)) == []
    N.in_netns(str(lab.netns), lambda: set_mtu(1500))

    # A kind no model bridges: skipped, and the log says so; the others still work.
    cfd = os.open(lab.netns, os.O_RDONLY)
    try:
        with IPRoute() as ipr:
            ipr.link("add", ifname="br0", kind="bridge", net_ns_fd=cfd)
    finally:
        os.close(cfd)
    r = cli.create("n3", server_bundle(tmp_path, str(lab.netns)))
    assert r.returncode == 0, r.stderr
    assert "br0 (bridge) gets no guest NIC" in cli.log.read_text()
    cli.ok("start", "n3")
    assert fetch_from(lab.links[1].peer_ns, lab.links[1].v4, HTTP_PORT) == b"hello from the guest\n"
    cli.ok("delete", "--force", "n3")

    def drop_bridge() -> None:
        with IPRoute() as ipr:
            ipr.link("del", index=ipr.link_lookup(ifname="br0")[0])

    N.in_netns(str(lab.netns), drop_bridge)
