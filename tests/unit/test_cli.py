"""The cocoon command as a black box: version, env, and one-line errors with a JSON log."""

from __future__ import annotations

import json
import subprocess
import sys
import tomllib
from pathlib import Path

from cocoon.runtime.container.spec import default_spec

CLI = [sys.executable, "-m", "cocoon.runtime.cli.main"]


def run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=60, env=env)


def test_version_has_commit_line() -> None:
    r = run("--version")
    assert r.returncode == 0
    lines = r.stdout.splitlines()
    assert lines[0].startswith("cocoon version ")
    assert any(line.startswith("commit: ") for line in lines)


def test_env_prints_resolved_config_as_toml(tmp_path: Path) -> None:
    conf = tmp_path / "c.toml"
    conf.write_text("[hypervisor]\ndefault_vcpus = 2\n")
    r = run("--config", str(conf), "env")
    assert r.returncode == 0, r.stderr
    data = tomllib.loads(r.stdout)
    assert data["hypervisor"]["default_vcpus"] == 2
    assert data["agent"]["channel"] == "auto"
    assert data["paths"]["root"] == "/run/cocoon"
    assert str(conf) in r.stdout.splitlines()[0]


def _error_case(
    tmp_path: Path, *args: str
) -> tuple[subprocess.CompletedProcess[str], list[dict[str, str]]]:
    log = tmp_path / "log.json"
    r = run("--log", str(log), "--log-format", "json", *args)
    lines = [json.loads(x) for x in log.read_text().splitlines()] if log.exists() else []
    return r, lines


def test_bad_config_is_one_error_and_a_json_log_line(tmp_path: Path) -> None:
    conf = tmp_path / "bad.toml"
    conf.write_text("[hypervisor]\ndefault_vcpu = 2\n")
    r, lines = _error_case(tmp_path, "--config", str(conf), "env")
    assert r.returncode == 1
    assert r.stdout == ""
    err = r.stderr.strip().splitlines()
    assert len(err) == 1 and "hypervisor.default_vcpu" in err[0] and str(conf) in err[0]
    assert lines and lines[-1]["level"] == "error"
    assert "hypervisor.default_vcpu" in lines[-1]["msg"]
    assert lines[-1]["time"].endswith("Z")


def test_wrong_type_names_the_key(tmp_path: Path) -> None:
    conf = tmp_path / "bad.toml"
    conf.write_text('[agent]\nready_timeout_s = "soon"\n')
    r, lines = _error_case(tmp_path, "--config", str(conf), "env")
    assert r.returncode == 1
    assert "agent.ready_timeout_s" in r.stderr
    assert "agent.ready_timeout_s" in lines[-1]["msg"]


def test_a_shared_fs_that_cannot_run_containers_is_refused_before_a_vm_boots(
    tmp_path: Path,
) -> None:
    """virtio-9p (the guest kernel has no 9p) and none are refused by create itself: one
    error naming the key, nothing made under the root (an empty sandbox may still use them)."""
    bundle = tmp_path / "bundle"
    (bundle / "rootfs").mkdir(parents=True)
    spec = default_spec()
    spec["process"]["terminal"] = False  # a bundle create would take, but for the setting
    (bundle / "config.json").write_text(json.dumps(spec))
    for shared in ("virtio-9p", "none"):
        conf, root = tmp_path / f"{shared}.toml", tmp_path / f"root-{shared}"
        conf.write_text(f'[hypervisor]\nshared_fs = "{shared}"\n')
        r, lines = _error_case(
            tmp_path, "--root", str(root), "--config", str(conf), "create", "-b", str(bundle), "c1"
        )
        assert r.returncode == 1, r.stderr
        err = r.stderr.strip().splitlines()
        assert len(err) == 1 and f'hypervisor.shared_fs = "{shared}"' in err[0], err
        assert "shared_fs" in lines[-1]["msg"] and lines[-1]["level"] == "error"
        made = sorted(str(p.relative_to(root)) for p in root.rglob("*")) if root.exists() else []
        assert not [p for p in made if p.startswith(("containers/", "sandboxes/"))], made


def test_unknown_verb_and_missing_config(tmp_path: Path) -> None:
    r, lines = _error_case(tmp_path, "frobnicate")
    assert r.returncode == 1 and "frobnicate" in r.stderr and lines[-1]["level"] == "error"
    r, _ = _error_case(tmp_path, "--config", str(tmp_path / "nope.toml"), "env")
    assert r.returncode == 1 and "nope.toml" in r.stderr


def test_config_from_environment(tmp_path: Path) -> None:
    import os

    conf = tmp_path / "c.toml"
    conf.write_text('[image]\ncache_dir = "/var/tmp/x"\n')
    env = dict(os.environ, COCOON_CONFIG=str(conf), COCOON_CONFIG_DIR=str(tmp_path / "d"))
    r = run("env", env=env)
    assert r.returncode == 0, r.stderr
    assert tomllib.loads(r.stdout)["image"]["cache_dir"] == "/var/tmp/x"


def test_only_a_verb_that_reads_the_configuration_loads_it(tmp_path: Path) -> None:
    """The configuration is loaded on first use: `state` (and exec, kill...) work with a broken
    file and import no config module (~20 ms of each call), `create` reports the file."""
    from cocoon.runtime.container import busybox

    conf = tmp_path / "bad.toml"
    conf.write_text("[hypervisor]\ndefault_vcpu = 2\n")
    root = str(tmp_path / "root")
    r = run("--config", str(conf), "--root", root, "state", "nosuch")
    assert r.returncode == 1 and "nosuch" in r.stderr and "default_vcpu" not in r.stderr
    bundle = busybox.make_bundle(tmp_path / "b", ["true"])
    r = run("--config", str(conf), "--root", root, "create", "--bundle", str(bundle), "c1")
    assert r.returncode == 1 and "hypervisor.default_vcpu" in r.stderr
    assert not (tmp_path / "root" / "containers" / "c1").exists()
    code = (
        "import sys; from cocoon.runtime.cli import main; "
        "main.main(['--root', sys.argv[1], 'state', 'nosuch']); "
        "print([m for m in sys.modules if m in ('cocoon.runtime.config', 'tomllib')])"
    )
    out = subprocess.run([sys.executable, "-c", code, root], capture_output=True, text=True)
    assert out.stdout.strip() == "[]", out.stderr
