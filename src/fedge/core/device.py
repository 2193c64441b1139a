"""The device's round, without I/O: announce + trainer + data + policy -> an update, a decline, or nothing.

The agent and the simulator both run these steps; the agent adds the wire (announces in, updates out), the files
(heads, outbox, ledger, caches) and the clock (``stop``):

1. :func:`admit`: the checks before any training (epochs within the device's limit, eligibility, the round's DP
   against the device's privacy policy and ledger) -> the round's DP parameters, or a :class:`Declined`.
2. :func:`train`: fine-tune the global head on the training split (the validation split never trains; the seed's
   ``λ‖w − w0‖²`` acts here too), keep a personal head, score the heads the device can compare (outside DP)
   -> :class:`Trained`, or :class:`Declined` / :class:`Closed` when time ran out or the round closed.
3. :meth:`Trained.update`: the delta that leaves the device (clipped and noised under DP; its metrics dropped).

Every random draw comes from Generators derived from the device's ``seed`` and the round (:func:`train_rng`,
:func:`ditto_rng`, :func:`local_only_rng`), except the DP noise, whose Generator the caller passes (the agent's is
seeded by the operating system).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from typing import Protocol

import numpy as np

from fedge.core.compress import MODES as COMPRESSIONS
from fedge.core.evaluation import HEADS, head_scores, split_indices
from fedge.core.personal import Choice, choose, local_baseline
from fedge.core.privacy import DpParams, privatize
from fedge.core.trainer import Trainer
from fedge.core.training import FitResult, Prox, evaluate, fit
from fedge.protocol.errors import TrainingDiverged
from fedge.protocol.messages import DeclineReason, RoundAnnounce
from fedge.protocol.types import F32, I64, Head, HeadLike, Metrics

__all__ = [
    "HEADS",
    "SEND_MARGIN_S",
    "Closed",
    "Declined",
    "DeviceData",
    "DevicePolicy",
    "Personalization",
    "PrivacyPolicy",
    "RoundHeads",
    "Trained",
    "admit",
    "announced_dp",
    "ditto_rng",
    "dp_decline",
    "local_only_head",
    "local_only_rng",
    "train",
    "train_rng",
]

SEND_MARGIN_S = 1.0
"""Training stops this long before the round's deadline, so that the update still arrives in time."""


class Personalization(StrEnum):
    AUTO = "auto"          # the best of global, fine-tuned and local-only, by cross-validation (core/personal.py)
    FINETUNE = "finetune"  # the personal head is the head trained from the global one this round
    DITTO = "ditto"        # a separate personal head, pulled toward the global head by ditto_mu


@dataclass(frozen=True)
class DevicePolicy:
    """What a device decides for itself (agent.toml): its seed, its epoch limit, its validation split, its
    personalisation and the budget of its local-only reference head."""

    seed: int = 0
    max_epochs: int = 50
    validation_fraction: float = 0.2
    local_only_epochs: int = 20
    personalization: Personalization = Personalization.AUTO
    ditto_mu: float = 0.1


class PrivacyPolicy(Protocol):
    """A device's own DP policy (``[privacy]`` of agent.toml)."""

    @property
    def epsilon_budget(self) -> float: ...
    @property
    def delta(self) -> float: ...
    @property
    def min_noise_multiplier(self) -> float: ...
    @property
    def max_clip(self) -> float: ...
    @property
    def modes(self) -> tuple[str, ...]: ...


@dataclass(frozen=True)
class Declined:
    """The device does not take part: the reason goes to the hub (the detail only to the device's log, or to the
    hub where it describes no local data)."""

    reason: DeclineReason
    detail: str


@dataclass(frozen=True)
class Closed:
    """The round closed while the device trained: nothing is sent."""


@dataclass(frozen=True)
class DeviceData:
    """The device's data as the round core sees it: backbone features of every row, labels, and the data's
    sha256 (the seed of its fixed validation split)."""

    feats: F32
    y: I64
    key: str

    def split(self, fraction: float) -> tuple[I64, I64]:
        return split_indices(len(self.y), fraction, self.key)


@dataclass(frozen=True)
class RoundHeads:
    """The heads a round starts from: the global head announced, the backbone's source head w0, the device's
    previous personal head (ditto) and its cached local-only baseline (None: computed when needed)."""

    global_head: HeadLike
    w0: HeadLike
    personal: HeadLike | None = None
    local_only: Choice | None = None


def train_rng(seed: int, round_id: int, version: str | None = None, attempt: int = 0) -> np.random.Generator:
    """The shuffling of a device's training in round ``round_id``; in a buffered round also of the model
    ``version`` it trains and the round's ``attempt`` (a retry on the same version after the gate held the last
    one back must not be the same update again)."""
    if version is None:
        return np.random.default_rng([seed, round_id])
    v = int.from_bytes(hashlib.sha256(version.encode()).digest()[:8], "big")
    return np.random.default_rng([seed, round_id, v, attempt])


def ditto_rng(seed: int, round_id: int) -> np.random.Generator:
    """The shuffling of a device's ditto personal head in round ``round_id``."""
    return np.random.default_rng([seed, round_id, 7])


def local_only_rng(seed: int) -> np.random.Generator:
    """The shuffling of a device's local-only head (fitted once per backbone and data)."""
    return np.random.default_rng([seed, 1_000_003])


def announced_dp(msg: RoundAnnounce) -> DpParams | None:
    """The DP parameters a round announces; None for a non-private round. ValueError when they are incomplete or
    out of range (the device then declines)."""
    if msg.dp_mode is None:
        return None
    if msg.dp_noise_multiplier is None or msg.dp_clip is None:
        raise ValueError(f"DP mode {msg.dp_mode!r} announced without noise multiplier and clip")
    return DpParams(msg.dp_mode, msg.dp_noise_multiplier, msg.dp_clip, msg.dp_sample_rate or 1.0,
                    msg.dp_min_cohort or 1)


def dp_decline(policy: PrivacyPolicy | None, dp: DpParams | None, epsilon_of: Callable[[DpParams | None], float],
               *, secure: bool = False) -> Declined | None:
    """Why a device with ``policy`` must not take part in a round announcing ``dp`` (None: it may).
    ``epsilon_of(extra)``: the device's own epsilon at its delta over its ledger, plus ``extra``; ``secure``: the
    round is a secure-aggregation round."""
    if dp is not None and dp.mode == "distributed" and not secure:  # every device, policy or not: PROTOCOL.md
        return Declined(DeclineReason.MODE_NOT_ALLOWED, "distributed DP outside a secure-aggregation round: the hub "
                        "would see this device's update with only 1/sqrt(m) of the noise")
    if policy is None:
        return None
    if dp is None:
        return Declined(DeclineReason.DP_REQUIRED, "this device takes part in differentially private rounds only")
    if dp.mode not in policy.modes:
        return Declined(DeclineReason.MODE_NOT_ALLOWED, f"mode {dp.mode!r} is not one of {', '.join(policy.modes)}")
    if dp.noise_multiplier < policy.min_noise_multiplier:
        return Declined(DeclineReason.NOISE_BELOW_FLOOR, f"noise multiplier {dp.noise_multiplier:g} < this "
                        f"device's floor {policy.min_noise_multiplier:g}")
    if policy.max_clip > 0 and dp.clip > policy.max_clip:
        return Declined(DeclineReason.CLIP_ABOVE_CEILING, f"clip {dp.clip:g} > this device's ceiling "
                        f"{policy.max_clip:g}")
    spent, after = epsilon_of(None), epsilon_of(dp)
    if after > policy.epsilon_budget:
        return Declined(DeclineReason.BUDGET_EXHAUSTED, f"epsilon would reach {after:.3f} > budget "
                        f"{policy.epsilon_budget:g} ({spent:.3f} spent, delta {policy.delta:g})")
    return None


def admit(msg: RoundAnnounce, policy: DevicePolicy, *, ineligible: str | None, privacy: PrivacyPolicy | None,
          epsilon_of: Callable[[DpParams | None], float], secure: bool) -> DpParams | Declined | None:
    """The round's DP parameters (None: not private) if this device takes part, else why not. ``ineligible``: the
    unmet training condition (power, battery, link, load; None: eligible)."""
    if msg.compression is not None and (secure or msg.compression not in COMPRESSIONS):
        return Declined(DeclineReason.MODE_NOT_ALLOWED, f"compression {msg.compression!r} cannot be applied here"
                        + (" (a secure-aggregation round)" if secure else f" (known: {', '.join(COMPRESSIONS)})"))
    if msg.local_epochs > policy.max_epochs:
        return Declined(DeclineReason.OVER_LIMITS, f"{msg.local_epochs} local epochs announced; this device trains "
                        f"at most {policy.max_epochs}")
    if ineligible is not None:
        return Declined(DeclineReason.NOT_ELIGIBLE, ineligible)
    try:
        dp = announced_dp(msg)
    except ValueError as exc:
        return Declined(DeclineReason.MODE_NOT_ALLOWED, f"invalid DP parameters: {exc}")
    refused = dp_decline(privacy, dp, epsilon_of, secure=secure)
    return refused if refused is not None else dp


def _copy_head(trainer: Trainer) -> Head:
    return {k: np.asarray(v, dtype=np.float32) for k, v in trainer.get_head().items()}


def local_only_head(trainer: Trainer, w0: HeadLike, feats: F32, y: I64, epochs: int, lr: float, seed: int) -> Choice:
    """The head this device would have on its own: w0 trained on its training split, early-stopped by
    cross-validation within at most ``epochs`` (the same budget and stopping as the personalised path)."""
    return local_baseline(trainer, w0, feats, y, epochs, lr, seed)


@dataclass(frozen=True)
class Trained:
    """A device's finished training in one round: the head it trained and its delta from the global head, its
    personal head (kept on the device) and which candidate it is, the sample count and metrics it reports, the fit,
    and the local-only baseline when this round computed it (for the caller's cache)."""

    round: int
    delta: Head
    trained: Head
    personal: Head
    n_samples: int
    metrics: Metrics
    fit: FitResult
    local_only: Choice | None = None
    personal_kind: str = "finetune"

    def update(self, dp: DpParams | None, rng: np.random.Generator) -> tuple[Head, int, Metrics, float]:
        """What leaves the device: ``(delta, n_samples, metrics, norm before clipping)``. Under DP the delta is
        clipped and noised (the device's share), the sample count is 1 and no metric is sent."""
        from fedge.core.privacy import l2_norm

        if dp is None:
            return self.delta, self.n_samples, self.metrics, l2_norm(self.delta)
        private, norm = privatize(self.delta, dp, rng)
        return dict(private), 1, {}, norm


def _ditto(trainer: Trainer, heads: RoundHeads, feats: F32, y: I64, msg: RoundAnnounce, policy: DevicePolicy,
           stop: Callable[[], bool] | None) -> Head:
    """The previous personal head (or the global one) trained further with a pull ``mu * ||v - w_global||^2``
    toward the new global head."""
    start = heads.global_head
    prev = heads.personal
    if prev is not None and {k: v.shape for k, v in prev.items()} == {k: v.shape for k, v in start.items()}:
        start = prev
    trainer.set_head(start)
    fit(trainer, feats, y, msg.local_epochs, msg.lr, ditto_rng(policy.seed, msg.round),
        prox=Prox(heads.global_head, policy.ditto_mu), stop=stop)
    return _copy_head(trainer)


MAX_BACKOFFS = 6
"""A device halves a learning rate that makes its training diverge at most this many times, then declines."""


def _diverged(loss_before: float, loss_after: float, delta: HeadLike) -> bool:
    """Training on the device's own rows made its loss on them worse (by more than a proximal pull or a partial
    last batch explains), or produced a non-finite update: the learning rate is too large for this data."""
    if not all(np.isfinite(v).all() for v in delta.values()) or not math.isfinite(loss_after):
        return True
    return math.isfinite(loss_before) and loss_after > 1.1 * loss_before + 0.01


def train(msg: RoundAnnounce, trainer: Trainer, data: DeviceData, heads: RoundHeads, policy: DevicePolicy, *,
          private: bool, stop: Callable[[], bool] | None = None, closed: Callable[[], bool] | None = None,
          clock: Callable[[], float] | None = None) -> Trained | Declined | Closed:
    """Fine-tune the announced global head on the training split. ``stop`` is asked before every batch (the
    deadline, the device's own time limit, or the round closed; ``closed`` says which). ``private``: a DP round
    (no federated evaluation: the scores would describe the local data); ``clock`` times the fit (metrics).
    TrainingDiverged when training diverged."""
    y_all = data.y
    train_idx, val_idx = data.split(policy.validation_fraction)
    feats, y = data.feats[train_idx], y_all[train_idx]  # the validation rows never train
    trainer.set_head(heads.global_head)
    before = evaluate(trainer, feats, y)
    pull = Prox(heads.w0, msg.proximal_lambda) if msg.proximal_lambda else None
    lr, backoffs = msg.lr, 0
    while True:
        rng = train_rng(policy.seed, msg.round) if msg.buffer_k is None else \
            train_rng(policy.seed, msg.round, msg.model_version, msg.buffer_attempt)
        result = fit(trainer, feats, y, msg.local_epochs, lr, rng, prox=pull, stop=stop, clock=clock)
        is_closed = closed is not None and closed()
        if result.stopped and (is_closed or result.steps == 0):
            if is_closed:
                return Closed()
            return Declined(DeclineReason.OVER_LIMITS, "no time left to train before the deadline or the device's "
                            "limit")
        after = evaluate(trainer, feats, y)
        trained = _copy_head(trainer)
        delta = {k: (trained[k] - np.asarray(heads.global_head[k], dtype=np.float32)).astype(np.float32)
                 for k in heads.global_head}
        if not _diverged(before.loss, after.loss, delta):
            break
        if backoffs == MAX_BACKOFFS:  # published garbage would cost the fleet more than one missing update
            raise TrainingDiverged(f"round {msg.round}: training diverged at learning rates down to {lr:g} (loss "
                                   f"{before.loss:.4g} -> {after.loss:.4g})")
        backoffs, lr = backoffs + 1, lr / 2  # the announced rate is too large for this device's data: back off
        trainer.set_head(heads.global_head)
    metrics: Metrics = {
        "loss_before": float(before.loss), "loss_after": float(after.loss),
        "acc_before": float(before.accuracy), "acc_after": float(after.accuracy),
        "train_seconds": float(result.seconds), "n_steps": float(result.steps),
        f"backend_{trainer.name}": 1.0,  # metrics are numbers on the wire: the backend is a one-hot key
    }
    if result.stopped:  # the deadline or the device's time limit came first: the update covers fewer steps
        metrics["stopped_early"] = 1.0
    if backoffs:  # the learning rate was halved this many times before training stopped diverging
        metrics["lr_backoffs"] = float(backoffs)
    evaluating = not private and len(val_idx) > 0  # federated evaluation (never under DP: it describes local data)
    local, computed = heads.local_only, None
    if local is None and (evaluating or policy.personalization == Personalization.AUTO):
        local = computed = local_only_head(trainer, heads.w0, feats, y, policy.local_only_epochs, lr, policy.seed)
    kind = str(policy.personalization)
    if policy.personalization == Personalization.DITTO:
        personal = _ditto(trainer, heads, feats, y, msg, policy, stop)
    elif policy.personalization == Personalization.AUTO and local is not None:
        choice = choose(trainer, heads.global_head, local, feats, y, policy.local_only_epochs, lr, policy.seed,
                        msg.round)  # at the rate training settled on (backed off, if it had to)
        personal, kind = choice.head, choice.name
        metrics[f"personal_{choice.name}"] = 1.0  # which candidate this device keeps (a one-hot: numbers only)
    else:
        personal, kind = trained, Personalization.FINETUNE
    if evaluating and local is not None:
        scored = {"source": heads.w0, "global": heads.global_head, "trained": trained, "personal": personal,
                  "local_only": local.head}
        metrics.update(head_scores(trainer, scored, data.feats[val_idx], y_all[val_idx]))
    return Trained(msg.round, delta, trained, personal, len(y), metrics, result, computed, str(kind))
