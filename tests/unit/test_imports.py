"""Contracts that cannot drift: every module's "May import:" line against its real imports,
and the CLI's promise that its light verbs load no gRPC and no image builder."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PACKAGES = {  # folder -> import name
    "runtime": "cocoon.runtime",
    "agent": "cocoon.agent",
    "shim": "cocoon.shim",
    "guest-image": "cocoon.guest_image",
    "testing": "cocoon.testing",
}
STDLIB = "the standard library"


def modules() -> list[tuple[str, Path]]:
    out = []
    for folder, name in PACKAGES.items():
        for path in sorted((REPO / folder).rglob("*.py")):
            if path.name.endswith(("_pb2.py", "_pb2_grpc.py")):
                continue  # generated
            rel = path.relative_to(REPO / folder).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            out.append((".".join([name, *parts]), path))
    return out


def _split_top(text: str) -> list[str]:
    """Splits on commas outside braces."""
    out, depth, cur = [], 0, ""
    for ch in text:
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
        if ch == "," and depth == 0:
            out.append(cur)
            cur = ""
        else:
            cur += ch
    out.append(cur)
    return [x.strip() for x in out if x.strip()]


def _strip_notes(text: str) -> str:
    """Removes parenthesised notes, e.g. "(lazily)"."""
    out, depth = "", 0
    for ch in text:
        if ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
        elif depth == 0:
            out += ch
    return out


def expand(entry: str) -> list[str]:
    """``a.{b, c.{d, e}}`` -> [a.b, a.c.d, a.c.e]; a trailing ``.*`` means the package."""
    entry = " ".join(entry.split())
    if "{" not in entry:
        return [entry.removesuffix(".*").strip()]
    head, _, rest = entry.partition("{")
    inner = rest[: rest.rindex("}")]
    return [head + x for part in _split_top(inner) for x in expand(part)]


def parse_may_import(doc: str) -> list[str] | None:
    """The entries of a docstring's "May import:" paragraph, or None if it has none."""
    at = doc.find("May import:")
    if at < 0:
        return None
    text = doc[at + len("May import:") :].split("\n\n")[0]
    end = len(text)  # the list ends at the first period followed by whitespace (or the end)
    depth = 0
    for i, ch in enumerate(text):
        depth += ch == "("
        depth -= ch == ")"
        if ch == "." and depth == 0 and (i + 1 == len(text) or text[i + 1].isspace()):
            end = i
            break
    text = _strip_notes(text[:end].replace("\n", " "))
    text = text.replace(" and ", ", ").replace(" only", "")
    entries: list[str] = []
    for part in _split_top(text):
        entries += expand(part)
    return [e for e in entries if e]


def real_imports(path: Path, module: str) -> set[str]:
    """Every module ``path`` imports, anywhere in it (top level or inside functions)."""
    tree = ast.parse(path.read_text())
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1])
                base = f"{base}.{node.module}" if node.module else base
            if base == "__future__":
                continue
            # `from pkg import mod` imports pkg.mod when mod is a module; else pkg itself.
            for a in node.names:
                found.add(f"{base}.{a.name}" if base.startswith("cocoon") else base)
    return found


def allowed(imported: str, entries: list[str], own: str) -> bool:
    top = imported.split(".")[0]
    if top in sys.stdlib_module_names:
        return STDLIB in entries
    if imported == own or imported.startswith(own + "."):
        return True  # a module's own submodules (a package's __init__)
    for e in entries:
        if imported == e or imported.startswith(e + "."):
            return True
        # `from cocoon.runtime.errors import X` is recorded as cocoon.runtime.errors.X
        if e.startswith("cocoon") and imported.rpartition(".")[0] == e:
            return True
    return False


MODULES = modules()


@pytest.mark.parametrize(("module", "path"), MODULES, ids=[m for m, _ in MODULES])
def test_every_module_keeps_its_may_import_line(module: str, path: Path) -> None:
    doc = ast.get_docstring(ast.parse(path.read_text())) or ""
    entries = parse_may_import(doc)
    assert entries is not None, f"{path.relative_to(REPO)}: no 'May import:' line in its docstring"
    if entries == ["nothing"]:
        return
    bad = sorted(i for i in real_imports(path, module) if not allowed(i, entries, module))
    assert not bad, f"{path.relative_to(REPO)} imports {bad}, beyond its line: {entries}"


def test_the_parser_reads_nested_lists_and_notes() -> None:
    doc = (
        "x\n\nMay import: the standard library, grpc, cocoon.runtime.{errors, container.{spec,\n"
        "state}, network (lazily)}. Never the CLI.\n"
    )
    assert parse_may_import(doc) == [
        STDLIB,
        "grpc",
        "cocoon.runtime.errors",
        "cocoon.runtime.container.spec",
        "cocoon.runtime.container.state",
        "cocoon.runtime.network",
    ]
    assert not allowed("cocoon.runtime.cli.main", parse_may_import(doc) or [], "cocoon.x")
    assert allowed("cocoon.runtime.errors.StateError", parse_may_import(doc) or [], "cocoon.x")
    assert not allowed("os", ["grpc"], "cocoon.x")


def test_the_agent_never_imports_the_host_side() -> None:
    for module, path in MODULES:
        if module.startswith("cocoon.agent"):
            bad = {
                i
                for i in real_imports(path, module)
                if i.startswith(("cocoon.runtime", "cocoon.shim"))
            }
            assert not bad, f"{path}: the guest agent imports {bad}"


@pytest.mark.parametrize("argv", [["--version"], ["state", "nosuch"], ["list"]])
def test_light_cli_verbs_load_no_grpc_and_no_image_builder(argv: list[str], tmp_path: Path) -> None:
    code = (
        "import json, sys\n"
        "from cocoon.runtime.cli.main import main\n"
        f"main(['--root', {str(tmp_path)!r}, *{argv!r}])\n"
        "heavy = sorted(m for m in sys.modules if m.split('.')[0] == 'grpc'\n"
        "               or m.startswith(('cocoon.guest_image', 'google.protobuf',\n"
        "                                'cocoon.runtime.container.lifecycle')))\n"
        "print(json.dumps(heavy))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert json.loads(out.stdout.splitlines()[-1]) == [], f"cocoon {' '.join(argv)} loaded them"


@pytest.mark.parametrize(
    "argv",
    [
        ["run", "--bundle", "/nonexistent", "c1"],
        ["create", "--bundle", "/nonexistent", "c1"],
        ["start", "c1"],
        ["kill", "c1", "KILL"],
        ["delete", "--force", "c1"],
        ["exec", "c1", "true"],
        ["pool", "status"],
    ],
)
def test_container_verbs_load_neither_grpc_nor_protobuf(argv: list[str], tmp_path: Path) -> None:
    """The CLI calls its sandbox as JSON (sandbox.client): ~95 ms of imports a call saved."""
    code = (
        "import json, sys\n"
        "from cocoon.runtime.cli.main import main\n"
        "from cocoon.runtime.container import create, lifecycle, warm\n"
        "from cocoon.runtime.sandbox import pool\n"
        "try:\n"
        f"    main(['--root', {str(tmp_path)!r}, *{argv!r}])\n"
        "except SystemExit:\n"
        "    pass\n"
        "heavy = sorted(m for m in sys.modules\n"
        "               if m.split('.')[0] == 'grpc' or m.startswith('google.protobuf')\n"
        "               or m.endswith('_pb2'))\n"
        "print(json.dumps(heavy))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert json.loads(out.stdout.splitlines()[-1]) == [], f"cocoon {' '.join(argv)} loaded them"


def test_a_shims_start_loads_none_of_the_heavy_wrappers() -> None:
    """One shim runs per container process: its start loads the interpreter's built-in
    modules, not the standard library's wrappers over them (~2 MiB of private memory each
    shim; shim/main.py's docstring, docs/performance.md)."""
    code = (
        "import sys\n"
        "base = set(sys.modules)\n"
        "from cocoon.shim import main as m\n"
        "m.Args(['--sandbox-dir', '/x', '--container', 'c', '--ns', 'ipc', '--ready-fd', '3'])\n"
        "m.loads(m.dumps({'exit': 0, 'started': True, 'x': [1, 2], 'y': 'z'}))\n"
        "print(repr(sorted(set(sys.modules) - base)))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    loaded = set(ast.literal_eval(out.stdout.splitlines()[-1]))
    heavy = {"argparse", "collections", "contextlib", "ctypes", "enum", "gettext", "json",
             "re", "selectors", "signal", "socket", "threading", "typing"}  # fmt: skip
    assert "cocoon.shim.main" in loaded
    assert not loaded & heavy, f"a shim's start loads {sorted(loaded & heavy)}"


def test_a_shim_started_as_the_runtime_starts_one_loads_neither_site_nor_runpy() -> None:
    """The runtime's own command line for a shim (``container.shim.command``): its whole
    start, up to failing to reach a monitor that is not there, imports no ``site`` (the
    venv's .pth files), no ``runpy`` (``python -m``) and none of what they bring, and it
    runs the shim of this tree even when the caller's PYTHONPATH names another."""
    from cocoon.runtime.container import shim as shimmod

    argv = shimmod.command(["--sandbox-dir", "/nonexistent/sandbox", "--container", "c"])
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": "/nonexistent/elsewhere"}
    out = subprocess.run(
        [argv[0], "-X", "importtime", *argv[1:]], capture_output=True, text=True, env=env
    )
    assert out.returncode == 255, out.stderr  # the monitor is not there
    assert "cocoon-shim: /nonexistent/sandbox/stdio.sock" in out.stderr, out.stderr
    loaded = {
        line.split("|")[-1].strip()
        for line in out.stderr.splitlines()
        if line.startswith("import time:") and "|" in line
    }
    assert "cocoon.shim.main" in loaded and "encodings" in loaded, out.stderr
    unwanted = {"site", "runpy", "importlib.util", "contextlib", "collections", "functools",
                "_distutils_hack", "sitecustomize", "enum", "re", "json", "socket",
                "threading"}  # fmt: skip
    assert not loaded & unwanted, f"a shim's start loads {sorted(loaded & unwanted)}"
