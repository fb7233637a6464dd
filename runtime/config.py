"""Typed configuration: the schema (frozen dataclasses), loading, drop-ins, validation.

Sources, in order: built-in defaults (the dataclass defaults, which equal the shipped
configuration.toml), then ONE main file (``--config`` / ``COCOON_CONFIG`` /
/etc/cocoon/configuration.toml if it exists), then every ``*.toml`` drop-in in the drop-in
directory (/etc/cocoon/config.d, or ``COCOON_CONFIG_DIR``) in name order (names starting with
a dot are skipped; a missing directory is fine). Each later source overrides single keys
within a table. An explicitly named main file that does not exist is an error. Unknown
tables/keys, wrong types and out-of-range values are ConfigErrors of one line naming the file
and the dotted key.

API: ``load()`` -> ``LoadedConfig`` (config + files applied), ``validate()`` for a Config
built in code, ``to_toml()`` to print the resolved configuration (round-trips through load),
``with_annotations()`` for a sandbox's own overrides: an OCI annotation
``io.cocoon.config.<table>.<key>`` sets that key for one sandbox, for the keys in
``ANNOTATABLE`` only (anything else under the prefix is an error).

May import: the standard library and cocoon.runtime.errors.
"""

from __future__ import annotations

import math
import os
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Literal, get_args, get_origin, get_type_hints

from cocoon.runtime.errors import (
    ConfigError,  # relative: mypy cannot see the editable install's finder
)

Accel = Literal["auto", "kvm", "tcg"]
SharedFs = Literal["virtio-fs", "virtio-9p", "none"]
Channel = Literal["auto", "vsock", "virtio-serial"]
MemoryHotplug = Literal["virtio-mem", "pc-dimm"]
NetworkModel = Literal["tcfilter", "macvtap", "none"]


@dataclass(frozen=True)
class HypervisorConfig:
    path: str = "/usr/bin/qemu-system-x86_64"
    machine_type: str = "q35"
    accel: Accel = "auto"
    cpu_model: str = ""
    default_vcpus: int = 1
    default_maxvcpus: int = 0
    default_memory_mib: int = 256
    memory_slots: int = 8
    max_memory_mib: int = 0
    memory_hotplug: MemoryHotplug = "virtio-mem"
    cpu_hotunplug: bool = False
    hotplug_root_ports: int = 4
    kernel_params: tuple[str, ...] = ()
    seccomp_sandbox: bool = True
    tcg_tb_size_mib: int = 64
    shared_fs: SharedFs = "virtio-fs"
    virtiofsd_path: str = "/usr/lib/qemu/virtiofsd"
    msize_9p: int = 512000
    vfio_driver_override: bool = False
    free_page_reporting: bool = True
    rootless: bool = True
    rootless_uid_first: int = 1_900_000_000
    rootless_uid_count: int = 65536

    def ceilings(self, host_cpus: int, host_memory_mib: int) -> tuple[int, int]:
        """(vCPUs, MiB of RAM) a sandbox can grow to on this host: the configured maxima
        (0: the host's), never below what it boots with."""
        return (
            max(self.default_maxvcpus or host_cpus, self.default_vcpus),
            max(self.max_memory_mib or host_memory_mib, self.default_memory_mib),
        )


@dataclass(frozen=True)
class AgentConfig:
    channel: Channel = "auto"
    ready_timeout_s: float = 60.0
    request_timeout_s: float = 30.0
    debug: bool = False


@dataclass(frozen=True)
class ImageConfig:
    cache_dir: str = "/var/cache/cocoon/guest"
    auto_build: bool = True
    kernel: str = ""
    initrd: str = ""
    rootfs: str = ""


@dataclass(frozen=True)
class RuntimeConfig:
    shutdown_timeout_s: float = 10.0
    guest_seccomp: bool = False
    fork_monitors: bool = True  # monitors forked by the root's fork server (sandbox.spawn)
    mergeable_monitors: bool = True  # monitors' memory offered to KSM (monitor.ksm)


@dataclass(frozen=True)
class NetworkConfig:
    model: NetworkModel = "tcfilter"
    queues: int = 0


@dataclass(frozen=True)
class FactoryConfig:
    pool_size: int = 0
    template: bool = False  # start sandboxes by restoring a template VM (sandbox.template)


@dataclass(frozen=True)
class Config:
    hypervisor: HypervisorConfig = field(default_factory=HypervisorConfig)
    agent: AgentConfig = field(default_factory=AgentConfig)
    image: ImageConfig = field(default_factory=ImageConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    network: NetworkConfig = field(default_factory=NetworkConfig)
    factory: FactoryConfig = field(default_factory=FactoryConfig)


@dataclass(frozen=True)
class LoadedConfig:
    """The resolved configuration and the files that were applied, in order."""

    config: Config
    sources: tuple[Path, ...]


UID_MAX = 2**32 - 2  # (uid_t)-1 means "unchanged" to the kernel
POOL_SIZE_MAX = 64  # pooled idle VMs; what the host's memory allows is checked at fill time
DEFAULT_CONFIG_PATH = Path("/etc/cocoon/configuration.toml")
DEFAULT_DROPIN_DIR = Path("/etc/cocoon/config.d")
ENV_CONFIG = "COCOON_CONFIG"
ENV_CONFIG_DIR = "COCOON_CONFIG_DIR"
_NO_FILE = "<configuration>"

# table name -> section dataclass; table name -> {key: resolved annotation}
_SECTIONS: dict[str, type[Any]] = dict(get_type_hints(Config))
_FIELDS: dict[str, dict[str, Any]] = {
    name: {f.name: hints[f.name] for f in fields(cls)}
    for name, cls in _SECTIONS.items()
    for hints in (get_type_hints(cls),)  # once per class: every CLI call pays for it
}
_ALL_KEYS = [f"{t}.{k}" for t, keys in _FIELDS.items() for k in keys]


class _Mismatch(Exception):
    """A value does not fit its annotation (message without file/key)."""


def _describe(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return _toml_str(value)
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "a table"
    return f"a {type(value).__name__}"


def _convert(value: object, tp: Any) -> object:
    """Check ``value`` (as parsed by tomllib) against annotation ``tp`` and convert it."""
    origin, args = get_origin(tp), get_args(tp)
    if origin is Literal:
        if isinstance(value, str) and value in args:
            return value
        options = ", ".join(_toml_str(str(a)) for a in args)
        raise _Mismatch(f"expected one of {options}, got {_describe(value)}")
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise _Mismatch(f"expected a boolean (true or false), got {_describe(value)}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise _Mismatch(f"expected an integer, got {_describe(value)}")
    if tp is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        raise _Mismatch(f"expected a number, got {_describe(value)}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise _Mismatch(f"expected a string, got {_describe(value)}")
    if origin is tuple and args == (str, Ellipsis):
        if not isinstance(value, list):
            raise _Mismatch(f"expected an array of strings, got {_describe(value)}")
        for i, item in enumerate(value):
            if not isinstance(item, str):
                raise _Mismatch(f"expected an array of strings, element {i} is {_describe(item)}")
        return tuple(value)
    raise TypeError(f"unsupported configuration annotation {tp!r}")  # a schema bug


def _read(path: Path) -> dict[str, Any]:
    try:
        text = path.read_bytes().decode("utf-8")
    except OSError as e:
        raise ConfigError(f"{path}: cannot read: {e.strerror or e}") from e
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not valid UTF-8: {e}") from e
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: TOML syntax error: {e}") from e


def _unknown_key(path: Path, dotted: str) -> ConfigError:
    import difflib  # only for a key that is wrong: not at every CLI start (~3 ms)

    msg = f"{path}: unknown key {_toml_str(dotted)}"
    close = difflib.get_close_matches(dotted, _ALL_KEYS, n=1)
    if close:
        msg += f"; did you mean {_toml_str(close[0])}?"
    return ConfigError(msg)


def _apply(
    path: Path,
    doc: Mapping[str, Any],
    values: dict[str, dict[str, object]],
    origins: dict[str, Path],
) -> None:
    """Check one parsed file and merge its keys into ``values`` (key by key)."""
    known = ", ".join(sorted(_FIELDS))
    for table, body in doc.items():
        if table not in _FIELDS:
            raise ConfigError(f"{path}: unknown table {_toml_str(table)} (known: {known})")
        if not isinstance(body, dict):
            raise ConfigError(f"{path}: {table}: expected a table, got {_describe(body)}")
        for key, raw in body.items():
            dotted = f"{table}.{key}"
            if key not in _FIELDS[table]:
                raise _unknown_key(path, dotted)
            try:
                values[table][key] = _convert(raw, _FIELDS[table][key])
            except _Mismatch as e:
                raise ConfigError(f"{path}: {dotted}: {e}") from None
            origins[dotted] = path


def _dropins(directory: Path) -> list[Path]:
    try:
        names = sorted(
            p.name
            for p in directory.iterdir()
            if p.name.endswith(".toml") and not p.name.startswith(".") and not p.is_dir()
        )
    except FileNotFoundError:
        return []
    except OSError as e:
        raise ConfigError(f"{directory}: cannot list drop-in directory: {e.strerror or e}") from e
    return [directory / n for n in names]


def load(
    path: Path | None = None,
    dropin_dir: Path | None = None,
    environ: Mapping[str, str] | None = None,
) -> LoadedConfig:
    """Resolve the configuration (see the module docstring); raise ConfigError if invalid."""
    env = os.environ if environ is None else environ
    main: Path | None = None
    why = ""
    if path is not None:
        main, why = path, "given with --config"
    elif env.get(ENV_CONFIG):
        main, why = Path(env[ENV_CONFIG]), f"given in {ENV_CONFIG}"
    elif DEFAULT_CONFIG_PATH.exists():
        main = DEFAULT_CONFIG_PATH
    if main is not None and why and not main.exists():
        raise ConfigError(f"{main}: no such configuration file ({why})")
    if dropin_dir is None:
        dropin_dir = Path(env[ENV_CONFIG_DIR]) if env.get(ENV_CONFIG_DIR) else DEFAULT_DROPIN_DIR

    files = ([main] if main is not None else []) + _dropins(dropin_dir)
    values: dict[str, dict[str, object]] = {t: {} for t in _FIELDS}
    origins: dict[str, Path] = {}
    for f in files:
        _apply(f, _read(f), values, origins)
    cfg = Config(**{t: cls(**values[t]) for t, cls in _SECTIONS.items()})
    validate(cfg, origins)
    return LoadedConfig(config=cfg, sources=tuple(files))


def validate(cfg: Config, origins: Mapping[str, Path] | None = None) -> None:
    """Check value ranges and relations; the error names the file that set the key.

    ``origins`` maps a dotted key to the file that set it last (keys left at their default
    are attributed to a related key's file, else to ``<configuration>``).
    """
    origins = origins or {}

    def fail(key: str, msg: str, *related: str) -> ConfigError:
        src = next((str(origins[k]) for k in (key, *related) if k in origins), _NO_FILE)
        return ConfigError(f"{src}: {key}: {msg}")

    h, img = cfg.hypervisor, cfg.image

    def at_least(key: str, value: int, low: int, high: int | None = None) -> None:
        if value < low or (high is not None and value > high):
            rng = f"must be >= {low}" if high is None else f"must be between {low} and {high}"
            raise fail(key, f"{rng}, got {value}")

    def ceiling(key: str, zero_means: str, base_key: str) -> None:
        """A hypervisor ceiling (0: the host's) is not below what the VM boots with."""
        value: int = getattr(h, key.partition(".")[2])
        base: int = getattr(h, base_key.partition(".")[2])
        if value and value < base:
            raise fail(
                key, f"must be 0 ({zero_means}) or >= {base_key} ({base}), got {value}", base_key
            )

    at_least("hypervisor.default_vcpus", h.default_vcpus, 1)
    at_least("hypervisor.default_maxvcpus", h.default_maxvcpus, 0)
    ceiling("hypervisor.default_maxvcpus", "host CPUs", "hypervisor.default_vcpus")
    at_least("hypervisor.default_memory_mib", h.default_memory_mib, 128)
    ceiling("hypervisor.max_memory_mib", "host RAM", "hypervisor.default_memory_mib")
    at_least("hypervisor.max_memory_mib", h.max_memory_mib, 0)
    at_least("hypervisor.memory_slots", h.memory_slots, 0, 255)
    at_least("hypervisor.hotplug_root_ports", h.hotplug_root_ports, 0, 30)
    at_least("hypervisor.tcg_tb_size_mib", h.tcg_tb_size_mib, 0)
    at_least("hypervisor.msize_9p", h.msize_9p, 4096)
    at_least("network.queues", cfg.network.queues, 0, 8)
    at_least("factory.pool_size", cfg.factory.pool_size, 0, POOL_SIZE_MAX)
    at_least("hypervisor.rootless_uid_first", h.rootless_uid_first, 1000, UID_MAX)
    at_least("hypervisor.rootless_uid_count", h.rootless_uid_count, 1, UID_MAX)
    last = h.rootless_uid_first + h.rootless_uid_count - 1
    if last > UID_MAX:
        raise fail(
            "hypervisor.rootless_uid_count",
            f"the range ends at {last}, past the last usable uid {UID_MAX}",
            "hypervisor.rootless_uid_first",
        )

    for table in _FIELDS:
        section = getattr(cfg, table)
        for key in _FIELDS[table]:
            if key.endswith("_timeout_s"):
                v = getattr(section, key)
                if not (math.isfinite(v) and v > 0):
                    raise fail(f"{table}.{key}", f"must be a finite number > 0, got {v}")

    for key, value in (
        ("hypervisor.path", h.path),
        ("hypervisor.virtiofsd_path", h.virtiofsd_path),
        ("image.cache_dir", img.cache_dir),
    ):
        if not os.path.isabs(value):
            raise fail(key, f"must be an absolute path, got {_toml_str(value)}")

    trio = {"image.kernel": img.kernel, "image.initrd": img.initrd, "image.rootfs": img.rootfs}
    if any(trio.values()):
        given = [k for k, v in trio.items() if v]
        for key, value in trio.items():
            if not value:
                raise fail(
                    key,
                    f"must be set when {given[0]} is set "
                    "(image.kernel, image.initrd and image.rootfs go together)",
                    *given,
                )
            if not os.path.isabs(value):
                raise fail(key, f"must be an absolute path, got {_toml_str(value)}")

    for i, param in enumerate(h.kernel_params):
        if not param or any(c.isspace() for c in param):
            what = "is empty" if not param else f"{_toml_str(param)} contains whitespace"
            raise fail("hypervisor.kernel_params", f"entry {i} {what}")


_ESCAPES = {
    '"': '\\"',
    "\\": "\\\\",
    "\b": "\\b",
    "\t": "\\t",
    "\n": "\\n",
    "\f": "\\f",
    "\r": "\\r",
}


def _toml_str(s: str) -> str:
    """A TOML basic string (double-quoted, escaped) for ``s``."""
    out = []
    for c in s:
        if c in _ESCAPES:
            out.append(_ESCAPES[c])
        elif ord(c) < 0x20 or ord(c) == 0x7F:
            out.append(f"\\u{ord(c):04x}")
        else:
            out.append(c)
    return '"' + "".join(out) + '"'


def _toml_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return _toml_str(value)
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return repr(value)  # "60.0", "1e-05", "inf": all valid TOML floats
    if isinstance(value, tuple):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot render {value!r} as TOML")


def to_toml(cfg: Config) -> str:
    """Render ``cfg`` as TOML; loading the text back gives an equal Config."""
    blocks = []
    for table in _FIELDS:
        section = getattr(cfg, table)
        lines = [f"[{table}]"]
        lines += [f"{k} = {_toml_value(getattr(section, k))}" for k in _FIELDS[table]]
        blocks.append("\n".join(lines) + "\n")
    return "\n".join(blocks)


ANNOTATION_PREFIX = "io.cocoon.config."
ANNOTATABLE = ("network.model", "network.queues")


def _bounded(text: str, limit: int = 64) -> str:
    """``text`` for a one-line error: control characters escaped, at most ``limit`` shown."""
    shown = text if len(text) <= limit else text[:limit] + "..."
    return shown.encode("unicode_escape").decode("ascii") if not shown.isprintable() else shown


def with_annotations(cfg: Config, annotations: Mapping[str, str]) -> Config:
    """``cfg`` with the sandbox's ``io.cocoon.config.*`` annotations applied (allowlist)."""
    values: dict[str, dict[str, object]] = {}
    for key_name, raw in sorted(annotations.items()):
        if not key_name.startswith(ANNOTATION_PREFIX):
            continue
        name = _bounded(key_name)  # as shown in an error: escaped, cut short
        dotted = key_name[len(ANNOTATION_PREFIX) :]
        if dotted not in ANNOTATABLE:
            raise ConfigError(
                f"annotation {name}: {_bounded(dotted)} cannot be set by an annotation "
                f"(allowed: {', '.join(ANNOTATABLE)})"
            )
        table, key = dotted.split(".", 1)
        tp = _FIELDS[table][key]
        value: object = raw
        if tp is int:
            # ASCII digits only: int() would take spaces, "_", "+" and other scripts' digits
            if not re.fullmatch(r"0|[1-9][0-9]{0,8}", raw):
                shown = raw if len(raw) <= 64 else raw[:64] + "..."
                raise ConfigError(f"annotation {name}: expected an integer, got {shown!r}")
            value = int(raw)
        try:
            values.setdefault(table, {})[key] = _convert(value, tp)
        except _Mismatch as e:
            raise ConfigError(f"annotation {name}: {e}") from None
    if not values:
        return cfg
    sections = {
        t: replace(getattr(cfg, t), **kv) if kv else getattr(cfg, t) for t, kv in values.items()
    }
    out = replace(cfg, **sections)
    validate(out, {k: Path(f"annotation {ANNOTATION_PREFIX}{k}") for k in ANNOTATABLE})
    return out
