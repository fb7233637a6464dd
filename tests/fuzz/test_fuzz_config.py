"""Fuzz configuration.toml and its drop-ins (config.load), the ``io.cocoon.config.*``
annotation overrides (config.with_annotations) and the pod annotations (pod.membership): a
value of any type for any key, unknown keys and tables, broken TOML bytes, odd drop-in names.
Each is loaded, or refused with one ConfigError (SpecError, StateError for the pod's) of one
line."""

from __future__ import annotations

import itertools
import math
from pathlib import Path
from typing import Any

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from cocoon.runtime import config as cfgmod
from cocoon.runtime.config import ANNOTATABLE, ANNOTATION_PREFIX, Config
from cocoon.runtime.container.spec import NS_FILES
from cocoon.runtime.errors import ConfigError
from cocoon.runtime.pod import membership as pod
from tests.fuzz.conftest import check_clean
from tests.fuzz.strategies import odd_floats, odd_ints, odd_text

pytestmark = pytest.mark.fuzz

_n = itertools.count()
KEYS = [f"{t}.{k}" for t, keys in cfgmod._FIELDS.items() for k in keys]

# TOML text is UTF-8: no lone surrogates (test_any_bytes_as_the_main_file covers bad bytes).
toml_text = odd_text.map(lambda s: "".join(c for c in s if not 0xD800 <= ord(c) < 0xE000))
toml_scalars = st.one_of(
    st.booleans(), odd_ints.filter(lambda i: -(2**63) <= i < 2**63), odd_floats, toml_text
)
toml_values = st.recursive(
    toml_scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=3),
        st.dictionaries(st.sampled_from(["a", "b", "k"]), inner, max_size=2),
    ),
    max_leaves=6,
)


def toml(v: Any) -> str:
    """``v`` as a TOML value (inline tables for dicts)."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        if math.isinf(v):
            return "inf" if v > 0 else "-inf"
        return repr(v)
    if isinstance(v, str):
        return cfgmod._toml_str(v)
    if isinstance(v, list):
        return "[" + ", ".join(toml(x) for x in v) + "]"
    return "{" + ", ".join(f"{k} = {toml(x)}" for k, x in v.items()) + "}"


def _dir(tmp: Path) -> Path:
    d = tmp / f"c{next(_n)}"
    d.mkdir()
    return d


def check_load(main: Path | None, dropins: Path) -> None:
    try:
        loaded = cfgmod.load(main, dropins, environ={})
    except Exception as exc:
        check_clean(exc)
        return
    cfgmod.validate(loaded.config)
    # What `cocoon env` prints loads back to the same configuration.
    again = _dir(dropins.parent) / "again.toml"
    again.write_text(cfgmod.to_toml(loaded.config))
    assert cfgmod.load(again, dropins.parent / "none", environ={}).config == loaded.config


@given(key=st.sampled_from(KEYS), value=toml_values)
@example(key="agent.request_timeout_s", value=math.nan)
@example(key="hypervisor.default_vcpus", value=2**63 - 1)
@example(key="hypervisor.kernel_params", value=["a\nb"])
@example(key="image.kernel", value="\x7f")
def test_any_value_for_a_known_key(tmp_path: Path, key: str, value: Any) -> None:
    d = _dir(tmp_path)
    table, name = key.split(".")
    (d / "main.toml").write_text(f"[{table}]\n{name} = {toml(value)}\n")
    check_load(d / "main.toml", d / "config.d")


@given(table=toml_text, key=toml_text, value=toml_values)
def test_unknown_tables_and_keys(tmp_path: Path, table: str, key: str, value: Any) -> None:
    d = _dir(tmp_path)
    (d / "main.toml").write_text(
        f"[{cfgmod._toml_str(table)}]\n{cfgmod._toml_str(key)} = {toml(value)}\n"
    )
    check_load(d / "main.toml", d / "config.d")


@given(raw=st.one_of(st.binary(max_size=300), st.text(max_size=300).map(str.encode)))
@example(raw=b"[hypervisor]\ndefault_vcpus = 1\n[hypervisor]\n")
@example(raw=b"\xff\xfe[")
@example(raw=b"a = [" * 2000)
@example(raw=b"hypervisor = 1\n")
def test_any_bytes_as_the_main_file(tmp_path: Path, raw: bytes) -> None:
    d = _dir(tmp_path)
    (d / "main.toml").write_bytes(raw)
    check_load(d / "main.toml", d / "config.d")


@given(
    files=st.lists(
        st.tuples(
            st.sampled_from(["10-a.toml", "20-b.toml", ".hidden.toml", "x.conf", "dir.toml"]),
            st.sampled_from(KEYS),
            toml_values,
        ),
        max_size=4,
    )
)
def test_dropins(tmp_path: Path, files: list[tuple[str, str, Any]]) -> None:
    d = _dir(tmp_path)
    dropins = d / "config.d"
    dropins.mkdir()
    for name, key, value in files:
        table, k = key.split(".")
        p = dropins / name
        if name == "dir.toml":
            p.mkdir(exist_ok=True)
            continue
        p.write_text(f"[{table}]\n{k} = {toml(value)}\n")
    check_load(None, dropins)


def test_dropin_dir_that_is_a_file(tmp_path: Path) -> None:
    f = tmp_path / "config.d"
    f.write_text("")
    check_load(None, f)


# ------------------------------------------------------------------------------ annotations
annotation_keys = st.one_of(
    st.sampled_from([ANNOTATION_PREFIX + k for k in ANNOTATABLE]),
    st.sampled_from(
        [
            ANNOTATION_PREFIX + "hypervisor.path",
            ANNOTATION_PREFIX + "network",
            ANNOTATION_PREFIX,
            ANNOTATION_PREFIX + "network.queues.x",
            "io.cocoon.config",
        ]
    ),
    # Printable and short under the prefix: see test_annotation_name_in_the_error_is_escaped.
    odd_text.filter(lambda s: s.isprintable() and len(s) < 100).map(
        lambda s: ANNOTATION_PREFIX + s
    ),
    odd_text,
)
annotation_values = st.one_of(
    st.sampled_from(["0", "1", "8", "9", "-1", "tcfilter", "macvtap", "none", "1" * 5000]),
    odd_text,
    odd_ints.map(str),
)


@given(annotations=st.dictionaries(annotation_keys, annotation_values, max_size=4))
@example(annotations={ANNOTATION_PREFIX + "network.queues": "\u0661"})
@example(annotations={ANNOTATION_PREFIX + "network.queues": "9" * 5000})
@example(annotations={ANNOTATION_PREFIX + "network.queues": " 2\n"})
def test_config_annotations(annotations: dict[str, str]) -> None:
    try:
        cfg = cfgmod.with_annotations(Config(), annotations)
    except Exception as exc:
        check_clean(exc)
        return
    cfgmod.validate(cfg)


POD_KEYS = [
    "io.kubernetes.cri.container-type",
    "io.kubernetes.cri.sandbox-id",
    "io.kubernetes.cri-o.ContainerType",
    "io.kubernetes.cri-o.SandboxID",
    "io.kubernetes.docker.type",
    "io.kubernetes.sandbox.id",
]


@given(
    cid=st.sampled_from(["c1", "sb", "a.b-c_d+e"]),  # create checked the id before
    annotations=st.dictionaries(
        st.one_of(st.sampled_from(POD_KEYS), odd_text),
        st.one_of(st.sampled_from(["sandbox", "container", "podsandbox", "c1", "sb"]), odd_text),
        max_size=4,
    ),
)
def test_pod_membership(cid: str, annotations: dict[str, str]) -> None:
    try:
        m = pod.membership(cid, annotations)
    except Exception as exc:
        check_clean(exc)
        return
    if m.role is pod.Role.MEMBER:
        assert m.sandbox_id and m.sandbox_id != cid


ns_types = st.one_of(st.sampled_from(list(NS_FILES)), odd_text)
ns_paths = st.one_of(
    st.sampled_from(["", "/proc/42/ns/net", "/proc/42/ns/pid", "/proc/7/ns/net", "/run/pinns/x"]),
    odd_text,
    st.integers(0, 2**70).map(lambda n: f"/proc/{n}/ns/net"),
)


@given(
    namespaces=st.lists(
        st.fixed_dictionaries({"type": ns_types}, optional={"path": ns_paths}), max_size=5
    ),
    sandbox_paths=st.dictionaries(ns_types, ns_paths, max_size=3),
)
@example(namespaces=[{"type": "network", "path": "/proc/42/ns/net"}], sandbox_paths={})
@example(namespaces=[{"type": "pid", "path": "x\ny"}], sandbox_paths={})  # two lines
@example(  # KeyError
    namespaces=[{"type": "bogus", "path": "/x"}], sandbox_paths={"bogus": "/x"}
)
def test_pod_guest_namespaces(
    namespaces: list[dict[str, object]], sandbox_paths: dict[str, str]
) -> None:
    try:
        out = pod.guest_namespaces("c1", namespaces, "sb", 42, sandbox_paths)
    except Exception as exc:
        check_clean(exc)
        return
    assert len(out) == len(namespaces)


@pytest.mark.parametrize("suffix", ["\r", "x\ny", "9" * 10_000])
def test_annotation_name_in_the_error_is_escaped(suffix: str) -> None:
    with pytest.raises(ConfigError) as e:
        cfgmod.with_annotations(Config(), {ANNOTATION_PREFIX + suffix: "1"})
    check_clean(e.value)
