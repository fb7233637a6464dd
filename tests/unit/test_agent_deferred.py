"""The agent's deferred imports: ``asyncio`` and ``grpc.aio`` stand in until first used.

Each case runs in a fresh interpreter: they replace real modules in ``sys.modules``.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[2] / ".pkg"


def run_py(code: str, tmp_path: Path) -> list[str]:
    env = {**os.environ, "PYTHONPATH": f"{tmp_path}{os.pathsep}{PKG}"}
    out = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    return out.stdout.split()


@pytest.fixture
def fake_pkg(tmp_path: Path) -> Path:
    """``pkgx`` imports its own submodule ``sub`` the way grpc imports ``grpc.aio``, and
    ``heavy`` (a plain module) the way cygrpc imports asyncio; ``sub`` and ``heavy`` write a
    marker when they really run."""
    (tmp_path / "pkgx").mkdir()
    (tmp_path / "pkgx" / "__init__.py").write_text(
        "import heavy\nfrom pkgx import sub\nVALUE = 1\n"
    )
    (tmp_path / "pkgx" / "sub.py").write_text(
        "import heavy\nprint('RAN-sub')\nANSWER = heavy.BASE + 1\n"
    )
    (tmp_path / "heavy.py").write_text("print('RAN-heavy')\nBASE = 41\n")
    (tmp_path / "broken.py").write_text("raise ImportError('broken on purpose')\n")
    return tmp_path


def test_an_import_of_a_deferred_name_does_not_run_it(fake_pkg: Path) -> None:
    out = run_py(
        """
        from cocoon.agent import deferred
        deferred.install(["heavy", "pkgx.sub"])
        import pkgx
        print("VALUE", pkgx.VALUE, *deferred.pending())
        """,
        fake_pkg,
    )
    assert out == ["VALUE", "1", "heavy", "pkgx.sub"]


def test_the_first_attribute_read_imports_the_real_module_once(fake_pkg: Path) -> None:
    # pkgx.sub reads heavy.BASE while it loads: one deferred module loading another (grpc.aio
    # and asyncio) must not deadlock on the loader's lock.
    out = run_py(
        """
        import sys
        from cocoon.agent import deferred
        deferred.install(["heavy", "pkgx.sub"])
        import pkgx
        stand_in = pkgx.sub
        print("ANSWER", stand_in.ANSWER, stand_in.ANSWER)
        print("REAL", type(sys.modules["pkgx.sub"]).__name__, sys.modules["pkgx.sub"] is pkgx.sub)
        real = [type(sys.modules[n]) is type(sys) for n in ("heavy", "pkgx.sub")]
        print("LOADED", *real)
        print(len(deferred.pending()))
        """,
        fake_pkg,
    )
    assert out == [
        "RAN-sub",  # sub prints before it reads heavy.BASE
        "RAN-heavy",
        "ANSWER", "42", "42",
        "REAL", "module", "True",
        "LOADED", "True", "True", "0",
    ]  # fmt: skip


def test_threads_racing_on_first_use_import_it_once(fake_pkg: Path) -> None:
    out = run_py(
        """
        import threading
        from cocoon.agent import deferred
        deferred.install(["heavy"])
        import heavy
        got = []
        ts = [threading.Thread(target=lambda: got.append(heavy.BASE)) for _ in range(16)]
        for t in ts: t.start()
        for t in ts: t.join()
        print("GOT", len(got), set(got))
        """,
        fake_pkg,
    )
    assert out == ["RAN-heavy", "GOT", "16", "{41}"]


def test_a_module_that_fails_to_import_raises_and_stays_deferred(fake_pkg: Path) -> None:
    out = run_py(
        """
        import sys
        from cocoon.agent import deferred
        deferred.install(["broken", "heavy"])
        import broken
        for _ in range(2):
            try:
                broken.anything
            except ImportError as exc:
                print("RAISED", str(exc).replace(" ", "_"))
        print("STILL", type(sys.modules["broken"]).__name__, *deferred.pending())
        """,
        fake_pkg,
    )
    assert out == [
        "RAISED", "broken_on_purpose", "RAISED", "broken_on_purpose",
        "STILL", "Deferred", "broken", "heavy",
    ]  # fmt: skip


def test_a_name_already_imported_is_left_alone(fake_pkg: Path) -> None:
    out = run_py(
        """
        import sys
        import heavy
        from cocoon.agent import deferred
        n = len(deferred.install(["heavy"]))
        print("INSTALLED", n, sys.modules["heavy"] is heavy and not deferred.pending())
        """,
        fake_pkg,
    )
    assert out == ["RAN-heavy", "INSTALLED", "0", "True"]


def test_the_agent_imports_neither_asyncio_nor_ssl_nor_grpc_aio(tmp_path: Path) -> None:
    """What ``python3 -m cocoon.agent`` does before its main, with this host's grpc (the
    guest's own is checked on a booted guest by the integration tests' console)."""
    out = run_py(
        """
        import sys
        from cocoon.agent import deferred
        deferred.install(["asyncio", "grpc.aio"])
        import grpc
        from cocoon.agent import pid1
        print("PENDING", *deferred.pending(), "SSL", "ssl" in sys.modules)
        """,
        tmp_path,
    )
    assert out == ["PENDING", "asyncio", "grpc.aio", "SSL", "False"]
