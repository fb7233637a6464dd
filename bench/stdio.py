"""The data path (issue 14): stdout and stdin throughput and exec latency against runc and
against their floors inside the same guest, and what the shim and the monitor cost; median
(min-max) of several runs, pairs alternated.

Rows:
- stdout: 100 MiB written by ``dd`` through ``exec`` of a running container to the caller's
  pipe, cocoon and runc; the in-guest floor is ``dd | cat`` inside the same guest, timed there;
- stdin: 100 MiB from the caller's pipe through ``exec`` into ``cat > /dev/null``, cocoon and
  runc; its floor is the same in-guest ``dd | cat``;
- exec: ``exec ID true``, cocoon and runc; the in-guest floor is the guest's own
  ``crun exec`` of ``true``, timed in another sandbox's guest by a privileged container that
  enters its guest's mount namespace (as in bench/pool.py) and execs into itself. Measured
  before the transfers, in idle guests, each pair beside a floor taken the same moment (the
  ratio is per pair) and each after a second's settling; the first exec of each container is
  left out, as the floor's is;
- host PSS of the idle container's shim and of its sandbox's monitor.

    python bench/stdio.py [--runs 3] [--mib 100] [--json out.json]

Not a test: it asserts nothing and prints numbers.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script, like pods.py
from bench.pool import floor_bundle
from bench.run import Runtime, bench_args, forkserver_share_kib, pss_kib, summary
from cocoon.runtime.container import busybox

MIB = 1024 * 1024
SETTLE = 1.0  # seconds before each latency measurement
# In the guest, in PID 1's mount namespace: a pipe's floor, then crun exec's.
FLOOR_PIPE = (
    "nsenter -t 1 -m -- /bin/sh -c 'for i in $(seq N); do s=$(date +%s%N); "
    "dd if=/dev/zero bs=64k count=C 2>/dev/null | cat >/dev/null; e=$(date +%s%N); "
    "echo $(( (e - s) / 1000 )); done'"
)
FLOOR_EXEC = (
    "nsenter -t 1 -m -- /bin/sh -c 'for i in $(seq N); do s=$(date +%s%N); "
    "crun exec CID true; e=$(date +%s%N); echo $(( (e - s) / 1000 )); done'"
)


def timed(argv: list[str], stdin_mib: int = 0, want_stdout: int = -1) -> float:
    t = time.monotonic()
    p = subprocess.Popen(
        argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    assert p.stdin is not None and p.stdout is not None
    if stdin_mib:
        block = b"\0" * MIB
        for _ in range(stdin_mib):
            p.stdin.write(block)
    p.stdin.close()
    n = 0
    while chunk := p.stdout.read(MIB):
        n += len(chunk)
    p.wait(600)
    dt = time.monotonic() - t
    if p.returncode != 0 or (want_stdout >= 0 and n != want_stdout):
        raise RuntimeError(f"{argv}: status {p.returncode}, {n} bytes of stdout")
    return dt


def in_guest(rt: Runtime, cid: str, script: str) -> list[float]:
    out = subprocess.run(
        [*rt.argv, "exec", cid, "sh", "-c", script],
        capture_output=True, text=True, timeout=600, check=True,
    )  # fmt: skip
    return [int(x) / 1e6 for x in out.stdout.split()]


def main() -> int:
    args = bench_args(__doc__, mib=100)
    rows: dict[str, list[float]] = {}
    res: dict[str, Any] = {}
    mib = args.mib
    with tempfile.TemporaryDirectory(prefix="cocoon-bench-stdio-") as td:
        work = Path(td)
        coc, runc = Runtime("cocoon", work / "c-root"), Runtime("runc", work / "r-root")
        plain = busybox.make_bundle(work / "plain", ["sleep", "100000"])
        rts = (coc, runc)
        started: list[tuple[Runtime, str]] = []
        try:
            for rt in rts:
                pid_file = str(work / f"{rt.name}.pid")
                rt.call("create", "--bundle", str(plain), "--pid-file", pid_file, "s")
                started.append((rt, "s"))
                rt.call("start", "s")
            # privileged, in a guest of its own: it times the in-guest floors
            coc.call("create", "--bundle", str(floor_bundle(work)), "fl")
            started.append((coc, "fl"))
            coc.call("start", "fl")
            shim = int((work / "cocoon.pid").read_text())
            monitor = int((coc.root / "sandboxes" / "s" / "monitor.pid").read_text())
            time.sleep(2)
            res["pss_mib"] = {
                "shim": pss_kib(shim) / 1024,
                "monitor": pss_kib(monitor) / 1024,
                "fork server's share": forkserver_share_kib(coc.root) / 1024,
            }
            # Latency first, in idle guests: each exec pair beside a floor taken the same
            # moment, each after the machine settled from the one before (the other guest's
            # work, a shim's exit); the first exec of each (like the floor's first) is left out.
            ex = FLOOR_EXEC.replace("seq N", "seq 2").replace("CID", "fl")
            for rt in rts:
                rt.call("exec", "s", "true")
            for _ in range(args.runs):
                for rt in rts:
                    time.sleep(SETTLE)
                    rows.setdefault(f"exec true, {rt.name}", []).append(
                        rt.call("exec", "s", "true")
                    )
                time.sleep(SETTLE)
                rows.setdefault("in-guest floor: crun exec true", []).append(
                    in_guest(coc, "fl", ex)[1]
                )
            for _ in range(args.runs):
                for rt in rts:
                    dd = [
                        *rt.argv,
                        "exec",
                        "s",
                        "dd",
                        "if=/dev/zero",
                        "bs=64k",
                        f"count={16 * mib}",
                    ]
                    dt = timed(dd, want_stdout=mib * MIB)
                    rows.setdefault(f"stdout MB/s, {rt.name}", []).append(mib * MIB / 1e6 / dt)
                    cat = [*rt.argv, "exec", "s", "sh", "-c", "cat > /dev/null"]
                    dt = timed(cat, stdin_mib=mib)
                    rows.setdefault(f"stdin MB/s, {rt.name}", []).append(mib * MIB / 1e6 / dt)
            pipe = FLOOR_PIPE.replace("seq N", f"seq {args.runs}").replace("=C", f"={16 * mib}")
            rows["in-guest pipe floor MB/s"] = [
                mib * MIB / 1e6 / s for s in in_guest(coc, "fl", pipe)
            ]
        finally:
            for rt, cid in started:
                rt.call("delete", "--force", cid)
    for name, a, b in (
        ("stdout cocoon / floor", "stdout MB/s, cocoon", "in-guest pipe floor MB/s"),
        ("stdout cocoon / runc", "stdout MB/s, cocoon", "stdout MB/s, runc"),
        ("stdin cocoon / floor", "stdin MB/s, cocoon", "in-guest pipe floor MB/s"),
        ("stdin cocoon / runc", "stdin MB/s, cocoon", "stdin MB/s, runc"),
        ("exec cocoon / floor", "exec true, cocoon", "in-guest floor: crun exec true"),
        ("exec cocoon / runc", "exec true, cocoon", "exec true, runc"),
    ):
        rows[name] = [x / y for x, y in zip(rows[a], rows[b], strict=False)]
    res["rows"] = {k: summary(v) for k, v in rows.items()}
    for k, s in res["rows"].items():
        unit = "x" if " / " in k else ("" if "MB/s" in k else "s")
        print(f"{k:34} {s['median']:9.3f}{unit}  ({s['min']:.3f}-{s['max']:.3f})")
    print(
        "idle container, host PSS: "
        + ", ".join(f"{k} {v:.1f} MiB" for k, v in res["pss_mib"].items())
    )
    if args.json:
        args.json.write_text(json.dumps(res, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
