"""The optional guest seccomp profile ([runtime] guest_seccomp, runtime/container/seccomp.py)
with real guests: off (the default) a container without a profile runs unfiltered, as under
runc; on, it runs under the deny list; a spec's own profile always wins."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cocoon.runtime.container import busybox
from tests.integration.cli import Cli

pytestmark = [pytest.mark.qemu, pytest.mark.root]

SCRIPT = "grep Seccomp: /proc/self/status; mkdir /tmp/made && echo mkdir-ok"


def run(cli: Cli, tmp: Path, cid: str, own_profile: bool = False) -> str:
    b = busybox.make_bundle(tmp / cid, ["sh", "-c", SCRIPT])
    if own_profile:  # the caller's profile: mkdir denied, everything else allowed
        spec = json.loads((b / "config.json").read_text())
        spec["linux"]["seccomp"] = {
            "defaultAction": "SCMP_ACT_ALLOW",
            "architectures": ["SCMP_ARCH_X86_64"],
            "syscalls": [
                {"names": ["mkdir", "mkdirat"], "action": "SCMP_ACT_ERRNO", "errnoRet": 1}
            ],
        }
        (b / "config.json").write_text(json.dumps(spec))
    r = cli("run", "--bundle", str(b), cid)
    return r.stdout + r.stderr


def test_guest_seccomp_off_on_and_the_specs_own(
    cli: Cli, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    off = run(cli, tmp_path, "off")
    assert "Seccomp:\t0" in off and "mkdir-ok" in off, off
    conf = tmp_path / "c.toml"
    conf.write_text("[runtime]\nguest_seccomp = true\n")
    monkeypatch.setenv("COCOON_CONFIG", str(conf))
    on = run(cli, tmp_path, "on")
    assert "Seccomp:\t2" in on and "mkdir-ok" in on, on  # filtered, and mkdir still allowed
    own = run(cli, tmp_path, "own", own_profile=True)
    assert "Seccomp:\t2" in own and "mkdir-ok" not in own, own  # theirs, not ours
