"""Update validation: a pure function from (topic device, payload, round context) to a verdict.

Checks, in order: decode (malformed / too_large / bad_version / wrong_type), fleet, topic device
≠ message device, unknown device, no open round, stale round, not selected, wrong model,
duplicate (the same nonce again is a redelivery, not a reject; in a buffered round checked before the version's
staleness, so an accepted update re-sent after the round moved on is still acked), names/shapes, dtypes, non-finite
values, sample count (at most 10^9, and at most what the device registered: the ``n_samples`` of its presence,
which counts all of its rows while an update counts the rows it trained on). Every rejection is addressed to the
topic's device, whatever the body says.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, replace
from typing import Final

import numpy as np

from fedge.core.buffered import BufferChain
from fedge.core.compress import decompress
from fedge.protocol.codec import decode
from fedge.protocol.errors import DecodeError
from fedge.protocol.messages import ModelUpdate, RejectReason

MAX_SAMPLES: Final = 10**9
"""More samples than this on one device is taken as a lie (it would dominate the weighted mean)."""


def _unregistered(device: str) -> int | None:
    """No presence on record: the update's own claim is bounded by ``max_samples`` only."""
    return None


@dataclass(frozen=True)
class UpdateContext:
    """What the hub knows when an update arrives (read during one :func:`validate_update` call: the hub passes its
    live sets, not copies)."""

    fleet: str
    known_devices: AbstractSet[str]
    round_id: int | None  # the open round, None if none is open
    model_version: str | None
    selected: AbstractSet[str]
    accepted: Mapping[str, str]  # device -> nonce of its accepted update in the open round
    head_spec: Mapping[str, tuple[tuple[int, ...], str]]  # name -> (shape, dtype)
    max_update_bytes: int
    max_samples: int = MAX_SAMPLES
    private: bool = False  # the open round is a DP round
    declined: AbstractSet[str] = frozenset()  # devices that declined the open round
    compression: str | None = None  # the open round's compressed updates (core/compress.py), decoded first
    registered_samples: Callable[[str], int | None] = _unregistered  # device -> n_samples of its presence
    chain: BufferChain | None = None  # a buffered round's versions: one update per device and version and per
    # buffer, not too stale


@dataclass(frozen=True)
class Accept:
    """A new, valid update for the open round: store it, aggregate it, ack it."""

    update: ModelUpdate


@dataclass(frozen=True)
class Redelivery:
    """The update already accepted from this device in this round (same nonce): ack it again, nothing else."""

    update: ModelUpdate


@dataclass(frozen=True)
class Rejection:
    """An update that must not be aggregated. ``device`` is the update topic's device (None for a topic without a
    valid one): a Reject goes to the sender only, never to a device the body names, and is counted against it.
    ``round`` is the body's round when decoding got that far, ``update`` the decoded message."""

    reason: RejectReason
    detail: str
    round: int | None = None
    device: str | None = None
    update: ModelUpdate | None = None


Verdict = Accept | Redelivery | Rejection


def _reject(reason: RejectReason, detail: str, topic_device: str | None, msg: ModelUpdate | None = None) -> Rejection:
    return Rejection(reason, detail, None if msg is None else msg.round, topic_device, msg)


def check_update(msg: ModelUpdate, topic_device: str | None, ctx: UpdateContext) -> tuple[RejectReason, str] | None:
    """Every check after decoding; None means acceptable (duplicates are left to :func:`validate_update`)."""
    if msg.fleet != ctx.fleet:
        return RejectReason.MALFORMED, f"fleet {msg.fleet!r}, this hub serves {ctx.fleet!r}"
    if topic_device != msg.device:
        return RejectReason.DEVICE_MISMATCH, f"topic names device {topic_device!r}, message says {msg.device!r}"
    if msg.device not in ctx.known_devices:
        return RejectReason.UNKNOWN_DEVICE, f"device {msg.device!r} is not known to the hub"
    if ctx.round_id is None:
        return RejectReason.NO_OPEN_ROUND, f"no round is open (update for round {msg.round})"
    if msg.round != ctx.round_id:
        return RejectReason.STALE_ROUND, f"update for round {msg.round}, round {ctx.round_id} is open"
    if msg.device not in ctx.selected:
        return RejectReason.NOT_SELECTED, f"device {msg.device!r} was not selected for round {ctx.round_id}"
    if msg.device in ctx.declined:
        return RejectReason.DUPLICATE, f"device {msg.device!r} declined round {ctx.round_id}"
    if ctx.private and (msg.n_samples != 1 or msg.metrics):
        return RejectReason.MALFORMED, ("a DP round's update carries n_samples = 1 and no metrics (is the agent too "
                                        "old to apply DP?)")
    if ctx.chain is not None:  # a buffered round: any version of its chain at most max_staleness old
        if ctx.chain.redelivery(msg.device, msg.model_version, msg.nonce):
            return None  # accepted before: a redelivery (validate_update acks it again), however stale it is now
        why = ctx.chain.why_not(msg.model_version)
        if why is None:
            return None
        known = ctx.chain.staleness(msg.model_version) is not None
        return (RejectReason.STALE_ROUND if known else RejectReason.WRONG_MODEL), why
    if msg.model_version != ctx.model_version:
        detail = f"update from {msg.model_version!r}, round {ctx.round_id} trains {ctx.model_version!r}"
        return RejectReason.WRONG_MODEL, detail
    return None


def check_delta(msg: ModelUpdate, ctx: UpdateContext) -> tuple[RejectReason, str] | None:
    if msg.delta.keys() != ctx.head_spec.keys():
        names, expected = set(msg.delta), set(ctx.head_spec)
        return RejectReason.WRONG_SHAPE, (f"delta names differ: missing {sorted(expected - names)}, "
                                          f"unexpected {sorted(names - expected)}"[:300])
    for name, (shape, _) in ctx.head_spec.items():
        if tuple(msg.delta[name].shape) != tuple(shape):
            return RejectReason.WRONG_SHAPE, f"{name}: shape {list(msg.delta[name].shape)}, expected {list(shape)}"
    for name, (_, dtype) in ctx.head_spec.items():
        if msg.delta[name].dtype != dtype:  # numpy compares a dtype with its name
            return RejectReason.WRONG_DTYPE, f"{name}: dtype {msg.delta[name].dtype}, expected {dtype}"
    for name, arr in msg.delta.items():
        if not np.isfinite(arr).all():
            return RejectReason.NOT_FINITE, f"{name}: contains NaN or infinity"
    if not 1 <= msg.n_samples <= ctx.max_samples:
        return RejectReason.BAD_SAMPLES, f"n_samples {msg.n_samples} is not in [1, {ctx.max_samples}]"
    registered = ctx.registered_samples(msg.device)
    if registered is not None and msg.n_samples > registered:
        return RejectReason.BAD_SAMPLES, (f"n_samples {msg.n_samples} is more than the {registered} rows this device "
                                          "registered in its presence")
    return None


def validate_update(topic_device: str | None, payload: bytes, ctx: UpdateContext) -> Verdict:
    """Decode and check one update: exactly one of :class:`Accept`, :class:`Redelivery` or :class:`Rejection`.

    Never raises for anything the payload contains; a rejection carries a :class:`RejectReason` and a detail.
    """
    try:
        msg = decode(payload, max_bytes=ctx.max_update_bytes)
    except DecodeError as exc:
        try:
            reason = RejectReason(exc.reason)
        except ValueError:
            reason = RejectReason.MALFORMED
        return _reject(reason, exc.detail, topic_device)
    if not isinstance(msg, ModelUpdate):
        return _reject(RejectReason.WRONG_TYPE, f"expected {ModelUpdate.type}, got {msg.type}", topic_device)
    problem = check_update(msg, topic_device, ctx)
    if problem is None and ctx.chain is not None:  # buffered: one per device and version, and per buffer
        if ctx.chain.redelivery(msg.device, msg.model_version, msg.nonce):
            return Redelivery(msg)
        dup = ctx.chain.duplicate(msg.device, msg.model_version)
        if dup is not None:
            problem = RejectReason.DUPLICATE, f"{dup} (round {msg.round})"
    elif problem is None and msg.device in ctx.accepted:
        if ctx.accepted[msg.device] == msg.nonce:
            return Redelivery(msg)
        problem = RejectReason.DUPLICATE, f"device {msg.device!r} already has an update in round {msg.round}"
    if problem is None and ctx.compression is not None:  # decode the codes back to float32 deltas first
        try:
            shapes = {name: shape for name, (shape, _) in ctx.head_spec.items()}
            msg = replace(msg, delta=dict(decompress(msg.delta, shapes, ctx.compression)))
        except ValueError as exc:
            problem = RejectReason.MALFORMED, f"{ctx.compression} update: {exc}"[:300]
    if problem is None:
        problem = check_delta(msg, ctx)
    if problem is not None:  # answered to the topic's device: the body's device may be anyone's name
        return _reject(*problem, topic_device, msg)
    return Accept(msg)


__all__ = [
    "MAX_SAMPLES", "Accept", "Redelivery", "Rejection", "UpdateContext", "Verdict", "check_delta", "check_update",
    "validate_update",
]
