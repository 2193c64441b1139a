"""BrokerConfig: defaults, parsing of the [broker] table, errors that name the field."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from fedge.protocol.errors import ConfigError
from fedge.protocol.mqtt_config import BrokerConfig


def test_defaults_and_url_parts() -> None:
    cfg = BrokerConfig()
    assert (cfg.host, cfg.port, cfg.tls, cfg.protocol, cfg.keepalive) == ("127.0.0.1", 1883, False, "auto", 30)
    tls = BrokerConfig.from_mapping({"url": "mqtts://broker.example.org", "protocol": 5})
    assert (tls.host, tls.port, tls.tls, tls.protocol) == ("broker.example.org", 8883, True, "5")
    assert BrokerConfig.from_mapping({"url": "mqtt://h:1999", "protocol": "3.1.1"}).port == 1999


def test_tls_files_and_credentials(tmp_path: Path) -> None:
    for name in ("ca.pem", "dev.pem", "dev.key"):
        (tmp_path / name).write_text("x")
    cfg = BrokerConfig.from_mapping(
        {
            "url": "mqtts://h:8883", "username": "dev1", "password": "s3cret", "ca_file": str(tmp_path / "ca.pem"),
            "cert_file": str(tmp_path / "dev.pem"), "key_file": str(tmp_path / "dev.key"), "insecure": True,
            "keepalive": 60,
        }
    )
    assert cfg.username == "dev1" and cfg.insecure and cfg.keepalive == 60


@pytest.mark.parametrize(
    ("table", "field"),
    [
        ({"url": "http://h:1883"}, "broker.url"),
        ({"url": "mqtt://:1883"}, "broker.url"),
        ({"url": "mqtt://h:99999"}, "broker.url"),
        ({"url": "mqtt://h:1883/path"}, "broker.url"),
        ({"url": 1883}, "broker.url"),
        ({"password": "x"}, "broker.password"),
        ({"username": ""}, "broker.username"),
        ({"ca_file": "/nonexistent/ca.pem"}, "broker.ca_file"),
        ({"protocol": "4"}, "broker.protocol"),
        ({"keepalive": 0}, "broker.keepalive"),
        ({"keepalive": "30"}, "broker.keepalive"),
        ({"insecure": "yes"}, "broker.insecure"),
        ({"hots": "x"}, "broker.hots"),
    ],
)
def test_errors_name_the_field(table: dict[str, Any], field: str) -> None:
    with pytest.raises(ConfigError) as info:
        BrokerConfig.from_mapping(table)
    assert info.value.field == field


def test_field_prefix_and_cert_without_key(tmp_path: Path) -> None:
    (tmp_path / "c.pem").write_text("x")
    with pytest.raises(ConfigError) as info:
        BrokerConfig.from_mapping({"cert_file": str(tmp_path / "c.pem")}, field="agent.broker")
    assert info.value.field == "agent.broker.key_file"
    with pytest.raises(ConfigError) as info:
        BrokerConfig.from_mapping(["not", "a", "table"], field="hub.broker")  # type: ignore[arg-type]
    assert info.value.field == "hub.broker"
    with pytest.raises(ConfigError) as info:
        BrokerConfig(url="tcp://x")
    assert info.value.field == "broker.url"
