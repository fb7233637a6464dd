"""Template VMs (``[factory] template = true``): one VM booted and saved, new ones restored.

A template is the directory ``<root>/template/<key>/``: ``memory`` (the template VM's RAM, a
sparse file), ``state`` (QEMU's device state, ~0.5 MiB) and ``meta.json`` (the key, both
files' sizes, the state's sha256, when it was made). The key is a hash of what the template
VM was booted from: QEMU's argv with the sandbox's own paths left out, the launch settings and
the guest files as they are on disk (``launcher.boot_key``, as the pool's). A template whose
key is not the current configuration's is never restored, and the next build removes it; one
whose files do not match its meta (truncated, replaced) is removed and rebuilt.

``ensure`` returns the current template, building it first when there is none: under
``<root>/template/build.lock`` (one build at a time; concurrent starts wait and then use it),
a VM is booted to agent-ready in a build directory and its monitor saves it into
``<key>.new`` (monitor.snapshot), which is renamed into place once its meta is written. A
build that fails is logged, remembered for ``RETRY_AFTER_S`` (``<key>.failed``: starts meanwhile
do not retry it) and the sandbox boots cold; so does a restore that fails in the monitor.

May import: the standard library, cocoon.runtime.{config, errors, monitor.launch},
cocoon.runtime.sandbox.{hostmount, launcher}.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import secrets
import time
from collections.abc import Iterator
from pathlib import Path

from cocoon.runtime import config as config_mod
from cocoon.runtime.errors import CocoonError, HostError
from cocoon.runtime.monitor import launch as L
from cocoon.runtime.sandbox import hostmount, launcher

log = logging.getLogger("cocoon")

LOCK = "build.lock"
RETRY_AFTER_S = 300.0  # a failed build is not retried by starts within this time


def template_root(root: Path) -> Path:
    return root.absolute() / "template"


def key(cfg: config_mod.Config, host: launcher.HostFacts) -> str:
    """What the template VM is booted from, as a hash (the name of its directory)."""
    return launcher.boot_key(
        cfg, host, Path("/template/vm"), "template", save_to=Path("/template/out")
    )


def _sha256(p: Path) -> str:
    with open(p, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def check(d: Path, want: str) -> str:
    """Why the template in ``d`` cannot be restored for key ``want``, or "" if it can."""
    try:
        meta = json.loads((d / L.TEMPLATE_META).read_text())
        if not isinstance(meta, dict):
            return "meta.json is not an object"
        if meta.get("key") != want:
            return f"made for key {meta.get('key')!r}, not {want!r}"
        mem = (d / L.TEMPLATE_MEMORY).stat().st_size
        if mem != meta.get("memory_size"):
            return f"memory is {mem} bytes, its meta says {meta.get('memory_size')}"
        state = d / L.TEMPLATE_STATE
        if state.stat().st_size != meta.get("state_size") or _sha256(state) != meta.get(
            "state_sha256"
        ):
            return "state does not match its meta (truncated or replaced)"
    except FileNotFoundError as exc:
        return f"{Path(exc.filename or '?').name} is missing"
    except (OSError, ValueError) as exc:
        return f"unreadable: {exc}"
    return ""


@contextlib.contextmanager
def _locked(root: Path) -> Iterator[None]:
    base = template_root(root)
    base.mkdir(parents=True, exist_ok=True, mode=0o700)
    with open(base / LOCK, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        yield


def ensure(cfg: config_mod.Config, root: Path, host: launcher.HostFacts) -> Path | None:
    """The template to restore for this configuration (built first if there is none), or None
    when there is none to be had: the caller boots cold."""
    want = key(cfg, host)
    d = template_root(root) / want
    if not check(d, want):
        return d
    with _locked(root):
        why = check(d, want)
        if not why:
            return d  # built by another start while this one waited
        failed = template_root(root) / f"{want}.failed"
        with contextlib.suppress(OSError):
            if time.time() - failed.stat().st_mtime < RETRY_AFTER_S:
                log.warning(
                    "template %s failed to build recently (%s): booting cold",
                    want,
                    failed.read_text().strip(),
                )
                return None
        if d.exists():
            log.warning("template %s is unusable (%s): rebuilding it", want, why)
        try:
            return _build(cfg, root, host, want)
        except (CocoonError, OSError) as exc:
            log.warning("template %s could not be built (%s): booting cold", want, exc)
            with contextlib.suppress(OSError):
                failed.write_text(f"{exc}\n")
            return None


def build(cfg: config_mod.Config, root: Path, host: launcher.HostFacts) -> Path:
    """The template for this configuration built anew (``cocoon template build``)."""
    with _locked(root):
        return _build(cfg, root, host, key(cfg, host))


def _build(cfg: config_mod.Config, root: Path, host: launcher.HostFacts, want: str) -> Path:
    base = template_root(root)
    _drop_all(base, keep=set())  # other keys' templates, half-built ones, this key's broken one
    out = base / f"{want}.new"
    out.mkdir(mode=0o700)
    vmdir = base / f"b-{secrets.token_hex(4)}"
    try:
        launcher.check_socket_room(vmdir)
        t0 = time.monotonic()
        sb = launcher.boot(cfg, vmdir, f"template-{want}", host, save_to=out)
        if sb.process is not None:  # the monitor ends once the VM is saved
            sb.process.wait(60)
        meta = {
            "key": want,
            "memory_size": (out / L.TEMPLATE_MEMORY).stat().st_size,
            "state_size": (out / L.TEMPLATE_STATE).stat().st_size,
            "state_sha256": _sha256(out / L.TEMPLATE_STATE),
            "created": time.time(),
            "boot_seconds": sb.boot_seconds,
            "build_seconds": round(time.monotonic() - t0, 3),
            "kernel": str(host.files.kernel),
            "accel": host.accel,
        }
        (out / L.TEMPLATE_META).write_text(json.dumps(meta, indent=1) + "\n")
        os.rename(out, base / want)
    except BaseException:
        _remove(out)
        _remove(vmdir)
        raise
    with contextlib.suppress(FileNotFoundError):
        (base / f"{want}.failed").unlink()
    log.info("template %s built in %.1fs", want, meta["build_seconds"])
    return base / want


def _remove(d: Path) -> None:
    with contextlib.suppress(OSError, HostError):
        if d.is_dir() and not d.is_symlink():
            hostmount.safe_rmtree(d)
        else:
            d.unlink()


def _drop_all(base: Path, keep: set[str]) -> int:
    """Every template, build leftover and failure marker but ``keep``; returns how many."""
    n = 0
    for p in sorted(base.iterdir()) if base.is_dir() else ():
        if p.name == LOCK or p.name in keep:
            continue
        if p.name.startswith("b-") and launcher.our_monitor(p):
            with contextlib.suppress(CocoonError, OSError):  # a dead build's VM, still up
                launcher.stop_dir(p, 5.0)
        _remove(p)
        n += 1
    return n


def drop(root: Path) -> int:
    """Every template removed (``cocoon template drop``); returns how many entries went."""
    with _locked(root):
        return _drop_all(template_root(root), keep=set())


def status(cfg: config_mod.Config, root: Path, host: launcher.HostFacts) -> dict[str, object]:
    want = key(cfg, host)
    base = template_root(root)
    d = base / want
    why = check(d, want)
    meta: dict[str, object] = {}
    if not why:
        meta = json.loads((d / L.TEMPLATE_META).read_text())
    others = sorted(
        p.name for p in (base.iterdir() if base.is_dir() else ()) if p.name not in (LOCK, want)
    )
    failed = base / f"{want}.failed"
    return {
        "template": cfg.factory.template,
        "key": want,
        "ready": not why,
        "why_not": why,
        "dir": str(d),
        "meta": meta,
        "failed": failed.read_text().strip() if failed.exists() else "",
        "stale": others,
    }
