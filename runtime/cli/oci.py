"""The runc verbs: argument grammar and one short function each, over container.lifecycle.

May import: the standard library, cocoon.runtime.{config, errors, container.{spec, state},
container.{create, lifecycle} (lazily: they load the sandbox), container.execproc
(lazily)}.
"""

from __future__ import annotations

import argparse
import json
import re
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cocoon.runtime.container import spec as specmod
from cocoon.runtime.container import state as statemod
from cocoon.runtime.container.spec import default_spec
from cocoon.runtime.container.state import Ctx
from cocoon.runtime.errors import SpecError, UsageError

TYPE_CHECKING = False
if TYPE_CHECKING:  # loaded on first use, by the verbs that read the configuration
    from cocoon.runtime.config import Config

    Loader = Callable[[], Config]


def parse_signal(text: str) -> int:
    t = text.strip().upper()
    if t.isascii() and t.isdigit():
        n = int(t) if len(t) <= 4 else 0  # not int() of 5000 digits: a ValueError
        if n in {s.value for s in signal.valid_signals() if isinstance(s, signal.Signals)} or (
            signal.SIGRTMIN <= n <= signal.SIGRTMAX
        ):
            return n
        raise UsageError(f"unknown signal {_short(text)}")
    name = t if t.startswith("SIG") else "SIG" + t
    try:
        return int(signal.Signals[name])
    except KeyError:
        raise UsageError(f"unknown signal {_short(text)}") from None


def _short(text: str) -> str:
    """A user's argument quoted in an error, cut short when it is long."""
    return repr(text) if len(text) <= 80 else repr(text[:80]) + "..."


# docker/go-units RAMInBytes, which runc's update uses: decimals, binary k..p, optional "iB"
_SIZE = re.compile(r"^(\d+(?:\.\d+)?) ?([kmgtp]?)i?b?$", re.I)


def parse_size(text: str) -> int:
    m = _SIZE.match(text.strip())
    if not m:
        raise UsageError(f"invalid size {text!r} (use e.g. 268435456, 256M, 1G)")
    mult: int = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40, "p": 1 << 50}[
        m.group(2).lower()
    ]
    if len(m.group(1)) > 30:  # int() refuses 4300 digits; no size has 30
        raise UsageError(f"invalid size {_short(text)}: too large")
    whole, _, frac = str(m.group(1)).partition(".")
    if not frac:
        return int(whole) * mult
    scale = int("1" + "0" * len(frac))
    return int(whole) * mult + int(frac) * mult // scale  # exact, no float


def add_parsers(sub: Any) -> None:
    p = sub.add_parser("create", help="create a container")
    p.add_argument("--bundle", "-b", default=".")
    p.add_argument("--console-socket")
    p.add_argument("--pid-file")
    p.add_argument("--no-pivot", action="store_true")
    p.add_argument("--no-new-keyring", action="store_true")
    p.add_argument("--preserve-fds", type=int, default=0)
    p.add_argument("id")

    p = sub.add_parser("run", help="create and start a container")
    p.add_argument("--bundle", "-b", default=".")
    p.add_argument("--console-socket")
    p.add_argument("--pid-file")
    p.add_argument("--detach", "-d", action="store_true")
    p.add_argument("--keep", action="store_true", help="do not delete the container when it exits")
    p.add_argument("--no-pivot", action="store_true")
    p.add_argument("--no-new-keyring", action="store_true")
    p.add_argument("--preserve-fds", type=int, default=0)
    p.add_argument("id")

    for verb in ("start", "state", "pause", "resume"):
        sub.add_parser(verb).add_argument("id")

    p = sub.add_parser("kill")
    p.add_argument("--all", "-a", action="store_true")
    p.add_argument("id")
    p.add_argument("signal", nargs="?", default="SIGTERM")

    p = sub.add_parser("delete")
    p.add_argument("--force", "-f", action="store_true")
    p.add_argument("id")

    p = sub.add_parser("exec")
    p.add_argument("--process", "-p")
    p.add_argument("--detach", "-d", action="store_true")
    p.add_argument("--pid-file")
    p.add_argument("--tty", "-t", action="store_true")
    p.add_argument("--console-socket")
    p.add_argument("--cwd")
    p.add_argument("--env", "-e", action="append", default=[])
    p.add_argument("--user", "-u")
    p.add_argument("--additional-gids", "-g", action="append", default=[])
    p.add_argument("--cap", "-c", action="append", default=[])
    p.add_argument("--no-new-privs", action="store_true")
    p.add_argument("--apparmor")
    p.add_argument("--process-label")
    p.add_argument("--preserve-fds", type=int, default=0)
    p.add_argument("--ignore-paused", action="store_true")
    p.add_argument("--cgroup")
    p.add_argument("id")
    p.add_argument("command", nargs=argparse.REMAINDER)

    p = sub.add_parser("ps")
    p.add_argument("--format", "-f", choices=("table", "json"), default="table")
    p.add_argument("id")
    p.add_argument("ps_args", nargs=argparse.REMAINDER)

    p = sub.add_parser("list")
    p.add_argument("--format", "-f", choices=("table", "json"), default="table")
    p.add_argument("--quiet", "-q", action="store_true")

    p = sub.add_parser("update")
    p.add_argument("--resources", "-r")
    for flag in (
        "--memory",
        "--memory-swap",
        "--memory-reservation",
        "--kernel-memory",
        "--kernel-memory-tcp",
    ):
        p.add_argument(flag)
    for flag in (
        "--cpu-shares",
        "--cpu-period",
        "--cpu-quota",
        "--cpu-rt-period",
        "--cpu-rt-runtime",
        "--pids-limit",
        "--blkio-weight",
    ):
        p.add_argument(flag, type=int)
    p.add_argument("--cpuset-cpus")
    p.add_argument("--cpuset-mems")
    p.add_argument("id")

    p = sub.add_parser("events")
    p.add_argument("--stats", action="store_true")
    p.add_argument("--interval", default="5s")
    p.add_argument("id")

    p = sub.add_parser("spec")
    p.add_argument("--bundle", "-b", default=".")
    p.add_argument("--rootless", action="store_true")

    sub.add_parser("features")


def _ctx(args: argparse.Namespace, cfg: Loader) -> Ctx:
    return Ctx(
        cfg, Path(args.root), Path(args.log) if args.log else None, args.log_format, args.debug
    )


def _pid_file(args: argparse.Namespace) -> Path | None:
    return Path(args.pid_file).absolute() if args.pid_file else None


def cmd_create(args: argparse.Namespace, cfg: Loader) -> int:
    from cocoon.runtime.container import create

    create.create(_ctx(args, cfg), args.id, Path(args.bundle), _pid_file(args), args.console_socket)
    return 0


def cmd_run(args: argparse.Namespace, cfg: Loader) -> int:
    from cocoon.runtime.container import lifecycle as lc

    return lc.run_foreground(
        _ctx(args, cfg),
        args.id,
        Path(args.bundle),
        _pid_file(args),
        args.console_socket,
        args.detach,
        keep=args.keep,
    )


def cmd_start(args: argparse.Namespace, cfg: Loader) -> int:
    from cocoon.runtime.container import lifecycle as lc

    lc.start(_ctx(args, cfg), args.id)
    return 0


def cmd_state(args: argparse.Namespace, cfg: Loader) -> int:
    print(json.dumps(statemod.state(_ctx(args, cfg), args.id), indent=2))
    return 0


def cmd_kill(args: argparse.Namespace, cfg: Loader) -> int:
    from cocoon.runtime.container import lifecycle as lc

    lc.kill(_ctx(args, cfg), args.id, parse_signal(args.signal), args.all)
    return 0


def cmd_delete(args: argparse.Namespace, cfg: Loader) -> int:
    from cocoon.runtime.container import lifecycle as lc

    lc.delete(_ctx(args, cfg), args.id, args.force)
    return 0


def cmd_pause(args: argparse.Namespace, cfg: Loader) -> int:
    from cocoon.runtime.container import lifecycle as lc

    lc.simple(_ctx(args, cfg), args.id, "pause")
    return 0


def cmd_resume(args: argparse.Namespace, cfg: Loader) -> int:
    from cocoon.runtime.container import lifecycle as lc

    lc.simple(_ctx(args, cfg), args.id, "resume")
    return 0


def _read_stdin() -> bytes:
    buf = getattr(sys.stdin, "buffer", None)
    if buf is not None:
        return bytes(buf.read())
    return sys.stdin.read().encode("utf-8", "surrogateescape")  # a text stream (tests)


def _read_json_arg(src: str, what: str) -> Any:
    try:
        raw = _read_stdin() if src == "-" else Path(src).read_bytes()
    except OSError as exc:
        raise UsageError(f"{what} {src}: {exc.strerror}") from exc
    try:
        return specmod.parse_json(raw, f"{what} {src}")
    except SpecError as exc:
        raise UsageError(str(exc)) from None


def cmd_exec(args: argparse.Namespace, cfg: Loader) -> int:
    from cocoon.runtime.container import execproc

    ctx = _ctx(args, cfg)
    if args.process:
        process = _read_json_arg(args.process, "process file")
        if not isinstance(process, dict):
            raise UsageError(f"process file {args.process}: must be a JSON object")
    else:
        cmd = [c for c in args.command if c != "--"] if args.command[:1] == ["--"] else args.command
        if not cmd:
            raise UsageError("exec: no command given (args or --process FILE)")
        st = ctx.store.load(args.id)
        base = specmod.load_bundle(Path(st.bundle)).spec.get("process") or {}
        process = execproc.build_process(base, cmd, args.tty, args.env, args.cwd, args.user)
    return execproc.exec_process(
        ctx, args.id, process, args.detach, _pid_file(args), args.console_socket
    )


def cmd_ps(args: argparse.Namespace, cfg: Loader) -> int:
    from cocoon.runtime.container import lifecycle as lc

    pids = lc.host_pids(_ctx(args, cfg), args.id)
    if args.format == "json":
        print(json.dumps(pids))
        return 0
    ps_args = [a for a in args.ps_args if a != "--"] or ["-ef"]
    import subprocess

    out = subprocess.run(["ps", *ps_args], capture_output=True, text=True, check=False).stdout
    lines = out.splitlines()
    if not lines:
        return 0
    header = lines[0].split()
    col = header.index("PID") if "PID" in header else 1
    print(lines[0])
    for line in lines[1:]:
        fields = line.split()
        if len(fields) > col and fields[col].isdigit() and int(fields[col]) in pids:
            print(line)
    return 0


def cmd_list(args: argparse.Namespace, cfg: Loader) -> int:
    states = [s.oci() for s in statemod.list_states(_ctx(args, cfg))]
    if args.quiet:
        for s in states:
            print(s["id"])
    elif args.format == "json":
        print(json.dumps(states))
    else:
        rows = [("ID", "PID", "STATUS", "BUNDLE", "CREATED", "OWNER")]
        rows += [
            (s["id"], str(s["pid"]), s["status"], s["bundle"], s["created"], s["owner"])
            for s in states
        ]
        widths = [max(len(r[i]) for r in rows) for i in range(6)]
        for r in rows:
            print("   ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)).rstrip())
    return 0


def _update_resources(args: argparse.Namespace) -> dict[str, Any]:
    if args.resources:
        given = _read_json_arg(args.resources, "resources")
        if not isinstance(given, dict):
            raise UsageError("resources: must be a JSON object (OCI LinuxResources)")
        # Kernel memory has no cgroup v2 knob (the guest's): runc ignores these keys there,
        # crun refuses them, and dockerd 20.10 sends "kernel": 0 with every `docker update`.
        if isinstance(given.get("memory"), dict):
            for key in ("kernel", "kernelTCP"):
                given["memory"].pop(key, None)
        return given
    res: dict[str, Any] = {}
    mem = {
        k: -1 if v.strip() == "-1" else parse_size(v)  # -1: unlimited, as runc takes it
        for k, v in (
            ("limit", args.memory),
            ("swap", args.memory_swap),
            ("reservation", args.memory_reservation),
        )
        if v
    }
    if mem:
        res["memory"] = mem
    cpu = {
        k: v
        for k, v in (
            ("shares", args.cpu_shares),
            ("period", args.cpu_period),
            ("quota", args.cpu_quota),
            ("realtimePeriod", args.cpu_rt_period),
            ("realtimeRuntime", args.cpu_rt_runtime),
            ("cpus", args.cpuset_cpus),
            ("mems", args.cpuset_mems),
        )
        if v is not None
    }
    if cpu:
        res["cpu"] = cpu
    if args.pids_limit is not None:
        res["pids"] = {"limit": args.pids_limit}
    if args.blkio_weight is not None:
        res["blockIO"] = {"weight": args.blkio_weight}
    if not res:
        raise UsageError("update: nothing to update (give --resources or a resource flag)")
    return res


def cmd_update(args: argparse.Namespace, cfg: Loader) -> int:
    from cocoon.runtime.container import lifecycle as lc

    lc.update(_ctx(args, cfg), args.id, _update_resources(args))
    return 0


def _interval(text: str) -> float:
    m = re.match(r"^(\d+(?:\.\d+)?)(ms|s|m)?$", text)
    if not m:
        raise UsageError(f"invalid interval {text!r} (e.g. 5s, 500ms)")
    return float(m.group(1)) * {"ms": 0.001, "s": 1.0, "m": 60.0}[m.group(2) or "s"]


def cmd_events(args: argparse.Namespace, cfg: Loader) -> int:
    from cocoon.runtime.container import lifecycle as lc

    ctx = _ctx(args, cfg)
    interval = _interval(args.interval)
    while True:
        data = lc.stats(ctx, args.id)
        print(json.dumps({"type": "stats", "id": args.id, "data": data}), flush=True)
        if args.stats:
            return 0
        time.sleep(interval)


def cmd_spec(args: argparse.Namespace, cfg: Loader) -> int:
    target = Path(args.bundle) / "config.json"
    if target.exists():
        raise UsageError(f"{target} exists: remove it first")
    try:
        target.write_text(json.dumps(default_spec(args.rootless), indent="\t") + "\n")
    except OSError as exc:
        raise UsageError(f"{target}: {exc.strerror}") from None
    return 0


def cmd_features(args: argparse.Namespace, cfg: Loader) -> int:
    features = {
        "ociVersionMin": "1.0.0",
        "ociVersionMax": "1.1.0",
        "hooks": [
            "prestart",
            "createRuntime",
            "createContainer",
            "startContainer",
            "poststart",
            "poststop",
        ],
        "mountOptions": ["bind", "rbind", "ro", "rw", "nosuid", "nodev", "noexec"],
        "linux": {
            "namespaces": ["cgroup", "ipc", "mount", "network", "pid", "user", "uts"],
            "cgroup": {"v1": False, "v2": True, "systemd": False, "systemdUser": False},
            "seccomp": {"enabled": True},
            "apparmor": {"enabled": False},
            "selinux": {"enabled": False},
        },
        "annotations": {
            "io.github.cocoon.runtime": "vm",
            "org.opencontainers.runc.version": "cocoon",
        },
    }
    print(json.dumps(features, indent=2))
    return 0


VERBS: dict[str, Callable[[argparse.Namespace, Loader], int]] = {
    "create": cmd_create,
    "run": cmd_run,
    "start": cmd_start,
    "state": cmd_state,
    "kill": cmd_kill,
    "delete": cmd_delete,
    "pause": cmd_pause,
    "resume": cmd_resume,
    "exec": cmd_exec,
    "ps": cmd_ps,
    "list": cmd_list,
    "update": cmd_update,
    "events": cmd_events,
    "spec": cmd_spec,
    "features": cmd_features,
}
