"""Hypothesis strategies the fuzz targets share: JSON values with the awkward corners (huge
ints, NaN, lone surrogates, NUL, newlines, non-ASCII digits), and structure-aware mutation of
a valid document (one field replaced, removed, or added at any depth)."""

from __future__ import annotations

import copy
import math
from typing import Any

from hypothesis import strategies as st

# Strings that have broken parsers before: empty, NUL, newline, lone surrogates (JSON's \ud800
# decodes to one), digits that str.isdigit() accepts but int() does not, numbers in disguise.
ODD_STRINGS = [
    "",
    " ",
    "\x00",
    "a\x00b",
    "x\ny",
    "\r\n",
    "\ud800",
    "\udcff",
    "\u00b2",  # superscript two: isdigit() but not int()
    "\u0661",  # Arabic-Indic one: int() takes it
    "\U0001d7d9",  # mathematical double-struck one
    "-1",
    "0",
    " 1 ",
    "1_000",
    "0x10",
    "1e3",
    "NaN",
    "inf",
    "9" * 5000,
    "/",
    "..",
    ".",
    "../../etc",
    "/dev/null",
    "/proc/1/ns/net",
    "/dev/vfio/1",
    "/dev/vfio/\u00b2",
    "sandbox",
    "container",
    "podsandbox",
    "io.cocoon.config.network.queues",
    "SIGKILL",
    "a" * 300,
    "\u00e9t\u00e9",
    "\U0001f600",
]

odd_text = st.one_of(st.sampled_from(ODD_STRINGS), st.text(max_size=20))
odd_ints = st.one_of(
    st.sampled_from([0, 1, -1, 2**31 - 1, 2**31, 2**32, 2**63 - 1, 2**63, 2**64, -(2**63)]),
    st.integers(min_value=-(2**70), max_value=2**70),
)
odd_floats = st.one_of(
    st.sampled_from([math.nan, math.inf, -math.inf, 0.5, -0.0, 1e308]), st.floats()
)
json_scalars = st.one_of(st.none(), st.booleans(), odd_ints, odd_floats, odd_text)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(odd_text, inner, max_size=4)
    ),
    max_leaves=12,
)


def paths(doc: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Every path into ``doc`` (dict keys and list indices), the root included."""
    out = [prefix]
    if isinstance(doc, dict):
        for k, v in doc.items():
            out += paths(v, (*prefix, k))
    elif isinstance(doc, list):
        for i, v in enumerate(doc):
            out += paths(v, (*prefix, i))
    return out


def _parent(doc: Any, path: tuple[Any, ...]) -> Any:
    for p in path[:-1]:
        doc = doc[p]
    return doc


def apply(doc: Any, path: tuple[Any, ...], action: str, value: Any) -> Any:
    """``doc`` (copied) with the field at ``path`` replaced, removed, or given a new key."""
    doc = copy.deepcopy(doc)
    if not path:
        return value if action == "replace" else doc
    parent = _parent(doc, path)
    if action == "replace":
        parent[path[-1]] = value
    elif action == "remove":
        del parent[path[-1]]
    elif action == "add" and isinstance(parent[path[-1]], dict):
        parent[path[-1]]["x-fuzz" if not isinstance(value, str) else value] = value
    elif action == "add" and isinstance(parent[path[-1]], list):
        parent[path[-1]].append(value)
    else:
        parent[path[-1]] = value
    return doc


def set_path(doc: Any, path: tuple[Any, ...], value: Any) -> Any:
    """``doc`` (copied) with ``value`` at ``path``, making the objects on the way."""
    doc = copy.deepcopy(doc)
    cur = doc
    for p in path[:-1]:
        if isinstance(cur, dict):
            if not isinstance(cur.get(p), dict | list):
                cur[p] = {}
            cur = cur[p]
        elif isinstance(cur, list) and isinstance(p, int) and p < len(cur):
            cur = cur[p]
        else:
            return doc
    if isinstance(cur, dict) or (isinstance(cur, list) and path[-1] < len(cur)):
        cur[path[-1]] = value
    return doc


Mutation = tuple[tuple[Any, ...], str, Any]  # (path, action, value)


@st.composite
def mutations(draw: st.DrawFn, doc: Any, known: list[tuple[Any, ...]]) -> Mutation:
    """One field of ``doc`` to break: any existing field replaced, removed or added to, or
    one of the ``known`` paths (fields the code reads that ``doc`` may not have) set to
    anything. The test applies it with ``mutate`` (so a failure prints the mutation, not the
    whole document, and ``@example`` can name one)."""
    use_known: bool = draw(st.booleans())
    if known and use_known:
        return draw(st.sampled_from(known)), "set", draw(json_values)
    path = draw(st.sampled_from(paths(doc)))
    return path, draw(st.sampled_from(["replace", "remove", "add"])), draw(json_values)


def mutate(doc: Any, m: Mutation) -> Any:
    path, action, value = m
    if action == "set":
        return set_path(doc, path, value)
    return apply(doc, path, action, value)
