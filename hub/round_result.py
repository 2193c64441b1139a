"""What a closed round leaves: its :class:`~fedge.protocol.messages.RoundResult` as the store recorded it, the detail
of its record, and its note in the progress watch."""

from __future__ import annotations

import logging
import math

from fedge.core.hub_round import Closing, finite_or_none, for_devices
from fedge.core.rounds import OpenRound, RoundParams
from fedge.core.strategy import Strategy
from fedge.hub import progress
from fedge.hub.port import HubPort
from fedge.hub.store import Store, VersionRow
from fedge.protocol.codec import encode
from fedge.protocol.errors import HubStateError
from fedge.protocol.messages import RoundResult, RoundStatus

log = logging.getLogger("fedge.hub")

__all__ = ["close_detail", "note_progress", "publish_result", "round_result"]


def round_result(store: Store, fleet: str, rid: int) -> RoundResult:
    """Round ``rid``'s result from the store (a closed round of this hub); a DP round's names nobody and counts no
    samples (the store keeps them for the operator)."""
    row = store.round(rid)
    if row is None or row.closed_at is None:
        raise HubStateError(f"round {rid} is not a closed round of this hub")
    ledger = store.ledger_row(rid)
    private = ledger is not None or RoundParams.from_dict(row.params).dp is not None
    outcome = store.round_outcome(rid)
    return RoundResult(
        fleet=fleet, round=rid, status=RoundStatus(row.status), model_version=row.new_version,
        accuracy=finite_or_none(row.accuracy), loss=finite_or_none(row.loss),
        devices=() if private else row.devices,
        n_samples=0 if private else row.n_samples or 0, rejected=row.rejected or 0,
        seconds=finite_or_none(row.closed_at - row.opened_at) or 0.0, detail=store.round_detail(rid),
        declined=() if private else tuple(sorted(store.declines(rid))),
        epsilon=None if ledger is None else finite_or_none(ledger.epsilon),
        federated={k: v for k, v in store.round_metrics(rid).items() if math.isfinite(v)},
        deployed=None if outcome is None else outcome[0], gate_round=None if outcome is None else outcome[1],
    )


def close_detail(next_round: int, r: OpenRound, outcome: Closing, row: VersionRow | None) -> str | None:
    """What a closed round's record says about its version (None: nothing to say): why it is kept as a
    candidate (``next_round``: the id the evaluation round will have), or why there is none."""
    if row is None:
        return outcome.detail
    if outcome.held_back is not None:
        return (f"{row.version} kept as a candidate, not deployed: {outcome.held_back} ({r.model_version}; "
                f"fedge hub rollback --to {row.version} deploys it anyway)")
    if outcome.federated_gate:
        return (f"{row.version} kept as a candidate until the round's devices validate it (evaluation round "
                f"{next_round}; deployed {r.model_version} scored "
                f"{outcome.federated['val_acc_global']:.4f})")
    return None


def note_progress(hub: HubPort, strategy: Strategy, r: OpenRound, outcome: Closing, gates_open: bool) -> None:
    """Tell :mod:`fedge.hub.progress` whether round ``r`` improved the model (a version the devices still have to
    validate is decided by its evaluation round instead, when the hub opens one: ``gates_open``)."""
    if outcome.federated_gate and gates_open:
        return
    source = hub.store.first_version_of(r.backbone_sha256)
    below = (outcome.accuracy is not None and source is not None and source.accuracy is not None
             and outcome.accuracy < source.accuracy)
    why = ("below the source model on held-out data" if below else
           "kept back by the deploy gate" if outcome.held_back is not None else "no new version")
    progress.note(hub.store, r.id, outcome.deploy and not below, why)
    if outcome.deploy and not outcome.federated and strategy.federated_gate(r.params) \
            and hub.cfg.eval_data is None:
        log.warning("round %d: deployed unscored (no held-out data, and no device sent validation scores)", r.id)


def publish_result(hub: HubPort, rid: int, frames: tuple[bytes, bytes] | None = None) -> None:
    """Round ``rid``'s result, retained: in full to operators (``control/round/result``), without cohort and sample
    totals to everyone (``round/result``; :func:`~fedge.core.hub_round.for_devices`)."""
    if frames is None:
        result = round_result(hub.store, hub.cfg.fleet, rid)
        frames = encode(result), encode(for_devices(result))
    hub.publish(hub.topics.control_round_result, frames[0], retain=True)
    hub.publish(hub.topics.result, frames[1], retain=True)
