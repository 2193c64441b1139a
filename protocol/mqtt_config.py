"""Broker connection settings (the ``[broker]`` table of hub and agent configs)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Final
from urllib.parse import urlsplit

from fedge.protocol.configdoc import doc
from fedge.protocol.errors import ConfigError

PROTOCOLS: Final = ("auto", "5", "3.1.1")
DEFAULT_PORTS: Final = {"mqtt": 1883, "mqtts": 8883}


@dataclass(frozen=True)
class BrokerConfig:
    """Where the broker is and how to log in.

    ``url`` is ``mqtt://host[:port]`` (plain TCP, port 1883) or ``mqtts://host[:port]`` (TLS, 8883).
    ``insecure=True`` skips verification of the broker's certificate and host name (tests only).
    ``protocol="auto"`` tries MQTT 5 first and falls back to 3.1.1.
    """

    url: str = field(
        default="mqtt://127.0.0.1:1883",
        metadata=doc(
            'broker address: mqtt://host[:port] (TCP, 1883) or mqtts://host[:port] (TLS, 8883); the hub also '
            'takes "embedded"', example='mqtts://broker.example:8883'),
    )
    username: str | None = field(
        default=None,
        metadata=doc(
            'MQTT user name (devices: their device id when the broker has per-device ACLs)', example='device-00'),
    )
    password: str | None = field(default=None, metadata=doc('MQTT password (needs username)', example='s3cret'))
    ca_file: str | None = field(
        default=None,
        metadata=doc(
            "CA certificate that signed the broker's certificate (PEM), relative to the config file", example='ca.pem'),
    )
    cert_file: str | None = field(
        default=None,
        metadata=doc('client certificate (PEM) for brokers that require one; goes with key_file', example='device.crt'),
    )
    key_file: str | None = field(default=None, metadata=doc('private key of cert_file (PEM)', example='device.key'))
    insecure: bool = field(
        default=False,
        metadata=doc("skip verification of the broker's certificate and host name (tests only)"),
    )
    protocol: str = field(
        default="auto",
        metadata=doc('MQTT version: auto (try 5, fall back to 3.1.1), 5 or 3.1.1', example='3.1.1'),
    )
    keepalive: int = field(default=30, metadata=doc('seconds between MQTT keep-alive pings'))

    def __post_init__(self) -> None:
        self.validate("broker")

    @property
    def scheme(self) -> str:
        return urlsplit(self.url).scheme

    @property
    def host(self) -> str:
        return urlsplit(self.url).hostname or ""

    @property
    def port(self) -> int:
        return urlsplit(self.url).port or DEFAULT_PORTS[self.scheme]

    @property
    def tls(self) -> bool:
        return self.scheme == "mqtts" or self.ca_file is not None or self.cert_file is not None

    def validate(self, prefix: str) -> None:
        """Raise ConfigError naming ``<prefix>.<field>`` for the first invalid field."""
        _check_url(f"{prefix}.url", self.url)
        for name in ("username", "password", "ca_file", "cert_file", "key_file"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value):
                raise ConfigError(f"{prefix}.{name}", f"must be a non-empty string, got {value!r}")
        if self.password is not None and self.username is None:
            raise ConfigError(f"{prefix}.password", "a password needs a username")
        for name in ("ca_file", "cert_file", "key_file"):
            value = getattr(self, name)
            if value is not None and not Path(value).is_file():
                raise ConfigError(f"{prefix}.{name}", f"file {value!r} does not exist")
        if (self.cert_file is None) != (self.key_file is None):
            missing = "key_file" if self.key_file is None else "cert_file"
            raise ConfigError(f"{prefix}.{missing}", "cert_file and key_file go together")
        if not isinstance(self.insecure, bool):
            raise ConfigError(f"{prefix}.insecure", f"must be true or false, got {self.insecure!r}")
        if self.protocol not in PROTOCOLS:
            raise ConfigError(f"{prefix}.protocol", f"must be one of {', '.join(PROTOCOLS)}; got {self.protocol!r}")
        if (
            not isinstance(self.keepalive, int)
            or isinstance(self.keepalive, bool)
            or not 5 <= self.keepalive <= 65535
        ):
            raise ConfigError(f"{prefix}.keepalive", f"must be whole seconds in [5, 65535], got {self.keepalive!r}")

    @classmethod
    def from_mapping(cls, table: Mapping[str, Any], field: str = "broker") -> BrokerConfig:
        """Build from a parsed TOML/JSON table; errors name ``<field>.<key>``."""
        if not isinstance(table, Mapping):
            raise ConfigError(field, f"must be a table, got {type(table).__name__}")
        known = {f.name for f in fields(cls)}
        for key in table:
            if key not in known:
                raise ConfigError(f"{field}.{key}", f"unknown setting; known: {', '.join(sorted(known))}")
        values = dict(table)
        if values.get("protocol") == 5 and not isinstance(values.get("protocol"), bool):
            values["protocol"] = "5"  # TOML `protocol = 5` is a natural spelling
        cfg = object.__new__(cls)  # bypass __post_init__ so errors carry the caller's field name
        for f in fields(cls):
            object.__setattr__(cfg, f.name, values.get(f.name, f.default))
        cfg.validate(field)
        return cfg


def _check_url(name: str, url: object) -> None:
    if not isinstance(url, str):
        raise ConfigError(name, f"must be a string like mqtt://host:1883, got {url!r}")
    parts = urlsplit(url)
    if parts.scheme not in DEFAULT_PORTS:
        raise ConfigError(name, f"scheme must be mqtt:// or mqtts://, got {url!r}")
    try:
        port = parts.port
    except ValueError as exc:
        raise ConfigError(name, f"bad port in {url!r}") from exc
    if not parts.hostname:
        raise ConfigError(name, f"no host in {url!r}")
    if port == 0 or parts.path not in ("", "/") or parts.query or parts.fragment or parts.username:
        raise ConfigError(name, f"expected mqtt[s]://host[:port] and nothing else, got {url!r}")


__all__ = ["DEFAULT_PORTS", "PROTOCOLS", "BrokerConfig"]
