"""The cocoon CLI as the integration tests drive it: a private --root, JSON logs, and the
container's stdio on files (the shim keeps create's stdio, as runc's container keeps a
caller's pipes: never read a create pipe to EOF)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

COCOON = str(Path(sys.executable).parent / "cocoon")


class Cli:
    """One runtime binary (cocoon unless told) with a private --root and a JSON --log."""

    def __init__(self, root: Path, tmp: Path, binary: str = COCOON, timeout: float = 240) -> None:
        self.root, self.tmp, self.log = root, tmp, tmp / "log.json"
        self.binary, self.timeout = binary, timeout

    @property
    def argv(self) -> list[str]:
        return [
            self.binary,
            "--root",
            str(self.root),
            "--log",
            str(self.log),
            "--log-format",
            "json",
        ]

    def __call__(
        self, *args: str, input: str | None = None, timeout: float | None = None
    ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*self.argv, *args],
            input=input,
            stdin=None if input is not None else subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=timeout or self.timeout,
        )

    def ok(self, *args: str, input: str | None = None) -> str:
        r = self(*args, input=input)
        assert r.returncode == 0, (
            f"{Path(self.binary).name} {args}: {r.returncode}\n{r.stdout}\n{r.stderr}"
        )
        return r.stdout

    def create(self, cid: str, bundle: Path) -> subprocess.CompletedProcess[str]:
        """create with the container's stdio on files (the shim keeps them, as callers'
        pipes are kept by runc's container: never a pipe read to EOF here)."""
        err = self.tmp / f"{cid}.err"
        with open(self.tmp / f"{cid}.out", "wb") as out, open(err, "wb") as errf:
            r = subprocess.run(
                [*self.argv, "create", "--bundle", str(bundle), cid],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=errf,
                timeout=240,
            )
        return subprocess.CompletedProcess(r.args, r.returncode, "", err.read_text())

    def sees(self, cid: str) -> tuple[int, int]:
        """(CPUs, MemTotal in MiB) as the workload sees them."""
        out = self.ok("exec", cid, "sh", "-c", "nproc; grep MemTotal /proc/meminfo")
        lines = out.split("\n")
        return int(lines[0]), int(lines[1].split()[1]) // 1024

    def last_error(self) -> str:
        lines = [json.loads(x) for x in self.log.read_text().splitlines() if x.strip()]
        errors = [x for x in lines if x.get("level") == "error"]
        assert errors, lines
        return str(errors[-1]["msg"])
