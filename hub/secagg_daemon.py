"""The hub daemon's secure-aggregation rounds: frames on ``secagg/<device>``, stage progress, the close.

Functions of the :class:`~fedge.hub.daemon.HubDaemon` (called on its worker thread), kept apart from the plain
round's code. A refused frame is counted in the store's rejects with its `SecAggFailure` reason (``secagg_*``)
and never changes the round; a stage that cannot reach the threshold, a sum that cannot be unmasked, or a hub
restart mid-round (the stage state was in memory) closes the round as failed, and the next one starts afresh.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import numpy as np

from fedge.core.strategies import SecureSumAggregator
from fedge.hub.secagg_round import SecAggCoordinator, SecureSum, split_flat
from fedge.hub.validate import Rejection
from fedge.protocol.codec import decode
from fedge.protocol.errors import DecodeError
from fedge.protocol.messages import RejectReason, RoundStatus, SecAggStage
from fedge.protocol.secagg_wire import SecAggError

if TYPE_CHECKING:
    from fedge.hub.daemon import HubDaemon
    from fedge.hub.rounds import OpenRound, RoundParams

log = logging.getLogger("fedge.hub.secagg")


def _refuse(hub: HubDaemon, device: str | None, topic: str, reason: str, detail: str) -> None:
    rid = hub.round.id if hub.round else None
    hub.store.add_reject(rid, device or topic, reason, f"secagg: {detail}")
    log.warning("secagg frame on %s refused: %s (%s)", topic, reason, detail)


def handle_frame(hub: HubDaemon, topic: str, payload: bytes) -> None:
    """A device's stage frame: decoded (size-limited), checked against the topic and the open round, handed to
    the round's coordinator; then the stages move on if they can."""
    device = hub.topics.device_of(topic)
    rnd = hub.round
    limit = hub.cfg.rounds.max_update_bytes
    if rnd is not None and rnd.secagg is not None:  # no decoding of more than this round's stages can need
        limit = min(limit, rnd.secagg.max_frame_bytes)
    try:
        msg = decode(payload, max_bytes=limit)
    except DecodeError as exc:
        return _refuse(hub, device, topic, str(exc.reason), exc.detail)
    if not isinstance(msg, SecAggStage):
        return _refuse(hub, device, topic, str(RejectReason.WRONG_TYPE), f"expected a secagg frame, got {msg.type}")
    if msg.device != device or msg.fleet != hub.cfg.fleet:
        return _refuse(hub, device, topic, str(RejectReason.DEVICE_MISMATCH),
                       f"frame of {msg.device!r} in {msg.fleet!r} on {topic}")
    if rnd is None or rnd.secagg is None or msg.round != rnd.id:
        return _refuse(hub, device, topic, str(RejectReason.STALE_ROUND),
                       f"round {msg.round}; open secure-aggregation round: {rnd.id if rnd and rnd.secagg else None}")
    try:
        rnd.secagg.receive(msg.device, msg)
    except SecAggError as exc:
        return _refuse(hub, device, topic, f"secagg_{exc.reason.value}", exc.detail)
    step(hub, rnd)


def step(hub: HubDaemon, rnd: OpenRound) -> None:
    """Move ``rnd``'s stages on; close it once the sum is unmasked, or as failed if it cannot be."""
    coord = rnd.secagg
    if coord is None:
        hub.end_round(rnd, RoundStatus.FAILED_QUORUM, "the hub restarted during this secure-aggregation round: its "
                      "stage state and the devices' secrets were in memory only")
        return
    now = hub.clock()
    try:
        out = coord.step(now, rnd.gone(now))
    except SecAggError as exc:  # a failed close leaves the server in stage "failed": name the stage that failed
        hub.end_round(rnd, RoundStatus.FAILED_QUORUM, f"secure aggregation failed in stage {coord.closing}: {exc}")
        return
    if out is None:
        return
    try:
        _close(hub, rnd, coord, out)
    except Exception as exc:  # the server is done: without this the round would stay open for ever
        log.exception("round %d: closing the secure-aggregation round failed", rnd.id)
        if hub.round is rnd:
            hub.end_round(rnd, RoundStatus.FAILED_QUORUM, f"closing the secure-aggregation round failed: {exc}")


def min_inputs(params: RoundParams) -> int:
    """The fewest masked inputs a SecAgg round's sum may hold: min_devices, and under distributed DP the m its
    noise is split over. The stages fail before unmasking when fewer can arrive."""
    return max(params.min_devices, params.dp.min_cohort if params.dp is not None else 0)


def _close(hub: HubDaemon, rnd: OpenRound, coord: SecAggCoordinator, out: SecureSum) -> None:
    res = out.result  # at least min_inputs(rnd.params) of them: the server refuses fewer before unmasking
    silent = tuple(d for d in res.included if d not in res.unmask_responders)
    hub.store.add_secagg_sum(rnd.id, res.included, res.dropped_before_input, coord.setup.config.ring_bits,
                             coord.setup.config.scale, np.asarray(res.total, dtype="<u8").tobytes(), silent)
    agg = rnd.aggregator
    if not isinstance(agg, SecureSumAggregator):
        raise TypeError(f"round {rnd.id} is a secure-aggregation round with a {agg.name} aggregator")
    agg.add_sum(split_flat(out.total, agg.shapes), len(res.included))
    rnd.accepted = {d: "secagg" for d in res.included}
    hub.close_round(rnd)


def plain_update_rejection(hub: HubDaemon, device: str | None, rnd: OpenRound) -> Rejection:
    """A plain update sent in a secure-aggregation round (an old agent, or a device skipping the masking)."""
    return Rejection(RejectReason.WRONG_TYPE, f"round {rnd.id} is a secure-aggregation round: stage frames go to "
                     f"secagg/<device>, never a plain update", rnd.id, device)


__all__ = ["handle_frame", "min_inputs", "plain_update_rejection", "step"]
