"""The agent's worker thread: one round at a time, run by the round core (:mod:`fedge.core.device`).

This driver adds what the core leaves out: the clock (the round's deadline, the device's ``max_round_s``, the
round's result), the files (heads, caches, outbox, privacy ledger, SecAgg markers), the trainer and the wire.
"""

from __future__ import annotations

import hashlib
import io
import logging
import queue
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from numpy.typing import NDArray

from fedge.core import device as core
from fedge.core.compress import compress
from fedge.core.privacy import DpParams
from fedge.core.secagg_session import DeviceSession, distributed_problem, is_secagg, private_input
from fedge.core.trainer import Trainer
from fedge.edge_agent.artifacts import artifacts_dir
from fedge.edge_agent.backends import BackendHealth
from fedge.edge_agent.config import AgentConfig
from fedge.edge_agent.eligibility import not_eligible
from fedge.edge_agent.head_files import cached_local_only, optional_head
from fedge.edge_agent.ledger import DeviceLedger
from fedge.edge_agent.outbox import Outbox
from fedge.edge_agent.state import AgentState
from fedge.protocol.codec import encode
from fedge.protocol.errors import DataError, FedgeError, TrainerCrash
from fedge.protocol.fsio import write_atomic
from fedge.protocol.manifest import load_head, load_manifest
from fedge.protocol.messages import Decline, DeclineReason, ModelUpdate, RoundAnnounce, SecAggStage
from fedge.protocol.topics import Topics
from fedge.protocol.types import F32, Head
from fedge.runtime.data import LocalData, conform
from fedge.runtime.features import FeatureCache

if TYPE_CHECKING:
    from fedge.runtime.trainers.isolated import IsolatedTrainer

log = logging.getLogger("fedge.agent")

__all__ = ["RETRY_S", "RoundWorker", "policy_of", "save_npz"]

RETRY_S = 30.0
"""An unacknowledged update is published again (same bytes) this often when the worker is idle, after every
reconnect, and when the hub says it is online (both of the latter only for updates sent more than ``FRESH_S`` ago,
except a reconnect: edge_agent/outbox.py)."""


def _later(msg: RoundAnnounce, version: str, attempt: int) -> bool:
    """Whether ``msg`` announces its buffered round on another model version than ``version``, or on it with a
    higher ``buffer_attempt`` than ``attempt``."""
    return msg.model_version != version or msg.buffer_attempt > attempt


def save_npz(path: Path, arrays: dict[str, NDArray[Any]]) -> None:
    buf = io.BytesIO()
    np.savez(buf, **arrays)  # type: ignore[arg-type]
    write_atomic(path, buf.getvalue())


def policy_of(cfg: AgentConfig) -> core.DevicePolicy:
    """The round core's view of agent.toml."""
    return core.DevicePolicy(cfg.seed, cfg.max_epochs, cfg.validation_fraction, cfg.local_only_epochs,
                             core.Personalization(cfg.personalization), cfg.ditto_mu)


class RoundWorker:
    """Runs queued rounds (federated and selection) on one thread; shares ``cond`` (state) with the agent."""

    def __init__(self, config: AgentConfig, state: AgentState, cond: threading.Condition, outbox: Outbox,
                 publish: Callable[[str, bytes], None], data: Callable[[], LocalData], on_idle: Callable[[], None],
                 run_selection: Callable[[RoundAnnounce], None], health: BackendHealth) -> None:
        self.config = config
        self.device = config.device_id
        self.topics = Topics(config.fleet)
        self.state = state
        self.cond = cond
        self.outbox = outbox
        self.publish = publish
        self._data = data
        self._on_idle = on_idle
        self._run_selection = run_selection
        self.health = health  # which back-ends work here (probed in child processes: edge_agent/backends.py)
        self.installed: tuple[str, ...] = ()  # the back-ends installed on this device (set at start)
        root = config.state_dir
        self.artifacts_root = root / "artifacts"
        self.heads_dir = root / "heads"
        self.feature_cache = FeatureCache(root / "features")  # kept: rounds after the first read memory
        self.ledger = DeviceLedger(root / "privacy.json")
        self.personal_head_path = root / "personal_head.npz"
        self.policy = policy_of(config)
        self.jobs: queue.Queue[RoundAnnounce | None] = queue.Queue()
        self.started: set[int] = set()  # rounds queued, running or done in this process
        # (round, model version, buffer attempt) of buffered rounds queued, running or done in this process
        self.versions_started: set[tuple[int, str, int]] = set()
        self.closed_round = 0  # the highest round the hub's result says is closed
        # the latest buffered announce received: (round, model version, buffer attempt)
        self.announced: tuple[int, str, int] | None = None
        self.done_round = state.last_completed_round  # the highest round answered on the wire (update, decline...)
        self.secagg: dict[int, DeviceSession] = {}  # secure-aggregation rounds in progress (secrets in memory only)
        self._trainer: tuple[str, Path, IsolatedTrainer] | None = None  # (backbone, its install, trainer)
        self._thread: threading.Thread | None = None

    # -- the thread -------------------------------------------------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self._work, name=f"fedge-agent-{self.device}", daemon=True)
        self._thread.start()

    def stop(self, timeout_s: float) -> None:
        self.jobs.put(None)
        if self._thread is not None:
            self._thread.join(timeout_s)
            if self._thread.is_alive():
                log.warning("training still running after %.0f s; leaving it", timeout_s)
        self.feature_cache.flush()
        if self._thread is None or not self._thread.is_alive():
            self._close_trainer()  # its worker process goes with the agent

    @property
    def data(self) -> LocalData:
        return self._data()

    def enqueue(self, msg: RoundAnnounce) -> None:
        self.started.add(msg.round)
        self.versions_started.add((msg.round, msg.model_version, msg.buffer_attempt))
        self.jobs.put(msg)

    def trainer_backbone(self) -> str | None:
        return None if self._trainer is None else self._trainer[0]

    def _work(self) -> None:
        while True:
            try:
                msg = self.jobs.get(timeout=RETRY_S)
            except queue.Empty:
                self._on_idle()
                continue
            if msg is None:
                return
            try:
                (self._run_selection if msg.candidates else self.run_round)(msg)
            except Exception as exc:
                log.exception("round %d failed on this device", msg.round)
                # say so, so the hub stops waiting for this device (and do not retry the round)
                # the reason only: the error text can describe the local data (its path, labels, size); a crashed
                # back-end's reason does not (which back-end, which signal, which call) and is sent
                reason = DeclineReason.DATA_ERROR if isinstance(exc, DataError) else DeclineReason.TRAINER_ERROR
                detail = "see the device's log"
                if isinstance(exc, TrainerCrash):
                    self._trainer_crashed(exc)
                    detail = str(exc)[:500]
                try:
                    self.decline(msg, reason, detail)
                except Exception:
                    log.exception("could not decline round %d", msg.round)
                    with self.cond:
                        self.started.discard(msg.round)  # a redelivered announce may retry
                        self.versions_started.discard((msg.round, msg.model_version, msg.buffer_attempt))

    # -- what rounds need (also the selection worker's interface) ---------------------------------------------
    def trainer_for(self, backbone_sha256: str) -> Trainer:
        """The trainer for ``backbone_sha256``: the back-end ``self.health`` chooses (probed in child processes),
        run in a worker process (``IsolatedTrainer``), so that a native crash raises ``TrainerCrash`` here."""
        from fedge.runtime.trainers.isolated import IsolatedTrainer

        folder = artifacts_dir(self.artifacts_root, backbone_sha256)  # the verified install in use
        backend = self.health.choose(folder)  # TrainerCrash when no back-end works here
        held = self._trainer
        if (held is None or held[0] != backbone_sha256 or held[1] != folder or held[2].name != backend
                or not held[2].alive):
            self._close_trainer()
            trainer = IsolatedTrainer(folder, backend)
            self._trainer = (backbone_sha256, folder, trainer)
            log.info("opened %s trainer for backbone %s (worker pid %d)", backend, backbone_sha256[:16], trainer.pid)
            return trainer
        return held[2]

    def _close_trainer(self) -> None:
        held, self._trainer = self._trainer, None
        if held is not None:
            held[2].close()

    def _trainer_crashed(self, exc: TrainerCrash) -> None:
        """A back-end crashed, hung or failed during a round: mark it unusable (``auto`` moves on to the next) and
        drop its worker."""
        if exc.backend in self.installed and exc.backend not in self.health.faults():  # not "auto", not yet known
            self.health.mark(exc.backend, exc.reason)
        held = self._trainer
        if held is not None and held[2].name == exc.backend:
            self._close_trainer()

    def inputs(self, backbone_sha256: str) -> F32:
        """The local data as the backbone's input (DataError when labels or shapes do not fit the model)."""
        data = self._data()
        manifest = load_manifest(artifacts_dir(self.artifacts_root, backbone_sha256))
        shape = manifest.input.shape
        y = np.asarray(data.y)
        bad = y[(y < 0) | (y >= manifest.num_classes)]
        if bad.size:
            raise DataError(f"{data.path}: label {int(bad[0])} is outside [0, {manifest.num_classes}) "
                            f"({bad.size} of {y.size} labels; the model has {manifest.num_classes} classes)")
        return conform(data, shape, manifest.input.layout)  # images: decoded at the model's size

    def device_data(self, trainer: Trainer, backbone_sha256: str) -> core.DeviceData:
        data = self._data()
        feats = self.feature_cache.get(trainer, self.inputs(backbone_sha256), data.sha256, backbone_sha256)
        return core.DeviceData(feats, np.asarray(data.y, dtype=np.int64), data.sha256)

    def again(self, msg: RoundAnnounce) -> bool:
        """``msg`` announces an open buffered round this device sent an update in, on a newer model version than
        that update's, or on the same version with a higher ``buffer_attempt`` (a buffer that deployed nothing gave
        its devices their slot back): it trains again (one update per model version and attempt; PROTOCOL.md,
        "Buffered rounds"). Not on the version and attempt the hub had announced already when that update was sent
        (``buffered_ahead``): the update went into the buffer being filled then, and the hub takes one update per
        device in a buffer."""
        s = self.state
        return (msg.buffer_k is not None and msg.round == s.last_completed_round and s.buffered_version is not None
                and _later(msg, s.buffered_version, s.buffered_attempt)
                and (s.buffered_ahead is None or _later(msg, s.buffered_ahead, s.buffered_ahead_attempt))
                and self.closed_round < msg.round)

    def answered_already(self, msg: RoundAnnounce) -> bool:
        """``msg``'s round (or, in a buffered round, its model version) has been answered."""
        return msg.round <= self.state.last_completed_round and not self.again(msg)

    def late_reason(self, msg: RoundAnnounce) -> str | None:
        if self.answered_already(msg):
            return "already completed"
        if msg.buffer_k is not None and self.closed_round >= msg.round:
            return "the buffered round closed"
        if msg.deadline <= time.time():
            return "deadline passed while queued"
        return None

    def stopper(self, msg: RoundAnnounce) -> Callable[[], bool]:
        """Training stops at the deadline (less a margin to send), at the device's own time limit, or once the round
        closed (a buffered round's too: the hub takes no update once it closed, and counts none left in its unfilled
        buffer); asked before every batch."""
        t_end = min(msg.deadline - core.SEND_MARGIN_S, time.time() + self.config.max_round_s)
        return lambda: time.time() >= t_end or self._closed(msg)

    def _closed(self, msg: RoundAnnounce) -> bool:
        return self.closed_round >= msg.round

    def decline(self, msg: RoundAnnounce, reason: DeclineReason, detail: str) -> None:
        log.warning("declining round %d: %s (%s)", msg.round, reason, detail)
        out = Decline(self.config.fleet, msg.round, self.device, reason, detail)
        self.publish(self.topics.decline(self.device), encode(out))
        self.mark_done(msg.round)

    def mark_done(self, round_id: int) -> None:
        """``round_id`` answered without an update (declined, or closed while training). A newer round than the
        last completed one forgets the buffered version of the older round's update: ``buffered_version`` belongs
        to the round ``last_completed_round`` names, and a round answered this way trains no more (:meth:`again`)."""
        with self.cond:
            if round_id > self.state.last_completed_round:
                self.state.buffered_version = self.state.buffered_ahead = None
                self.state.buffered_attempt = self.state.buffered_ahead_attempt = 0
            self.state.last_completed_round = max(self.state.last_completed_round, round_id)
            self.state.save()
        self.answered(round_id)

    def answered(self, round_id: int) -> None:
        """``round_id`` has been answered on the wire (its update, report, masked input or decline published)."""
        with self.cond:
            self.done_round = max(self.done_round, round_id)
            self.cond.notify_all()

    # -- a federated round ------------------------------------------------------------------------------------
    def run_round(self, msg: RoundAnnounce) -> None:
        with self.cond:
            late = self.late_reason(msg)
        if late:
            log.info("not training round %d: %s", msg.round, late)
            return
        again = self.again(msg)  # a buffered round's newer version: the round's kept update is an older version's
        kept = None if again else self.outbox.kept(msg.round)
        if kept is not None:  # written before a crash: send those exact bytes again, never a freshly noised update
            self._publish_update(msg.round, kept, None, None)
            log.info("round %d: update from before the restart sent again", msg.round)
            return
        secure = is_secagg(msg)
        dp_delta = self.config.privacy.delta if self.config.privacy is not None else 1e-5
        admitted = core.admit(msg, self.policy, ineligible=not_eligible(self.config.eligibility),
                              privacy=self.config.privacy, secure=secure,
                              epsilon_of=lambda extra: self.ledger.epsilon(dp_delta, extra))
        if isinstance(admitted, core.Declined):
            self.decline(msg, admitted.reason, admitted.detail)
            return
        dp = admitted
        session = self._secagg_session(msg, dp) if secure else None
        if secure and session is None:  # declined
            return
        started = time.perf_counter()
        trainer = self.trainer_for(msg.backbone_sha256)
        heads = self._heads(msg, trainer)
        stop = self.stopper(msg)
        outcome = core.train(msg, trainer, self.device_data(trainer, msg.backbone_sha256), heads, self.policy,
                             private=dp is not None, stop=stop, closed=lambda: self._closed(msg),
                             clock=time.perf_counter)
        if isinstance(outcome, core.Closed):
            log.info("round %d closed while training: no update", msg.round)
            self.mark_done(msg.round)
            return
        if isinstance(outcome, core.Declined):
            self.decline(msg, outcome.reason, f"{outcome.detail} ({self.config.max_round_s:g} s)")
            return
        if outcome.local_only is not None:
            c = outcome.local_only
            save_npz(self._local_only_path(msg), {**c.head, "__epochs": np.asarray(c.epochs),
                                                  "__cv": np.asarray([c.cv_accuracy, c.cv_loss])})
        fit, m = outcome.fit, outcome.metrics
        m["device_seconds"] = time.perf_counter() - started  # the device's whole job: training, personalisation, scores
        if fit.stopped:
            log.warning("round %d: training stopped after %d steps (deadline or max_round_s)", msg.round, fit.steps)
        summary = (f"round {msg.round}: {trainer.name}, {fit.steps} steps in {fit.seconds:.2f} s, loss "
                   f"{m['loss_before']:.4f} -> {m['loss_after']:.4f}, "
                   f"acc {m['acc_before']:.3f} -> {m['acc_after']:.3f}")
        if session is not None:  # secure aggregation: only the masked, quantised update leaves the device
            self._secagg_input(msg, session, outcome.delta, dp, outcome.personal)
            log.info("%s; masked input %s", summary,
                     "sent" if session.masked_sent else "waits for the relayed shares")
            return
        delta, n_samples, metrics, norm = outcome.update(dp, np.random.default_rng())  # OS entropy: unpredictable
        if dp is not None:
            log.info("round %d: %s DP, update norm %.4f clipped to %.4g, noise std %.4g", msg.round, dp.mode, norm,
                     dp.clip, dp.device_noise_std())
        sent: dict[str, NDArray[Any]] = dict(delta)
        if self.answered_already(msg):  # answered meanwhile (a redelivery raced it): nothing
            return
        if msg.compression is not None:  # after the DP noise: compression is post-processing
            sent = self._compress(msg, delta)
        update = ModelUpdate(self.config.fleet, msg.round, self.device, msg.model_version, n_samples, sent, metrics)
        buffered = None if msg.buffer_k is None else (msg.model_version, msg.buffer_attempt)
        if self._publish_update(msg.round, encode(update), dp, outcome.personal, buffered):
            log.info("%s; update %s published", summary, update.nonce[:8])

    def _compress(self, msg: RoundAnnounce, delta: Head) -> dict[str, NDArray[Any]]:
        """The announced compression of ``delta``, with what earlier compressions lost added back (error feedback,
        kept per backbone in ``state_dir/residual-<backbone>.npz``)."""
        mode = msg.compression or ""
        path = self.config.state_dir / f"residual-{msg.backbone_sha256[:16]}.npz"
        residual = optional_head(path, "compression residual")
        arrays, left = compress(delta, mode, np.random.default_rng(), residual)  # OS entropy: unbiased rounding
        save_npz(path, dict(left))
        return dict(arrays)

    def _local_only_path(self, msg: RoundAnnounce) -> Path:
        """The cached local-only baseline: one per backbone, data, and what it was trained with (the validation
        split, the epochs budget, the learning rate, the seed), so a changed split never scores it on its own
        training rows."""
        p = self.policy
        recipe = hashlib.sha256(f"{p.validation_fraction}|{p.local_only_epochs}|{msg.lr}|{p.seed}".encode())
        return (self.config.state_dir / "local_only" /
                f"{msg.backbone_sha256[:16]}-{self._data().sha256[:16]}-{recipe.hexdigest()[:12]}.npz")

    def _heads(self, msg: RoundAnnounce, trainer: Trainer) -> core.RoundHeads:
        global_head = load_head(self.heads_dir / f"{msg.model_version}.npz")
        expected = trainer.get_head()
        if {k: v.shape for k, v in global_head.items()} != {k: np.shape(v) for k, v in expected.items()}:
            raise FedgeError(f"head of model {msg.model_version} does not fit the backbone's head layout")
        w0 = load_head(artifacts_dir(self.artifacts_root, msg.backbone_sha256))  # the backbone's source head
        return core.RoundHeads(global_head, w0, optional_head(self.personal_head_path, "personal head"),
                               cached_local_only(self._local_only_path(msg), expected))

    def _publish_update(self, round_id: int, payload: bytes, dp: DpParams | None, personal: Head | None,
                        buffered: tuple[str, int] | None = None) -> bool:
        """Record (DP ledger, outbox, personal head), mark the round completed, then publish; False if it already
        was completed (a buffered round's update, of (model version, buffer attempt) ``buffered``: if this device
        sent an update on that version in that attempt or a later one, or answered the round otherwise). The outbox
        keeps one update per round: a buffered round's newer one replaces the older. A crash after the outbox write
        re-sends these exact bytes at the next start (the outbox is sent again until acked or closed), so publishing
        outside the lock loses nothing; and no lock is held while a transport may deliver synchronously (an
        in-process hub answers on this thread)."""
        with self.cond:
            last = self.state.last_completed_round
            if round_id < last or (round_id == last and not self._sends_again(buffered)):
                log.info("round %d already completed; not publishing again", round_id)
                return False
            if dp is not None:  # recorded before it leaves the device: a crash over-counts, never under-counts
                self.ledger.record(round_id, dp)
            self.outbox.record(round_id, payload)  # a crash from here on re-sends these bytes (until acked or closed)
            if personal is not None:
                save_npz(self.personal_head_path, dict(personal))
            self.state.last_completed_round = round_id
            self.state.buffered_version, self.state.buffered_attempt = buffered or (None, 0)
            ahead, self.state.buffered_ahead, self.state.buffered_ahead_attempt = self.announced, None, 0
            if buffered is not None and ahead is not None and ahead[0] == round_id and ahead[1:] != buffered:
                # the hub is on a newer version (or attempt) already: not trained again on that one
                self.state.buffered_ahead, self.state.buffered_ahead_attempt = ahead[1], ahead[2]
            self.state.save()
        self.publish(self.topics.update(self.device), payload)
        self.answered(round_id)
        return True

    def _sends_again(self, buffered: tuple[str, int] | None) -> bool:
        """Whether an update on (model version, buffer attempt) ``buffered`` is a new one in the buffered round
        ``last_completed_round`` names: this device's update there was on another version or an earlier attempt
        (not if the round is not buffered, or was answered without an update)."""
        s = self.state
        return (buffered is not None and s.buffered_version is not None
                and (s.buffered_version != buffered[0] or s.buffered_attempt < buffered[1]))

    # -- secure aggregation -----------------------------------------------------------------------------------
    def _secagg_session(self, msg: RoundAnnounce, dp: DpParams | None) -> DeviceSession | None:
        """A secure-aggregation round's session, its advertise frame published (None after declining an unusable
        setup, or a round this device joined before a restart)."""
        joined = self.config.state_dir / "secagg" / f"joined-{msg.round}"
        if joined.exists():  # its keys and seed died with the process: joining again would break its neighbours
            self.decline(msg, DeclineReason.NOT_ELIGIBLE, "restarted after joining this secure-aggregation round: "
                         "its keys are gone")  # the hub stops waiting for it
            return None
        try:
            why = distributed_problem(dp, len(msg.selected), msg.secagg_clip, msg.secagg_scale)
            if why is not None:
                raise FedgeError(why)
            session = DeviceSession(msg, self.device)
        except (FedgeError, ImportError) as exc:
            self.decline(msg, DeclineReason.MODE_NOT_ALLOWED, f"unusable secure-aggregation setup: {exc}")
            return None
        for old in joined.parent.glob("joined-*") if joined.parent.is_dir() else ():
            old.unlink(missing_ok=True)
        write_atomic(joined, b"")  # before the keys leave the device
        with self.cond:
            self.secagg[msg.round] = session
        self._send_secagg(session.start())
        return session

    def on_secagg(self, msg: SecAggStage) -> None:
        with self.cond:
            session = self.secagg.get(msg.round)
        if session is None:
            log.warning("ignoring a secagg frame of round %d: no secure-aggregation round of ours", msg.round)
            return
        self._send_secagg(session.on_frame(msg))

    def _send_secagg(self, frames: list[bytes]) -> None:
        for frame in frames:
            self.publish(self.topics.secagg(self.device), frame)

    def _secagg_input(self, msg: RoundAnnounce, session: DeviceSession, delta: Head, dp: DpParams | None,
                      personal: Head) -> None:
        """Quantise (under distributed DP: clip and add this device's share of the noise first) and hand the
        update to the session; the round counts as completed here (the personal head is kept)."""
        q = private_input(delta, sorted(delta), session.setup, dp, np.random.default_rng())  # OS entropy
        with self.cond:
            if msg.round <= self.state.last_completed_round:
                return
            if dp is not None:  # recorded before anything derived from the update leaves the device
                self.ledger.record(msg.round, dp)
            if self.config.keep_secagg_inputs:
                save_npz(self.config.state_dir / "secagg" / f"round-{msg.round}.npz",
                         {"q": q.astype(np.uint64), "ring_bits": np.asarray(session.setup.config.ring_bits)})
            save_npz(self.personal_head_path, dict(personal))
            self.state.last_completed_round = msg.round
            self.state.save()
        self._send_secagg(session.set_input(q))
        self.answered(msg.round)
