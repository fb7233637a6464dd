"""What this host can and cannot do, and what each gap means for the user.

"KVM present" is not "KVM works": on some hosts /dev/kvm opens fine but QEMU aborts while
setting up the vCPU (e.g. "failed to set MSR 0x10a"). The only reliable probe is to boot the
guest kernel with the floor initrd under ``-accel kvm`` and look for its ``cocoon-floor:``
console line; the answer is cached per (QEMU binary, kernel, host boot).

Every OS touch goes through a ``Host`` (``RealHost`` in production) so the logic here can be
tested without root, devices or QEMU.

May import: the standard library, cocoon.runtime.errors, cocoon.runtime.config,
cocoon.guest_image.build.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import subprocess
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple, Protocol

from cocoon.runtime.config import Config
from cocoon.runtime.errors import ConfigError, HostError

MIN_QEMU = (6, 2, 0)
FLOOR_MARKER = "cocoon-floor:"
KVM_DEV = "/dev/kvm"
VSOCK_DEV = "/dev/vhost-vsock"
VHOST_NET_DEV = "/dev/vhost-net"
TUN_DEV = "/dev/net/tun"
BOOT_ID = "/proc/sys/kernel/random/boot_id"
OSRELEASE = "/proc/sys/kernel/osrelease"
KVM_CACHE_NAME = "kvm-probe.json"
_CACHE_VERSION = 1
_QUERY_TIMEOUT = 10.0


# --------------------------------------------------------------------------- host seam


class RunResult(NamedTuple):
    """Outcome of a command. ``rc`` is None if it timed out (the process was killed);
    127 if it could not be executed at all (stderr then says why)."""

    rc: int | None
    stdout: str
    stderr: str


class Host(Protocol):
    """The OS operations hostcheck needs; tests substitute a fake."""

    def exists(self, path: str) -> bool: ...

    def read_text(self, path: str) -> str:
        """Raises OSError if the file cannot be read."""
        ...

    def write_text_atomic(self, path: str, text: str) -> None:
        """Creates parent directories; readers see the old or the new content, never a
        mix. Raises OSError."""
        ...

    def mtime(self, path: str) -> float | None: ...

    def access(self, path: str, mode: int) -> bool: ...

    def run(self, argv: Sequence[str], timeout: float) -> RunResult: ...

    def geteuid(self) -> int: ...


def _text(data: str | bytes | None) -> str:
    if data is None:
        return ""
    if isinstance(data, bytes):
        return data.decode(errors="replace")
    return data


class RealHost:
    """The real machine."""

    def exists(self, path: str) -> bool:
        return os.path.exists(path)

    def read_text(self, path: str) -> str:
        return Path(path).read_text()

    def write_text_atomic(self, path: str, text: str) -> None:
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "w") as f:
                f.write(text)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, target)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise

    def mtime(self, path: str) -> float | None:
        try:
            return os.stat(path).st_mtime
        except OSError:
            return None

    def access(self, path: str, mode: int) -> bool:
        return os.access(path, mode)

    def run(self, argv: Sequence[str], timeout: float) -> RunResult:
        try:
            res = subprocess.run(
                list(argv),
                stdin=subprocess.DEVNULL,
                capture_output=True,
                text=True,
                errors="replace",
                timeout=timeout,
                check=False,
            )
        except subprocess.TimeoutExpired as exc:
            return RunResult(None, _text(exc.stdout), _text(exc.stderr))
        except OSError as exc:
            return RunResult(127, "", f"{argv[0]}: {exc.strerror or exc}")
        return RunResult(res.returncode, res.stdout, res.stderr)

    def geteuid(self) -> int:
        return os.geteuid()


# --------------------------------------------------------------------------- QEMU

_VERSION_RE = re.compile(r"QEMU emulator version (\d+)\.(\d+)(?:\.(\d+))?")


def parse_qemu_version(text: str) -> tuple[int, int, int] | None:
    """``QEMU emulator version 7.2.22 (Debian ...)`` -> (7, 2, 22); None if not found."""
    m = _VERSION_RE.search(text)
    if m is None:
        return None
    return int(m.group(1)), int(m.group(2)), int(m.group(3) or 0)


def qemu_version(host: Host, qemu_path: str) -> tuple[int, int, int] | None:
    """The version of the QEMU binary at ``qemu_path``; None if it does not run or says
    something unexpected."""
    res = host.run([qemu_path, "--version"], _QUERY_TIMEOUT)
    if res.rc != 0:
        return None
    return parse_qemu_version(res.stdout)


def seccomp_sandbox_supported(host: Host, qemu_path: str) -> bool:
    """Whether this QEMU accepts ``-sandbox on``.

    ``-help`` lists ``-sandbox`` even in builds without libseccomp, so instead the option is
    parsed for real: QEMU handles ``-sandbox on`` (rejecting it if seccomp is compiled out)
    before it reaches ``-version`` and exits; nothing is started.
    """
    res = host.run([qemu_path, "-sandbox", "on", "-version"], _QUERY_TIMEOUT)
    return res.rc == 0 and parse_qemu_version(res.stdout) is not None


def qemu_has_device(host: Host, qemu_path: str, device: str) -> bool:
    """Whether ``qemu -device help`` lists ``device``."""
    res = host.run([qemu_path, "-device", "help"], _QUERY_TIMEOUT)
    return res.rc == 0 and f'name "{device}"' in res.stdout


# --------------------------------------------------------------------------- KVM


@dataclass(frozen=True)
class KvmProbe:
    """Whether KVM can run a guest here; ``reason`` says why not (empty if usable)."""

    usable: bool
    reason: str


def kvm_boot_argv(qemu_path: str, kernel: str, floor_initrd: str) -> list[str]:
    return [
        qemu_path,
        "-machine",
        "q35",
        "-accel",
        "kvm",
        "-cpu",
        "host",
        "-m",
        "256M",
        "-smp",
        "1",
        "-nodefaults",
        "-display",
        "none",
        "-vga",
        "none",
        "-no-reboot",
        "-serial",
        "stdio",
        "-kernel",
        kernel,
        "-initrd",
        floor_initrd,
        "-append",
        "console=ttyS0 panic=-1 quiet",
    ]


def _last_line(text: str) -> str:
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    return lines[-1] if lines else ""


def _boot_probe(
    host: Host, qemu_path: str, kernel: str, floor_initrd: str, timeout: float
) -> KvmProbe:
    res = host.run(kvm_boot_argv(qemu_path, kernel, floor_initrd), timeout)
    if res.rc is None:
        return KvmProbe(False, f"timed out after {timeout:g}s booting the floor image under KVM")
    if res.rc == 0 and FLOOR_MARKER in res.stdout:
        return KvmProbe(True, "")
    reason = _last_line(res.stderr)
    if not reason:
        reason = f"qemu exited with status {res.rc} without printing {FLOOR_MARKER!r}"
    return KvmProbe(False, reason)


def _read_cache(host: Host, cache_file: str, key: dict[str, object]) -> KvmProbe | None:
    try:
        data = json.loads(host.read_text(cache_file))
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or data.get("version") != _CACHE_VERSION:
        return None
    usable, reason = data.get("usable"), data.get("reason")
    if data.get("key") != key or not isinstance(usable, bool) or not isinstance(reason, str):
        return None
    return KvmProbe(usable, reason)


def probe_kvm(
    host: Host,
    qemu_path: str,
    kernel: Path,
    floor_initrd: Path,
    cache_file: Path,
    timeout: float = 15.0,
) -> KvmProbe:
    """Whether KVM can actually boot a guest here.

    Without a read/write /dev/kvm the answer is "no" without booting. Otherwise the floor
    image is booted under ``-accel kvm -cpu host``; KVM is usable iff QEMU exits 0 after the
    guest printed its ``cocoon-floor:`` line. The result is cached in ``cache_file`` keyed
    by the QEMU binary (path, mtime), the kernel path and the host's boot id, so the boot
    runs once per host boot; delete the file to probe again. A cache file that cannot be
    read or parsed is ignored and replaced; one that cannot be written is not an error.
    """
    if not host.exists(KVM_DEV):
        return KvmProbe(False, f"{KVM_DEV} does not exist (no KVM module or not exposed)")
    if not host.access(KVM_DEV, os.R_OK | os.W_OK):
        return KvmProbe(False, f"{KVM_DEV} is not readable and writable by this user")

    try:
        boot_id = host.read_text(BOOT_ID).strip()
    except OSError:
        boot_id = ""
    key: dict[str, object] = {
        "qemu": qemu_path,
        "qemu_mtime": host.mtime(qemu_path),
        "kernel": str(kernel),
        "boot_id": boot_id,
    }
    cache = str(cache_file)
    if boot_id:
        cached = _read_cache(host, cache, key)
        if cached is not None:
            return cached

    result = _boot_probe(host, qemu_path, str(kernel), str(floor_initrd), timeout)
    if boot_id:
        record = {
            "version": _CACHE_VERSION,
            "key": key,
            "usable": result.usable,
            "reason": result.reason,
        }
        with contextlib.suppress(OSError):
            host.write_text_atomic(cache, json.dumps(record, indent=2) + "\n")
    return result


def default_kvm_cache(cfg: Config) -> Path:
    """Where the KVM probe result lives: next to the guest image layers."""
    return Path(cfg.image.cache_dir) / KVM_CACHE_NAME


def kvm_prober(
    cfg: Config,
    host: Host,
    kernel: Path,
    floor_initrd: Path,
    cache_file: Path | None = None,
    timeout: float = 15.0,
) -> Callable[[], KvmProbe]:
    """A zero-argument probe for ``resolve_accel``/``run_checks``; runs at most once."""
    memo: list[KvmProbe] = []

    def probe() -> KvmProbe:
        if not memo:
            memo.append(
                probe_kvm(
                    host,
                    cfg.hypervisor.path,
                    kernel,
                    floor_initrd,
                    cache_file or default_kvm_cache(cfg),
                    timeout,
                )
            )
        return memo[0]

    return probe


# --------------------------------------------------------------------------- resolution


def resolve_accel(cfg_accel: str, probe: Callable[[], KvmProbe]) -> tuple[str, str]:
    """(accelerator, why) for ``hypervisor.accel``. ``probe`` is only called if needed."""
    if cfg_accel == "tcg":
        return "tcg", 'accel = "tcg" in the configuration'
    if cfg_accel == "kvm":
        p = probe()
        if not p.usable:
            raise HostError(f'accel = "kvm" but KVM cannot run a guest here: {p.reason}')
        return "kvm", 'accel = "kvm" and the KVM boot probe passed'
    if cfg_accel == "auto":
        p = probe()
        if p.usable:
            return "kvm", "KVM usable (boot probe passed)"
        return "tcg", f"KVM unusable: {p.reason}; falling back to TCG (slow)"
    raise ConfigError(f'hypervisor.accel = "{cfg_accel}": expected "auto", "kvm" or "tcg"')


def resolve_channel(cfg_channel: str, host: Host) -> str:
    """The agent channel for ``agent.channel``: "vsock" or "virtio-serial"."""
    if cfg_channel == "virtio-serial":
        return "virtio-serial"
    if cfg_channel == "vsock":
        if not host.exists(VSOCK_DEV):
            raise HostError(
                f'channel = "vsock" but {VSOCK_DEV} does not exist '
                '(load the vhost_vsock module or use channel = "virtio-serial")'
            )
        return "vsock"
    if cfg_channel == "auto":
        return "vsock" if host.exists(VSOCK_DEV) else "virtio-serial"
    raise ConfigError(
        f'agent.channel = "{cfg_channel}": expected "auto", "vsock" or "virtio-serial"'
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
