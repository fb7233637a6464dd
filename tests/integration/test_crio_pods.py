"""Pods through CRI-O, driven with crictl as a kubelet would: the pod of tests/integration/
test_cri_pods.py (two containers on the pod's 127.0.0.1, hostname, sysctls, /dev/shm, an
emptyDir, the PID namespace shared or not, exec with and without a terminal, logs, the pod IP,
the VM in the pod's cgroup, one container removed while the other runs, nothing left) with the
``runc`` handler (proving the test) and with ``cocoon`` (one VM for the pod), through CRI-O's
conmon and pinned namespaces (tests/integration/crio.py)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from cocoon.agent.network import loopback_up
from cocoon.runtime.network import netns as N
from tests.integration import callers as C
from tests.integration.cri import crictl_binary
from tests.integration.crio import Crio, crio_in
from tests.integration.test_cri_pods import a_pod_of_two_containers

pytestmark = [pytest.mark.qemu, pytest.mark.root, pytest.mark.daemon("crio")]


@pytest.fixture(scope="module")
def cri(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Crio]:
    crictl = crictl_binary()
    if not crictl:
        pytest.skip("crictl is not on PATH nor in ../shared/tools (Debian 12 does not package it)")
    base = tmp_path_factory.mktemp("crio")  # short: conmon's attach sockets live under it
    ns = base / "netns"
    N.create_netns(ns)
    N.in_netns(str(ns), loopback_up)  # crictl reaches CRI-O's stream server on 127.0.0.1
    try:
        with crio_in(base / "c", ns, crictl) as c:
            yield c
            C.assert_no_leaks(c.runtime_root)
    finally:
        N.remove_netns(ns)


@pytest.mark.parametrize("share_pid", [False, True], ids=["own-pid", "shared-pid"])
@pytest.mark.parametrize("handler", ["runc", "cocoon"])
def test_a_pod_of_two_containers(cri: Crio, handler: str, share_pid: bool) -> None:
    a_pod_of_two_containers(cri, handler, share_pid)
