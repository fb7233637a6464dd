"""pod.membership: which sandbox a container belongs to, and its namespaces in the guest."""

from __future__ import annotations

import pytest

from cocoon.runtime.errors import SpecError, StateError
from cocoon.runtime.pod.membership import (
    GUEST_MARKER,
    Membership,
    Role,
    guest_namespaces,
    membership,
    sandbox_ns_paths,
)


@pytest.mark.parametrize(
    ("annotations", "expected"),
    [
        ({}, Membership(Role.ALONE)),
        ({"org.example": "x"}, Membership(Role.ALONE)),
        ({"io.kubernetes.cri.container-type": "sandbox"}, Membership(Role.SANDBOX)),
        (
            {"io.kubernetes.cri.container-type": "container", "io.kubernetes.cri.sandbox-id": "s1"},
            Membership(Role.MEMBER, "s1"),
        ),
        ({"io.kubernetes.cri-o.ContainerType": "sandbox"}, Membership(Role.SANDBOX)),
        (
            {
                "io.kubernetes.cri-o.ContainerType": "container",
                "io.kubernetes.cri-o.SandboxID": "s2",
            },
            Membership(Role.MEMBER, "s2"),
        ),
        ({"io.kubernetes.docker.type": "podsandbox"}, Membership(Role.SANDBOX)),
        (
            {"io.kubernetes.docker.type": "container", "io.kubernetes.sandbox.id": "s3"},
            Membership(Role.MEMBER, "s3"),
        ),
    ],
    ids=repr,
)
def test_membership_by_caller(annotations: dict[str, str], expected: Membership) -> None:
    assert membership("c1", annotations) == expected


@pytest.mark.parametrize(
    ("annotations", "error", "problem"),
    [
        (
            {"io.kubernetes.cri.container-type": "pod"},
            SpecError,
            "expected 'sandbox' or 'container'",
        ),
        (
            {"io.kubernetes.cri.container-type": "container"},
            SpecError,
            "has no io.kubernetes.cri.sandbox-id",
        ),
        (
            {"io.kubernetes.cri-o.ContainerType": "container", "io.kubernetes.cri-o.SandboxID": ""},
            SpecError,
            "has no io.kubernetes.cri-o.SandboxID",
        ),
        (
            {
                "io.kubernetes.cri.container-type": "container",
                "io.kubernetes.cri.sandbox-id": "../x",
            },
            StateError,
            "invalid sandbox id",
        ),
        (
            {"io.kubernetes.cri.container-type": "container", "io.kubernetes.cri.sandbox-id": "c1"},
            SpecError,
            "names itself as its sandbox",
        ),
    ],
    ids=repr,
)
def test_bad_pod_annotations(
    annotations: dict[str, str], error: type[Exception], problem: str
) -> None:
    with pytest.raises(error, match=problem):
        membership("c1", annotations)


def test_a_member_joins_the_sandboxs_namespaces_by_its_pid_or_its_pinned_paths() -> None:
    nss: list[dict[str, object]] = [
        {"type": "network", "path": "/proc/42/ns/net"},
        {"type": "ipc", "path": "/var/run/ipcns/abc"},
        {"type": "uts", "path": "/proc/42/ns/uts"},
        {"type": "pid"},
        {"type": "mount"},
    ]
    out = guest_namespaces("c1", nss, "s1", 42, {"ipc": "/var/run/ipcns/abc"})
    assert out == [
        {"type": "network", "path": f"{GUEST_MARKER}s1/ns/net"},
        {"type": "ipc", "path": f"{GUEST_MARKER}s1/ns/ipc"},
        {"type": "uts", "path": f"{GUEST_MARKER}s1/ns/uts"},
        {"type": "pid"},
        {"type": "mount"},
    ]


@pytest.mark.parametrize(
    "ns",
    [
        {"type": "ipc", "path": "/proc/43/ns/ipc"},  # another process
        {"type": "ipc", "path": "/proc/42/ns/net"},  # the sandbox's, but of another kind
        {"type": "uts", "path": "/var/run/utsns/other"},  # a pinned path the sandbox lacks
        {"type": "network", "path": "/proc/42/ns/../ns/net"},
    ],
    ids=repr,
)
def test_a_path_that_is_not_the_sandboxs_is_refused(ns: dict[str, object]) -> None:
    with pytest.raises(
        SpecError, match=r"container c1: its \w+ namespace .* is not its sandbox s1's"
    ):
        guest_namespaces("c1", [ns], "s1", 42, {"ipc": "/var/run/ipcns/abc"})


def test_sandbox_ns_paths_keeps_only_paths() -> None:
    nss: list[dict[str, object]] = [
        {"type": "network", "path": "/var/run/netns/cni-1"},
        {"type": "pid"},
        {"type": "ipc", "path": ""},
    ]
    assert sandbox_ns_paths(nss) == {"network": "/var/run/netns/cni-1"}


def test_a_pods_vm_holds_the_sum_of_its_containers() -> None:
    from cocoon.runtime.config import Config
    from cocoon.runtime.resources import sizing

    cfg = Config()  # 1 vCPU, 256 MiB at boot
    half_cpu = {"cpu": {"quota": 50000, "period": 100000}, "memory": {"limit": 128 << 20}}
    two_cpus = {"cpu": {"quota": 200000, "period": 100000}}
    assert sizing.pod_size(cfg, [None]) == sizing.boot_size(cfg)
    assert sizing.pod_size(cfg, [None, half_cpu]) == sizing.Size(1, 256 + 128)
    assert sizing.pod_size(cfg, [None, half_cpu, half_cpu, two_cpus]) == sizing.Size(4, 512)
    # One container alone: the same rule as before pods (max of its CPUs and the boot's).
    assert sizing.pod_size(cfg, [two_cpus]) == sizing.size_for(cfg, two_cpus) == sizing.Size(2, 256)


def test_a_pod_beyond_the_ceilings_is_clamped_with_a_warning() -> None:
    from cocoon.runtime.config import Config
    from cocoon.runtime.resources import sizing

    cfg = Config()
    size, warning = sizing.clamp(cfg, sizing.Size(64, 1 << 20), host_cpus=2, host_memory_mib=4096)
    max_vcpus, max_memory = cfg.hypervisor.ceilings(2, 4096)
    assert size == sizing.Size(max_vcpus, max_memory)
    assert "asks for 64 CPUs" in warning and f"sized to {max_vcpus} CPUs" in warning
    assert sizing.clamp(cfg, sizing.Size(1, 256), 2, 4096) == (sizing.Size(1, 256), "")
