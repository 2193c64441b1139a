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
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from numpy.typing import NDArray

from fedge.core.evaluation import split_indices
from fedge.core.losses import Score
from fedge.core.trainer import Trainer
from fedge.core.training import evaluate, fit
from fedge.edge_agent.artifacts import artifacts_dir, install_model_full, is_installed
from fedge.edge_agent.eligibility import not_eligible
from fedge.protocol.codec import encode
from fedge.protocol.errors import ArtifactError, DataError, FedgeError
from fedge.protocol.manifest import load_head, save_head
from fedge.protocol.messages import DeclineReason, ModelFull, ModelHead, ModelUpdate, RoundAnnounce
from fedge.protocol.selection import acc_key, loss_key
from fedge.protocol.topics import valid_id

if TYPE_CHECKING:
    from fedge.edge_agent.agent import Agent

log = logging.getLogger("fedge.agent")


def score_candidate(trainer: Trainer, w0: Mapping[str, NDArray[np.float32]], train_f: NDArray[np.float32],
                    train_y: NDArray[np.int64], val_f: NDArray[np.float32], val_y: NDArray[np.int64], epochs: int,
                    lr: float, rng: np.random.Generator, stop: Callable[[], bool] | None = None) -> Score | None:
    """A candidate's score: its source head ``w0`` fine-tuned ``epochs`` on ``(train_f, train_y)`` (0: as is, an
    evaluation round), evaluated on ``(val_f, val_y)``. The features are the candidate backbone's. Leaves the
    trainer holding the tuned head. None when ``stop`` ended the fine-tune early (a partial fine-tune would not
    compare with the others)."""
    trainer.set_head(w0)
    if epochs > 0 and fit(trainer, train_f, train_y, epochs, lr, rng, stop=stop).stopped:
        return None
    return evaluate(trainer, val_f, val_y)


def report_metrics(scores: Mapping[str, Score], val_n: int) -> dict[str, float]:
    """The report's metrics: ``val_n`` and every scored candidate's accuracy and loss."""
    out = {"val_n": float(val_n)}
    for name, s in scores.items():
        out[acc_key(name)] = float(s.accuracy)
        out[loss_key(name)] = float(s.loss)
    return out


class SelectionWorker:
    """The agent's side of selection rounds: handlers run on the transport thread, :meth:`run` on the agent's
    worker (the same queue as federated rounds, so one model trains at a time)."""

    def __init__(self, agent: Agent) -> None:
        self.agent = agent
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
        agent = self.agent
        with agent._cond:
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
        if msg.round <= agent.state.last_completed_round or msg.round in agent._started:
            return "already done"
        if msg.deadline <= time.time():
            return "deadline passed"
        return None

    def check_pending(self) -> None:
        agent = self.agent
        with agent._cond:
            for rid, msg in list(self._pending.items()):
                if self._skip_reason(msg):
                    del self._pending[rid]
                elif all(is_installed(agent.artifacts_root, sha) for sha in msg.candidate_backbones) and (
                        msg.local_epochs > 0 or all(self._head_file(n).is_file() for n in msg.candidates)):
                    del self._pending[rid]
                    agent._started.add(rid)
                    agent._jobs.put(msg)

    def run(self, msg: RoundAnnounce) -> None:
        """Score every candidate and send the report (worker thread); decline when the device cannot take part."""
        agent = self.agent
        with agent._cond:
            late = agent._skip_reason_late(msg)
        if late:
            log.info("not scoring selection round %d: %s", msg.round, late)
            return
        if agent.config.privacy is not None:
            agent._decline(msg, DeclineReason.DP_REQUIRED, "selection reports scores in the clear; this device has "
                           "a privacy policy")
            return
        if msg.local_epochs > agent.config.max_epochs:
            agent._decline(msg, DeclineReason.OVER_LIMITS, f"{msg.local_epochs} fine-tune epochs announced; this "
                           f"device trains at most {agent.config.max_epochs}")
            return
        unmet = not_eligible(agent.config.eligibility)
        if unmet is not None:
            agent._decline(msg, DeclineReason.NOT_ELIGIBLE, unmet)
            return
        from fedge.edge_agent.agent import SEND_MARGIN_S  # here: agent.py imports this module

        t_end = min(msg.deadline - SEND_MARGIN_S, time.time() + agent.config.max_round_s)

        def stop() -> bool:  # the deadline (less a margin to send), the device's own limit, or the round closed
            return time.time() >= t_end or agent._closed_round >= msg.round

        y_all = np.asarray(agent.data.y, dtype=np.int64)
        train_idx, val_idx = split_indices(len(y_all), agent.config.validation_fraction, agent.data.sha256)
        if not len(val_idx):
            agent._decline(msg, DeclineReason.DATA_ERROR, "no validation split (validation_fraction is 0)")
            return
        scores: dict[str, Score] = {}
        for i, (name, sha) in enumerate(zip(msg.candidates, msg.candidate_backbones, strict=True)):
            trainer = agent._trainer_for(sha)
            try:
                x = agent._inputs(sha)
            except DataError as exc:  # e.g. the candidate has fewer classes than the local labels
                log.warning("selection round %d: candidate %s cannot be scored here: %s", msg.round, name, exc)
                continue
            feats = agent.feature_cache.get(trainer, x, agent.data.sha256, sha)
            w0 = load_head(self._head_file(name) if msg.local_epochs == 0 else artifacts_dir(agent.artifacts_root, sha))
            rng = np.random.default_rng([agent.config.seed, msg.round, i])
            score = score_candidate(trainer, w0, feats[train_idx], y_all[train_idx], feats[val_idx], y_all[val_idx],
                                    msg.local_epochs, msg.lr, rng, stop)
            if score is None:
                agent._decline(msg, DeclineReason.OVER_LIMITS, f"stopped after {i} of {len(msg.candidates)} "
                               "candidates (deadline, max_round_s, or the round closed)")
                return
            scores[name] = score
            log.info("selection round %d: candidate %s scores accuracy %.4f, loss %.4f", msg.round, name,
                     scores[name].accuracy, scores[name].loss)
        if not scores:
            agent._decline(msg, DeclineReason.DATA_ERROR, "no candidate fits the local data")
            return
        report = ModelUpdate(agent.config.fleet, msg.round, agent.device, msg.model_version, len(val_idx), {},
                             report_metrics(scores, len(val_idx)))
        with agent._cond:
            if msg.round <= agent.state.last_completed_round or agent._transport is None:
                return
            agent._transport.publish(agent.topics.select_report(agent.device), encode(report), qos=1)
            agent.state.last_completed_round = msg.round
            agent.state.save()
            agent._cond.notify_all()
        log.info("selection round %d: report %s sent", msg.round, report.nonce[:8])


__all__ = ["SelectionWorker", "report_metrics", "score_candidate"]
