"""What each hardening switch costs: start time to agent-ready and host PSS of an idle sandbox,
with the switch on and off, alternated in pairs; median (min-max) of several runs.

Switches measured: ``hypervisor.seccomp_sandbox`` (QEMU's ``-sandbox on,...``) and
``hypervisor.rootless`` (non-root QEMU: a uid taken, QEMU started paused, checked, resumed):
start time and PSS; ``runtime.guest_seccomp`` (the guest profile for containers without
one): the time of a system-call-bound workload in the guest (``dd bs=1``, 200,000 reads and
writes), timed in the guest. The other hardening (umask 077 and 0600 sockets in the
monitor, the symlink-safe share walks, bounded reads of what the guest sends, the annotation
allowlist) has no switch: it is always on and costs a few system calls per operation, below
what these figures can show.

    python bench/hardening.py [--runs 3] [--json out.json]

Not a test: it asserts nothing and prints numbers.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script, like pods.py
from bench.run import COCOON, pss_kib
from cocoon.runtime import config as config_mod
from cocoon.runtime.container import busybox
from cocoon.runtime.monitor import launch as L
from cocoon.runtime.sandbox import launcher as sandbox


def once(cfg: config_mod.Config, root: Path, name: str) -> tuple[float, float]:
    """Seconds to agent-ready, and the idle sandbox's QEMU + monitor PSS in MiB."""
    t = time.monotonic()
    sb = sandbox.start(cfg, root, name)
    ready = time.monotonic() - t
    try:
        time.sleep(2)  # let the guest settle
        qemu = int((sb.dir / L.QEMU_PID).read_text())
        pss = (pss_kib(qemu) + pss_kib(sb.monitor_pid)) / 1024
    finally:
        sandbox.stop(root, name)
    return ready, pss


SYSCALLS = (  # busybox's date has no %N: the guest's uptime, to 10 ms, before and after
    "cut -d' ' -f1 /proc/uptime; dd if=/dev/zero of=/dev/null bs=1 count=200000 2>/dev/null; "
    "cut -d' ' -f1 /proc/uptime"
)


def guest_syscalls_s(work: Path, on: bool, i: int) -> float:
    """Seconds the syscall-bound workload takes in the guest, with the guest profile or not."""
    conf = work / f"gs-{int(on)}.toml"
    conf.write_text(f"[runtime]\nguest_seccomp = {'true' if on else 'false'}\n")
    b = busybox.make_bundle(work / f"gs-{i}-{int(on)}", ["sh", "-c", SYSCALLS])
    argv = [COCOON, "--root", str(work / "gs-root"), "--config", str(conf), "run"]
    out = subprocess.run(
        [*argv, "--bundle", str(b), f"gs{i}{int(on)}"],
        stdin=subprocess.DEVNULL, capture_output=True, text=True, check=True, timeout=300,
    ).stdout  # fmt: skip
    before, after = (float(x) for x in out.split()[-2:])
    return after - before


def summary(xs: list[float]) -> dict[str, float]:
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    cfg = config_mod.load().config

    def seccomp(on: bool) -> config_mod.Config:
        return dataclasses.replace(
            cfg, hypervisor=dataclasses.replace(cfg.hypervisor, seccomp_sandbox=on)
        )

    def rootless(on: bool) -> config_mod.Config:
        return dataclasses.replace(cfg, hypervisor=dataclasses.replace(cfg.hypervisor, rootless=on))

    switches: dict[str, Callable[[bool], config_mod.Config]] = {
        "seccomp_sandbox": seccomp,
        "rootless": rootless,
    }
    res: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="cocoon-bench-hard-") as td:
        for name, make in switches.items():
            rows: dict[str, list[float]] = {}
            for i in range(args.runs):
                for on in (True, False):
                    ready, pss = once(make(on), Path(td), f"h{os.getpid()}-{i}-{int(on)}")
                    rows.setdefault(f"ready_s_{'on' if on else 'off'}", []).append(ready)
                    rows.setdefault(f"pss_mib_{'on' if on else 'off'}", []).append(pss)
            rows["ready_ratio_on_over_off"] = [
                a / b for a, b in zip(rows["ready_s_on"], rows["ready_s_off"], strict=True)
            ]
            res[name] = {k: summary(v) for k, v in rows.items()}
        gs: dict[str, list[float]] = {}
        for i in range(args.runs):
            for on in (True, False):
                t = guest_syscalls_s(Path(td), on, i)
                gs.setdefault(f"dd_bs1_s_{'on' if on else 'off'}", []).append(t)
        gs["dd_ratio_on_over_off"] = [
            a / b for a, b in zip(gs["dd_bs1_s_on"], gs["dd_bs1_s_off"], strict=True)
        ]
        res["guest_seccomp"] = {k: summary(v) for k, v in gs.items()}
    for name, rows_s in res.items():
        print(f"{name}:")
        for k, s in rows_s.items():
            print(f"  {k:28} {s['median']:8.3f}  ({s['min']:.3f}-{s['max']:.3f})")
    if args.json:
        args.json.write_text(json.dumps(res, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
