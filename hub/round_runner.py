"""The hub's federated rounds on the wire: open (the strategy's plan), collect, close (the core's outcome), publish.

Decisions are the round core's (:mod:`fedge.core.strategy`, :mod:`fedge.core.hub_round`, :mod:`fedge.core.validate`);
this driver persists them (one SQLite transaction per step: a round and its ledger charge, an accepted update
before its ack, a close), publishes them and keeps the ``chain_rounds`` chain. Runs on the daemon's worker thread.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable, Mapping
from collections.abc import Set as AbstractSet

import numpy as np

from fedge.core.aggregators import Aggregator
from fedge.core.buffered import BufferChain
from fedge.core.compress import decompress
from fedge.core.hub_round import close_round, for_devices, min_inputs
from fedge.core.privacy import DpParams, ledger_epsilon
from fedge.core.rounds import OpenRound, RoundParams
from fedge.core.secagg_round import SecAggCoordinator
from fedge.core.strategy import PlanContext, Refusal, Strategy
from fedge.core.validate import Accept, Rejection, UpdateContext, validate_update
from fedge.hub import conduct, progress, secagg_daemon
from fedge.hub.port import HubPort
from fedge.hub.round_buffered import BufferedRounds, some
from fedge.hub.round_chain import RoundChain
from fedge.hub.round_result import close_detail, note_progress, publish_result, round_result
from fedge.hub.store import LedgerRow, VersionRow
from fedge.protocol.codec import decode, decode_control, encode
from fedge.protocol.control import ReplyReason
from fedge.protocol.errors import HubStateError
from fedge.protocol.messages import (
    Ack,
    Decline,
    ModelUpdate,
    Reject,
    RejectReason,
    RoundOverrides,
    RoundStatus,
)
from fedge.protocol.topics import valid_id

log = logging.getLogger("fedge.hub")

__all__ = ["RoundRunner"]


class RoundRunner(RoundChain):
    """The one federated round at a time: ``round`` is the open one (None: none)."""

    def __init__(self, hub: HubPort, strategy: Strategy, rng: np.random.Generator,
                 open_gate: Callable[[OpenRound, VersionRow, Mapping[str, float]], None] | None = None) -> None:
        self.hub = hub
        self.open_gate = open_gate  # the federated gate's evaluation round (the selector's)
        self.strategy = strategy
        self.rng = rng
        self.round: OpenRound | None = None
        self.budget_exhausted = False
        self.buffered = BufferedRounds(hub, strategy, self.aggregator)
        super().__init__(hub)

    # -- opening --------------------------------------------------------------------------------------------
    def epsilon_spent(self, extra: DpParams | None = None) -> float:
        """The fleet's epsilon at the configured delta over every DP round in the ledger (plus ``extra``)."""
        privacy = self.hub.cfg.privacy
        return ledger_epsilon(self.hub.store.ledger(), privacy.delta, extra, amplification=privacy.amplification)

    def aggregator(self, params: RoundParams, backbone: str) -> Aggregator:
        shapes = {k: s for k, (s, _) in self.hub.head_spec(backbone).items()}
        # the norm history is read when the round opens (or resumes): fixed for the round
        history = self.hub.store.recent_update_norms(self.hub.cfg.aggregation.norm_window)
        return self.strategy.aggregator(params, shapes, history, self.rng)

    def start(self, overrides: RoundOverrides) -> tuple[int | None, ReplyReason, str]:
        """Open a round: ``(round id, "started", "")``, or ``(None, reason, detail)`` when none was opened."""
        hub = self.hub
        fleet = hub.fleet_view()
        if not fleet.candidates:
            log.warning("no round started: no known online device")
            return None, ReplyReason.NO_DEVICES, "no known online device to select"
        cur = hub.current()
        hub.publish_model(cur)  # e.g. after `fedge hub rollback` (a no-op when it is already the one published)
        rid = hub.store.next_round_id()
        params = RoundParams.make(hub.cfg.rounds, overrides)
        now = hub.clock()
        l2 = hub.store.get_meta(secagg_daemon.SECAGG_L2_KEY)
        ctx = PlanContext(hub.cfg.fleet, rid, self.rng, _entropy, self.epsilon_spent,
                          None if l2 is None else float(l2))
        plan = self.strategy.configure(fleet, params, ctx)
        if isinstance(plan, Refusal):
            if plan.budget_exhausted:
                self.budget_exhausted = True
            if plan.status is not None:
                self._unannounced(rid, plan.status, cur, params, now, plan.detail)
            return None, plan.reason, plan.detail
        params, selected = plan.params, plan.selected
        ledger = None
        if plan.charge is not None:
            c = plan.charge
            ledger = LedgerRow(rid, c.params.mode, c.params.noise_multiplier, c.params.clip, c.params.sample_rate,
                               c.amplified, c.cohort, c.expected_cohort, c.epsilon_after, hub.cfg.privacy.delta, now)
        agg = self.aggregator(params, cur.backbone_sha256)
        rnd = OpenRound(rid, cur.version, cur.backbone_sha256, params, selected, now, now + params.deadline_s, agg,
                        offline_grace_s=hub.cfg.rounds.offline_grace_s)
        if params.buffer is not None:
            rnd.buffer = self.buffered.buffer(params, cur.backbone_sha256)
        if params.secagg is not None:
            dp = params.dp
            rnd.secagg = SecAggCoordinator(
                hub.cfg.fleet, rid, params.secagg, selected, sum(math.prod(s) for s in agg.shapes.values()), now,
                rnd.deadline, lambda device, frame: hub.publish(hub.topics.secagg_inbox(device), frame),
                min_inputs=min_inputs(params), target=params.target, dp_clip=0.0 if dp is None else dp.clip,
                noise_std=0.0 if dp is None else dp.device_noise_std())
        # the ledger entry and the round are one transaction: a crash leaves both or neither
        hub.store.open_round(rid, cur.version, cur.backbone_sha256, params.to_dict(), selected, now, rnd.deadline,
                             ledger)
        self.round = rnd
        hub.publish(hub.topics.announce, encode(rnd.announce(hub.cfg.fleet)), retain=True)
        hub.publish_status()
        eps = "" if ledger is None else f", {ledger.mode} DP, epsilon after it {ledger.epsilon:.3f}"
        log.info("round %d open: model %s, %d selected %s, quorum %d, deadline %.0f s%s", rid, cur.version,
                 len(selected), some(selected), params.min_devices, params.deadline_s, eps)
        return rid, ReplyReason.STARTED, ""

    def resume(self) -> None:
        """Re-open the round the store says is open, its accepted updates re-added."""
        store = self.hub.store
        rows = store.open_rounds()
        if not rows:
            return
        row = rows[-1]
        params = RoundParams.from_dict(row.params)
        agg = self.aggregator(params, row.backbone_sha256)
        # a round opened before [limits] were lowered still ends within them
        deadline = min(row.deadline, row.opened_at + self.hub.cfg.limits.max_deadline_s)
        rnd = OpenRound(row.id, row.model_version, row.backbone_sha256, params, row.selected, row.opened_at, deadline,
                        agg, offline_grace_s=self.hub.cfg.rounds.offline_grace_s)
        rnd.declined.update(store.declines(row.id))
        if params.buffer is not None:
            self.buffered.resume(rnd)
            self.round = rnd
            return
        # a SecAgg round's stage state (and the devices' secrets) was in memory: rnd.secagg stays None and the
        # first tick closes it as failed
        for stored in store.iter_updates(row.id):
            msg = decode(stored.payload, max_bytes=max(len(stored.payload), 1))
            if not isinstance(msg, ModelUpdate):
                raise HubStateError(f"round {row.id}: the stored update of {stored.device} is a {msg.type}")
            delta = msg.delta
            if params.compression is not None:  # stored as received: decoded again, as when it was accepted
                delta = dict(decompress(delta, agg.shapes, params.compression))
            agg.add(delta, msg.n_samples)
            rnd.accepted[stored.device] = stored.nonce
            rnd.n_samples += stored.n_samples
        self.round = rnd
        log.info("round %d resumed: %d updates, deadline in %.1f s", rnd.id, len(rnd.accepted),
                 rnd.deadline - self.hub.clock())

    def _unannounced(self, rid: int, status: RoundStatus, cur: VersionRow, params: RoundParams, now: float,
                     detail: str) -> None:
        """Record (one transaction) and publish a round decided before it was announced; stops a chain."""
        hub = self.hub
        hub.store.record_unopened_round(rid, str(status), cur.version, cur.backbone_sha256, params.to_dict(), now,
                                        detail)
        self.end_chain()
        hub.rounds_jsonl({"round": rid, "status": str(status), "detail": detail, "devices": 0})
        publish_result(self.hub, rid)
        log.warning("round %d %s: %s", rid, status, detail)

    # -- messages ---------------------------------------------------------------------------------------------
    def _context(self, r: OpenRound | None, known: AbstractSet[str]) -> UpdateContext:
        # no copies (issue 22): the sets and maps are the live ones, read while this update is validated; copying
        # them for every update made a round of n devices cost O(n^2)
        spec = self.hub.head_spec(r.backbone_sha256) if r else {}
        return UpdateContext(
            fleet=self.hub.cfg.fleet, known_devices=known, round_id=r.id if r else None,
            model_version=r.model_version if r else None, selected=r.selected_set if r else frozenset(),
            accepted=r.accepted if r else {}, head_spec=spec,
            max_update_bytes=self.hub.cfg.rounds.max_update_bytes,
            private=r is not None and r.params.dp is not None, declined=r.declined.keys() if r else frozenset(),
            compression=r.params.compression if r else None,
            registered_samples=self.hub.store.registered_sample, chain=r.chain if r else None,
        )

    def handle_update(self, device: str | None, topic: str, payload: bytes, known: AbstractSet[str]) -> None:
        hub = self.hub
        rnd = self.round
        if rnd is not None and rnd.params.secagg is not None:  # an old agent, or a device skipping the masking
            self.reject(Rejection(RejectReason.WRONG_TYPE, f"round {rnd.id} is a secure-aggregation round: stage "
                                  "frames go to secagg/<device>, never a plain update", rnd.id, device), topic)
            return
        verdict = validate_update(device, payload, self._context(rnd, known))
        if isinstance(verdict, Rejection):
            self.reject(verdict, topic)
            return
        if rnd is None:  # validate_update accepts only for the open round it was given
            raise HubStateError(f"update on {topic} passed validation with no open round")
        msg = verdict.update
        if isinstance(verdict, Accept) and rnd.chain is not None:
            self.buffered.accept(rnd, msg, payload)
        elif isinstance(verdict, Accept):
            hub.store.add_update(msg.round, msg.device, msg.nonce, msg.n_samples, msg.metrics, payload)
            rnd.aggregator.add(msg.delta, msg.n_samples)
            rnd.accepted[msg.device] = msg.nonce
            rnd.n_samples += msg.n_samples
            # debug (issue 22): one line per update is most of a 10,000-device round's logging; the close says it all
            log.debug("round %d: update from %s accepted (%d samples, %d/%d)", msg.round, msg.device, msg.n_samples,
                      len(rnd.accepted), len(rnd.selected))
        else:
            log.info("round %d: redelivered update from %s re-acked", msg.round, msg.device)
        ack = Ack(fleet=hub.cfg.fleet, round=msg.round, device=msg.device, ref_nonce=msg.nonce)
        hub.publish(hub.topics.ack(msg.device), encode(ack))
        if rnd.should_close(hub.clock()):
            self.close(rnd)

    def reject(self, v: Rejection, topic: str) -> None:
        hub = self.hub
        hub.store.add_reject(self.round.id if self.round else None, v.device or topic, str(v.reason), v.detail)
        log.warning("update on %s rejected: %s (%s)", topic, v.reason, v.detail)
        if v.device is not None and valid_id(v.device):
            ref = v.update.nonce if v.update is not None else None
            rej = Reject(fleet=hub.cfg.fleet, round=v.round, device=v.device, reason=v.reason, detail=v.detail,
                         ref_nonce=ref)
            hub.publish(hub.topics.reject(v.device), encode(rej))

    def handle_decline(self, msg: Decline, ignore: Callable[[RejectReason, str], None]) -> None:
        rnd = self.round
        if rnd is None or msg.round != rnd.id:
            ignore(RejectReason.STALE_ROUND, f"decline of round {msg.round}; open round: {rnd.id if rnd else None}")
            return
        if msg.device not in rnd.selected:
            ignore(RejectReason.NOT_SELECTED, f"{msg.device} was not selected for round {rnd.id}")
            return
        if msg.device in rnd.accepted or msg.device in rnd.declined:
            return  # redelivery, or a decline after its update: the update stands
        self.hub.store.add_decline(rnd.id, msg.device, str(msg.reason), msg.detail)
        rnd.declined[msg.device] = str(msg.reason)
        log.info("round %d: %s declined (%s: %s)", rnd.id, msg.device, msg.reason, msg.detail)
        self.maybe_close(rnd)

    def device_offline(self, device: str, online: bool, was_online: bool) -> None:
        rnd = self.round
        if rnd is None:
            return
        if online:
            rnd.offline.pop(device, None)  # back before the round closed: its update is awaited again
        elif was_online and rnd.went_offline(device, self.hub.clock()):
            log.warning("round %d: selected device %s went offline without answering: counted as failed unless "
                        "back within %g s", rnd.id, device, rnd.offline_grace_s)
            self.maybe_close(rnd)

    # -- closing ----------------------------------------------------------------------------------------------
    def maybe_close(self, rnd: OpenRound) -> None:
        """Close ``rnd`` if it is due (a SecAgg round: move its stages on, and close it once the sum is there)."""
        if rnd.params.secagg is not None:
            secagg_daemon.step(self.hub, self, rnd)
        elif rnd.should_close(self.hub.clock()):
            self.close(rnd)

    def tick(self, now: float) -> None:
        rnd = self.round
        if rnd is None:
            return
        try:
            self.maybe_close(rnd)
        except Exception as exc:  # a round whose deadline passed always closes: as failed, if not otherwise
            log.exception("round %d: closing failed", rnd.id)
            if self.round is rnd:
                self.end(rnd, RoundStatus.FAILED_QUORUM, f"closing the round failed: {exc}")

    def close(self, r: OpenRound) -> None:
        """Aggregate, score and gate ``r`` (the core's :func:`close_round`), then record and publish the outcome."""
        if r.chain is not None:
            self._close_buffered(r, r.chain)
            return
        hub = self.hub
        now = hub.clock()
        deployed = hub.store.version(r.model_version)
        metrics = hub.store.update_metrics(r.id) if r.params.dp is None else []
        outcome = close_round(r, self.strategy, hub.registry.load_head(r.model_version),
                              hub.registry.w0(r.backbone_sha256), lambda h: hub.evaluate(r.backbone_sha256, h),
                              None if deployed is None else deployed.accuracy, metrics)
        if r.aggregator.summary is not None:
            b = r.aggregator.summary
            log.info("round %d: %s, norm bound %.4g (%d of %d updates clipped), weight cap %s (%d capped)", r.id,
                     r.aggregator.name, b.norm_bound, b.clipped, r.aggregator.count,
                     "-" if b.weight_cap is None else f"{b.weight_cap:g}", b.capped)
        row = None if outcome.head is None else hub.registry.write_head(
            outcome.head, parent=r.model_version, round_id=r.id, backbone_sha256=r.backbone_sha256,
            accuracy=outcome.accuracy, loss=outcome.loss)
        detail = close_detail(self.hub.store.next_round_id(), r, outcome, row)
        if detail is not None:
            (log.warning if row is not None else log.error)("round %d: %s", r.id, detail)
            hub.store.set_round_detail(r.id, detail)
        if outcome.federated:
            hub.store.set_round_metrics(r.id, outcome.federated)
        note_progress(self.hub, self.strategy, r, outcome, self.open_gate is not None)
        rejected = sum(hub.store.reject_counts(r.id).values())
        devices = tuple(sorted(r.accepted))
        gating = outcome.federated_gate and row is not None and self.open_gate is not None
        hub.store.close_round(r.id, str(outcome.status), now, outcome.accuracy, outcome.loss, devices, r.n_samples,
                              rejected, row, make_current=outcome.deploy,
                              gate_round=hub.store.next_round_id() if gating else None)
        self.round = None
        self._account(r, now)
        if self.strategy.keeps_norms(r.params) and r.aggregator.norms:  # the "auto" norm bound's history
            hub.store.add_update_norms(r.id, r.aggregator.norms, hub.cfg.aggregation.norm_window)
        s = r.aggregator.summary
        hub.rounds_jsonl({
            "round": r.id, "status": str(outcome.status), "devices": len(devices), "n_samples": r.n_samples,
            "accuracy": outcome.accuracy, "loss": outcome.loss, "seconds": round(now - r.opened_at, 3),
            "model_version": None if row is None else row.version, "rejected": rejected,
            "federated": outcome.federated,
            **({} if s is None else {"norm_bound": s.norm_bound, "clipped": s.clipped, "weight_cap": s.weight_cap,
                                     "capped": s.capped}),
        })
        log.info("round %d %s: %d/%d devices, %d samples, %d rejected, accuracy %s, model %s, %.2f s", r.id,
                 outcome.status, len(devices), len(r.selected), r.n_samples, rejected,
                 "-" if outcome.accuracy is None else f"{outcome.accuracy:.4f}", "-" if row is None else row.version,
                 now - r.opened_at)
        result = round_result(self.hub.store, self.hub.cfg.fleet, r.id)
        frames = encode(result), encode(for_devices(result))  # if they cannot encode, nothing goes out
        if row is not None and outcome.deploy:
            hub.publish_model(row)
        publish_result(self.hub, r.id, frames)
        hub.publish(hub.topics.announce, b"", retain=True)
        hub.publish_status()
        if gating and row is not None and self.open_gate is not None:
            self.open_gate(r, row, outcome.federated)  # the chain goes on once the evaluation round closes
            return
        self.continue_chain()

    def _close_buffered(self, r: OpenRound, chain: BufferChain) -> None:
        """Close a buffered round: its versions are made (and deployed) already; updates in the unfilled buffer
        do not count. The round's version is the last it deployed (else the last it made, a candidate)."""
        hub = self.hub
        now = hub.clock()
        left = 0 if r.buffer is None else r.buffer.count
        deployed = chain.versions[1:]
        last = deployed[-1] if deployed else chain.made[-1] if chain.made else None
        row = None if last is None else hub.store.version(last)
        status = RoundStatus.COMPLETED if row is not None else RoundStatus.FAILED_QUORUM
        detail = (f"buffered round: {len(chain.made)} versions made ({', '.join(chain.made) or 'none'}), "
                  f"{len(deployed)} deployed; {left} updates in the unfilled buffer not counted")
        hub.store.set_round_detail(r.id, detail)
        progress.note(hub.store, r.id, bool(deployed), "no version deployed")
        rejected = sum(hub.store.reject_counts(r.id).values())
        devices = tuple(sorted(r.accepted))
        acc, loss = (None, None) if row is None else (row.accuracy, row.loss)
        hub.store.close_round(r.id, str(status), now, acc, loss, devices, r.n_samples, rejected, row,
                              make_current=bool(deployed), recorded=True)
        self.round = None
        self._account(r, now)
        if self.strategy.keeps_norms(r.params) and chain.norms:
            hub.store.add_update_norms(r.id, chain.norms, hub.cfg.aggregation.norm_window)
        hub.rounds_jsonl({
            "round": r.id, "status": str(status), "devices": len(devices), "n_samples": r.n_samples,
            "accuracy": acc, "loss": loss, "seconds": round(now - r.opened_at, 3),
            "model_version": None if row is None else row.version, "rejected": rejected, "federated": {},
            "versions": chain.made, "deployed": deployed, "unfolded": left,
        })
        log.info("round %d %s: %s; %d devices, %d samples, %d rejected, %.2f s", r.id, status, detail, len(devices),
                 r.n_samples, rejected, now - r.opened_at)
        publish_result(self.hub, r.id)
        hub.publish(hub.topics.announce, b"", retain=True)
        hub.publish_status()
        self.continue_chain()

    def _account(self, r: OpenRound, now: float) -> None:
        """Who answered ``r`` (selection weights), and strikes for devices that stalled it: a plain round that ran
        to its deadline waited for selected devices that stayed online and silent."""
        answered = set(r.accepted) | set(r.declined)
        stalled: set[str] = set()
        if r.params.secagg is None and now >= r.deadline and r.target_at is None:
            stalled = (set(r.selected) - answered - r.failed_offline(now)) & self.hub.online()
        conduct.account(self.hub, r.id, r.selected, answered, set(r.accepted), sorted(stalled))

    def cancel(self, r: OpenRound, reason: str) -> None:
        """Close ``r`` as ``cancelled``: nothing aggregated, no new version (a buffered round's deployed versions
        stay), a chain ends. A DP round keeps its ledger
        entry: it was announced, so devices may already have trained and sent (noised) updates."""
        detail = f"cancelled by the operator: {reason or 'no reason given'}"
        if r.params.dp is not None:
            detail += ("; its privacy charge stays in the ledger (the round was announced: devices may have trained "
                       "and sent updates)")
        self.end(r, RoundStatus.CANCELLED, detail)

    def end(self, r: OpenRound, status: RoundStatus, detail: str) -> None:
        """Close ``r`` without aggregating (no new version) with ``detail``; publish its result; a chain ends. A
        buffered round's versions deployed before it ended stay deployed: the round's row and result name the last
        of them, and ``detail`` says so (its unfilled buffer is dropped)."""
        hub = self.hub
        now = hub.clock()
        chain = r.chain
        deployed = [] if chain is None else chain.versions[1:]
        row = hub.store.version(deployed[-1]) if deployed else None
        if row is not None and chain is not None:
            detail += (f"; its {len(deployed)} deployed versions ({', '.join(deployed)}) stay deployed: the round's "
                       f"version is {row.version}")
        hub.store.set_round_detail(r.id, detail)
        rejected = sum(hub.store.reject_counts(r.id).values())
        devices = tuple(sorted(r.accepted))
        acc, loss = (None, None) if row is None else (row.accuracy, row.loss)
        hub.store.close_round(r.id, str(status), now, acc, loss, devices, r.n_samples, rejected, row,
                              make_current=row is not None, recorded=True)
        self.round = None
        if status is not RoundStatus.CANCELLED and r.params.secagg is None:  # SecAgg: secagg_daemon accounts
            self._account(r, now)
        if chain is not None and chain.norms and self.strategy.keeps_norms(r.params):  # the folded updates'
            hub.store.add_update_norms(r.id, chain.norms, hub.cfg.aggregation.norm_window)
        self.end_chain()
        hub.rounds_jsonl({"round": r.id, "status": str(status), "devices": len(devices),
                          "n_samples": r.n_samples, "seconds": round(now - r.opened_at, 3), "detail": detail,
                          **({} if chain is None else {"model_version": None if row is None else row.version,
                                                        "versions": chain.made, "deployed": deployed})})
        log.warning("round %d %s: %s", r.id, status, detail)
        publish_result(self.hub, r.id)
        hub.publish(hub.topics.announce, b"", retain=True)
        hub.publish_status()

    def continue_chain(self) -> None:
        queued = self.hub.store.get_meta("queued_start")
        if queued:
            self.drop_queued()
            overrides = decode_control(queued.encode())
            self.set_chain(max(self.hub.cfg.schedule.chain_rounds - 1, 0), overrides)
            rid = self.hub.store.next_round_id()  # the id its start was promised
            opened, reason, detail = self.start(overrides)
            if opened is None:
                self.end_chain()
                if self.hub.store.round(rid) is None:  # the promise is kept: that id has a result saying why not
                    cur = self.hub.current()
                    self._unannounced(rid, RoundStatus.FAILED_QUORUM, cur, RoundParams.make(self.hub.cfg.rounds,
                                                                                            overrides),
                                      self.hub.clock(), f"the queued start could not open: {reason}: {detail}")
            return
        if self._chain_left > 0:
            self.set_chain(self._chain_left - 1, self._chain_overrides)
            if self.start(self._chain_overrides)[0] is None:  # nobody to ask: the chain ends here
                self.end_chain()


def _entropy(n: int) -> bytes:
    return os.urandom(n)  # the public SecAgg seed: nobody should be able to choose the masking graph

