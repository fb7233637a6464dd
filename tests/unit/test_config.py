"""Tests for cocoon.runtime.config: the shipped file, loading, drop-ins, errors, to_toml."""

from __future__ import annotations

import dataclasses
import tomllib
from pathlib import Path

import pytest

from cocoon.runtime import config
from cocoon.runtime.config import (
    AgentConfig,
    Config,
    FactoryConfig,
    HypervisorConfig,
    ImageConfig,
    NetworkConfig,
    RuntimeConfig,
    load,
    to_toml,
    with_annotations,
)
from cocoon.runtime.errors import ConfigError

SHIPPED = Path(__file__).parents[2] / "configuration.toml"
SECTIONS = {
    "hypervisor": HypervisorConfig,
    "agent": AgentConfig,
    "image": ImageConfig,
    "runtime": RuntimeConfig,
    "network": NetworkConfig,
    "factory": FactoryConfig,
}


@pytest.fixture(autouse=True)
def no_host_etc(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Point the /etc defaults into tmp_path (not created) so the host is never read."""
    monkeypatch.setattr(config, "DEFAULT_CONFIG_PATH", tmp_path / "etc" / "configuration.toml")
    monkeypatch.setattr(config, "DEFAULT_DROPIN_DIR", tmp_path / "etc" / "config.d")


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def load_one(tmp_path: Path, text: str) -> Config:
    """Load a single main file holding ``text``, with an empty drop-in directory."""
    main = write(tmp_path / "main.toml", text)
    return load(main, dropin_dir=tmp_path / "no-dropins", environ={}).config


def error_of(tmp_path: Path, text: str) -> str:
    with pytest.raises(ConfigError) as info:
        load_one(tmp_path, text)
    msg = str(info.value)
    assert "\n" not in msg
    assert msg.startswith(f"{tmp_path / 'main.toml'}: ")
    return msg


# --- the shipped configuration.toml ---------------------------------------------------------


def test_shipped_file_equals_defaults(tmp_path: Path) -> None:
    loaded = load(SHIPPED, dropin_dir=tmp_path / "none", environ={})
    assert loaded.config == Config()
    assert loaded.sources == (SHIPPED,)


def test_shipped_file_lists_every_key_with_a_comment() -> None:
    doc = tomllib.loads(SHIPPED.read_text())
    assert set(doc) == set(SECTIONS)
    assert [f.name for f in dataclasses.fields(Config)] == list(SECTIONS)
    lines = SHIPPED.read_text().splitlines()
    for table, cls in SECTIONS.items():
        for f in dataclasses.fields(cls):
            assert f.name in doc[table], f"{table}.{f.name} missing from configuration.toml"
            # The key's line is preceded (possibly via sibling keys) by a comment.
            idx = next(i for i, line in enumerate(lines) if line.startswith(f"{f.name} = "))
            while lines[idx - 1] and not lines[idx - 1].startswith("#"):
                idx -= 1
            assert lines[idx - 1].startswith("#"), f"{table}.{f.name} has no comment"


# --- resolution and drop-ins ------------------------------------------------------------------


def test_nothing_configured_gives_defaults(tmp_path: Path) -> None:
    loaded = load(environ={})
    assert loaded == config.LoadedConfig(config=Config(), sources=())


def test_default_main_file_and_dropin_dir_are_used(tmp_path: Path) -> None:
    write(config.DEFAULT_CONFIG_PATH, "[hypervisor]\ndefault_vcpus = 3\n")
    write(config.DEFAULT_DROPIN_DIR / "10-a.toml", "[agent]\ndebug = true\n")
    loaded = load(environ={})
    assert loaded.config.hypervisor.default_vcpus == 3
    assert loaded.config.agent.debug is True
    assert loaded.sources == (config.DEFAULT_CONFIG_PATH, config.DEFAULT_DROPIN_DIR / "10-a.toml")


def test_dropins_apply_in_name_order_and_override_single_keys(tmp_path: Path) -> None:
    main = write(
        tmp_path / "main.toml",
        '[hypervisor]\ndefault_vcpus = 2\ndefault_memory_mib = 512\naccel = "kvm"\n',
    )
    d = tmp_path / "config.d"
    write(d / "20-b.toml", "[hypervisor]\ndefault_vcpus = 4\n")
    write(d / "10-a.toml", '[hypervisor]\ndefault_vcpus = 3\naccel = "tcg"\n')
    write(d / "30-c.toml", "[agent]\nready_timeout_s = 5\n")
    write(d / ".hidden.toml", "[hypervisor]\ndefault_vcpus = 99\n")
    write(d / "README", "not toml at all [[[\n")
    (d / "sub.toml").mkdir()

    loaded = load(main, dropin_dir=d, environ={})
    h = loaded.config.hypervisor
    assert h.default_vcpus == 4  # 20-b wins over 10-a and main
    assert h.accel == "tcg"  # from 10-a, not overridden later
    assert h.default_memory_mib == 512  # from main, untouched by drop-ins
    assert h.memory_slots == HypervisorConfig().memory_slots
    assert loaded.config.agent.ready_timeout_s == 5.0
    assert isinstance(loaded.config.agent.ready_timeout_s, float)
    assert loaded.config.agent.channel == "auto"
    assert loaded.sources == (main, d / "10-a.toml", d / "20-b.toml", d / "30-c.toml")


def test_many_dropins_apply_in_sorted_order(tmp_path: Path) -> None:
    # Enough names that directory (hash) order is very unlikely to be sorted by chance.
    d = tmp_path / "config.d"
    names = [f"{i:02d}-{w}.toml" for i, w in enumerate("kqzabmxcyrltwfe", start=1)]
    for i, name in reversed(list(enumerate(names, start=1))):
        write(d / name, f"[hypervisor]\ndefault_vcpus = {i}\nmemory_slots = {i}\n")
    write(d / "99-last.toml", "[hypervisor]\nmemory_slots = 0\n")
    loaded = load(dropin_dir=d, environ={})
    assert loaded.sources == tuple(d / n for n in [*names, "99-last.toml"])
    assert loaded.config.hypervisor.default_vcpus == len(names)
    assert loaded.config.hypervisor.memory_slots == 0


def test_environ_names_main_file_and_dropin_dir(tmp_path: Path) -> None:
    main = write(tmp_path / "env.toml", "[runtime]\nshutdown_timeout_s = 2.5\n")
    d = tmp_path / "envdir"
    write(d / "x.toml", "[image]\nauto_build = false\n")
    env = {"COCOON_CONFIG": str(main), "COCOON_CONFIG_DIR": str(d)}
    loaded = load(environ=env)
    assert loaded.config.runtime.shutdown_timeout_s == 2.5
    assert loaded.config.image.auto_build is False
    assert loaded.sources == (main, d / "x.toml")


def test_explicit_arguments_beat_environ(tmp_path: Path) -> None:
    env_main = write(tmp_path / "env.toml", "[hypervisor]\ndefault_vcpus = 7\n")
    env_dir = tmp_path / "envdir"
    write(env_dir / "x.toml", "[hypervisor]\nmemory_slots = 1\n")
    arg_main = write(tmp_path / "arg.toml", "[hypervisor]\ndefault_vcpus = 2\n")
    arg_dir = tmp_path / "argdir"
    env = {"COCOON_CONFIG": str(env_main), "COCOON_CONFIG_DIR": str(env_dir)}
    loaded = load(arg_main, dropin_dir=arg_dir, environ=env)
    assert loaded.config.hypervisor.default_vcpus == 2
    assert loaded.config.hypervisor.memory_slots == 8
    assert loaded.sources == (arg_main,)


def test_missing_explicit_file_is_an_error(tmp_path: Path) -> None:
    missing = tmp_path / "nope.toml"
    with pytest.raises(ConfigError, match="no such configuration file") as info:
        load(missing, environ={})
    assert str(missing) in str(info.value)
    with pytest.raises(ConfigError, match="COCOON_CONFIG") as info:
        load(environ={"COCOON_CONFIG": str(missing)})
    assert str(missing) in str(info.value)


def test_error_in_dropin_names_the_dropin(tmp_path: Path) -> None:
    d = tmp_path / "config.d"
    write(d / "10-ok.toml", "[hypervisor]\ndefault_vcpus = 2\n")
    bad = write(d / "10-x.toml", '[hypervisor]\ndefault_vcpus = "two"\n')
    with pytest.raises(ConfigError) as info:
        load(dropin_dir=d, environ={})
    assert str(info.value) == f'{bad}: hypervisor.default_vcpus: expected an integer, got "two"'


# --- errors -----------------------------------------------------------------------------------


def test_unknown_table(tmp_path: Path) -> None:
    msg = error_of(tmp_path, "[foo]\nx = 1\n")
    known = "agent, factory, hypervisor, image, network, runtime"
    assert msg.endswith(f'unknown table "foo" (known: {known})')


def test_top_level_key_is_an_unknown_table(tmp_path: Path) -> None:
    assert 'unknown table "vcpus"' in error_of(tmp_path, "vcpus = 1\n")


def test_known_table_that_is_not_a_table(tmp_path: Path) -> None:
    assert error_of(tmp_path, "agent = 1\n").endswith("agent: expected a table, got 1")


def test_unknown_key_with_suggestion(tmp_path: Path) -> None:
    msg = error_of(tmp_path, "[hypervisor]\nvcpus = 2\n")
    assert msg.endswith('unknown key "hypervisor.vcpus"; did you mean "hypervisor.default_vcpus"?')


def test_unknown_key_without_suggestion(tmp_path: Path) -> None:
    msg = error_of(tmp_path, "[agent]\nzzzzqqq = 2\n")
    assert msg.endswith('unknown key "agent.zzzzqqq"')


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            '[hypervisor]\ndefault_vcpus = "two"\n',
            'hypervisor.default_vcpus: expected an integer, got "two"',
        ),
        (
            "[hypervisor]\ndefault_vcpus = true\n",
            "hypervisor.default_vcpus: expected an integer, got true",
        ),
        (
            "[hypervisor]\ndefault_vcpus = 1.5\n",
            "hypervisor.default_vcpus: expected an integer, got 1.5",
        ),
        ("[hypervisor]\npath = 5\n", "hypervisor.path: expected a string, got 5"),
        (
            '[agent]\ndebug = "yes"\n',
            'agent.debug: expected a boolean (true or false), got "yes"',
        ),
        ("[agent]\nready_timeout_s = false\n", "agent.ready_timeout_s: expected a number"),
        (
            '[hypervisor]\nkernel_params = "quiet"\n',
            'hypervisor.kernel_params: expected an array of strings, got "quiet"',
        ),
        (
            '[hypervisor]\nkernel_params = ["quiet", 3]\n',
            "hypervisor.kernel_params: expected an array of strings, element 1 is 3",
        ),
        (
            '[hypervisor]\naccel = "xen"\n',
            'hypervisor.accel: expected one of "auto", "kvm", "tcg", got "xen"',
        ),
        (
            '[hypervisor]\nshared_fs = "nfs"\n',
            'hypervisor.shared_fs: expected one of "virtio-fs", "virtio-9p", "none", got "nfs"',
        ),
        ("[agent]\nchannel = 1\n", 'agent.channel: expected one of "auto", "vsock"'),
        ("[hypervisor.extra]\nx = 1\n", 'unknown key "hypervisor.extra"'),
    ],
)
def test_wrong_types(tmp_path: Path, text: str, expected: str) -> None:
    assert expected in error_of(tmp_path, text)


def test_toml_syntax_error(tmp_path: Path) -> None:
    msg = error_of(tmp_path, "[hypervisor]\ndefault_vcpus = \n")
    assert "TOML syntax error" in msg
    assert "line 2" in msg


def test_unreadable_file(tmp_path: Path) -> None:
    d = tmp_path / "a-directory.toml"
    d.mkdir()
    with pytest.raises(ConfigError, match="cannot read") as info:
        load(d, environ={})
    assert str(info.value).startswith(f"{d}: ")


@pytest.mark.parametrize(
    ("text", "key", "fragment"),
    [
        ("[hypervisor]\ndefault_vcpus = 0", "hypervisor.default_vcpus", "must be >= 1, got 0"),
        ("[hypervisor]\ndefault_maxvcpus = -1", "hypervisor.default_maxvcpus", ">= 0, got -1"),
        (
            "[hypervisor]\ndefault_vcpus = 4\ndefault_maxvcpus = 2",
            "hypervisor.default_maxvcpus",
            ">= hypervisor.default_vcpus (4), got 2",
        ),
        ("[hypervisor]\ndefault_memory_mib = 127", "hypervisor.default_memory_mib", ">= 128"),
        (
            "[hypervisor]\nmax_memory_mib = 200",
            "hypervisor.max_memory_mib",
            ">= hypervisor.default_memory_mib (256), got 200",
        ),
        ("[hypervisor]\nmax_memory_mib = -5", "hypervisor.max_memory_mib", "got -5"),
        ("[hypervisor]\nmemory_slots = 256", "hypervisor.memory_slots", "between 0 and 255"),
        ("[hypervisor]\nmemory_slots = -1", "hypervisor.memory_slots", "between 0 and 255"),
        ("[hypervisor]\nhotplug_root_ports = 31", "hypervisor.hotplug_root_ports", "0 and 30"),
        ("[hypervisor]\nhotplug_root_ports = -1", "hypervisor.hotplug_root_ports", "0 and 30"),
        ("[hypervisor]\ntcg_tb_size_mib = -1", "hypervisor.tcg_tb_size_mib", ">= 0"),
        ("[hypervisor]\nmsize_9p = 4095", "hypervisor.msize_9p", ">= 4096, got 4095"),
        ("[agent]\nready_timeout_s = 0", "agent.ready_timeout_s", "> 0"),
        ("[agent]\nrequest_timeout_s = -1.5", "agent.request_timeout_s", "> 0"),
        ("[agent]\nrequest_timeout_s = nan", "agent.request_timeout_s", "> 0"),
        ("[runtime]\nshutdown_timeout_s = 0.0", "runtime.shutdown_timeout_s", "> 0"),
        ('[hypervisor]\npath = "qemu"', "hypervisor.path", 'absolute path, got "qemu"'),
        ('[hypervisor]\nvirtiofsd_path = ""', "hypervisor.virtiofsd_path", "absolute path"),
        ('[image]\ncache_dir = "cache"', "image.cache_dir", "absolute path"),
        (
            '[image]\nkernel = "/k"\nrootfs = "/r"',
            "image.initrd",
            "must be set when image.kernel is set",
        ),
        ('[image]\nrootfs = "/r"', "image.kernel", "must be set when image.rootfs is set"),
        (
            '[image]\nkernel = "/k"\ninitrd = "i"\nrootfs = "/r"',
            "image.initrd",
            'absolute path, got "i"',
        ),
        (
            '[hypervisor]\nkernel_params = ["quiet", ""]',
            "hypervisor.kernel_params",
            "entry 1 is empty",
        ),
        (
            '[hypervisor]\nkernel_params = ["a b"]',
            "hypervisor.kernel_params",
            'entry 0 "a b" contains whitespace',
        ),
        (
            '[hypervisor]\nkernel_params = ["a\\tb"]',
            "hypervisor.kernel_params",
            "contains whitespace",
        ),
    ],
)
def test_range_rules(tmp_path: Path, text: str, key: str, fragment: str) -> None:
    msg = error_of(tmp_path, text + "\n")
    assert f": {key}: " in msg
    assert fragment in msg


def test_range_rule_boundaries_are_accepted(tmp_path: Path) -> None:
    cfg = load_one(
        tmp_path,
        "[hypervisor]\ndefault_vcpus = 2\ndefault_maxvcpus = 2\ndefault_memory_mib = 128\n"
        "max_memory_mib = 128\nmemory_slots = 255\nhotplug_root_ports = 30\n"
        'tcg_tb_size_mib = 0\nmsize_9p = 4096\nkernel_params = ["quiet", "a=b"]\n'
        '[image]\nkernel = "/k"\ninitrd = "/i"\nrootfs = "/r"\n',
    )
    assert cfg.hypervisor.default_maxvcpus == 2
    assert cfg.hypervisor.max_memory_mib == 128
    assert cfg.hypervisor.kernel_params == ("quiet", "a=b")
    assert cfg.image.initrd == "/i"


def test_range_error_names_the_file_that_set_the_key(tmp_path: Path) -> None:
    main = write(tmp_path / "main.toml", "[hypervisor]\nmax_memory_mib = 1024\n")
    d = tmp_path / "config.d"
    write(d / "10-a.toml", "[agent]\ndebug = true\n")
    write(d / "20-mem.toml", "[hypervisor]\ndefault_memory_mib = 2048\n")
    with pytest.raises(ConfigError) as info:
        load(main, dropin_dir=d, environ={})
    # The offending key was set in main.toml; the drop-in only made it wrong.
    assert str(info.value).startswith(f"{main}: hypervisor.max_memory_mib: ")
    assert "(2048), got 1024" in str(info.value)


def test_validate_without_origins() -> None:
    bad = Config(hypervisor=HypervisorConfig(default_vcpus=0))
    with pytest.raises(ConfigError, match=r"^<configuration>: hypervisor\.default_vcpus: "):
        config.validate(bad)
    config.validate(Config())


# --- to_toml ----------------------------------------------------------------------------------


def roundtrip(tmp_path: Path, cfg: Config) -> Config:
    text = to_toml(cfg)
    assert set(tomllib.loads(text)) == set(SECTIONS)
    return load_one(tmp_path, text)


def test_to_toml_roundtrip_defaults(tmp_path: Path) -> None:
    text = to_toml(Config())
    assert "[hypervisor]\n" in text
    assert "seccomp_sandbox = true\n" in text
    assert "kernel_params = []\n" in text
    assert 'path = "/usr/bin/qemu-system-x86_64"\n' in text
    assert roundtrip(tmp_path, Config()) == Config()


def test_to_toml_roundtrip_non_default(tmp_path: Path) -> None:
    cfg = Config(
        hypervisor=HypervisorConfig(
            path='/opt/q "emu"\\bin/qemu\u00e9',
            cpu_model="Skylake\tServer\n\x01\x7f",
            accel="tcg",
            default_vcpus=3,
            default_maxvcpus=8,
            default_memory_mib=1024,
            max_memory_mib=4096,
            hotplug_root_ports=0,
            kernel_params=("quiet", 'x="y"', "a\\b"),
            seccomp_sandbox=False,
            shared_fs="virtio-9p",
            msize_9p=8192,
        ),
        agent=AgentConfig(
            channel="virtio-serial", ready_timeout_s=0.125, request_timeout_s=1e-3, debug=True
        ),
        image=ImageConfig(
            cache_dir="/tmp/c", auto_build=False, kernel="/k", initrd="/i", rootfs="/r"
        ),
        runtime=RuntimeConfig(shutdown_timeout_s=3.0),
        network=NetworkConfig(model="macvtap", queues=4),
    )
    assert 'accel = "tcg"\n' in to_toml(cfg)
    assert "debug = true\n" in to_toml(cfg)
    back = roundtrip(tmp_path, cfg)
    assert back == cfg
    assert back.hypervisor.cpu_model == "Skylake\tServer\n\x01\x7f"


# --- annotations ------------------------------------------------------------------------------


def test_annotations_override_allowlisted_keys_only() -> None:
    cfg = Config()
    got = with_annotations(
        cfg,
        {
            "io.cocoon.config.network.model": "macvtap",
            "io.cocoon.config.network.queues": "2",
            "org.opencontainers.image.title": "ignored: not ours",
        },
    )
    assert got.network == NetworkConfig(model="macvtap", queues=2)
    assert got.hypervisor == cfg.hypervisor
    assert with_annotations(cfg, {}) is cfg


@pytest.mark.parametrize(
    ("name", "value", "msg"),
    [
        ("io.cocoon.config.network.model", "bridge", 'expected one of "tcfilter"'),
        ("io.cocoon.config.network.queues", "two", "expected an integer"),
        ("io.cocoon.config.network.queues", "99", "must be between 0 and 8"),
        ("io.cocoon.config.hypervisor.path", "/bin/sh", "cannot be set by an annotation"),
        ("io.cocoon.config.nosuch", "1", "cannot be set by an annotation"),
    ],
)
def test_bad_annotations_are_one_clear_error(name: str, value: str, msg: str) -> None:
    with pytest.raises(ConfigError, match=msg) as info:
        with_annotations(Config(), {name: value})
    assert name in str(info.value)


@pytest.mark.parametrize("value", [-1, 65, 10**9])
def test_pool_size_out_of_range_is_refused(tmp_path: Path, value: int) -> None:
    f = tmp_path / "c.toml"
    f.write_text(f"[factory]\npool_size = {value}\n")
    with pytest.raises(ConfigError, match=r"factory\.pool_size: must be between 0 and 64"):
        load(f)


@pytest.mark.parametrize("value", ['"yes"', "1", "[true]"])
def test_template_must_be_a_boolean(tmp_path: Path, value: str) -> None:
    f = tmp_path / "c.toml"
    f.write_text(f"[factory]\ntemplate = {value}\n")
    with pytest.raises(ConfigError, match=r"factory\.template: expected a boolean"):
        load(f)


def test_template_is_off_by_default_and_on_when_asked(tmp_path: Path) -> None:
    f = tmp_path / "c.toml"
    f.write_text("[factory]\ntemplate = true\n")
    assert load(f).config.factory.template is True
    assert Config().factory.template is False
