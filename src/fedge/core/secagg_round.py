"""A secure-aggregation round on the wire: stage frames in, stage frames out, stage deadlines (PROTOCOL.md,
"Secure aggregation").

The hub's :class:`SecAggCoordinator` wraps the transport-free `fedge.core.secagg_server.SecAggServer` for one round.
Each stage closes as soon as every device still expected has answered (a device that declined or stayed offline
past the grace is expected no more), or at the stage's deadline: advertise and share ``stage_timeout_s`` after
the previous stage closed, masked input at the round's deadline (the devices train during that stage), unmask
``stage_timeout_s`` after the masked inputs closed. A stage that ends with fewer than the threshold fails the
round cleanly. The coordinator never sees an individual update: only the unmasked sum.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Collection
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
from numpy.typing import NDArray

from fedge.core.secagg import RoundSetup, SecAggConfig, dequantise, sum_problem, under_bound
from fedge.core.secagg_server import SecAggResult, SecAggServer
from fedge.core.secagg_session import round_tag, stage_frame, stage_of
from fedge.core.stragglers import straggler_grace
from fedge.protocol.errors import SecAggError, SecAggFailure
from fedge.protocol.messages import SecAggStage
from fedge.protocol.secagg_wire import (
    AdvertiseKeys,
    MaskedInput,
    ShareKeys,
    StageMessage,
    UnmaskResponse,
)

log = logging.getLogger("fedge.core.secagg_server")
Publish = Callable[[str, bytes], None]  # (device, frame) -> published on device/<device>/secagg


@dataclass(frozen=True)
class SecAggPlan:
    """What a SecAgg round announces and stores (``RoundParams.secagg``): the public setup, resolved."""

    seed: str  # 64 hex characters
    degree: int
    threshold: int
    ring_bits: int
    clip: float
    scale: float
    stochastic: bool
    stage_timeout_s: float
    l2_clip: float = 0.0  # each update clipped to this L2 norm (0: none announced)
    norm_bit: bool = False  # the inputs carry the norm bit (adaptive L2 clip)

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> SecAggPlan:
        return cls(str(raw["seed"]), int(raw["degree"]), int(raw["threshold"]), int(raw["ring_bits"]),
                   float(raw["clip"]), float(raw["scale"]), bool(raw["stochastic"]), float(raw["stage_timeout_s"]),
                   float(raw.get("l2_clip", 0.0)), bool(raw.get("norm_bit", False)))

    @classmethod
    def make(cls, fleet: str, round_: int, cohort: tuple[str, ...], seed: bytes, cfg: SecAggConfig,
             stage_timeout_s: float) -> SecAggPlan:
        """Resolve degree and threshold for ``cohort``; ConfigError (naming the ``secagg`` field) if the setup is
        impossible: fewer than two devices, a threshold outside (k/2, k], or a ring the cohort's sum overflows."""
        setup = RoundSetup(round_tag(fleet, round_, seed.hex()), cohort, seed, cfg)
        return cls(seed.hex(), setup.degree, setup.threshold, cfg.ring_bits, cfg.clip, cfg.scale, cfg.stochastic,
                   stage_timeout_s, cfg.l2_clip, cfg.norm_bit)

    def config(self) -> SecAggConfig:
        return SecAggConfig(degree=self.degree, threshold=self.threshold, ring_bits=self.ring_bits, clip=self.clip,
                            scale=self.scale, stochastic=self.stochastic, l2_clip=self.l2_clip, norm_bit=self.norm_bit)

    def setup(self, fleet: str, round_: int, cohort: tuple[str, ...]) -> RoundSetup:
        cfg = self.config()
        return RoundSetup(round_tag(fleet, round_, self.seed), cohort, bytes.fromhex(self.seed), cfg)


@dataclass(frozen=True)
class SecureSum:
    """The outcome of a SecAgg round: the de-quantised sum of the included devices' updates (the norm bit left
    out); ``problem``: why that sum cannot come from honest, bounded inputs (None: it can; the round must then be
    refused); ``under``: the share of inputs within the L2 clip (None without the norm bit)."""

    total: NDArray[np.float64]
    result: SecAggResult
    problem: str | None = None
    under: float | None = None


class SecAggCoordinator:
    """The hub's stages of one SecAgg round. ``receive`` takes a device's frame (SecAggError with a reason if
    refused); ``step`` closes whatever stage is due, publishes the next stage's frames, and returns the
    :class:`SecureSum` once the unmask stage closed (SecAggError ``below_threshold``/``bad_share`` if it fails)."""

    def __init__(self, fleet: str, round_: int, plan: SecAggPlan, cohort: tuple[str, ...], dim: int,
                 opened_at: float, deadline: float, publish: Publish, *, min_inputs: int = 0, target: int = 0,
                 dp_clip: float = 0.0, noise_std: float = 0.0) -> None:
        """``dim``: the update's size (the norm bit, when announced, is one more coordinate); ``target``: the
        masked-input stage closes once this many inputs arrived (0: it waits for every device that shared its keys,
        or the deadline); ``dp_clip`` and ``noise_std``: under distributed DP, the L2 clip and the noise share every
        device applies (the sum is checked against them)."""
        self.target = target
        self.target_at: float | None = None  # when the masked inputs reached the target
        self.mask_opened_at = opened_at
        self.fleet, self.round, self.plan = fleet, round_, plan
        self.setup = plan.setup(fleet, round_, cohort)
        dim += 1 if plan.norm_bit else 0
        self.server = SecAggServer(self.setup, dim, min_inputs)
        cfg = self.setup.config
        self.check = replace(cfg, l2_clip=dp_clip) if dp_clip and not cfg.norm_bit else cfg
        self.noise_std = noise_std
        # the largest stage frame a device can honestly send: its masked input, or its sealed shares
        self.max_frame_bytes = 8 * dim + 256 * (self.setup.degree + 4) + 4096
        self.deadline = deadline
        self.stage_deadline = opened_at + plan.stage_timeout_s
        self._publish = publish
        self.closing = "advertise"  # the stage being (or last) closed: the one a failure is in

    @property
    def stage(self) -> str:
        return self.server.stage

    def receive(self, device: str, frame: SecAggStage) -> None:
        """Accept one stage frame from ``device`` (the topic's device): its sender must be that device."""
        msg = stage_of(frame)
        if getattr(msg, "sender", None) != device:
            raise SecAggError(SecAggFailure.UNKNOWN_SENDER, f"a stage message of {getattr(msg, 'sender', '?')!r} "
                              f"on the topic of {device!r}")
        s = self.server
        if isinstance(msg, AdvertiseKeys):
            s.receive_advertise(msg)
        elif isinstance(msg, ShareKeys):
            s.receive_shares(msg)
        elif isinstance(msg, MaskedInput):
            s.receive_masked(msg)
        elif isinstance(msg, UnmaskResponse):
            s.receive_unmask(msg)
        else:
            raise SecAggError(SecAggFailure.PROTOCOL_VIOLATION, f"devices do not send {type(msg).__name__}")

    def _enough_inputs(self, now: float) -> bool:
        """The masked-input stage has its target of usable inputs (none named by a neighbour whose copy of its bundle
        did not open) and the others had their grace: they are dropped (their key shares remove their masks)."""
        s = self.server
        accused = {v for rejected in s.rejected.values() for v in rejected}
        usable = sum(1 for d in s.masked if d not in accused)
        # a survivor's seed is rebuilt from its neighbours in the sum: never stop below t + 1 usable inputs
        if not self.target or usable < max(self.target, self.setup.threshold + 1):
            return False
        if self.target_at is None:
            self.target_at = now
        return now - self.target_at >= straggler_grace(self.mask_opened_at, self.target_at)

    def _waiting(self, gone: Collection[str], now: float) -> bool:
        """Some device expected in the current stage has neither answered nor gone (O(1) while more than the gone
        are missing: each stage's arrivals are a subset of its expected devices; called on every frame)."""
        s = self.server
        stages: dict[str, tuple[Collection[str], Collection[str]]] = {
            "advertise": (self.setup.cohort, s.adverts), "share": (s.adverts, s.shares), "mask": (s.shares, s.masked),
            "unmask": (s.requests, s.responses)}
        expected, arrived = stages.get(s.stage, ((), ()))
        if s.stage == "mask" and self._enough_inputs(now):
            return False
        if len(arrived) + len(gone) < len(expected):
            return True
        return bool(set(expected) - set(arrived) - set(gone))

    def _send(self, messages: dict[str, Any]) -> None:
        for device, msg in sorted(messages.items()):
            self._publish(device, stage_frame(self.fleet, self.round, device, msg))

    def step(self, now: float, gone: Collection[str]) -> SecureSum | None:
        """Close every stage that is due (all expected devices answered, or its deadline passed)."""
        s = self.server
        while s.stage in ("advertise", "share", "mask", "unmask"):
            # devices train during the masked-input stage: it lasts until the round's deadline, and never less than a
            # stage timeout (late key stages must not leave it no time at all)
            due = max(self.deadline, self.stage_deadline) if s.stage == "mask" else self.stage_deadline
            if self._waiting(gone, now) and now < due:
                return None
            stage = self.closing = s.stage
            if stage == "advertise":
                self._send(s.close_advertise())
            elif stage == "share":
                relays: dict[str, StageMessage] = dict(s.close_shares())
                self._send(relays)
            elif stage == "mask":
                self._send(s.close_masked())
            else:
                result = s.finish()
                cfg = self.setup.config
                total = dequantise(result.total, cfg)
                count = len(result.included)
                problem = sum_problem(result.total, count, self.check, self.noise_std)
                under = under_bound(result.total, count, cfg)
                log.info("round %d: secure sum of %d inputs (%d dropped before their input, %d unmask answers)%s",
                         self.round, count, len(result.dropped_before_input), len(result.unmask_responders),
                         "" if problem is None else f"; refused: {problem}")
                return SecureSum(total[:-1] if cfg.norm_bit else total, result, problem, under)
            log.info("round %d: secagg stage %s closed (%d devices), now %s", self.round, stage,
                     {"advertise": len(s.adverts), "share": len(s.shares), "mask": len(s.masked)}[stage], s.stage)
            self.stage_deadline = now + self.plan.stage_timeout_s
            if stage == "share":
                self.mask_opened_at = now
        return None


def split_flat(total: NDArray[np.float64], shapes: dict[str, tuple[int, ...]]) -> dict[str, NDArray[np.float64]]:
    """A flat vector back into the head's arrays, in sorted name order (the order devices flatten in)."""
    out, at = {}, 0
    for name, shape in sorted(shapes.items()):
        size = math.prod(shape)
        out[name] = total[at:at + size].reshape(shape)
        at += size
    if at != total.size:
        raise ValueError(f"a sum of {total.size} elements for a head of {at}")
    return out


__all__ = ["SecAggCoordinator", "SecAggPlan", "SecureSum", "split_flat"]
