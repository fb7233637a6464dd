"""The guest's own spec edits (cocoon.agent.specedit): dicts in, dicts out, bad input refused."""

from __future__ import annotations

import copy
from typing import Any

import grpc
import pytest

from cocoon.agent import server, specedit
from cocoon.agent.errors import AgentError, ContainerError, DeviceError, ErrorKind, NetError

SDA = (8, 0)


def shared_netns_spec(**sysctl: Any) -> dict[str, Any]:
    return {"linux": {"namespaces": [{"type": "pid"}], "sysctl": dict(sysctl)}}


def invalid(match: str) -> Any:
    """pytest.raises for a ContainerError of kind INVALID whose message matches."""
    return pytest.raises(ContainerError, match=match)


# ------------------------------------------------------------------ parse, section


def test_parse_returns_the_object() -> None:
    assert specedit.parse(b'{"ociVersion": "1.0.2"}', "container c1: spec") == {
        "ociVersion": "1.0.2"
    }


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"{not json", r"^container c1: spec is not JSON: "),
        (b"", r"^container c1: spec is not JSON: "),
        (b"[1, 2]", r"^container c1: spec is not a JSON object$"),
        (b'"text"', r"^container c1: spec is not a JSON object$"),
        (b"null", r"^container c1: spec is not a JSON object$"),
    ],
)
def test_parse_refuses_what_is_not_a_json_object(data: bytes, message: str) -> None:
    with invalid(message) as ei:
        specedit.parse(data, "container c1: spec")
    assert ei.value.kind is ErrorKind.INVALID


def test_section_absent_or_null_is_empty_and_not_stored() -> None:
    spec: dict[str, Any] = {"root": None}
    assert specedit.section(spec, "root") == {}
    assert specedit.section(spec, "process") == {}
    assert spec == {"root": None}
    assert specedit.section({"root": {"path": "/r"}}, "root") == {"path": "/r"}


def test_section_of_the_wrong_type_is_invalid() -> None:
    with invalid(r"^spec: root is not an object$"):
        specedit.section({"root": "/r"}, "root")
    with invalid(r"^spec: linux.sysctl is not an object$"):
        specedit.section({"sysctl": []}, "sysctl", "linux.sysctl")


# ------------------------------------------------------------------ own_netns


@pytest.mark.parametrize(
    ("spec", "own"),
    [
        ({"linux": {"namespaces": [{"type": "pid"}, {"type": "network"}]}}, True),
        ({"linux": {"namespaces": [{"type": "network", "path": "/x"}]}}, True),
        ({"linux": {"namespaces": [{"type": "pid"}, {"type": "mount"}]}}, False),
        ({"linux": {"namespaces": None}}, False),
        ({"linux": {}}, False),
        ({"linux": None}, False),
        ({}, False),
    ],
)
def test_own_netns(spec: dict[str, Any], own: bool) -> None:
    assert specedit.own_netns(spec) is own


def test_own_netns_of_a_bad_linux_section_is_invalid() -> None:
    with invalid("linux is not an object"):
        specedit.own_netns({"linux": ["network"]})


# ------------------------------------------------------------------ devices


def test_bind_device_adds_the_device_and_allows_it() -> None:
    spec: dict[str, Any] = {"linux": {"namespaces": []}}
    specedit.bind_device(spec, "/dev/xvda", *SDA)
    assert spec == {
        "linux": {
            "namespaces": [],
            "devices": [
                {"path": "/dev/xvda", "type": "b", "major": 8, "minor": 0, "fileMode": 0o660}
            ],
            "resources": {
                "devices": [{"allow": True, "type": "b", "major": 8, "minor": 0, "access": "rwm"}]
            },
        }
    }


def test_bind_device_replaces_the_hosts_numbers_and_keeps_the_rest() -> None:
    host_entry = {"path": "/dev/xvda", "type": "b", "major": 259, "minor": 3, "fileMode": 0o600}
    other = {"path": "/dev/fuse", "type": "c", "major": 10, "minor": 229}
    deny_all = {"allow": False, "access": "rwm"}
    spec: dict[str, Any] = {
        "linux": {"devices": [other, host_entry], "resources": {"devices": [deny_all]}}
    }
    specedit.bind_device(spec, "/dev/xvda", 8, 16)
    assert spec["linux"]["devices"] == [
        other,
        {"path": "/dev/xvda", "type": "b", "major": 8, "minor": 16, "fileMode": 0o600},
    ]
    assert spec["linux"]["resources"]["devices"] == [
        deny_all,  # the host's rules stay, the guest's allow comes after (later rules win)
        {"allow": True, "type": "b", "major": 8, "minor": 16, "access": "rwm"},
    ]


def test_bind_device_into_an_empty_spec() -> None:
    spec: dict[str, Any] = {}
    specedit.bind_device(spec, "/dev/vdb", 254, 16)
    assert spec["linux"]["devices"][0]["major"] == 254
    assert spec["linux"]["resources"]["devices"][0]["minor"] == 16


@pytest.mark.parametrize(
    ("linux", "where"),
    [
        ("nope", "linux"),
        ({"devices": {"path": "/dev/xvda"}}, "linux.devices"),
        ({"resources": []}, "linux.resources"),
        ({"resources": {"devices": "all"}}, "linux.resources.devices"),
    ],
)
def test_bind_device_refuses_a_misshapen_spec(linux: Any, where: str) -> None:
    with invalid(rf"^spec: {where} is not an? (object|list)$"):
        specedit.bind_device({"linux": linux}, "/dev/xvda", *SDA)


def test_allow_block_device_appends_one_rule_each_time() -> None:
    spec: dict[str, Any] = {"linux": {"resources": None}}
    specedit.allow_block_device(spec, 8, 0)
    specedit.allow_block_device(spec, 8, 16)
    assert spec == {
        "linux": {
            "resources": {
                "devices": [
                    {"allow": True, "type": "b", "major": 8, "minor": 0, "access": "rwm"},
                    {"allow": True, "type": "b", "major": 8, "minor": 16, "access": "rwm"},
                ]
            }
        }
    }


def test_device_mount_sources_lists_only_dev_nodes() -> None:
    spec = {
        "mounts": [
            {"destination": "/data", "source": "/dev/sdb", "type": "ext4"},
            {"destination": "/proc", "source": "proc", "type": "proc"},
            {"destination": "/dev", "source": "tmpfs", "type": "tmpfs"},
            {"destination": "/v", "source": "/run/cocoon/shared/c1/mounts/v"},
            {"destination": "/nosource"},
            {"destination": "/odd", "source": 7},
            "not a mount",
            {"destination": "/b", "source": "/dev/mapper/vg-lv"},
        ]
    }
    before = copy.deepcopy(spec)
    assert specedit.device_mount_sources(spec) == ["/dev/sdb", "/dev/mapper/vg-lv"]
    assert spec == before
    assert specedit.device_mount_sources({}) == []
    assert specedit.device_mount_sources({"mounts": None}) == []


# ------------------------------------------------------------------ net.* sysctls


def test_net_sysctls_are_taken_when_the_guest_netns_is_shared() -> None:
    spec = shared_netns_spec(
        **{
            "net.ipv4.ip_unprivileged_port_start": "0",
            "net.ipv4.ping_group_range": "0 2147483647",
            "kernel.msgmax": "9000",
            "net.core.somaxconn": 4096,
        }
    )
    taken = specedit.take_guest_net_sysctls(spec)
    assert taken == {
        "net.ipv4.ip_unprivileged_port_start": "0",
        "net.ipv4.ping_group_range": "0 2147483647",
        "net.core.somaxconn": "4096",  # as a string: it is written to /proc/sys as text
    }
    assert spec["linux"]["sysctl"] == {"kernel.msgmax": "9000"}  # crun still sets this one


def test_net_sysctls_stay_with_a_netns_of_its_own() -> None:
    spec = {"linux": {"namespaces": [{"type": "network"}], "sysctl": {"net.ipv4.ip_forward": "1"}}}
    before = copy.deepcopy(spec)
    assert specedit.take_guest_net_sysctls(spec) == {}
    assert spec == before


@pytest.mark.parametrize("spec", [{}, {"linux": None}, {"linux": {"sysctl": None}}])
def test_no_sysctls_take_nothing(spec: dict[str, Any]) -> None:
    before = copy.deepcopy(spec)
    assert specedit.take_guest_net_sysctls(spec) == {}
    assert spec == before


@pytest.mark.parametrize(
    "key", ["net.../../etc/passwd", "net.ipv4/../../x", "net..ipv4.x", "net.ipv4.x\0y"]
)
def test_bad_sysctl_names_are_refused_before_any_is_taken(key: str) -> None:
    spec = shared_netns_spec(**{"net.ipv4.ip_forward": "1", key: "1"})
    before = copy.deepcopy(spec)
    with invalid("not a sysctl name") as ei:
        specedit.take_guest_net_sysctls(spec)
    assert ei.value.kind is ErrorKind.INVALID
    assert spec == before  # the good one was not taken either


def test_sysctl_section_of_the_wrong_type_is_invalid() -> None:
    with invalid(r"^spec: linux.sysctl is not an object$"):
        specedit.take_guest_net_sysctls({"linux": {"sysctl": ["net.ipv4.ip_forward=1"]}})


# ------------------------------------------------------------------ kinds reach the host


class AbortedError(Exception):
    pass


class FakeContext:
    def abort(self, code: grpc.StatusCode, details: str) -> None:
        raise AbortedError(code, details)


@pytest.mark.parametrize(
    ("error", "code"),
    [
        (ContainerError(ErrorKind.NOT_FOUND, "m"), grpc.StatusCode.NOT_FOUND),
        (ContainerError(ErrorKind.EXISTS, "m"), grpc.StatusCode.ALREADY_EXISTS),
        (ContainerError(ErrorKind.INVALID, "m"), grpc.StatusCode.INVALID_ARGUMENT),
        (ContainerError(ErrorKind.PRECONDITION, "m"), grpc.StatusCode.FAILED_PRECONDITION),
        (ContainerError(ErrorKind.INTERNAL, "m"), grpc.StatusCode.INTERNAL),
        (DeviceError("m"), grpc.StatusCode.FAILED_PRECONDITION),
        (NetError("m"), grpc.StatusCode.INVALID_ARGUMENT),
        (OSError(5, "m"), grpc.StatusCode.INTERNAL),
    ],
)
def test_error_kinds_become_the_same_grpc_codes(error: Exception, code: grpc.StatusCode) -> None:
    with pytest.raises(AbortedError) as ei, server._errors(FakeContext()):  # type: ignore[arg-type]
        raise error
    assert ei.value.args == (code, str(error))


def test_every_kind_has_a_code() -> None:
    assert set(server._CODES) == set(ErrorKind)
    assert all(issubclass(c, AgentError) for c in (ContainerError, DeviceError, NetError))


def test_bad_spec_input_reaches_the_host_as_invalid_argument() -> None:
    with pytest.raises(AbortedError) as ei, server._errors(FakeContext()):  # type: ignore[arg-type]
        specedit.parse(b"[]", "container c1: spec")
    assert ei.value.args == (
        grpc.StatusCode.INVALID_ARGUMENT,
        "container c1: spec is not a JSON object",
    )


# ------------------------------------------------------------------ join_container_namespaces
def test_join_container_namespaces_points_markers_at_the_init_in_the_guest() -> None:
    spec: dict[str, Any] = {
        "linux": {
            "namespaces": [
                {"type": "network", "path": "cocoon:container/p1/ns/net"},
                {"type": "pid", "path": "cocoon:container/p1/ns/pid"},
                {"type": "mount"},
                {"type": "ipc", "path": "/proc/9/ns/ipc"},  # not a marker: left as it is
            ]
        }
    }
    asked: list[str] = []

    def init_pid(cid: str) -> int:
        asked.append(cid)
        return 77

    specedit.join_container_namespaces(spec, init_pid)
    assert spec["linux"]["namespaces"] == [
        {"type": "network", "path": "/proc/77/ns/net"},
        {"type": "pid", "path": "/proc/77/ns/pid"},
        {"type": "mount"},
        {"type": "ipc", "path": "/proc/9/ns/ipc"},
    ]
    assert asked == ["p1", "p1"]


@pytest.mark.parametrize(
    "path",
    [
        "cocoon:container/",
        "cocoon:container/p1",
        "cocoon:container/p1/net",
        "cocoon:container/p1/ns/",
    ],
)
def test_a_malformed_marker_is_invalid(path: str) -> None:
    spec: dict[str, Any] = {"linux": {"namespaces": [{"type": "network", "path": path}]}}
    with pytest.raises(ContainerError, match="malformed") as info:
        specedit.join_container_namespaces(spec, lambda cid: 1)
    assert info.value.kind is ErrorKind.INVALID


def test_a_missing_container_to_join_stops_the_create() -> None:
    spec: dict[str, Any] = {
        "linux": {"namespaces": [{"type": "uts", "path": "cocoon:container/gone/ns/uts"}]}
    }

    def init_pid(cid: str) -> int:
        raise ContainerError(ErrorKind.PRECONDITION, f"no container {cid}")

    with pytest.raises(ContainerError, match="no container gone"):
        specedit.join_container_namespaces(spec, init_pid)


def test_pod_shm_dirs_lists_the_pods_tmpfs_sources() -> None:
    spec: dict[str, Any] = {
        "mounts": [
            {"destination": "/dev/shm", "type": "bind", "source": "/run/cocoon/shm/p1"},
            {"destination": "/proc", "type": "proc", "source": "proc"},
            {"destination": "/x", "type": "bind", "source": "/run/cocoon/shared/c1/x"},
        ]
    }
    assert specedit.pod_shm_dirs(spec) == ["/run/cocoon/shm/p1"]
    assert specedit.pod_shm_dirs({}) == []


@pytest.mark.parametrize(
    "source", ["/run/cocoon/shm/", "/run/cocoon/shm/..", "/run/cocoon/shm/p1/../../etc"]
)
def test_a_malformed_pod_shm_source_is_invalid(source: str) -> None:
    spec: dict[str, Any] = {
        "mounts": [{"destination": "/dev/shm", "type": "bind", "source": source}]
    }
    with pytest.raises(ContainerError, match=r"mounts\[0\]\.source .* is malformed"):
        specedit.pod_shm_dirs(spec)
