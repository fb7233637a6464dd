"""TCP throughput between a guest and a peer network namespace, through cocoon's network
models (tcfilter, macvtap) next to a plain tap, with the same guest image and size.

Three idle sandboxes are up at once; transfers go to each in turn (tap, tcfilter, macvtap,
tap, ...), so the ratios compare pairs measured alternately. A transfer is a file of zeros
(tmpfs in the guest): the peer fetches it from the container's busybox httpd (which uses
sendfile), and the container fetches the same size from a server in the peer with busybox
wget; MB/s from the first byte to EOF, measured in the peer.

    python bench/net.py [--runs 3] [--json net.json] [--mib 32]

Prints numbers and asserts nothing. Everything it makes (namespaces, devices, sandboxes) is
removed at the end, whatever happens.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pyroute2 import IPRoute

from cocoon.runtime.container import busybox
from cocoon.runtime.network import netns as N
from cocoon.runtime.sandbox import client, paths

COCOON = str(Path(sys.executable).parent / "cocoon")
MIB = 1024 * 1024
PORT = 5001
MODELS = ("tap", "tcfilter", "macvtap")


def summary(xs: list[float]) -> dict[str, float]:
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs), "n": len(xs)}


def _configure(
    name: str, addr: str, kind: str, peer: str | None = None, peer_ns: Path | None = None
) -> None:
    """Runs in the namespace: make ``name`` (veth to ``peer`` in ``peer_ns``, or a tap)."""
    with IPRoute() as ipr:
        if kind == "tap":
            ipr.link("add", ifname=name, kind="tuntap", mode="tap", ifr={"no_pi": 1, "vnet_hdr": 1})
        else:
            assert peer_ns is not None
            pfd = os.open(peer_ns, os.O_RDONLY)
            try:
                ipr.link("add", ifname=name, kind="veth", peer={"ifname": peer, "net_ns_fd": pfd})
            finally:
                os.close(pfd)
        idx = ipr.link_lookup(ifname=name)[0]
        ipr.link("set", index=idx, state="up")
        ipr.addr("add", index=idx, address=addr, prefixlen=24)


def _up(name: str, addr: str) -> None:
    with IPRoute() as ipr:
        idx = ipr.link_lookup(ifname=name)[0]
        ipr.link("set", index=idx, state="up")
        ipr.addr("add", index=idx, address=addr, prefixlen=24)


@contextlib.contextmanager
def lab(work: Path) -> Iterator[dict[str, tuple[Path, Path, str, str]]]:
    """Per model: (namespace the sandbox's interface is in, the peer's namespace, the
    guest's address, the peer's). For the plain tap, both are one namespace holding the tap."""
    made: list[Path] = []
    out: dict[str, tuple[Path, Path, str, str]] = {}
    try:
        for i, model in enumerate(MODELS, start=1):
            net = f"10.79.{i}"
            if model == "tap":
                ns = work / "ns-tap"
                N.create_netns(ns)
                made.append(ns)
                N.in_netns(str(ns), functools.partial(_configure, "ptap0", f"{net}.1", "tap"))
                out[model] = (ns, ns, f"{net}.2", f"{net}.1")
                continue
            ns, peer = work / f"ns-{model}", work / f"ns-{model}-peer"
            for p in (ns, peer):
                N.create_netns(p)
                made.append(p)
            N.in_netns(
                str(ns), functools.partial(_configure, "eth0", f"{net}.2", "veth", "peer0", peer)
            )
            N.in_netns(str(peer), functools.partial(_up, "peer0", f"{net}.1"))
            out[model] = (ns, peer, f"{net}.2", f"{net}.1")
        yield out
    finally:
        for p in made:
            N.remove_netns(p)


class Cli:
    def __init__(self, root: Path) -> None:
        self.argv = [COCOON, "--root", str(root)]

    def __call__(self, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[bytes]:
        return subprocess.run(
            [*self.argv, *args], stdin=subprocess.DEVNULL, capture_output=True, timeout=timeout
        )

    def ok(self, *args: str) -> None:
        r = self(*args)
        if r.returncode != 0:
            raise RuntimeError(f"cocoon {' '.join(args)}: {r.stderr.decode(errors='replace')}")

    def create(self, bundle: Path, cid: str, work: Path) -> None:
        """create with the container's stdio on a file: the shim keeps it (a pipe would
        not reach EOF until the container ends)."""
        log = work / f"{cid}.stdio"
        with open(log, "wb") as f:
            r = subprocess.run(
                [*self.argv, "create", "--bundle", str(bundle), cid],
                stdin=subprocess.DEVNULL, stdout=f, stderr=f, timeout=300,
            )  # fmt: skip
        if r.returncode != 0:
            raise RuntimeError(f"cocoon create {cid}: {log.read_text(errors='replace')}")


def _bundle(work: Path, model: str, netns: Path) -> Path:
    b = busybox.make_bundle(
        work / f"bundle-{model}", ["httpd", "-f", "-p", str(PORT), "-h", "/dev/shm"]
    )
    spec = json.loads((b / "config.json").read_text())
    nss = [ns for ns in spec["linux"]["namespaces"] if ns["type"] != "network"]
    if model != "tap":  # the tap is attached below, by hand, as a baseline
        nss.append({"type": "network", "path": str(netns)})
        spec["annotations"] = {"io.cocoon.config.network.model": model}
    spec["linux"]["namespaces"] = nss
    (b / "config.json").write_text(json.dumps(spec))
    return b


def _attach_plain_tap(root: Path, cid: str, ns: Path, guest_addr: str) -> None:
    d = paths.sandbox_dir(root, cid)
    with client.Client(d, 60) as c:
        r = c.vm.AttachNetwork({"netns_path": str(ns), "model": "tap"}, timeout=120)
        nic = r["interfaces"][0]
        c.agent.UpdateInterface(
            {
                "interface": {
                    "name": "eth0",
                    "hw_addr": nic["mac"],
                    "mtu": nic["mtu"],
                    "addresses": [{"address": guest_addr, "prefix_len": 24}],
                }
            },
            timeout=60,
        )


def _listen(ns: Path, addr: str) -> socket.socket:
    def bind() -> socket.socket:
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind((addr, PORT))
        s.listen(1)
        return s

    return N.in_netns(str(ns), bind)


def guest_to_peer(peer_ns: Path, guest_addr: str, mib: int) -> float:
    """The peer GETs the guest's file; MB/s from the first byte to EOF."""

    def get() -> tuple[int, float]:
        with socket.create_connection((guest_addr, PORT), timeout=60) as s:
            s.sendall(b"GET /blob HTTP/1.0\r\n\r\n")
            n, t0 = 0, 0.0
            while chunk := s.recv(1 << 20):
                if not t0:
                    t0 = time.monotonic()
                n += len(chunk)
            return n, time.monotonic() - t0

    n, dt = N.in_netns(str(peer_ns), get)
    if n < mib * MIB:
        raise RuntimeError(f"the peer got {n} bytes of {mib * MIB}")
    return mib * MIB / dt / 1e6


def peer_to_guest(cli: Cli, cid: str, peer_ns: Path, peer_addr: str, mib: int) -> float:
    """The guest wgets a file from a server in the peer; MB/s as the server sends it (from
    the first byte to the guest's close)."""
    srv = _listen(peer_ns, peer_addr)
    got: dict[str, float] = {}

    def serve() -> None:
        srv.settimeout(120)
        conn, _ = srv.accept()
        with conn:
            conn.recv(4096)
            conn.sendall(b"HTTP/1.0 200 OK\r\nContent-Length: %d\r\n\r\n" % (mib * MIB))
            buf = b"\0" * MIB
            t0 = time.monotonic()
            for _ in range(mib):
                conn.sendall(buf)
            conn.shutdown(socket.SHUT_WR)
            conn.recv(1)  # the guest closes once it has it all
            got["dt"] = time.monotonic() - t0

    t = threading.Thread(target=serve)
    t.start()
    try:
        cli.ok("exec", cid, "wget", "-q", "-O", "/dev/null", f"http://{peer_addr}:{PORT}/")
        t.join(120)
    finally:
        srv.close()
    if "dt" not in got:
        raise RuntimeError(f"{cid}: the transfer did not finish")
    return mib * MIB / got["dt"] / 1e6


def measure(runs: int, mib: int) -> dict[str, Any]:
    res: dict[str, Any] = {"transfer_mib": mib}
    with tempfile.TemporaryDirectory(prefix="cocoon-netbench-") as td:
        work = Path(td)
        root = work / "root"
        cli = Cli(root)
        started: list[str] = []
        with lab(work) as nets:
            try:
                for model in MODELS:
                    ns, _, guest, _ = nets[model]
                    cid = f"net-{model}"
                    cli.create(_bundle(work, model, ns), cid, work)
                    started.append(cid)
                    cli.ok("start", cid)
                    if model == "tap":
                        _attach_plain_tap(root, cid, ns, guest)
                    cli.ok("exec", cid, "dd", "if=/dev/zero", "of=/dev/shm/blob", "bs=1048576",
                           f"count={mib}")  # fmt: skip
                out: dict[str, list[float]] = {}
                for _ in range(runs):
                    for model in MODELS:
                        _, peer, guest, peer_addr = nets[model]
                        cid = f"net-{model}"
                        try:
                            g2p = guest_to_peer(peer, guest, mib)
                        except OSError as exc:
                            raise RuntimeError(f"{model}: {exc}") from exc
                        p2g = peer_to_guest(cli, cid, peer, peer_addr, mib)
                        out.setdefault(f"{model}_guest_to_peer", []).append(g2p)
                        out.setdefault(f"{model}_peer_to_guest", []).append(p2g)
            finally:
                for cid in started:
                    cli("delete", "--force", cid)
    res["mb_per_s"] = {k: summary(v) for k, v in out.items()}
    for model in ("tcfilter", "macvtap"):
        for way in ("guest_to_peer", "peer_to_guest"):
            ratios = [a / b for a, b in zip(out[f"{model}_{way}"], out[f"tap_{way}"], strict=True)]
            res.setdefault("ratio_over_plain_tap", {})[f"{model}_{way}"] = summary(ratios)
    return res


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--mib", type=int, default=32)  # the guest's /dev/shm holds 64
    ap.add_argument("--json", type=Path, default=Path("net.json"))
    args = ap.parse_args()
    res = measure(args.runs, args.mib)
    args.json.write_text(json.dumps(res, indent=1) + "\n")
    for k, s in res["mb_per_s"].items():
        print(f"{k:28s} {s['median']:8.1f} MB/s ({s['min']:.1f}-{s['max']:.1f})")
    for k, s in res["ratio_over_plain_tap"].items():
        print(f"{k:28s} {s['median']:8.2f}x plain tap ({s['min']:.2f}-{s['max']:.2f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
