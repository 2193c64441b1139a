"""``hub.toml``: the hub daemon's configuration (frozen dataclasses, validated in ``__post_init__``).

::

    fleet = "demo"
    state_dir = "hub-state"          # SQLite store, model registry, rounds.jsonl
    artifacts = "artifacts"          # exported source model = version v0 (w0)
    eval_data = "eval.npz"           # optional: held-out data to score each new version
    devices = ["device-00"]          # optional allow-list (else devices are known from presence)

    [broker]
    url = "embedded"                 # or mqtt://host:port, mqtts://...; "embedded" starts amqtt in-process
    embedded_host = "127.0.0.1"
    embedded_port = 1883

    [rounds]
    min_devices = 2
    deadline_s = 60
    fraction = 1.0
    local_epochs = 1
    lr = 0.05
    seed = 0
    max_update_bytes = 8388608

    [aggregation]
    strategy = "fedavg"
    proximal_lambda = 0.0

    [schedule]
    every_s = 0                      # 0 = off: else start a round every N s when none is open
    chain_rounds = 0                 # 0 = off: else a started round is followed by up to N-1 more

    [privacy]                        # client-level differential privacy (PROTOCOL.md)
    mode = "off"                     # off | central | local
    noise_multiplier = 1.0           # z
    clip = 1.0                       # C
    sample_rate = 0.1                # q (Poisson sampling of eligible devices)
    delta = 1e-5
    epsilon_budget = 0               # 0 = none; else rounds past it are refused

Relative paths resolve against the folder of the config file. Every error is a ConfigError
naming the field, e.g. ``rounds.deadline_s``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Final

from fedge.protocol.errors import ConfigError
from fedge.protocol.mqtt_config import BrokerConfig
from fedge.protocol.tomlfile import read_toml
from fedge.protocol.topics import valid_id

STRATEGIES: Final = ("fedavg",)
EMBEDDED: Final = "embedded"


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_num(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _need_int(field: str, value: object, minimum: int) -> None:
    if not _is_int(value):
        raise ConfigError(field, f"must be an integer, got {value!r}")
    assert isinstance(value, int)
    if value < minimum:
        raise ConfigError(field, f"must be >= {minimum}, got {value}")


def _need_num(field: str, value: object, *, positive: bool = False, minimum: float | None = None) -> None:
    if not _is_num(value):
        raise ConfigError(field, f"must be a finite number, got {value!r}")
    assert isinstance(value, int | float)
    if positive and value <= 0:
        raise ConfigError(field, f"must be > 0, got {value}")
    if minimum is not None and value < minimum:
        raise ConfigError(field, f"must be >= {minimum}, got {value}")


@dataclass(frozen=True)
class RoundsConfig:
    min_devices: int = 1
    deadline_s: float = 60.0
    fraction: float = 1.0
    local_epochs: int = 1
    lr: float = 0.05
    seed: int = 0
    max_update_bytes: int = 8 << 20

    def __post_init__(self) -> None:
        _need_int("rounds.min_devices", self.min_devices, 1)
        _need_num("rounds.deadline_s", self.deadline_s, positive=True)
        _need_num("rounds.fraction", self.fraction, positive=True)
        if self.fraction > 1:
            raise ConfigError("rounds.fraction", f"must be in (0, 1], got {self.fraction}")
        _need_int("rounds.local_epochs", self.local_epochs, 1)
        _need_num("rounds.lr", self.lr, positive=True)
        _need_int("rounds.seed", self.seed, 0)
        _need_int("rounds.max_update_bytes", self.max_update_bytes, 1024)


@dataclass(frozen=True)
class AggregationConfig:
    strategy: str = "fedavg"
    proximal_lambda: float = 0.0

    def __post_init__(self) -> None:
        if self.strategy not in STRATEGIES:
            raise ConfigError("aggregation.strategy", f"{self.strategy!r} is not one of {', '.join(STRATEGIES)}")
        _need_num("aggregation.proximal_lambda", self.proximal_lambda, minimum=0.0)


PRIVACY_MODES: Final = ("off", "central", "local", "distributed")


@dataclass(frozen=True)
class PrivacyConfig:
    """``[privacy]``: client-level differential privacy of the fleet's updates (see PROTOCOL.md)."""

    mode: str = "off"                   # off | central | local (distributed needs secure aggregation)
    noise_multiplier: float = 1.0       # z: noise std is z*C (central: on the sum; local: on each update)
    clip: float = 1.0                   # C: L2 norm every update is clipped to
    sample_rate: float = 0.1            # q: each eligible device is selected independently with probability q
    delta: float = 1e-5                 # the delta of every reported epsilon
    epsilon_budget: float = 0.0         # 0 = no budget; else a round that would exceed it is refused

    def __post_init__(self) -> None:
        if self.mode not in PRIVACY_MODES:
            raise ConfigError("privacy.mode", f"{self.mode!r} is not one of {', '.join(PRIVACY_MODES)}")
        if self.mode == "distributed":
            raise ConfigError("privacy.mode", "distributed DP is private against the hub only under secure "
                              "aggregation, which this hub does not have yet: use central or local")
        _need_num("privacy.noise_multiplier", self.noise_multiplier, minimum=0.0)
        if self.mode != "off" and self.noise_multiplier <= 0:
            raise ConfigError("privacy.noise_multiplier", "must be > 0 when privacy is on")
        _need_num("privacy.clip", self.clip, positive=True)
        _need_num("privacy.sample_rate", self.sample_rate, positive=True)
        if self.sample_rate > 1:
            raise ConfigError("privacy.sample_rate", f"must be in (0, 1], got {self.sample_rate}")
        _need_num("privacy.delta", self.delta, positive=True)
        if self.delta >= 1:
            raise ConfigError("privacy.delta", f"must be in (0, 1), got {self.delta}")
        _need_num("privacy.epsilon_budget", self.epsilon_budget, minimum=0.0)

    @property
    def enabled(self) -> bool:
        return self.mode != "off"


@dataclass(frozen=True)
class ScheduleConfig:
    every_s: float = 0.0
    chain_rounds: int = 0

    def __post_init__(self) -> None:
        _need_num("schedule.every_s", self.every_s, minimum=0.0)
        _need_int("schedule.chain_rounds", self.chain_rounds, 0)


@dataclass(frozen=True)
class HubBroker:
    """The broker to use; ``embedded`` is set when the hub runs amqtt itself on embedded_host:port."""

    config: BrokerConfig
    embedded: bool = False
    embedded_host: str = "127.0.0.1"
    embedded_port: int = 1883

    def __post_init__(self) -> None:
        if not isinstance(self.embedded_host, str) or not self.embedded_host:
            raise ConfigError("broker.embedded_host", f"must be a non-empty string, got {self.embedded_host!r}")
        _need_int("broker.embedded_port", self.embedded_port, 1)
        if self.embedded_port > 65535:
            raise ConfigError("broker.embedded_port", f"must be <= 65535, got {self.embedded_port}")

    @classmethod
    def from_mapping(cls, table: Mapping[str, Any]) -> HubBroker:
        rest = {k: v for k, v in table.items() if k not in ("embedded_host", "embedded_port")}
        host = table.get("embedded_host", "127.0.0.1")
        port = table.get("embedded_port", 1883)
        embedded = rest.get("url") == EMBEDDED
        if embedded:
            _need_int("broker.embedded_port", port, 1)
            rest["url"] = f"mqtt://{host}:{port}"
            rest.setdefault("protocol", "3.1.1")  # amqtt speaks only MQTT 3.1.1: skip the v5 probe
        return cls(BrokerConfig.from_mapping(rest, field="broker"), embedded, host, port)


@dataclass(frozen=True)
class HubConfig:
    """A validated ``hub.toml``: every field typed and checked, paths resolved against the file's folder.
    Loading a malformed file raises ``ConfigError`` naming the bad field."""

    fleet: str
    state_dir: Path
    artifacts: Path
    broker: HubBroker
    eval_data: Path | None = None
    devices: tuple[str, ...] | None = None
    rounds: RoundsConfig = RoundsConfig()
    aggregation: AggregationConfig = AggregationConfig()
    schedule: ScheduleConfig = ScheduleConfig()
    privacy: PrivacyConfig = PrivacyConfig()

    def __post_init__(self) -> None:
        if not isinstance(self.fleet, str) or not valid_id(self.fleet):
            raise ConfigError("fleet", f"{self.fleet!r} must be 1-64 characters of [A-Za-z0-9_-]")
        if self.devices is not None:
            if not isinstance(self.devices, tuple) or not self.devices:
                raise ConfigError("devices", "must be a non-empty list of device ids")
            for d in self.devices:
                if not isinstance(d, str) or not valid_id(d):
                    raise ConfigError("devices", f"{d!r} must be 1-64 characters of [A-Za-z0-9_-]")
        if self.rounds.min_devices > len(self.devices or ()) > 0:
            raise ConfigError("rounds.min_devices", f"{self.rounds.min_devices} exceeds the {len(self.devices or ())} "
                              "devices of the allow-list")


_TOP: Final = frozenset({"fleet", "state_dir", "artifacts", "eval_data", "devices", "broker", "rounds",
                         "aggregation", "schedule", "privacy"})


def _table(table: Mapping[str, Any], key: str, cls: type[Any]) -> Any:
    sub = table.get(key, {})
    if not isinstance(sub, Mapping):
        raise ConfigError(key, "must be a table")
    allowed = {f.name for f in fields(cls)}
    unknown = sorted(set(sub) - allowed)
    if unknown:
        raise ConfigError(f"{key}.{unknown[0]}", f"unknown field; allowed: {', '.join(sorted(allowed))}")
    return cls(**sub)


def _path(table: Mapping[str, Any], key: str, base: Path, default: str | None = None) -> Path | None:
    value = table.get(key, default)
    if value is None:
        return None
    if not isinstance(value, str) or not value:
        raise ConfigError(key, f"must be a non-empty path string, got {value!r}")
    path = Path(value).expanduser()
    return path if path.is_absolute() else (base / path).resolve()


def config_from_mapping(table: Mapping[str, Any], base_dir: Path) -> HubConfig:
    """Validate a parsed TOML table; relative paths resolve against ``base_dir``."""
    unknown = sorted(set(table) - _TOP)
    if unknown:
        raise ConfigError(unknown[0], f"unknown field; allowed: {', '.join(sorted(_TOP))}")
    for key in ("fleet", "artifacts"):
        if key not in table:
            raise ConfigError(key, "is required")
    broker = table.get("broker")
    if not isinstance(broker, Mapping) or "url" not in broker:
        raise ConfigError("broker.url", "a [broker] table with url is required (\"embedded\" or mqtt://host:port)")
    devices = table.get("devices")
    if devices is not None and not isinstance(devices, list):
        raise ConfigError("devices", f"must be a list of device ids, got {devices!r}")
    state_dir = _path(table, "state_dir", base_dir, "hub-state")
    artifacts = _path(table, "artifacts", base_dir)
    assert state_dir is not None and artifacts is not None
    return HubConfig(
        fleet=table["fleet"],
        state_dir=state_dir,
        artifacts=artifacts,
        broker=HubBroker.from_mapping(broker),
        eval_data=_path(table, "eval_data", base_dir),
        devices=None if devices is None else tuple(devices),
        rounds=_table(table, "rounds", RoundsConfig),
        aggregation=_table(table, "aggregation", AggregationConfig),
        schedule=_table(table, "schedule", ScheduleConfig),
        privacy=_table(table, "privacy", PrivacyConfig),
    )


def load_config(path: str | Path) -> HubConfig:
    """Read and validate ``hub.toml``; every problem is a ConfigError naming the field."""
    return config_from_mapping(read_toml(path), Path(path).resolve().parent)


__all__ = [
    "EMBEDDED",
    "STRATEGIES",
    "AggregationConfig",
    "HubBroker",
    "HubConfig",
    "PrivacyConfig",
    "RoundsConfig",
    "ScheduleConfig",
    "config_from_mapping",
    "load_config",
]
