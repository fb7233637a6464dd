"""Time to agent-ready next to the floor, as a ratio; median (min-max) of several runs.

The floor is the same QEMU binary, machine, kernel, memory and accel with an init that only
prints and powers off (the image's floor-initrd.img): the least any guest on this host can
cost. cocoon's figure is ``sandbox.start()`` from call to return (monitor start, QEMU, kernel,
first stage, agent answering), measured in pairs alternating with the floor.

    python bench/boot.py [--runs 5] [--json out.json]

Not a test: it asserts nothing and prints numbers.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

from cocoon.runtime import config as config_mod
from cocoon.runtime.sandbox import launcher as sandbox
from cocoon.runtime.sandbox import qemu_argv


def floor_once(cfg: config_mod.Config, files: sandbox.GuestFiles, accel: str) -> float:
    assert files.floor_initrd is not None
    with tempfile.TemporaryDirectory() as td:
        plain = dataclasses.replace(
            cfg, hypervisor=dataclasses.replace(cfg.hypervisor, shared_fs="none", rootless=False)
        )
        plan = qemu_argv.plan(
            plain,
            sandbox_id="floor",
            state_dir=Path(td),
            kernel=files.kernel,
            initrd=files.floor_initrd,
            rootfs_image=files.rootfs,
            rootfs_size=files.rootfs.stat().st_size,
            accel=accel,
            channel="virtio-serial",
            seccomp=False,
            host_cpus=os.cpu_count() or 1,
            host_memory_mib=sandbox.host_memory_mib(),
        )
        argv = qemu_argv.build_argv(plan)
        t = time.monotonic()
        subprocess.run(
            argv, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=120
        )
        dt = time.monotonic() - t
        if "cocoon-floor:" not in (Path(td) / "console.log").read_text(errors="replace"):
            raise RuntimeError("floor guest did not reach its init")
        return dt


def cocoon_once(cfg: config_mod.Config, root: Path, i: int) -> tuple[float, float, float]:
    t = time.monotonic()
    sb = sandbox.start(cfg, root, f"bench-{os.getpid()}-{i}")
    ready = time.monotonic() - t
    with sb.client() as c:
        d = c.agent.GetGuestDetails(timeout=30)
    t = time.monotonic()
    sandbox.stop(root, sb.sandbox_id)
    stop = time.monotonic() - t
    return ready, d["agent_ready_uptime_seconds"], stop


def summary(xs: list[float]) -> dict[str, float]:
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs)}


def fmt(s: dict[str, float]) -> str:
    return f"{s['median']:6.2f}s  ({s['min']:.2f}-{s['max']:.2f})"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    cfg = config_mod.load().config
    files = sandbox.guest_files(cfg)
    accel, why, _, _ = sandbox.resolve_host(cfg, files)
    floor: list[float] = []
    ready: list[float] = []
    guest_ready: list[float] = []
    stops: list[float] = []
    with tempfile.TemporaryDirectory() as root:
        for i in range(args.runs):
            floor.append(floor_once(cfg, files, accel))
            r, g, s = cocoon_once(cfg, Path(root), i)
            ready.append(r)
            guest_ready.append(g)
            stops.append(s)
    ratios = [r / f for r, f in zip(ready, floor, strict=True)]
    result = {
        "accel": accel,
        "accel_note": why,
        "runs": args.runs,
        "floor_s": summary(floor),
        "agent_ready_s": summary(ready),
        "agent_ready_guest_uptime_s": summary(guest_ready),
        "stop_s": summary(stops),
        "ratio_agent_ready_over_floor": summary(ratios),
    }
    print(f"accel: {accel}" + (f"  ({why})" if why else ""))
    print(f"floor (QEMU start -> init powers off)     {fmt(result['floor_s'])}")
    print(f"cocoon start -> agent answering            {fmt(result['agent_ready_s'])}")
    print(f"  of which guest kernel start -> serving   {fmt(result['agent_ready_guest_uptime_s'])}")
    print(f"cocoon orderly stop                        {fmt(result['stop_s'])}")
    r = result["ratio_agent_ready_over_floor"]
    print(
        f"ratio agent-ready / floor                  {r['median']:6.2f}x  "
        f"({r['min']:.2f}-{r['max']:.2f}), median of {args.runs} alternating pairs"
    )
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
