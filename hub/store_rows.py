"""The rows the hub database hands out (frozen)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

__all__ = ["LedgerRow", "RoundRow", "SelectionRow", "StoredUpdate", "VersionRow"]


@dataclass(frozen=True)
class RoundRow:
    id: int
    status: str
    model_version: str
    backbone_sha256: str
    params: dict[str, Any]
    selected: tuple[str, ...]
    opened_at: float
    deadline: float
    closed_at: float | None
    new_version: str | None
    accuracy: float | None
    loss: float | None
    devices: tuple[str, ...]
    n_samples: int | None
    rejected: int | None


@dataclass(frozen=True)
class VersionRow:
    version: str
    idx: int
    sha256: str
    parent: str | None
    round: int | None
    backbone_sha256: str
    accuracy: float | None
    loss: float | None
    created_at: float


@dataclass(frozen=True)
class LedgerRow:
    """One DP round in the privacy ledger: its parameters, the cohort, and the fleet's epsilon after it."""

    round: int
    mode: str
    noise_multiplier: float
    clip: float
    sample_rate: float
    amplified: bool  # counted as Poisson-subsampled (central mode with [privacy] amplification = true)
    cohort: int
    expected_cohort: float
    epsilon: float
    delta: float
    ts: float


@dataclass(frozen=True)
class SelectionRow:
    """A source-model selection round: its candidates (name -> backbone sha256) and, once closed, the ranking
    (best first: name, accuracy, loss, val_n) and the version that deployed the winner."""

    round: int
    status: str
    model_version: str
    candidates: dict[str, str]
    selected: tuple[str, ...]
    params: dict[str, Any]
    opened_at: float
    deadline: float
    closed_at: float | None
    ranking: list[dict[str, Any]]
    winner: str | None
    new_version: str | None
    detail: str | None


@dataclass(frozen=True)
class StoredUpdate:
    device: str
    nonce: str
    n_samples: int
    payload: bytes
