"""Builds the guest image from pinned inputs and caches it by content hash.

Layers, each cached under its own key so a change rebuilds only what it touches:
  kernel-<key>/   the Debian kernel package unpacked, plus the first-stage module set
  base-<key>/     the Debian rootfs tree from mmdebstrap (the slow layer)
  image-<key>/    vmlinuz, initrd.img (first stage), rootfs.img (ext4 for virtio-pmem/DAX),
                  floor-initrd.img (benchmark floor), manifest.json
The image key hashes the kernel and base keys, the agent's sources, init scripts and this file.

May import: the standard library and cocoon.agent (for its source location only).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import tomllib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import cocoon.agent

BUILDER_VERSION = "1"
HERE = Path(__file__).resolve().parent
AGENT_DIR = Path(cocoon.agent.__file__).resolve().parent
PMEM_ALIGN = 2 * 1024 * 1024


class ImageError(Exception):
    """The guest image cannot be built or is unusable."""


@dataclass(frozen=True)
class GuestImage:
    """A built image: every path exists and was checked."""

    dir: Path
    kernel: Path
    initrd: Path
    rootfs: Path
    floor_initrd: Path
    kernel_release: str
    key: str

    @classmethod
    def load(cls, d: Path) -> GuestImage:
        try:
            m = json.loads((d / "manifest.json").read_text())
        except (OSError, ValueError) as exc:
            raise ImageError(f"guest image at {d}: unreadable manifest: {exc}") from exc
        img = cls(
            dir=d,
            kernel=d / "vmlinuz",
            initrd=d / "initrd.img",
            rootfs=d / "rootfs.img",
            floor_initrd=d / "floor-initrd.img",
            kernel_release=m["kernel_release"],
            key=m["key"],
        )
        img.verify(m.get("sizes", {}))
        return img

    def verify(self, sizes: dict[str, int]) -> None:
        for p in (self.kernel, self.initrd, self.rootfs, self.floor_initrd):
            if not p.is_file():
                raise ImageError(f"guest image file missing: {p}")
            want = sizes.get(p.name)
            if want is not None and p.stat().st_size != want:
                raise ImageError(
                    f"guest image file {p} is {p.stat().st_size} bytes, manifest says {want}: "
                    "corrupt or truncated (run `cocoon image build --force`)"
                )


def load_inputs(path: Path = HERE / "inputs.toml") -> dict[str, object]:
    with path.open("rb") as f:
        return tomllib.load(f)


def _hash(*parts: object) -> str:
    h = hashlib.sha256()
    for p in parts:
        if isinstance(p, Path):
            h.update(p.name.encode() + b"\0" + p.read_bytes())
        else:
            h.update(json.dumps(p, sort_keys=True).encode())
        h.update(b"\x1e")
    return h.hexdigest()[:16]


def agent_sources() -> list[Path]:
    return sorted(p for p in AGENT_DIR.iterdir() if p.suffix in (".py", ".proto") and p.is_file())


def keys(inputs: dict[str, object]) -> tuple[str, str, str]:
    kernel_key = _hash(BUILDER_VERSION, inputs["kernel"])
    base_key = _hash(BUILDER_VERSION, inputs["rootfs"])
    image_key = _hash(
        kernel_key,
        base_key,
        Path(__file__),
        HERE / "init.sh",
        HERE / "floor-init.sh",
        *agent_sources(),
    )
    return kernel_key, base_key, image_key


class Progress:
    def __init__(self, out: Callable[[str], None]) -> None:
        self._out = out
        self._t0 = time.monotonic()

    @contextlib.contextmanager
    def step(self, what: str) -> Iterator[None]:
        t = time.monotonic()
        self._out(f"[guest-image] {what} ...")
        yield
        self._out(f"[guest-image] {what}: done in {time.monotonic() - t:.1f}s")


def _run(argv: list[str], **kw: object) -> None:
    res = subprocess.run(argv, capture_output=True, text=True, **kw)  # type: ignore[call-overload]
    if res.returncode != 0:
        tail = "\n".join((res.stderr or res.stdout).strip().splitlines()[-15:])
        raise ImageError(f"{argv[0]} failed (exit {res.returncode}):\n{tail}")


def _need(tool: str, package: str) -> None:
    if shutil.which(tool) is None:
        raise ImageError(f"{tool} not found: install Debian's {package} to build the guest image")


def build_kernel(cache: Path, key: str, spec: dict[str, object], prog: Progress) -> Path:
    out = cache / f"kernel-{key}"
    if (out / "late-modules.list").exists():
        return out
    _need("apt-get", "apt")
    _need("modprobe", "kmod")
    pkg, ver, rel = str(spec["package"]), str(spec["version"]), str(spec["release"])
    with prog.step(f"kernel {pkg}={ver}"), tempfile.TemporaryDirectory(dir=cache) as td:
        tmp = Path(td)
        try:
            _run(["apt-get", "download", f"{pkg}={ver}"], cwd=tmp)
        except ImageError:
            # Stale or empty package lists (a fresh machine): refresh once and retry.
            _run(["apt-get", "update", "-q"])
            _run(["apt-get", "download", f"{pkg}={ver}"], cwd=tmp)
        debs = list(tmp.glob("*.deb"))
        if len(debs) != 1:
            raise ImageError(f"apt-get download {pkg}={ver} gave {debs}")
        tree = tmp / "tree"
        _run(["dpkg-deb", "-x", str(debs[0]), str(tree)])
        _run(["depmod", "-b", str(tree), rel])
        stage = tmp / "out"
        (stage / "modules").mkdir(parents=True)
        (stage / "late").mkdir()
        order: list[str] = []
        late: list[str] = []
        for listing, out_dir, mods in (
            (order, stage / "modules", spec["modules"]),
            (late, stage / "late", spec.get("late_modules", [])),
        ):
            for mod in mods:  # type: ignore[attr-defined]
                for path in _module_with_deps(tree, rel, str(mod)):
                    name = Path(path).name
                    if name not in order and name not in late:
                        listing.append(name)
                        shutil.copy2(path, out_dir / name)
        shutil.copy2(tree / "boot" / f"vmlinuz-{rel}", stage / "vmlinuz")
        (stage / "modules.list").write_text("\n".join(order) + "\n")
        (stage / "late-modules.list").write_text("\n".join(late) + "\n")
        stage.rename(out)
    return out


def _module_with_deps(tree: Path, rel: str, mod: str) -> list[str]:
    """The .ko paths ``mod`` needs, dependencies first (modprobe --show-depends)."""
    res = subprocess.run(
        ["modprobe", "-d", str(tree), "-S", rel, "--show-depends", mod],
        capture_output=True,
        text=True,
    )
    if res.returncode != 0:
        raise ImageError(f"kernel {rel} has no module {mod}: {res.stderr.strip()}")
    return [w[1] for w in (line.split() for line in res.stdout.splitlines()) if w[:1] == ["insmod"]]


def build_base(cache: Path, key: str, spec: dict[str, object], prog: Progress) -> Path:
    out = cache / f"base-{key}"
    if (out / "rootfs" / "usr" / "bin" / "python3").exists():
        return out
    _need("mmdebstrap", "mmdebstrap")
    with (
        prog.step("rootfs (mmdebstrap, Debian packages)"),
        tempfile.TemporaryDirectory(dir=cache) as td,
    ):
        root = Path(td) / "rootfs"
        argv = [
            "mmdebstrap",
            "--quiet",
            f"--variant={spec['variant']}",
            "--include=" + ",".join(spec["packages"]),  # type: ignore[arg-type]
            *(f"--dpkgopt=path-exclude={p}" for p in spec["path_excludes"]),  # type: ignore[attr-defined]
            str(spec["suite"]),
            str(root),
            *spec["mirrors"],  # type: ignore[misc]
        ]
        _run(argv)
        final = Path(td) / "final"
        final.mkdir()
        root.rename(final / "rootfs")
        final.rename(out)
    return out


def _dir_bytes(root: Path) -> int:
    total = 0
    for dirpath, _, files in os.walk(root):
        for f in files:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(dirpath, f)).st_size
    return total


def _initrd(stage: Path, out: Path) -> None:
    with out.open("wb") as f:
        find = subprocess.Popen(["find", ".", "-print0"], cwd=stage, stdout=subprocess.PIPE)
        cpio = subprocess.Popen(
            ["cpio", "--null", "-o", "-H", "newc", "--quiet", "-R", "0:0"],
            cwd=stage,
            stdin=find.stdout,
            stdout=subprocess.PIPE,
        )
        assert find.stdout is not None
        find.stdout.close()
        gz = subprocess.run(["gzip", "-6"], stdin=cpio.stdout, stdout=f)
        if cpio.wait() != 0 or find.wait() != 0 or gz.returncode != 0:
            raise ImageError(f"building initramfs {out} failed")


def build_image(cache: Path, key: str, kernel: Path, base: Path, rel: str, prog: Progress) -> Path:
    out = cache / f"image-{key}"
    _need("mkfs.ext4", "e2fsprogs")
    _need("cpio", "cpio")
    with (
        prog.step("image (agent, first stage, ext4 root)"),
        tempfile.TemporaryDirectory(dir=cache) as td,
    ):
        tmp = Path(td)
        img = tmp / "image"
        img.mkdir()
        busybox = base / "rootfs" / "bin" / "busybox"
        # First stage initramfs: busybox, the module set, init.
        fs = tmp / "first"
        for d in ("bin", "lib/modules", "dev", "proc", "sys"):
            (fs / d).mkdir(parents=True)
        shutil.copy2(busybox, fs / "bin" / "busybox")
        for ko in (kernel / "modules").iterdir():
            shutil.copy2(ko, fs / "lib" / "modules" / ko.name)
        shutil.copy2(kernel / "modules.list", fs / "modules.list")
        shutil.copy2(HERE / "init.sh", fs / "init")
        (fs / "init").chmod(0o755)
        _initrd(fs, img / "initrd.img")
        # Floor initramfs for the benchmark.
        floor = tmp / "floor"
        for d in ("bin", "proc"):
            (floor / d).mkdir(parents=True)
        shutil.copy2(busybox, floor / "bin" / "busybox")
        shutil.copy2(HERE / "floor-init.sh", floor / "init")
        (floor / "init").chmod(0o755)
        _initrd(floor, img / "floor-initrd.img")
        # Root image: the base tree hard-linked (no copy), plus the agent, byte-compiled.
        stage = tmp / "root"
        _run(["cp", "-al", str(base / "rootfs"), str(stage)])
        dest = stage / "usr" / "lib" / "python3" / "dist-packages" / "cocoon" / "agent"
        dest.mkdir(parents=True)
        for src in agent_sources():
            shutil.copy2(src, dest / src.name)
        # The modules the agent loads once it serves (cocoon.agent.kmod), in the root image.
        mods = stage / "usr" / "lib" / "cocoon" / "modules"
        mods.mkdir(parents=True)
        for ko in (kernel / "late").iterdir():
            shutil.copy2(ko, mods / ko.name)
        shutil.copy2(kernel / "late-modules.list", mods.parent / "late-modules.list")
        _run(
            [
                "chroot",
                str(stage),
                "/usr/bin/python3",
                "-m",
                "compileall",
                "-q",
                "/usr/lib/python3/dist-packages/cocoon",
            ]
        )
        (stage / "etc" / "hostname").unlink(missing_ok=True)
        (stage / "etc" / "hostname").write_text("cocoon\n")
        size = int(_dir_bytes(stage) * 1.25) + 64 * 1024 * 1024
        size = (size + PMEM_ALIGN - 1) // PMEM_ALIGN * PMEM_ALIGN
        rootfs = img / "rootfs.img"
        with rootfs.open("wb") as f:
            f.truncate(size)
        _run(
            [
                "mkfs.ext4",
                "-q",
                "-F",
                "-O",
                "^has_journal",
                "-b",
                "4096",
                "-m",
                "0",
                "-L",
                "cocoon-root",
                "-E",
                "root_owner=0:0",
                "-d",
                str(stage),
                str(rootfs),
            ]
        )
        shutil.copy2(kernel / "vmlinuz", img / "vmlinuz")
        sizes = {p.name: p.stat().st_size for p in img.iterdir()}
        manifest = {"key": key, "kernel_release": rel, "sizes": sizes, "built": time.time()}
        (img / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
        if out.exists():
            shutil.rmtree(out)
        img.rename(out)
    return out


@contextlib.contextmanager
def _locked(cache: Path) -> Iterator[None]:
    cache.mkdir(parents=True, exist_ok=True)
    with (cache / ".lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def image_dir(cache: Path) -> Path:
    return cache / f"image-{keys(load_inputs())[2]}"


def ensure(
    cache: Path, force: bool = False, out: Callable[[str], None] | None = None
) -> GuestImage:
    """The current image, built first if any input changed (or ``force``)."""
    say = out or (lambda s: print(s, file=sys.stderr, flush=True))
    inputs = load_inputs()
    kkey, bkey, ikey = keys(inputs)
    target = cache / f"image-{ikey}"
    if not force and (target / "manifest.json").exists():
        return GuestImage.load(target)
    if os.geteuid() != 0:
        raise ImageError("building the guest image needs root (mmdebstrap, chroot)")
    with _locked(cache):
        if not force and (target / "manifest.json").exists():
            return GuestImage.load(target)
        prog = Progress(say)
        t0 = time.monotonic()
        kspec = inputs["kernel"]
        assert isinstance(kspec, dict)
        kernel = build_kernel(cache, kkey, kspec, prog)
        base = build_base(cache, bkey, inputs["rootfs"], prog)  # type: ignore[arg-type]
        build_image(cache, ikey, kernel, base, str(kspec["release"]), prog)
        _prune(cache, {f"kernel-{kkey}", f"base-{bkey}", f"image-{ikey}"})
        say(f"[guest-image] ready in {time.monotonic() - t0:.1f}s: {target}")
    return GuestImage.load(target)


def _prune(cache: Path, keep: set[str]) -> None:
    """Drops layers of older inputs so the cache does not grow without bound."""
    for d in cache.iterdir():
        if (
            d.is_dir()
            and d.name.split("-")[0] in ("kernel", "base", "image")
            and d.name not in keep
        ):
            shutil.rmtree(d, ignore_errors=True)
