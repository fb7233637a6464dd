"""The pytest plugin's cost to a test (cocoon.testing): how long ``cocoon.run()`` takes to hand
back a running container, booted cold, claimed from a pool (``--cocoon-pool``) or restored
from a template (``--cocoon-template``); then the first ``exec("true")`` and the teardown's
``remove()`` (delete and the leak checks). Median (min-max) of several runs; the pool is
refilled, untimed, before each pooled run.

    python -m bench.plugin [--runs 3] [--json out.json]

Not a test: it asserts nothing and prints numbers.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script, like pool.py
from bench.run import bench_args, print_rows, summary
from cocoon.runtime import config as config_mod
from cocoon.testing import harness
from cocoon.testing.plugin import RUN_DIR

MODES: dict[str, dict[str, Any]] = {
    "cold": {},
    "pooled": {"pool_size": 1},
    "restored": {"template": True},
}


def measure(mode: str, runs: int, work: Path) -> dict[str, list[float]]:
    cfg = config_mod.load(None).config
    cfg = dataclasses.replace(cfg, factory=dataclasses.replace(cfg.factory, **MODES[mode]))
    conf = work / f"{mode}.toml"
    conf.write_text(config_mod.to_toml(cfg))
    RUN_DIR.mkdir(mode=0o700, exist_ok=True)
    root = Path(tempfile.mkdtemp(prefix="bench-", dir=RUN_DIR))
    rt = harness.Runtime(root, work / mode, conf)
    rows: dict[str, list[float]] = {"run": [], "exec": [], "remove": []}
    try:
        if mode == "restored":
            t = time.monotonic()
            rt.call("template", "build", timeout=600)
            rows["template build"] = [time.monotonic() - t]
        for _ in range(runs):
            if mode == "pooled":
                rt.call("pool", "fill", timeout=600)
            c = harness.Cocoon(rt)
            t = time.monotonic()
            box = c.run()
            rows["run"].append(time.monotonic() - t)
            if mode == "pooled" and not box.pooled:
                raise SystemExit("the pooled run did not claim a pooled VM")
            t = time.monotonic()
            box.exec("true", check=True)
            rows["exec"].append(time.monotonic() - t)
            t = time.monotonic()
            left = c.close()
            rows["remove"].append(time.monotonic() - t)
            if left:
                raise SystemExit(f"{mode}: left behind: {left}")
    finally:
        rt.call("pool", "drain", timeout=300)
        rt.call("template", "drop", timeout=300)
        shutil.rmtree(root, ignore_errors=True)
    return rows


def main() -> int:
    args = bench_args(__doc__)
    res: dict[str, Any] = {"rows": {}}
    with tempfile.TemporaryDirectory(prefix="cocoon-bench-plugin-") as td:
        raw = {mode: measure(mode, args.runs, Path(td)) for mode in MODES}
    rows = res["rows"]
    for mode, by in raw.items():
        for k, xs in by.items():
            rows[f"{k}, {mode}"] = summary(xs)
    for mode in ("pooled", "restored"):
        ratio = [w / c for w, c in zip(raw[mode]["run"], raw["cold"]["run"], strict=True)]
        rows[f"run, {mode} / cold"] = summary(ratio)
    print_rows(rows, 28)
    if args.json:
        args.json.write_text(json.dumps(res, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
