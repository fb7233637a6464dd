"""A handful of broken config.json files through the real ``cocoon`` binary (fixed examples:
each is a process): exit status 1, one line on stderr, the --log's last line JSON at level
error, and nothing left in --root. Every spec fails validation before anything boots."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from cocoon.runtime.container.spec import default_spec

pytestmark = pytest.mark.fuzz

COCOON = shutil.which("cocoon", path=os.path.dirname(sys.executable)) or "cocoon"


def _spec(**change: Any) -> bytes:
    s = default_spec()
    s["process"]["terminal"] = False
    for dotted, value in change.items():
        *parents, last = dotted.split("__")
        cur = s
        for p in parents:
            cur = cur.setdefault(p, {})
        cur[last] = value
    return json.dumps(s).encode()


BROKEN: dict[str, bytes] = {
    "not-json": b"{",
    "not-utf8": b'{"ociVersion": "\xff"}',
    "too-deep": b"[" * 5000,
    "no-process": json.dumps({"ociVersion": "1.0.2", "root": {"path": "rootfs"}}).encode(),
    "args-not-strings": _spec(process__args=[1, 2]),
    "uid-negative": _spec(process__user={"uid": -1, "gid": 0}),
    "hook-args-bool": _spec(hooks={"prestart": [{"path": "/bin/true", "args": True}]}),
    "annotations-list": _spec(annotations=["a"]),
    "devices-bool": _spec(linux__devices=True),
    "cpus-superscript": _spec(linux__resources={"cpu": {"cpus": "\u00b2"}}),
    "bad-annotation": _spec(annotations={"io.cocoon.config.hypervisor.path": "/x"}),
    "pod-member-no-id": _spec(annotations={"io.kubernetes.cri.container-type": "container"}),
}


@pytest.mark.parametrize("name", sorted(BROKEN))
def test_create_with_a_broken_config_json(tmp_path: Path, name: str) -> None:
    bundle = tmp_path / "bundle"
    (bundle / "rootfs").mkdir(parents=True)
    (bundle / "config.json").write_bytes(BROKEN[name])
    root, log = tmp_path / "root", tmp_path / "log.json"
    cfg = tmp_path / "cocoon.toml"
    cfg.write_text('[hypervisor]\npath = "/nonexistent/qemu"\n')  # a boot would fail at once
    env = {**os.environ, "COCOON_CONFIG_DIR": str(tmp_path / "none")}
    r = subprocess.run(
        [COCOON, "--root", str(root), "--log", str(log), "--log-format", "json",
         "--config", str(cfg), "create", "--bundle", str(bundle), "c1"],
        capture_output=True, text=True, errors="backslashreplace", timeout=60, env=env,
    )  # fmt: skip
    assert r.returncode == 1, r
    lines = r.stderr.strip("\n").split("\n")
    assert len(lines) == 1 and lines[0].startswith("cocoon: "), r.stderr
    assert "Traceback" not in r.stderr
    entry = json.loads(log.read_text().strip().split("\n")[-1])
    assert entry["level"] == "error" and entry["msg"]
    left = [os.path.join(d, f) for d, _, fs in os.walk(root) for f in fs] if root.exists() else []
    assert left == []
    assert not (root / "containers" / "c1").exists()
