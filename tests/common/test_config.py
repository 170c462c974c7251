"""Typed run configuration: defaults, TOML files, dotted overrides, and errors that name the key."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from common.config import (
    ConfigError,
    LoggingConfig,
    ReplayConfig,
    RunConfig,
    TransportConfig,
    build_config,
    dump_config,
    load_config,
    parse_override,
)


def write(tmp_path: Path, text: str, name: str = "run.toml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def config_error(*overrides: str, path: Path | None = None) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(path, overrides)
    return str(info.value)


# ----------------------------------------------------------------------------------------- loading


def test_defaults() -> None:
    config = load_config(None)
    assert config == RunConfig()
    assert config.transport.replay_endpoint == "tcp://127.0.0.1:5555"
    assert config.transport.max_message_bytes == 64 * 1024 * 1024
    assert config.transport.server_secret_key is None
    assert config.replay.sampler == "fifo"
    assert config.replay.max_staleness == 4
    assert config.replay.samples_per_insert is None
    assert config.logging.level == "info"
    assert config.logging.json_logs is None
    assert build_config({}) == config


def test_sections_are_independent_instances() -> None:
    a, b = load_config(None), load_config(None)
    a.replay.capacity_trees = 5
    assert b.replay.capacity_trees == 100_000


def test_toml_file(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
[transport]
replay_endpoint = "tcp://0.0.0.0:6000"
server_secret_key = "keys/server.key_secret"

[replay]
dir = "/data/replay"
capacity_trees = 500
map_size_gb = 2.5
sampler = "uniform"
samples_per_insert = 4.0
max_times_sampled = 0

[logging]
level = "debug"
json_logs = false
""",
    )
    config = load_config(path)
    assert config.transport.replay_endpoint == "tcp://0.0.0.0:6000"
    assert config.transport.server_secret_key == "keys/server.key_secret"
    assert config.transport.max_message_bytes == TransportConfig().max_message_bytes
    assert config.replay.dir == "/data/replay"
    assert config.replay.capacity_trees == 500
    assert config.replay.map_size_gb == 2.5
    assert config.replay.sampler == "uniform"
    assert config.replay.samples_per_insert == 4.0
    assert config.replay.max_times_sampled == 0
    assert config.replay.seed == ReplayConfig().seed
    assert config.logging.level == "debug"
    assert config.logging.json_logs is False
    assert load_config(str(path)) == config  # a str path works too


def test_empty_file_gives_defaults(tmp_path: Path) -> None:
    assert load_config(write(tmp_path, "")) == RunConfig()
    assert load_config(write(tmp_path, "[replay]\n[logging]\n", "sections.toml")) == RunConfig()


# ----------------------------------------------------------------------------------------- overrides


def test_parse_override_values() -> None:
    assert parse_override("replay.capacity_trees=10") == ("replay.capacity_trees", 10)
    assert parse_override(" replay.map_size_gb = 1.5 ") == ("replay.map_size_gb", 1.5)
    assert parse_override("logging.json_logs=true") == ("logging.json_logs", True)
    assert parse_override("logging.json_logs=false") == ("logging.json_logs", False)
    assert parse_override('replay.dir="a b"') == ("replay.dir", "a b")
    assert parse_override("replay.dir=runs/x") == ("replay.dir", "runs/x")
    assert parse_override("replay.dir=") == ("replay.dir", "")
    assert parse_override("a.b=[1, 2, 3]") == ("a.b", [1, 2, 3])
    assert parse_override('a.b=["x", "y"]') == ("a.b", ["x", "y"])
    assert parse_override("a.b=x=y") == ("a.b", "x=y")
    assert parse_override("a.b=1e3") == ("a.b", 1000.0)
    for bad in ("replay.dir", "=5", " = 5", ""):
        with pytest.raises(ConfigError, match=r"section\.key=value"):
            parse_override(bad)


def test_overrides_of_every_value_type() -> None:
    config = load_config(
        None,
        [
            "replay.capacity_trees=10",
            "replay.map_size_gb=0.5",
            "replay.samples_per_insert=2",
            "logging.json_logs=true",
            "replay.sampler=uniform",
            'transport.replay_endpoint="tcp://10.0.0.1:7000"',
            "transport.server_secret_key=keys/s.key_secret",
            "logging.metrics_path=runs/m.jsonl",
        ],
    )
    assert config.replay.capacity_trees == 10
    assert config.replay.map_size_gb == 0.5
    assert config.replay.samples_per_insert == 2.0
    assert config.logging.json_logs is True
    assert config.replay.sampler == "uniform"
    assert config.transport.replay_endpoint == "tcp://10.0.0.1:7000"
    assert config.transport.server_secret_key == "keys/s.key_secret"
    assert config.logging.metrics_path == "runs/m.jsonl"


def test_array_override_into_a_scalar_key_names_the_key() -> None:
    # No v1 key takes an array; an array value parses and is then refused by the key it targets.
    message = config_error("replay.capacity_trees=[1, 2]")
    assert "replay.capacity_trees" in message
    message = config_error('replay.dir=["a", "b"]')
    assert "replay.dir" in message


def test_overrides_beat_the_file_and_later_overrides_win(tmp_path: Path) -> None:
    path = write(tmp_path, "[replay]\ncapacity_trees = 500\nseed = 3\n")
    config = load_config(path, ["replay.capacity_trees=7", "replay.capacity_trees=8"])
    assert config.replay.capacity_trees == 8
    assert config.replay.seed == 3


def test_override_of_a_section_that_is_a_value_in_the_file(tmp_path: Path) -> None:
    path = write(tmp_path, "replay = 5\n")
    message = config_error("replay.seed=1", path=path)
    assert "replay" in message
    assert "not a section" in message


# ----------------------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("override", "dotted", "suggestion"),
    [
        ("replay.capacity_tree=5", "replay.capacity_tree", "replay.capacity_trees"),
        ("replay.max_stalenes=1", "replay.max_stalenes", "replay.max_staleness"),
        ("transport.max_message_byte=2048", "transport.max_message_byte", "transport.max_message_bytes"),
        ("replai.dir=x", "replai", "replay"),
        ("loging.level=debug", "loging", "logging"),
    ],
)
def test_unknown_key_in_override(override: str, dotted: str, suggestion: str) -> None:
    message = config_error(override)
    assert message.startswith(f"{dotted}: unknown key")
    assert f"did you mean {suggestion}?" in message


def test_unknown_key_without_a_close_match_lists_the_known_keys() -> None:
    message = config_error("replay.zzzzzz=1")
    assert message.startswith("replay.zzzzzz: unknown key")
    assert "did you mean" not in message
    assert "capacity_trees" in message
    assert "sampler" in message


@pytest.mark.parametrize(
    ("text", "dotted", "suggestion"),
    [
        ("[replay]\ncapacity_tree = 5\n", "replay.capacity_tree", "replay.capacity_trees"),
        ("[logging]\nlevle = 'debug'\n", "logging.levle", "logging.level"),
        ("[transprt]\nreplay_endpoint = 'x'\n", "transprt", "transport"),
        ("sampler = 'fifo'\n", "sampler", None),
    ],
)
def test_unknown_key_in_file(tmp_path: Path, text: str, dotted: str, suggestion: str | None) -> None:
    message = config_error(path=write(tmp_path, text))
    assert message.startswith(f"{dotted}: unknown key")
    if suggestion is not None:
        assert f"did you mean {suggestion}?" in message


@pytest.mark.parametrize(
    ("override", "dotted"),
    [
        ("replay.capacity_trees=-1", "replay.capacity_trees"),
        ("replay.capacity_trees=many", "replay.capacity_trees"),
        ("replay.capacity_trees=1.5", "replay.capacity_trees"),
        ("replay.sampler=lifo", "replay.sampler"),
        ("replay.map_size_gb=0", "replay.map_size_gb"),
        ("replay.samples_per_insert=-1.0", "replay.samples_per_insert"),
        ("transport.max_message_bytes=1024", "transport.max_message_bytes"),
        ("logging.level=verbose", "logging.level"),
        ("logging.json_logs=perhaps", "logging.json_logs"),
        ("replay.dir=[1]", "replay.dir"),
        ("replay=5", "replay"),
    ],
)
def test_bad_value_names_the_key(override: str, dotted: str) -> None:
    message = config_error(override)
    assert message.startswith(f"{dotted}: "), message
    assert "(got " in message


def test_bad_value_in_file_names_the_key(tmp_path: Path) -> None:
    message = config_error(path=write(tmp_path, "[replay]\nmax_staleness = -2\n"))
    assert message.startswith("replay.max_staleness: ")
    assert "-2" in message


def test_several_bad_values_are_all_reported() -> None:
    message = config_error("replay.capacity_trees=0", "logging.level=loud")
    assert "replay.capacity_trees" in message
    assert "logging.level" in message


@pytest.mark.parametrize("override", ["replay.dir.sub=1", "replay.capacity_trees.x=1", "logging.json_logs.a.b=1"])
def test_override_into_a_non_section(override: str) -> None:
    message = config_error(override)
    value_key = ".".join(override.split("=")[0].split(".")[:2])
    assert message.startswith(f"{value_key} is a value, not a section")
    assert repr(override.split("=")[0]) in message


def test_nonexistent_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope.toml"
    message = config_error(path=missing)
    assert str(missing) in message
    assert "does not exist" in message
    assert str(tmp_path) in config_error(path=tmp_path)  # a directory is not a config file


@pytest.mark.parametrize(
    "text",
    ["[replay\n", "capacity_trees = = 1\n", "[replay]\nseed = 1\nseed = 2\n", "[replay]\ndir = 'unterminated\n"],
)
def test_invalid_toml(tmp_path: Path, text: str) -> None:
    path = write(tmp_path, text)
    message = config_error(path=path)
    assert str(path) in message
    assert "not valid TOML" in message


def test_file_that_is_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "latin1.toml"
    path.write_bytes(b'[replay]\ndir = "caf\xe9"\n')
    message = config_error(path=path)
    assert str(path) in message


# ----------------------------------------------------------------------------------------- dump


def test_dump_of_defaults_reloads_equal(tmp_path: Path) -> None:
    text = dump_config(RunConfig())
    assert "[transport]" in text
    assert "[replay]" in text
    assert "[logging]" in text
    assert "# server_secret_key = (unset)" in text
    assert load_config(write(tmp_path, text)) == RunConfig()


def test_dump_of_a_customised_config_reloads_equal(tmp_path: Path) -> None:
    config = load_config(
        None,
        [
            "replay.capacity_trees=10",
            "replay.map_size_gb=0.125",
            "replay.sampler=uniform",
            "replay.samples_per_insert=3.5",
            "logging.json_logs=false",
            "logging.level=error",
            'transport.client_secret_key="C:\\\\keys\\\\client \\"one\\".key"',
        ],
    )
    assert config.transport.client_secret_key == 'C:\\keys\\client "one".key'
    text = dump_config(config)
    parsed = tomllib.loads(text)
    assert parsed["logging"]["json_logs"] is False  # a real TOML boolean, not 0
    assert parsed["replay"]["capacity_trees"] == 10
    assert parsed["replay"]["map_size_gb"] == 0.125
    assert "metrics_path" not in parsed["logging"]  # unset keys are comments
    again = load_config(write(tmp_path, text))
    assert again == config
    assert again != RunConfig()


def test_dump_escapes_control_characters() -> None:
    config = RunConfig(replay=ReplayConfig(dir='a\nb\tc\rd\x00e\x7ff\x1b\\"é✓'))
    reloaded = build_config(tomllib.loads(dump_config(config)))
    assert reloaded.replay.dir == config.replay.dir
    assert reloaded == config


names = st.text(max_size=30)


@settings(max_examples=150, deadline=None)
@given(
    dir_=names,
    endpoint=names,
    metrics=st.one_of(st.none(), names),
    capacity=st.integers(1, 2**62),
    map_size=st.floats(min_value=1e-9, max_value=1e12, allow_nan=False),
    spi=st.one_of(st.none(), st.floats(min_value=1e-6, max_value=1e6)),
    json_logs=st.one_of(st.none(), st.booleans()),
    level=st.sampled_from(["debug", "info", "warning", "error"]),
)
def test_dump_round_trip_property(
    dir_: str,
    endpoint: str,
    metrics: str | None,
    capacity: int,
    map_size: float,
    spi: float | None,
    json_logs: bool | None,
    level: str,
) -> None:
    config = RunConfig(
        transport=TransportConfig(replay_endpoint=endpoint),
        replay=ReplayConfig(dir=dir_, capacity_trees=capacity, map_size_gb=map_size, samples_per_insert=spi),
        logging=LoggingConfig(level=level, json_logs=json_logs, metrics_path=metrics),
    )
    assert build_config(tomllib.loads(dump_config(config))) == config
