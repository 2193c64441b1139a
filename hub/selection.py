"""Source-model selection rounds on the hub: announce candidates, collect metrics-only reports, rank, deploy.

A selection round (PROTOCOL.md, "Selection rounds") shares round ids with the federated rounds and never runs
beside one. The hub publishes each candidate's full artifacts (retained, on ``model/candidate/<name>``, one
model encoded at a time) and the announce on ``round/select``; every selected device fine-tunes a fresh head
(the candidate's w0) briefly on its training split per candidate and reports only its validation scores. The
hub ranks candidates by validation-size-weighted accuracy (a device that could not score a candidate counts as
accuracy 0 for it), records ranking and choice in the store, and deploys the winner as a new version over its
backbone: that version is the new w0 of later rounds. Under DP a selection round is refused: its scores
describe the devices' data and are not accounted.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from fedge.core.rounds import OpenRound, RoundParams, over_limits, select_devices
from fedge.core.selection import CandidateScore, gate_verdict, history_problem, rank, report_problem
from fedge.hub import progress
from fedge.hub.port import HubPort
from fedge.hub.store import SelectionRow, Store, VersionRow
from fedge.protocol.codec import decode, encode
from fedge.protocol.control import ReplyReason, request_id_of
from fedge.protocol.errors import DecodeError
from fedge.protocol.manifest import load_head
from fedge.protocol.messages import (
    Decline,
    ModelUpdate,
    Reject,
    RejectReason,
    RoundAnnounce,
    RoundResult,
    RoundStatus,
)
from fedge.protocol.selection import SelectRequest, acc_key, decode_select_control, loss_key

log = logging.getLogger("fedge.hub")

MAX_REPORT_BYTES = 1 << 16


@dataclass
class OpenSelection:
    """The selection round in progress: candidates (name -> backbone sha256), who was asked, who answered."""

    id: int
    model_version: str
    backbone_sha256: str
    candidates: dict[str, str]
    selected: tuple[str, ...]
    params: RoundParams
    opened_at: float
    deadline: float
    reports: dict[str, dict[str, float]] = field(default_factory=dict)
    nonces: dict[str, str] = field(default_factory=dict)
    declined: dict[str, str] = field(default_factory=dict)
    gate: dict[str, Any] | None = None  # an evaluation round: {"version", "baseline", "source_round"}
    contradicted: set[str] = field(default_factory=set)  # devices whose report contradicted their round's update

    def announce(self, fleet: str) -> RoundAnnounce:
        return RoundAnnounce(
            fleet=fleet, round=self.id, model_version=self.model_version, backbone_sha256=self.backbone_sha256,
            deadline=self.deadline, min_devices=self.params.min_devices, selected=self.selected,
            local_epochs=self.params.local_epochs, lr=self.params.lr,
            candidates=tuple(self.candidates), candidate_backbones=tuple(self.candidates.values()))

    def should_close(self, now: float) -> bool:
        return now >= self.deadline or set(self.selected) <= set(self.reports) | set(self.declined) | self.contradicted


class Selector:
    """The hub's selection rounds; every method runs on the daemon's worker thread."""

    def __init__(self, hub: HubPort) -> None:
        self.hub = hub
        self.open: OpenSelection | None = None

    @property
    def store(self) -> Store:
        return self.hub.store

    def resume(self) -> None:
        """Re-open a selection round the store says is open (its reports included); its deadline still holds,
        within today's ``[limits] max_deadline_s``."""
        for row in self.store.selections():
            if row.status == "open":
                cur = self.store.version(row.model_version)
                sel = OpenSelection(row.round, row.model_version, "" if cur is None else cur.backbone_sha256,
                                    row.candidates, row.selected, RoundParams.from_dict(row.params), row.opened_at,
                                    min(row.deadline, row.opened_at + self.hub.cfg.limits.max_deadline_s),
                                    gate=row.params.get("gate"))
                for device, (nonce, metrics) in self.store.selection_reports(row.round).items():
                    sel.reports[device], sel.nonces[device] = metrics, nonce
                sel.declined.update(self.store.declines(row.round))
                self.open = sel
                log.info("selection round %d resumed: %d reports", sel.id, len(sel.reports))

    # -- control ---------------------------------------------------------------------------------
    def handle_control(self, payload: bytes) -> None:
        """``control/round/select``: start a selection round, or say why not (on control/round/reply)."""
        try:
            req = decode_select_control(payload)
        except DecodeError as exc:
            self._refuse(request_id_of(payload), str(exc.reason), exc.detail)
            return
        rid, reason, detail = self.start(req)
        if rid is None:
            self._refuse(req.overrides.request_id, reason, detail)
        else:
            self.hub.reply(req.overrides.request_id, rid, reason, detail)

    def _refuse(self, request_id: str | None, reason: str, detail: str) -> None:
        self.store.add_control(reason, f"select: {detail}")
        log.warning("selection round refused (%s): %s", reason, detail)
        self.hub.reply(request_id, None, reason, detail)

    def start(self, req: SelectRequest) -> tuple[int | None, str, str]:
        """Open a selection round: ``(round id, "started", "")`` or ``(None, reason, detail)``."""
        hub = self.hub
        if hub.cfg.privacy.enabled:
            return None, ReplyReason.DP_NOT_SUPPORTED, (
                "selection rounds report validation scores in the clear, which a fleet under [privacy] does not allow "
                "(PROTOCOL.md, Selection rounds)")
        busy = hub.busy_round()
        if busy is not None:
            return None, ReplyReason.ROUND_OPEN, f"round {busy} is open"
        excess = over_limits(req.overrides, hub.cfg.limits)
        if excess is not None:
            return None, ReplyReason.OVER_LIMITS, excess
        registered = self.store.candidates()
        names = req.candidates or tuple(registered)
        unknown = [n for n in names if n not in registered]
        if unknown:
            return None, ReplyReason.UNKNOWN_CANDIDATE, (f"not registered: {', '.join(unknown)} (known: "
                                               f"{', '.join(registered) or 'none'}; fedge hub models add)")
        if not names:
            return None, ReplyReason.NO_CANDIDATES, "no candidate models registered (fedge hub models add NAME DIR)"
        devices = hub.candidates()
        if not devices:
            return None, ReplyReason.NO_DEVICES, "no known online device to select"
        cur = hub.current()
        rid = self.store.next_round_id()
        params = RoundParams.make(hub.cfg.rounds, req.overrides)
        selected = select_devices(devices, params.fraction, params.min_devices, hub.cfg.rounds.seed, rid)
        now = hub.clock()
        cands = {n: registered[n] for n in names}
        sel = OpenSelection(rid, cur.version, cur.backbone_sha256, cands, selected, params, now,
                            now + params.deadline_s)
        self.store.open_selection(rid, cur.version, cands, selected, params.to_dict(), now, sel.deadline)
        self.open = sel
        self.republish()
        log.info("selection round %d open: candidates %s, %d selected %s, quorum %d, deadline %.0f s", rid,
                 list(cands), len(selected), list(selected), params.min_devices, params.deadline_s)
        return rid, ReplyReason.STARTED, ""

    def republish(self) -> None:
        """Publish the open selection round's candidates and announce (retained): when it opens, and again after
        a reconnect (a broker restarted without persistence lost them)."""
        sel, hub = self.open, self.hub
        if sel is None:
            return
        if sel.gate is not None:  # an evaluation round: the heads it compares, over a backbone the devices hold
            for name in sel.candidates:
                row = self.store.version(name)
                if row is not None:
                    hub.publish(hub.topics.candidate(row.version),
                                encode(hub.registry.model_head(hub.cfg.fleet, row)), retain=True)
        else:
            for name, sha in sel.candidates.items():  # one model in memory at a time
                full = hub.registry.model_full(hub.cfg.fleet, sha)
                hub.publish(hub.topics.candidate(name), encode(full), retain=True)
        hub.publish(hub.topics.select_announce, encode(sel.announce(hub.cfg.fleet)), retain=True)

    # -- the federated deploy gate: an evaluation round ---------------------------------------------
    def start_gate(self, r: OpenRound, row: VersionRow, federated: Mapping[str, float]) -> None:
        """Open the evaluation round of ``row``: the round's contributors score its head *and the deployed head* on
        their validation split as is (``local_epochs`` 0; both heads published on ``model/candidate/<version>``), so
        the two are compared on the same rows with the same weights."""
        hub = self.hub
        rid = self.store.next_round_id()
        now = hub.clock()
        params = replace(r.params, local_epochs=0, min_devices=min(r.params.min_devices, len(r.accepted)))
        cur = hub.current()
        gate = {"version": row.version, "deployed": cur.version, "baseline": federated["val_acc_global"],
                "source_round": r.id, "round_model": r.model_version}
        compared = {row.version: row.backbone_sha256, cur.version: cur.backbone_sha256}
        sel = OpenSelection(rid, cur.version, cur.backbone_sha256, compared,
                            tuple(sorted(r.accepted)), params, now, now + params.deadline_s, gate=gate)
        self.store.open_selection(rid, cur.version, sel.candidates, sel.selected, {**params.to_dict(), "gate": gate},
                                  now, sel.deadline)
        self.open = sel
        self.republish()
        log.info("evaluation round %d open: %s validated by %s", rid, row.version, list(sel.selected))

    def _close_gate(self, sel: OpenSelection, gate: dict[str, Any]) -> tuple[bool, str, VersionRow | None]:
        """Deploy the validated version when it is not worse than the deployed head by more than the tolerance:
        ``(quorum reached, detail, the deployed row or None)``."""
        agg = self.hub.cfg.aggregation
        version = str(gate["version"])
        verdict = gate_verdict(version, str(gate.get("deployed", "")), sel.reports.values(), sel.params.min_devices,
                               agg.deploy_tolerance, agg.max_weight_ratio)
        row = self.hub.registry.make_current(version) if verdict.deploy else None  # the held-back candidate
        return verdict.quorum, verdict.detail, row

    # -- reports and declines ----------------------------------------------------------------------
    def handle_report(self, topic: str, payload: bytes) -> None:
        hub = self.hub
        device = hub.topics.device_of(topic)
        sel = self.open
        rid = None if sel is None else sel.id
        try:
            msg = decode(payload, max_bytes=MAX_REPORT_BYTES)
        except DecodeError as exc:
            self._reject(rid, device, RejectReason(exc.reason), exc.detail, topic, None)
            return
        if not isinstance(msg, ModelUpdate):
            return self._reject(rid, device, RejectReason.WRONG_TYPE, f"expected an update on {topic}", topic, None)
        nonce = msg.nonce
        if msg.device != device or msg.fleet != hub.cfg.fleet:
            return self._reject(rid, device, RejectReason.DEVICE_MISMATCH,
                                f"report of {msg.device!r} in {msg.fleet!r} on {topic}", topic, nonce)
        if sel is None:
            return self._reject(rid, device, RejectReason.NO_OPEN_ROUND, "no selection round is open", topic, nonce)
        if msg.round != sel.id:
            return self._reject(rid, device, RejectReason.STALE_ROUND,
                                f"report for round {msg.round}; open selection round: {sel.id}", topic, nonce)
        if msg.device not in sel.selected:
            return self._reject(rid, device, RejectReason.NOT_SELECTED,
                                f"{msg.device} was not selected for selection round {sel.id}", topic, nonce)
        if msg.delta:
            return self._reject(rid, device, RejectReason.MALFORMED, "a selection report carries no arrays", topic,
                                nonce)
        problem = report_problem(msg.metrics, sel.candidates)
        lying = False
        if problem is None and sel.gate is not None:
            problem = self._contradiction(msg.device, msg.metrics, sel.gate)
            lying = problem is not None
        if problem is not None:
            self._reject(rid, device, RejectReason.MALFORMED, problem, topic, nonce)
            if lying:  # the round does not wait for it (a consistent report it sends before the close still counts)
                sel.contradicted.add(msg.device)
                if sel.should_close(hub.clock()):
                    self.close(sel)
            return None
        if msg.device in sel.nonces and sel.nonces[msg.device] != nonce:
            return self._reject(rid, device, RejectReason.DUPLICATE,
                                f"{msg.device} already reported for selection round {sel.id}", topic, nonce)
        if msg.device not in sel.nonces:
            keep = {k: v for k, v in msg.metrics.items()
                    if k == "val_n" or k in {f(n) for n in sel.candidates for f in (acc_key, loss_key)}}
            self.store.add_selection_report(sel.id, msg.device, nonce, keep)
            sel.reports[msg.device], sel.nonces[msg.device] = keep, nonce
            log.info("selection round %d: report from %s (%d validation rows, %d/%d)", sel.id, msg.device,
                     int(keep["val_n"]), len(sel.reports), len(sel.selected))
        if sel.should_close(hub.clock()):
            self.close(sel)

    def _contradiction(self, device: str, metrics: Mapping[str, float], gate: Mapping[str, Any]) -> str | None:
        """Why an evaluation-round report contradicts the device's update in the round that made the version
        (None: it does not): more validation rows than it had then, or no score, or one more than a row off, for the
        deployed head, which it scored on the same rows at the start of that round (``val_acc_global``) when that
        round trained it (:func:`~fedge.core.selection.history_problem`)."""
        earlier = self.store.device_update_metrics(int(gate["source_round"]), device)
        deployed = str(gate.get("deployed", ""))
        same = {acc_key(deployed): "val_acc_global"} if gate.get("round_model") == deployed else {}
        problem = history_problem(metrics, earlier, same)
        return None if problem is None else f"contradicts its update in round {gate['source_round']}: {problem}"

    def _reject(self, rid: int | None, device: str | None, reason: RejectReason, detail: str, topic: str,
                nonce: str | None) -> None:
        self.store.add_reject(rid, device or topic, str(reason), f"selection report: {detail}")
        log.warning("selection report on %s rejected: %s (%s)", topic, reason, detail)
        if device is not None:
            rej = Reject(fleet=self.hub.cfg.fleet, round=rid, device=device, reason=reason, detail=detail,
                         ref_nonce=nonce)
            self.hub.publish(self.hub.topics.reject(device), encode(rej))

    def handle_decline(self, msg: Decline) -> bool:
        """Take a decline of the open selection round (True), or leave it to the federated round (False)."""
        sel = self.open
        if sel is None or msg.round != sel.id:
            return False
        if msg.device not in sel.selected or msg.device in sel.reports or msg.device in sel.declined:
            return True
        self.store.add_decline(sel.id, msg.device, str(msg.reason), msg.detail)
        sel.declined[msg.device] = str(msg.reason)
        log.info("selection round %d: %s declined (%s)", sel.id, msg.device, msg.reason)
        if sel.should_close(self.hub.clock()):
            self.close(sel)
        return True

    def tick(self, now: float) -> None:
        if self.open is not None and self.open.should_close(now):
            self.close(self.open)

    # -- closing ---------------------------------------------------------------------------------
    def cancel_open(self, round_id: int | None, reason: str) -> tuple[int, str] | None:
        """Cancel the open selection or evaluation round (only if it is ``round_id``, unless None):
        ``(its id, the recorded detail)``, or None when there is no such round."""
        sel = self.open
        if sel is None or round_id not in (None, sel.id):
            return None
        return sel.id, self.cancel(sel, reason)

    def cancel(self, sel: OpenSelection, reason: str) -> str:
        """Close ``sel`` as ``cancelled`` (nothing deployed, a chain ends); returns the recorded detail."""
        detail = f"cancelled by the operator: {reason or 'no reason given'}"
        self.close(sel, cancelled=detail)
        return detail

    def close(self, sel: OpenSelection, *, cancelled: str | None = None) -> None:
        """Rank, record, deploy the winner as a new version over its backbone, publish the result (``cancelled``:
        record that detail instead, deploy nothing)."""
        hub = self.hub
        now = hub.clock()
        ranking = rank(list(sel.candidates), sel.reports.values(), hub.cfg.aggregation.max_weight_ratio)
        table = ", ".join(f"{c.name} {c.accuracy:.4f}" for c in ranking)
        row: VersionRow | None = None
        winner: str | None = None
        deployed: VersionRow | None = None  # an evaluation round's validated version (already registered)
        quorum = False
        if cancelled is not None:
            detail = cancelled
        elif sel.gate is not None:
            quorum, detail, deployed = self._close_gate(sel, sel.gate)
            winner = None if deployed is None else deployed.version
            source = sel.gate.get("source_round")
            if isinstance(source, int):
                self.store.set_round_deployed(source, deployed is not None)
                progress.note(self.store, source, deployed is not None, "kept back by the devices' validation")
        elif len(sel.reports) < sel.params.min_devices or not ranking or ranking[0].val_n == 0:
            detail = f"selection failed: {len(sel.reports)} reports, quorum {sel.params.min_devices}"
        else:
            winner = ranking[0].name
            sha = sel.candidates[winner]
            cur = hub.current()
            if sha == cur.backbone_sha256:
                detail = f"selected {winner} (already deployed as {cur.version}); ranking: {table}"
            else:
                head = load_head(hub.registry.backbone_dir(sha))
                row = hub.registry.write_head(head, parent=cur.version, round_id=sel.id, backbone_sha256=sha)
                detail = f"selected {winner}, deployed as {row.version}; ranking: {table}"
        status = (RoundStatus.CANCELLED if cancelled is not None else
                  RoundStatus.COMPLETED if winner is not None or quorum else RoundStatus.FAILED_QUORUM)
        self.store.close_selection(sel.id, str(status), now,
                                   [c.as_dict() for c in ranking], winner, detail, row)
        self.open = None
        log.info("selection round %d %s: %s", sel.id, status, detail)
        if row is not None:
            hub.score_version(row)
            hub.publish_model(row)
            scored = self.store.version(row.version)
            row = scored if scored is not None else row
        elif deployed is not None:
            hub.publish_model(deployed)
            row = deployed
        total = sum(int(m.get("val_n", 0)) for m in sel.reports.values())
        federated: dict[str, float] = {"val_n": float(total)} if total else {}
        for c in ranking:
            federated[acc_key(c.name)] = c.accuracy
            if c.loss is not None:
                federated[loss_key(c.name)] = c.loss
        result = RoundResult(
            fleet=hub.cfg.fleet, round=sel.id, status=status, model_version=None if row is None else row.version,
            accuracy=None if row is None else row.accuracy, loss=None if row is None else row.loss,
            devices=tuple(sorted(sel.reports)), n_samples=total,
            rejected=sum(self.store.reject_counts(sel.id).values()), seconds=now - sel.opened_at, detail=detail,
            declined=tuple(sorted(sel.declined)), federated=federated,
            ranking=tuple(c.name for c in ranking) if winner and sel.gate is None else (),
            deployed=None if row is None else True)
        hub.publish(hub.topics.result, encode(result), retain=True)
        hub.publish(hub.topics.select_announce, b"", retain=True)
        for name in sel.candidates:
            hub.publish(hub.topics.candidate(name), b"", retain=True)
        hub.rounds_jsonl({"round": sel.id, "status": str(status), "selection": [c.as_dict() for c in ranking],
                          "winner": winner, "model_version": result.model_version, "devices": len(sel.reports),
                          **({} if sel.gate is None else {"gate": sel.gate})})
        if cancelled is not None:
            hub.end_chain()
        if sel.gate is not None:
            hub.continue_chain()  # a chain goes on (unless cancelled), and an operator's queued start opens


def selection_status(store: Store) -> dict[str, Any]:
    """The registered candidates and every selection round, for ``fedge hub status``."""
    def one(s: SelectionRow) -> dict[str, Any]:
        return {"round": s.round, "status": s.status, "candidates": sorted(s.candidates), "selected": list(s.selected),
                "ranking": s.ranking, "winner": s.winner, "new_version": s.new_version, "detail": s.detail,
                **({"gate": s.params["gate"]} if "gate" in s.params else {})}

    return {"candidates": [{"name": n, "backbone_sha256": b} for n, b in store.candidates().items()],
            "selections": [one(s) for s in store.selections()]}


__all__ = ["CandidateScore", "OpenSelection", "Selector", "rank", "report_problem", "selection_status"]
