"""The device's own privacy ledger and the decision to take part in a DP round.

The device does not trust the hub's accounting: it records every DP round it published an update for (mode,
noise multiplier, clip, the noise it added) in ``state_dir/privacy.json`` and computes its own epsilon with
the same accountant as the hub, *without* sampling amplification (a device cannot check how it was chosen).
An entry is written before the update is published, so a crash can over-count, never under-count.

What the device can enforce depends on the mode: in ``local`` mode it adds the noise itself, so its epsilon
holds whatever the hub does. In ``central`` mode the noise is the hub's: the device's ledger then counts the
z the hub announced, and the guarantee rests on the hub keeping its word. ``distributed`` is declined until
secure aggregation exists.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path

from fedge.core.privacy import DpParams, epsilon, event_for
from fedge.edge_agent.config import DevicePrivacy
from fedge.protocol.fsio import write_atomic
from fedge.protocol.messages import DeclineReason, RoundAnnounce

log = logging.getLogger("fedge.agent")


@dataclass(frozen=True)
class LedgerEntry:
    round: int
    mode: str
    noise_multiplier: float
    clip: float
    noise_std: float  # the standard deviation the device itself added (0 in central mode)


def announced_dp(msg: RoundAnnounce) -> DpParams | None:
    """The DP parameters a round announces; None for a non-private round. Raises ValueError when they are
    incomplete or out of range (the device then declines)."""
    if msg.dp_mode is None:
        return None
    if msg.dp_noise_multiplier is None or msg.dp_clip is None:
        raise ValueError(f"DP mode {msg.dp_mode!r} announced without noise multiplier and clip")
    return DpParams(msg.dp_mode, msg.dp_noise_multiplier, msg.dp_clip, msg.dp_sample_rate or 1.0,
                    msg.dp_min_cohort or 1)


class DeviceLedger:
    """``privacy.json``: the DP rounds this device took part in. Loading a damaged file fails loudly
    (a device that lost its ledger must not start spending its budget again from zero)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.entries: list[LedgerEntry] = []
        if path.exists():
            try:
                raw = json.loads(path.read_text(encoding="utf-8"))
                self.entries = [LedgerEntry(**e) for e in raw["entries"]]
            except (OSError, ValueError, KeyError, TypeError) as exc:
                raise ValueError(f"privacy ledger {path} is unreadable ({exc}); refusing to reset the budget") from exc

    def epsilon(self, delta: float, extra: DpParams | None = None) -> float:
        """This device's epsilon at ``delta`` over its recorded rounds (plus ``extra``), without amplification."""
        events = [event_for(DpParams(e.mode, e.noise_multiplier, e.clip), trust_sampling=False) for e in self.entries]
        if extra is not None:
            events.append(event_for(extra, trust_sampling=False))
        return epsilon(events, delta)

    def record(self, round_id: int, params: DpParams) -> None:
        """Append a round (before its update is published) and write the file atomically."""
        self.entries.append(LedgerEntry(round_id, params.mode, params.noise_multiplier, params.clip,
                                        params.device_noise_std()))
        body = {"entries": [asdict(e) for e in self.entries]}
        write_atomic(self.path, (json.dumps(body, indent=1) + "\n").encode())


def decline_reason(policy: DevicePrivacy | None, dp: DpParams | None, ledger: DeviceLedger, *,
                   secure: bool = False) -> tuple[DeclineReason, str] | None:
    """Why this device must not take part in a round announcing ``dp`` (None: it may); ``secure``: the round is a
    secure-aggregation round."""
    if dp is not None and dp.mode == "distributed" and not secure:  # every device, policy or not: PROTOCOL.md
        return (DeclineReason.MODE_NOT_ALLOWED, "distributed DP outside a secure-aggregation round: the hub would "
                "see this device's update with only 1/sqrt(m) of the noise")
    if policy is None:
        return None
    if dp is None:
        return DeclineReason.DP_REQUIRED, "this device takes part in differentially private rounds only"
    if dp.mode not in policy.modes:
        return DeclineReason.MODE_NOT_ALLOWED, f"mode {dp.mode!r} is not one of {', '.join(policy.modes)}"
    if dp.noise_multiplier < policy.min_noise_multiplier:
        return (DeclineReason.NOISE_BELOW_FLOOR,
                f"noise multiplier {dp.noise_multiplier:g} < this device's floor {policy.min_noise_multiplier:g}")
    if policy.max_clip > 0 and dp.clip > policy.max_clip:
        return DeclineReason.CLIP_ABOVE_CEILING, f"clip {dp.clip:g} > this device's ceiling {policy.max_clip:g}"
    spent, after = ledger.epsilon(policy.delta), ledger.epsilon(policy.delta, dp)
    if after > policy.epsilon_budget:
        return (DeclineReason.BUDGET_EXHAUSTED,
                f"epsilon would reach {after:.3f} > budget {policy.epsilon_budget:g} ({spent:.3f} spent, "
                f"delta {policy.delta:g})")
    return None


__all__ = ["DeviceLedger", "LedgerEntry", "announced_dp", "decline_reason"]
