"""A device's SecAgg+ round on the wire: stage frames in, stage frames out (PROTOCOL.md, "Secure aggregation").

The agent creates one :class:`DeviceSession` when it starts a round whose announce carries ``secagg_*`` fields,
publishes :meth:`DeviceSession.start`'s advertise frame at once (before training), answers the hub's frames on
``device/<id>/secagg`` with :meth:`DeviceSession.on_frame` while it trains, and hands the trained, quantised
update to :meth:`DeviceSession.set_input`: the masked input goes out as soon as both it and the relayed shares
are there. Secrets live only in this object: an agent restarted mid-round has dropped out of it.
"""

from __future__ import annotations

import hashlib
import logging
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray

from fedge.core.privacy import DpParams, add_noise, clip_update
from fedge.core.secagg import RoundSetup, SecAggConfig, SecAggDevice, bounded_input, quantise
from fedge.protocol.codec import encode as encode_frame
from fedge.protocol.errors import ConfigError, SecAggError, SecAggFailure
from fedge.protocol.messages import RoundAnnounce, SecAggStage
from fedge.protocol.secagg_wire import (
    KeysBroadcast,
    SharesRelay,
    StageMessage,
    UnmaskRequest,
    decode,
    encode,
)

log = logging.getLogger("fedge.agent.secagg")
STAGE_KEY = "fsa"
"""The one array of a ``secagg`` frame: the stage message's byte encoding (uint8)."""


def round_tag(fleet: str, round_: int, seed_hex: str) -> str:
    """The SecAgg round id every stage message carries: fleet, round and the first 32 hex digits of the seed (a
    message of another round, fleet or hub state is refused as ``wrong_round``)."""
    return f"{fleet}:{round_}:{seed_hex[:32]}"


def is_secagg(msg: RoundAnnounce) -> bool:
    """The announce opens a secure-aggregation round."""
    return msg.secagg_seed is not None


def setup_of(msg: RoundAnnounce) -> RoundSetup:
    """The public setup a SecAgg announce describes; ConfigError naming the field if it is unusable."""
    seed = msg.secagg_seed or ""
    try:
        raw = bytes.fromhex(seed)
    except ValueError:
        raw = b""
    if len(raw) != 32:
        raise ConfigError("secagg_seed", "must be 64 hex characters")
    if msg.secagg_degree is None or msg.secagg_threshold is None or msg.secagg_degree < 1:
        raise ConfigError("secagg_degree", "a SecAgg announce names the degree and the threshold")
    cfg = SecAggConfig(degree=msg.secagg_degree, threshold=msg.secagg_threshold,
                       ring_bits=msg.secagg_ring_bits or 32, clip=msg.secagg_clip or 1.0,
                       scale=msg.secagg_scale or 65536.0, stochastic=msg.secagg_stochastic,
                       l2_clip=msg.secagg_l2_clip or 0.0, norm_bit=msg.secagg_norm_bit)
    setup = RoundSetup(round_tag(msg.fleet, msg.round, seed), tuple(msg.selected), raw, cfg)
    if (setup.degree, setup.threshold) != (msg.secagg_degree, msg.secagg_threshold):
        raise ConfigError("secagg_degree", f"degree {msg.secagg_degree} / threshold {msg.secagg_threshold} do not fit "
                          f"a cohort of {len(msg.selected)}")
    return setup


def stage_frame(fleet: str, round_: int, device: str, msg: StageMessage) -> bytes:
    """A stage message in its fedge frame."""
    return encode_frame(SecAggStage(fleet, round_, device, {STAGE_KEY: np.frombuffer(encode(msg), dtype=np.uint8)}))


def stage_of(frame: SecAggStage) -> StageMessage:
    """The stage message inside a ``secagg`` frame (SecAggError ``malformed`` if there is none)."""
    arr = frame.stage.get(STAGE_KEY)
    if len(frame.stage) != 1 or arr is None or arr.dtype != np.uint8 or arr.ndim != 1:
        raise SecAggError(SecAggFailure.MALFORMED, f"a secagg frame holds one 1-D uint8 array {STAGE_KEY!r}")
    return decode(arr.tobytes())


def private_input(delta: Mapping[str, NDArray[Any]], names: list[str], setup: RoundSetup, dp: DpParams | None,
                  rng: np.random.Generator) -> NDArray[np.uint64]:
    """The ring vector a device masks: its update flattened in ``names`` order; under ``distributed`` DP first
    clipped to L2 norm C and given the device's share of the noise N(0, (zC)²/(m-1)) (a sum of at least m devices
    less any one carries N(0, (zC)²)); otherwise clipped to the announced L2 norm (and followed by the norm bit,
    when announced: :func:`~fedge.core.secagg.bounded_input`); then clipped per coordinate and quantised
    (``RoundSetup.config``)."""
    arrays = dict(delta)
    if dp is not None:
        clipped, _ = clip_update(arrays, dp.clip)
        arrays = dict(add_noise(clipped, dp.device_noise_std(), rng))
    flat = np.concatenate([np.asarray(arrays[k], dtype=np.float64).ravel() for k in names])
    if dp is None:
        flat = bounded_input(flat, setup.config)
    return quantise(flat, setup.config, rng)


def distributed_problem(dp: DpParams | None, cohort: int, clip: float | None, scale: float | None) -> str | None:
    """Why a device must not add its noise share as announced for a cohort of ``cohort`` with coordinate clip
    ``clip`` and quantisation ``scale`` (None: it may): m larger than the cohort (each share would be tiny), or a
    clip or quantisation step that would cut or drown the noise. The hub asks the same before announcing."""
    if dp is None or dp.mode != "distributed":
        return None
    if not 2 <= dp.min_cohort <= cohort:
        return f"dp_min_cohort {dp.min_cohort} is not in 2..{cohort} (the cohort)"
    std = dp.device_noise_std()
    if (clip or 0.0) < auto_clip(dp, 0.0) * (1 - 1e-9):
        return f"secagg_clip {clip} is below C + 6 noise standard deviations ({auto_clip(dp, 0.0):.4g})"
    if std * (scale or 0.0) < 4.0:
        return f"the quantisation step 1/{scale} is not far below the noise std {std:.3g}"
    return None


def auto_clip(dp: DpParams | None, clip: float) -> float:
    """The coordinate clip a round announces: ``clip``, or under distributed DP at least C + 6 device noise
    standard deviations (so an honest coordinate is clamped with probability below 2e-9)."""
    if dp is None or dp.mode != "distributed":
        return clip
    return max(clip, dp.clip + 6.0 * dp.device_noise_std())


@dataclass
class _Pending:
    relay: SharesRelay | None = None
    q: NDArray[np.uint64] | None = None


class DeviceSession:
    """One device's side of one SecAgg round; every method is thread-safe and returns the frames to publish on
    ``secagg/<device>`` (zero or one). A hub message that breaks the protocol aborts the session: nothing more
    is sent, and :attr:`failure` says why."""

    def __init__(self, announce: RoundAnnounce, device: str) -> None:
        self.fleet, self.round, self.device = announce.fleet, announce.round, device
        self.setup = setup_of(announce)
        self._dev = SecAggDevice(self.setup, device)
        self._lock = threading.Lock()
        self._pending = _Pending()
        self.failure: SecAggError | None = None
        self.masked_sent = False
        self.finished = False
        self._seen: set[bytes] = set()  # stage messages handled: an MQTT redelivery is ignored, not an abort

    def _frame(self, msg: StageMessage) -> list[bytes]:
        return [stage_frame(self.fleet, self.round, self.device, msg)]

    def start(self) -> list[bytes]:
        """Stage 0: the advertise frame."""
        with self._lock:
            return self._frame(self._dev.advertise())

    def on_frame(self, frame: SecAggStage) -> list[bytes]:
        """Handle one frame from the hub; a frame for another round or device is ignored with a log line."""
        if frame.round != self.round or frame.device != self.device:
            log.warning("ignoring a secagg frame of round %d for %s", frame.round, frame.device)
            return []
        with self._lock:
            if self.failure is not None or self.finished:
                return []
            try:
                raw = frame.stage.get(STAGE_KEY)
                digest = hashlib.sha256(b"" if raw is None else raw.tobytes()).digest()
                if digest in self._seen:
                    log.info("round %d: a secagg stage message again (redelivered): ignored", self.round)
                    return []
                msg = stage_of(frame)
                self._seen.add(digest)
                if isinstance(msg, KeysBroadcast):
                    return self._frame(self._dev.share_keys(msg))
                if isinstance(msg, SharesRelay):
                    self._pending.relay = msg
                    return self._masked()
                if isinstance(msg, UnmaskRequest):
                    out = self._frame(self._dev.unmask(msg))
                    self.finished = True
                    return out
                raise SecAggError(SecAggFailure.PROTOCOL_VIOLATION, f"a device never receives {type(msg).__name__}")
            except SecAggError as exc:
                return self._fail(exc)

    def set_input(self, q: NDArray[np.uint64]) -> list[bytes]:
        """The quantised update; the masked input goes out now if the shares were relayed, else when they are."""
        with self._lock:
            if self.failure is not None:
                return []
            self._pending.q = q
            try:
                return self._masked()
            except SecAggError as exc:
                return self._fail(exc)

    def _masked(self) -> list[bytes]:
        relay, q = self._pending.relay, self._pending.q
        if relay is None or q is None or self.masked_sent:
            return []
        masked = self._dev.masked_input(relay, q)
        if masked.rejected:  # their senders drop out of this round (the hub is told, and names them)
            log.warning("round %d: share bundles of %s did not open: left out of this round", self.round,
                        ", ".join(masked.rejected))
        out = self._frame(masked)
        self.masked_sent = True
        self._pending = _Pending()
        return out

    def _fail(self, exc: SecAggError) -> list[bytes]:
        if exc.reason is SecAggFailure.WRONG_ROUND:  # a stale frame of another round (hub frames are signed)
            log.warning("round %d: secagg frame refused: %s", self.round, exc)
            return []
        self.failure = exc
        log.error("round %d: secure aggregation aborted on this device: %s", self.round, exc)
        return []


__all__ = ["STAGE_KEY", "DeviceSession", "auto_clip", "distributed_problem", "is_secagg", "private_input",
           "round_tag", "setup_of", "stage_frame", "stage_of"]
