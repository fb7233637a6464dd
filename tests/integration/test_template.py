"""VM templates with real guests ([factory] template, cocoon.runtime.sandbox.template and
cocoon.runtime.monitor.snapshot): a template VM is booted and saved once, containers' sandboxes
are restored from it instead of booting; each clone's RNG is reseeded and its clock set before
the workload runs, the virtio-fs share is hot-plugged after the restore, the template is rebuilt
when its inputs change or its files are damaged, and a restore that fails boots cold with a
warning. The state root's leak check covers template builds and the clones' RAM copies."""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from cocoon.runtime.container import busybox
from cocoon.runtime.monitor import launch as L
from tests.integration.cli import Cli
from tests.integration.test_network import HTTP_PORT, Lab, fetch_from, lab, server_bundle

__all__ = ["lab"]  # a fixture: the network test's container namespace with two peers

pytestmark = [pytest.mark.qemu, pytest.mark.root]


class Templates:
    """The CLI with a configuration whose [factory] template is on (COCOON_CONFIG)."""

    def __init__(self, cli: Cli, monkeypatch: pytest.MonkeyPatch, tmp: Path) -> None:
        self.cli, self.tmp, self.mp = cli, tmp, monkeypatch
        self.configure()

    def configure(self, extra: str = "", factory: str = "") -> None:
        text = f"{extra}\n[factory]\ntemplate = true\n{factory}\n"
        conf = self.tmp / f"template-{hashlib.sha256(text.encode()).hexdigest()[:8]}.toml"
        conf.write_text(text)
        self.mp.setenv("COCOON_CONFIG", str(conf))
        self.mp.setenv("COCOON_CONFIG_DIR", str(self.tmp / "no-drop-ins"))

    def status(self) -> dict[str, Any]:
        return dict(json.loads(self.cli.ok("template", "status")))

    def dir(self) -> Path:
        return Path(self.status()["dir"])

    def create_restored(self, cid: str, bundle: Path) -> None:
        """``create`` succeeds and its sandbox was restored from the template, not booted."""
        r = self.cli.create(cid, bundle)
        assert r.returncode == 0, r.stderr
        assert "restored from template" in self.monitor_log(cid)

    def monitor_log(self, cid: str) -> str:
        return (self.cli.root / "sandboxes" / cid / L.MONITOR_LOG).read_text()

    def log_messages(self) -> list[str]:
        lines = self.cli.log.read_text().splitlines() if self.cli.log.exists() else []
        return [str(json.loads(x).get("msg", "")) for x in lines if x.strip()]


@pytest.fixture
def tpl(cli: Cli, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[Templates]:
    t = Templates(cli, monkeypatch, tmp_path)
    yield t
    for cid in cli.ok("list", "-q").split():
        cli("delete", "--force", cid)
    cli.ok("template", "drop")
    assert not (cli.root / "template").exists() or [
        p.name for p in (cli.root / "template").iterdir()
    ] == ["build.lock"]


def sleeper(tmp: Path, cid: str, **linux: Any) -> Path:
    b = busybox.make_bundle(tmp / cid, ["sleep", "100000"])
    spec = json.loads((b / "config.json").read_text())
    spec["linux"].update(linux)
    (b / "config.json").write_text(json.dumps(spec))
    (b / "rootfs" / "marker").write_text(f"bundle of {cid}\n")
    return b


def first_reads(cli: Cli, cid: str) -> tuple[str, str, float]:
    """What the workload reads first: 32 bytes of /dev/urandom, a kernel UUID, the time."""
    out = cli.ok(
        "exec",
        cid,
        "sh",
        "-c",
        "head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \\n'; echo; "
        "cat /proc/sys/kernel/random/uuid; date +%s",
    ).split("\n")
    return out[0], out[1], float(out[2])


def test_two_clones_of_one_template_are_restored_apart_and_work(
    tpl: Templates, cli: Cli, tmp_path: Path
) -> None:
    built = json.loads(cli.ok("template", "build"))
    st = tpl.status()
    assert st["ready"] and built["built"] == st["dir"], st
    meta = st["meta"]
    assert meta["state_size"] < 16 * 1024 * 1024  # devices only: RAM stays in its file
    assert meta["memory_size"] == 256 * 1024 * 1024
    (line,) = [x for x in cli.ok("check").splitlines() if x.split()[1:2] == ["template"]]
    assert f"{st['key']} ready (256 MiB RAM)" in line, line
    time.sleep(8)  # the template's clock falls behind: a clone must not inherit it

    reads: dict[str, tuple[str, str, float]] = {}
    stamps: dict[str, float] = {}
    for cid in ("c1", "c2"):
        mem = {"memory": {"limit": 512 * 1024 * 1024}}
        tpl.create_restored(cid, sleeper(tmp_path, cid, resources=mem))
        console = (cli.root / "sandboxes" / cid / "console.log").read_text(errors="replace")
        assert "RNG reseeded with 64 bytes from the host" in console
        cli.ok("start", cid)
        reads[cid] = first_reads(cli, cid)
        stamps[cid] = time.time()
    (rand1, uuid1, t1), (rand2, uuid2, t2) = reads["c1"], reads["c2"]
    assert len(rand1) == len(rand2) == 64
    assert rand1 != rand2, "two clones read the same bytes from /dev/urandom"
    assert uuid1 != uuid2, "two clones made the same kernel UUID"
    # the clock was set at restore: the template's is 8 s and more behind by now
    for cid, t in (("c1", t1), ("c2", t2)):
        assert abs(stamps[cid] - t) < 4, (cid, stamps[cid], t)
    for cid in ("c1", "c2"):
        # the share hot-plugged after the restore carries the container's own rootfs
        assert cli.ok("exec", cid, "cat", "/marker") == f"bundle of {cid}\n"
        _cpus, mem_mib = cli.sees(cid)
        assert mem_mib > 256 + 128  # memory hot-plugged into a restored VM
    cli.ok("delete", "--force", "c1")
    cli.ok("delete", "--force", "c2")


def test_template_is_rebuilt_when_its_inputs_change_and_when_damaged(
    tpl: Templates, cli: Cli, tmp_path: Path
) -> None:
    cli.ok("template", "build")
    first = tpl.status()
    tpl.configure("[hypervisor]\ndefault_memory_mib = 320\n")
    second = tpl.status()
    assert second["key"] != first["key"] and not second["ready"]
    assert Path(first["dir"]).name in second["stale"]

    tpl.create_restored("c3", sleeper(tmp_path, "c3"))  # builds the new template first
    now = tpl.status()
    assert now["ready"] and now["meta"]["memory_size"] == 320 * 1024 * 1024
    assert now["stale"] == []  # the old key's template was removed by the build
    cli.ok("delete", "--force", "c3")

    # damaged (its memory file truncated): never restored, rebuilt on the next start
    mem = Path(now["dir"]) / L.TEMPLATE_MEMORY
    with open(mem, "r+b") as f:
        f.truncate(mem.stat().st_size // 2)
    assert "memory is" in tpl.status()["why_not"]
    (line,) = [x for x in cli.ok("check").splitlines() if x.split()[1:2] == ["template"]]
    assert "memory is" in line and "the next start builds it" in line, line
    tpl.create_restored("c4", sleeper(tmp_path, "c4"))
    assert any("unusable" in m and "rebuilding" in m for m in tpl.log_messages())
    assert tpl.status()["ready"]
    cli.ok("delete", "--force", "c4")


def test_a_restore_that_fails_boots_cold_with_a_warning(
    tpl: Templates, cli: Cli, tmp_path: Path
) -> None:
    cli.ok("template", "build")
    d = tpl.dir()
    # A state file damaged in a way its meta cannot tell (the meta rewritten to match): the
    # host's check passes, QEMU's load fails.
    state = d / L.TEMPLATE_STATE
    state.write_bytes(state.read_bytes()[: state.stat().st_size // 3])
    meta = json.loads((d / L.TEMPLATE_META).read_text())
    meta["state_size"] = state.stat().st_size
    meta["state_sha256"] = hashlib.sha256(state.read_bytes()).hexdigest()
    (d / L.TEMPLATE_META).write_text(json.dumps(meta))
    assert tpl.status()["ready"]

    r = cli.create("c5", sleeper(tmp_path, "c5"))
    assert r.returncode == 0, r.stderr
    assert "booting cold instead" in tpl.monitor_log("c5")
    warnings = [m for m in tpl.log_messages() if "it was booted cold" in m]
    assert warnings and "c5" in warnings[0], tpl.log_messages()
    cli.ok("start", "c5")
    assert cli.ok("exec", "c5", "cat", "/marker") == "bundle of c5\n"
    cli.ok("delete", "--force", "c5")


def test_pooled_vms_are_restored_from_the_template(
    tpl: Templates, cli: Cli, tmp_path: Path
) -> None:
    tpl.configure(factory="pool_size = 1")
    try:
        counts = json.loads(cli.ok("pool", "fill"))  # builds the template, restores a VM
        assert counts["booted"] == 1 and counts["ready"] == 1, counts
        assert tpl.status()["ready"]
        (vm,) = json.loads(cli.ok("pool", "status"))["vms"]
        vmdir = cli.root / "pool" / vm["vmid"]
        assert "restored from template" in (vmdir / L.MONITOR_LOG).read_text()
        r = cli.create("c6", sleeper(tmp_path, "c6"))
        assert r.returncode == 0, r.stderr
        assert (cli.root / "sandboxes" / "c6").resolve() == vmdir
        cli.ok("start", "c6")
        assert cli.ok("exec", "c6", "cat", "/marker") == "bundle of c6\n"
        cli.ok("delete", "--force", "c6")
    finally:
        tpl.configure(factory="pool_size = 0")
        cli.ok("pool", "drain")


def test_a_restored_vm_gets_the_containers_network(
    tpl: Templates, cli: Cli, lab: Lab, tmp_path: Path
) -> None:
    """NICs are hot-plugged into a restored VM as into a booted one (its PCI layout has the
    share's root port besides)."""
    cli.ok("template", "build")
    tpl.create_restored("n1", server_bundle(tmp_path, str(lab.netns)))
    cli.ok("start", "n1")
    for lk in lab.links:
        assert fetch_from(lk.peer_ns, lk.v4, HTTP_PORT) == b"hello from the guest\n"
    assert cli.ok("exec", "n1", "cat", f"/sys/class/net/{lab.links[1].name}/address").strip() == (
        lab.links[1].mac
    )
    cli.ok("delete", "--force", "n1")
