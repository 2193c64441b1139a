"""The device's own privacy ledger and the decision to take part in a DP round.

The device does not trust the hub's accounting: it records every DP round it published an update for (mode,
noise multiplier, clip, the noise it added) in ``state_dir/privacy.json`` and computes its own epsilon with
the same accountant as the hub, *without* sampling amplification (a device cannot check how it was chosen).
An entry is written before the update is published, so a crash can over-count, never under-count.

What the device can enforce depends on the mode: in ``local`` mode it adds the noise itself, so its epsilon
holds whatever the hub does. In ``central`` mode the noise is the hub's: the device's ledger then counts the
z the hub announced, and the guarantee rests on the hub keeping its word. ``distributed`` is accepted only in
secure-aggregation rounds.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path

from fedge.core.device import Declined, dp_decline
from fedge.core.privacy import DpParams, epsilon, event_for
from fedge.edge_agent.config import DevicePrivacy
from fedge.protocol.fsio import write_atomic

log = logging.getLogger("fedge.agent")


@dataclass(frozen=True)
class LedgerEntry:
    round: int
    mode: str
    noise_multiplier: float
    clip: float
    noise_std: float  # the standard deviation the device itself added (0 in central mode)


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
                   secure: bool = False) -> Declined | None:
    """Why this device must not take part in a round announcing ``dp`` (None: it may), by the round core's rule
    (:func:`fedge.core.device.dp_decline`) on this ledger; ``secure``: a secure-aggregation round."""
    delta = policy.delta if policy is not None else 1e-5
    return dp_decline(policy, dp, lambda extra: ledger.epsilon(delta, extra), secure=secure)


__all__ = ["DeviceLedger", "LedgerEntry", "decline_reason"]
