"""The command line's parsers (runtime/cli/oci.py, runtime/cli/main.py), in process: signals,
sizes, `update`'s resources, intervals, JSON arguments, the runc grammar as containerd, dockerd,
podman and runtime-tools call it, and main()'s one-line error with a runc-style JSON log."""

from __future__ import annotations

import argparse
import io
import json
import logging
import re
import shlex
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from cocoon.runtime.cli import main as main_mod
from cocoon.runtime.cli.main import build_parser, main, parse_argv
from cocoon.runtime.cli.oci import (
    _interval,
    _read_json_arg,
    _update_resources,
    parse_signal,
    parse_size,
)
from cocoon.runtime.errors import UsageError


def parse(argv: str | list[str]) -> argparse.Namespace:
    return build_parser().parse_args(shlex.split(argv) if isinstance(argv, str) else argv)


# ------------------------------------------------------------------------------ parse_signal
# Linux's numbers (x86-64 and arm64 alike), written out so the test does not ask the module
# under test's own source (the signal module) for the answer.
LINUX_SIGNALS = {
    "HUP": 1,
    "INT": 2,
    "QUIT": 3,
    "ABRT": 6,
    "KILL": 9,
    "USR1": 10,
    "SEGV": 11,
    "USR2": 12,
    "PIPE": 13,
    "ALRM": 14,
    "TERM": 15,
    "CHLD": 17,
    "CONT": 18,
    "STOP": 19,
    "TSTP": 20,
    "WINCH": 28,
    "SYS": 31,
}


@pytest.mark.parametrize(("name", "num"), sorted(LINUX_SIGNALS.items()))
def test_signal_names_with_and_without_sig(name: str, num: int) -> None:
    assert parse_signal(name) == num
    assert parse_signal("SIG" + name) == num
    assert parse_signal(name.lower()) == num
    assert parse_signal("sig" + name.capitalize()) == num


@pytest.mark.parametrize("num", [1, 2, 9, 10, 15, 17, 19, 28, 31])
def test_signal_numbers(num: int) -> None:
    assert parse_signal(str(num)) == num


def test_realtime_signals() -> None:
    assert parse_signal("SIGRTMIN") == 34
    assert parse_signal("RTMAX") == 64
    assert parse_signal("34") == 34
    assert parse_signal("40") == 40
    assert parse_signal("64") == 64


def test_signal_whitespace_is_ignored() -> None:
    assert parse_signal(" 15 ") == 15
    assert parse_signal("KILL\n") == 9


@pytest.mark.parametrize(
    "text",
    [
        "",
        " ",
        "65",
        "999",
        "-9",
        "+9",
        "9x",
        "0x9",
        "SIG",
        "SIGFOO",
        "KILLX",
        "SIG KILL",
        "RTMIN+3",
    ],
    ids=repr,
)
def test_bad_signals_are_usage_errors(text: str) -> None:
    with pytest.raises(UsageError, match=re.escape(f"unknown signal {text!r}")):
        parse_signal(text)


@pytest.mark.parametrize("text", ["²", "٣", "１５"], ids=repr)  # noqa: RUF001
def test_non_ascii_digits_are_not_signal_numbers(text: str) -> None:
    with pytest.raises(UsageError):
        parse_signal(text)


# ------------------------------------------------------------------------------ parse_size
@pytest.mark.parametrize(
    ("text", "size"),
    [
        ("268435456", 268435456),
        ("0", 0),
        ("1b", 1),
        ("1B", 1),
        ("512k", 512 << 10),
        ("512K", 512 << 10),
        ("512KiB", 512 << 10),
        ("512kb", 512 << 10),
        ("256M", 256 << 20),
        ("256m", 256 << 20),
        ("256MiB", 256 << 20),
        ("1G", 1 << 30),
        ("1gb", 1 << 30),
        ("3GiB", 3 << 30),
        ("2T", 2 << 40),
        (" 64M ", 64 << 20),
        ("64 M", 64 << 20),
    ],
)
def test_sizes(text: str, size: int) -> None:
    assert parse_size(text) == size


@pytest.mark.parametrize(
    "text", ["", "M", "abc", "1X", "1Q", "1GiBx", "1MiBB", "1 G B", "0x10", "G1", "1,5G"], ids=repr
)
def test_bad_sizes_are_usage_errors(text: str) -> None:
    with pytest.raises(UsageError, match=re.escape(f"invalid size {text!r}")):
        parse_size(text)


@pytest.mark.parametrize(
    ("text", "size"),
    [("1.5G", 3 << 29), ("1p", 1 << 50), ("0.25k", 256), ("2 MiB", 2 << 20), ("3kb", 3072)],
)
def test_runc_size_forms(text: str, size: int) -> None:
    assert parse_size(text) == size


# ------------------------------------------------------------------------------ update
def update_args(flags: str) -> argparse.Namespace:
    args = parse(f"update {flags} cid")
    assert args.verb == "update" and args.id == "cid"
    return args


def test_every_update_flag_lands_in_oci_linux_resources() -> None:
    args = update_args(
        "--memory 256M --memory-swap 512M --memory-reservation 128M "
        "--cpu-shares 512 --cpu-period 100000 --cpu-quota 50000 "
        "--cpu-rt-period 1000000 --cpu-rt-runtime 950000 --cpuset-cpus 0-1 --cpuset-mems 0 "
        "--pids-limit 100 --blkio-weight 500"
    )
    assert _update_resources(args) == {
        "memory": {"limit": 256 << 20, "swap": 512 << 20, "reservation": 128 << 20},
        "cpu": {
            "shares": 512,
            "period": 100000,
            "quota": 50000,
            "realtimePeriod": 1000000,
            "realtimeRuntime": 950000,
            "cpus": "0-1",
            "mems": "0",
        },
        "pids": {"limit": 100},
        "blockIO": {"weight": 500},
    }


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        ("--memory 1G", {"memory": {"limit": 1 << 30}}),
        ("--memory 268435456", {"memory": {"limit": 268435456}}),
        ("--cpu-quota -1", {"cpu": {"quota": -1}}),
        ("--cpu-shares 0", {"cpu": {"shares": 0}}),
        ("--cpuset-cpus 3", {"cpu": {"cpus": "3"}}),
        ("--pids-limit 0", {"pids": {"limit": 0}}),
        ("--blkio-weight 10", {"blockIO": {"weight": 10}}),
        # No cgroup v2 knob for kernel memory: accepted and not passed on.
        ("--memory 1G --kernel-memory 1G --kernel-memory-tcp 1M", {"memory": {"limit": 1 << 30}}),
    ],
)
def test_update_flags_give_only_what_was_asked(flags: str, expected: dict[str, Any]) -> None:
    assert _update_resources(update_args(flags)) == expected


@pytest.mark.parametrize("flags", ["", "--kernel-memory 1G"])
def test_update_with_nothing_to_do_is_a_usage_error(flags: str) -> None:
    with pytest.raises(UsageError, match="nothing to update"):
        _update_resources(update_args(flags))


def test_update_with_a_bad_size_names_it() -> None:
    with pytest.raises(UsageError, match="invalid size '12X'"):
        _update_resources(update_args("--memory 12X"))


@pytest.mark.parametrize(
    ("flag", "key"),
    [("--memory", "limit"), ("--memory-swap", "swap"), ("--memory-reservation", "reservation")],
)
def test_update_minus_one_is_unlimited(flag: str, key: str) -> None:
    assert _update_resources(update_args(f"{flag} -1")) == {"memory": {key: -1}}


DOCKERD_UPDATE = {
    "memory": {
        "limit": 268435456,
        "reservation": 0,
        "swap": 536870912,
        "kernel": 0,
        "kernelTCP": 0,
    },
    "cpu": {
        "shares": 0,
        "quota": 0,
        "period": 0,
        "realtimeRuntime": 0,
        "realtimePeriod": 0,
        "cpus": "",
        "mems": "",
    },
    "blockIO": {"weight": 0},
    "pids": {"limit": 0},
}


def test_update_resources_from_a_file_drops_kernel_memory(tmp_path: Path) -> None:
    f = tmp_path / "res.json"
    f.write_text(json.dumps(DOCKERD_UPDATE))
    res = _update_resources(update_args(f"--resources {f}"))
    expected = json.loads(json.dumps(DOCKERD_UPDATE))
    del expected["memory"]["kernel"], expected["memory"]["kernelTCP"]
    assert res == expected


def test_update_resources_from_stdin(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("sys.stdin", io.StringIO('{"pids": {"limit": 42}, "memory": 5}'))
    assert _update_resources(update_args("--resources -")) == {"pids": {"limit": 42}, "memory": 5}


def test_update_flags_are_ignored_with_resources(tmp_path: Path) -> None:
    """As in runc: --resources replaces the flags (they are read only without it)."""
    f = tmp_path / "res.json"
    f.write_text('{"cpu": {"shares": 2}}')
    assert _update_resources(update_args(f"--resources {f} --memory 1G")) == {"cpu": {"shares": 2}}


@pytest.mark.parametrize("content", ["[]", "5", '"x"', "null"])
def test_update_resources_must_be_an_object(tmp_path: Path, content: str) -> None:
    f = tmp_path / "res.json"
    f.write_text(content)
    with pytest.raises(UsageError, match="resources: must be a JSON object"):
        _update_resources(update_args(f"--resources {f}"))


@pytest.mark.parametrize("flag", ["--cpu-shares", "--cpu-quota", "--pids-limit", "--blkio-weight"])
def test_integer_flags_refuse_words(flag: str) -> None:
    with pytest.raises(UsageError, match=f"argument {flag}: invalid int value: 'lots'"):
        parse(f"update {flag} lots cid")


# ------------------------------------------------------------------------------ _read_json_arg
def test_read_json_arg_from_a_file(tmp_path: Path) -> None:
    f = tmp_path / "p.json"
    f.write_text('{"args": ["ls"], "cwd": "/"}')
    assert _read_json_arg(str(f), "process file") == {"args": ["ls"], "cwd": "/"}
    f.write_text("[1, 2]")
    assert _read_json_arg(str(f), "x") == [1, 2]


def test_read_json_arg_from_stdin(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("sys.stdin", io.StringIO('{"a": 1}'))
    assert _read_json_arg("-", "resources") == {"a": 1}


def test_read_json_arg_missing_file(tmp_path: Path) -> None:
    f = tmp_path / "nope.json"
    with pytest.raises(UsageError, match=f"^process file {re.escape(str(f))}: No such file"):
        _read_json_arg(str(f), "process file")


def test_read_json_arg_directory(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="Is a directory"):
        _read_json_arg(str(tmp_path), "resources")


@pytest.mark.parametrize("content", ["", "{", "{'a': 1}", "nope"], ids=repr)
def test_read_json_arg_bad_json(tmp_path: Path, content: str) -> None:
    f = tmp_path / "bad.json"
    f.write_text(content)
    with pytest.raises(UsageError, match=f"^resources {re.escape(str(f))}: not valid JSON"):
        _read_json_arg(str(f), "resources")


# ------------------------------------------------------------------------------ _interval
@pytest.mark.parametrize(
    ("text", "seconds"),
    [("5s", 5.0), ("500ms", 0.5), ("2m", 120.0), ("3", 3.0), ("1.5s", 1.5), ("0", 0.0)],
)
def test_intervals(text: str, seconds: float) -> None:
    assert _interval(text) == pytest.approx(seconds)


@pytest.mark.parametrize(
    "text", ["", "s", "ms", "-1s", "5 s", "1.s", ".5s", "5sec", "5S"], ids=repr
)
def test_bad_intervals(text: str) -> None:
    with pytest.raises(UsageError, match=re.escape(f"invalid interval {text!r}")):
        _interval(text)


# ------------------------------------------------------------------------------ the runc grammar
GLOBAL = "--root /run/r --log /run/l/log.json --log-format json"


def test_global_flags_before_the_verb() -> None:
    a = parse(f"{GLOBAL} create --bundle /b --pid-file /p/init.pid c1")
    assert (a.root, a.log, a.log_format, a.debug) == ("/run/r", "/run/l/log.json", "json", False)
    assert (a.verb, a.bundle, a.pid_file, a.id) == ("create", "/b", "/p/init.pid", "c1")
    assert a.console_socket is None and a.preserve_fds == 0


def test_global_defaults() -> None:
    a = parse("state c1")
    assert (a.root, a.log, a.log_format, a.debug, a.systemd_cgroup) == (
        "/run/cocoon",
        "",
        "text",
        False,
        False,
    )


@pytest.mark.parametrize(
    ("argv", "signal", "all_"),
    [
        ("kill c1 15", "15", False),
        ("kill c1 KILL", "KILL", False),
        ("kill c1", "SIGTERM", False),
        ("kill --all c1 9", "9", True),
        ("kill -a c1 SIGKILL", "SIGKILL", True),
    ],
)
def test_kill(argv: str, signal: str, all_: bool) -> None:
    a = parse(f"{GLOBAL} {argv}")
    assert (a.verb, a.id, a.signal, a.all) == ("kill", "c1", signal, all_)


def test_exec_as_containerd_calls_it() -> None:
    a = parse(f"{GLOBAL} exec --process /tmp/runc-process1 --detach --pid-file /s/e1.pid c1")
    assert (a.verb, a.process, a.detach, a.pid_file, a.id) == (
        "exec",
        "/tmp/runc-process1",
        True,
        "/s/e1.pid",
        "c1",
    )
    assert a.command == [] and a.tty is False and a.console_socket is None


def test_exec_as_conmon_calls_it() -> None:
    a = parse("exec --pid-file /u/exec_pid --process /u/p --detach --tty --console-socket /t/s c1")
    assert (a.pid_file, a.process, a.detach, a.tty, a.console_socket, a.id) == (
        "/u/exec_pid",
        "/u/p",
        True,
        True,
        "/t/s",
        "c1",
    )


@pytest.mark.parametrize(
    ("argv", "command"),
    [
        ("exec c1 ls -la /", ["ls", "-la", "/"]),
        ("exec -t c1 sh -c 'echo hi'", ["sh", "-c", "echo hi"]),
        ("exec c1 -- ls --all", ["ls", "--all"]),
        ("exec -e A=1 -e B=2 -u 1000:1000 --cwd /tmp c1 env", ["env"]),
    ],
)
def test_exec_command_after_the_id(argv: str, command: list[str]) -> None:
    a = parse(argv)
    assert a.id == "c1"
    assert [c for c in a.command if c != "--"] == command


def test_exec_repeatable_flags() -> None:
    a = parse("exec -e A=1 --env B=2 -c CAP_NET_ADMIN -g 10 -g 20 -u 1000 -p /p -d c1")
    assert a.env == ["A=1", "B=2"] and a.cap == ["CAP_NET_ADMIN"]
    assert a.additional_gids == ["10", "20"] and a.user == "1000"
    assert a.process == "/p" and a.detach


@pytest.mark.parametrize(
    ("argv", "force"), [("delete c1", False), ("delete --force c1", True), ("delete -f c1", True)]
)
def test_delete(argv: str, force: bool) -> None:
    a = parse(f"{GLOBAL} {argv}")
    assert (a.verb, a.id, a.force) == ("delete", "c1", force)


def test_update_from_stdin() -> None:
    a = parse(f"{GLOBAL} update --resources - c1")
    assert (a.verb, a.resources, a.id) == ("update", "-", "c1")


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        ("create -b /b c1", {"verb": "create", "bundle": "/b", "id": "c1"}),
        ("create c1", {"verb": "create", "bundle": ".", "id": "c1"}),
        ("create --bundle /b --console-socket /s.sock c1", {"console_socket": "/s.sock"}),
        (
            "create --preserve-fds 2 --no-pivot --no-new-keyring c1",
            {"preserve_fds": 2, "no_pivot": True},
        ),
        ("run -d --bundle /b c1", {"verb": "run", "detach": True, "bundle": "/b"}),
        ("start c1", {"verb": "start", "id": "c1"}),
        ("state c1", {"verb": "state", "id": "c1"}),
        ("pause c1", {"verb": "pause", "id": "c1"}),
        ("resume c1", {"verb": "resume", "id": "c1"}),
        ("ps --format json c1", {"verb": "ps", "format": "json", "id": "c1"}),
        ("ps c1 -- -o pid", {"format": "table", "ps_args": ["-o", "pid"]}),
        ("list -q", {"verb": "list", "quiet": True, "format": "table"}),
        ("list --format json", {"verb": "list", "format": "json"}),
        ("events --stats --interval 1s c1", {"verb": "events", "stats": True, "interval": "1s"}),
        ("spec --rootless -b /x", {"verb": "spec", "rootless": True, "bundle": "/x"}),
        ("features", {"verb": "features"}),
        ("--debug --systemd-cgroup state c1", {"debug": True, "systemd_cgroup": True}),
        ("--version", {"version": True, "verb": None}),
        ("-v", {"version": True}),
    ],
)
def test_runc_verbs(argv: str, expected: dict[str, Any]) -> None:
    got = vars(parse(argv))
    assert {k: got[k] for k in expected} == expected


@pytest.mark.parametrize(
    ("argv", "fragment"),
    [
        ("--bogus state c1", "unrecognized arguments: --bogus"),
        ("create --bogus c1", "unrecognized arguments: --bogus"),
        ("create --root /r c1", "unrecognized arguments: --root"),  # runc: global flags go first
        ("kill c1 9 extra", "unrecognized arguments: extra"),
        ("frobnicate c1", "invalid choice: 'frobnicate'"),
        ("--log-format xml state c1", "invalid choice: 'xml'"),
        ("ps --format yaml c1", "invalid choice: 'yaml'"),
        ("create --preserve-fds many c1", "invalid int value: 'many'"),
        ("create --bundle", "expected one argument"),
        ("--root", "expected one argument"),
    ],
)
def test_bad_argv_is_a_usage_error(argv: str, fragment: str) -> None:
    with pytest.raises(UsageError) as e:
        parse(argv)
    assert fragment in str(e.value)
    assert str(e.value).startswith("cocoon")


ID_VERBS = [
    "create",
    "run",
    "start",
    "state",
    "kill",
    "delete",
    "pause",
    "resume",
    "exec",
    "ps",
    "update",
    "events",
]


@pytest.mark.parametrize("verb", ID_VERBS)
def test_a_missing_id_is_a_usage_error(verb: str) -> None:
    with pytest.raises(
        UsageError, match=rf"^cocoon {verb}: the following arguments are required: .*id"
    ):
        parse(f"{GLOBAL} {verb}")


# runtime-tools' validation calls with the id left out (runc exits 1 on each).
@pytest.mark.parametrize("argv", ["state", "delete", "create --bundle /tmp/ocitest1428020719"])
def test_runtime_tools_calls_without_an_id(argv: str) -> None:
    with pytest.raises(UsageError, match="required: id"):
        parse(argv)


# ------------------------------------------------------------------------------ real callers
# Verbatim from /work/shared/reference/oci-caller-calls.txt (one or more per caller and verb);
# the placeholders are filled in by _fill.
CALLER_LINES = """
containerd | --root /run/containerd/runc/default --log <CTD-STATE>/c4/log.json --log-format json create --bundle <CTD-STATE>/c4 --pid-file <CTD-STATE>/c4/init.pid c4
containerd | --root /run/containerd/runc/default --log <CTD-STATE>/c3/log.json --log-format json create --bundle <CTD-STATE>/c3 --pid-file <CTD-STATE>/c3/init.pid --console-socket /tmp/pty1029635494/pty.sock c3
containerd | --root /run/containerd/runc/default --log <CTD-STATE>/c4/log.json --log-format json start c4
containerd | --root /run/containerd/runc/default --log <CTD-STATE>/c4/log.json --log-format json exec --process /tmp/runc-process580193628 --detach --pid-file <CTD-STATE>/c4/e1.pid c4
containerd | --root /run/containerd/runc/default --log <CTD-STATE>/c4/log.json --log-format json exec --process /tmp/runc-process1668939969 --console-socket /tmp/pty2589130055/pty.sock --detach --pid-file <CTD-STATE>/c4/e2.pid c4
containerd | --root /run/containerd/runc/default --log <CTD-STATE>/c4/log.json --log-format json ps --format json c4
containerd | --root /run/containerd/runc/default --log <CTD-STATE>/c4/log.json --log-format json pause c4
containerd | --root /run/containerd/runc/default --log <CTD-STATE>/c4/log.json --log-format json resume c4
containerd | --root /run/containerd/runc/default --log <CTD-STATE>/c4/log.json --log-format json kill c4 15
containerd | --root /run/containerd/runc/default --log <CTD-STATE>/c5/log.json --log-format json kill --all c5 9
containerd | --root /run/containerd/runc/default --log <CTD-STATE>/c4/log.json --log-format json delete c4
containerd | --root /run/containerd/runc/default --log <CTD-STATE>/c4/log.json --log-format json delete --force c4
cri | --root <containerd-root>/runc-wrapped-root/k8s.io --log <CTD-STATE>/<ID>/log.json --log-format json create --bundle <CTD-STATE>/<ID> --pid-file <CTD-STATE>/<ID>/init.pid <ID>
cri | --root <containerd-root>/runc-wrapped-root/k8s.io --log <CTD-STATE>/<ID>/log.json --log-format json exec --process /tmp/runc-process1929461345 --detach --pid-file <CTD-STATE>/<ID>/<ID>.pid <ID>
cri | --root <containerd-root>/runc-wrapped-root/k8s.io --log <CTD-STATE>/<ID>/log.json --log-format json update --resources - <ID>
cri | --root <containerd-root>/runc-wrapped-root/k8s.io --log <CTD-STATE>/<ID>/log.json --log-format json kill --all <ID> 9
dockerd | --version
dockerd | --root <dockerd-root>/exec/runtime-runc/moby --log <DK-STATE>/<ID>/log.json --log-format json create --bundle <DK-STATE>/<ID> --pid-file <DK-STATE>/<ID>/init.pid --console-socket /tmp/pty2438952548/pty.sock <ID>
dockerd | --debug --root <dockerd-root>/exec/runtime-runc/moby --log <DK-STATE>/<ID>/log.json --log-format json create --bundle <DK-STATE>/<ID> --pid-file <DK-STATE>/<ID>/init.pid <ID>
dockerd | --root <dockerd-root>/exec/runtime-runc/moby --log <DK-STATE>/<ID>/log.json --log-format json exec --process /tmp/runc-process27776834 --console-socket /tmp/pty2413518272/pty.sock --detach --pid-file <DK-STATE>/<ID>/<ID>.pid <ID>
dockerd | --root <dockerd-root>/exec/runtime-runc/moby --log <DK-STATE>/<ID>/log.json --log-format json kill <ID> 1
dockerd | --root <dockerd-root>/exec/runtime-runc/moby --log <DK-STATE>/<ID>/log.json --log-format json update --resources - <ID>
dockerd | --root <dockerd-root>/exec/runtime-runc/moby --log <DK-STATE>/<ID>/log.json --log-format json ps --format json <ID>
podman | create --bundle <podman-root>/root/overlay-containers/<ID>/userdata --pid-file <podman-root>/run/overlay-containers/<ID>/userdata/pidfile --console-socket /tmp/conmon-term.0W2CZ3 <ID>
podman | exec --pid-file <podman-root>/root/overlay-containers/<ID>/userdata/<ID>/exec_pid --process <podman-root>/root/overlay-containers/<ID>/userdata/<ID>/exec-process-3065961891 --detach --tty --console-socket /tmp/conmon-term.SUPBZ3 <ID>
podman | start <ID>
podman | kill <ID> 9
podman | pause <ID>
podman | delete --force <ID>
runtime-tools | create --pid-file /tmp/oci-pid1727633762/pidfile --bundle /tmp/ocitest475360582 7222b9be-7dfd-450f-8bbe-aa90e174c8c7
runtime-tools | state 3470418a-c2b4-4629-a8aa-3592e2aa957b
runtime-tools | kill 7d5c7699-c40c-456e-ac5d-64c654a50773 KILL
runtime-tools | kill KILL
"""  # noqa: E501

# runtime-tools' "kill KILL": for runc the id is KILL and the signal SIGTERM (then "not found").
CALLERS = [tuple(x.split(" | ", 1)) for x in CALLER_LINES.strip().splitlines()]

RUNC_VERBS = {
    "create", "run", "start", "state", "kill", "delete", "pause", "resume", "exec", "ps",
    "list", "update", "events", "spec", "features", "checkpoint", "restore",
}  # fmt: skip

HEX64 = "4f1c" * 16


def _fill(line: str) -> str:
    line = line.replace("<ID>", HEX64)
    return re.sub(r"<([A-Za-z-]+)>", lambda m: "/var/lib/" + m.group(1).lower(), line)


def _check_parsed(a: argparse.Namespace, argv: list[str]) -> None:
    """What the parse must say about an argv line, read off the line itself."""
    if argv == ["--version"]:
        assert a.version and a.verb is None
        return
    verb = next(
        t for t in argv if t in RUNC_VERBS and argv[argv.index(t) - 1] not in ("--log", "--root")
    )
    assert a.verb == verb
    # The id is the first bare word after the verb (runc: flags, then the id, then args).
    after = argv[argv.index(verb) + 1 :]
    i = 0
    while after[i].startswith("-"):
        i += (
            1
            if after[i] in ("--all", "--detach", "--tty", "--force", "-a", "-d", "-t", "-f")
            else 2
        )
    assert a.id == after[i]
    for flag, attr in (
        ("--root", "root"),
        ("--log", "log"),
        ("--log-format", "log_format"),
        ("--bundle", "bundle"),
        ("--pid-file", "pid_file"),
        ("--console-socket", "console_socket"),
        ("--process", "process"),
        ("--resources", "resources"),
        ("--format", "format"),
    ):
        if flag in argv:
            assert getattr(a, attr) == argv[argv.index(flag) + 1], flag
    for flag, attr in (
        ("--detach", "detach"),
        ("--tty", "tty"),
        ("--force", "force"),
        ("--all", "all"),
        ("--debug", "debug"),
    ):
        if flag in argv:
            assert getattr(a, attr) is True, flag
    if verb == "kill" and len(after) > i + 1:
        assert a.signal == after[i + 1] and parse_signal(a.signal) > 0


@pytest.mark.parametrize(
    ("caller", "line"), CALLERS, ids=[f"{c}-{i}" for i, (c, _) in enumerate(CALLERS)]
)
def test_every_callers_argv_parses(caller: str, line: str) -> None:
    argv = shlex.split(_fill(line))
    _check_parsed(parse(argv), argv)


REFERENCE = Path("/work/shared/reference/oci-caller-calls.txt")


def _reference_calls() -> list[tuple[str, int, str]]:
    calls: list[tuple[str, int, str]] = []
    parent, rc = "", 0
    for raw in REFERENCE.read_text().splitlines():
        m = re.search(r"parent=(\S+) rc=(-?\d+)", raw)
        if m:
            parent, rc = m.group(1), int(m.group(2))
        elif raw.strip().startswith("argv:"):
            calls.append((parent, rc, raw.split("argv:", 1)[1].strip()))
    return calls


@pytest.mark.skipif(not REFERENCE.exists(), reason=f"{REFERENCE} is not on this host")
def test_the_whole_reference_file_parses() -> None:
    calls = _reference_calls()
    parsed, refused, parents = 0, [], set()
    parser = build_parser()  # one parser for all 300-odd lines (argparse keeps no state)
    for parent, rc, line in calls:
        argv = shlex.split(_fill(line))
        if not argv or not (argv[0].startswith("-") or argv[0] in RUNC_VERBS):
            continue  # not a runtime invocation
        parents.add(parent)
        try:
            a = parser.parse_args(argv)
        except UsageError:
            assert rc != 0, f"{parent} got rc 0 from runc for {line!r}, cocoon refuses it"
            refused.append(line)
            continue
        _check_parsed(a, argv)
        parsed += 1
    # Not vacuous: every caller is there, and only the id-less runtime-tools probes are refused.
    assert {"containerd-shim-runc-v2", "dockerd", "podman", "conmon", "kill.t"} <= parents
    assert parsed > 250
    idless = [["state"], ["delete"], ["start"], ["create", "--bundle"]]
    assert refused and all(line.split()[:2] in idless or line.split() in idless for line in refused)


def _outcome(parse: Any, argv: list[str]) -> Any:
    try:
        return vars(parse(argv))
    except UsageError as exc:
        return f"refused: {exc}"


@pytest.mark.skipif(not REFERENCE.exists(), reason=f"{REFERENCE} is not on this host")
@pytest.mark.parametrize(
    "extra",
    [
        ["--root=/r", "exec", "c", "true"],  # a flag's value in the same word
        ["--ro", "/r", "state", "c"],  # an abbreviated global flag
        ["--con", "state", "exec", "c", "true"],  # ...whose value is a verb's name
        ["--log", "exec", "state", "c"],
        ["exec", "--bogus", "c"],  # an error: the whole grammar words it
        ["frobnicate", "c"],
        ["--debug"],
        ["image", "build", "--force"],  # a verb with verbs of its own
        ["--", "state", "c"],
    ],
)
def test_a_parser_with_only_the_verbs_grammar_parses_as_the_whole_one(extra: list[str]) -> None:
    """parse_argv builds one verb's sub-parser (~1 ms instead of ~8): every caller's line of
    the reference file, and the odd argv above, parse to the same result or the same error."""
    whole = build_parser()
    lines = [shlex.split(_fill(line)) for _, _, line in _reference_calls()] + [extra]
    for argv in lines:
        assert _outcome(parse_argv, argv) == _outcome(whole.parse_args, argv), argv


# ------------------------------------------------------------------------------ main()
@pytest.fixture(autouse=True)
def _restore_logging() -> Iterator[None]:
    """main() reconfigures the root logger for --log: undo it after each test."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    for h in root.handlers:
        if h not in handlers:
            h.close()
    root.handlers[:] = handlers
    root.setLevel(level)


@pytest.fixture
def isolated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Global flags that keep main() off the host's configuration and state."""
    monkeypatch.delenv("COCOON_CONFIG", raising=False)
    monkeypatch.setenv("COCOON_CONFIG_DIR", str(tmp_path / "conf.d"))
    conf = tmp_path / "cocoon.toml"
    conf.write_text("")
    return ["--root", str(tmp_path / "root"), "--config", str(conf)]


TIME = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ$")


@pytest.mark.parametrize(
    ("argv", "fragment"),
    [
        (["kill"], "the following arguments are required: id"),
        (["create", "--bogus", "c1"], "unrecognized arguments: --bogus"),
        (["--bogus", "state", "c1"], "unrecognized arguments: --bogus"),
        ([], "no command given"),
        (["kill", "c1", "BOGUS"], "unknown signal 'BOGUS'"),
        (["update", "c1"], "nothing to update"),
        (["update", "--memory", "lots", "c1"], "invalid size 'lots'"),
        (["state", "../etc"], "invalid container id '../etc'"),
    ],
)
def test_main_reports_one_line_and_a_runc_json_log(
    tmp_path: Path,
    isolated: list[str],
    capsys: pytest.CaptureFixture[str],
    argv: list[str],
    fragment: str,
) -> None:
    log = tmp_path / "log.json"
    rc = main(["--log", str(log), "--log-format", "json", *isolated, *argv])
    assert rc == 1
    out, err = capsys.readouterr()
    assert out == ""
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("cocoon: ") and fragment in lines[0]
    records = [json.loads(x) for x in log.read_text().splitlines()]
    assert len(records) == 1
    (rec,) = records
    assert list(rec) == ["level", "msg", "time"]
    assert rec["level"] == "error" and fragment in rec["msg"] and TIME.match(rec["time"])


def test_main_text_log(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    log = tmp_path / "log.txt"
    assert main(["--log", str(log), "delete"]) == 1
    text = log.read_text()
    assert "ERROR" in text and "required: id" in text
    with pytest.raises(json.JSONDecodeError):
        json.loads(text.splitlines()[0])


def test_main_without_log_writes_only_stderr(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["start"]) == 1
    out, err = capsys.readouterr()
    assert out == "" and err == "cocoon: cocoon start: the following arguments are required: id\n"


def test_main_version(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--version"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == f"cocoon version {main_mod.VERSION}"
    commits = [line for line in lines if line.startswith("commit: ")]
    assert len(commits) == 1
    assert re.fullmatch(r"commit: ([0-9a-f]{12}|unknown)", commits[0])
    assert "spec: 1.1.0" in lines


SHA = "0123456789abcdef0123456789abcdef01234567"


def _fake_checkout(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, files: dict[str, str]) -> None:
    """main.py as if it lived in a checkout at tmp_path, with these .git files."""
    for name, text in files.items():
        (tmp_path / ".git" / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / ".git" / name).write_text(text)
    monkeypatch.setattr(main_mod, "__file__", str(tmp_path / "runtime" / "cli" / "main.py"))


def _commit_line(capsys: pytest.CaptureFixture[str]) -> str:
    assert main(["--version"]) == 0
    return next(x for x in capsys.readouterr().out.splitlines() if x.startswith("commit: "))


@pytest.mark.parametrize(
    ("files", "expected"),
    [
        ({"HEAD": "ref: refs/heads/main\n", "refs/heads/main": SHA + "\n"}, SHA[:12]),
        ({"HEAD": SHA + "\n"}, SHA[:12]),  # detached
        ({}, "unknown"),
    ],
    ids=["branch", "detached", "no-git"],
)
def test_version_commit_from_the_checkout(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    files: dict[str, str],
    expected: str,
) -> None:
    _fake_checkout(tmp_path, monkeypatch, files)
    assert _commit_line(capsys) == f"commit: {expected}"


def test_version_commit_from_packed_refs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    packed = f"# pack-refs with: peeled fully-peeled sorted\n{SHA} refs/heads/main\n"
    _fake_checkout(tmp_path, monkeypatch, {"HEAD": "ref: refs/heads/main\n", "packed-refs": packed})
    assert _commit_line(capsys) == f"commit: {SHA[:12]}"
