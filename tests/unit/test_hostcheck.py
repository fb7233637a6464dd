"""Unit tests for cocoon.runtime.sandbox.hostcheck (a FakeHost; one real KVM probe marked qemu)."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path

import pytest

from cocoon.runtime.config import Config
from cocoon.runtime.errors import ConfigError, HostError
from cocoon.runtime.sandbox import hostcheck as hc
from cocoon.runtime.sandbox import probe as pr

QEMU = "/usr/bin/qemu-system-x86_64"
KERNEL = Path("/img/vmlinuz")
FLOOR = Path("/img/floor-initrd.img")
CACHE = Path("/cache/kvm-probe.json")
VERSION_OUT = "QEMU emulator version 7.2.22 (Debian 1:7.2+dfsg-7+deb12u18+b3)\nCopyright ...\n"
MSR_STDERR = (
    "qemu-system-x86_64: error: failed to set MSR 0x10a to 0x69\n"
    "qemu-system-x86_64: ../../target/i386/kvm/kvm.c:3183: kvm_buf_set_msrs: "
    "Assertion `ret == cpu->kvm_msr_buf->nmsrs' failed.\n"
)
BOOT_OK = pr.RunResult(0, "cocoon-floor: init reached at 0.41s\n", "")

Responder = pr.RunResult | Callable[[Sequence[str]], pr.RunResult]


class FakeHost:
    """Files as a dict (path -> text), scripted command results keyed by argv[1:] prefix."""

    def __init__(
        self,
        files: dict[str, str] | None = None,
        runs: dict[tuple[str, ...], Responder] | None = None,
        euid: int = 0,
        no_access: set[str] | None = None,
    ) -> None:
        self.files: dict[str, str] = dict(files or {})
        self.runs: dict[tuple[str, ...], Responder] = dict(runs or {})
        self.euid = euid
        self.no_access = no_access or set()
        self.calls: list[list[str]] = []
        self.writes: list[str] = []

    def exists(self, path: str) -> bool:
        return path in self.files

    def read_text(self, path: str) -> str:
        if path not in self.files:
            raise FileNotFoundError(path)
        return self.files[path]

    def write_text_atomic(self, path: str, text: str) -> None:
        self.writes.append(path)
        self.files[path] = text

    def mtime(self, path: str) -> float | None:
        return 1000.0 if path in self.files else None

    def access(self, path: str, mode: int) -> bool:
        return path in self.files and path not in self.no_access

    def run(self, argv: Sequence[str], timeout: float) -> pr.RunResult:
        self.calls.append(list(argv))
        if argv[0] not in self.files:
            return pr.RunResult(127, "", f"{argv[0]}: No such file or directory")
        args = tuple(argv[1:])
        best: tuple[str, ...] | None = None
        for prefix in self.runs:
            if args[: len(prefix)] == prefix and (best is None or len(prefix) > len(best)):
                best = prefix
        if best is None:
            return pr.RunResult(1, "", f"unscripted: {argv}")
        r = self.runs[best]
        return r(argv) if callable(r) else r

    def geteuid(self) -> int:
        return self.euid

    def boots(self) -> int:
        return sum(1 for c in self.calls if "-kernel" in c)


BOOT_ARGS = ("-machine", "q35", "-accel", "kvm")


def kvm_host(boot: Responder = BOOT_OK, **kw: object) -> FakeHost:
    files = {QEMU: "", "/dev/kvm": "", pr.BOOT_ID: "boot-1\n"}
    return FakeHost(files=files, runs={BOOT_ARGS: boot}, **kw)  # type: ignore[arg-type]


def probe(host: FakeHost, timeout: float = 15.0) -> pr.KvmProbe:
    return pr.probe_kvm(host, QEMU, KERNEL, FLOOR, CACHE, timeout)


# ---------------------------------------------------------------- version


def test_parse_version_good() -> None:
    assert pr.parse_qemu_version(VERSION_OUT) == (7, 2, 22)
    assert pr.parse_qemu_version("QEMU emulator version 8.1 (foo)") == (8, 1, 0)


def test_qemu_version_via_host() -> None:
    host = FakeHost({QEMU: ""}, {("--version",): pr.RunResult(0, VERSION_OUT, "")})
    assert pr.qemu_version(host, QEMU) == (7, 2, 22)
    assert host.calls == [[QEMU, "--version"]]


@pytest.mark.parametrize(
    "result",
    [
        pr.RunResult(0, "garbage\n", ""),
        pr.RunResult(0, "", ""),
        pr.RunResult(1, VERSION_OUT, "boom"),
        pr.RunResult(None, "", ""),
    ],
)
def test_qemu_version_garbage(result: pr.RunResult) -> None:
    host = FakeHost({QEMU: ""}, {("--version",): result})
    assert pr.qemu_version(host, QEMU) is None


def test_qemu_version_missing_binary() -> None:
    assert pr.qemu_version(FakeHost(), QEMU) is None


def test_seccomp_supported() -> None:
    yes = FakeHost({QEMU: ""}, {("-sandbox", "on"): pr.RunResult(0, VERSION_OUT, "")})
    no = FakeHost(
        {QEMU: ""},
        {("-sandbox", "on"): pr.RunResult(1, "", "-sandbox support is not enabled")},
    )
    assert pr.seccomp_sandbox_supported(yes, QEMU)
    assert not pr.seccomp_sandbox_supported(no, QEMU)
    assert yes.calls == [[QEMU, "-sandbox", "on", "-version"]]


def test_seccomp_answer_kept_per_qemu_binary() -> None:
    """Asked once per QEMU binary: the answer is read back from the cache until the binary's
    mtime changes; a corrupt cache, a timeout or a missing binary is asked again."""
    cache = Path("/cache/qemu-probe.json")
    host = FakeHost({QEMU: ""}, {("-sandbox", "on"): pr.RunResult(0, VERSION_OUT, "")})
    assert pr.seccomp_sandbox_supported(host, QEMU, cache)
    assert pr.seccomp_sandbox_supported(host, QEMU, cache)
    assert len(host.calls) == 1 and host.writes == [str(cache)]
    host.runs[("-sandbox", "on")] = pr.RunResult(1, "", "-sandbox support is not enabled")
    assert pr.seccomp_sandbox_supported(host, QEMU, cache)  # the same binary: not asked
    host.mtime = lambda path: 2000.0  # type: ignore[method-assign]  # replaced by an upgrade
    assert not pr.seccomp_sandbox_supported(host, QEMU, cache)
    assert not pr.seccomp_sandbox_supported(host, QEMU, cache)
    assert len(host.calls) == 2
    host.files[str(cache)] = "{not json"
    assert not pr.seccomp_sandbox_supported(host, QEMU, cache)
    assert len(host.calls) == 3 and json.loads(host.files[str(cache)])["seccomp_sandbox"] is False
    slow = FakeHost({QEMU: ""}, {("-sandbox", "on"): pr.RunResult(None, "", "")})
    assert not pr.seccomp_sandbox_supported(slow, QEMU, cache)
    assert slow.writes == []  # a timeout says nothing about the binary: not kept


# ---------------------------------------------------------------- probe_kvm


def test_probe_no_dev_kvm() -> None:
    host = kvm_host()
    del host.files["/dev/kvm"]
    p = probe(host)
    assert not p.usable
    assert "/dev/kvm" in p.reason
    assert host.calls == []


def test_probe_dev_kvm_not_rw() -> None:
    host = kvm_host(no_access={"/dev/kvm"})
    p = probe(host)
    assert not p.usable
    assert "readable and writable" in p.reason
    assert host.calls == []


def test_probe_boot_ok() -> None:
    host = kvm_host()
    assert probe(host) == pr.KvmProbe(True, "")
    (argv,) = host.calls
    assert argv == pr.kvm_boot_argv(QEMU, str(KERNEL), str(FLOOR))
    for frag in ("-accel", "kvm", "-cpu", "host", "-no-reboot", "-nodefaults"):
        assert frag in argv
    assert argv[argv.index("-append") + 1] == "console=ttyS0 panic=-1 quiet"


def test_probe_msr_assertion() -> None:
    host = kvm_host(pr.RunResult(-6, "", MSR_STDERR))
    p = probe(host)
    assert not p.usable
    assert "Assertion" in p.reason and "kvm_buf_set_msrs" in p.reason
    assert "\n" not in p.reason


def test_probe_exit_zero_without_marker() -> None:
    p = probe(kvm_host(pr.RunResult(0, "some kernel noise\n", "")))
    assert not p.usable
    assert "cocoon-floor:" in p.reason


def test_probe_timeout() -> None:
    p = probe(kvm_host(pr.RunResult(None, "partial", "")), timeout=3)
    assert not p.usable
    assert "timed out" in p.reason


def test_probe_cache_hit_avoids_second_boot() -> None:
    host = kvm_host(pr.RunResult(-6, "", MSR_STDERR))
    first = probe(host)
    second = probe(host)
    assert first == second
    assert host.boots() == 1
    data = json.loads(host.files[str(CACHE)])
    assert data["key"]["boot_id"] == "boot-1"
    assert data["key"]["kernel"] == str(KERNEL)
    assert data["usable"] is False


def test_probe_cache_invalidated_by_boot_id() -> None:
    host = kvm_host(pr.RunResult(-6, "", MSR_STDERR))
    assert not probe(host).usable
    host.files[pr.BOOT_ID] = "boot-2\n"
    host.runs[BOOT_ARGS] = BOOT_OK
    assert probe(host).usable
    assert host.boots() == 2
    assert probe(host).usable
    assert host.boots() == 2


def test_probe_cache_invalidated_by_kernel_path() -> None:
    host = kvm_host()
    probe(host)
    pr.probe_kvm(host, QEMU, Path("/other/vmlinuz"), FLOOR, CACHE)
    assert host.boots() == 2


@pytest.mark.parametrize(
    "content",
    [
        "{not json",
        "[]",
        json.dumps({"version": 1, "key": "x"}),
        json.dumps({"version": 99, "usable": True, "reason": ""}),
    ],
)
def test_probe_corrupt_cache_ignored_and_rewritten(content: str) -> None:
    host = kvm_host()
    host.files[str(CACHE)] = content
    assert probe(host).usable
    assert host.boots() == 1
    assert host.writes == [str(CACHE)]
    assert json.loads(host.files[str(CACHE)])["usable"] is True


def test_probe_unwritable_cache_is_not_an_error() -> None:
    class ReadOnly(FakeHost):
        def write_text_atomic(self, path: str, text: str) -> None:
            raise PermissionError(path)

    host = ReadOnly(files={QEMU: "", "/dev/kvm": "", pr.BOOT_ID: "b"}, runs={BOOT_ARGS: BOOT_OK})
    assert probe(host).usable


def test_real_host_atomic_write(tmp_path: Path) -> None:
    target = tmp_path / "sub" / "kvm-probe.json"
    real = pr.RealHost()
    real.write_text_atomic(str(target), "one")
    real.write_text_atomic(str(target), "two")
    assert target.read_text() == "two"
    assert sorted(os.listdir(target.parent)) == ["kvm-probe.json"]


def test_real_host_run_timeout_and_missing() -> None:
    real = pr.RealHost()
    assert real.run(["sleep", "5"], timeout=0.2).rc is None
    missing = real.run(["/nonexistent/qemu"], timeout=5)
    assert missing.rc == 127 and missing.stderr


def test_kvm_prober_memoizes() -> None:
    host = kvm_host()
    p = pr.kvm_prober(Config(), host, KERNEL, FLOOR, CACHE)
    assert p().usable and p().usable
    assert len(host.calls) == 1


# ---------------------------------------------------------------- resolve_accel / channel


def counting(result: pr.KvmProbe) -> tuple[Callable[[], pr.KvmProbe], list[int]]:
    n = [0]

    def f() -> pr.KvmProbe:
        n[0] += 1
        return result

    return f, n


GOOD = pr.KvmProbe(True, "")
BAD = pr.KvmProbe(False, "failed to set MSR")


def test_accel_tcg_never_probes() -> None:
    f, n = counting(GOOD)
    accel, _why = pr.resolve_accel("tcg", f)
    assert accel == "tcg" and n[0] == 0


def test_accel_kvm_usable() -> None:
    f, _ = counting(GOOD)
    assert pr.resolve_accel("kvm", f)[0] == "kvm"


def test_accel_kvm_unusable_raises() -> None:
    f, _ = counting(BAD)
    with pytest.raises(HostError) as ei:
        pr.resolve_accel("kvm", f)
    assert str(ei.value) == 'accel = "kvm" but KVM cannot run a guest here: failed to set MSR'


def test_accel_auto() -> None:
    assert pr.resolve_accel("auto", counting(GOOD)[0])[0] == "kvm"
    accel, why = pr.resolve_accel("auto", counting(BAD)[0])
    assert accel == "tcg"
    assert why == "KVM unusable: failed to set MSR; falling back to TCG (slow)"


def test_accel_unknown() -> None:
    with pytest.raises(ConfigError):
        pr.resolve_accel("hvf", counting(GOOD)[0])


def test_resolve_channel() -> None:
    with_vsock = FakeHost({"/dev/vhost-vsock": ""})
    without = FakeHost()
    assert pr.resolve_channel("auto", with_vsock) == "vsock"
    assert pr.resolve_channel("auto", without) == "virtio-serial"
    assert pr.resolve_channel("vsock", with_vsock) == "vsock"
    assert pr.resolve_channel("virtio-serial", with_vsock) == "virtio-serial"
    assert pr.resolve_channel("virtio-serial", without) == "virtio-serial"
    with pytest.raises(HostError, match="/dev/vhost-vsock"):
        pr.resolve_channel("vsock", without)
    with pytest.raises(ConfigError):
        pr.resolve_channel("tcp", without)


# ---------------------------------------------------------------- run_checks / format


def this_like_host(**kw: object) -> FakeHost:
    """Like the measured machine: QEMU 7.2 with seccomp and 9p, /dev/kvm, /dev/net/tun,
    virtiofsd; no vhost-vsock, no vhost-net, no macvtap."""
    files = {
        QEMU: "",
        "/dev/kvm": "",
        "/dev/net/tun": "",
        "/usr/lib/qemu/virtiofsd": "",
        pr.BOOT_ID: "b\n",
        pr.OSRELEASE: "6.1.0-test\n",
    }
    runs: dict[tuple[str, ...], Responder] = {
        ("--version",): pr.RunResult(0, VERSION_OUT, ""),
        ("-sandbox", "on"): pr.RunResult(0, VERSION_OUT, ""),
        ("-device", "help"): pr.RunResult(0, 'name "virtio-9p-pci", bus PCI\n', ""),
        BOOT_ARGS: pr.RunResult(-6, "", MSR_STDERR),
    }
    return FakeHost(files=files, runs=runs, **kw)  # type: ignore[arg-type]


def image_ok() -> tuple[bool, str]:
    return True, "/var/cache/cocoon/guest/image-abc"


def image_missing() -> tuple[bool, str]:
    return False, "not built: /var/cache/cocoon/guest/image-abc"


def by_name(checks: list[hc.Check]) -> dict[str, hc.Check]:
    return {c.name: c for c in checks}


def kvm_probe_for(host: FakeHost) -> Callable[[], pr.KvmProbe]:
    return pr.kvm_prober(Config(), host, KERNEL, FLOOR, CACHE)


def test_checks_only_warnings_exit_0() -> None:
    host = this_like_host()
    checks = hc.run_checks(Config(), host, image_ok, kvm_probe_for(host))
    c = by_name(checks)
    assert set(c) == {
        "root",
        "qemu",
        "kvm",
        "seccomp",
        "rootless",
        "vsock",
        "vhost-net",
        "tun",
        "macvtap",
        "9p",
        "virtiofsd",
        "image",
    }
    assert c["qemu"].ok and "7.2.22" in c["qemu"].detail
    assert not c["kvm"].ok and not c["kvm"].fatal and "Assertion" in c["kvm"].detail
    assert not c["vsock"].ok and not c["vsock"].fatal
    assert not c["vhost-net"].ok and not c["macvtap"].ok
    assert c["tun"].ok and c["9p"].ok and c["seccomp"].ok and c["virtiofsd"].ok
    assert hc.exit_code(checks) == 0


def test_checks_fatal_exit_1_when_qemu_missing() -> None:
    host = this_like_host()
    del host.files[QEMU]
    checks = hc.run_checks(Config(), host, image_ok)
    c = by_name(checks)
    assert not c["qemu"].ok and c["qemu"].fatal
    assert c["qemu"].meaning == "no sandbox can start"
    assert hc.exit_code(checks) == 1


def test_checks_old_qemu_fatal() -> None:
    host = this_like_host()
    host.runs[("--version",)] = pr.RunResult(0, "QEMU emulator version 6.1.0\n", "")
    c = by_name(hc.run_checks(Config(), host, image_ok))["qemu"]
    assert not c.ok and c.fatal and "6.2" in c.meaning


def test_checks_not_root_fatal() -> None:
    checks = hc.run_checks(Config(), this_like_host(euid=1000), image_ok)
    c = by_name(checks)["root"]
    assert not c.ok and c.fatal and c.meaning == "creating sandboxes needs root"
    assert hc.exit_code(checks) == 1


def test_checks_image_missing_depends_on_auto_build() -> None:
    cfg = Config()
    checks = hc.run_checks(cfg, this_like_host(), image_missing)
    assert by_name(checks)["image"].meaning == "built on first use (~1 min)"
    assert hc.exit_code(checks) == 0
    cfg = replace(cfg, image=replace(cfg.image, auto_build=False))
    checks = hc.run_checks(cfg, this_like_host(), image_missing)
    assert by_name(checks)["image"].fatal
    assert hc.exit_code(checks) == 1


def test_checks_virtiofsd_fatal_only_for_virtio_fs() -> None:
    host = this_like_host()
    del host.files["/usr/lib/qemu/virtiofsd"]
    cfg = Config()
    assert hc.exit_code(hc.run_checks(cfg, host, image_ok)) == 1
    cfg = replace(cfg, hypervisor=replace(cfg.hypervisor, shared_fs="none"))
    assert hc.exit_code(hc.run_checks(cfg, host, image_ok)) == 0


def test_checks_kvm_fatal_only_when_forced() -> None:
    host = this_like_host()
    cfg = Config()
    cfg = replace(cfg, hypervisor=replace(cfg.hypervisor, accel="kvm"))
    checks = hc.run_checks(cfg, host, image_ok, kvm_probe_for(host))
    assert by_name(checks)["kvm"].fatal
    assert hc.exit_code(checks) == 1


def test_checks_without_kvm_probe_does_not_boot() -> None:
    host = this_like_host()
    c = by_name(hc.run_checks(Config(), host, image_missing))["kvm"]
    assert not c.ok and not c.fatal and "not tested" in c.detail
    assert host.boots() == 0


def test_checks_macvtap_sources() -> None:
    host = this_like_host()
    host.files["/lib/modules/6.1.0-test/modules.dep"] = (
        "kernel/drivers/net/macvtap.ko: kernel/drivers/net/tap.ko\n"
    )
    assert by_name(hc.run_checks(Config(), host, image_ok))["macvtap"].ok
    host = this_like_host()
    host.files["/sys/module/macvtap"] = ""
    assert by_name(hc.run_checks(Config(), host, image_ok))["macvtap"].ok


def test_checks_seccomp_missing_fatal_only_if_configured() -> None:
    host = this_like_host()
    host.runs[("-sandbox", "on")] = pr.RunResult(1, "", "-sandbox support is not enabled")
    cfg = Config()
    assert by_name(hc.run_checks(cfg, host, image_ok))["seccomp"].fatal
    cfg = replace(cfg, hypervisor=replace(cfg.hypervisor, seccomp_sandbox=False))
    c = by_name(hc.run_checks(cfg, host, image_ok))["seccomp"]
    assert not c.ok and not c.fatal


def test_format_checks_contains_meanings_and_aligns() -> None:
    host = this_like_host(euid=1000)
    checks = hc.run_checks(Config(), host, image_missing, kvm_probe_for(host))
    out = hc.format_checks(checks)
    lines = out.splitlines()
    assert len(lines) == len(checks)
    for c, line in zip(checks, lines, strict=True):
        assert c.meaning in line and c.detail in line
    assert "  FAIL  root " in out
    assert "  ok    qemu " in out
    assert "  WARN  kvm " in out
    for text in (
        "guests run under TCG emulation, ~10x slower",
        "agent channel falls back to virtio-serial",
        "NICs use userspace virtio-net, lower throughput",
        "network model macvtap unavailable, tcfilter still works",
        "built on first use (~1 min)",
        "creating sandboxes needs root",
    ):
        assert text in out
    # the detail column starts at the same offset on every line
    starts = {line.index(c.detail) for c, line in zip(checks, lines, strict=True)}
    assert len(starts) == 1


def test_format_empty() -> None:
    assert hc.format_checks([]) == ""
    assert hc.exit_code([]) == 0


# ---------------------------------------------------------------- real QEMU


@pytest.mark.qemu
def test_real_kvm_probe(tmp_path: Path) -> None:
    qemu = Config().hypervisor.path
    if not os.path.exists(qemu) and shutil.which("qemu-system-x86_64") is None:
        pytest.skip(f"QEMU not installed ({qemu})")
    if not os.path.exists(qemu):
        qemu = shutil.which("qemu-system-x86_64") or qemu
    from cocoon.guest_image import build

    # The image for the current inputs; failing that (an agent source changed since the last
    # build), any built image: the probe only needs its kernel and floor initrd.
    cache_dir = Path("/var/cache/cocoon/guest")
    current = build.image_dir(cache_dir)
    candidates = [
        current,
        *sorted(
            (d for d in cache_dir.glob("image-*") if d != current),
            key=lambda d: d.stat().st_mtime,
            reverse=True,
        ),
    ]
    img = None
    for d in candidates:
        try:
            img = build.GuestImage.load(d)
            break
        except (build.ImageError, KeyError):
            continue
    if img is None:
        pytest.skip(f"no built guest image under {cache_dir} (run `cocoon image build`)")

    host = pr.RealHost()
    cache = tmp_path / "kvm-probe.json"
    p = pr.probe_kvm(host, qemu, img.kernel, img.floor_initrd, cache, timeout=30)
    if p.usable:
        # A host where KVM really boots guests: no reason is given.
        assert p.reason == ""
    else:
        # This machine: /dev/kvm exists but QEMU aborts (MSR 0x10a) or there is no /dev/kvm.
        assert p.reason.strip() != ""
    if host.exists("/dev/kvm") and host.access("/dev/kvm", os.R_OK | os.W_OK):
        assert cache.exists()
        again = pr.probe_kvm(host, qemu, img.kernel, img.floor_initrd, cache, timeout=30)
        assert again == p


def test_checks_say_whether_qemu_runs_as_root() -> None:
    host = this_like_host()
    c = by_name(hc.run_checks(Config(), host, image_ok))["rootless"]
    assert c.ok and not c.fatal and "1900000000-1900065535" in c.detail
    cfg = Config()
    cfg = replace(cfg, hypervisor=replace(cfg.hypervisor, rootless=False))
    c = by_name(hc.run_checks(cfg, host, image_ok))["rootless"]
    assert not c.ok and not c.fatal and "root on the host" in c.meaning
