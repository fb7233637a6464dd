"""Pods through containerd's CRI plugin, driven with crictl as a kubelet would: the same pod
with the ``runc`` handler (proving the test) and with ``cocoon`` (one VM for the pod).

A pod of two containers: ``web`` serves on the pod's 127.0.0.1, ``shell`` fetches from it; the
pod's hostname and /dev/shm; the PID namespace shared when the pod asks; the pod's IP from
CNI; one container stopped and removed while the other runs; then the pod stopped and
removed, and nothing of it left."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from cocoon.agent.network import loopback_up
from cocoon.runtime.network import netns as N
from tests.integration import callers as C
from tests.integration.cri import BUSYBOX_IMAGE, Cri, cri_containerd, crictl_binary
from tests.integration.procs import live_processes

pytestmark = [pytest.mark.qemu, pytest.mark.root, pytest.mark.daemon("containerd")]


@pytest.fixture(scope="module")
def cri(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cri]:
    crictl = crictl_binary()
    if not crictl:
        pytest.skip("crictl is not on PATH nor in ../shared/tools (Debian 12 does not package it)")
    base = tmp_path_factory.mktemp("cri")  # short: shim sockets live under it
    ns = base / "netns"
    N.create_netns(ns)
    N.in_netns(str(ns), loopback_up)  # crictl reaches containerd's stream server on 127.0.0.1
    try:
        with cri_containerd(base / "c", ns, crictl) as c:
            yield c
            C.assert_no_leaks(c.runtime_root)
    finally:
        N.remove_netns(ns)


def pod_config(cri: Cri, name: str, share_pid: bool) -> Path:
    logs = cri.ctd.base / "logs" / name
    logs.mkdir(parents=True, exist_ok=True)
    return cri.write(
        f"{name}-pod.json",
        {
            "metadata": {"name": name, "namespace": "default", "uid": f"uid-{name}", "attempt": 1},
            "hostname": f"{name}-host",
            "log_directory": str(logs),
            "linux": namespace_options(share_pid),
        },
    )


def namespace_options(share_pid: bool) -> dict[str, Any]:
    """CRI's NamespaceMode: POD = 0 (the pod's), CONTAINER = 1 (its own). A kubelet sets it on
    the pod and on each container alike."""
    return {"security_context": {"namespace_options": {"pid": 0 if share_pid else 1}}}


def container_config(cri: Cri, pod: str, name: str, command: list[str], share_pid: bool) -> Path:
    doc: dict[str, Any] = {
        "metadata": {"name": name},
        "image": {"image": BUSYBOX_IMAGE},
        "command": command,
        "log_path": f"{name}.log",
        "linux": namespace_options(share_pid),
    }
    return cri.write(f"{pod}-{name}.json", doc)


def qemus_under(root: Path) -> int:
    return sum(1 for _, cmd in live_processes() if "qemu-system" in cmd and str(root) in cmd)


def exec_until(cri: Cri, cid: str, *cmd: str, timeout: float = 60) -> str:
    """``crictl exec`` until it succeeds: a server started by `start` may not listen yet."""
    end = time.monotonic() + timeout
    while True:
        r = cri.crictl("exec", cid, *cmd)
        if r.returncode == 0 or time.monotonic() > end:
            assert r.returncode == 0, r.stderr
            return r.stdout
        time.sleep(0.5)


@pytest.mark.parametrize("share_pid", [False, True], ids=["own-pid", "shared-pid"])
@pytest.mark.parametrize("handler", ["runc", "cocoon"])
def test_a_pod_of_two_containers(cri: Cri, handler: str, share_pid: bool) -> None:
    name = f"{handler}-{'s' if share_pid else 'o'}"
    pod_json = pod_config(cri, name, share_pid)
    pod = cri.ok("runp", "--runtime", handler, pod_json)
    try:
        web_json = container_config(
            cri, name, "web", ["httpd", "-f", "-p", "8080", "-h", "/etc"], share_pid
        )
        web = cri.ok("create", "--no-pull", pod, web_json, pod_json)
        cri.ok("start", web)
        shell_json = container_config(cri, name, "shell", ["sleep", "100000"], share_pid)
        shell = cri.ok("create", "--no-pull", pod, shell_json, pod_json)
        cri.ok("start", shell)
        if handler == "cocoon":
            assert qemus_under(cri.runtime_root) == 1, "one VM for the pod"

        body = exec_until(cri, shell, "wget", "-q", "-O", "-", "http://127.0.0.1:8080/passwd")
        assert "root:" in body
        assert cri.ok("exec", shell, "hostname") == f"{name}-host"
        ps = cri.ok("exec", shell, "ps", "-o", "args")
        # The pause process and web's httpd are the shell's siblings only in a shared PID ns.
        assert ("httpd" in ps) is share_pid, ps
        # The pod's /dev/shm (a host tmpfs under runc, one tmpfs of the guest's under cocoon).
        cri.ok("exec", shell, "sh", "-c", "echo shared > /dev/shm/pod")
        assert cri.ok("exec", web, "cat", "/dev/shm/pod") == "shared"
        info = json.loads(cri.ok("inspectp", pod))
        ip = info["status"]["network"]["ip"]
        assert ip.startswith("10.99.0."), info["status"]["network"]

        # One container stopped and removed while the other runs.
        cri.ok("stop", web)
        cri.ok("rm", web)
        assert cri.ok("exec", shell, "echo", "still") == "still"
        if handler == "cocoon":
            assert qemus_under(cri.runtime_root) == 1
    finally:
        cri.ok("stopp", pod)
        cri.ok("rmp", pod)
    assert cri.ok("pods", "-q") == ""
    if handler == "cocoon":
        C.assert_no_leaks(cri.runtime_root)
        assert qemus_under(cri.runtime_root) == 0
