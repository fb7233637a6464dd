"""Pods through CRI-O, driven with crictl as a kubelet would: the pod of tests/integration/
test_cri_pods.py (two containers on the pod's 127.0.0.1, hostname, sysctls, /dev/shm, an
emptyDir, the PID namespace shared or not, exec with and without a terminal, logs, the pod IP,
the VM in the pod's cgroup, one container removed while the other runs, nothing left) with the
``runc`` handler (proving the test) and with ``cocoon`` (one VM for the pod), through CRI-O's
conmon and pinned namespaces (tests/integration/crio.py)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from cocoon.runtime.network import netns as N
from cocoon.testing.leaks import live_processes, sandbox_cgroups
from tests.integration import callers as C
from tests.integration.cri import cri_namespace
from tests.integration.crio import Crio, crio_in
from tests.integration.test_cri_pods import (
    a_pod_of_two_containers,
    kubelet_cgroup,
    pod_config,
    qemus_under,
)

pytestmark = [pytest.mark.qemu, pytest.mark.root, pytest.mark.daemon("crio")]


@pytest.fixture(scope="module")
def cri(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Crio]:
    # a short base: conmon's attach sockets live under it
    with (
        cri_namespace(tmp_path_factory, "crio") as (base, ns, crictl),
        crio_in(base / "c", ns, crictl) as c,
    ):
        yield c
        C.assert_no_leaks(c.runtime_root)


@pytest.mark.parametrize("share_pid", [False, True], ids=["own-pid", "shared-pid"])
@pytest.mark.parametrize("handler", ["runc", "cocoon"])
def test_a_pod_of_two_containers(cri: Crio, handler: str, share_pid: bool) -> None:
    a_pod_of_two_containers(cri, handler, share_pid)


def refused_pod(cri: Crio, name: str, edit: dict[str, Any]) -> str:
    """``runp`` with the cocoon handler of a pod changed by ``edit`` (merged into its config's
    top level and its ``linux``): it must fail; returns crictl's error. Nothing may be left."""
    with kubelet_cgroup(name) as cgroup_parent:
        pod_json = pod_config(cri, name, False, cgroup_parent)
        doc = json.loads(pod_json.read_text())
        doc["linux"] |= edit.pop("linux", {})
        doc |= edit
        pod_json.write_text(json.dumps(doc))
        r = cri.crictl("runp", "--runtime", "cocoon", pod_json)
        assert r.returncode != 0, r.stdout
        assert cri.ok("pods", "-q") == "", "no pod of it is left"
        C.assert_no_leaks(cri.runtime_root)
        assert qemus_under(cri.runtime_root) == 0
        assert not sandbox_cgroups()
    return r.stderr


def test_a_pod_annotation_cocoon_does_not_allow_is_refused(cri: Crio) -> None:
    err = refused_pod(
        cri, "bad-annotation", {"annotations": {"io.cocoon.config.hypervisor.path": "/bin/sh"}}
    )
    assert "hypervisor.path cannot be set by an annotation" in err, err


CONNTRACK = "net.netfilter.nf_conntrack_tcp_timeout_established"


def test_a_pod_sysctl_the_guest_kernel_lacks_is_refused(cri: Crio) -> None:
    # pinns sets the pod's sysctls on the host's namespaces first: the host must have it.
    if not N.in_netns(str(cri.netns), lambda: Path("/proc/sys", *CONNTRACK.split(".")).exists()):
        pytest.skip(f"this host's network namespaces have no {CONNTRACK} (nf_conntrack)")
    err = refused_pod(cri, "bad-sysctl", {"linux": {"sysctls": {CONNTRACK: "600"}}})
    assert CONNTRACK in err, err


def test_conmon_killed_mid_create_leaves_nothing(cri: Crio) -> None:
    """conmon (the parent of ``cocoon create``) SIGKILLed while the pod's VM boots: the pod
    fails through CRI-O, and no VM, shim, state or cgroup of it stays."""
    name = "conmon-killed"
    with kubelet_cgroup(name) as cgroup_parent:
        pod_json = pod_config(cri, name, False, cgroup_parent)
        runp = threading.Thread(
            target=lambda: results.append(cri.crictl("runp", "--runtime", "cocoon", pod_json))
        )
        results: list[subprocess.CompletedProcess[str]] = []
        runp.start()
        killed = 0
        end = time.monotonic() + 120
        while not killed and time.monotonic() < end and runp.is_alive():
            for pid, cmd in live_processes():
                if " create " in cmd and str(cri.runtime_root) in cmd and C.COCOON in cmd:
                    parent = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
                    if "conmon" in Path(f"/proc/{parent}/comm").read_text():
                        time.sleep(1)  # the VM is booting
                        os.kill(parent, signal.SIGKILL)
                        killed = parent
                        break
            time.sleep(0.05)
        runp.join(300)
        assert killed, "no cocoon create under conmon was seen"
        assert results and results[0].returncode != 0, results
        for pod in cri.ok("pods", "-q").split():  # what a kubelet does with a failed pod
            cri.crictl("stopp", pod)
            cri.crictl("rmp", "-f", pod)
        C.assert_no_leaks(cri.runtime_root, timeout=60)
        assert qemus_under(cri.runtime_root) == 0
        assert not sandbox_cgroups()
