"""Fuzz config.json (the bundle's spec, through everything create checks before it makes
anything) and process.json (``exec --process``): a valid document with one field broken is
accepted or refused with one clear CocoonError, never a traceback.

The create target runs ``create._check`` (id, bundle, terminal, VM size, host devices, pod
membership, annotations, cgroupsPath) and, for an accepted spec, what create does next with it
on the host side: the guest spec and the state it would save. It boots nothing: ``_check``
makes nothing, and these tests never call past it."""

from __future__ import annotations

import itertools
import json
import os
from dataclasses import asdict
from pathlib import Path
from typing import Any

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from cocoon.runtime.config import Config
from cocoon.runtime.container import create, execproc
from cocoon.runtime.container import spec as specmod
from cocoon.runtime.container.state import Ctx
from cocoon.runtime.errors import CocoonError, SpecError
from tests.fuzz.conftest import check_clean
from tests.fuzz.strategies import Mutation, json_values, mutate, mutations, odd_text

pytestmark = pytest.mark.fuzz

_n = itertools.count()


def base_spec() -> dict[str, Any]:
    """A valid spec that reaches most of what create checks: a bind mount, hooks,
    annotations, resources, a device node, namespaces, a cgroupsPath."""
    s = specmod.default_spec()
    s["process"]["terminal"] = False
    s["process"]["user"] = {"uid": 0, "gid": 0, "additionalGids": [1]}
    s["mounts"].append(
        {"destination": "/data", "type": "bind", "source": "vol", "options": ["rbind"]}
    )
    s["annotations"] = {"io.cocoon.config.network.queues": "2", "org.example": "x"}
    s["hooks"] = {
        "prestart": [{"path": "/bin/true", "args": ["true"], "env": ["A=1"], "timeout": 5}],
        "poststop": [{"path": "/bin/true"}],
    }
    s["linux"]["cgroupsPath"] = "/kubepods/pod1/c1"
    s["linux"]["resources"]["cpu"] = {"quota": 150000, "period": 100000, "cpus": "0"}
    s["linux"]["resources"]["memory"] = {"limit": 64 << 20}
    s["linux"]["devices"] = [{"path": "/dev/fuzz0", "type": "c", "major": 1, "minor": 3}]
    return s


# Fields the host reads that base_spec may not have (or has), set to anything.
KNOWN: list[tuple[Any, ...]] = [
    ("ociVersion",),
    ("root", "path"),
    ("process", "terminal"),
    ("process", "args"),
    ("process", "args", 0),
    ("process", "cwd"),
    ("process", "env"),
    ("process", "env", 0),
    ("process", "user"),
    ("process", "user", "uid"),
    ("process", "user", "gid"),
    ("process", "user", "additionalGids"),
    ("annotations",),
    ("annotations", "io.kubernetes.cri.container-type"),
    ("annotations", "io.kubernetes.cri.sandbox-id"),
    ("annotations", "io.kubernetes.cri-o.ContainerType"),
    ("annotations", "io.kubernetes.docker.type"),
    ("annotations", "io.cocoon.config.network.queues"),
    ("annotations", "io.cocoon.config.network.model"),
    ("annotations", "io.cocoon.config.hypervisor.path"),
    ("hooks",),
    ("hooks", "prestart"),
    ("hooks", "prestart", 0, "path"),
    ("hooks", "prestart", 0, "args"),
    ("hooks", "prestart", 0, "env"),
    ("hooks", "prestart", 0, "timeout"),
    ("hooks", "poststop", 0),
    ("hooks", "createContainer"),
    ("mounts",),
    ("mounts", 0),
    ("mounts", 7, "source"),
    ("mounts", 7, "options"),
    ("mounts", 7, "type"),
    ("mounts", 3, "destination"),
    ("linux",),
    ("linux", "cgroupsPath"),
    ("linux", "namespaces"),
    ("linux", "namespaces", 1),
    ("linux", "namespaces", 1, "path"),
    ("linux", "namespaces", 1, "type"),
    ("linux", "resources"),
    ("linux", "resources", "cpu"),
    ("linux", "resources", "cpu", "quota"),
    ("linux", "resources", "cpu", "period"),
    ("linux", "resources", "cpu", "cpus"),
    ("linux", "resources", "memory"),
    ("linux", "resources", "memory", "limit"),
    ("linux", "devices"),
    ("linux", "devices", 0),
    ("linux", "devices", 0, "path"),
    ("linux", "devices", 0, "type"),
    ("linux", "devices", 0, "major"),
    ("linux", "devices", 0, "minor"),
]


def _bundle(tmp: Path, raw: bytes) -> Path:
    b = tmp / f"b{next(_n)}"
    (b / "rootfs").mkdir(parents=True)
    (b / "vol").mkdir()
    (b / "config.json").write_bytes(raw)
    return b


def _ctx(tmp: Path) -> Ctx:
    return Ctx(Config(), tmp / "root")


def _hooks_are_runnable(hooks: list[dict[str, Any]]) -> None:
    """What hooks.run_hooks relies on, for the hooks create and the state keep."""
    for h in hooks:
        assert isinstance(h["path"], str) and "\0" not in h["path"]
        args = h.get("args") or [h["path"]]
        assert isinstance(args, list) and all(isinstance(a, str) and "\0" not in a for a in args)
        assert all(isinstance(e, str) and "\0" not in e for e in h.get("env") or [])
        t = h.get("timeout")
        assert t is None or (isinstance(t, int) and not isinstance(t, bool) and t > 0)


def check_create(tmp: Path, raw: bytes, cid: str = "c1") -> None:
    """create's checks on ``raw`` as config.json: accepted (and then usable), or one clear
    error; the state root stays empty either way (nothing was reserved)."""
    ctx = _ctx(tmp)
    b = _bundle(tmp, raw)
    try:
        plan = create._check(ctx, cid, b, "console.sock", False)
    except Exception as exc:
        check_clean(exc)
        return
    finally:
        assert not (ctx.root / "containers").exists() or not any(
            (ctx.root / "containers").iterdir()
        )
    # What create does with an accepted spec on the host, short of the VM.
    g = specmod.guest_spec(plan.bundle, cid, {}, plan.guest_network, None, "")
    json.dumps(g).encode()
    st_ = create._state(plan, 1, plan.netns, False)
    json.dumps(asdict(st_))
    for kind in ("prestart", "createRuntime", "poststart", "poststop"):
        _hooks_are_runnable(plan.bundle.hooks(kind))
    assert all(isinstance(k, str) and isinstance(v, str) for k, v in st_.annotations.items())


def test_base_spec_is_accepted(tmp_path: Path) -> None:
    plan = create._check(
        _ctx(tmp_path), "c1", _bundle(tmp_path, json.dumps(base_spec()).encode()), "s", False
    )
    assert plan.net.queues == 2


@given(m=mutations(base_spec(), KNOWN))
# Regressions (each was a traceback before the spec checked it at the edge):
@example(m=(("hooks", "prestart", 0, "args"), "set", True))  # run_hooks: TypeError
@example(m=(("hooks", "prestart", 0, "timeout"), "set", "5"))  # run_hooks: TypeError
@example(m=(("hooks", "prestart", 0, "path"), "set", "a\x00b"))  # run_hooks: ValueError
@example(m=(("hooks", "x\ny"), "set", 1))  # a message of two lines
@example(m=(("linux", "devices"), "set", True))  # devices.block_devices: TypeError
@example(m=(("linux", "devices", 0, "major"), "set", True))
@example(m=(("linux", "namespaces", 1, "type"), "set", [1]))  # unhashable: TypeError
@example(m=(("linux", "resources", "cpu", "cpus"), "set", "\u00b2"))  # sizing: ValueError
@example(m=(("linux", "resources", "cpu"), "set", []))
@example(m=(("annotations",), "set", ["a"]))  # Bundle.annotations: ValueError
@example(m=(("annotations", "io.kubernetes.cri.sandbox-id"), "set", 5))
@example(m=(("process", "user", "uid"), "set", -1))
@example(m=(("process", "terminal"), "set", "false"))
@example(m=(("linux",), "set", None))  # guest_spec: AttributeError on None.pop
@example(m=(("mounts", 5, "options"), "replace", 1))  # is_bind_mount: TypeError
@example(m=(("linux", "namespaces", 0, "type"), "replace", ["9" * 10_000]))  # a long message
def test_config_json_one_field_broken(tmp_path: Path, m: Mutation) -> None:
    check_create(tmp_path, json.dumps(mutate(base_spec(), m)).encode())


@given(value=json_values, cid=st.one_of(st.just("c1"), odd_text))
@example(value=None, cid="\ud800")
def test_config_json_any_document(tmp_path: Path, value: Any, cid: str) -> None:
    check_create(tmp_path, json.dumps(value).encode(), cid)


@given(raw=st.binary(max_size=200))
@example(raw=b"\xff\xfe{")
@example(raw=b'{"ociVersion": "1.0.2", "x": "\xff"}')
@example(raw=b"[" * 3000)
@example(raw=b'{"a":' * 1200 + b"1" + b"}" * 1200)
def test_config_json_any_bytes(tmp_path: Path, raw: bytes) -> None:
    check_create(tmp_path, raw)


@given(depth=st.integers(min_value=1, max_value=3000))
def test_config_json_deep_nesting(tmp_path: Path, depth: int) -> None:
    """An extension field nested deep: refused or carried, never a RecursionError."""
    s = base_spec()
    s["annotations"] = {}
    raw = json.dumps(s)[:-1] + ', "x-deep": ' + "[" * depth + "]" * depth + "}"
    check_create(tmp_path, raw.encode())


# -------------------------------------------------------------------------- process.json
def base_process() -> dict[str, Any]:
    return {
        "terminal": False,
        "user": {"uid": 0, "gid": 0},
        "args": ["sh", "-c", "true"],
        "env": ["PATH=/bin"],
        "cwd": "/",
    }


PROCESS_KNOWN: list[tuple[Any, ...]] = [
    ("args",),
    ("args", 0),
    ("cwd",),
    ("env",),
    ("env", 0),
    ("user",),
    ("user", "uid"),
    ("user", "gid"),
    ("user", "additionalGids"),
    ("terminal",),
]


def check_process(process: Any) -> None:
    """What exec does with a --process file before it asks the agent."""
    try:
        if not isinstance(process, dict):
            return  # oci.cmd_exec refuses a non-object itself (UsageError)
        specmod.validate_process(process, "process")
    except Exception as exc:
        check_clean(exc)
        return
    json.dumps(process).encode()


@given(m=mutations(base_process(), PROCESS_KNOWN))
def test_process_json_one_field_broken(m: Mutation) -> None:
    check_process(mutate(base_process(), m))


@given(
    args=st.lists(odd_text, max_size=3),
    tty=st.booleans(),
    env=st.lists(odd_text, max_size=3),
    cwd=st.one_of(st.none(), odd_text),
    user=st.one_of(st.none(), odd_text, st.sampled_from(["0", "1:1", "-1", "1:x", ":", "1:"])),
)
@example(args=["sh"], tty=False, env=[], cwd=None, user="99999999999999999999")
@example(args=["sh"], tty=False, env=[], cwd=None, user="-5:-5")
def test_exec_flags(
    args: list[str], tty: bool, env: list[str], cwd: str | None, user: str | None
) -> None:
    """exec's flags over the container's own process: the process or one clear error."""
    try:
        p = execproc.build_process(base_process(), args, tty, env, cwd, user)
    except Exception as exc:
        check_clean(exc)
        return
    check_process(p)


def test_exec_process_file_refuses_a_bad_one_before_the_agent(tmp_path: Path) -> None:
    """The CLI path: a --process file that is not JSON, or not an object."""
    from cocoon.runtime.cli import main as climain

    f = tmp_path / "p.json"
    for text in ("{", "[]", '"x"', "\udcff"):
        f.write_text(text, errors="surrogateescape")
        rc = climain.main(["--root", str(tmp_path / "r"), "exec", "--process", str(f), "c1"])
        assert rc == 1
    assert not os.path.exists(tmp_path / "r" / "containers" / "c1")


def test_spec_error_is_a_cocoon_error() -> None:
    assert issubclass(SpecError, CocoonError)
