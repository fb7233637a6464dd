"""The OCI bundle (runtime/container/spec.py): load_bundle's one clear error per problem, and
guest_spec's rewrite of a host spec into what crun sees inside the VM."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest

from cocoon.runtime.container import spec as specmod
from cocoon.runtime.container.spec import (
    GUEST_SHARED,
    Bundle,
    guest_spec,
    is_bind_mount,
    is_vfio_group,
    load_bundle,
)
from cocoon.runtime.errors import SpecError


def base_spec() -> dict[str, Any]:
    return {
        "ociVersion": "1.0.2",
        "process": {"args": ["sh"], "cwd": "/", "env": ["PATH=/bin"], "user": {"uid": 0}},
        "root": {"path": "rootfs"},
    }


def make_bundle(tmp_path: Path, spec: Any, raw: str | None = None) -> Path:
    b = tmp_path / "bundle"
    (b / "rootfs").mkdir(parents=True, exist_ok=True)
    (b / "config.json").write_text(raw if raw is not None else json.dumps(spec))
    return b


def with_(**over: Any) -> dict[str, Any]:
    s = base_spec()
    s.update(over)
    return s


def load_error(tmp_path: Path, spec: Any = None, raw: str | None = None) -> str:
    b = make_bundle(tmp_path, spec, raw)
    with pytest.raises(SpecError) as e:
        load_bundle(b)
    return str(e.value)


# ------------------------------------------------------------------------------ load_bundle: good
def test_a_good_bundle_loads(tmp_path: Path) -> None:
    spec = with_(annotations={"a": "1"}, hooks={"poststop": [{"path": "/bin/true"}]})
    spec["process"]["terminal"] = True
    b = load_bundle(make_bundle(tmp_path, spec))
    assert b.path == (tmp_path / "bundle").resolve()
    assert b.rootfs == b.path / "rootfs"
    assert b.spec == spec
    assert b.binds == ()
    assert b.terminal is True
    assert b.annotations == {"a": "1"}
    assert b.hooks("poststop") == [{"path": "/bin/true"}]
    assert b.hooks("prestart") == []


def test_a_relative_bundle_path_is_resolved(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    make_bundle(tmp_path, base_spec())
    monkeypatch.chdir(tmp_path)
    b = load_bundle(Path("bundle"))
    assert b.path.is_absolute() and b.path == (tmp_path / "bundle").resolve()


def test_an_absolute_rootfs_is_used_as_is(tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    b = load_bundle(make_bundle(tmp_path, with_(root={"path": str(elsewhere), "readonly": True})))
    assert b.rootfs == elsewhere


def test_bind_mounts_are_collected_with_their_index(tmp_path: Path) -> None:
    src = tmp_path / "data"
    src.mkdir()
    (tmp_path / "bundle").mkdir()
    (tmp_path / "bundle" / "rel").write_text("x")
    mounts = [
        {"destination": "/proc", "type": "proc", "source": "proc"},
        {"destination": "/data", "type": "bind", "source": str(src)},
        {"destination": "/null", "type": "bind", "source": "/dev/null", "options": ["bind"]},
        {"destination": "/rel", "source": "rel", "options": ["rbind", "ro"]},
        {"destination": "/t", "type": "tmpfs", "source": "/no/such/tmpfs/source"},
    ]
    b = load_bundle(make_bundle(tmp_path, with_(mounts=mounts)))
    assert [(m.index, m.source, m.destination) for m in b.binds] == [
        (1, src, "/data"),
        (3, b.path / "rel", "/rel"),
    ]
    assert [m.share_name for m in b.binds] == ["1-data", "3-rel"]


def test_a_spec_without_optional_sections_loads(tmp_path: Path) -> None:
    spec = with_(mounts=None, hooks=None, annotations=None)
    b = load_bundle(make_bundle(tmp_path, spec))
    assert b.binds == () and b.annotations == {} and b.hooks("poststart") == []
    assert b.terminal is False


# ------------------------------------------------------------------------------ load_bundle: bad
def test_missing_config_json(tmp_path: Path) -> None:
    (tmp_path / "b").mkdir()
    with pytest.raises(SpecError, match=r"config\.json: no such file \(is .* an OCI bundle\?\)"):
        load_bundle(tmp_path / "b")


def test_missing_bundle_directory(tmp_path: Path) -> None:
    with pytest.raises(SpecError, match="no such file"):
        load_bundle(tmp_path / "nope")


def test_config_json_that_is_a_directory(tmp_path: Path) -> None:
    (tmp_path / "b" / "config.json").mkdir(parents=True)
    with pytest.raises(SpecError, match=r"config\.json: Is a directory"):
        load_bundle(tmp_path / "b")


@pytest.mark.parametrize("raw", ["", "{", "not json", '{"a": 1,}', "\x00"], ids=repr)
def test_not_json(tmp_path: Path, raw: str) -> None:
    msg = load_error(tmp_path, raw=raw)
    assert "config.json: not valid JSON" in msg


@pytest.mark.parametrize("raw", ["[]", "1", '"x"', "null"])
def test_top_level_not_an_object(tmp_path: Path, raw: str) -> None:
    assert "the top level must be a JSON object" in load_error(tmp_path, raw=raw)


@pytest.mark.parametrize("version", [None, 1, 1.0, ["1.0.2"]], ids=repr)
def test_oci_version_must_be_a_string(tmp_path: Path, version: Any) -> None:
    spec = base_spec()
    if version is None:
        del spec["ociVersion"]
    else:
        spec["ociVersion"] = version
    assert "ociVersion must be a string" in load_error(tmp_path, spec)


@pytest.mark.parametrize(
    "root",
    ["<missing>", None, "rootfs", [], {}, {"path": ""}, {"path": None}, {"path": 5}],
    ids=repr,
)
def test_root_path_must_be_a_non_empty_string(tmp_path: Path, root: Any) -> None:
    spec = base_spec()
    if root == "<missing>":
        del spec["root"]
    else:
        spec["root"] = root
    assert "root.path must be a non-empty string" in load_error(tmp_path, spec)


def test_rootfs_must_exist_and_be_a_directory(tmp_path: Path) -> None:
    msg = load_error(tmp_path, with_(root={"path": "nope"}))
    assert "rootfs" in msg and "nope" in msg and "does not exist" in msg
    (tmp_path / "afile").write_text("")
    msg = load_error(tmp_path, with_(root={"path": str(tmp_path / "afile")}))
    assert "afile does not exist or is not a directory" in msg


@pytest.mark.parametrize(
    ("process", "problem"),
    [
        ([], "process must be an object"),
        ("sh", "process must be an object"),
        ({}, "process.args must be a non-empty list of strings"),
        ({"args": []}, "process.args must be a non-empty list of strings"),
        ({"args": "sh"}, "process.args must be a non-empty list of strings"),
        ({"args": ["sh", 1]}, "process.args must be a non-empty list of strings"),
        ({"args": ["sh"], "cwd": "rel"}, "process.cwd must be an absolute path"),
        ({"args": ["sh"], "cwd": 1}, "process.cwd must be an absolute path"),
        ({"args": ["sh"], "env": "A=1"}, "process.env must be a list of strings"),
        ({"args": ["sh"], "env": ["A=1", 2]}, "process.env must be a list of strings"),
        ({"args": ["sh"], "user": 0}, "process.user must be an object"),
    ],
    ids=repr,
)
def test_bad_process(tmp_path: Path, process: Any, problem: str) -> None:
    msg = load_error(tmp_path, with_(process=process))
    assert "config.json: " + problem in msg


def test_missing_process(tmp_path: Path) -> None:
    spec = base_spec()
    del spec["process"]
    assert "process" in load_error(tmp_path, spec)


def test_validate_process_names_where(tmp_path: Path) -> None:
    with pytest.raises(SpecError, match=r"^process file /x: process\.args"):
        specmod.validate_process({"args": []}, "process file /x")
    specmod.validate_process({"args": ["ls"]}, "x")  # cwd, env and user may be left out


@pytest.mark.parametrize(
    ("mounts", "problem"),
    [
        ({"destination": "/x"}, "mounts must be a list"),
        ("/x", "mounts must be a list"),
        (["/x"], "mounts[0] needs a destination"),
        ([{"source": "proc", "type": "proc"}], "mounts[0] needs a destination"),
        (
            [{"destination": "/p", "type": "proc"}, {"destination": 5}],
            "mounts[1] needs a destination",
        ),
        (
            [{"destination": "/d", "type": "bind", "source": "/no/such/dir"}],
            "mounts[0] source /no/such/dir does not exist",
        ),
    ],
    ids=repr,
)
def test_bad_mounts(tmp_path: Path, mounts: Any, problem: str) -> None:
    assert problem in load_error(tmp_path, with_(mounts=mounts))


@pytest.mark.parametrize(
    "mount",
    [
        {"destination": "/d", "options": ["rbind"]},
        {"destination": "/d", "type": "bind", "source": ""},
    ],
    ids=repr,
)
def test_a_bind_mount_without_a_source(tmp_path: Path, mount: dict[str, Any]) -> None:
    assert "mounts[0]" in load_error(tmp_path, with_(mounts=[mount]))


def test_a_relative_bind_source_is_checked_in_the_bundle(tmp_path: Path) -> None:
    msg = load_error(tmp_path, with_(mounts=[{"destination": "/d", "type": "bind", "source": "d"}]))
    assert f"source {(tmp_path / 'bundle' / 'd').resolve()} does not exist" in msg


@pytest.mark.parametrize(
    ("hooks", "problem"),
    [
        ([{"path": "/bin/true"}], "hooks must be an object"),
        ("prestart", "hooks must be an object"),
        ({"prestart": [{}]}, "hooks.prestart[0] needs a path"),
        ({"poststop": [{"path": "/a"}, {"args": ["x"]}]}, "hooks.poststop[1] needs a path"),
        ({"createRuntime": ["/bin/true"]}, "hooks.createRuntime[0] needs a path"),
        ({"poststart": [{"path": 7}]}, "hooks.poststart[0] needs a path"),
    ],
    ids=repr,
)
def test_bad_hooks(tmp_path: Path, hooks: Any, problem: str) -> None:
    assert problem in load_error(tmp_path, with_(hooks=hooks))


@pytest.mark.parametrize("entries", [5, True], ids=repr)
def test_a_hook_list_that_is_not_a_list(tmp_path: Path, entries: Any) -> None:
    assert "hooks.prestart" in load_error(tmp_path, with_(hooks={"prestart": entries}))


@pytest.mark.parametrize(
    "linux",
    [
        {"namespaces": "pid"},
        {"namespaces": {"type": "pid"}},
        {"namespaces": ["pid"]},
        {"namespaces": [{"path": "/proc/1/ns/net"}]},
        {"namespaces": [{"type": "bogus"}]},
        {"namespaces": [{"type": "pid"}, {"type": "pid"}]},
        {"namespaces": [{"type": "network", "path": 5}]},
        [],
    ],
    ids=repr,
)
def test_bad_namespaces(tmp_path: Path, linux: Any) -> None:
    msg = load_error(tmp_path, with_(linux=linux))
    assert "namespace" in msg or "linux" in msg


# ------------------------------------------------------------------------------ is_bind_mount
@pytest.mark.parametrize(
    ("mount", "expected"),
    [
        ({"type": "bind", "source": "/a", "destination": "/b"}, True),
        ({"type": "none", "options": ["rbind", "ro"]}, True),
        ({"options": ["bind"]}, True),
        ({"type": "bind", "options": None}, True),
        ({"type": "tmpfs", "options": ["nosuid"]}, False),
        ({"type": "proc"}, False),
        ({"type": "none", "options": None}, False),
        ({"type": "overlay", "options": ["lowerdir=/bind", "rbindx"]}, False),
        ({}, False),
    ],
    ids=repr,
)
def test_is_bind_mount(mount: dict[str, Any], expected: bool) -> None:
    assert is_bind_mount(mount) is expected


# ------------------------------------------------------------------------------ is_vfio_group
@pytest.mark.parametrize(
    ("dev", "expected"),
    [
        ({"path": "/dev/vfio/12", "type": "c"}, True),
        ({"path": "/dev/vfio/0"}, True),
        ({"path": "/dev/vfio/vfio", "type": "c"}, False),
        ({"path": "/dev/vfio"}, False),
        ({"path": "/dev/fuse"}, False),
        ({"path": "/dev/vfiox/1"}, False),
        ({"path": 12}, False),
        ({}, False),
        ("/dev/vfio/12", False),
        (None, False),
    ],
    ids=repr,
)
def test_is_vfio_group(dev: Any, expected: bool) -> None:
    assert is_vfio_group(dev) is expected


# ------------------------------------------------------------------------------ guest_spec
CID = "c0ffee"
BASE = f"{GUEST_SHARED}/{CID}"


@pytest.fixture
def host_bundle(tmp_path: Path) -> Bundle:
    """A docker/containerd-like spec with everything guest_spec must rewrite or drop."""
    vol = tmp_path / "vol"
    vol.mkdir()
    shm = tmp_path / "shm"
    shm.mkdir()
    (tmp_path / "bundle").mkdir()
    (tmp_path / "bundle" / "hosts").write_text("127.0.0.1 localhost\n")
    spec = with_(
        mounts=[
            {"destination": "/proc", "type": "proc", "source": "proc"},  # 0
            {"destination": "/data", "type": "bind", "source": str(vol), "options": ["rbind"]},  # 1
            {"destination": "/dev/shm", "type": "bind", "source": str(shm), "options": ["rbind"]},
            {"destination": "/etc/hosts", "source": "hosts", "options": ["bind", "ro"]},  # 3
            {"destination": "/dev/null2", "type": "bind", "source": "/dev/null"},  # 4
            {"destination": "/vol", "type": "ext4", "source": "/dev/sdz"},  # 5: a block volume
            {"destination": "/", "type": "bind", "source": "/"},  # 6: share_name "6-root"
        ],
        hooks={
            "prestart": [{"path": "/usr/bin/netns-hook"}],
            "createRuntime": [{"path": "/usr/bin/nvidia-hook"}],
            "createContainer": [{"path": "/in/guest/hook"}],
            "startContainer": [{"path": "/in/guest/start"}],
            "poststart": [{"path": "/usr/bin/notify"}],
            "poststop": [{"path": "/usr/bin/cleanup"}],
        },
        linux={
            "cgroupsPath": "system.slice:docker:abc",
            "mountLabel": "system_u:object_r:container_file_t:s0",
            "namespaces": [
                {"type": "pid"},
                {"type": "ipc", "path": "/proc/42/ns/ipc"},
                {"type": "uts", "path": "/proc/42/ns/uts"},
                {"type": "mount"},
                {"type": "network", "path": "/var/run/netns/cni-1"},
            ],
            "devices": [
                {"path": "/dev/vfio/12", "type": "c", "major": 240, "minor": 0},
                {"path": "/dev/fuse", "type": "c", "major": 10, "minor": 229},
            ],
            "resources": {"memory": {"limit": 1 << 28}},
        },
    )
    spec["process"]["apparmorProfile"] = "docker-default"
    spec["process"]["selinuxLabel"] = "system_u:system_r:container_t:s0"
    spec["process"]["noNewPrivileges"] = True
    return load_bundle(make_bundle(tmp_path, spec))


def test_guest_spec_does_not_touch_the_host_spec(host_bundle: Bundle) -> None:
    before = copy.deepcopy(host_bundle.spec)
    out = guest_spec(host_bundle, CID, {5: "/dev/vdb"}, guest_network=True)
    assert host_bundle.spec == before
    assert out != before


def test_guest_rootfs_is_in_the_share(host_bundle: Bundle) -> None:
    assert guest_spec(host_bundle, CID)["root"]["path"] == f"{BASE}/rootfs"
    assert specmod.guest_container_dir(CID) == BASE


def test_bind_sources_point_into_the_share(host_bundle: Bundle) -> None:
    out = guest_spec(host_bundle, CID, {5: "/dev/vdb"})
    src = {m["destination"]: m["source"] for m in out["mounts"]}
    assert src["/data"] == f"{BASE}/mounts/1-vol"
    assert src["/etc/hosts"] == f"{BASE}/mounts/3-hosts"
    assert src["/"] == f"{BASE}/mounts/6-root"
    assert src["/proc"] == "proc"
    assert src["/dev/null2"] == "/dev/null"  # device binds are made in the guest
    assert src["/vol"] == "/dev/vdb"  # a hot-plugged block device
    # Order, destinations and options other than the source are kept.
    assert [m["destination"] for m in out["mounts"]] == [
        m["destination"] for m in host_bundle.spec["mounts"]
    ]
    assert out["mounts"][3]["options"] == ["bind", "ro"]


def test_dev_shm_becomes_a_guest_tmpfs(host_bundle: Bundle) -> None:
    out = guest_spec(host_bundle, CID)
    (shm,) = [m for m in out["mounts"] if m["destination"] == "/dev/shm"]
    assert shm["type"] == "tmpfs" and shm["source"] == "shm"
    assert "mode=1777" in shm["options"] and "nosuid" in shm["options"]
    assert set(shm) == {"destination", "type", "source", "options"}


def test_no_host_path_reaches_the_guest(host_bundle: Bundle, tmp_path: Path) -> None:
    out = json.dumps(guest_spec(host_bundle, CID, {5: "/dev/vdb"}, guest_network=True))
    assert str(tmp_path) not in out
    assert "/proc/42/ns" not in out and "cni-1" not in out


def test_host_only_labels_are_dropped(host_bundle: Bundle) -> None:
    out = guest_spec(host_bundle, CID)
    assert "apparmorProfile" not in out["process"]
    assert "selinuxLabel" not in out["process"]
    assert "mountLabel" not in out["linux"]
    assert out["process"]["noNewPrivileges"] is True  # the rest of process is kept
    assert out["process"]["args"] == ["sh"]
    assert out["linux"]["resources"] == {"memory": {"limit": 1 << 28}}


def test_cgroups_go_under_cocoon(host_bundle: Bundle) -> None:
    assert guest_spec(host_bundle, CID)["linux"]["cgroupsPath"] == f"/cocoon/{CID}"
    assert guest_spec(host_bundle, "other")["linux"]["cgroupsPath"] == "/cocoon/other"


@pytest.mark.parametrize(
    ("guest_network", "types"),
    [(False, ["pid", "ipc", "uts", "mount", "network"]), (True, ["pid", "ipc", "uts", "mount"])],
)
def test_host_namespace_paths_become_new_namespaces(
    host_bundle: Bundle, guest_network: bool, types: list[str]
) -> None:
    nss = guest_spec(host_bundle, CID, guest_network=guest_network)["linux"]["namespaces"]
    assert nss == [{"type": t} for t in types]


def test_only_guest_hooks_are_kept(host_bundle: Bundle) -> None:
    hooks = guest_spec(host_bundle, CID)["hooks"]
    assert hooks == {
        "createContainer": [{"path": "/in/guest/hook"}],
        "startContainer": [{"path": "/in/guest/start"}],
    }


def test_a_spec_with_only_host_hooks_has_none_in_the_guest(tmp_path: Path) -> None:
    spec = with_(hooks={"prestart": [{"path": "/x"}], "poststop": [{"path": "/y"}]})
    assert "hooks" not in guest_spec(load_bundle(make_bundle(tmp_path, spec)), CID)


def test_vfio_groups_are_not_device_nodes_in_the_guest(host_bundle: Bundle) -> None:
    devs = guest_spec(host_bundle, CID)["linux"]["devices"]
    assert [d["path"] for d in devs] == ["/dev/fuse"]


@pytest.mark.parametrize(
    ("devices", "expected"),
    [
        ("<absent>", "<absent>"),
        ([], []),
        ([{"path": "/dev/vfio/3"}], []),
        ([{"path": "/dev/vfio/vfio"}], [{"path": "/dev/vfio/vfio"}]),
    ],
    ids=repr,
)
def test_devices_key(tmp_path: Path, devices: Any, expected: Any) -> None:
    spec = with_(linux={} if devices == "<absent>" else {"devices": devices})
    linux = guest_spec(load_bundle(make_bundle(tmp_path, spec)), CID)["linux"]
    assert linux.get("devices", "<absent>") == expected


def test_a_minimal_spec_gets_a_linux_section(tmp_path: Path) -> None:
    out = guest_spec(load_bundle(make_bundle(tmp_path, base_spec())), CID)
    assert out["linux"] == {"cgroupsPath": f"/cocoon/{CID}", "namespaces": []}
    assert out["mounts"] == [] and "hooks" not in out
    assert out["root"] == {"path": f"{BASE}/rootfs"}


def test_a_pod_members_namespaces_and_shm_are_its_sandboxs(host_bundle: Bundle) -> None:
    mapped: list[dict[str, Any]] = [
        {"type": "pid"},
        {"type": "ipc", "path": "cocoon:container/p1/ns/ipc"},
        {"type": "uts", "path": "cocoon:container/p1/ns/uts"},
        {"type": "mount"},
        {"type": "network", "path": "cocoon:container/p1/ns/net"},
    ]
    out = guest_spec(host_bundle, CID, namespaces=mapped, shm_source="/run/cocoon/shm/p1")
    assert out["linux"]["namespaces"] == mapped
    (shm,) = [m for m in out["mounts"] if m["destination"] == "/dev/shm"]
    assert shm["type"] == "bind" and shm["source"] == "/run/cocoon/shm/p1"
    # The sandbox's network is the guest's own: the member joins it by having none.
    joined = guest_spec(host_bundle, CID, guest_network=True, namespaces=mapped)
    assert [ns["type"] for ns in joined["linux"]["namespaces"]] == ["pid", "ipc", "uts", "mount"]


def test_guest_seccomp_profile_only_where_the_spec_has_none() -> None:
    from cocoon.runtime.container import seccomp

    spec: dict[str, Any] = {"linux": {}}
    seccomp.with_default_profile(spec)
    prof = spec["linux"]["seccomp"]
    assert prof["defaultAction"] == "SCMP_ACT_ALLOW"
    assert "keyctl" in prof["syscalls"][0]["names"] and "open_by_handle_at" in seccomp.DENIED
    prof["syscalls"].clear()  # a copy: the module's own stays whole
    assert seccomp.PROFILE["syscalls"][0]["names"]
    theirs = {"linux": {"seccomp": {"defaultAction": "SCMP_ACT_ERRNO"}}}
    assert seccomp.with_default_profile(theirs)["linux"]["seccomp"] == {
        "defaultAction": "SCMP_ACT_ERRNO"
    }
    assert "seccomp" in seccomp.with_default_profile({})["linux"]
