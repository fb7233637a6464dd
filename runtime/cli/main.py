"""The ``cocoon`` command: runc's global flags, the dispatch, and the one error report.

runc's verbs are in ``oci``, cocoon's own in ``tools``; both add their sub-parsers here.
Every error is one line on stderr, a runc-style JSON line in ``--log`` and exit status 1.
Nothing heavy is imported at the top of the CLI: ``cocoon --version``, ``state`` and ``list``
load no gRPC and no image builder (tests/unit/test_imports.py holds that).

May import: the standard library, cocoon.runtime.{config, errors, logs, cli.oci, cli.tools}.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from cocoon.runtime import logs
from cocoon.runtime.cli import oci, tools
from cocoon.runtime.errors import CocoonError, UsageError

VERSION = "0.1.0"
log = logging.getLogger("cocoon")


def _commit() -> str:
    git = Path(__file__).resolve().parents[2] / ".git"
    try:
        ref = (git / "HEAD").read_text().strip()
        if not ref.startswith("ref: "):
            return ref[:12]
        name = ref[5:]
        loose = git / name
        if loose.exists():
            return loose.read_text().strip()[:12]
        for line in (git / "packed-refs").read_text().splitlines():  # after git gc
            sha, _, packed_name = line.partition(" ")
            if packed_name == name:
                return sha[:12]
    except OSError:
        pass
    return "unknown"


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        one_line = message.replace("\r", "\\r").replace("\n", "\\n")  # argv may hold newlines
        raise UsageError(f"{self.prog}: {one_line}")


class _Skipped:
    """A sub-parser that is not built: this call's verb is another one."""

    def __getattr__(self, _name: str) -> Any:
        return lambda *_a, **_k: self


class _OnlyVerb:
    """Sub-parsers filtered to one verb's: building all 30-odd costs ~12 ms of every call."""

    def __init__(self, sub: Any, verb: str) -> None:
        self._sub, self._verb = sub, verb

    def add_parser(self, name: str, **kw: Any) -> Any:
        return self._sub.add_parser(name, **kw) if name == self._verb else _Skipped()


GLOBAL_VALUE_FLAGS = ("--root", "--log", "--log-format", "--config")


def verb_of(argv: Sequence[str]) -> str | None:
    """The verb argv names after the global flags, as far as a scan can tell."""
    it = iter(argv)
    for a in it:
        if a in GLOBAL_VALUE_FLAGS:
            next(it, None)
        elif a == "--":
            return None
        elif not a.startswith("-"):
            return a
    return None


def parse_argv(argv: Sequence[str]) -> argparse.Namespace:
    """argv parsed by a parser with only the verb's sub-parser, else by the whole one (no verb
    found, an unknown one, or an error: its message comes from the whole grammar)."""
    verb = verb_of(argv)
    if verb is not None and verb in oci.VERBS.keys() | tools.VERBS.keys():
        with contextlib.suppress(UsageError):
            return build_parser(verb).parse_args(argv)
    return build_parser().parse_args(argv)


def build_parser(verb: str | None = None) -> argparse.ArgumentParser:
    """The whole grammar, or with ``verb`` only that verb's sub-parser."""
    p = _Parser(prog="cocoon", description="VM-isolated OCI runtime")
    p.add_argument("--root", default="/run/cocoon", help="state directory root")
    p.add_argument("--log", default="", help="log file (runc-style)")
    p.add_argument("--log-format", choices=("text", "json"), default="text")
    p.add_argument("--debug", action="store_true")
    p.add_argument("--systemd-cgroup", action="store_true", help="accepted for runc compatibility")
    p.add_argument("--config", default="", help="configuration file (or COCOON_CONFIG)")
    p.add_argument("--version", "-v", action="store_true")
    sub: Any = p.add_subparsers(dest="verb", parser_class=_Parser)
    if verb is not None:
        sub = _OnlyVerb(sub, verb)
    tools.add_parsers(sub)
    oci.add_parsers(sub)
    return p


def _report(args: argparse.Namespace | None, exc: BaseException) -> None:
    msg = str(exc)
    first, _, rest = msg.partition("\n")
    log_path = getattr(args, "log", "") if args else ""
    fmt = getattr(args, "log_format", "text") if args else "text"
    if log_path:
        try:
            logs.setup(Path(log_path), fmt, False, stderr=False)
            log.error("%s", first if fmt == "json" else msg)
        except OSError as e:  # still one line for the error itself
            first += f" (and the log {log_path} cannot be written: {e.strerror or e})"
    print(f"cocoon: {first}" + (f"\n{rest}" if rest else ""), file=sys.stderr)


def _global_flags(argv: Sequence[str] | None) -> argparse.Namespace:
    """--log and --log-format even when the rest of argv does not parse (to log the error)."""
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--log", default="")
    p.add_argument("--log-format", default="text")
    try:
        return p.parse_known_args(argv)[0]
    except SystemExit:
        return argparse.Namespace(log="", log_format="text")


def main(argv: Sequence[str] | None = None) -> int:
    args: argparse.Namespace | None = None
    try:
        args = parse_argv(sys.argv[1:] if argv is None else argv)
        if args.version:
            print(f"cocoon version {VERSION}\ncommit: {_commit()}\nspec: 1.1.0")
            return 0
        if not args.verb:
            raise UsageError("no command given (try `cocoon --help`)")
        if args.log:
            logs.setup(Path(args.log), args.log_format, args.debug, stderr=args.debug)
        if args.verb in oci.VERBS:
            parsed = args  # for the loader: a verb loads the configuration if it reads it
            return oci.VERBS[args.verb](args, lambda: tools.load_config(parsed))
        return tools.VERBS[args.verb](args)
    except CocoonError as exc:
        _report(args or _global_flags(argv), exc)
        return 1
    except BrokenPipeError:  # stdout's reader went away (`cocoon pool status | head`)
        with contextlib.suppress(OSError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except OSError as exc:  # the host said no where nothing expected it (ENOSPC, EMFILE...)
        if args is not None and args.debug:
            log.exception("unexpected host error")
        where = f" ({exc.filename})" if exc.filename else ""
        _report(args or _global_flags(argv), CocoonError(f"{exc.strerror or exc}{where}"))
        return 1
    except KeyboardInterrupt:
        return 130


def run() -> None:
    """The ``cocoon`` command: main(), then out without the interpreter's teardown of every
    module it loaded (~15 ms, paid after a foreground exec's workload has ended)."""
    status = main()
    logging.shutdown()
    for f in (sys.stdout, sys.stderr):
        try:
            f.flush()
        except BrokenPipeError:  # stdout's reader went away: as main() treats it
            status = status or 1
        except (OSError, ValueError):
            pass
    os._exit(status)


if __name__ == "__main__":
    run()
