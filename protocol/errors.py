"""The one exception tree of fedge.

::

    FedgeError
    ├── ConfigError      a config file or field is wrong (the message names the field)
    ├── DecodeError      a wire message is malformed (``.reason`` says why, for the Reject)
    ├── DataError        a local data file is missing or malformed (names the file)
    ├── ArtifactError    a model artifact is missing, or its hash does not match
    ├── TransportError   the broker cannot be reached or refused us
    ├── SignatureError   a signed frame or key rotation fails verification (``.reason``)
    ├── SecAggError      a SecAgg stage message was refused, or a party aborted (``.reason``: SecAggFailure)
    ├── PrivacyError     DP parameters are invalid or unreachable (also a ValueError)
    ├── TrainingDiverged a device's training produced a non-finite update
    ├── TrainerCrash     a training back-end died (a native crash), hung, or computes wrong results
    └── HubStateError    the hub's own state broke an invariant (never caused by a message's content)

Foreign errors are translated at the boundary with ``raise ... from exc``.
"""

from __future__ import annotations

from enum import StrEnum


class FedgeError(Exception):
    """Base of every error fedge raises on purpose."""


class ConfigError(FedgeError):
    """A configuration value is missing or invalid; the message names the field."""

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"config field {field!r}: {problem}")
        self.field = field
        self.problem = problem


class DecodeError(FedgeError):
    """A message could not be decoded; ``reason`` is a short machine-readable code."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


class DataError(FedgeError):
    """A data file is missing or malformed; the message names the file."""


class ArtifactError(FedgeError):
    """A model artifact is missing or does not match its manifest."""


class TransportError(FedgeError):
    """The message transport failed (broker unreachable, refused, ...)."""


class SignatureError(FedgeError):
    """A frame or key rotation that fails verification; ``reason`` is a short code (``unsigned``,
    ``unknown_key``, ``bad_signature``, ``malformed``)."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


class SecAggFailure(StrEnum):
    """Why a SecAgg stage message was rejected or why a party aborted the round."""

    MALFORMED = "malformed"                    # the payload does not decode, or a field has the wrong size
    WRONG_ROUND = "wrong_round"                # the message belongs to another round (a replay)
    UNKNOWN_SENDER = "unknown_sender"          # the sender is not in the cohort, or not in this stage
    DUPLICATE = "duplicate"                    # a second message of the same stage from the same sender
    OUT_OF_ORDER = "out_of_order"              # the stage is closed, or not open yet
    BAD_CIPHERTEXT = "bad_ciphertext"          # an encrypted share failed authentication (tampered or replayed)
    PROTOCOL_VIOLATION = "protocol_violation"  # the other side broke the protocol (e.g. asked for both shares)
    BELOW_THRESHOLD = "below_threshold"        # too few survivors to go on or to reconstruct
    BAD_SHARE = "bad_share"                    # a reconstructed secret does not match its commitment
    ABORTED = "aborted"                        # this device aborted the round earlier


class SecAggError(FedgeError):
    """A SecAgg message was rejected, or a party aborted the round; ``reason`` is a `SecAggFailure`."""

    def __init__(self, reason: SecAggFailure, detail: str) -> None:
        super().__init__(f"secagg {reason.value}: {detail}")
        self.reason = reason
        self.detail = detail


class PrivacyError(FedgeError, ValueError):
    """DP parameters are invalid (out of range) or a privacy target cannot be reached."""


class TrainingDiverged(FedgeError):
    """Local training produced a non-finite head or update (the device declines the round)."""


class TrainerCrash(FedgeError):
    """A training back-end is unusable: its worker process died (a segfault in a native runtime), did not answer
    in time, or its results disagree with the NumPy reference. ``backend`` names it; ``reason`` says what happened
    in a few words (no local data in it: it is sent to the hub in a decline and in the device's presence)."""

    def __init__(self, backend: str, reason: str) -> None:
        super().__init__(f"{backend} back-end unusable: {reason}")
        self.backend = backend
        self.reason = reason


class HubStateError(FedgeError):
    """The hub's own state broke an invariant (an empty registry, a corrupt stored update); never caused by a
    message's content."""


__all__ = [
    "ArtifactError", "ConfigError", "DataError", "DecodeError", "FedgeError", "HubStateError", "PrivacyError",
    "SecAggError", "SecAggFailure", "SignatureError", "TrainerCrash", "TrainingDiverged", "TransportError",
]
