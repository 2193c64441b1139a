"""agent.toml: a valid file loads with paths resolved; every invalid value names its field."""

from __future__ import annotations

from pathlib import Path

import pytest

from fedge.edge_agent.config import load_config
from fedge.protocol.errors import ConfigError

GOOD = """device_id = "dev-1"
fleet = "demo"
data = "shards/dev-1.npz"
state_dir = "state"
backend = "numpy"
seed = 7

[broker]
url = "mqtt://127.0.0.1:1883"
"""


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "conf" / "agent.toml"
    path.parent.mkdir(exist_ok=True)
    path.write_text(text)
    return path


def test_valid_config_resolves_relative_paths_against_its_folder(tmp_path: Path) -> None:
    cfg = load_config(_write(tmp_path, GOOD))
    assert cfg.device_id == "dev-1"
    assert cfg.fleet == "demo"
    assert cfg.data == (tmp_path / "conf" / "shards" / "dev-1.npz").resolve()
    assert cfg.state_dir == (tmp_path / "conf" / "state").resolve()
    assert cfg.backend == "numpy"
    assert cfg.seed == 7
    assert cfg.broker.url == "mqtt://127.0.0.1:1883"


def test_defaults_for_optional_fields(tmp_path: Path) -> None:
    text = GOOD.replace('backend = "numpy"\n', "").replace("seed = 7\n", "").replace('state_dir = "state"\n', "")
    cfg = load_config(_write(tmp_path, text))
    assert (cfg.backend, cfg.seed) == ("auto", 0)
    assert cfg.state_dir == (tmp_path / "conf" / "state").resolve()


@pytest.mark.parametrize(
    ("old", "new", "field"),
    [
        ('device_id = "dev-1"\n', "", "device_id"),
        ('device_id = "dev-1"', 'device_id = "dev/1"', "device_id"),
        ('device_id = "dev-1"', 'device_id = "fedge-operator"', "device_id"),
        ('device_id = "dev-1"', 'device_id = "hub"', "device_id"),
        ('fleet = "demo"', 'fleet = ""', "fleet"),
        ('data = "shards/dev-1.npz"\n', "", "data"),
        ('data = "shards/dev-1.npz"', "data = 3", "data"),
        ('backend = "numpy"', 'backend = "tensorflow"', "backend"),
        ("seed = 7", "seed = -1", "seed"),
        ("seed = 7", 'seed = "x"', "seed"),
        ("seed = 7", "sed = 7", "sed"),
        ('url = "mqtt://127.0.0.1:1883"', 'url = "http://x"', "broker.url"),
        ("[broker]\n", "[brokers]\n", "brokers"),
        ('\n[broker]\nurl = "mqtt://127.0.0.1:1883"\n', "\n", "broker"),
    ],
)
def test_invalid_values_name_the_field(tmp_path: Path, old: str, new: str, field: str) -> None:
    assert old in GOOD
    with pytest.raises(ConfigError) as info:
        load_config(_write(tmp_path, GOOD.replace(old, new)))
    assert info.value.field == field
    assert field in str(info.value)


def test_missing_or_broken_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.toml")
    with pytest.raises(ConfigError, match="TOML"):
        load_config(_write(tmp_path, "device_id = \n"))


def test_broker_tls_files_resolve_against_the_config_folder(tmp_path: Path) -> None:
    path = _write(tmp_path, GOOD + 'ca_file = "certs/ca.pem"\n')
    (path.parent / "certs").mkdir()
    (path.parent / "certs" / "ca.pem").write_text("-----BEGIN CERTIFICATE-----\n")
    cfg = load_config(path)
    assert cfg.broker.ca_file == str((path.parent / "certs" / "ca.pem").resolve())
    (path.parent / "certs" / "ca.pem").unlink()
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert info.value.field == "broker.ca_file"
