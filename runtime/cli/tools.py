"""cocoon's own verbs (not runc's): check, env, image, sandbox, pool, template, demo.

``check`` says what this host can do, ``env`` prints the resolved configuration as TOML,
``image build|show`` the guest image, ``sandbox start|stop|status|details|list`` one VM under
a monitor without containers, ``pool status|fill|drain`` the pre-booted VMs, ``template
status|build|drop`` the VM template new VMs restore, and ``demo`` runs the embedded busybox
bundle in a new VM.
Each verb imports what it needs when it runs (the image builder, the lifecycle), so the CLI's
other verbs do not pay for them.

May import: the standard library, cocoon.guest_image (lazily), cocoon.runtime.{config,
errors, container (lazily), sandbox (lazily)}.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cocoon.runtime.errors import CocoonError

TYPE_CHECKING = False
if TYPE_CHECKING:  # imported where a verb loads the configuration, not by every CLI call
    from cocoon.runtime import config as config_mod


def add_parsers(sub: Any) -> None:
    sub.add_parser("check", help="what this host can and cannot do")
    sub.add_parser("env", help="the resolved configuration and paths, as TOML")

    img_p = sub.add_parser("image", help="the guest image")
    img = img_p.add_subparsers(dest="image_verb", parser_class=type(img_p), required=True)
    b = img.add_parser("build", help="build the guest image (cached by input hash)")
    b.add_argument("--force", action="store_true", help="rebuild even if cached")
    img.add_parser("show", help="print the current image's files")

    sb_p = sub.add_parser("sandbox", help="one VM under a monitor, no containers")
    sb = sb_p.add_subparsers(dest="sandbox_verb", parser_class=type(sb_p), required=True)
    s = sb.add_parser("start")
    s.add_argument("id")
    for name in ("stop", "status", "details"):
        x = sb.add_parser(name)
        x.add_argument("id")
    sb.add_parser("list")

    pool_p = sub.add_parser("pool", help="the pool of pre-booted VMs ([factory] pool_size)")
    pool = pool_p.add_subparsers(dest="pool_verb", parser_class=type(pool_p), required=True)
    pool.add_parser("status", help="the pooled VMs, as JSON")
    f = pool.add_parser("fill", help="boot VMs until the pool holds pool_size (stale ones go)")
    f.add_argument("--background", type=float, default=0.0, help=argparse.SUPPRESS)
    pool.add_parser("drain", help="stop every pooled VM no sandbox has claimed")

    tpl_p = sub.add_parser("template", help="the VM template new VMs restore ([factory] template)")
    tpl = tpl_p.add_subparsers(dest="template_verb", parser_class=type(tpl_p), required=True)
    tpl.add_parser("status", help="the template for this configuration, as JSON")
    tpl.add_parser("build", help="boot and save the template anew")
    tpl.add_parser("drop", help="remove every template")

    demo = sub.add_parser("demo", help="run a busybox container in a VM (the default bundle)")
    demo.add_argument("command", nargs=argparse.REMAINDER, help="what to run (default: a greeting)")


def load_config(args: argparse.Namespace) -> config_mod.Config:
    from cocoon.runtime import config as config_mod

    path = Path(args.config) if args.config else None
    return config_mod.load(path).config


def cmd_check(args: argparse.Namespace) -> int:
    from cocoon.guest_image import build as image_build
    from cocoon.runtime.sandbox import hostcheck, probe

    cfg = load_config(args)

    host = probe.RealHost()
    image_probe = hostcheck.default_image_probe(cfg)
    kvm_probe = None
    ok, _ = image_probe()
    if ok and not cfg.image.kernel:
        img = image_build.GuestImage.load(image_build.image_dir(Path(cfg.image.cache_dir)))
        kvm_probe = probe.kvm_prober(cfg, host, img.kernel, img.floor_initrd)
    checks = hostcheck.run_checks(cfg, host, image_probe, kvm_probe)
    checks.append(_pool_check(cfg, Path(args.root)))
    checks.append(_template_check(cfg, Path(args.root), built=ok))
    print(hostcheck.format_checks(checks))
    return hostcheck.exit_code(checks)


def _pool_check(cfg: config_mod.Config, root: Path) -> Any:
    """The pool's line of ``check``: how many VMs wait, and whether the host can hold them."""
    from cocoon.runtime.sandbox import hostcheck, launcher, pool

    size = cfg.factory.pool_size
    st = pool.status(cfg, root)
    detail = f"{st['ready']} ready, {st['booting']} booting of pool_size {size} in {root}"
    if st["stale"]:
        detail += f", {st['stale']} stale (the next fill removes them)"
    accel = "tcg" if cfg.hypervisor.accel == "tcg" else "kvm"
    try:
        pool.check_size(cfg, accel)
    except CocoonError as exc:
        return hostcheck.Check("pool", False, True, detail, str(exc))
    cost = pool.vm_cost_mib(cfg, accel)
    meaning = (
        f"create claims a pre-booted VM (~{cost} MiB each, host {launcher.host_memory_mib()} MiB)"
        if size
        else "no pool: every sandbox boots its VM (factory.pool_size)"
    )
    return hostcheck.Check("pool", True, False, detail, meaning)


def _template_check(cfg: config_mod.Config, root: Path, built: bool) -> Any:
    """The template's line of ``check``: off, or whether a template is ready to restore."""
    from cocoon.runtime.sandbox import hostcheck, launcher, template

    if not cfg.factory.template:
        return hostcheck.Check(
            "template", True, False, "off", "every sandbox boots its VM (factory.template)"
        )
    if not built:
        return hostcheck.Check(
            "template", False, False, "no guest image yet", "the first start builds both"
        )
    try:
        st = template.status(cfg, root, launcher.host_facts(cfg))
    except CocoonError as exc:
        return hostcheck.Check("template", False, False, str(exc), "sandboxes boot cold")
    if st["ready"]:
        meta = st["meta"]
        assert isinstance(meta, dict)
        detail = f"{st['key']} ready ({meta['memory_size'] // 2**20} MiB RAM) in {root}"
        return hostcheck.Check("template", True, False, detail, "sandboxes are restored from it")
    why = st["failed"] or st["why_not"]
    return hostcheck.Check(
        "template", False, False, f"{st['key']}: {why}", "the next start builds it, or boots cold"
    )


def cmd_env(args: argparse.Namespace) -> int:
    from cocoon.guest_image import build as image_build
    from cocoon.runtime import config as config_mod

    path = Path(args.config) if args.config else None
    loaded = config_mod.load(path)
    print("# sources: " + (", ".join(str(s) for s in loaded.sources) or "built-in defaults"))
    print("[paths]")
    print(f"root = {json.dumps(args.root)}")
    print(
        f"image_dir = {json.dumps(str(image_build.image_dir(Path(loaded.config.image.cache_dir))))}"
    )
    print(f"python = {json.dumps(sys.executable)}")
    print()
    print(config_mod.to_toml(loaded.config), end="")
    return 0


def cmd_image(args: argparse.Namespace) -> int:
    from cocoon.guest_image import build as image_build

    cfg = load_config(args)
    cache = Path(cfg.image.cache_dir)
    try:
        if args.image_verb == "build":
            img = image_build.ensure(cache, force=args.force)
        else:
            img = image_build.GuestImage.load(image_build.image_dir(cache))
    except image_build.ImageError as exc:
        raise CocoonError(str(exc)) from exc
    for name in ("kernel", "initrd", "rootfs", "floor_initrd"):
        print(f"{name:13} {getattr(img, name)}")
    print(f"{'kernel_release':13} {img.kernel_release}")
    return 0


def cmd_sandbox(args: argparse.Namespace) -> int:
    from cocoon.runtime.sandbox import client, paths
    from cocoon.runtime.sandbox import launcher as sandbox

    root = Path(args.root)
    verb = args.sandbox_verb
    if verb == "list":
        for sid in sandbox.list_sandboxes(root):
            print(sid)
        return 0
    if verb == "start":  # as create's: from the pool when it has a VM, else restored or booted
        from cocoon.runtime.sandbox import pool

        sb = pool.start(
            load_config(args),
            root,
            args.id,
            log_file=Path(args.log) if args.log else None,
            log_format=args.log_format,
            debug=args.debug,
        )
        print(
            json.dumps(
                {
                    "id": sb.sandbox_id,
                    "monitor_pid": sb.monitor_pid,
                    "boot_seconds": round(sb.boot_seconds, 3),
                    "accel": sb.accel,
                    "pooled": sb.pooled,
                    "restored": sb.restored,
                    "restore_failure": sb.restore_failure,
                }
            )
        )
        return 0
    if verb == "stop":
        cfg = load_config(args)
        print(sandbox.stop(root, args.id, cfg.runtime.shutdown_timeout_s))
        return 0
    with client.Client(paths.sandbox_dir(root, args.id)) as c:
        try:
            msg = c.vm.Status() if verb == "status" else c.agent.GetGuestDetails()
        except client.CallError as exc:
            raise client.rpc_error(f"sandbox {args.id}", exc) from exc
        print(json.dumps(msg, indent=2))
    return 0


def cmd_pool(args: argparse.Namespace) -> int:
    from cocoon.runtime.container.warm import warm_vm
    from cocoon.runtime.sandbox import pool

    root = Path(args.root)
    cfg = load_config(args)
    if args.pool_verb == "status":
        print(json.dumps(pool.status(cfg, root), indent=1))
    elif args.pool_verb == "drain":
        print(json.dumps({"stopped": pool.drain(root)}))
    elif args.background:
        pool.background_fill(cfg, root, args.background, warm=warm_vm)
    else:
        counts = pool.fill(cfg, root, warm=warm_vm)
        print(json.dumps(counts))
        if counts["failed"]:
            raise CocoonError(f"pool fill: a VM failed to boot (see {args.log or 'the log'})")
    return 0


def cmd_template(args: argparse.Namespace) -> int:
    from cocoon.runtime.sandbox import launcher, template

    root = Path(args.root)
    cfg = load_config(args)
    if args.template_verb == "drop":
        print(json.dumps({"removed": template.drop(root)}))
        return 0
    host = launcher.host_facts(cfg)
    if args.template_verb == "build":
        d = template.build(cfg, root, host)
        print(json.dumps({"built": str(d)}))
    else:
        print(json.dumps(template.status(cfg, root, host), indent=1))
    return 0


DEMO_SCRIPT = (
    'echo "hello from a container inside a cocoon VM"; '
    'echo "  guest kernel: $(uname -r)"; echo "  CPUs: $(nproc)"; '
    'echo "  memory: $(grep MemTotal /proc/meminfo | tr -s " " | cut -d" " -f2-3)"; '
    'echo "  hostname: $(hostname), pid $$, uid $(id -u)"'
)


def cmd_demo(args: argparse.Namespace) -> int:
    """``run`` of the embedded default bundle (busybox from the host) in a fresh sandbox."""
    import shutil
    import tempfile
    import uuid

    from cocoon.runtime.container import busybox
    from cocoon.runtime.container import lifecycle as lc
    from cocoon.runtime.container.state import Ctx

    cfg = load_config(args)
    command = [c for c in args.command if c != "--"] or ["sh", "-c", DEMO_SCRIPT]
    cid = f"demo-{uuid.uuid4().hex[:8]}"
    work = Path(tempfile.mkdtemp(prefix="cocoon-demo-"))
    try:
        # A command of the user's own on a terminal (`cocoon demo sh`) gets a terminal.
        tty = bool(args.command) and os.isatty(0) and os.isatty(1)
        bundle = busybox.make_bundle(work, command, terminal=tty)
        print(
            f"host kernel: {os.uname().release}; running {cid} (first use builds the guest "
            "image) ...",
            flush=True,
        )
        ctx = Ctx(
            cfg, Path(args.root), Path(args.log) if args.log else None, args.log_format, args.debug
        )
        status = lc.run_foreground(ctx, cid, bundle, None, None, detach=False)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"container {cid} exited with status {status}; its VM is gone")
    return status


VERBS: dict[str, Callable[[argparse.Namespace], int]] = {
    "check": cmd_check,
    "env": cmd_env,
    "image": cmd_image,
    "sandbox": cmd_sandbox,
    "pool": cmd_pool,
    "template": cmd_template,
    "demo": cmd_demo,
}
