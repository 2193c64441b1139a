"""The operator's requests over MQTT: ``control/round/start`` and ``control/round/cancel`` (PROTOCOL.md §5).

Every request is answered on ``control/round/reply`` and counted in the store's control log when refused.
Runs on the daemon's worker thread.
"""

from __future__ import annotations

import logging
from typing import Protocol

from fedge.core.rounds import OpenRound, over_limits
from fedge.hub.port import HubPort
from fedge.protocol.codec import decode_control
from fedge.protocol.control import ReplyReason, decode_cancel, request_id_of
from fedge.protocol.errors import DecodeError
from fedge.protocol.messages import RoundOverrides

log = logging.getLogger("fedge.hub")

__all__ = ["handle_cancel", "handle_start"]


class _Rounds(Protocol):
    round: OpenRound | None

    def queue(self, overrides: RoundOverrides) -> None: ...
    def queued(self) -> bool: ...
    def drop_queued(self) -> None: ...
    def start(self, overrides: RoundOverrides) -> tuple[int | None, str, str]: ...
    def set_chain(self, left: int, overrides: RoundOverrides) -> None: ...
    def cancel(self, r: OpenRound, reason: str) -> None: ...


class _Selections(Protocol):
    @property
    def open(self) -> object | None: ...
    def cancel_open(self, round_id: int | None, reason: str) -> tuple[int, str] | None: ...


class ControlHost(HubPort, Protocol):
    @property
    def rounds(self) -> _Rounds: ...
    @property
    def selector(self) -> _Selections: ...


def handle_start(hub: ControlHost, payload: bytes) -> None:
    """Start a round (and a ``chain_rounds`` chain) with the request's overrides, or say why not."""
    store = hub.store
    try:
        overrides = decode_control(payload)
    except DecodeError as exc:
        store.add_control(str(exc.reason), exc.detail)
        log.warning("control message ignored (%s): %s", exc.reason, exc.detail)
        hub.reply(request_id_of(payload), None, str(exc.reason), exc.detail)
        return
    busy = hub.busy_round()
    excess = over_limits(overrides, hub.cfg.limits)
    if excess is not None:
        store.add_control(ReplyReason.OVER_LIMITS, excess)
        log.warning("control message refused: %s", excess)
        hub.reply(overrides.request_id, None, ReplyReason.OVER_LIMITS, excess)
        return
    gating = hub.rounds.round is None and getattr(hub.selector.open, "gate", None) is not None
    if busy is not None and gating and not hub.rounds.queued():
        # a deploy gate's evaluation round is open (the hub's own, not the operator's): the start waits for it
        hub.rounds.queue(overrides)
        detail = (f"queued behind evaluation round {busy} (the devices are validating a new version); it opens as "
                  f"round {busy + 1} when that closes (cancel it with round {busy + 1})")
        store.add_control(ReplyReason.QUEUED, detail)
        hub.reply(overrides.request_id, busy + 1, ReplyReason.QUEUED, detail)
        return
    if busy is not None:
        kind = "selection round" if hub.rounds.round is None else "round"
        detail = f"{kind} {busy} is open"
        store.add_control(ReplyReason.ROUND_OPEN, detail)
        log.warning("control message ignored: %s", detail)
        hub.reply(overrides.request_id, None, ReplyReason.ROUND_OPEN, detail)
        return
    hub.rounds.set_chain(max(hub.cfg.schedule.chain_rounds - 1, 0), overrides)
    rid, reason, detail = hub.rounds.start(overrides)
    if rid is None and reason == ReplyReason.NO_DEVICES:
        store.add_control(reason, detail)
    hub.reply(overrides.request_id, rid, reason, detail)


def handle_cancel(hub: ControlHost, payload: bytes) -> None:
    """Cancel the open round (federated, selection or evaluation), or say why not."""
    store = hub.store
    try:
        req = decode_cancel(payload)
    except DecodeError as exc:
        store.add_control(str(exc.reason), f"cancel: {exc.detail}")
        log.warning("cancel ignored (%s): %s", exc.reason, exc.detail)
        hub.reply(request_id_of(payload), None, str(exc.reason), exc.detail)
        return
    rnd = hub.rounds.round
    busy = hub.busy_round()
    if rnd is None and busy is not None and req.round == busy + 1 and hub.rounds.queued():  # a queued start
        hub.rounds.drop_queued()
        store.add_control(ReplyReason.CANCELLED, f"queued round {req.round}")
        hub.reply(req.request_id, req.round, ReplyReason.CANCELLED, "the queued start was dropped before it opened")
        return
    if rnd is None:
        done = hub.selector.cancel_open(req.round, req.reason)
        if done is not None:  # a selection or evaluation round
            sid, detail = done
            store.add_control(ReplyReason.CANCELLED, f"selection round {sid}")
            hub.reply(req.request_id, sid, ReplyReason.CANCELLED, detail)
            return
    if rnd is None or (req.round is not None and req.round != rnd.id):
        detail = "no round is open" if rnd is None else f"round {req.round} is not open (round {rnd.id} is)"
        store.add_control(ReplyReason.NO_OPEN_ROUND, f"cancel: {detail}")
        hub.reply(req.request_id, None, ReplyReason.NO_OPEN_ROUND, detail)
        return
    hub.rounds.cancel(rnd, req.reason)
    store.add_control(ReplyReason.CANCELLED, f"round {rnd.id}")
    hub.reply(req.request_id, rnd.id, ReplyReason.CANCELLED, store.round_detail(rnd.id) or "")
