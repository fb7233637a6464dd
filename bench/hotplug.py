"""Hot-plug latency, QMP command to guest-visible, next to the floor of one QMP round trip
through the monitor; median (min-max) of several runs on one sandbox.

Rows: vCPU add (device_add + the agent onlining it), vCPU offline, memory grow and shrink
(virtio-mem resize until the device reports the new size), disk attach (blockdev-add +
scsi-hd + the agent seeing /dev/sdX) and detach (device_del until DEVICE_DELETED +
blockdev-del). The floor is `query-status` over the same monitor socket, so each ratio is what
the hot-plug costs over just asking QEMU something.

    python bench/hotplug.py [--runs 5] [--json out.json]

Not a test: it asserts nothing and prints numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from cocoon.runtime import config as config_mod
from cocoon.runtime.sandbox import launcher as sandbox


def timed(fn: Callable[[], object]) -> float:
    t = time.monotonic()
    fn()
    return time.monotonic() - t


def summary(xs: list[float]) -> dict[str, float]:
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    cfg = config_mod.Config()
    can_cpu = (os.cpu_count() or 1) >= 2
    rows: dict[str, list[float]] = {"floor: QMP round trip": []}
    with tempfile.TemporaryDirectory(prefix="cocoon-bench-") as td:
        root = Path(td)
        img = root / "disk.img"
        with open(img, "wb") as f:
            f.truncate(64 << 20)
        sb = sandbox.start(cfg, root, "bench-hp")
        try:
            with sb.client(60) as c:
                for i in range(args.runs):
                    rows["floor: QMP round trip"].append(
                        timed(lambda: c.vm.Qmp({"command": "query-status"}))
                    )
                    if can_cpu:
                        r = c.vm.Resize({"vcpus": 2, "memory_mib": 256}, timeout=60)
                        rows.setdefault("vCPU add + online", []).append(r["seconds"]["cpu"])
                        r = c.vm.Resize({"vcpus": 1, "memory_mib": 256}, timeout=60)
                        rows.setdefault("vCPU offline", []).append(r["seconds"]["cpu"])
                    r = c.vm.Resize({"vcpus": 1, "memory_mib": 768}, timeout=60)
                    rows.setdefault("memory +512 MiB", []).append(r["seconds"]["memory"])
                    r = c.vm.Resize({"vcpus": 1, "memory_mib": 256}, timeout=60)
                    rows.setdefault("memory -512 MiB", []).append(r["seconds"]["memory"])
                    d = c.vm.AttachDisk({"id": f"b{i}", "path": str(img)}, timeout=60)
                    rows.setdefault("disk attach (scsi-hd)", []).append(
                        d["seconds"]["qmp"] + d["seconds"]["guest"]
                    )
                    t = time.monotonic()
                    c.vm.DetachDisk({"id": f"b{i}"}, timeout=60)
                    rows.setdefault("disk detach", []).append(time.monotonic() - t)
        finally:
            sandbox.stop(root, "bench-hp")
    floor = statistics.median(rows["floor: QMP round trip"])
    out = {
        name: {**summary(xs), "x_floor": statistics.median(xs) / floor} for name, xs in rows.items()
    }
    print(f"hot-plug latency, QMP command to guest-visible ({args.runs} runs, median (min-max))")
    for name, s in out.items():
        print(
            f"  {name:24s} {s['median'] * 1000:8.1f} ms  ({s['min'] * 1000:.1f}-"
            f"{s['max'] * 1000:.1f})  {s['x_floor']:7.1f}x floor"
        )
    if not can_cpu:
        print("  (vCPU rows skipped: the host has one CPU, so the VM can hold only one vCPU)")
    if args.json:
        args.json.write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
