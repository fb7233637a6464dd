"""The shim's own line codec and command line (shim/main.py does without json's and
argparse's Python halves): each agrees with the standard library's, and refuses what it
would."""

from __future__ import annotations

import json

import pytest

from cocoon.shim import main as shim


@pytest.mark.parametrize(
    "msg",
    [
        {"container_id": "c1", "exec_id": "", "stream": "stdout"},
        {"container_id": 'odd "id"\\\n\t\u00e9\u2603\U0001f600', "exec_id": "e", "stream": "stdin"},
        {"size": 12, "terminal": True, "stdin": False, "close": False},
        {"resize": [24, 80]},
        {"signal": 15},
        {},
    ],
)
def test_dumps_writes_the_json_line_the_standard_library_reads(msg: dict[str, object]) -> None:
    line = shim.dumps(msg)
    assert line.endswith(b"\n") and line.count(b"\n") == 1
    assert json.loads(line) == msg
    assert shim.loads(line) == msg


def test_dumps_refuses_what_it_cannot_write() -> None:
    with pytest.raises(TypeError):
        shim.dumps({"x": 1.5})


@pytest.mark.parametrize(
    "line",
    [
        b'{"exit": 0}\n',
        b'{"lost": "the agent went away: \\u00e9"}\n',
        b'{"error": "no such process", "code": "NOT_FOUND"}\n',
        b'{"started": true}',
        b"[1, 2.5, null, NaN]\n",
    ],
)
def test_loads_reads_what_json_reads(line: bytes) -> None:
    assert repr(shim.loads(line)) == repr(json.loads(line))


@pytest.mark.parametrize(
    "line", [b"", b"\n", b"{", b'{"exit": 0} x', b"{'exit': 0}", b'{"exit": 0}{}', b"\xff"]
)
def test_loads_refuses_what_json_refuses(line: bytes) -> None:
    with pytest.raises(ValueError):
        json.loads(line)
    with pytest.raises(ValueError):
        shim.loads(line)


def test_args_reads_the_line_the_runtime_writes() -> None:
    a = shim.Args(
        ["--sandbox-dir", "/s", "--container", "c1", "--exec-id=e1", "--terminal",
         "--console-socket", "/c.sock", "--ready-fd", "3", "--process-fd", "4", "--go-fd=5",
         "--netns", "/n", "--ns", "ipc=/proc/1/ns/ipc", "--ns", "uts"]
    )  # fmt: skip
    assert (a.sandbox_dir, a.container, a.exec_id, a.console_socket) == (
        "/s",
        "c1",
        "e1",
        "/c.sock",
    )
    assert (a.ready_fd, a.process_fd, a.go_fd, a.terminal) == (3, 4, 5, True)
    assert (a.netns, a.ns) == ("/n", ["ipc=/proc/1/ns/ipc", "uts"])
    b = shim.Args(["--container", "c", "--sandbox-dir", "/s"])
    assert (b.exec_id, b.console_socket, b.ready_fd, b.terminal, b.ns) == ("", None, -1, False, [])


@pytest.mark.parametrize(
    ("argv", "says"),
    [
        (["--container", "c"], "required: --sandbox-dir"),
        (["--sandbox-dir", "/s"], "required: --container"),
        (["--sandbox-dir", "/s", "--container", "c", "--bogus"], "unrecognized argument: --bogus"),
        (["--sandbox-dir", "/s", "--container", "c", "--ready-fd", "x"], "invalid int value"),
        (["--sandbox-dir", "/s", "--container", "c", "--ready-fd"], "expected one argument"),
        (["--sandbox-dir", "/s", "--container", "c", "--terminal=1"], "unrecognized argument"),
    ],
)
def test_a_bad_line_is_one_usage_error_and_status_2(
    argv: list[str], says: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert shim.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: cocoon-shim") and says in err
