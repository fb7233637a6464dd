"""The pytest plugin's pure parts, without a VM: the bundle a test's options make (the OCI
spec cocoon is handed), the checks on options before anything is made, commands, the
runtime's error read from its JSON log, and ids that differ per process."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import pytest

from cocoon.runtime.container import busybox
from cocoon.testing import harness
from cocoon.testing.harness import CocoonTestError, Options, write_bundle


def spec_for(tmp_path: Path, image: Any = None, cmd: Any = None, **opts: Any) -> dict[str, Any]:
    return write_bundle(tmp_path / "b", image, harness._command(cmd), Options.make(**opts))


def test_the_default_image_sleeps_writable_and_without_a_terminal(tmp_path: Path) -> None:
    spec = spec_for(tmp_path)
    assert spec["process"]["args"] == harness.FOREVER
    assert spec["process"]["terminal"] is False
    assert spec["root"] == {"path": "rootfs", "readonly": False}
    assert (tmp_path / "b" / "rootfs" / "bin" / "busybox").is_file()
    assert "CAP_SYS_ADMIN" not in spec["process"]["capabilities"]["bounding"]
    assert "maskedPaths" in spec["linux"]


def test_a_string_command_runs_under_sh(tmp_path: Path) -> None:
    assert spec_for(tmp_path, cmd="echo hi")["process"]["args"] == ["sh", "-c", "echo hi"]


def test_limits_sysctls_env_and_hostname(tmp_path: Path) -> None:
    spec = spec_for(
        tmp_path,
        cmd=["true"],
        cpus=1.5,
        memory="256M",
        sysctls={"net.ipv4.ip_forward": 1},
        env={"A": "b", "PATH": "/x"},
        cwd="/tmp",
        hostname="h1",
        readonly=True,
    )
    res = spec["linux"]["resources"]
    assert res["cpu"] == {"quota": 150_000, "period": 100_000}
    assert res["memory"] == {"limit": 256 << 20}
    assert spec["linux"]["sysctl"] == {"net.ipv4.ip_forward": "1"}
    env = spec["process"]["env"]
    assert "A=b" in env and "PATH=/x" in env and sum(e.startswith("PATH=") for e in env) == 1
    assert spec["process"]["cwd"] == "/tmp" and spec["hostname"] == "h1"
    assert spec["root"]["readonly"] is True


def test_privileged_is_what_docker_gives(tmp_path: Path) -> None:
    spec = spec_for(tmp_path, privileged=True)
    caps = spec["process"]["capabilities"]
    assert set(caps) == {"bounding", "effective", "permitted", "ambient"}
    assert len(caps["bounding"]) == 41 and "CAP_SYS_ADMIN" in caps["bounding"]
    linux = spec["linux"]
    assert "seccomp" not in linux and "maskedPaths" not in linux and "readonlyPaths" not in linux
    assert linux["resources"]["devices"] == [{"allow": True, "access": "rwm"}]
    sysfs = [m for m in spec["mounts"] if m["type"] == "sysfs"]
    assert sysfs and all("ro" not in m["options"] and "rw" in m["options"] for m in sysfs)


def test_a_bundle_keeps_its_process_and_points_at_its_rootfs(tmp_path: Path) -> None:
    user = busybox.make_bundle(tmp_path / "user", ["echo", "from-bundle"])
    spec = spec_for(tmp_path, image=user, memory=64 << 20)
    assert spec["process"]["args"] == ["echo", "from-bundle"]
    assert spec["root"]["path"] == str((user / "rootfs").resolve())
    assert spec["linux"]["resources"]["memory"] == {"limit": 64 << 20}
    assert not (tmp_path / "b" / "rootfs").exists()  # used in place, not copied


def test_a_rootfs_directory_needs_a_command(tmp_path: Path) -> None:
    rootfs = busybox.make_rootfs(tmp_path / "rootfs")
    spec = spec_for(tmp_path, image=rootfs, cmd=["true"])
    assert spec["root"]["path"] == str(rootfs.resolve())
    with pytest.raises(CocoonTestError, match="give a cmd"):
        write_bundle(tmp_path / "c", rootfs, None, Options.make())


@pytest.mark.parametrize(
    ("image", "match"),
    [
        ("nowhere", "no such OCI bundle"),
        ("file", "no such OCI bundle"),
        ("badjson", "unreadable config.json"),
        ("norootfs", "root filesystem .* is missing"),
    ],
)
def test_bad_images(tmp_path: Path, image: str, match: str) -> None:
    (tmp_path / "file").write_text("x")
    (tmp_path / "badjson").mkdir()
    (tmp_path / "badjson" / "config.json").write_text("{")
    (tmp_path / "norootfs").mkdir()
    (tmp_path / "norootfs" / "config.json").write_text(json.dumps({"root": {"path": "gone"}}))
    with pytest.raises(CocoonTestError, match=match):
        write_bundle(tmp_path / "b", tmp_path / image, ["true"], Options.make())


@pytest.mark.parametrize(
    ("opts", "match"),
    [
        ({"cpus": 0}, "cpus=0"),
        ({"cpus": True}, "cpus=True"),
        ({"cpus": "2"}, "cpus='2'"),
        ({"memory": "lots"}, "invalid size"),
        ({"memory": 1024}, "below 4 MiB"),
        ({"memory": 2.5}, "bytes or a size"),
        ({"sysctls": ["a=b"]}, "sysctls="),
        ({"env": "A=b"}, "env="),
    ],
)
def test_options_are_checked_first(opts: dict[str, Any], match: str) -> None:
    with pytest.raises(CocoonTestError, match=match):
        Options.make(**opts)


@pytest.mark.parametrize("cmd", [[], [1, 2], ("",) * 0, 5])
def test_bad_commands(cmd: Any) -> None:
    with pytest.raises(CocoonTestError, match="cmd="):
        harness._command(cmd)


def test_the_runtime_error_is_the_last_error_line(tmp_path: Path) -> None:
    log = tmp_path / "log.json"
    log.write_text(
        "\n".join(
            [
                json.dumps({"level": "error", "msg": "first"}),
                "not json",
                json.dumps({"level": "info", "msg": "x"}),
                json.dumps({"level": "error", "msg": "container c: it broke"}),
            ]
        )
    )
    assert harness.runtime_error(log) == "container c: it broke"
    assert harness.runtime_error(tmp_path / "none") == ""


def test_ids_carry_the_process_and_a_counter(tmp_path: Path) -> None:
    rt = harness.Runtime(tmp_path / "root", tmp_path / "work", binary="/bin/false")
    a, b = rt.new_id("web"), rt.new_id("web")
    assert a != b and a.startswith(f"web-{rt.tag}-") and rt.tag == f"{os.getpid():x}"
    with pytest.raises(CocoonTestError, match=re.escape("name '../x'")):
        rt.new_id("../x")
    assert rt.argv()[:3] == ["/bin/false", "--root", str(tmp_path / "root")]
