"""Tests for cocoon.runtime.sandbox.qemu_argv: golden argv per case, plus semantic checks.

Golden files live in tests/unit/golden/qemu_argv_<case>.txt, one argv element per line.
Run with UPDATE_GOLDEN=1 to rewrite them after an intended change (then review the diff).
"""

from __future__ import annotations

import contextlib
import difflib
import os
import re
import sys
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pytest

from cocoon.agent import channel as agent_channel
from cocoon.runtime.config import AgentConfig, Config, HypervisorConfig
from cocoon.runtime.monitor.launch import LaunchSpec, VmLimits
from cocoon.runtime.sandbox import qemu_argv as qa

GOLDEN_DIR = Path(__file__).parent / "golden"
UPDATE = os.environ.get("UPDATE_GOLDEN") == "1"
MIB = 1024 * 1024

# Nothing here exists: build_argv/plan must never look at the filesystem.
NOWHERE = Path("/nonexistent/cocoon-test")


@dataclass(frozen=True)
class Case:
    cfg: Config
    accel: str
    channel: str
    seccomp: bool
    host_cpus: int
    host_memory_mib: int
    rootfs_size: int
    vsock_cid: int = 0
    template: str = ""  # "save" or "restore" (sandbox.template)


def hv(**kw: Any) -> Config:
    return replace(Config(), hypervisor=replace(HypervisorConfig(), **kw))


CASES: dict[str, Case] = {
    "defaults_tcg_serial_virtiofs_seccomp": Case(
        cfg=Config(),
        accel="tcg",
        channel="virtio-serial",
        seccomp=True,
        host_cpus=8,
        host_memory_mib=16384,
        rootfs_size=300 * MIB + 12345,  # rounds up to 302 MiB
    ),
    "kvm_vsock42_9p_noseccomp": Case(
        cfg=hv(
            shared_fs="virtio-9p",
            default_vcpus=2,
            default_maxvcpus=4,
            default_memory_mib=512,
            max_memory_mib=4096,
            msize_9p=262144,
        ),
        accel="kvm",
        channel="vsock",
        seccomp=False,
        host_cpus=16,
        host_memory_mib=65536,
        rootfs_size=64 * MIB,  # already aligned
        vsock_cid=42,
    ),
    "nofs_tb0_debug_params_10ports_hostsized": Case(
        cfg=replace(
            hv(
                shared_fs="none",
                tcg_tb_size_mib=0,
                kernel_params=("systemd.log_level=debug", "loglevel=7"),
                hotplug_root_ports=10,
                default_maxvcpus=0,  # -> host CPUs
                max_memory_mib=0,  # -> host RAM
            ),
            agent=replace(AgentConfig(), debug=True),
        ),
        accel="tcg",
        channel="virtio-serial",
        seccomp=True,
        host_cpus=6,
        host_memory_mib=8192,
        rootfs_size=1,  # rounds up to 2 MiB
    ),
    "root_tcg_serial_virtiofs_seccomp": Case(
        cfg=hv(rootless=False),
        accel="tcg",
        channel="virtio-serial",
        seccomp=True,
        host_cpus=2,
        host_memory_mib=4096,
        rootfs_size=64 * MIB,
    ),
    "template_save_tcg_serial_virtiofs_seccomp": Case(
        cfg=Config(),
        accel="tcg",
        channel="virtio-serial",
        seccomp=True,
        host_cpus=2,
        host_memory_mib=4096,
        rootfs_size=64 * MIB,
        template="save",
    ),
    "template_restore_tcg_serial_virtiofs_seccomp": Case(
        cfg=Config(),
        accel="tcg",
        channel="virtio-serial",
        seccomp=True,
        host_cpus=2,
        host_memory_mib=4096,
        rootfs_size=64 * MIB,
        template="restore",
    ),
}


def make_plan(case: Case, sandbox_id: str = "abc123") -> qa.VmPlan:
    return qa.plan(
        case.cfg,
        sandbox_id=sandbox_id,
        state_dir=NOWHERE / "state" / sandbox_id,
        kernel=NOWHERE / "img" / "vmlinuz",
        initrd=NOWHERE / "img" / "initrd.img",
        rootfs_image=NOWHERE / "img" / "rootfs.img",
        rootfs_size=case.rootfs_size,
        accel=case.accel,
        channel=case.channel,
        seccomp=case.seccomp,
        host_cpus=case.host_cpus,
        host_memory_mib=case.host_memory_mib,
        vsock_cid=case.vsock_cid,
        template=case.template,
        memory_path=str(NOWHERE / "mem" / sandbox_id) if case.template else "",
    )


def argv_of(case: Case) -> list[str]:
    return qa.build_argv(make_plan(case))


def value_of(argv: list[str], flag: str) -> str:
    """The value following the only occurrence of ``flag``."""
    idx = [i for i, a in enumerate(argv) if a == flag]
    assert len(idx) == 1, f"{flag} occurs {len(idx)} times in {argv}"
    return argv[idx[0] + 1]


def values_of(argv: list[str], flag: str) -> list[str]:
    return [argv[i + 1] for i, a in enumerate(argv) if a == flag]


# ---------------------------------------------------------------------------------------------
# Golden output


@pytest.mark.parametrize("name", sorted(CASES))
def test_golden(name: str) -> None:
    argv = argv_of(CASES[name])
    for el in argv:
        assert "\n" not in el, f"argv element with a newline cannot be stored: {el!r}"
    text = "".join(el + "\n" for el in argv)
    golden = GOLDEN_DIR / f"qemu_argv_{name}.txt"
    if UPDATE:
        GOLDEN_DIR.mkdir(parents=True, exist_ok=True)
        golden.write_text(text)
    assert golden.exists(), f"{golden} missing; run with UPDATE_GOLDEN=1 to create it"
    expected = golden.read_text()
    if expected != text:
        diff = "".join(
            difflib.unified_diff(
                expected.splitlines(keepends=True),
                text.splitlines(keepends=True),
                fromfile=str(golden),
                tofile="build_argv()",
            )
        )
        pytest.fail(f"argv differs from golden (UPDATE_GOLDEN=1 to accept):\n{diff}")


def test_golden_files_have_no_strays() -> None:
    """Every golden file belongs to a case (a renamed case must not leave a stale file)."""
    names = {p.name for p in GOLDEN_DIR.glob("qemu_argv_*.txt")}
    assert names == {f"qemu_argv_{n}.txt" for n in CASES}


# ---------------------------------------------------------------------------------------------
# Semantics


@pytest.mark.parametrize(
    ("name", "expected_max"),
    [
        ("defaults_tcg_serial_virtiofs_seccomp", 8),  # maxvcpus 0 -> host CPUs
        ("kvm_vsock42_9p_noseccomp", 4),
        ("nofs_tb0_debug_params_10ports_hostsized", 6),
    ],
)
def test_smp(name: str, expected_max: int) -> None:
    case = CASES[name]
    argv = argv_of(case)
    n = expected_max
    vcpus = case.cfg.hypervisor.default_vcpus
    assert value_of(argv, "-smp") == f"{vcpus},maxcpus={n},sockets={n},cores=1,threads=1"


def test_smp_max_never_below_boot_vcpus() -> None:
    case = replace(CASES["defaults_tcg_serial_virtiofs_seccomp"], cfg=hv(default_vcpus=4))
    argv = argv_of(replace(case, host_cpus=2))
    assert value_of(argv, "-smp") == "4,maxcpus=4,sockets=4,cores=1,threads=1"


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        # max memory 0 -> host RAM 16384; rootfs 300 MiB + 12345 B -> 302 MiB
        ("defaults_tcg_serial_virtiofs_seccomp", "256M,slots=8,maxmem=16686M"),
        ("kvm_vsock42_9p_noseccomp", "512M,slots=8,maxmem=4160M"),
        # max memory 0 -> host RAM 8192; 1 byte of rootfs -> 2 MiB
        ("nofs_tb0_debug_params_10ports_hostsized", "256M,slots=8,maxmem=8194M"),
    ],
)
def test_memory(name: str, expected: str) -> None:
    case = CASES[name]
    argv = argv_of(case)
    assert value_of(argv, "-m") == expected
    # The same, computed from the rule rather than spelled out.
    h = case.cfg.hypervisor
    ceiling = h.max_memory_mib or case.host_memory_mib
    rootfs_mib = -(-case.rootfs_size // (2 * MIB)) * 2
    assert value_of(argv, "-m") == (
        f"{h.default_memory_mib}M,slots={h.memory_slots},maxmem={ceiling + rootfs_mib}M"
    )


def test_rootfs_size_aligned_in_plan_and_backend() -> None:
    p = make_plan(CASES["defaults_tcg_serial_virtiofs_seccomp"])
    assert p.rootfs_size == 302 * MIB
    assert p.rootfs_size % qa.PMEM_ALIGN == 0
    backends = [o for o in values_of(qa.build_argv(p), "-object") if "id=rootfs" in o]
    assert backends == [
        f"memory-backend-file,id=rootfs,mem-path={NOWHERE}/img/rootfs.img,"
        f"size={302 * MIB},share=on,readonly=on"
    ]


def test_max_memory_never_below_boot_memory() -> None:
    case = replace(CASES["defaults_tcg_serial_virtiofs_seccomp"], cfg=hv(default_memory_mib=2048))
    p = make_plan(replace(case, host_memory_mib=1024, rootfs_size=2 * MIB))
    assert p.limits.max_memory_mib == 2048
    assert value_of(qa.build_argv(p), "-m") == "2048M,slots=8,maxmem=2050M"


def test_plan_limits_are_the_launch_contract(tmp_path: Path) -> None:
    """One typed value: what argv is built from is what the monitor reads back, typed."""
    case = replace(
        CASES["kvm_vsock42_9p_noseccomp"],
        cfg=hv(
            shared_fs="virtio-9p",
            default_vcpus=2,
            default_maxvcpus=4,
            max_memory_mib=4096,
            memory_slots=3,
            hotplug_root_ports=5,
            memory_hotplug="pc-dimm",
            cpu_hotunplug=True,
        ),
    )
    p = make_plan(case)
    assert p.limits == VmLimits(
        vcpus=2,
        max_vcpus=4,
        memory_mib=256,
        max_memory_mib=4096,
        memory_slots=3,
        root_ports=5,
        memory_hotplug="pc-dimm",
        cpu_hotunplug=True,
        shared_memory=False,  # virtio-9p: guest RAM need not be shared
    )
    assert make_plan(CASES["defaults_tcg_serial_virtiofs_seccomp"]).limits.shared_memory
    spec = LaunchSpec(
        sandbox_id="abc123",
        state_dir=str(tmp_path),
        argv=qa.build_argv(p),
        accel=p.accel,
        channel=p.channel,
        vsock_cid=p.vsock_cid,
        shared_fs=p.shared_fs,
        virtiofsd="/usr/libexec/virtiofsd",
        ready_timeout_s=30.0,
        request_timeout_s=10.0,
        shutdown_timeout_s=5.0,
        limits=p.limits,
    )
    spec.write(tmp_path / "launch.json")
    back = LaunchSpec.read(tmp_path / "launch.json")
    assert isinstance(back.limits, VmLimits) and back == spec


@pytest.mark.parametrize(("accel", "model"), [("kvm", "host"), ("tcg", "max")])
def test_cpu_model_follows_accel(accel: str, model: str) -> None:
    case = replace(CASES["defaults_tcg_serial_virtiofs_seccomp"], accel=accel)
    argv = argv_of(case)
    assert value_of(argv, "-cpu") == model
    expected_accel = "tcg,tb-size=64" if accel == "tcg" else "kvm"
    assert value_of(argv, "-accel") == expected_accel


def test_explicit_cpu_model_wins() -> None:
    case = replace(CASES["kvm_vsock42_9p_noseccomp"], cfg=hv(cpu_model="Skylake-Server"))
    assert value_of(argv_of(case), "-cpu") == "Skylake-Server"


def test_tb_size_zero_gives_plain_tcg() -> None:
    argv = argv_of(CASES["nofs_tb0_debug_params_10ports_hostsized"])
    assert value_of(argv, "-accel") == "tcg"


def _root_ports(argv: list[str]) -> list[dict[str, str]]:
    out = []
    for dev in values_of(argv, "-device"):
        if dev.startswith("pcie-root-port,"):
            props = dict(kv.partition("=")[::2] for kv in dev.split(",")[1:])
            out.append(props)
    return out


@pytest.mark.parametrize("ports", [0, 1, 4, 8, 9, 10, 16, 30])
def test_root_ports_unique_addresses_on_pcie0(ports: int) -> None:
    case = replace(
        CASES["nofs_tb0_debug_params_10ports_hostsized"], cfg=hv(hotplug_root_ports=ports)
    )
    rps = _root_ports(argv_of(case))
    assert len(rps) == ports
    assert all(rp["bus"] == "pcie.0" for rp in rps)
    assert len({rp["id"] for rp in rps}) == ports
    assert len({rp["chassis"] for rp in rps}) == ports
    assert len({rp["addr"] for rp in rps}) == ports
    by_slot: dict[int, list[tuple[int, bool]]] = {}
    for rp in rps:
        m = re.fullmatch(r"0x([0-9a-f]+)\.([0-7])", rp["addr"])
        assert m, rp["addr"]
        slot, fn = int(m.group(1), 16), int(m.group(2))
        assert 0x10 <= slot < 0x20, "root ports must stay clear of q35's fixed devices"
        by_slot.setdefault(slot, []).append((fn, rp.get("multifunction") == "on"))
    for slot, fns in by_slot.items():
        # Functions of a slot are 0..k, and exactly function 0 declares multifunction.
        assert sorted(f for f, _ in fns) == list(range(len(fns))), (slot, fns)
        assert [f for f, multi in fns if multi] == [0], (slot, fns)


def test_ten_root_ports_exact_layout() -> None:
    rps = _root_ports(argv_of(CASES["nofs_tb0_debug_params_10ports_hostsized"]))
    assert [rp["addr"] for rp in rps] == [f"0x10.{f}" for f in range(8)] + ["0x11.0", "0x11.1"]
    assert [rp["id"] for rp in rps] == [f"rp{i}" for i in range(10)]
    assert [rp["chassis"] for rp in rps] == [str(i + 1) for i in range(10)]


@pytest.mark.parametrize("name", sorted(CASES))
def test_state_dir_files(name: str) -> None:
    state = NOWHERE / "state" / "abc123"
    argv = argv_of(CASES[name])
    chardevs = values_of(argv, "-chardev")
    assert f"file,id=console,path={state}/console.log" in chardevs
    assert value_of(argv, "-serial") == "chardev:console"
    assert f"socket,id=qmp,path={state}/qmp.sock,server=on,wait=off" in chardevs
    assert value_of(argv, "-mon") == "chardev=qmp,mode=control"


@pytest.mark.parametrize("name", sorted(CASES))
def test_sandbox_iff_seccomp(name: str) -> None:
    case = CASES[name]
    for seccomp in (True, False):
        argv = argv_of(replace(case, seccomp=seccomp))
        if seccomp:
            want = qa.SECCOMP_RUNAS if case.cfg.hypervisor.rootless else qa.SECCOMP
            assert value_of(argv, "-sandbox") == want
            assert want.startswith("on,")
        else:
            assert "-sandbox" not in argv


def test_agent_channel_contract_with_guest() -> None:
    """The port name / vsock port QEMU is given are the ones the guest agent looks for."""
    assert qa.AGENT_PORT_NAME == agent_channel.PORT_NAME
    assert qa.VSOCK_AGENT_PORT == agent_channel.VSOCK_PORT
    serial = argv_of(CASES["defaults_tcg_serial_virtiofs_seccomp"])
    state = NOWHERE / "state" / "abc123"
    assert f"socket,id=agent,path={state}/agent-port.sock,server=on,wait=off" in values_of(
        serial, "-chardev"
    )
    assert f"virtserialport,chardev=agent,name={agent_channel.PORT_NAME}" in values_of(
        serial, "-device"
    )
    assert not any("vsock" in d for d in values_of(serial, "-device"))
    vsock = argv_of(CASES["kvm_vsock42_9p_noseccomp"])
    assert "vhost-vsock-pci,id=vsock0,guest-cid=42" in values_of(vsock, "-device")
    assert not any("virtserialport" in d for d in values_of(vsock, "-device"))


def test_shared_fs_variants() -> None:
    fs = argv_of(CASES["defaults_tcg_serial_virtiofs_seccomp"])
    assert value_of(fs, "-machine") == "q35,memory-backend=ram0"
    assert "memory-backend-memfd,id=ram0,size=256M,share=on" in values_of(fs, "-object")
    assert "vhost-user-fs-pci,id=fs0,chardev=vfs,tag=cocoon,queue-size=1024" in values_of(
        fs, "-device"
    )
    assert "-fsdev" not in fs

    p9 = argv_of(CASES["kvm_vsock42_9p_noseccomp"])
    assert value_of(p9, "-machine") == "q35"
    assert not any("memory-backend-memfd" in o for o in values_of(p9, "-object"))
    assert value_of(p9, "-fsdev") == (
        f"local,id=fs0,path={NOWHERE}/state/abc123/shared,security_model=none"
    )

    none = argv_of(CASES["nofs_tb0_debug_params_10ports_hostsized"])
    assert value_of(none, "-machine") == "q35"
    assert "-fsdev" not in none
    assert not any("vhost-user-fs" in d or "9p" in d for d in values_of(none, "-device"))


def test_kernel_params() -> None:
    base = " ".join(qa.BASE_KERNEL_PARAMS)
    order = f"page_reporting.page_reporting_order={qa.REPORTING_ORDER}"
    defaults = CASES["defaults_tcg_serial_virtiofs_seccomp"]
    assert value_of(argv_of(defaults), "-append") == f"{base} {order}"
    debug = value_of(argv_of(CASES["nofs_tb0_debug_params_10ports_hostsized"]), "-append")
    # The configured parameters come last: one of them may override the reporting order.
    assert debug == f"{base} cocoon.debug=1 {order} systemd.log_level=debug loglevel=7"
    # Without free page reporting there is no balloon, and no order to ask for.
    plain = replace(defaults, cfg=hv(free_page_reporting=False))
    argv = argv_of(plain)
    assert value_of(argv, "-append") == base
    assert not any("virtio-balloon" in a for a in argv)


# ---------------------------------------------------------------------------------------------
# Purity


_AUDIT_SINKS: list[list[str]] = []
_FS_EVENT = re.compile(r"^(open|os\.|shutil\.|glob\.|pathlib\.|tempfile\.)")


def _audit(event: str, args: tuple[Any, ...]) -> None:
    if _AUDIT_SINKS and _FS_EVENT.match(event):
        for sink in _AUDIT_SINKS:
            sink.append(f"{event}{args!r}")


@contextlib.contextmanager
def fs_events() -> Iterator[list[str]]:
    """Audit events touching the filesystem (or the OS) while the block runs."""
    events: list[str] = []
    _AUDIT_SINKS.append(events)
    try:
        yield events
    finally:
        _AUDIT_SINKS.remove(events)


sys.addaudithook(_audit)


@pytest.mark.parametrize("name", sorted(CASES))
def test_build_argv_is_pure(name: str) -> None:
    case = CASES[name]
    with fs_events() as events:
        p1 = make_plan(case)
        p2 = make_plan(case)
        a1 = qa.build_argv(p1)
        a2 = qa.build_argv(p1)
        a3 = qa.build_argv(p2)
    assert events == [], f"plan/build_argv touched the filesystem: {events}"
    assert p1 == p2
    assert a1 == a2 == a3
    assert a1 is not a2
    assert all(isinstance(x, str) for x in a1)
    assert not NOWHERE.exists()
    # Mutating a returned argv must not leak into the next call.
    a1.append("--junk")
    assert qa.build_argv(p1) == a2


def test_audit_hook_sees_filesystem_access(tmp_path: Path) -> None:
    """The purity check's detector works (guards against a silently inert audit hook)."""
    with fs_events() as events:
        (tmp_path / "x").write_text("x")
        (tmp_path / "x").exists()
    assert any(e.startswith("open") for e in events), events


def test_memory_hotplug_device_follows_configuration() -> None:
    base = CASES["defaults_tcg_serial_virtiofs_seccomp"]
    vmem = argv_of(base)
    devs = values_of(vmem, "-device")
    objs = values_of(vmem, "-object")
    assert "virtio-mem-pci,id=vm0,memdev=vmem0,requested-size=0,block-size=2M" in devs
    # sized so that boot RAM + virtio-mem + the pmem image fill maxmem exactly
    size = int(
        next(o for o in objs if o.startswith("memory-backend-memfd,id=vmem0"))
        .split("size=")[1]
        .split("M")[0]
    )
    m = value_of(vmem, "-m")
    maxmem = int(m.split("maxmem=")[1].rstrip("M"))
    assert 256 + size + 302 == maxmem
    dimm = argv_of(replace(base, cfg=hv(memory_hotplug="pc-dimm")))
    assert not any("virtio-mem" in d for d in values_of(dimm, "-device"))
    assert not any("vmem0" in o for o in values_of(dimm, "-object"))


def test_rootless_starts_paused_and_lets_qemu_drop_root_under_seccomp() -> None:
    """Non-root QEMU (the default): paused until the monitor saw it drop root; the seccomp
    filter (set before -runas takes effect) lets it call setuid; -runas itself is the
    monitor's, which picks the uid. A root QEMU gets neither."""
    argv = argv_of(CASES["defaults_tcg_serial_virtiofs_seccomp"])
    assert "-S" in argv and "-runas" not in argv
    sandbox = value_of(argv, "-sandbox")
    assert "elevateprivileges=allow" in sandbox and "spawn=deny" in sandbox
    root = argv_of(CASES["root_tcg_serial_virtiofs_seccomp"])
    assert "-S" not in root and "elevateprivileges=deny" in value_of(root, "-sandbox")


# ---------------------------------------------------------------------- templates
@pytest.mark.parametrize("mode", ["save", "restore"])
def test_template_argv_migrates_only_what_qemu_can(mode: str) -> None:
    """A template VM and its clones share one machine shape: RAM in a file (not a memfd),
    the root image on an NVDIMM (QEMU 7.2 does not migrate virtio-pmem), no vhost-user-fs
    (a migration blocker) but a root port of its own to hot-plug it into after a restore."""
    cold = argv_of(replace(CASES["template_save_tcg_serial_virtiofs_seccomp"], template=""))
    argv = argv_of(CASES[f"template_{mode}_tcg_serial_virtiofs_seccomp"])
    text = " ".join(argv)
    assert "memory-backend-file,id=ram0,size=256M,mem-path=" in text
    assert (
        "memory-backend-memfd,id=ram0" not in text
        and "memory-backend-memfd,id=ram0" in " ".join(cold)
    )
    assert "nvdimm,id=rootfs0,memdev=rootfs,unarmed=on" in argv
    assert "virtio-pmem-pci,id=rootfs0,memdev=rootfs" not in argv
    assert value_of(argv, "-machine").endswith(",nvdimm=on")
    assert not any(a.startswith("vhost-user-fs-pci") for a in argv)
    assert any(a.startswith("vhost-user-fs-pci") for a in cold)
    assert "pcie-root-port,id=rpfs,bus=pcie.0,chassis=5,addr=0xf.0" in argv
    if mode == "restore":
        assert value_of(argv, "-incoming") == "defer" and "-S" in argv
    else:
        assert "-incoming" not in argv
    # the template and its clones differ only in where their RAM file is and -incoming
    save = argv_of(CASES["template_save_tcg_serial_virtiofs_seccomp"])
    restore = argv_of(CASES["template_restore_tcg_serial_virtiofs_seccomp"])
    assert [a for a in restore if a not in ("-incoming", "defer")] == save


@pytest.mark.parametrize("template, memory", [("restore", ""), ("", "/x"), ("clone", "/x")])
def test_template_mode_needs_its_memory_file(template: str, memory: str) -> None:
    p = replace(
        make_plan(CASES["defaults_tcg_serial_virtiofs_seccomp"]),
        template=template,
        memory_path=memory,
    )
    with pytest.raises(ValueError, match="template mode"):
        qa.build_argv(p)
