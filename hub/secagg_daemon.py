"""The hub's secure-aggregation rounds on the wire: frames on ``secagg/<device>``, stage progress, the close.

Called on the daemon's worker thread with the daemon (as :class:`~fedge.hub.port.HubPort`) and its
:class:`~fedge.hub.round_runner.RoundRunner`. A refused frame is counted in the store's rejects with its
`SecAggFailure` reason (``secagg_*``) and never changes the round; a stage that cannot reach the threshold, a sum
that cannot be unmasked, or a hub restart mid-round (the stage state was in memory) closes the round as failed,
and the next one starts afresh. The stage logic itself is the round core's (:mod:`fedge.core.secagg_round`).
"""

from __future__ import annotations

import logging

import numpy as np

from fedge.core.aggregators import SecureSumAggregator
from fedge.core.conduct import Offence
from fedge.core.rounds import OpenRound
from fedge.core.secagg import next_l2_clip
from fedge.core.secagg_round import SecAggCoordinator, SecureSum, split_flat
from fedge.hub import conduct
from fedge.hub.port import HubPort, RoundsPort
from fedge.protocol.codec import decode
from fedge.protocol.errors import DecodeError, SecAggError
from fedge.protocol.messages import RejectReason, RoundStatus, SecAggStage

log = logging.getLogger("fedge.hub.secagg")

__all__ = ["SECAGG_L2_KEY", "handle_frame", "step"]

SECAGG_L2_KEY = "secagg_l2_clip"
"""The store's meta key of the adaptive SecAgg L2 clip (``[secagg] l2_clip = "auto"``): where the next round starts."""


def _refuse(hub: HubPort, rounds: RoundsPort, device: str | None, topic: str, reason: str, detail: str) -> None:
    rid = rounds.round.id if rounds.round else None
    hub.store.add_reject(rid, device or topic, reason, f"secagg: {detail}")
    log.warning("secagg frame on %s refused: %s (%s)", topic, reason, detail)


def handle_frame(hub: HubPort, rounds: RoundsPort, topic: str, payload: bytes) -> None:
    """A device's stage frame: decoded (size-limited), checked against the topic and the open round, handed to
    the round's coordinator; then the stages move on if they can."""
    device = hub.topics.device_of(topic)
    rnd = rounds.round
    limit = hub.cfg.rounds.max_update_bytes
    if rnd is not None and rnd.secagg is not None:  # no decoding of more than this round's stages can need
        limit = min(limit, rnd.secagg.max_frame_bytes)
    try:
        msg = decode(payload, max_bytes=limit)
    except DecodeError as exc:
        return _refuse(hub, rounds, device, topic, str(exc.reason), exc.detail)
    if not isinstance(msg, SecAggStage):
        return _refuse(hub, rounds, device, topic, str(RejectReason.WRONG_TYPE),
                       f"expected a secagg frame, got {msg.type}")
    if msg.device != device or msg.fleet != hub.cfg.fleet:
        return _refuse(hub, rounds, device, topic, str(RejectReason.DEVICE_MISMATCH),
                       f"frame of {msg.device!r} in {msg.fleet!r} on {topic}")
    if rnd is None or rnd.secagg is None or msg.round != rnd.id:
        return _refuse(hub, rounds, device, topic, str(RejectReason.STALE_ROUND),
                       f"round {msg.round}; open secure-aggregation round: {rnd.id if rnd and rnd.secagg else None}")
    try:
        rnd.secagg.receive(msg.device, msg)
    except SecAggError as exc:
        return _refuse(hub, rounds, device, topic, f"secagg_{exc.reason.value}", exc.detail)
    step(hub, rounds, rnd)


def step(hub: HubPort, rounds: RoundsPort, rnd: OpenRound) -> None:
    """Move ``rnd``'s stages on; close it once the sum is unmasked, or as failed if it cannot be."""
    coord = rnd.secagg
    if coord is None:
        rounds.end(rnd, RoundStatus.FAILED_QUORUM, "the hub restarted during this secure-aggregation round: its "
                   "stage state and the devices' secrets were in memory only")
        return
    now = hub.clock()
    try:
        out = coord.step(now, rnd.gone(now))
    except SecAggError as exc:  # a failed close leaves the server in stage "failed": name the stage that failed
        _blame(hub, rnd.id, coord.server.blamed)
        rounds.end(rnd, RoundStatus.FAILED_QUORUM, f"secure aggregation failed in stage {coord.closing}: {exc}")
        return
    if out is None:
        return
    try:
        _close(hub, rounds, rnd, coord, out)
    except Exception as exc:  # the server is done: without this the round would stay open for ever
        log.exception("round %d: closing the secure-aggregation round failed", rnd.id)
        if rounds.round is rnd:
            rounds.end(rnd, RoundStatus.FAILED_QUORUM, f"closing the secure-aggregation round failed: {exc}")


def _blame(hub: HubPort, rid: int, blamed: dict[str, str]) -> None:
    """A strike (and an alert) for each device the SecAgg stages showed to be responsible for a bad share."""
    for device, what in sorted(blamed.items()):
        offence = (Offence.BAD_UNMASK if what.startswith("revealed") else
                   Offence.BAD_INPUT if what.startswith("said") else Offence.BAD_SHARES)
        conduct.strike(hub, rid, device, offence, what)


def _close(hub: HubPort, rounds: RoundsPort, rnd: OpenRound, coord: SecAggCoordinator, out: SecureSum) -> None:
    res = out.result  # at least min_inputs(rnd.params) of them: the server refuses fewer before unmasking
    _blame(hub, rnd.id, dict(res.blamed))
    silent = tuple(d for d in res.included if d not in res.unmask_responders)
    hub.store.add_secagg_sum(rnd.id, res.included, res.dropped_before_input, coord.setup.config.ring_bits,
                             coord.setup.config.scale, np.asarray(res.total, dtype="<u8").tobytes(), silent)
    answered = set(res.included) | set(rnd.declined)
    if out.problem is not None:  # some input was not bounded: who sent it is hidden in the sum, the round is not
        detail = (f"refused: the secure sum of {len(res.included)} inputs cannot come from bounded honest inputs "
                  f"({out.problem}); nothing aggregated, nothing deployed")
        hub.store.add_alert(rnd.id, "secagg_sum_refused", None, detail)
        rounds.end(rnd, RoundStatus.REFUSED_INPUT, detail)
        conduct.account(hub, rnd.id, rnd.selected, answered, set())
        return
    if out.under is not None and coord.plan.norm_bit:  # the adaptive L2 clip moves toward the median norm
        l2 = next_l2_clip(coord.plan.l2_clip, out.under)
        hub.store.set_meta(SECAGG_L2_KEY, repr(l2))
        log.info("round %d: %.0f%% of the inputs were within the L2 clip %.4g: next clip %.4g", rnd.id,
                 100 * out.under, coord.plan.l2_clip, l2)
    agg = rnd.aggregator
    if not isinstance(agg, SecureSumAggregator):
        raise TypeError(f"round {rnd.id} is a secure-aggregation round with a {agg.name} aggregator")
    agg.add_sum(split_flat(out.total, agg.shapes), len(res.included))
    rnd.accepted = {d: "secagg" for d in res.included}
    rounds.close(rnd)
