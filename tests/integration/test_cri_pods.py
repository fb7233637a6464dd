"""Pods through containerd's CRI plugin, driven with crictl as a kubelet would: the same pod
with the ``runc`` handler (proving the test) and with ``cocoon`` (one VM for the pod).

A pod of two containers: ``web`` serves on the pod's 127.0.0.1, ``shell`` fetches from it; the
pod's hostname, sysctls and /dev/shm; an emptyDir-style host directory in both; the PID
namespace shared when the pod asks; exec with and without a terminal; logs through the CRI log
file; the pod's IP from CNI, reached from the tests' namespace; the VM in the pod's host cgroup
(cocoon); one container stopped and removed while the other runs; then the pod stopped and
removed, and nothing of it left (no VM, no host cgroup of ours, the pod cgroup as the kubelet
made it)."""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from cocoon.runtime.monitor import hostcgroup
from cocoon.runtime.network import netns as N
from cocoon.testing.leaks import live_processes, sandbox_cgroups
from tests.integration import callers as C
from tests.integration.cri import BUSYBOX_IMAGE, Cri, CriClient, cri_containerd, cri_namespace
from tests.integration.procs import cgroup_of

pytestmark = [pytest.mark.qemu, pytest.mark.root, pytest.mark.daemon("containerd")]


@pytest.fixture(scope="module")
def cri(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cri]:
    with (
        cri_namespace(tmp_path_factory, "cri") as (base, ns, crictl),
        cri_containerd(base / "c", ns, crictl) as c,
    ):
        yield c
        C.assert_no_leaks(c.runtime_root)


SYSCTLS = {"net.ipv4.ip_local_port_range": "30000 40000", "kernel.shm_rmid_forced": "1"}


def pod_cgroup(name: str) -> str:
    return f"/cocoon-cri-test-{os.getpid()}/pod-{name}"


@contextlib.contextmanager
def kubelet_cgroup(name: str) -> Iterator[str]:
    """The pod's cgroup in every hierarchy, made before the pod and removed after it, as the
    kubelet does."""
    cg = pod_cgroup(name)
    dirs = [point / cg.lstrip("/") for point, _ in hostcgroup.hierarchies()]
    for d in dirs:
        d.mkdir(parents=True)
    try:
        yield cg
    finally:
        for d in dirs:
            for sub in sorted(d.glob("*/"), reverse=True):  # runc leaves none; in case
                if sub.is_dir():
                    sub.rmdir()
            d.rmdir()
            d.parent.rmdir()


def pod_config(cri: CriClient, name: str, share_pid: bool, cgroup_parent: str) -> Path:
    logs = cri.base / "logs" / name
    logs.mkdir(parents=True, exist_ok=True)
    linux = namespace_options(share_pid) | {"cgroup_parent": cgroup_parent, "sysctls": SYSCTLS}
    return cri.write(
        f"{name}-pod.json",
        {
            "metadata": {"name": name, "namespace": "default", "uid": f"uid-{name}", "attempt": 1},
            "hostname": f"{name}-host",
            "log_directory": str(logs),
            "linux": linux,
        },
    )


def namespace_options(share_pid: bool) -> dict[str, Any]:
    """CRI's NamespaceMode: POD = 0 (the pod's), CONTAINER = 1 (its own). A kubelet sets it on
    the pod and on each container alike."""
    return {"security_context": {"namespace_options": {"pid": 0 if share_pid else 1}}}


def container_config(
    cri: CriClient, pod: str, name: str, command: list[str], share_pid: bool, empty_dir: Path
) -> Path:
    doc: dict[str, Any] = {
        "metadata": {"name": name},
        "image": {"image": BUSYBOX_IMAGE},
        "command": command,
        "log_path": f"{name}.log",
        "linux": namespace_options(share_pid),
        "mounts": [{"container_path": "/scratch", "host_path": str(empty_dir)}],
    }
    return cri.write(f"{pod}-{name}.json", doc)


def qemus_under(root: Path) -> int:
    return sum(1 for _, cmd in live_processes() if "qemu-system" in cmd and str(root) in cmd)


def exec_until(cri: CriClient, cid: str, *cmd: str, timeout: float = 60) -> str:
    """``crictl exec`` until it succeeds: a server started by `start` may not listen yet."""
    end = time.monotonic() + timeout
    while True:
        r = cri.crictl("exec", cid, *cmd)
        if r.returncode == 0 or time.monotonic() > end:
            assert r.returncode == 0, r.stderr
            return r.stdout
        time.sleep(0.5)


def vm_processes(root: Path) -> list[int]:
    """QEMU, virtiofsd and the monitor of the sandboxes under ``root``."""
    kinds = ("qemu-system", "virtiofsd", "cocoon.runtime.monitor.main")
    return [
        pid for pid, cmd in live_processes() if str(root) in cmd and any(k in cmd for k in kinds)
    ]


def fetch_from_cri_namespace(cri: CriClient, url: str) -> str:
    def get() -> str:
        with urllib.request.urlopen(url, timeout=10) as r:
            return str(r.read().decode())

    end = time.monotonic() + 60
    while True:
        try:
            return N.in_netns(str(cri.netns), get)
        except OSError:
            if time.monotonic() > end:
                raise
            time.sleep(0.5)


@pytest.mark.parametrize("share_pid", [False, True], ids=["own-pid", "shared-pid"])
@pytest.mark.parametrize("handler", ["runc", "cocoon"])
def test_a_pod_of_two_containers(cri: Cri, handler: str, share_pid: bool) -> None:
    a_pod_of_two_containers(cri, handler, share_pid)


def a_pod_of_two_containers(cri: CriClient, handler: str, share_pid: bool) -> None:
    """The pod's life through the CRI (containerd's or CRI-O's), as a kubelet drives it."""
    name = f"{handler}-{'s' if share_pid else 'o'}"
    empty_dir = cri.base / "emptydir" / name
    empty_dir.mkdir(parents=True)
    with kubelet_cgroup(name) as cgroup_parent:
        pod_json = pod_config(cri, name, share_pid, cgroup_parent)
        pod = cri.ok("runp", "--runtime", handler, pod_json)
        try:
            check_pod(cri, handler, share_pid, name, pod, pod_json, empty_dir)
        finally:
            cri.ok("stopp", pod)
            cri.ok("rmp", pod)
        assert cri.ok("pods", "-q") == ""
        if handler == "cocoon":
            C.assert_no_leaks(cri.runtime_root)
            assert qemus_under(cri.runtime_root) == 0
            assert not sandbox_cgroups(), "the VM's host cgroup is gone"
        pod_dirs = [p / cgroup_parent.lstrip("/") for p, _ in hostcgroup.hierarchies()]
        assert all(d.is_dir() for d in pod_dirs), "the kubelet's pod cgroup stays"


def check_pod(
    cri: CriClient,
    handler: str,
    share_pid: bool,
    name: str,
    pod: str,
    pod_json: Path,
    empty_dir: Path,
) -> None:
    web_json = container_config(
        cri, name, "web", ["httpd", "-f", "-p", "8080", "-h", "/etc"], share_pid, empty_dir
    )
    web = cri.ok("create", "--no-pull", pod, web_json, pod_json)
    cri.ok("start", web)
    talk = ["sh", "-c", "echo hello from $(hostname); exec sleep 100000"]
    shell_json = container_config(cri, name, "shell", talk, share_pid, empty_dir)
    shell = cri.ok("create", "--no-pull", pod, shell_json, pod_json)
    cri.ok("start", shell)
    if handler == "cocoon":
        assert qemus_under(cri.runtime_root) == 1, "one VM for the pod"
        listed = C.run([C.COCOON, "--root", cri.runtime_root, "sandbox", "list"], timeout=30)
        assert listed.stdout.split() == [pod], listed  # docs/kubernetes.md's check
        cgroup = f"{pod_cgroup(name)}/cocoon-sandbox-{pod}"
        procs = vm_processes(cri.runtime_root)
        assert len(procs) >= 3, procs
        for pid in procs:
            assert set(cgroup_of(pid).values()) == {cgroup}, (pid, cgroup_of(pid))

    body = exec_until(cri, shell, "wget", "-q", "-O", "-", "http://127.0.0.1:8080/passwd")
    assert "root:" in body
    assert cri.ok("exec", shell, "hostname") == f"{name}-host"
    for cid in (web, shell):
        ports = cri.ok("exec", cid, "cat", "/proc/sys/net/ipv4/ip_local_port_range").split()
        assert ports == ["30000", "40000"], (cid, ports)
        assert cri.ok("exec", cid, "cat", "/proc/sys/kernel/shm_rmid_forced") == "1"
    ps = cri.ok("exec", shell, "ps", "-o", "args")
    # The pause process and web's httpd are the shell's siblings only in a shared PID ns.
    assert ("httpd" in ps) is share_pid, ps
    # The pod's /dev/shm (a host tmpfs under runc, one tmpfs of the guest's under cocoon).
    cri.ok("exec", shell, "sh", "-c", "echo shared > /dev/shm/pod")
    assert cri.ok("exec", web, "cat", "/dev/shm/pod") == "shared"
    # An emptyDir-style host directory: one container's write is the other's and the host's.
    cri.ok("exec", web, "sh", "-c", "echo from-web > /scratch/note")
    assert cri.ok("exec", shell, "cat", "/scratch/note") == "from-web"
    assert (empty_dir / "note").read_text() == "from-web\n"
    # exec with a terminal: the process has one; without, it has none.
    status, out = cri.exec_tty(shell, "tty")
    assert status == 0 and "/dev/pts/" in out, (status, out)
    assert cri.crictl("exec", shell, "tty").stdout.strip() == "not a tty"
    # The container's stdout reaches the CRI log file.
    assert f"hello from {name}-host" in cri.ok("logs", shell)
    info = json.loads(cri.ok("inspectp", pod))
    ip = info["status"]["network"]["ip"]
    assert ipaddress.ip_address(ip) in ipaddress.ip_network(cri.subnet), info["status"]["network"]
    assert "root:" in fetch_from_cri_namespace(cri, f"http://{ip}:8080/passwd")

    # One container stopped and removed while the other runs.
    cri.ok("stop", web)
    cri.ok("rm", web)
    assert cri.ok("exec", shell, "echo", "still") == "still"
    if handler == "cocoon":
        assert qemus_under(cri.runtime_root) == 1
