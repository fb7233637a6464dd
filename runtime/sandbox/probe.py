"""Probing the host: the one seam every OS touch goes through, QEMU, KVM, and resolving the
configured accel and channel to what this host has.

"KVM present" is not "KVM works": on some hosts /dev/kvm opens fine but QEMU aborts while
setting up the vCPU (e.g. "failed to set MSR 0x10a"). The only reliable probe is to boot the
guest kernel with the floor initrd under ``-accel kvm`` and look for its ``cocoon-floor:``
console line; the answer is cached per (QEMU binary, kernel, host boot).

Every OS touch goes through a ``Host`` (``RealHost`` in production) so the logic here can be
tested without root, devices or QEMU.

May import: the standard library, cocoon.runtime.{config, errors}.
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
from typing import Any, NamedTuple, Protocol

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
QEMU_CACHE_NAME = "qemu-probe.json"
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


def seccomp_sandbox_supported(host: Host, qemu_path: str, cache_file: Path | None = None) -> bool:
    """Whether this QEMU accepts ``-sandbox on``.

    ``-help`` lists ``-sandbox`` even in builds without libseccomp, so instead the option is
    parsed for real: QEMU handles ``-sandbox on`` (rejecting it if seccomp is compiled out)
    before it reaches ``-version`` and exits; nothing is started. With ``cache_file`` the
    answer is kept there, keyed by the binary (path, mtime): every boot and pool claim asks,
    and starting QEMU to ask costs ~25 ms. An unreadable cache is asked again and replaced.
    """
    key: dict[str, object] = {"qemu": qemu_path, "qemu_mtime": host.mtime(qemu_path)}
    cache = str(cache_file) if cache_file is not None and key["qemu_mtime"] is not None else ""
    if cache:
        data = _read_record(host, cache, key)
        if data is not None and isinstance(data.get("seccomp_sandbox"), bool):
            return bool(data["seccomp_sandbox"])
    res = host.run([qemu_path, "-sandbox", "on", "-version"], _QUERY_TIMEOUT)
    ok = res.rc == 0 and parse_qemu_version(res.stdout) is not None
    if cache and res.rc is not None:  # a timeout says nothing about the binary
        _write_record(host, cache, key, seccomp_sandbox=ok)
    return ok


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


def _read_record(host: Host, cache_file: str, key: dict[str, object]) -> dict[str, Any] | None:
    """A probe's cached record, if the file holds one of this version for ``key``."""
    try:
        data = json.loads(host.read_text(cache_file))
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or data.get("version") != _CACHE_VERSION:
        return None
    return data if data.get("key") == key else None


def _write_record(host: Host, cache_file: str, key: dict[str, object], **answer: object) -> None:
    """A probe's answer kept for ``key``; a cache that cannot be written is not an error."""
    record = {"version": _CACHE_VERSION, "key": key, **answer}
    with contextlib.suppress(OSError):
        host.write_text_atomic(cache_file, json.dumps(record, indent=2) + "\n")


def _read_cache(host: Host, cache_file: str, key: dict[str, object]) -> KvmProbe | None:
    data = _read_record(host, cache_file, key)
    if data is None:
        return None
    usable, reason = data.get("usable"), data.get("reason")
    if not isinstance(usable, bool) or not isinstance(reason, str):
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
        _write_record(host, cache, key, usable=result.usable, reason=result.reason)
    return result


def default_qemu_cache(cfg: Config) -> Path:
    """Where what the QEMU binary was asked (``seccomp_sandbox_supported``) is kept."""
    return Path(cfg.image.cache_dir) / QEMU_CACHE_NAME


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
