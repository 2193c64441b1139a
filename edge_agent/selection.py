"""Source-model selection on the device: score every candidate after a short head fine-tune, report metrics only.

For each candidate of a selection round (PROTOCOL.md, "Selection rounds") the device opens the candidate's
artifacts (fetched retained from ``model/candidate/<name>``), fine-tunes a fresh head (the candidate's w0) for
the announced epochs on its training split, and scores it on its validation split (which never trains). It
sends ``val_n`` and each candidate's ``val_acc_<name>`` / ``val_loss_<name>`` in one report; no weights, no
sample counts beyond the validation size. A device with a privacy policy declines (``dp_required``): scores
in the clear describe its data. :func:`score_candidate` is also what ``fedge simulate`` runs.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from fedge.core.evaluation import split_indices
from fedge.core.losses import Score
from fedge.core.selection import report_metrics, score_candidate
from fedge.core.trainer import Trainer
from fedge.edge_agent.artifacts import artifacts_dir, install_model_full, is_installed
from fedge.edge_agent.config import AgentConfig
from fedge.edge_agent.eligibility import not_eligible
from fedge.edge_agent.state import AgentState
from fedge.protocol.codec import encode
from fedge.protocol.errors import ArtifactError, DataError, FedgeError
from fedge.protocol.manifest import load_head, save_head
from fedge.protocol.messages import DeclineReason, ModelFull, ModelHead, ModelUpdate, RoundAnnounce
from fedge.protocol.topics import Topics, valid_id
from fedge.protocol.types import F32
from fedge.runtime.data import LocalData
from fedge.runtime.features import FeatureCache

log = logging.getLogger("fedge.agent")


class DevicePort(Protocol):
    """What selection rounds need from the agent's round worker (its public interface)."""

    config: AgentConfig
    device: str
    topics: Topics
    state: AgentState
    artifacts_root: Path
    started: set[int]
    feature_cache: FeatureCache

    @property
    def data(self) -> LocalData: ...
    def enqueue(self, msg: RoundAnnounce) -> None: ...
    def late_reason(self, msg: RoundAnnounce) -> str | None: ...
    def decline(self, msg: RoundAnnounce, reason: DeclineReason, detail: str) -> None: ...
    def trainer_for(self, backbone_sha256: str) -> Trainer: ...
    def inputs(self, backbone_sha256: str) -> F32: ...
    def stopper(self, msg: RoundAnnounce) -> Callable[[], bool]: ...
    def publish(self, topic: str, payload: bytes) -> None: ...


class SelectionWorker:
    """The agent's side of selection rounds: handlers run on the transport thread, :meth:`run` on the agent's
    worker (the same queue as federated rounds, so one model trains at a time)."""

    def __init__(self, agent: DevicePort, cond: threading.Condition) -> None:
        self.agent = agent
        self._cond = cond
        self._pending: dict[int, RoundAnnounce] = {}

    def _head_file(self, name: str) -> Path:
        return self.agent.config.state_dir / "candidate_heads" / f"{name}.npz"

    def on_candidate(self, msg: Any) -> None:
        if isinstance(msg, ModelHead):  # an evaluation round's head (PROTOCOL.md, "Selection rounds")
            if not valid_id(msg.version) or not msg.head or any(v.dtype != np.float32 for v in msg.head.values()):
                log.error("ignoring candidate head %r: bad version name or arrays", msg.version)
                return
            self._head_file(msg.version).parent.mkdir(parents=True, exist_ok=True)
            save_head(self._head_file(msg.version), dict(msg.head))
            self.check_pending()
            return
        if not isinstance(msg, ModelFull):
            log.warning("ignoring %s on a model/candidate topic", msg.type)
            return
        try:
            path, new = install_model_full(self.agent.artifacts_root, msg)
        except (FedgeError, OSError, ValueError) as exc:
            log.error("rejected candidate model for backbone %s: %s", msg.backbone_sha256[:16], exc)
            return
        if new:
            log.info("candidate backbone %s installed at %s", msg.backbone_sha256[:16], path)
        self.check_pending()

    def on_announce(self, msg: Any) -> None:
        if not isinstance(msg, RoundAnnounce) or not msg.candidates:
            log.warning("ignoring %s on the round/select topic: not a selection announce", msg.type)
            return
        with self._cond:
            reason = self._skip_reason(msg)
            if reason:
                log.info("ignoring selection round %d: %s", msg.round, reason)
                return
            self._pending = {msg.round: msg}  # one selection round at a time
        self.check_pending()

    def _skip_reason(self, msg: RoundAnnounce) -> str | None:
        agent = self.agent
        if len(msg.candidates) != len(msg.candidate_backbones):
            return "candidates and candidate_backbones differ in length"
        try:
            for sha in msg.candidate_backbones:
                artifacts_dir(agent.artifacts_root, sha)
        except ArtifactError as exc:
            return str(exc)
        if agent.device not in msg.selected:
            return "this device is not selected"
        if msg.round <= agent.state.last_completed_round or msg.round in agent.started:
            return "already done"
        if msg.deadline <= time.time():
            return "deadline passed"
        return None

    def check_pending(self) -> None:
        agent = self.agent
        with self._cond:
            for rid, msg in list(self._pending.items()):
                if self._skip_reason(msg):
                    del self._pending[rid]
                elif all(is_installed(agent.artifacts_root, sha) for sha in msg.candidate_backbones) and (
                        msg.local_epochs > 0 or all(self._head_file(n).is_file() for n in msg.candidates)):
                    del self._pending[rid]
                    agent.enqueue(msg)

    def run(self, msg: RoundAnnounce) -> None:
        """Score every candidate and send the report (worker thread); decline when the device cannot take part."""
        agent = self.agent
        with self._cond:
            late = agent.late_reason(msg)
        if late:
            log.info("not scoring selection round %d: %s", msg.round, late)
            return
        if agent.config.privacy is not None:
            agent.decline(msg, DeclineReason.DP_REQUIRED, "selection reports scores in the clear; this device has "
                           "a privacy policy")
            return
        if msg.local_epochs > agent.config.max_epochs:
            agent.decline(msg, DeclineReason.OVER_LIMITS, f"{msg.local_epochs} fine-tune epochs announced; this "
                           f"device trains at most {agent.config.max_epochs}")
            return
        unmet = not_eligible(agent.config.eligibility)
        if unmet is not None:
            agent.decline(msg, DeclineReason.NOT_ELIGIBLE, unmet)
            return
        stop = agent.stopper(msg)  # the deadline (less a margin to send), the device's own limit, the round closed
        y_all = np.asarray(agent.data.y, dtype=np.int64)
        train_idx, val_idx = split_indices(len(y_all), agent.config.validation_fraction, agent.data.sha256)
        if not len(val_idx):
            agent.decline(msg, DeclineReason.DATA_ERROR, "no validation split (validation_fraction is 0)")
            return
        scores: dict[str, Score] = {}
        for i, (name, sha) in enumerate(zip(msg.candidates, msg.candidate_backbones, strict=True)):
            trainer = agent.trainer_for(sha)
            try:
                x = agent.inputs(sha)
            except DataError as exc:  # e.g. the candidate has fewer classes than the local labels
                log.warning("selection round %d: candidate %s cannot be scored here: %s", msg.round, name, exc)
                continue
            feats = agent.feature_cache.get(trainer, x, agent.data.sha256, sha)
            w0 = load_head(self._head_file(name) if msg.local_epochs == 0 else artifacts_dir(agent.artifacts_root, sha))
            rng = np.random.default_rng([agent.config.seed, msg.round, i])
            score = score_candidate(trainer, w0, feats[train_idx], y_all[train_idx], feats[val_idx], y_all[val_idx],
                                    msg.local_epochs, msg.lr, rng, stop)
            if score is None:
                agent.decline(msg, DeclineReason.OVER_LIMITS, f"stopped after {i} of {len(msg.candidates)} "
                               "candidates (deadline, max_round_s, or the round closed)")
                return
            scores[name] = score
            log.info("selection round %d: candidate %s scores accuracy %.4f, loss %.4f", msg.round, name,
                     scores[name].accuracy, scores[name].loss)
        if not scores:
            agent.decline(msg, DeclineReason.DATA_ERROR, "no candidate fits the local data")
            return
        report = ModelUpdate(agent.config.fleet, msg.round, agent.device, msg.model_version, len(val_idx), {},
                             report_metrics(scores, len(val_idx)))
        with self._cond:
            if msg.round <= agent.state.last_completed_round:
                return
            agent.state.last_completed_round = msg.round
            agent.state.save()
            self._cond.notify_all()
        agent.publish(agent.topics.select_report(agent.device), encode(report))  # no lock held while publishing
        log.info("selection round %d: report %s sent", msg.round, report.nonce[:8])


__all__ = ["DevicePort", "SelectionWorker"]
