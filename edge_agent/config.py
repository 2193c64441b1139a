"""``agent.toml``: the edge agent's configuration (frozen, validated, paths resolved).

::

    device_id = "device-00"      # 1-64 of [A-Za-z0-9_-]; also the MQTT client id
    fleet = "demo"
    data = "shards/device-00.npz" # local data file (.npz with x, y or .csv)
    state_dir = "state"           # artifacts, heads, feature cache, state.json
    backend = "auto"              # auto | litert | ort | numpy
    seed = 0
    session_expiry_s = 86400      # optional: how long the broker keeps our session while offline
    max_epochs = 50               # declines (over_limits) rounds announcing more local epochs
    max_round_s = 900             # stops training after this many seconds (and always at the round's deadline)

    [broker]
    url = "mqtt://127.0.0.1:1883"

    [privacy]                     # optional: this device takes part in differentially private rounds only
    epsilon_budget = 8.0          # the device declines a round that would push its own epsilon past this
    delta = 1e-5
    min_noise_multiplier = 0.5    # declines rounds announcing less noise (z) than this
    max_clip = 10.0               # declines rounds announcing a larger clip norm (C); 0 = no ceiling
    modes = ["central", "local", "distributed"]  # DP modes it accepts (distributed: SecAgg rounds only)

    [eligibility]                 # optional: train only when these hold (unknown conditions never block)
    require_power = true          # on external power
    min_battery_pct = 50          # battery at least this full
    allow_metered = false         # not on a metered link (NetworkManager)
    max_load = 0.8                # 1-minute load average per CPU at most this

Relative paths resolve against the folder of the config file.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from fedge.edge_agent.eligibility import EligibilityPolicy, policy_from_mapping
from fedge.protocol.configdoc import Section, doc, keys_of, starter_toml
from fedge.protocol.errors import ConfigError
from fedge.protocol.mqtt_config import BrokerConfig
from fedge.protocol.tomlfile import read_toml
from fedge.protocol.topics import RESERVED_IDS, valid_id

AGENT_SESSION_EXPIRY_S = 86400  # default: the broker keeps an offline agent's session (and queue) one day

BACKENDS: Final = ("auto", "litert", "ort", "numpy")
_BROKER_FILES: Final = ("ca_file", "cert_file", "key_file")
_KNOWN: Final = frozenset({"device_id", "fleet", "data", "state_dir", "backend", "seed", "session_expiry_s", "broker",
                           "privacy", "validation_fraction", "local_only_epochs", "personalization", "ditto_mu",
                           "max_epochs", "max_round_s", "max_model_bytes", "max_head_bytes", "eligibility",
                           "hub_public_key", "keep_secagg_inputs"})
_PRIVACY_KNOWN: Final = frozenset({"epsilon_budget", "delta", "min_noise_multiplier", "max_clip", "modes"})
_DP_MODES: Final = ("central", "local", "distributed")


@dataclass(frozen=True)
class DevicePrivacy:
    """``[privacy]`` of agent.toml: the device's own budget and the weakest DP it accepts. Its guarantee in
    ``local`` mode holds whatever the hub announces: rounds outside these bounds are declined."""

    epsilon_budget: float = field(
        metadata=doc(
            "this device's own privacy budget: it declines a round that would take its epsilon past it", example=8.0),
    )
    delta: float = field(default=1e-5, metadata=doc("the delta of the device's epsilon"))
    min_noise_multiplier: float = field(
        default=0.5,
        metadata=doc('the least noise (z) it accepts: rounds announcing less are declined', example=0.8),
    )
    max_clip: float = field(
        default=0.0,
        metadata=doc('the largest clip norm (C) it accepts (0 = no ceiling)', example=1.0),
    )
    modes: tuple[str, ...] = field(
        default=("central", "local", "distributed"),
        metadata=doc('the DP modes it takes part in (central trusts the hub to add the noise; distributed is '
                     'accepted in secure-aggregation rounds only)', example=['local']),
    )


def _privacy(table: Any) -> DevicePrivacy | None:
    if table is None:
        return None
    if not isinstance(table, Mapping):
        raise ConfigError("privacy", "must be a table")
    unknown = sorted(set(table) - _PRIVACY_KNOWN)
    if unknown:
        raise ConfigError(f"privacy.{unknown[0]}", f"unknown field; allowed: {', '.join(sorted(_PRIVACY_KNOWN))}")

    def num(key: str, default: float | None, *, positive: bool) -> float:
        value = table.get(key, default)
        if value is None:
            raise ConfigError(f"privacy.{key}", "is required")
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or (
                value <= 0 if positive else value < 0):
            raise ConfigError(f"privacy.{key}", f"must be a finite number {'> 0' if positive else '>= 0'}, "
                              f"got {value!r}")
        return float(value)

    delta = num("delta", 1e-5, positive=True)
    if delta >= 1:
        raise ConfigError("privacy.delta", f"must be in (0, 1), got {delta}")
    modes = table.get("modes", ["central", "local", "distributed"])
    if not isinstance(modes, list) or not modes or any(m not in _DP_MODES for m in modes):
        raise ConfigError("privacy.modes", f"must be a non-empty list of {', '.join(_DP_MODES)}, got {modes!r}")
    return DevicePrivacy(num("epsilon_budget", None, positive=True), delta,
                         num("min_noise_multiplier", 0.5, positive=True), num("max_clip", 0.0, positive=False),
                         tuple(modes))


@dataclass(frozen=True)
class AgentConfig:
    """A validated ``agent.toml``: every field typed and checked, paths resolved against the file's folder.
    Loading a malformed file raises ``ConfigError`` naming the bad field."""

    device_id: str = field(
        metadata=doc("this device's id (1-64 of [A-Za-z0-9_-]); also its MQTT client id", example='pi-kitchen-01'),
    )
    fleet: str = field(metadata=doc("the fleet to join (the hub's fleet)", example='demo'))
    data: Path = field(
        metadata=doc(
            'local training data: .npz with arrays x and y, or .csv with the label in the last column',
            example='data/local.npz'),
    )
    state_dir: Path = field(
        metadata=doc(
            'where the agent keeps models, heads, the feature cache, its state and privacy ledger', example='state'),
    )
    broker: BrokerConfig
    backend: str = field(
        default="auto",
        metadata=doc(
            'trainer: auto (the first that works here, each probed in a child process: LiteRT, then ONNX Runtime '
            'training, then NumPy), litert, ort or numpy', example='litert'),
    )
    seed: int = field(default=0, metadata=doc('seed of the local shuffling (the DP noise is never seeded)'))
    session_expiry_s: int = field(
        default=86400,
        metadata=doc("seconds the broker keeps this device's session and queued messages while it is offline"),
    )
    validation_fraction: float = field(
        default=0.2,
        metadata=doc("share of the local data held out (once, deterministically) to evaluate heads; it never trains",
                     example=0.25),
    )
    local_only_epochs: int = field(
        default=20,
        metadata=doc("epochs budget of the device's own heads: the local-only baseline (the source head trained on "
                     "this device alone, once per backbone) and, with personalization = auto, the fine-tuned global "
                     "head; both early-stopped by cross-validation inside the training rows", example=30),
    )
    personalization: str = field(
        default="auto",
        metadata=doc("how the device's own head is made: auto (the best of the global head, the global head "
                     "fine-tuned and the local-only head, chosen by cross-validation on the device's training rows), "
                     "finetune (the global head fine-tuned on local data, as sent) or ditto (a separate personal "
                     "head pulled toward the global head by ditto_mu)", example="finetune"),
    )
    ditto_mu: float = field(
        default=0.1,
        metadata=doc("ditto: strength mu of the pull mu*||v - w_global||^2 of the personal head v", example=0.5),
    )
    max_epochs: int = field(
        default=50,
        metadata=doc("the most local epochs this device trains per round: it declines a round announcing more "
                     "(over_limits)", example=10),
    )
    max_round_s: float = field(
        default=900.0,
        metadata=doc("the most seconds this device trains per round: training stops there (or at the round's "
                     "deadline, if sooner) and the update covers the steps done", example=120),
    )
    max_model_bytes: int = field(
        default=64 << 20,
        metadata=doc("largest model/full frame (every artifact file of a backbone) this device accepts, in bytes",
                     example=134217728),
    )
    max_head_bytes: int = field(
        default=8 << 20,
        metadata=doc("largest model/head frame this device accepts, in bytes (announce, ack and reject frames have "
                     "fixed small limits, PROTOCOL.md section 7)"),
    )
    hub_public_key: Path | None = field(
        default=None,
        metadata=doc("the hub's Ed25519 public key (PEM; hub-signing.pub of fedge fleet init, put in the bundle by "
                     "fedge devices provision). Set: the agent acts only on hub messages signed by it (or a key it "
                     "rotated to), with rounds and model versions only moving forward (PROTOCOL.md, Signatures). "
                     "Unset: unsigned messages are accepted", example='hub-signing.pub'),
    )
    keep_secagg_inputs: bool = field(
        default=False,
        metadata=doc("keep each secure-aggregation round's quantised update (before masking) in "
                     "state_dir/secagg/round-<n>.npz: what this device contributed, for its own audit", example=True),
    )
    privacy: DevicePrivacy | None = None
    eligibility: EligibilityPolicy = field(default_factory=EligibilityPolicy)


def _flag(table: Mapping[str, Any], key: str, default: bool) -> bool:
    value = table.get(key, default)
    if not isinstance(value, bool):
        raise ConfigError(key, f"must be true or false, got {value!r}")
    return value


def _positive(table: Mapping[str, Any], key: str, default: float) -> float:
    value = table.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value <= 0:
        raise ConfigError(key, f"must be a finite number > 0, got {value!r}")
    return float(value)


def _str(table: Mapping[str, Any], key: str, default: str | None = None) -> str:
    value = table.get(key, default)
    if value is None:
        raise ConfigError(key, "is required")
    if not isinstance(value, str) or not value:
        raise ConfigError(key, f"must be a non-empty string, got {value!r}")
    return value


def _int(table: Mapping[str, Any], key: str, default: int, minimum: int) -> int:
    value = table.get(key, default)
    if not isinstance(value, int) or isinstance(value, bool):
        raise ConfigError(key, f"must be an integer, got {value!r}")
    if value < minimum:
        raise ConfigError(key, f"must be >= {minimum}, got {value}")
    return value


def _fraction(table: Mapping[str, Any], key: str, default: float, upper: float | None = 1.0) -> float:
    value = table.get(key, default)
    if (isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value < 0
            or (upper is not None and value >= upper)):
        raise ConfigError(key, f"must be a number in [0, {upper if upper is not None else 'inf'}), got {value!r}")
    return float(value)


def _choice(table: Mapping[str, Any], key: str, default: str, allowed: tuple[str, ...]) -> str:
    value = table.get(key, default)
    if value not in allowed:
        raise ConfigError(key, f"{value!r} is not one of {', '.join(allowed)}")
    return str(value)


def _path(table: Mapping[str, Any], key: str, base: Path, default: str | None = None) -> Path:
    path = Path(_str(table, key, default)).expanduser()
    return path if path.is_absolute() else (base / path).resolve()


def config_from_mapping(table: Mapping[str, Any], base_dir: Path) -> AgentConfig:
    """Validate a parsed TOML table; relative paths resolve against ``base_dir``."""
    unknown = sorted(set(table) - _KNOWN)
    if unknown:
        raise ConfigError(unknown[0], f"unknown field; allowed: {', '.join(sorted(_KNOWN))}")
    device_id = _str(table, "device_id")
    if device_id in RESERVED_IDS:
        raise ConfigError("device_id", f"{device_id!r} is reserved (the hub's and the operator's broker accounts, "
                          "and the hub's name in secure aggregation)")
    if not valid_id(device_id):
        raise ConfigError("device_id", f"{device_id!r} must be 1-64 characters of [A-Za-z0-9_-]")
    fleet = _str(table, "fleet")
    if not valid_id(fleet):
        raise ConfigError("fleet", f"{fleet!r} must be 1-64 characters of [A-Za-z0-9_-]")
    backend = _str(table, "backend", "auto")
    if backend not in BACKENDS:
        raise ConfigError("backend", f"{backend!r} is not one of {', '.join(BACKENDS)}")
    broker = table.get("broker")
    if not isinstance(broker, Mapping):
        raise ConfigError("broker", "a [broker] table with at least url is required")
    broker = dict(broker)
    for key in _BROKER_FILES:  # TLS files: relative to the config file's folder too
        if isinstance(broker.get(key), str) and broker[key]:
            broker[key] = str(_path(broker, key, base_dir))
    return AgentConfig(
        device_id=device_id,
        fleet=fleet,
        data=_path(table, "data", base_dir),
        state_dir=_path(table, "state_dir", base_dir, "state"),
        broker=BrokerConfig.from_mapping(broker, field="broker"),
        backend=backend,
        seed=_int(table, "seed", 0, 0),
        session_expiry_s=_int(table, "session_expiry_s", AGENT_SESSION_EXPIRY_S, 0),
        validation_fraction=_fraction(table, "validation_fraction", 0.2),
        local_only_epochs=_int(table, "local_only_epochs", 20, 1),
        personalization=_choice(table, "personalization", "auto", ("auto", "finetune", "ditto")),
        ditto_mu=_fraction(table, "ditto_mu", 0.1, upper=None),
        max_epochs=_int(table, "max_epochs", 50, 1),
        max_round_s=_positive(table, "max_round_s", 900.0),
        max_model_bytes=_int(table, "max_model_bytes", 64 << 20, 1 << 16),
        max_head_bytes=_int(table, "max_head_bytes", 8 << 20, 1 << 10),
        hub_public_key=_path(table, "hub_public_key", base_dir) if "hub_public_key" in table else None,
        keep_secagg_inputs=_flag(table, "keep_secagg_inputs", False),
        privacy=_privacy(table.get("privacy")),
        eligibility=policy_from_mapping(table.get("eligibility")),
    )


def reference_sections() -> list[Section]:
    """Every key of agent.toml, documented (the source of docs/CONFIG.md and ``fedge-agent init``)."""
    return [
        Section(None, keys_of(AgentConfig, only=("device_id", "fleet", "data", "state_dir", "backend", "seed",
                                                 "session_expiry_s", "validation_fraction", "local_only_epochs",
                                                 "personalization", "ditto_mu", "max_epochs", "max_round_s",
                                                 "max_model_bytes", "max_head_bytes", "hub_public_key",
                                                 "keep_secagg_inputs"),
                              required=("device_id", "fleet", "data"), defaults={"state_dir": "state"})),
        Section("broker", keys_of(BrokerConfig, required=("url",)), "the MQTT broker the hub uses (required)"),
        Section("privacy", keys_of(DevicePrivacy),
                "optional: the device's own privacy budget and floors. With it the device takes part in DP rounds "
                "only; without it, it applies whatever DP a round announces, with no budget of its own"),
        Section("eligibility", keys_of(EligibilityPolicy),
                "optional: when this device trains (the defaults of its device profile when provisioned). A round "
                "announced while a condition is known not to hold is declined (not_eligible); a condition the "
                "platform cannot tell (no battery in sysfs or Termux, no NetworkManager) does not block. "
                "FEDGE_SYSFS_ROOT (tests, containers) replaces /sys"),
    ]


def starter_config(device_id: str = "device-00", fleet: str = "demo") -> str:
    """A commented agent.toml with every key, the required ones set."""
    return starter_toml(
        "fedge agent configuration (every key: docs/CONFIG.md). Relative paths resolve against this file's "
        "folder.\nCheck it with: fedge-agent run --config agent.toml --check",
        reference_sections()[:2],  # [privacy] is opt-in: documented, not in the starter
        {"device_id": device_id, "fleet": fleet, "data": "data.npz", "broker.url": "mqtt://127.0.0.1:1883"},
    )


def load_config(path: str | Path) -> AgentConfig:
    """Read and validate ``agent.toml``; every problem is a ConfigError naming the field."""
    return config_from_mapping(read_toml(path), Path(path).resolve().parent)


__all__ = [
    "BACKENDS", "AgentConfig", "DevicePrivacy", "config_from_mapping", "load_config", "reference_sections",
    "starter_config",
]
