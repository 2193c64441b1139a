"""Wire message types: frozen, versioned, defined once (PROTOCOL.md is their spec).

Never remove a field or change its meaning within a major protocol version;
new fields are optional and receivers ignore fields they do not know.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from enum import StrEnum
from typing import ClassVar

import numpy as np
from numpy.typing import NDArray

PROTOCOL_VERSION = 1
"""Major protocol version carried in every frame; a receiver rejects a higher one."""

Arrays = dict[str, NDArray[np.generic]]

EXT = {"extension": True}
"""Field metadata of fields added within version 1: the encoder leaves them out while they hold their default,
so frames of messages that do not use them are byte-identical to those of the first version-1 release."""


def new_nonce() -> str:
    """16 random bytes as 32 hex characters: makes every message idempotent."""
    return os.urandom(16).hex()


class MessageType(StrEnum):
    PRESENCE = "presence"
    HUB_STATUS = "hub_status"
    ANNOUNCE = "announce"
    MODEL_HEAD = "model_head"
    MODEL_FULL = "model_full"
    UPDATE = "update"
    ACK = "ack"
    REJECT = "reject"
    RESULT = "result"
    DECLINE = "decline"
    SECAGG = "secagg"


class RejectReason(StrEnum):
    """Why the hub refused an update (sent back in a Reject and counted)."""

    MALFORMED = "malformed"
    TOO_LARGE = "too_large"
    BAD_VERSION = "bad_version"
    WRONG_TYPE = "wrong_type"
    DEVICE_MISMATCH = "device_mismatch"
    UNKNOWN_DEVICE = "unknown_device"
    NO_OPEN_ROUND = "no_open_round"
    STALE_ROUND = "stale_round"
    NOT_SELECTED = "not_selected"
    WRONG_MODEL = "wrong_model"
    DUPLICATE = "duplicate"
    WRONG_SHAPE = "wrong_shape"
    WRONG_DTYPE = "wrong_dtype"
    NOT_FINITE = "not_finite"
    BAD_SAMPLES = "bad_samples"
    IMPERSONATION = "impersonation"  # hub-side only: a frame on the hub's own topics it did not publish (never sent)


class RoundStatus(StrEnum):
    COMPLETED = "completed"
    FAILED_QUORUM = "failed_quorum"
    REFUSED_BUDGET = "refused_budget"  # the round would have spent more privacy budget than configured
    CANCELLED = "cancelled"            # an operator cancelled the open round (control/round/cancel)
    REFUSED_INPUT = "refused_input"    # a SecAgg sum that bounded honest inputs cannot make: nothing deployed


class DeclineReason(StrEnum):
    """Why a selected device does not take part in a round (sent in a Decline, so the hub stops waiting)."""

    BUDGET_EXHAUSTED = "budget_exhausted"      # the round would push the device's own epsilon past its budget
    NOISE_BELOW_FLOOR = "noise_below_floor"    # announced noise multiplier below the device's floor
    CLIP_ABOVE_CEILING = "clip_above_ceiling"  # announced clip norm above the device's ceiling
    DP_REQUIRED = "dp_required"                # the device takes part only in DP rounds
    MODE_NOT_ALLOWED = "mode_not_allowed"      # a DP mode the device does not accept
    DATA_ERROR = "data_error"                  # the local data cannot be used (e.g. a label >= the class count)
    TRAINER_ERROR = "trainer_error"            # training failed on this device
    OVER_LIMITS = "over_limits"                # the round asks for more work than the device's own limits allow
    NOT_ELIGIBLE = "not_eligible"              # a training condition does not hold now (power, battery, link, load)


@dataclass(frozen=True)
class Presence:
    """A device says it is online (retained), or its last will says it is offline."""

    type: ClassVar[MessageType] = MessageType.PRESENCE
    fleet: str
    device: str
    online: bool
    n_samples: int | None = None
    backends: tuple[str, ...] = ()
    model_version: str | None = None
    agent_version: str = ""
    nonce: str = field(default_factory=new_nonce)
    ts: float = field(default_factory=time.time)
    dp: bool = field(default=False, metadata=EXT)  # this agent applies announced DP (clip, noise, no data metrics)
    secagg: bool = field(default=False, metadata=EXT)  # this agent can take part in secure-aggregation rounds
    # installed back-ends this device found unusable (probe or a crash in a round) -> why, e.g. "crashed with SIGSEGV"
    backend_faults: dict[str, str] = field(default_factory=dict, metadata=EXT)


@dataclass(frozen=True)
class HubStatus:
    """The hub's retained status (its last will says offline)."""

    type: ClassVar[MessageType] = MessageType.HUB_STATUS
    fleet: str
    online: bool
    round: int | None = None
    model_version: str | None = None
    nonce: str = field(default_factory=new_nonce)
    ts: float = field(default_factory=time.time)


@dataclass(frozen=True)
class RoundAnnounce:
    """A round is open: which model to start from, the hyper-parameters, who takes part."""

    type: ClassVar[MessageType] = MessageType.ANNOUNCE
    fleet: str
    round: int
    model_version: str
    backbone_sha256: str
    deadline: float
    min_devices: int
    selected: tuple[str, ...]
    local_epochs: int
    lr: float
    nonce: str = field(default_factory=new_nonce)
    ts: float = field(default_factory=time.time)
    # differential privacy (absent from the frame when the round is not private; see PROTOCOL.md)
    dp_mode: str | None = field(default=None, metadata=EXT)              # "central" | "local" | "distributed"
    dp_noise_multiplier: float | None = field(default=None, metadata=EXT)  # z
    dp_clip: float | None = field(default=None, metadata=EXT)            # C: devices clip updates to this L2 norm
    dp_sample_rate: float | None = field(default=None, metadata=EXT)     # q: Poisson selection probability
    dp_min_cohort: int | None = field(default=None, metadata=EXT)        # m: distributed noise is split over m
    # the pull lambda*||w - w0||^2 toward the backbone's source head, applied in local training too
    proximal_lambda: float | None = field(default=None, metadata=EXT)
    # a selection round (announced on round/select only): candidate source models and their backbones, in pairs
    candidates: tuple[str, ...] = field(default=(), metadata=EXT)
    candidate_backbones: tuple[str, ...] = field(default=(), metadata=EXT)
    # a secure-aggregation round (PROTOCOL.md, "Secure aggregation"): the public graph seed (64 hex characters),
    # the neighbour count k, the Shamir threshold t, the ring 2^bits, the coordinate clip and quantisation scale
    secagg_seed: str | None = field(default=None, metadata=EXT)
    secagg_degree: int | None = field(default=None, metadata=EXT)
    secagg_threshold: int | None = field(default=None, metadata=EXT)
    secagg_ring_bits: int | None = field(default=None, metadata=EXT)
    secagg_clip: float | None = field(default=None, metadata=EXT)
    secagg_scale: float | None = field(default=None, metadata=EXT)
    secagg_stochastic: bool = field(default=False, metadata=EXT)  # unbiased stochastic rounding, not nearest
    # compressed updates (PROTOCOL.md, "Compressed updates"): "int8" or "int4"; absent = float32 deltas
    compression: str | None = field(default=None, metadata=EXT)
    # a buffered (asynchronous) round (PROTOCOL.md, "Buffered rounds"): a version every ``buffer_k`` updates, an
    # update counted while its model is at most ``max_staleness`` versions old; absent = a synchronous round
    buffer_k: int | None = field(default=None, metadata=EXT)
    max_staleness: int | None = field(default=None, metadata=EXT)
    # a buffered round's attempt (>= 0): how many full buffers of the round deployed no version so far (it never goes
    # down within the round); each time it grows, the devices whose updates were in that buffer may each send one
    # new update on the version it was trained on (PROTOCOL.md, "Buffered rounds"); absent = 0
    buffer_attempt: int = field(default=0, metadata=EXT)
    secagg_l2_clip: float | None = field(default=None, metadata=EXT)  # each update clipped to this L2 norm first
    secagg_norm_bit: bool = field(default=False, metadata=EXT)  # one more coordinate: clip if under the L2 clip


@dataclass(frozen=True, eq=False)
class ModelHead:
    """A global model version: the head weights over a given backbone (a few KB)."""

    type: ClassVar[MessageType] = MessageType.MODEL_HEAD
    fleet: str
    version: str
    parent: str | None
    backbone_sha256: str
    round: int | None
    head: Arrays
    nonce: str = field(default_factory=new_nonce)
    ts: float = field(default_factory=time.time)


@dataclass(frozen=True, eq=False)
class ModelFull:
    """The full artifacts of a backbone version: manifest.json text plus every file as uint8."""

    type: ClassVar[MessageType] = MessageType.MODEL_FULL
    fleet: str
    backbone_sha256: str
    manifest: str
    files: Arrays
    nonce: str = field(default_factory=new_nonce)
    ts: float = field(default_factory=time.time)


@dataclass(frozen=True, eq=False)
class ModelUpdate:
    """A device's contribution to a round: head delta (trained - global) and its sample count."""

    type: ClassVar[MessageType] = MessageType.UPDATE
    fleet: str
    round: int
    device: str
    model_version: str
    n_samples: int
    delta: Arrays
    metrics: dict[str, float] = field(default_factory=dict)
    nonce: str = field(default_factory=new_nonce)
    ts: float = field(default_factory=time.time)


@dataclass(frozen=True)
class Ack:
    """The hub accepted (and durably stored) the update with nonce ``ref_nonce``."""

    type: ClassVar[MessageType] = MessageType.ACK
    fleet: str
    round: int
    device: str
    ref_nonce: str
    nonce: str = field(default_factory=new_nonce)
    ts: float = field(default_factory=time.time)


@dataclass(frozen=True)
class Reject:
    """The hub refused a message from ``device``; ``reason`` is a RejectReason."""

    type: ClassVar[MessageType] = MessageType.REJECT
    fleet: str
    round: int | None
    device: str
    reason: RejectReason
    detail: str
    ref_nonce: str | None = None
    nonce: str = field(default_factory=new_nonce)
    ts: float = field(default_factory=time.time)


@dataclass(frozen=True)
class RoundResult:
    """What a closed round produced (retained)."""

    type: ClassVar[MessageType] = MessageType.RESULT
    fleet: str
    round: int
    status: RoundStatus
    model_version: str | None
    accuracy: float | None
    loss: float | None
    devices: tuple[str, ...]
    n_samples: int
    rejected: int
    seconds: float
    nonce: str = field(default_factory=new_nonce)
    ts: float = field(default_factory=time.time)
    detail: str | None = field(default=None, metadata=EXT)        # why a round was refused or failed, for people
    declined: tuple[str, ...] = field(default=(), metadata=EXT)   # selected devices that declined the round
    epsilon: float | None = field(default=None, metadata=EXT)     # fleet privacy budget spent after this round
    # federated evaluation: sample-weighted means of the devices' validation scores (val_acc_global, ...)
    federated: dict[str, float] = field(default_factory=dict, metadata=EXT)
    # a selection round: the candidate source models, best first (their scores are in ``federated``)
    ranking: tuple[str, ...] = field(default=(), metadata=EXT)
    # a round that registered ``model_version``: whether it is deployed now (False: kept as a candidate)
    deployed: bool | None = field(default=None, metadata=EXT)
    # the evaluation round whose devices decide ``model_version`` (the federated deploy gate), when there is one
    gate_round: int | None = field(default=None, metadata=EXT)


@dataclass(frozen=True)
class Decline:
    """A selected device will not take part in ``round`` (the hub stops waiting for it)."""

    type: ClassVar[MessageType] = MessageType.DECLINE
    fleet: str
    round: int
    device: str
    reason: DeclineReason
    detail: str = ""
    nonce: str = field(default_factory=new_nonce)
    ts: float = field(default_factory=time.time)


@dataclass(frozen=True)
class SecAggStage:
    """One SecAgg+ stage message (PROTOCOL.md, "Secure aggregation"): ``stage["fsa"]`` is its byte encoding
    (uint8) as ``fedge.protocol.secagg_wire`` writes it. On ``secagg/<device>`` ``device`` is the sender; on
    ``device/<device>/secagg`` (from the hub, signed like every hub frame) it is the receiver."""

    type: ClassVar[MessageType] = MessageType.SECAGG
    fleet: str
    round: int
    device: str
    stage: Arrays
    nonce: str = field(default_factory=new_nonce)
    ts: float = field(default_factory=time.time)


Message = (Presence | HubStatus | RoundAnnounce | ModelHead | ModelFull | ModelUpdate | Ack | Reject | RoundResult
           | Decline | SecAggStage)


@dataclass(frozen=True)
class RoundOverrides:
    """The JSON body of ``control/round/start``: every field optional (hub defaults apply)."""

    min_devices: int | None = None
    deadline_s: float | None = None
    fraction: float | None = None
    local_epochs: int | None = None
    lr: float | None = None
    request_id: str | None = None  # echoed in the hub's reply on control/round/reply (not a round parameter)


__all__ = [
    "PROTOCOL_VERSION",
    "Ack",
    "Arrays",
    "Decline",
    "DeclineReason",
    "HubStatus",
    "Message",
    "MessageType",
    "ModelFull",
    "ModelHead",
    "ModelUpdate",
    "Presence",
    "Reject",
    "RejectReason",
    "RoundAnnounce",
    "RoundOverrides",
    "RoundResult",
    "RoundStatus",
    "SecAggStage",
    "new_nonce",
]
