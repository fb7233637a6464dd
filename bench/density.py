"""Host footprint per idle pod (issue 14, item 3): N idle 1-container pods up at once, so
that what they share (the pmem root image's page cache, Python's and QEMU's code) divides
among them as it does on a busy host; host PSS per pod by process (QEMU, monitor, shim,
virtiofsd), the host's MemAvailable drop per pod, and idle pods per GiB.

    python bench/density.py [--pods 10] [--settle 10] [--template 1] [--memory MIB]
                            [--tb-size MIB] [--fork-monitors 0] [--ksm 1] [--json out.json]

``--template 1``: the pods' VMs are restored from a template ([factory] template) instead of
booted. ``--memory``: the VMs boot with that much RAM (``hypervisor.default_memory_mib``;
a container's limit above it is hot-plugged through virtio-mem). ``--tb-size``: TCG's
translation cache (``hypervisor.tcg_tb_size_mib``). ``--fork-monitors 0``: each monitor a
fresh interpreter (``runtime.fork_monitors = false``) instead of forked by the root's fork
server, whose PSS is counted per pod (``forkserver``: its PSS over the monitors it forked).
``--ksm 1``: the host's KSM turned on for the measurement (bench/ksm.py's fast scan), which
then waits for two full scans; the monitors offer their memory to it by default
(``runtime.mergeable_monitors``). The host's KSM settings are put back after.

Not a test: it asserts nothing and prints numbers.
"""

from __future__ import annotations

import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script, like pods.py
from bench import ksm as ksm_bench
from bench.run import Runtime, bench_args, idle_sandboxes, ksm_available, sandbox_pss_mib
from cocoon.runtime.container import busybox


def mem_available_mib() -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) / 1024
    return 0.0


def main() -> int:
    args = bench_args(
        __doc__, 1, pods=10, settle=10, template=0, memory=0, tb_size=0, fork_monitors=1, ksm=0
    )
    if args.ksm and not ksm_available():
        print("--ksm 1: KSM is not available on this host", file=sys.stderr)
        return 1
    res: dict[str, Any] = {
        "pods": args.pods,
        "template": bool(args.template),
        "fork_monitors": bool(args.fork_monitors),
        "ksm": bool(args.ksm),
    }
    with tempfile.TemporaryDirectory(prefix="cocoon-bench-density-") as td:
        work = Path(td)
        conf = None
        asked = {"default_memory_mib": args.memory, "tcg_tb_size_mib": args.tb_size}
        hyp = {k: v for k, v in asked.items() if v}
        toml = "".join(f"{k} = {v}\n" for k, v in hyp.items())
        if hyp:
            toml = "[hypervisor]\n" + toml
            res["hypervisor"] = hyp
        if args.template:  # pods restored from a template VM instead of booted
            toml += "[factory]\ntemplate = true\n"
        if not args.fork_monitors:  # each monitor a fresh interpreter
            toml += "[runtime]\nfork_monitors = false\n"
        if toml:
            conf = work / "bench.toml"
            conf.write_text(toml)
        rt = Runtime("cocoon", work / "root", conf)
        if args.template:
            subprocess.run([*rt.argv, "template", "build"], check=True, stdout=subprocess.DEVNULL)
        bundle = busybox.make_bundle(work / "idle", ["sleep", "100000"])
        before = mem_available_mib()
        with idle_sandboxes(rt, bundle, work, args.pods) as shims, contextlib.ExitStack() as on:
            time.sleep(args.settle)  # boot's freed pages reported back, caches settled
            if args.ksm:
                on.enter_context(ksm_bench.ksm_on())
                res["ksm_wait_s"] = ksm_bench.wait_scans(2)
                page_mib = os.sysconf("SC_PAGE_SIZE") / 2**20  # as bench/ksm.py counts them
                res["ksm_pages_sharing_mib"] = ksm_bench.ksm("pages_sharing") * page_mib
            per = [  # idle_sandboxes names them idle<pid>-<i>, in the order of the shims
                sandbox_pss_mib(rt, f"idle{os.getpid()}-{i}", shim) for i, shim in enumerate(shims)
            ]
            res["mem_available_drop_mib_per_pod"] = (before - mem_available_mib()) / args.pods
        if args.template:
            subprocess.run([*rt.argv, "template", "drop"], check=False, stdout=subprocess.DEVNULL)
    res["pss_mib_per_pod"] = {k: statistics.mean(p[k] for p in per) for k in per[0]}
    res["idle_pods_per_gib"] = 1024 / res["pss_mib_per_pod"]["total"]
    pss = res["pss_mib_per_pod"]
    print(f"{args.pods} idle 1-container pods, host PSS per pod (MiB, mean):")
    for k, v in pss.items():
        print(f"  {k:12} {v:7.1f}")
    own = pss["monitor"] + pss["shim"] + pss["forkserver"]
    print(f"  cocoon's own (monitor + shim + fork server's share): {own:.1f} MiB")
    print(f"MemAvailable drop per pod: {res['mem_available_drop_mib_per_pod']:.1f} MiB")
    print(f"idle pods per GiB (by PSS): {res['idle_pods_per_gib']:.2f}")
    if args.ksm:
        print(
            f"KSM on: two full scans in {res['ksm_wait_s']:.0f} s, "
            f"{res['ksm_pages_sharing_mib']:.1f} MiB of pages sharing"
        )
    if args.json:
        args.json.write_text(json.dumps(res, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
