"""VM templates ([factory] template): a restored start against the boot floor and a cold boot,
in one run; median (min-max) of several runs, the three alternated in each run.

Rows:
- the boot floor: the same QEMU, machine, kernel and memory with an init that powers off at
  once (bench/boot.py);
- restore to agent-ready: ``sandbox.start`` from call to return with a template (the RAM
  copy, QEMU, the device state, the share hot-plugged, the agent answering, reseeded);
- cold boot to agent-ready: the same without a template;
- ratios: restore / floor (goal <= 0.5x), cold / floor (goal <= 1.5x), restore / cold;
- warm ``run`` of ``true`` restored from the template, next to a cold one and runc's;
- host PSS of one idle restored sandbox and one cold-booted one (QEMU, virtiofsd, monitor),
  and what building the template took.

    python -m bench.template [--runs 3] [--json out.json]

Not a test: it asserts nothing and prints numbers.
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script, like pool.py
from bench import boot
from bench.pool import vm_pss_mib
from bench.run import Runtime, bench_args, print_rows, summary
from cocoon.runtime import config as config_mod
from cocoon.runtime.container import busybox
from cocoon.runtime.sandbox import launcher, template


def start_once(
    cfg: config_mod.Config, root: Path, sid: str, tpl: Path | None, host: launcher.HostFacts
) -> tuple[float, dict[str, float], bool]:
    """(seconds to agent-ready, idle PSS by process, restored?) of one sandbox, then stopped."""
    t = time.monotonic()
    sb = launcher.start(cfg, root, sid, host=host, template=tpl)
    ready = time.monotonic() - t
    time.sleep(2)  # settled, as density.py measures
    pss = vm_pss_mib(sb.dir)
    launcher.stop(root, sid)
    return ready, pss, sb.restored


def main() -> int:
    args = bench_args(__doc__)
    cfg = config_mod.load(None).config
    on = dataclasses.replace(cfg, factory=dataclasses.replace(cfg.factory, template=True))
    host = launcher.host_facts(cfg)
    rows: dict[str, list[float]] = {}
    pss: dict[str, list[dict[str, float]]] = {"restored": [], "cold": []}
    res: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="cocoon-bench-template-") as td:
        work = Path(td)
        root = work / "root"
        t = time.monotonic()
        tpl = template.build(on, root, host)
        res["template_build_s"] = time.monotonic() - t
        res["template_meta"] = json.loads((tpl / "meta.json").read_text())
        conf = work / "template.toml"
        conf.write_text("[factory]\ntemplate = true\n")
        warm = Runtime("cocoon", root, conf)
        cold = Runtime("cocoon", work / "cold-root")
        runc = Runtime("runc", work / "runc-root")
        trivial = busybox.make_bundle(work / "trivial", ["true"])
        try:
            for i in range(args.runs):
                rows.setdefault("boot floor", []).append(
                    boot.floor_once(cfg, host.files, host.accel)
                )
                ready, p, restored = start_once(on, root, f"r{i}", tpl, host)
                if not restored:
                    raise RuntimeError("the sandbox was not restored from the template")
                rows.setdefault("restore to agent-ready", []).append(ready)
                pss["restored"].append(p)
                ready, p, _ = start_once(cfg, work / "cold-root", f"c{i}", None, host)
                rows.setdefault("cold boot to agent-ready", []).append(ready)
                pss["cold"].append(p)
                rows.setdefault("warm run of true (template)", []).append(
                    warm.call("run", "--bundle", str(trivial), f"w{i}")
                )
                rows.setdefault("cold run of true", []).append(
                    cold.call("run", "--bundle", str(trivial), f"k{i}")
                )
                rows.setdefault("run of true, runc", []).append(
                    runc.call("run", "--bundle", str(trivial), f"u{i}")
                )
        finally:
            subprocess.run([*warm.argv, "template", "drop"], stdout=subprocess.DEVNULL, check=False)
    floor = rows["boot floor"]
    for name, num, den in (
        ("restore / floor (goal <= 0.5x)", "restore to agent-ready", floor),
        ("cold boot / floor (goal <= 1.5x)", "cold boot to agent-ready", floor),
        ("restore / cold boot", "restore to agent-ready", rows["cold boot to agent-ready"]),
        ("warm run / cold run", "warm run of true (template)", rows["cold run of true"]),
        ("warm run / runc", "warm run of true (template)", rows["run of true, runc"]),
    ):
        rows[name] = [x / y for x, y in zip(rows[num], den, strict=False)]
    res["rows"] = {k: summary(v) for k, v in rows.items()}
    res["idle_pss_mib"] = {
        kind: {k: summary([p[k] for p in ps]) for k in ps[0]} for kind, ps in pss.items()
    }
    print_rows(res["rows"], 36, 3)
    for kind, by in res["idle_pss_mib"].items():
        print(
            f"idle {kind} sandbox PSS: "
            + ", ".join(f"{k} {v['median']:.1f} MiB" for k, v in by.items())
        )
    print(f"template build: {res['template_build_s']:.1f}s, state "
          f"{res['template_meta']['state_size'] / 1024:.0f} KiB")  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps(res, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
