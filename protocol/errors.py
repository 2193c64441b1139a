"""The one exception tree of fedge.

::

    FedgeError
    ├── ConfigError      a config file or field is wrong (the message names the field)
    ├── DecodeError      a wire message is malformed (``.reason`` says why, for the Reject)
    ├── DataError        a local data file is missing or malformed (names the file)
    ├── ArtifactError    a model artifact is missing, or its hash does not match
    ├── TransportError   the broker cannot be reached or refused us
    └── TrainerCrash     a training back-end died (a native crash), hung, or computes wrong results

Foreign errors are translated at the boundary with ``raise ... from exc``.
"""

from __future__ import annotations


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


class TrainerCrash(FedgeError):
    """A training back-end is unusable: its worker process died (a segfault in a native runtime), did not answer
    in time, or its results disagree with the NumPy reference. ``backend`` names it; ``reason`` says what happened
    in a few words (no local data in it: it is sent to the hub in a decline and in the device's presence)."""

    def __init__(self, backend: str, reason: str) -> None:
        super().__init__(f"{backend} back-end unusable: {reason}")
        self.backend = backend
        self.reason = reason


__all__ = ["ArtifactError", "ConfigError", "DataError", "DecodeError", "FedgeError", "TrainerCrash", "TransportError"]
