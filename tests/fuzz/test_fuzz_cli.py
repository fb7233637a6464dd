"""Fuzz the runc grammar: container ids, signals, sizes and intervals, and whole command lines
run through the CLI's ``main`` in process. Every call exits 0 or 1 (never a traceback), a
failure prints one line on stderr and one JSON line in --log, and a failed call leaves no file
in --root.

Nothing here can boot a VM: the state root starts empty (so every verb but create/run/spec/
features/list fails on the missing container), the only bundles are ones that fail
validation or a valid one whose create meets a sandbox launcher replaced by one that refuses,
and the verbs of cocoon's own that build images or boot VMs (image, demo, check, sandbox) are
never generated."""

from __future__ import annotations

import io
import itertools
import json
import os
import signal
from pathlib import Path
from typing import Any

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from cocoon.runtime.cli import main as climain
from cocoon.runtime.cli import oci
from cocoon.runtime.container import ids
from cocoon.runtime.container.spec import default_spec
from cocoon.runtime.errors import NetworkError, SandboxError
from tests.fuzz.conftest import check_clean
from tests.fuzz.strategies import ODD_STRINGS, odd_ints, odd_text

pytestmark = pytest.mark.fuzz

_n = itertools.count()


# ------------------------------------------------------------------------------ ids
@given(cid=st.one_of(odd_text, st.text(min_size=200, max_size=300)))
@example(cid="\ud800")  # os.fsencode: UnicodeEncodeError
@example(cid="\udcff" * 300)
@example(cid="x" * 100_000)
def test_ids(cid: str) -> None:
    try:
        got = ids.validate_id(cid)
    except Exception as exc:
        check_clean(exc)
        return
    assert got == cid and "/" not in cid and cid not in (".", "..") and "\0" not in cid
    assert len(os.fsencode(cid)) <= ids.MAX_ID_LEN


# ------------------------------------------------------------------------------ signals, sizes
VALID_SIGNALS = {int(s) for s in signal.valid_signals()}


@given(
    text=st.one_of(
        odd_text,
        odd_ints.map(str),
        st.sampled_from([s.name for s in signal.Signals] + ["KILL", "term", "RTMIN", "SIGRTMIN+1"]),
    )
)
@example(text="\u0661")  # isdigit() but not ASCII
@example(text="9" * 5000)  # int(): ValueError over 4300 digits
def test_signals(text: str) -> None:
    try:
        n = oci.parse_signal(text)
    except Exception as exc:
        check_clean(exc)
        return
    assert n in VALID_SIGNALS


@given(
    text=st.one_of(
        odd_text, odd_ints.map(str), st.from_regex(r"\d{1,30}\s*[kKmMgGtT]?i?[bB]?", fullmatch=True)
    )
)
@example(text="\u0661G")
@example(text="9" * 5000)  # int(): ValueError over 4300 digits
def test_sizes(text: str) -> None:
    try:
        n = oci.parse_size(text)
    except Exception as exc:
        check_clean(exc)
        return
    assert n >= 0


@given(text=st.one_of(odd_text, st.from_regex(r"\d{1,20}(\.\d{1,20})?(ms|s|m)?", fullmatch=True)))
def test_intervals(text: str) -> None:
    try:
        v = oci._interval(text)
    except Exception as exc:
        check_clean(exc)
        return
    assert v >= 0


# ------------------------------------------------------------------------------ whole argv
def _argv_safe(s: str) -> bool:
    """What a command line can hold (no NUL, no lone surrogate but surrogateescape's), and no
    line break: see test_usage_error_with_a_newline_is_one_line."""
    return not any(c in s for c in "\0\n\r\ud800")


def _token() -> st.SearchStrategy[str]:
    return st.one_of(
        st.sampled_from(["c1", "good", "bad", "-", "--", "-x", "--bogus", "1", "-1", "SIGKILL"]),
        st.sampled_from(ODD_STRINGS).filter(_argv_safe),
        st.text(max_size=8).filter(_argv_safe),
    )


# Each runc verb with its flags; None: a flag without a value.
ANY = None
VERBS: dict[str, list[tuple[str, Any]]] = {
    "create": [
        ("--bundle", "B"),
        ("-b", "B"),
        ("--console-socket", "T"),
        ("--pid-file", "T"),
        ("--no-pivot", ANY),
        ("--no-new-keyring", ANY),
        ("--preserve-fds", "T"),
    ],
    "run": [
        ("--bundle", "B"),
        ("--console-socket", "T"),
        ("--pid-file", "T"),
        ("-d", ANY),
        ("--detach", ANY),
        ("--keep", ANY),
        ("--preserve-fds", "T"),
    ],
    "start": [],
    "state": [],
    "pause": [],
    "resume": [],
    "kill": [("--all", ANY), ("-a", ANY)],
    "delete": [("--force", ANY), ("-f", ANY)],
    "exec": [
        ("--process", "F"),
        ("-p", "F"),
        ("--detach", ANY),
        ("--tty", ANY),
        ("--cwd", "T"),
        ("--env", "T"),
        ("-e", "T"),
        ("--user", "T"),
        ("-u", "T"),
        ("--cap", "T"),
        ("--no-new-privs", ANY),
        ("--preserve-fds", "T"),
        ("--console-socket", "T"),
        ("--pid-file", "T"),
        ("--ignore-paused", ANY),
    ],
    "ps": [("--format", "T"), ("-f", "T")],
    "list": [("--format", "T"), ("-q", ANY), ("--quiet", ANY)],
    "update": [
        ("--resources", "F"),
        ("-r", "F"),
        ("--memory", "T"),
        ("--memory-swap", "T"),
        ("--cpu-shares", "T"),
        ("--cpu-quota", "T"),
        ("--cpuset-cpus", "T"),
        ("--pids-limit", "T"),
        ("--blkio-weight", "T"),
    ],
    "events": [("--stats", ANY), ("--interval", "T")],
    "spec": [("--bundle", "B"), ("--rootless", ANY)],
    "features": [],
}
NEEDS_ID = {
    "create",
    "run",
    "start",
    "state",
    "pause",
    "resume",
    "kill",
    "delete",
    "exec",
    "ps",
    "update",
    "events",
}
GLOBALS = ["--debug", "--systemd-cgroup", "-v", "--version"]


@st.composite
def argvs(draw: st.DrawFn) -> list[str]:
    verb = draw(st.one_of(st.sampled_from(sorted(VERBS)), st.sampled_from(["", "bogus", "env"])))
    out = draw(st.lists(st.sampled_from(GLOBALS), max_size=2, unique=True))
    if draw(st.integers(0, 9)) == 0:
        return out  # no verb
    out.append(verb)
    flags = VERBS.get(verb, [])
    if flags:
        for flag, kind in draw(st.lists(st.sampled_from(flags), max_size=4)):
            out.append(flag)
            if kind == "B":
                out.append(draw(st.sampled_from(["good", "bad", "missing", ".", "/nonexistent"])))
            elif kind == "F":
                out.append(draw(st.sampled_from(["proc.json", "bad.json", "deep.json", "missing"])))
            elif kind == "T":
                out.append(draw(_token()))
    if verb in NEEDS_ID and draw(st.integers(0, 9)) > 0:
        out.append(draw(st.one_of(st.sampled_from(["c1", "good"]), _token())))
    out += draw(st.lists(_token(), max_size=3))
    return out


@pytest.fixture
def cli_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A working directory with bundles and files the argv can name; the sandbox launcher
    and the netns maker replaced by ones that refuse (so a create that passes its checks
    fails before anything boots, and undoes itself)."""
    from cocoon.runtime.network import netns
    from cocoon.runtime.sandbox import launcher

    def no_boot(*a: object, **k: object) -> None:
        raise SandboxError("fuzz: no VM boots in the fuzz tests")

    def no_netns(*a: object, **k: object) -> None:
        raise NetworkError("fuzz: no network namespace is made in the fuzz tests")

    monkeypatch.setattr(launcher, "start", no_boot)
    monkeypatch.setattr(netns, "create_netns", no_netns)
    monkeypatch.setattr("sys.stdin", io.StringIO("{"))
    monkeypatch.delenv("COCOON_CONFIG", raising=False)
    monkeypatch.setenv("COCOON_CONFIG_DIR", str(tmp_path / "no-config.d"))
    cwd = tmp_path / "cwd"
    good = cwd / "good"
    (good / "rootfs").mkdir(parents=True)
    spec = default_spec()
    spec["process"]["terminal"] = False
    (good / "config.json").write_text(json.dumps(spec))
    (cwd / "bad").mkdir()
    (cwd / "bad" / "config.json").write_text('{"ociVersion": 1}')
    (cwd / "proc.json").write_text(json.dumps({"args": ["true"], "cwd": "/"}))
    (cwd / "bad.json").write_bytes(b"\xff{")
    (cwd / "deep.json").write_text("[" * 5000)
    (tmp_path / "cocoon.toml").write_text('[hypervisor]\npath = "/nonexistent/qemu"\n')
    monkeypatch.chdir(cwd)
    return tmp_path


def _files(d: Path) -> list[str]:
    return [os.path.join(r, f) for r, _, fs in os.walk(d) for f in fs]


def _run(argv: list[str], monkeypatch: pytest.MonkeyPatch) -> tuple[int, str, str]:
    """main(argv) with stdout and stderr kept as text (the real stderr escapes what it cannot
    encode: errors=backslashreplace)."""
    out, err = io.StringIO(), io.StringIO()
    with monkeypatch.context() as m:
        m.setattr("sys.stdout", out)
        m.setattr("sys.stderr", err)
        try:
            rc = climain.main(argv)
        except SystemExit as e:  # argparse's --help
            assert e.code == 0, f"SystemExit({e.code!r})"
            rc = 0
    return rc, out.getvalue(), err.getvalue()


@given(argv=argvs())
@example(argv=["create", "--bundle", "good", "c1"])  # passes its checks, meets no_boot
@example(argv=["run", "-d", "--bundle", "good", "c1"])
@example(argv=["exec", "--process", "bad.json", "c1"])  # UnicodeDecodeError
@example(argv=["exec", "-p", "deep.json", "c1"])  # RecursionError
@example(argv=["update", "-r", "-", "c1"])
@example(argv=["kill", "c1", "\u0661"])
@example(argv=["delete", "--force", "c1"])
@example(argv=["spec", "--bundle", "missing"])  # FileNotFoundError
def test_argv(cli_env: Path, monkeypatch: pytest.MonkeyPatch, argv: list[str]) -> None:
    root = cli_env / f"root{next(_n)}"
    log = cli_env / f"log{next(_n)}.json"
    full = [
        "--root",
        str(root),
        "--log",
        str(log),
        "--log-format",
        "json",
        "--config",
        str(cli_env / "cocoon.toml"),
        *argv,
    ]
    spec_before = set(_files(cli_env / "cwd"))
    rc, out, err = _run(full, monkeypatch)
    assert "Traceback" not in err and "Traceback" not in out
    assert rc in (0, 1), f"exit status {rc}"
    if rc == 1:
        lines = err.strip("\n").split("\n")
        assert len(lines) == 1, f"stderr of {len(lines)} lines: {err!r}"
        assert lines[0].startswith("cocoon: ")
        last = log.read_text().strip().splitlines()[-1]
        entry = json.loads(last)
        assert entry["level"] == "error" and entry["msg"], entry
        assert _files(root) == [] if root.exists() else True, _files(root)
        assert set(_files(cli_env / "cwd")) == spec_before  # no config.json either


def test_usage_error_with_a_newline_is_one_line(
    cli_env: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    rc, _, err = _run(["--root", str(cli_env / "r"), "list", "x\ny"], monkeypatch)
    assert rc == 1
    assert len(err.strip("\n").split("\n")) == 1, err


def test_text_log_of_an_argument_that_is_not_utf8(
    cli_env: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    argv = ["--root", str(cli_env / "r"), "--log", str(cli_env / "x.log"), "list", "\udcff"]
    rc, _, err = _run(argv, monkeypatch)
    assert rc == 1
    assert "Traceback" not in err and "Logging error" not in err, err


def test_log_in_a_missing_directory_is_one_error(
    cli_env: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """(Was a FileNotFoundError traceback; cli/main.py handles it since commit 62ed1d4.)"""
    rc, _, err = _run(
        ["--root", str(cli_env / "r"), "--log", "/nonexistent/x.json", "list"], monkeypatch
    )
    assert rc == 1
    # Two lines today (the error, then "cannot write log"): no log to write the JSON line to.
    assert "Traceback" not in err and err.startswith("cocoon: "), err
