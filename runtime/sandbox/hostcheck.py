"""What this host can and cannot do, and what each gap means for the user (``cocoon check``).

Each ``Check`` names a capability, whether the host has it, and what its absence means; the
probes themselves (QEMU, KVM, devices, the channel) are in ``probe``, behind its ``Host`` seam,
so this is tested without root, devices or QEMU.

May import: the standard library, cocoon.runtime.{config, errors, sandbox.probe},
cocoon.guest_image.build (lazily).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from cocoon.runtime.config import Config
from cocoon.runtime.sandbox.probe import (
    KVM_DEV,
    MIN_QEMU,
    OSRELEASE,
    TUN_DEV,
    VHOST_NET_DEV,
    VSOCK_DEV,
    Host,
    KvmProbe,
    qemu_has_device,
    qemu_version,
    seccomp_sandbox_supported,
)

# --------------------------------------------------------------------------- checks


@dataclass(frozen=True)
class Check:
    """One line of ``cocoon check``. ``fatal``: a failure here means sandboxes cannot
    start with this configuration. ``meaning``: what the outcome means for the user."""

    name: str
    ok: bool
    fatal: bool
    detail: str
    meaning: str


def _fmt_version(v: tuple[int, int, int]) -> str:
    return ".".join(str(x) for x in v)


def _check_qemu(cfg: Config, host: Host) -> tuple[Check, bool]:
    path = cfg.hypervisor.path
    if not host.exists(path):
        return Check("qemu", False, True, f"{path} not found", "no sandbox can start"), False
    if not host.access(path, os.X_OK):
        return Check("qemu", False, True, f"{path} not executable", "no sandbox can start"), False
    v = qemu_version(host, path)
    if v is None:
        c = Check(
            "qemu",
            False,
            True,
            f"{path}: --version failed or unrecognised",
            "no sandbox can start",
        )
        return c, False
    if v < MIN_QEMU:
        c = Check(
            "qemu",
            False,
            True,
            f"{path} is {_fmt_version(v)}",
            f"QEMU >= {_fmt_version(MIN_QEMU)} is required: no sandbox can start",
        )
        return c, True
    return Check("qemu", True, True, f"{path} {_fmt_version(v)}", "guests can start"), True


def _check_kvm(cfg: Config, host: Host, kvm_probe: Callable[[], KvmProbe] | None) -> Check:
    accel = cfg.hypervisor.accel
    fatal = accel == "kvm"
    slow = "guests run under TCG emulation, ~10x slower"
    if accel == "tcg":
        slow = 'accel = "tcg": KVM not used'
    if kvm_probe is None:
        if not host.exists(KVM_DEV):
            return Check("kvm", False, fatal, f"{KVM_DEV} missing", slow)
        if not host.access(KVM_DEV, os.R_OK | os.W_OK):
            return Check("kvm", False, fatal, f"{KVM_DEV} not read/write", slow)
        return Check(
            "kvm",
            False,
            False,
            f"{KVM_DEV} present, boot not tested (no guest image)",
            "KVM may or may not work; guests may run under TCG emulation, ~10x slower",
        )
    p = kvm_probe()
    if p.usable:
        good = "hardware acceleration" if accel != "tcg" else 'available, but accel = "tcg"'
        return Check("kvm", True, fatal, "a guest booted under KVM", good)
    return Check("kvm", False, fatal, f"unusable: {p.reason}", slow)


def _check_macvtap(host: Host) -> Check:
    meaning_bad = "network model macvtap unavailable, tcfilter still works"
    if host.exists("/sys/module/macvtap"):
        return Check("macvtap", True, False, "module loaded", "network model macvtap available")
    try:
        release = host.read_text(OSRELEASE).strip()
    except OSError:
        release = ""
    if release:
        for name, how in (
            ("modules.builtin", "built into the kernel"),
            ("modules.dep", "module loadable"),
        ):
            try:
                text = host.read_text(f"/lib/modules/{release}/{name}")
            except OSError:
                continue
            if "/macvtap.ko" in text:
                return Check("macvtap", True, False, how, "network model macvtap available")
    where = f"kernel {release}" if release else "this kernel"
    return Check("macvtap", False, False, f"not loaded and no module for {where}", meaning_bad)


def run_checks(
    cfg: Config,
    host: Host,
    image_probe: Callable[[], tuple[bool, str]],
    kvm_probe: Callable[[], KvmProbe] | None = None,
) -> list[Check]:
    """Everything ``cocoon check`` reports, one Check per item, in display order.

    ``image_probe`` returns (guest image present, detail). ``kvm_probe`` boots a test guest
    (see ``kvm_prober``); without one (e.g. no guest image yet) only /dev/kvm is looked at.
    """
    hv = cfg.hypervisor
    checks: list[Check] = []

    root = host.geteuid() == 0
    checks.append(
        Check("root", True, True, "running as root", "sandboxes can be created")
        if root
        else Check("root", False, True, f"euid {host.geteuid()}", "creating sandboxes needs root")
    )

    qemu_check, qemu_runs = _check_qemu(cfg, host)
    checks.append(qemu_check)
    checks.append(_check_kvm(cfg, host, kvm_probe))

    if not qemu_runs:
        checks.append(Check("seccomp", False, False, "skipped: QEMU unusable", "not checked"))
    elif seccomp_sandbox_supported(host, hv.path):
        checks.append(
            Check(
                "seccomp",
                True,
                hv.seccomp_sandbox,
                "qemu accepts -sandbox on",
                "QEMU can run under a seccomp filter",
            )
        )
    elif hv.seccomp_sandbox:
        checks.append(
            Check(
                "seccomp",
                False,
                True,
                "qemu rejects -sandbox on (built without seccomp)",
                "hypervisor.seccomp_sandbox = true cannot be honoured: no sandbox can start "
                "(set it to false to run QEMU without a seccomp filter)",
            )
        )
    else:
        checks.append(
            Check(
                "seccomp",
                False,
                False,
                "qemu rejects -sandbox on (built without seccomp)",
                "QEMU runs without a seccomp filter",
            )
        )

    last_uid = hv.rootless_uid_first + hv.rootless_uid_count - 1
    checks.append(
        Check(
            "rootless",
            True,
            False,
            f"QEMU drops to a uid of its own ({hv.rootless_uid_first}-{last_uid})",
            "an escape from QEMU is an unprivileged process",
        )
        if hv.rootless
        else Check(
            "rootless",
            False,
            False,
            "QEMU runs as root (hypervisor.rootless = false)",
            "an escape from QEMU's device emulation is root on the host",
        )
    )

    if host.exists(VSOCK_DEV):
        checks.append(Check("vsock", True, False, f"{VSOCK_DEV} present", "agent talks vsock"))
    else:
        checks.append(
            Check(
                "vsock",
                False,
                cfg.agent.channel == "vsock",
                f"{VSOCK_DEV} missing",
                "agent channel falls back to virtio-serial"
                if cfg.agent.channel != "vsock"
                else 'channel = "vsock" cannot work: no sandbox can start',
            )
        )

    if host.exists(VHOST_NET_DEV):
        checks.append(
            Check("vhost-net", True, False, f"{VHOST_NET_DEV} present", "in-kernel virtio-net")
        )
    else:
        checks.append(
            Check(
                "vhost-net",
                False,
                False,
                f"{VHOST_NET_DEV} missing",
                "NICs use userspace virtio-net, lower throughput",
            )
        )

    if host.exists(TUN_DEV):
        checks.append(Check("tun", True, False, f"{TUN_DEV} present", "containers get networks"))
    else:
        checks.append(Check("tun", False, False, f"{TUN_DEV} missing", "no network for containers"))

    checks.append(_check_macvtap(host))

    kernel_note = "the default guest kernel lacks 9p, so virtio-fs is used"
    if not qemu_runs:
        checks.append(Check("9p", False, False, "skipped: QEMU unusable", kernel_note))
    elif qemu_has_device(host, hv.path, "virtio-9p-pci"):
        checks.append(Check("9p", True, False, "qemu has virtio-9p-pci", kernel_note))
    else:
        checks.append(
            Check(
                "9p",
                False,
                False,
                "qemu lacks virtio-9p-pci",
                f"shared_fs = virtio-9p unavailable; {kernel_note}",
            )
        )

    vfsd = hv.virtiofsd_path
    needed = hv.shared_fs == "virtio-fs"
    if host.exists(vfsd) and host.access(vfsd, os.X_OK):
        checks.append(Check("virtiofsd", True, needed, f"{vfsd} present", "virtio-fs available"))
    else:
        checks.append(
            Check(
                "virtiofsd",
                False,
                needed,
                f"{vfsd} missing or not executable",
                "shared_fs = virtio-fs cannot work: no sandbox can start"
                if needed
                else f"virtio-fs unavailable (shared_fs = {hv.shared_fs})",
            )
        )

    ok, detail = image_probe()
    if ok:
        checks.append(Check("image", True, False, detail, "guest image ready"))
    elif cfg.image.auto_build:
        checks.append(Check("image", False, False, detail, "built on first use (~1 min)"))
    else:
        checks.append(
            Check(
                "image",
                False,
                True,
                detail,
                "image.auto_build = false: no sandbox can start until `cocoon image build` is run",
            )
        )
    return checks


def default_image_probe(cfg: Config) -> Callable[[], tuple[bool, str]]:
    """An ``image_probe`` for ``run_checks``: the configured kernel/initrd/rootfs override
    files if any are set, else the built image for the current inputs in image.cache_dir."""

    def probe() -> tuple[bool, str]:
        from cocoon.guest_image import build

        overrides = [p for p in (cfg.image.kernel, cfg.image.initrd, cfg.image.rootfs) if p]
        if overrides:
            missing = [p for p in overrides if not os.path.isfile(p)]
            if missing:
                return False, "missing: " + ", ".join(missing)
            return True, "configured files: " + ", ".join(overrides)
        try:
            d = build.image_dir(Path(cfg.image.cache_dir))
        except (OSError, ValueError, KeyError) as exc:
            return False, f"cannot compute the image key: {exc}"
        if not (d / "manifest.json").exists():
            return False, f"not built: {d}"
        try:
            build.GuestImage.load(d)
        except (build.ImageError, KeyError) as exc:
            return False, str(exc)
        return True, str(d)

    return probe


def format_checks(checks: Sequence[Check]) -> str:
    """Aligned lines: ``  ok    kvm        detail - meaning`` (WARN / FAIL on failure)."""
    if not checks:
        return ""
    width = max(len(c.name) for c in checks)
    lines = []
    for c in checks:
        status = "ok" if c.ok else ("FAIL" if c.fatal else "WARN")
        lines.append(f"  {status:<5} {c.name:<{width}}  {c.detail} - {c.meaning}")
    return "\n".join(lines) + "\n"


def exit_code(checks: Sequence[Check]) -> int:
    """1 if any fatal check failed, else 0."""
    return 1 if any(c.fatal and not c.ok for c in checks) else 0
