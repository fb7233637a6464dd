"""Container and sandbox ids (runtime/container/ids.py): what is accepted, what is refused, and
that no accepted id can name anything but a direct child of the state directory."""

from __future__ import annotations

import itertools
import os
from pathlib import Path

import pytest

from cocoon.runtime.container.ids import MAX_ID_LEN, validate_id
from cocoon.runtime.errors import StateError

ACCEPTED = [
    "a",
    "c4",
    "w14",
    "ABC",
    "0",
    "a_b",
    "a-b",
    "a.b",
    "a+b",
    "...",  # three dots: an ordinary directory name, not a parent reference
    ".hidden",
    "-leading-dash",  # runc accepts it too; it is never put on a command line unquoted
    "7d5c7699-c40c-456e-ac5d-64c654a50773",  # runtime-tools' uuids
    "0123456789abcdef" * 4,  # containerd/dockerd: 64 hex digits
    "k8s_POD_nginx_default_1234.5+x",
]

REFUSED = [
    "",
    ".",
    "..",
    "/",
    "../x",
    "x/..",
    "a/b",
    "/abs",
    "./a",
    "a\\b",
    "a\x00b",
    "\x00",
    "a b",
    " a",
    "a ",
    "a\tb",
    "a\nb",
    "\na",
    "a:b",
    "a;b",
    "a*",
    "a?b",
    "a$b",
    "~",
    "a%2fb",
    "a@b",
    "a,b",
    "a'b",
    'a"b',
]


@pytest.mark.parametrize("cid", ACCEPTED)
def test_accepted_ids_come_back_unchanged(cid: str) -> None:
    assert validate_id(cid) == cid


@pytest.mark.parametrize("cid", REFUSED)
def test_refused_ids_raise_state_error_naming_the_id(cid: str) -> None:
    with pytest.raises(StateError) as e:
        validate_id(cid)
    msg = str(e.value)
    assert msg.startswith("invalid container id")
    if cid:
        assert repr(cid) in msg


def test_empty_id_says_it_is_empty() -> None:
    with pytest.raises(StateError, match="it is empty"):
        validate_id("")


def test_the_kind_of_id_is_named() -> None:
    with pytest.raises(StateError, match=r"^invalid sandbox id '\.\.'"):
        validate_id("..", "sandbox")
    assert validate_id("sb-1", "sandbox") == "sb-1"


def test_length_limit_is_name_max() -> None:
    assert MAX_ID_LEN == 255
    assert validate_id("a" * 255) == "a" * 255
    with pytest.raises(StateError, match="longer than 255 bytes"):
        validate_id("a" * 256)
    with pytest.raises(StateError, match="longer than 255"):
        validate_id("a" * 4096)


def test_a_255_character_id_is_a_valid_directory_name(tmp_path: Path) -> None:
    d = tmp_path / validate_id("x" * 255)
    d.mkdir()
    assert d.is_dir()


# In Python, r"\w" on a str pattern is Unicode-aware: letters and digits of any script pass.
# (runc's Go regexp `\w` is ASCII-only: runc refuses these; cocoon, more permissive, accepts
# them, which is harmless for the state directory: they are still plain names.)
@pytest.mark.parametrize("cid", ["café", "容器", "ид-1", "ａｂｃ", "x٣"])  # noqa: RUF001
def test_unicode_word_characters_are_accepted(cid: str) -> None:
    assert validate_id(cid) == cid


@pytest.mark.parametrize(
    "cid",
    [
        "a\u200bb",  # zero-width space
        "a\u202eb",  # right-to-left override
        "a\u00a0b",  # no-break space
        "a\u2044b",  # fraction slash
        "a\u2215b",  # division slash (looks like '/')
        "a\uff0fb",  # fullwidth solidus
        "\u2025",  # two-dot leader (looks like '..')
    ],
)
def test_unicode_non_word_characters_are_refused(cid: str) -> None:
    with pytest.raises(StateError):
        validate_id(cid)


@pytest.mark.parametrize("cid", ["abc\n", "..\n", "a\n"])
def test_a_trailing_newline_is_refused(cid: str) -> None:
    with pytest.raises(StateError):
        validate_id(cid)


def test_length_limit_counts_bytes_not_characters() -> None:
    cid = "é" * 255  # 510 bytes in UTF-8
    assert len(os.fsencode(cid)) > 255
    with pytest.raises(StateError):
        validate_id(cid)


def _candidates() -> list[str]:
    alphabet = [".", "/", "a", "\\", "\x00", "\n", " "]
    out = []
    for n in range(1, 5):
        out += ["".join(p) for p in itertools.product(alphabet, repeat=n)]
    return [*out, "../../etc", "..%2f..", "a/../../b", "/..", "....//", "\u2025/x"]


def test_no_accepted_id_escapes_the_state_directory(tmp_path: Path) -> None:
    root = tmp_path / "containers"
    root.mkdir()
    accepted = []
    for cid in _candidates():
        try:
            validate_id(cid)
        except StateError:
            continue
        accepted.append(cid)
        assert "/" not in cid and "\x00" not in cid and cid not in (".", "..")
        target = (root / cid).resolve()
        assert target.parent == root.resolve(), cid
        assert target.name == cid
    # The property is not vacuous: plain names and dot-runs of three or more do pass.
    assert "a" in accepted and "..." in accepted and "a.a" in accepted
