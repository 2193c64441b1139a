"""A buffered round's steps on the hub (PROTOCOL.md, "Buffered rounds"): its buffers, the updates folded into them,
the versions they make, and a resume after a restart. The arithmetic is the core's (:mod:`fedge.core.buffered`,
:func:`~fedge.core.hub_round.buffered_version`); :class:`~fedge.hub.round_runner.RoundRunner` opens, closes and
publishes the round. Runs on the daemon's worker thread."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable

from fedge.core.aggregators import Aggregator
from fedge.core.buffered import Buffer, BufferChain
from fedge.core.compress import decompress
from fedge.core.hub_round import buffered_version
from fedge.core.rounds import OpenRound, RoundParams
from fedge.core.strategy import Strategy
from fedge.hub.port import HubPort
from fedge.protocol.codec import decode, encode
from fedge.protocol.errors import HubStateError
from fedge.protocol.messages import ModelUpdate

log = logging.getLogger("fedge.hub")

__all__ = ["BufferedRounds", "chain_key", "some"]


class BufferedRounds:
    """The hub's side of buffered rounds: ``aggregator(params, backbone)`` makes the (empty) aggregate a buffer
    folds into (the round runner's, with the strategy's bounds and norm history)."""

    def __init__(self, hub: HubPort, strategy: Strategy,
                 aggregator: Callable[[RoundParams, str], Aggregator]) -> None:
        self.hub = hub
        self.strategy = strategy
        self._aggregator = aggregator

    def buffer(self, params: RoundParams, backbone: str) -> Buffer:
        """A buffered round's next version: an empty buffer over the strategy's aggregate."""
        agg = self._aggregator(params, backbone)
        if params.buffer is None:
            raise HubStateError("a buffer for a round that is not buffered")
        return Buffer(agg.shapes, params.buffer, aggregator=agg)

    def resume(self, rnd: OpenRound) -> None:
        """A buffered round after a restart: its chain as recorded when it made its last version (its attempt and
        spent updates too), the updates accepted since folded into the buffer again (with the staleness they had),
        the others remembered (a spent one as a redelivery only: its slot was released). The chain's meta is written
        in the same store transaction as the version and the update that filled the buffer, so the two agree."""
        store, params = self.hub.store, rnd.params
        if params.buffer is None:
            raise HubStateError(f"round {rnd.id} is not a buffered round")
        saved = json.loads(store.get_meta(chain_key(rnd.id)) or "{}")
        chain = BufferChain.from_meta(params.buffer, saved, rnd.model_version)
        rnd.chain, rnd.model_version = chain, chain.current
        rnd.buffer = self.buffer(params, rnd.backbone_sha256)
        for i, stored in enumerate(store.iter_buffered_updates(rnd.id)):
            msg = decode(stored.payload, max_bytes=max(len(stored.payload), 1))
            if not isinstance(msg, ModelUpdate):
                raise HubStateError(f"round {rnd.id}: the stored update of {stored.device} is a {msg.type}")
            if (msg.device, msg.model_version, msg.nonce) not in chain.spent:  # a spent one holds no slot
                chain.sent[(msg.device, msg.model_version)] = msg.nonce
            rnd.accepted[msg.device] = msg.nonce
            rnd.n_samples += msg.n_samples
            staleness = chain.staleness(msg.model_version)
            if i < chain.folded or staleness is None:
                continue
            chain.pending[msg.device] = msg.model_version
            delta = msg.delta
            if params.compression is not None:
                delta = dict(decompress(delta, rnd.buffer.aggregator.shapes, params.compression))
            rnd.buffer.add(delta, msg.n_samples, staleness)
        log.info("buffered round %d resumed on %s (attempt %d): %d versions made, %d updates in the buffer, "
                 "deadline in %.1f s", rnd.id, chain.current, chain.attempt, len(chain.made), rnd.buffer.count,
                 rnd.deadline - self.hub.clock())

    def accept(self, rnd: OpenRound, msg: ModelUpdate, payload: bytes) -> None:
        """A buffered round's update: stored, folded in with its staleness weight (the caller acks it); a full
        buffer makes the next version (:meth:`make_version`)."""
        hub = self.hub
        attempt = 0 if rnd.chain is None else rnd.chain.attempt
        hub.store.add_buffered_update(msg.round, msg.device, msg.model_version, msg.nonce, msg.n_samples,
                                      msg.metrics, payload, attempt)
        full = rnd.fold(msg.device, msg.model_version, msg.nonce, msg.delta, msg.n_samples)
        log.debug("round %d: update from %s on %s accepted (%d samples)", msg.round, msg.device, msg.model_version,
                  msg.n_samples)
        if full:
            self.make_version(rnd)

    def make_version(self, r: OpenRound) -> None:
        """A buffered round's full buffer: the next version (the core's :func:`buffered_version`), registered,
        deployed (published, the round re-announced on it) unless the held-out gate keeps it back, recorded. A buffer
        that deploys nothing (held back, or not finite) starts the round's next attempt: its devices' slots are
        released and the round re-announced on the same version with the new ``buffer_attempt``."""
        hub, chain, buf = self.hub, r.chain, r.buffer
        if chain is None or buf is None:
            raise HubStateError(f"round {r.id} is not a buffered round")
        parent = chain.current
        deployed = hub.store.version(parent)
        outcome = buffered_version(buf, self.strategy, hub.registry.load_head(parent),
                                   hub.registry.w0(r.backbone_sha256), lambda h: hub.evaluate(r.backbone_sha256, h),
                                   None if deployed is None else deployed.accuracy)
        chain.norms.extend(buf.norms)
        row = None
        if outcome.head is not None:
            row = hub.registry.write_head(outcome.head, parent=parent, round_id=r.id,
                                          backbone_sha256=r.backbone_sha256, accuracy=outcome.accuracy,
                                          loss=outcome.loss)
            hub.store.add_version(row, make_current=outcome.deploy)
        staleness = list(buf.staleness)
        released = r.next_version(None if row is None else row.version, outcome.deploy,
                                  self.buffer(r.params, r.backbone_sha256))
        hub.store.set_meta(chain_key(r.id), json.dumps(chain.to_meta()))
        acc = "-" if outcome.accuracy is None else f"{outcome.accuracy:.4f}"
        if row is None:
            log.error("round %d: buffered version from %d updates: %s", r.id, len(staleness), outcome.detail)
        elif outcome.deploy:
            log.info("round %d: version %s from %d updates (staleness %s) on %s, accuracy %s: deployed", r.id,
                     row.version, len(staleness), staleness, parent, acc)
            hub.publish_model(row)
        else:
            log.warning("round %d: version %s kept as a candidate, not deployed: %s (devices stay on %s)", r.id,
                        row.version, outcome.held_back, parent)
        if not outcome.deploy:
            log.info("round %d: attempt %d on %s: %d devices whose updates were spent may send again %s", r.id,
                     chain.attempt, chain.current, len(released), some(tuple(released)))
        hub.publish(hub.topics.announce, encode(r.announce(hub.cfg.fleet)), retain=True)  # new version or attempt
        if outcome.deploy:
            hub.publish_status()


def chain_key(rid: int) -> str:
    """The store meta key of a buffered round's chain (versions, versions made, updates folded, attempt, spent
    updates: :meth:`BufferChain.to_meta`), for a restart."""
    return f"buffered_chain_{rid}"


def some(names: tuple[str, ...], shown: int = 20) -> str:
    """A list of names for a log line, cut after ``shown`` (a round may select 10,000 devices)."""
    head = ", ".join(names[:shown])
    return f"[{head}{f', ... {len(names) - shown} more' if len(names) > shown else ''}]"
