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
