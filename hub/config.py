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

    [limits]                         # upper bounds of control overrides (over them: refused, over_limits)
    max_min_devices = 10000
    max_deadline_s = 3600
    max_local_epochs = 50
    max_lr = 10.0

    [aggregation]
    strategy = "fedavg"              # fedavg | median | trimmed_mean
    proximal_lambda = 0.0
    max_weight_ratio = 4.0           # an update weighs at most 4x the cohort's median sample count
    max_update_norm = "auto"         # or a number: the L2 bound updates are clipped to

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

    [http]                           # read-only fleet dashboard and Prometheus /metrics
    listen = "127.0.0.1:8080"        # empty = off
    token = ""                       # required when listen is not a loopback address

    [store]
    keep_update_payloads = false     # raw update frames are dropped once their round closed

Relative paths resolve against the folder of the config file. Every error is a ConfigError
naming the field, e.g. ``rounds.deadline_s``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Final

from fedge.core.secagg import SecAggConfig
from fedge.hub.dashboard.listen import MIN_TOKEN_CHARS, is_loopback, parse_listen, valid_token
from fedge.protocol.configdoc import Section, doc, keys_of, starter_toml
from fedge.protocol.errors import ConfigError
from fedge.protocol.mqtt_config import BrokerConfig
from fedge.protocol.tomlfile import read_toml
from fedge.protocol.topics import RESERVED_IDS, valid_id

STRATEGIES: Final = ("fedavg", "median", "trimmed_mean")
EMBEDDED: Final = "embedded"


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_num(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _need_int(field: str, value: object, minimum: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool):
        raise ConfigError(field, f"must be an integer, got {value!r}")
    if value < minimum:
        raise ConfigError(field, f"must be >= {minimum}, got {value}")


def _need_num(field: str, value: object, *, positive: bool = False, minimum: float | None = None) -> None:
    if not isinstance(value, int | float) or not _is_num(value):
        raise ConfigError(field, f"must be a finite number, got {value!r}")
    if positive and value <= 0:
        raise ConfigError(field, f"must be > 0, got {value}")
    if minimum is not None and value < minimum:
        raise ConfigError(field, f"must be >= {minimum}, got {value}")


@dataclass(frozen=True)
class RoundsConfig:
    min_devices: int = field(
        default=1,
        metadata=doc(
            'quorum: a round produces a new model only with updates from at least this many devices', example=3),
    )
    deadline_s: float = field(
        default=60.0,
        metadata=doc(
            'seconds a round stays open for updates (it closes earlier once every selected device answered)',
            example=120),
    )
    fraction: float = field(
        default=1.0,
        metadata=doc(
            'share of the online (or allow-listed) devices selected per round (no-DP rounds), in (0, 1]', example=0.5),
    )
    local_epochs: int = field(
        default=1,
        metadata=doc('passes over its local data each device trains per round', example=2),
    )
    lr: float = field(default=0.05, metadata=doc("SGD learning rate of the devices' head training", example=0.05))
    seed: int = field(
        default=0,
        metadata=doc('seed of device selection (rounds are reproducible for a seed)', example=7),
    )
    max_update_bytes: int = field(
        default=8 << 20,
        metadata=doc('largest update frame the hub accepts, in bytes (bigger ones are rejected as too_large)'),
    )
    offline_grace_s: float = field(
        default=10.0,
        metadata=doc(
            'a selected device whose last will (offline) arrived counts as failed once it stays offline this long '
            '(a broker restart makes every device look offline for a moment)', example=30),
    )
    compression: str = field(
        default="off",
        metadata=doc('compressed updates: off, int8 (a byte per value) or int4 (half a byte per value); devices '
                     'round stochastically and carry what rounding lost into their next update (error feedback). '
                     'Not with [secagg] (secure aggregation quantises into its own ring)', example="int4"),
    )
    over_select: float = field(
        default=0.25,
        metadata=doc(
            'plain and SecAgg rounds close as soon as selected / (1 + over_select) devices (at least min_devices) sent '
            'a valid update: the slowest, or silent, over_select share is not waited for (0 = wait for every '
            'selected device, or the deadline)', example=0.5),
    )
    mode: str = field(
        default="sync",
        metadata=doc('sync (a round aggregates once, when it closes) or buffered (asynchronous, FedBuff: the round '
                     'stays open until its deadline and makes a new version every buffer_k accepted updates, '
                     'devices training again on each new version; PROTOCOL.md, "Buffered rounds"). Not with [secagg] '
                     'or [privacy]', example="buffered"),
    )
    buffer_k: int = field(
        default=10,
        metadata=doc('buffered rounds: accepted updates per new version', example=5),
    )
    max_staleness: int = field(
        default=10,
        metadata=doc('buffered rounds: an update counts while its model is at most this many versions behind the '
                     'current one (weighted 1/sqrt(1 + staleness)); older ones are rejected as stale_round',
                     example=3),
    )
    server_lr: float = field(
        default=1.0,
        metadata=doc('buffered rounds: the step from the current version toward the buffer\'s aggregate, in (0, 1]',
                     example=0.5),
    )
    max_versions: int = field(
        default=0,
        metadata=doc('buffered rounds: the round closes once it made this many versions (0: at its deadline)',
                     example=4),
    )

    def __post_init__(self) -> None:
        if self.mode not in ("sync", "buffered"):
            raise ConfigError("rounds.mode", f'must be "sync" or "buffered", got {self.mode!r}')
        _need_int("rounds.buffer_k", self.buffer_k, 1)
        _need_int("rounds.max_staleness", self.max_staleness, 0)
        _need_int("rounds.max_versions", self.max_versions, 0)
        _need_num("rounds.server_lr", self.server_lr, positive=True)
        if self.server_lr > 1:
            raise ConfigError("rounds.server_lr", f"must be in (0, 1], got {self.server_lr}")
        if self.compression not in ("off", "int8", "int4"):
            raise ConfigError("rounds.compression", f"must be off, int8 or int4, got {self.compression!r}")
        _need_int("rounds.min_devices", self.min_devices, 1)
        _need_num("rounds.over_select", self.over_select, minimum=0.0)
        _need_num("rounds.offline_grace_s", self.offline_grace_s, minimum=0.0)
        _need_num("rounds.deadline_s", self.deadline_s, positive=True)
        _need_num("rounds.fraction", self.fraction, positive=True)
        if self.fraction > 1:
            raise ConfigError("rounds.fraction", f"must be in (0, 1], got {self.fraction}")
        _need_int("rounds.local_epochs", self.local_epochs, 1)
        _need_num("rounds.lr", self.lr, positive=True)
        _need_int("rounds.seed", self.seed, 0)
        _need_int("rounds.max_update_bytes", self.max_update_bytes, 1024)


@dataclass(frozen=True)
class LimitsConfig:
    """``[limits]``: upper bounds of what a ``control/round/start`` may ask for (PROTOCOL.md §5). A request over
    any of them is refused with reason ``over_limits``; ``[rounds]`` defaults must lie within them too."""

    max_min_devices: int = field(
        default=10000, metadata=doc('the largest quorum (min_devices) a control message may set', example=100))
    max_deadline_s: float = field(
        default=3600.0,
        metadata=doc('the longest round (deadline_s, seconds) a control message may set', example=600))
    max_local_epochs: int = field(
        default=50, metadata=doc('the most local epochs per round a control message may set', example=10))
    max_lr: float = field(default=10.0, metadata=doc('the largest learning rate a control message may set',
                                                     example=1.0))

    def __post_init__(self) -> None:
        _need_int("limits.max_min_devices", self.max_min_devices, 1)
        _need_num("limits.max_deadline_s", self.max_deadline_s, positive=True)
        _need_int("limits.max_local_epochs", self.max_local_epochs, 1)
        _need_num("limits.max_lr", self.max_lr, positive=True)

    def excess(self, name: str, value: float) -> str | None:
        """Why ``value`` of round parameter ``name`` is over its limit, or None (parameters without one: None)."""
        bound = getattr(self, f"max_{name}", None)
        if bound is None or value <= bound:
            return None
        return f"{name} {value:g} exceeds limits.max_{name} = {bound:g}"


@dataclass(frozen=True)
class AggregationConfig:
    """``[aggregation]``: how a round's updates become the next head, and the bounds no device can exceed outside
    DP rounds (PROTOCOL.md, "Hub behaviour"): weight capped, L2 norm clipped, robust strategies."""

    strategy: str = field(
        default="fedavg",
        metadata=doc('how updates become the next global head: fedavg (sample-weighted mean), median '
                     '(coordinate-wise) or trimmed_mean (coordinate-wise, trim_fraction cut at each end); all with '
                     'the proximal pull; median and trimmed_mean ignore sample counts', example="trimmed_mean"),
    )
    trim_fraction: float = field(
        default=0.2,
        metadata=doc('trimmed_mean: the share of values dropped at each end of every coordinate, in [0, 0.5) '
                     '(floor(trim_fraction x updates) each side; none in small cohorts)', example=0.1),
    )
    max_weight_ratio: float = field(
        default=4.0,
        metadata=doc("fedavg: an update's weight is its n_samples capped at this multiple of the round's lower median "
                     "n_samples (>= 1)", example=10.0),
    )
    max_update_norm: float | str = field(
        default="auto",
        metadata=doc('the L2 norm updates are clipped to (non-DP rounds): a number, or "auto" = norm_multiplier x '
                     'the lower median non-zero norm of this round\'s and the last norm_window rounds\' accepted '
                     'updates (this round\'s alone at first); never above norm_ceiling', example=5.0),
    )
    norm_multiplier: float = field(
        default=1.0,
        metadata=doc('"auto" norm bound: this multiple of the median accepted norm (>= 1; 1: no update is longer '
                     'than a typical one, which costs honest rounds nothing measurable: bench/robust_strategy.py)',
                     example=2.0),
    )
    max_weight_share: float = field(
        default=0.25,
        metadata=doc("fedavg: no update carries more than this share of a round's total weight, in (0, 1] (a round "
                     "of n updates gives each at least 1/n)", example=0.2),
    )
    norm_window: int = field(
        default=5,
        metadata=doc('"auto" norm bound: how many recent rounds\' accepted norms count (0 = this round only)',
                     example=10),
    )
    norm_ceiling: float = field(
        default=100.0,
        metadata=doc('absolute ceiling of the norm bound, whatever the history says (raise it for heads whose honest '
                     'updates are longer: the hub logs each round\'s bound and how many updates it clipped)',
                     example=10.0),
    )
    proximal_lambda: float = field(
        default=0.0,
        metadata=doc(
            'lambda of the pull toward the source head w0: w = (FedAvg + 2 lambda w0) / (1 + 2 lambda); 0 = '
            'plain FedAvg', example=0.01),
    )
    deploy_gate: bool = field(
        default=True,
        metadata=doc("with eval_data: deploy a new version only if its held-out accuracy is not below the deployed "
                     "one's by more than deploy_tolerance (else it stays a candidate)"),
    )
    deploy_tolerance: float = field(
        default=0.01,
        metadata=doc("accuracy points (as a fraction) a new version may lose against the deployed one", example=0.0),
    )
    federated_gate: bool | str = field(
        default="auto",
        metadata=doc('after each non-DP round, the round\'s devices score the new version and the deployed head on '
                     'their validation data (an evaluation round, PROTOCOL.md); it is deployed only if its federated '
                     'accuracy is not below the deployed head\'s by more than deploy_tolerance. "auto" (the default): '
                     'on when the hub has no eval_data, so that every fleet has a gate', example=True),
    )

    def __post_init__(self) -> None:
        if self.strategy not in STRATEGIES:
            raise ConfigError("aggregation.strategy", f"{self.strategy!r} is not one of {', '.join(STRATEGIES)}")
        _need_num("aggregation.proximal_lambda", self.proximal_lambda, minimum=0.0)
        _need_num("aggregation.trim_fraction", self.trim_fraction, minimum=0.0)
        if self.trim_fraction >= 0.5:
            raise ConfigError("aggregation.trim_fraction", f"must be < 0.5, got {self.trim_fraction}")
        _need_num("aggregation.max_weight_ratio", self.max_weight_ratio, minimum=1.0)
        _need_num("aggregation.norm_multiplier", self.norm_multiplier, minimum=1.0)
        _need_num("aggregation.max_weight_share", self.max_weight_share, positive=True)
        if self.max_weight_share > 1:
            raise ConfigError("aggregation.max_weight_share", f"must be in (0, 1], got {self.max_weight_share}")
        _need_int("aggregation.norm_window", self.norm_window, 0)
        _need_num("aggregation.norm_ceiling", self.norm_ceiling, positive=True)
        if not isinstance(self.deploy_gate, bool):
            raise ConfigError("aggregation.deploy_gate", f"must be true or false, got {self.deploy_gate!r}")
        _need_num("aggregation.deploy_tolerance", self.deploy_tolerance, minimum=0.0)
        if not isinstance(self.federated_gate, bool) and self.federated_gate != "auto":
            raise ConfigError("aggregation.federated_gate", f'must be true, false or "auto", got '
                              f'{self.federated_gate!r}')
        if self.max_update_norm != "auto":
            if not _is_num(self.max_update_norm) or float(self.max_update_norm) <= 0:
                raise ConfigError("aggregation.max_update_norm",
                                  f'must be "auto" or a number > 0, got {self.max_update_norm!r}')
            if float(self.max_update_norm) > self.norm_ceiling:
                raise ConfigError("aggregation.max_update_norm",
                                  f"{self.max_update_norm} is above norm_ceiling {self.norm_ceiling}")

    @property
    def fixed_update_norm(self) -> float | None:
        """``max_update_norm`` as a number, None for "auto"."""
        return None if isinstance(self.max_update_norm, str) else float(self.max_update_norm)


PRIVACY_MODES: Final = ("off", "central", "local", "distributed")


@dataclass(frozen=True)
class PrivacyConfig:
    """``[privacy]``: client-level differential privacy of the fleet's updates (see PROTOCOL.md)."""

    mode: str = field(
        default="off",
        metadata=doc(
            'client-level DP: off, central (devices clip, hub adds noise), local (devices clip and add noise) or '
            'distributed (each device adds its share of the noise; needs [secagg] enabled)', example='central'),
    )
    noise_multiplier: float = field(
        default=1.0,
        metadata=doc(
            'z: the Gaussian noise std is z * clip (on the sum in central mode, on each update in local mode)',
            example=1.0),
    )
    clip: float = field(default=1.0, metadata=doc('C: the L2 norm every update is clipped to', example=0.5))
    sample_rate: float = field(
        default=0.1,
        metadata=doc('q: under DP each eligible device is selected independently with this probability', example=0.1),
    )
    delta: float = field(default=1e-5, metadata=doc('the delta at which epsilon is reported and budgeted'))
    epsilon_budget: float = field(
        default=0.0,
        metadata=doc(
            "the fleet's privacy budget: a round that would take epsilon past it is refused (0 = no budget)",
            example=8.0),
    )

    dropout_allowance: float = field(
        default=0.1,
        metadata=doc(
            "distributed mode: the share of a round's cohort that may drop out. Each device's noise is split over "
            "m = max(min_devices, ceil((1 - this) * cohort)) devices, and a round whose sum holds fewer than m "
            "inputs fails (no model): higher tolerates more dropouts, at more noise in the sum", example=0.2),
    )
    amplification: bool = field(
        default=False,
        metadata=doc(
            "central mode: count rounds as Poisson-subsampled (far smaller epsilon); valid only while the cohort is "
            "secret from whoever sees results (announces must be readable by fleet members only)", example=True),
    )

    def __post_init__(self) -> None:
        if self.mode not in PRIVACY_MODES:
            raise ConfigError("privacy.mode", f"{self.mode!r} is not one of {', '.join(PRIVACY_MODES)}")
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
        _need_num("privacy.dropout_allowance", self.dropout_allowance, minimum=0.0)
        if self.dropout_allowance >= 1:
            raise ConfigError("privacy.dropout_allowance", f"must be in [0, 1), got {self.dropout_allowance}")

    @property
    def enabled(self) -> bool:
        return self.mode != "off"


@dataclass(frozen=True)
class ScheduleConfig:
    every_s: float = field(
        default=0.0,
        metadata=doc('start a round every N seconds when none is open (0 = off)', example=3600),
    )
    chain_rounds: int = field(
        default=0,
        metadata=doc('a started round is followed by up to N-1 more, each on the previous result (0 = off)', example=5),
    )

    def __post_init__(self) -> None:
        _need_num("schedule.every_s", self.every_s, minimum=0.0)
        _need_int("schedule.chain_rounds", self.chain_rounds, 0)


@dataclass(frozen=True)
class StoreConfig:
    """``[store]``: what the hub keeps in ``hub.sqlite`` beyond what it needs."""

    keep_update_payloads: bool = field(
        default=False,
        metadata=doc("keep every accepted update's raw frame after its round closed (false: dropped when the round "
                     "closes, only its nonce, sample count and metrics stay; an open round's are always kept so a "
                     "restarted hub can resume it)", example=True),
    )

    def __post_init__(self) -> None:
        if not isinstance(self.keep_update_payloads, bool):
            raise ConfigError("store.keep_update_payloads", f"must be true or false, got {self.keep_update_payloads!r}")


@dataclass(frozen=True)
class SecAggSection:
    """``[secagg]``: secure aggregation (SecAgg+ over the broker; PROTOCOL.md, "Secure aggregation")."""

    enabled: bool = field(default=False, metadata=doc(
        "every round is a secure-aggregation round: the hub learns only the sum of the devices' updates (agents "
        "take part with their agent extra: cryptography)", example=True))
    degree: int = field(default=0, metadata=doc(
        "neighbours k each device masks with; 0 = 2*ceil(log2 n) for a cohort of n", example=8))
    threshold: int = field(default=0, metadata=doc(
        "Shamir threshold t (k/2 < t <= k): a stage needs t survivors; 0 = k//2 + 1", example=5))
    ring_bits: int = field(default=32, metadata=doc("the sum is computed modulo 2**ring_bits (8..62)", example=32))
    clip: float = field(default=1.0, metadata=doc(
        "each coordinate of an update is clipped to [-clip, clip] before quantisation (under distributed DP the hub "
        "announces at least C + 6 noise standard deviations by itself)", example=1.0))
    scale: float = field(default=65536.0, metadata=doc("quantisation: q = round(x * scale)", example=65536.0))
    stochastic: bool = field(default=False, metadata=doc("unbiased stochastic rounding instead of nearest",
                                                         example=True))
    stage_timeout_s: float = field(default=30.0, metadata=doc(
        "how long the key and unmask stages wait for devices (the masked-input stage lasts until the round's "
        "deadline)", example=10.0))
    l2_clip: float | str = field(default="auto", metadata=doc(
        'each update is clipped to this L2 norm before quantisation, and the hub refuses a sum that inputs so bounded '
        'cannot make: a number, 0 (no L2 clip: only the per-coordinate one), or "auto" = it follows the median of '
        "the devices' update norms (each input carries one bit: under the clip or not), starting from "
        "l2_clip_start; under distributed DP the privacy clip C", example=2.0))
    l2_clip_start: float = field(default=1.0, metadata=doc(
        '"auto" L2 clip: where it starts (it moves by at most ~10% a round)', example=5.0))

    def __post_init__(self) -> None:
        if not isinstance(self.enabled, bool):
            raise ConfigError("secagg.enabled", f"must be true or false, got {self.enabled!r}")
        if not isinstance(self.stochastic, bool):
            raise ConfigError("secagg.stochastic", f"must be true or false, got {self.stochastic!r}")
        for name in ("degree", "threshold", "ring_bits"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ConfigError(f"secagg.{name}", f"must be a whole number >= 0, got {value!r}")
        _need_num("secagg.clip", self.clip, positive=True)
        _need_num("secagg.scale", self.scale, positive=True)
        _need_num("secagg.stage_timeout_s", self.stage_timeout_s, positive=True)
        if self.l2_clip != "auto" and (not _is_num(self.l2_clip) or float(self.l2_clip) < 0):
            raise ConfigError("secagg.l2_clip", f'must be "auto" or a number >= 0, got {self.l2_clip!r}')
        _need_num("secagg.l2_clip_start", self.l2_clip_start, positive=True)
        cfg = self.params()  # ring_bits range and the rest, named
        if self.degree and self.threshold and not self.degree / 2 < self.threshold <= self.degree:
            raise ConfigError("secagg.threshold", f"{self.threshold} must satisfy degree/2 < threshold <= degree "
                              f"({self.degree}; a cohort larger than degree + 1 rounds an odd degree up to even)")
        cfg.check_capacity(2)  # the smallest cohort: a ring that two devices overflow fits nobody

    def params(self) -> SecAggConfig:
        """The library's parameters (ConfigError naming the field if they are unusable); an "auto" L2 clip starts
        at ``l2_clip_start``."""
        l2 = self.l2_clip_start if self.adaptive_l2 else float(self.l2_clip)
        return SecAggConfig(degree=self.degree, threshold=self.threshold, ring_bits=self.ring_bits, clip=self.clip,
                            scale=self.scale, stochastic=self.stochastic, l2_clip=l2)

    @property
    def adaptive_l2(self) -> bool:
        return self.l2_clip == "auto"


@dataclass(frozen=True)
class ConductConfig:
    """``[conduct]``: devices that keep breaking or stalling rounds are excluded from selection (fedge.core.conduct)."""

    strikes: int = field(default=2, metadata=doc(
        "strikes that exclude a device: one for each SecAgg share or share bundle proved bad, each round it stalled "
        "(selected, online, silent until the deadline); a round it contributes to takes one away", example=3))
    exclude_rounds: int = field(default=5, metadata=doc(
        "rounds a device is excluded the first time (twice as long each time after)", example=10))
    max_exclusions: int = field(default=3, metadata=doc(
        "after this many exclusions a device stays out until `fedge hub devices readmit`", example=2))

    def __post_init__(self) -> None:
        _need_int("conduct.strikes", self.strikes, 1)
        _need_int("conduct.exclude_rounds", self.exclude_rounds, 1)
        _need_int("conduct.max_exclusions", self.max_exclusions, 1)


@dataclass(frozen=True)
class HttpConfig:
    """``[http]``: the read-only fleet dashboard and Prometheus ``/metrics`` served by the hub process."""

    listen: str = field(
        default="",
        metadata=doc(
            'HOST:PORT of the read-only web dashboard and /metrics (empty = off; fedge hub serve --http overrides '
            'it); keep it on loopback unless a token is set', example='127.0.0.1:8080'),
    )
    token: str = field(
        default="",
        metadata=doc(
            f'bearer token every dashboard request must carry (?token=..., Authorization: Bearer ...), at least '
            f'{MIN_TOKEN_CHARS} of [A-Za-z0-9._~-]; required when listen is not a loopback address',
            example='Xk3v9Qm2-pT7wLz4_Rb8sNd1'),
    )

    def __post_init__(self) -> None:
        if not isinstance(self.listen, str):
            raise ConfigError("http.listen", f"must be a string HOST:PORT, got {self.listen!r}")
        if not isinstance(self.token, str):
            raise ConfigError("http.token", f"must be a string, got {self.token!r}")
        if self.token and not valid_token(self.token):
            raise ConfigError("http.token", f"must be at least {MIN_TOKEN_CHARS} of [A-Za-z0-9._~-] (e.g. python -c "
                              "'import secrets; print(secrets.token_urlsafe(24))')")
        if not self.listen:
            return
        try:
            host, _port = parse_listen(self.listen)
        except ValueError as exc:
            raise ConfigError("http.listen", str(exc)) from None
        if not self.token and not is_loopback(host):
            raise ConfigError("http.token", f"is required when the dashboard listens on {host}, not a loopback "
                              "address (anyone who can reach it could read the fleet's state)")

    @property
    def enabled(self) -> bool:
        return bool(self.listen)


@dataclass(frozen=True)
class HubBroker:
    """The broker to use; ``embedded`` is set when the hub runs amqtt itself on embedded_host:port."""

    config: BrokerConfig
    embedded: bool = False
    embedded_host: str = field(
        default="127.0.0.1",
        metadata=doc('with url = "embedded": the address the hub\'s own MQTT broker (amqtt, MQTT 3.1.1) listens on'),
    )
    embedded_port: int = field(default=1883, metadata=doc('with url = "embedded": the port of the hub\'s own broker'))
    retain_on: tuple[str, ...] = field(
        default=(),
        metadata=doc(
            "the other nodes of a broker cluster that keeps retained messages per node (RabbitMQ): the hub "
            "publishes every retained message on each too (same login and TLS settings; docs/BROKERS.md)",
            example=["mqtt://rabbit-2:1883", "mqtt://rabbit-3:1883"]),
    )

    def __post_init__(self) -> None:
        if not isinstance(self.embedded_host, str) or not self.embedded_host:
            raise ConfigError("broker.embedded_host", f"must be a non-empty string, got {self.embedded_host!r}")
        _need_int("broker.embedded_port", self.embedded_port, 1)
        if self.embedded_port > 65535:
            raise ConfigError("broker.embedded_port", f"must be <= 65535, got {self.embedded_port}")

    def node_configs(self) -> list[BrokerConfig]:
        """The [broker] settings for each ``retain_on`` node (the main one's login, TLS and protocol)."""
        return [replace(self.config, url=url) for url in self.retain_on]

    @classmethod
    def from_mapping(cls, table: Mapping[str, Any]) -> HubBroker:
        rest = {k: v for k, v in table.items() if k not in ("embedded_host", "embedded_port", "retain_on")}
        host = table.get("embedded_host", "127.0.0.1")
        port = table.get("embedded_port", 1883)
        embedded = rest.get("url") == EMBEDDED
        if embedded:
            _need_int("broker.embedded_port", port, 1)
            rest["url"] = f"mqtt://{host}:{port}"
            rest.setdefault("protocol", "3.1.1")  # amqtt speaks only MQTT 3.1.1: skip the v5 probe
        retain_on = table.get("retain_on", [])
        if not isinstance(retain_on, list | tuple) or not all(isinstance(u, str) for u in retain_on):
            raise ConfigError("broker.retain_on", f"must be a list of broker URLs, got {retain_on!r}")
        for url in retain_on:
            BrokerConfig.from_mapping({"url": url}, field="broker.retain_on")
        if retain_on and embedded:
            raise ConfigError("broker.retain_on", "the embedded broker is one node: nothing to retain on")
        return cls(BrokerConfig.from_mapping(rest, field="broker"), embedded, host, port, tuple(retain_on))


@dataclass(frozen=True)
class HubConfig:
    """A validated ``hub.toml``: every field typed and checked, paths resolved against the file's folder.
    Loading a malformed file raises ``ConfigError`` naming the bad field."""

    fleet: str = field(
        metadata=doc("the fleet's id (1-64 of [A-Za-z0-9_-]); every topic is under fedge/<fleet>/", example='demo'),
    )
    state_dir: Path = field(
        metadata=doc('where the hub keeps its SQLite store, model versions and rounds.jsonl', example='hub-state'),
    )
    artifacts: Path = field(
        metadata=doc(
            'the exported source model (fedge export): it becomes version v0, the proximal anchor w0',
            example='artifacts'),
    )
    broker: HubBroker
    eval_data: Path | None = field(
        default=None,
        metadata=doc(
            "held-out data (.npz with x, y) of the devices' domain to score every new version (optional)",
            example='eval.npz'),
    )
    devices: tuple[str, ...] | None = field(
        default=None,
        metadata=doc(
            'allow-list of device ids (optional; without it devices are known from their presence)',
            example=['device-00', 'device-01']),
    )
    signing_key: Path | None = field(
        default=None,
        metadata=doc("the hub's Ed25519 private key (PEM, hub-signing.key of fedge fleet init): every frame the hub "
                     "publishes is signed with it (PROTOCOL.md, Signatures); devices with hub_public_key refuse "
                     "anything else", example='hub-signing.key'),
    )
    rounds: RoundsConfig = RoundsConfig()
    limits: LimitsConfig = LimitsConfig()
    aggregation: AggregationConfig = AggregationConfig()
    schedule: ScheduleConfig = ScheduleConfig()
    privacy: PrivacyConfig = PrivacyConfig()
    http: HttpConfig = HttpConfig()
    store: StoreConfig = StoreConfig()
    secagg: SecAggSection = SecAggSection()
    conduct: ConductConfig = ConductConfig()

    def __post_init__(self) -> None:
        if self.rounds.mode == "buffered" and self.secagg.enabled:
            raise ConfigError("rounds.mode", "SecAgg rounds stay synchronous: a secure sum is unmasked once, so it "
                              "cannot make a version every buffer_k updates; use mode = \"sync\" with [secagg]")
        if self.rounds.mode == "buffered" and self.privacy.enabled:
            raise ConfigError("rounds.mode", "buffered rounds are not private: each version would be a DP-FedAvg "
                              "release the privacy ledger does not account for; use mode = \"sync\" with [privacy]")
        if self.rounds.compression != "off" and self.secagg.enabled:
            raise ConfigError("rounds.compression", "secure aggregation quantises updates into its own ring: "
                              "compressed updates cannot be masked; use one or the other")
        if self.privacy.mode == "distributed" and not self.secagg.enabled:
            raise ConfigError("privacy.mode", "distributed DP is private against the hub only under secure "
                              "aggregation: set [secagg] enabled = true, or use central or local")
        if not isinstance(self.fleet, str) or not valid_id(self.fleet):
            raise ConfigError("fleet", f"{self.fleet!r} must be 1-64 characters of [A-Za-z0-9_-]")
        if self.devices is not None:
            if not isinstance(self.devices, tuple) or not self.devices:
                raise ConfigError("devices", "must be a non-empty list of device ids")
            for d in self.devices:
                if not isinstance(d, str) or not valid_id(d):
                    raise ConfigError("devices", f"{d!r} must be 1-64 characters of [A-Za-z0-9_-]")
                if d in RESERVED_IDS:
                    raise ConfigError("devices", f"{d!r} is reserved (the hub's and operator's accounts, the hub's "
                                      "name in secure aggregation): never a device")
        for name in ("min_devices", "deadline_s", "local_epochs", "lr"):
            why = self.limits.excess(name, getattr(self.rounds, name))
            if why is not None:
                raise ConfigError(f"rounds.{name}", f"{why} (raise the limit or lower the default)")
        if self.rounds.min_devices > len(self.devices or ()) > 0:
            raise ConfigError("rounds.min_devices", f"{self.rounds.min_devices} exceeds the {len(self.devices or ())} "
                              "devices of the allow-list")

    @property
    def federated_gate(self) -> bool:
        """Whether the devices score each new version first: ``[aggregation] federated_gate``, where "auto" means
        on when the hub has no ``eval_data``."""
        gate = self.aggregation.federated_gate
        return self.eval_data is None if gate == "auto" else bool(gate)


_TOP: Final = frozenset({"fleet", "state_dir", "artifacts", "eval_data", "devices", "broker", "rounds", "limits",
                         "aggregation", "schedule", "privacy", "http", "store", "signing_key", "secagg", "conduct"})


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
    if state_dir is None or artifacts is None:
        raise ConfigError("state_dir" if state_dir is None else "artifacts", "is required")
    return HubConfig(
        fleet=table["fleet"],
        state_dir=state_dir,
        artifacts=artifacts,
        broker=HubBroker.from_mapping(broker),
        eval_data=_path(table, "eval_data", base_dir),
        devices=None if devices is None else tuple(devices),
        signing_key=_path(table, "signing_key", base_dir),
        rounds=_table(table, "rounds", RoundsConfig),
        limits=_table(table, "limits", LimitsConfig),
        aggregation=_table(table, "aggregation", AggregationConfig),
        schedule=_table(table, "schedule", ScheduleConfig),
        privacy=_table(table, "privacy", PrivacyConfig),
        http=_table(table, "http", HttpConfig),
        store=_table(table, "store", StoreConfig),
        secagg=_table(table, "secagg", SecAggSection),
        conduct=_table(table, "conduct", ConductConfig),
    )


def reference_sections() -> list[Section]:
    """Every key of hub.toml, documented (the source of docs/CONFIG.md and ``fedge hub init``)."""
    return [
        Section(None, keys_of(HubConfig, only=("fleet", "state_dir", "artifacts", "eval_data", "devices",
                                               "signing_key"),
                              required=("fleet", "artifacts"), defaults={"state_dir": "hub-state"})),
        Section("broker", keys_of(BrokerConfig, required=("url",))
                + keys_of(HubBroker, only=("embedded_host", "embedded_port", "retain_on")),
                "the MQTT broker (required): an external one, or \"embedded\" to run one inside the hub"),
        Section("rounds", keys_of(RoundsConfig), "round defaults (a control message may override some per round)"),
        Section("limits", keys_of(LimitsConfig),
                "upper bounds of control overrides: a round start asking for more is refused (over_limits)"),
        Section("aggregation", keys_of(AggregationConfig, types={"max_update_norm": 'number or "auto"'}),
                "aggregation and the bounds on each update outside DP rounds (PROTOCOL.md)"),
        Section("schedule", keys_of(ScheduleConfig), "rounds started without anyone asking"),
        Section("privacy", keys_of(PrivacyConfig), "client-level differential privacy (PROTOCOL.md)"),
        Section("http", keys_of(HttpConfig), "the read-only fleet dashboard and Prometheus /metrics (README)"),
        Section("store", keys_of(StoreConfig), "what the hub's SQLite store keeps"),
        Section("secagg", keys_of(SecAggSection, types={"l2_clip": 'number or "auto"'}),
                "secure aggregation: the hub sees only the sum (PROTOCOL.md)"),
        Section("conduct", keys_of(ConductConfig), "devices that keep breaking or stalling rounds are excluded"),
    ]


def starter_config(fleet: str = "demo") -> str:
    """A commented hub.toml with every key, the required ones set."""
    return starter_toml(
        "fedge hub configuration (every key: docs/CONFIG.md). Relative paths resolve against this file's folder.\n"
        "Check it with: fedge hub serve --config hub.toml --check",
        reference_sections(),
        {"fleet": fleet, "artifacts": "artifacts", "broker.url": "mqtt://127.0.0.1:1883"},
    )


def load_config(path: str | Path) -> HubConfig:
    """Read and validate ``hub.toml``; every problem is a ConfigError naming the field."""
    return config_from_mapping(read_toml(path), Path(path).resolve().parent)


__all__ = [
    "EMBEDDED",
    "STRATEGIES",
    "AggregationConfig",
    "ConductConfig",
    "HttpConfig",
    "HubBroker",
    "HubConfig",
    "LimitsConfig",
    "PrivacyConfig",
    "RoundsConfig",
    "ScheduleConfig",
    "SecAggSection",
    "StoreConfig",
    "config_from_mapping",
    "load_config",
    "reference_sections",
    "starter_config",
]
