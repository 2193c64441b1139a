"""The edge agent's run loop: hold the model, answer round announces with one head update each.

Message handlers run on the transport's thread and only record state, install artifacts and queue
work; training runs in one worker thread. See ARCHITECTURE.md and PROTOCOL.md.
"""

from __future__ import annotations

import io
import logging
import queue
import re
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import numpy as np
from numpy.typing import NDArray

from fedge.core.evaluation import head_scores, local_only_head, split_indices
from fedge.core.privacy import DpParams, privatize
from fedge.core.secagg_session import DeviceSession, distributed_problem, is_secagg, private_input
from fedge.core.training import Prox, fit
from fedge.edge_agent.artifacts import artifacts_dir, install_model_full, is_installed, prune_backbones
from fedge.edge_agent.backends import BackendHealth
from fedge.edge_agent.config import AgentConfig
from fedge.edge_agent.eligibility import not_eligible
from fedge.edge_agent.ledger import DeviceLedger, announced_dp, decline_reason
from fedge.edge_agent.selection import SelectionWorker
from fedge.edge_agent.state import AgentState
from fedge.edge_agent.trust import HubTrust
from fedge.protocol.codec import ANNOUNCE_FRAME_BYTES, SMALL_FRAME_BYTES, decode, encode
from fedge.protocol.errors import ArtifactError, DataError, DecodeError, FedgeError, TrainerCrash
from fedge.protocol.fsio import secure_tree, write_atomic
from fedge.protocol.manifest import load_head, load_manifest
from fedge.protocol.messages import (
    Ack,
    Decline,
    DeclineReason,
    HubStatus,
    ModelFull,
    ModelHead,
    ModelUpdate,
    Presence,
    Reject,
    RoundAnnounce,
    RoundResult,
    SecAggStage,
)
from fedge.protocol.signing import rotation_filter
from fedge.protocol.topics import Topics
from fedge.protocol.transport import Transport
from fedge.runtime.data import LocalData, load_local
from fedge.runtime.features import FeatureCache

log = logging.getLogger("fedge.agent")
_VERSION = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$")
RETRY_S = 30.0
"""An unacknowledged update is published again (same bytes) this often, and after every reconnect and hub status."""
INBOX_FRAME_BYTES = ANNOUNCE_FRAME_BYTES
"""Largest frame decoded from ``device/<id>/+`` (ack, reject, SecAgg stage messages)."""
SEND_MARGIN_S = 1.0
"""Training stops this long before the round's deadline, so that the update still arrives in time."""
Head = dict[str, NDArray[np.float32]]


def _secagg_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("cryptography") is not None


_SECAGG = _secagg_available()
"""Whether this agent can take part in secure-aggregation rounds (said in its presence)."""


def agent_version() -> str:
    try:
        from importlib.metadata import version

        return version("fedge")
    except Exception:  # not installed as a distribution
        return "0"


def _save_npz(path: Path, arrays: dict[str, NDArray[Any]]) -> None:
    buf = io.BytesIO()
    np.savez(buf, **arrays)  # type: ignore[arg-type]
    write_atomic(path, buf.getvalue())


class Agent:
    """``Agent(config).start()`` connects and serves until ``stop()``; inject a transport for tests."""

    def __init__(self, config: AgentConfig, transport: Transport | None = None) -> None:
        self.config = config
        self.topics = Topics(config.fleet)
        self.device = config.device_id
        root = config.state_dir
        self.artifacts_root = root / "artifacts"
        self.heads_dir = root / "heads"
        self.features_dir = root / "features"
        self.feature_cache = FeatureCache(self.features_dir)  # kept: rounds after the first read memory
        self.ledger = DeviceLedger(root / "privacy.json")
        self.personal_head_path = root / "personal_head.npz"
        self.state = AgentState.load(root / "state.json")
        # which back-ends work here: probed in child processes per installed model (edge_agent/backends.py)
        self.health = BackendHealth(root / "backends.json", config.backend, on_change=self._backends_changed)
        # signatures, forward-only rounds and versions (edge_agent/trust.py)
        self.trust = HubTrust(root, self.topics, config.hub_public_key, self.state.last_completed_round)
        self._held: dict[str, tuple[Callable[[str, bytes], None], bytes]] = {}  # refused for an unknown key
        self._transport = transport
        self._owns_transport = transport is None
        self._data: LocalData | None = None
        self._backends: tuple[str, ...] = ()
        self._cond = threading.Condition(threading.RLock())
        self._pending: dict[int, RoundAnnounce] = {}
        self._started: set[int] = set()  # rounds queued, running or done in this process
        self._jobs: queue.Queue[RoundAnnounce | None] = queue.Queue()
        self._worker: threading.Thread | None = None
        self._trainer: tuple[str, Any] | None = None  # (backbone sha256, Trainer), one open at a time
        self._trainer_dir: Path | None = None  # the install it was opened on (a re-install replaces it)
        self._unacked: dict[int, tuple[str, bytes]] = {}  # round -> (nonce, payload) published, not yet acked
        self._closed_round = 0  # the highest round the hub's result says is closed
        self._subscribed = False
        self._selection = SelectionWorker(self)  # source-model selection rounds (edge_agent/selection.py)
        self._secagg: dict[int, DeviceSession] = {}  # secure-aggregation rounds in progress (secrets in memory only)
        self._stopped = False

    # ----------------------------------------------------------------- lifecycle
    @property
    def data(self) -> LocalData:
        if self._data is None:
            raise RuntimeError("agent not started")
        return self._data

    def start(self, connect_timeout_s: float = 10.0) -> None:
        """Load local data (DataError if bad), connect, subscribe and announce presence."""
        from fedge.runtime.trainers import available_backends

        self._data = load_local(self.config.data)
        self._backends = tuple(available_backends())
        self.config.state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        self._lock_state_dir()
        secure_tree(self.config.state_dir)  # private: folders 0700, files 0600 (also what older agents left)
        for d in (self.artifacts_root, self.heads_dir, self.features_dir):
            d.mkdir(mode=0o700, exist_ok=True)
        self._load_outbox()
        self._worker = threading.Thread(target=self._work, name=f"fedge-agent-{self.device}", daemon=True)
        self._worker.start()
        self._probe_held_model()
        transport = self._transport
        mqtt = None
        if transport is None:
            from fedge.protocol.transport_mqtt import MqttTransport

            offline = encode(Presence(self.config.fleet, self.device, online=False, agent_version=agent_version()))
            mqtt = MqttTransport(
                self.config.broker,
                self.device,
                will=(self.topics.presence(self.device), offline, True),
                session_expiry_s=self.config.session_expiry_s,
            )
            self._transport = transport = mqtt
        # subscribe before connecting: a persistent session delivers its queued messages right after CONNACK
        self._subscribe(transport)
        self._subscribed = True
        add_on_connect = getattr(transport, "add_on_connect", None)
        if callable(add_on_connect):
            add_on_connect(self._on_connect)  # presence on every (re)connect (now, if already connected)
        else:
            self.publish_presence(online=True)
        if mqtt is not None:
            mqtt.connect(timeout_s=connect_timeout_s)
        log.info(
            "agent %s up: fleet %s, %d samples, backends %s, model %s, last round %d",
            self.device, self.config.fleet, len(self.data.y), ",".join(self._backends),
            self.state.model_version, self.state.last_completed_round,
        )

    def _subscribe(self, t: Transport) -> None:
        if self.trust.signing_required:  # the hub's key rotations first (PROTOCOL.md, "Signatures")
            t.subscribe(rotation_filter(self.config.fleet), self._on_rotation, qos=1)
        # per-topic size limits: only model/full is big
        t.subscribe(self.topics.model_full, self._guard(self._on_model_full, self.config.max_model_bytes), qos=1)
        t.subscribe(self.topics.model_head, self._guard(self._on_model_head, self.config.max_head_bytes), qos=1)
        t.subscribe(self.topics.announce, self._guard(self._on_announce, ANNOUNCE_FRAME_BYTES), qos=1)
        # the inbox carries SecAgg stage frames too: a complete graph of a few hundred devices is tens of KB
        t.subscribe(self.topics.device_inbox(self.device), self._guard(self._on_inbox, INBOX_FRAME_BYTES), qos=1)
        t.subscribe(self.topics.result, self._guard(self._on_result, ANNOUNCE_FRAME_BYTES), qos=1)
        t.subscribe(self.topics.hub_status, self._guard(self._on_hub_status, SMALL_FRAME_BYTES), qos=1)
        t.subscribe(self.topics.candidate_all, self._guard(self._selection.on_candidate, self.config.max_model_bytes),
                    qos=1)
        t.subscribe(self.topics.select_announce, self._guard(self._selection.on_announce, ANNOUNCE_FRAME_BYTES), qos=1)

    def _on_rotation(self, topic: str, payload: bytes) -> None:
        """Apply a key rotation, then re-check the frames refused for an unknown key (a retained model signed by
        the new key can arrive before the rotation that vouches for it)."""
        before = self.trust.rotation_seq
        self.trust.on_rotation(topic, payload)
        if self.trust.rotation_seq != before:
            held, self._held = self._held, {}
            for held_topic, (run, frame) in held.items():
                run(held_topic, frame)

    def _on_connect(self, *_: Any) -> None:
        if self._subscribed and not self._stopped:
            log.info("connected: publishing presence")
            self.publish_presence(online=True)
            self._republish_unacked("reconnected")

    def publish_presence(self, *, online: bool) -> None:
        if self._transport is None or (online and self._stopped):
            return  # never say "online" once stopping: a clean disconnect fires no will to undo it
        msg = Presence(
            self.config.fleet,
            self.device,
            online=online,
            # a DP device does not say how much data it holds
            n_samples=len(self._data.y) if self._data is not None and self.config.privacy is None else None,
            backends=self._backends,
            backend_faults={name: why[:200] for name, why in self.health.faults().items()},
            model_version=self.state.model_version,
            agent_version=agent_version(),
            dp=True,
            secagg=_SECAGG,
        )
        self._transport.publish(self.topics.presence(self.device), encode(msg), qos=1, retain=True)

    def _lock_state_dir(self) -> None:
        """One agent per state_dir: two agents sharing one would mix rounds, heads and privacy ledgers."""
        import fcntl

        fh = open(self.config.state_dir / ".lock", "a+")  # noqa: SIM115 - held for the agent's lifetime
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            fh.close()
            raise FedgeError(f"state_dir {self.config.state_dir} is in use by another agent process "
                             "(give each agent its own state_dir)") from None
        self._state_lock = fh

    def stop(self, timeout_s: float = 60.0) -> None:
        """Finish the running round (up to ``timeout_s``), say offline (retained), close the transport."""
        if self._stopped:
            return
        self._stopped = True
        self._jobs.put(None)
        if self._worker is not None:
            self._worker.join(timeout_s)
            if self._worker.is_alive():
                log.warning("training still running after %.0f s; leaving it", timeout_s)
        self.feature_cache.flush()
        if self._worker is None or not self._worker.is_alive():
            self._close_trainer()  # its worker process goes with the agent
        try:
            self.publish_presence(online=False)
        except FedgeError as exc:
            log.warning("could not publish offline presence: %s", exc)
        close: Callable[[], None] | None = getattr(self._transport, "close", None)
        if self._owns_transport and close is not None:
            close()
        lock = getattr(self, "_state_lock", None)
        if lock is not None:
            lock.close()  # releases the state_dir for the next agent process
        log.info("agent %s stopped", self.device)

    def wait_round_done(self, round_: int, timeout: float) -> bool:
        """Block until ``round_`` is completed (its update published) or ``timeout`` seconds pass."""
        with self._cond:
            return self._cond.wait_for(lambda: self.state.last_completed_round >= round_, timeout)

    # ----------------------------------------------------------------- handlers
    def _guard(self, handler: Callable[[Any], None], max_bytes: int) -> Callable[[str, bytes], None]:
        def run(topic: str, payload: bytes) -> None:
            if not payload:
                return
            try:
                msg = decode(payload, max_bytes=max_bytes)
            except DecodeError as exc:
                log.warning("ignoring malformed message on %s: %s", topic, exc)
                return
            if getattr(msg, "fleet", self.config.fleet) != self.config.fleet:
                log.warning("ignoring %s on %s: fleet %r is not ours", msg.type, topic, msg.fleet)
                return
            refused = self.trust.check(topic, payload, msg)  # unsigned, forged, replayed: logged, counted
            if refused == "unknown_key":  # perhaps signed by a key whose rotation has not arrived yet: kept
                self._held[topic] = (run, payload)  # (the latest frame per topic) for after the next rotation
            if refused is not None:
                return
            try:
                handler(msg)
            except Exception:  # a handler must never take the transport thread down
                log.exception("error handling %s on %s", msg.type, topic)

        return run

    def _on_model_full(self, msg: Any) -> None:
        if not isinstance(msg, ModelFull):
            log.warning("ignoring %s on the model/full topic", msg.type)
            return
        try:
            path, new = install_model_full(self.artifacts_root, msg)
        except (FedgeError, OSError, ValueError) as exc:
            log.error("rejected model/full for backbone %s: %s", msg.backbone_sha256[:16], exc)
            return
        log.info("backbone %s %s at %s", msg.backbone_sha256[:16], "installed" if new else "already held", path)
        if new:
            with self._cond:
                self.state.add_backbone(msg.backbone_sha256)
                self.state.save()
                self._prune_backbones()
            self.health.ensure_async(path)  # new artifacts: which back-ends work with them
        self._check_pending()

    def _on_model_head(self, msg: Any) -> None:
        if not isinstance(msg, ModelHead):
            log.warning("ignoring %s on the model/head topic", msg.type)
            return
        if not _VERSION.match(msg.version):
            log.error("ignoring model/head with unusable version name %r", msg.version)
            return
        path = self.heads_dir / f"{msg.version}.npz"
        if msg.version not in self.state.versions or not path.exists():
            bad = [k for k, v in msg.head.items() if v.dtype != np.float32]
            if bad or not msg.head:
                log.error("ignoring model/head %s: no head or non-float32 arrays %s", msg.version, bad)
                return
            _save_npz(path, dict(msg.head))
        with self._cond:
            for old in self.state.add_version(msg.version, msg.backbone_sha256):
                (self.heads_dir / f"{old}.npz").unlink(missing_ok=True)
            changed = self.state.model_version != msg.version
            self.state.model_version = msg.version
            self.state.save()
            self._prune_backbones()
        log.info("global model %s (backbone %s, round %s)", msg.version, msg.backbone_sha256[:16], msg.round)
        if changed and self._subscribed and not self._stopped:
            self.publish_presence(online=True)
        self._check_pending()

    def _prune_backbones(self) -> None:
        """Delete backbones no longer kept (current and previous), never one a queued or running round uses."""
        keep = self.state.backbones_to_keep() | {m.backbone_sha256 for m in self._pending.values()}
        if self._trainer is not None:
            keep.add(self._trainer[0])
        prune_backbones(self.config.state_dir, keep)

    def _on_announce(self, msg: Any) -> None:
        if not isinstance(msg, RoundAnnounce):
            log.warning("ignoring %s on the round/announce topic", msg.type)
            return
        with self._cond:
            reason = self._skip_reason(msg)
            if reason:
                log.info("ignoring announce of round %d: %s", msg.round, reason)
                return
            for older in [r for r in self._pending if r < msg.round]:  # one round is open at a time
                log.info("dropping pending round %d: round %d was announced", older, msg.round)
                del self._pending[older]
            if self._ready(msg):
                self._enqueue(msg)
            else:
                self._pending[msg.round] = msg
                log.info(
                    "round %d pending: waiting for model %s / backbone %s",
                    msg.round, msg.model_version, msg.backbone_sha256[:16],
                )

    def _on_inbox(self, msg: Any) -> None:
        if isinstance(msg, SecAggStage):
            with self._cond:
                session = self._secagg.get(msg.round)
            if session is None:
                log.warning("ignoring a secagg frame of round %d: no secure-aggregation round of ours", msg.round)
                return
            self._send_secagg(session.on_frame(msg))
        elif isinstance(msg, Ack):
            if self._settle(msg.round, msg.ref_nonce):
                log.info("hub acknowledged round %d (update %s)", msg.round, msg.ref_nonce[:8])
            else:
                log.warning("ignoring an ack of round %d for update %s: not an update of ours awaiting an ack",
                            msg.round, msg.ref_nonce[:8])
        elif isinstance(msg, Reject):
            log.warning("hub rejected round %s: %s (%s)", msg.round, msg.reason, msg.detail)
            if msg.round is not None and msg.ref_nonce is not None:
                self._settle(msg.round, msg.ref_nonce)  # refused: the same bytes again would be refused again
            with self._cond:
                self.state.last_reject = {
                    "round": msg.round, "reason": str(msg.reason), "detail": msg.detail,
                    "ref_nonce": msg.ref_nonce, "ts": msg.ts,
                }
                self.state.save()
        else:
            log.warning("ignoring %s in the device inbox", msg.type)

    def _on_result(self, msg: Any) -> None:
        if not isinstance(msg, RoundResult):
            log.warning("ignoring %s on the round/result topic", msg.type)
            return
        with self._cond:
            self._closed_round = max(self._closed_round, msg.round)  # a training of it stops at the next batch
            closed = [r for r in self._unacked if r <= msg.round]
            for rnd in [r for r in self._secagg if r <= msg.round]:
                del self._secagg[rnd]  # its secrets go with it
        for rnd in closed:
            if self._settle(rnd, None):
                log.info("round %d closed (%s) before our update was acknowledged: not sent again", rnd, msg.status)

    def _on_hub_status(self, msg: Any) -> None:
        if isinstance(msg, HubStatus) and msg.online:  # the hub (re)subscribed before it said so
            self._republish_unacked("hub online")

    # ----------------------------------------------------------------- unacknowledged updates
    def _load_outbox(self) -> None:
        """Updates published before a restart and never acknowledged: sent again until acked or closed."""
        for path in sorted((self.config.state_dir / "outbox").glob("round-*.bin")):
            try:
                rnd = int(path.stem.removeprefix("round-"))
                payload = path.read_bytes()
                msg = decode(payload)
            except (ValueError, FedgeError, OSError) as exc:
                log.warning("dropping unreadable outbox file %s: %s", path, exc)
                path.unlink(missing_ok=True)
                continue
            if isinstance(msg, ModelUpdate) and msg.round == rnd:
                self._unacked[rnd] = (msg.nonce, payload)

    def _settle(self, round_id: int, nonce: str | None) -> bool:
        """Forget the unacknowledged update of ``round_id`` (only if its nonce is ``nonce``, unless None)."""
        with self._cond:
            held = self._unacked.get(round_id)
            if held is None or (nonce is not None and held[0] != nonce):
                return False
            del self._unacked[round_id]
            self._outbox(round_id).unlink(missing_ok=True)
            return True

    def _republish_unacked(self, why: str) -> None:
        """Publish every unacknowledged update again, byte for byte (same nonce: the hub counts it once)."""
        connected = getattr(self._transport, "connected", None)
        if self._transport is None or self._stopped or (isinstance(connected, threading.Event)
                                                         and not connected.is_set()):
            return
        with self._cond:
            pending = sorted(self._unacked.items())
        for rnd, (nonce, payload) in pending:
            log.info("round %d: update %s not acknowledged yet: sent again (%s)", rnd, nonce[:8], why)
            self._transport.publish(self.topics.update(self.device), payload, qos=1)

    # ----------------------------------------------------------------- round bookkeeping
    def _skip_reason(self, msg: RoundAnnounce) -> str | None:
        try:
            artifacts_dir(self.artifacts_root, msg.backbone_sha256)
        except ArtifactError as exc:
            return str(exc)
        if msg.round <= self.state.last_completed_round:
            return f"stale (last completed round is {self.state.last_completed_round})"
        if self.device not in msg.selected:
            return "this device is not selected"
        if msg.deadline <= time.time():
            return f"deadline passed {time.time() - msg.deadline:.1f} s ago"
        if msg.round in self._started:
            return "duplicate (already started)"
        return None

    def _ready(self, msg: RoundAnnounce) -> bool:
        return (
            self.state.versions.get(msg.model_version) is not None
            and (self.heads_dir / f"{msg.model_version}.npz").exists()
            and is_installed(self.artifacts_root, msg.backbone_sha256)
        )

    def _enqueue(self, msg: RoundAnnounce) -> None:
        held = self.state.versions.get(msg.model_version)
        if held != msg.backbone_sha256:
            log.error(
                "ignoring round %d: model %s is over backbone %s, the announce says %s",
                msg.round, msg.model_version, (held or "?")[:16], msg.backbone_sha256[:16],
            )
            return
        self._pending.pop(msg.round, None)
        self._started.add(msg.round)
        self._jobs.put(msg)

    def _check_pending(self) -> None:
        with self._cond:
            for rnd, msg in sorted(self._pending.items()):
                reason = self._skip_reason(msg)
                if reason:
                    log.info("dropping pending round %d: %s", rnd, reason)
                    del self._pending[rnd]
                elif self._ready(msg):
                    self._enqueue(msg)

    # ----------------------------------------------------------------- training (worker thread)
    def _work(self) -> None:
        while True:
            try:
                msg = self._jobs.get(timeout=RETRY_S)
            except queue.Empty:
                self._republish_unacked("no ack yet")
                continue
            if msg is None:
                return
            try:
                (self._selection.run if msg.candidates else self._run_round)(msg)
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
                    self._decline(msg, reason, detail)
                except Exception:
                    log.exception("could not decline round %d", msg.round)
                    with self._cond:
                        self._started.discard(msg.round)  # a redelivered announce may retry

    def _trainer_for(self, backbone_sha256: str) -> Any:
        """The trainer for ``backbone_sha256``: the back-end ``self.health`` chooses (probed in child processes),
        run in a worker process (``IsolatedTrainer``), so that a native crash raises ``TrainerCrash`` here."""
        from fedge.runtime.trainers.isolated import IsolatedTrainer

        folder = artifacts_dir(self.artifacts_root, backbone_sha256)  # the verified install in use
        backend = self.health.choose(folder)  # TrainerCrash when no back-end works here
        held = self._trainer
        if held is None or held[0] != backbone_sha256 or self._trainer_dir != folder or held[1].name != backend \
                or not held[1].alive:
            self._close_trainer()
            self._trainer_dir = folder
            trainer = IsolatedTrainer(folder, backend)
            self._trainer = (backbone_sha256, trainer)
            log.info("opened %s trainer for backbone %s (worker pid %d)", backend, backbone_sha256[:16], trainer.pid)
            return trainer
        return held[1]

    def _close_trainer(self) -> None:
        held, self._trainer = self._trainer, None
        if held is not None:
            held[1].close()

    def _trainer_crashed(self, exc: TrainerCrash) -> None:
        """A back-end crashed, hung or failed during a round: mark it unusable (``auto`` moves on to the next) and
        drop its worker."""
        if exc.backend in self._backends and exc.backend not in self.health.faults():  # not "auto", not yet known
            self.health.mark(exc.backend, exc.reason)
        held = self._trainer
        if held is not None and held[1].name == exc.backend:
            self._close_trainer()

    def _probe_held_model(self) -> None:
        """At start: probe the back-ends over the held model's artifacts in the background (when installed)."""
        sha = self.state.versions.get(self.state.model_version or "")
        if sha is None or not is_installed(self.artifacts_root, sha):
            return
        self.health.ensure_async(artifacts_dir(self.artifacts_root, sha))

    def _backends_changed(self) -> None:
        if self._subscribed and not self._stopped:
            self.publish_presence(online=True)  # the hub and the dashboard see which back-ends are unusable

    def _inputs(self, backbone_sha256: str) -> NDArray[np.float32]:
        manifest = load_manifest(artifacts_dir(self.artifacts_root, backbone_sha256))
        shape = manifest.input.shape
        y = np.asarray(self.data.y)
        bad = y[(y < 0) | (y >= manifest.num_classes)]
        if bad.size:
            raise DataError(f"{self.data.path}: label {int(bad[0])} is outside [0, {manifest.num_classes}) "
                            f"({bad.size} of {y.size} labels; the model has {manifest.num_classes} classes)")
        x = np.asarray(self.data.x, dtype=np.float32)
        if x.shape[1:] != shape:
            if int(np.prod(x.shape[1:])) != int(np.prod(shape)):
                raise DataError(f"local data {self.data.path} has samples of shape {x.shape[1:]}, model wants {shape}")
            x = x.reshape((x.shape[0], *shape))
        return x

    def _run_round(self, msg: RoundAnnounce) -> None:
        from fedge.core.training import evaluate

        with self._cond:
            reason = self._skip_reason_late(msg)
        if reason:
            log.info("not training round %d: %s", msg.round, reason)
            return
        sent = self._outbox(msg.round)
        if sent.is_file():  # written before a crash: send those exact bytes again, never a freshly noised update
            self._publish_update(msg.round, sent.read_bytes(), None, None)
            log.info("round %d: update from before the restart sent again", msg.round)
            return
        if msg.local_epochs > self.config.max_epochs:
            self._decline(msg, DeclineReason.OVER_LIMITS, f"{msg.local_epochs} local epochs announced; this device "
                          f"trains at most {self.config.max_epochs}")
            return
        unmet = not_eligible(self.config.eligibility)  # power, battery, link, load: read now, just before training
        if unmet is not None:
            self._decline(msg, DeclineReason.NOT_ELIGIBLE, unmet)
            return
        dp = self._dp_decision(msg)
        if dp is False:
            return
        session = self._secagg_session(msg, dp)
        if session is False:
            return
        # training stops at the deadline (less a margin to send), at the device's own time limit, or once the round
        # closed; checked before every batch
        t_end = min(msg.deadline - SEND_MARGIN_S, time.time() + self.config.max_round_s)

        def stop() -> bool:
            return time.time() >= t_end or self._closed_round >= msg.round

        trainer = self._trainer_for(msg.backbone_sha256)
        global_head = load_head(self.heads_dir / f"{msg.model_version}.npz")
        expected = trainer.get_head()
        if {k: v.shape for k, v in global_head.items()} != {k: np.shape(v) for k, v in expected.items()}:
            raise FedgeError(f"head of model {msg.model_version} does not fit the backbone's head layout")
        y_all = np.asarray(self.data.y, dtype=np.int64)
        feats_all = self.feature_cache.get(
            trainer, self._inputs(msg.backbone_sha256), self.data.sha256, msg.backbone_sha256
        )
        train_idx, val_idx = split_indices(len(y_all), self.config.validation_fraction, self.data.sha256)
        feats, y = feats_all[train_idx], y_all[train_idx]  # the validation rows never train
        trainer.set_head(global_head)
        before = evaluate(trainer, feats, y)
        loss_before, acc_before = before.loss, before.accuracy
        rng = np.random.default_rng([self.config.seed, msg.round])
        # the seed's lambda*||w - w0||^2 acts in local training too (and again at the hub's aggregation)
        w0 = load_head(artifacts_dir(self.artifacts_root, msg.backbone_sha256))  # the backbone's source head
        pull = Prox(w0, msg.proximal_lambda) if msg.proximal_lambda else None
        result = fit(trainer, feats, y, msg.local_epochs, msg.lr, rng, prox=pull, stop=stop)
        if result.stopped and (self._closed_round >= msg.round or result.steps == 0):
            if self._closed_round >= msg.round:
                log.info("round %d closed while training: no update", msg.round)
                self._mark_done(msg.round)
            else:
                self._decline(msg, DeclineReason.OVER_LIMITS, "no time left to train before the deadline or the "
                              f"device's limit of {self.config.max_round_s:g} s")
            return
        after = evaluate(trainer, feats, y)
        loss_after, acc_after = after.loss, after.accuracy
        trained = {k: np.asarray(v, dtype=np.float32) for k, v in trainer.get_head().items()}
        delta: dict[str, NDArray[np.generic]] = {
            k: (trained[k] - global_head[k]).astype(np.float32) for k in global_head
        }
        if not all(np.isfinite(v).all() for v in delta.values()):  # plain and SecAgg rounds alike
            raise FedgeError(f"round {msg.round}: training diverged (the update is not finite)")
        metrics = {
            "loss_before": float(loss_before), "loss_after": float(loss_after),
            "acc_before": float(acc_before), "acc_after": float(acc_after),
            "train_seconds": float(result.seconds), "n_steps": float(result.steps),
            f"backend_{trainer.name}": 1.0,  # metrics are numbers on the wire: the backend is a one-hot key
        }
        if result.stopped:  # the deadline or the device's time limit came first: the update covers fewer steps
            metrics["stopped_early"] = 1.0
            log.warning("round %d: training stopped after %d steps (deadline or max_round_s)", msg.round, result.steps)
        n_samples = len(y)
        personal = self._personal_head(trainer, trained, global_head, feats, y, msg, stop)
        if session is not None:  # secure aggregation: only the masked, quantised update leaves the device
            self._secagg_input(msg, session, delta, dp, personal)
            log.info("round %d: %s, %d steps in %.2f s, loss %.4f -> %.4f, acc %.3f -> %.3f; masked input %s",
                     msg.round, trainer.name, result.steps, result.seconds, loss_before, loss_after, acc_before,
                     acc_after, "sent" if session.masked_sent else "waits for the relayed shares")
            return
        if dp is None and len(val_idx):  # federated evaluation (never under DP: it describes the local data)
            local = local_only_head(trainer, w0, feats, y, self.config.local_only_epochs, msg.lr, self.config.seed,
                                    self.config.state_dir / "local_only" / f"{msg.backbone_sha256[:16]}-"
                                    f"{self.data.sha256[:16]}.npz")
            heads = {"source": w0, "global": global_head, "trained": trained, "personal": personal,
                     "local_only": local}
            metrics.update(head_scores(trainer, heads, feats_all[val_idx], y_all[val_idx]))
        if dp is not None:  # clip + the device's share of the noise; nothing about the local data in the clear
            private, norm = privatize(delta, dp, np.random.default_rng())  # OS entropy: unpredictable noise
            delta = dict(private)
            log.info("round %d: %s DP, update norm %.4f clipped to %.4g, noise std %.4g", msg.round, dp.mode,
                     norm, dp.clip, dp.device_noise_std())
            metrics, n_samples = {}, 1
        update = ModelUpdate(
            self.config.fleet, msg.round, self.device, msg.model_version, n_samples, delta, metrics
        )
        if not self._publish_update(msg.round, encode(update), dp, personal):
            return
        log.info(
            "round %d: %s, %d steps in %.2f s, loss %.4f -> %.4f, acc %.3f -> %.3f; update %s published",
            msg.round, trainer.name, result.steps, result.seconds, loss_before, loss_after,
            acc_before, acc_after, update.nonce[:8],
        )

    def _personal_head(self, trainer: Any, trained: dict[str, NDArray[np.float32]],
                       global_head: dict[str, NDArray[np.float32]], feats: NDArray[np.float32],
                       y: NDArray[np.int64], msg: RoundAnnounce,
                       stop: Callable[[], bool] | None = None) -> dict[str, NDArray[np.float32]]:
        """The head this device keeps for its own predictions (never sent). ``finetune``: the head it trained
        from the global one. ``ditto``: its previous personal head (or the global one), trained further with a
        pull ``mu * ||v - w_global||^2`` toward the new global head."""
        if self.config.personalization != "ditto":
            return trained
        start = global_head
        if self.personal_head_path.is_file():
            try:
                previous = load_head(self.personal_head_path)
                if {k: v.shape for k, v in previous.items()} == {k: v.shape for k, v in global_head.items()}:
                    start = previous
            except ArtifactError:
                log.warning("personal head %s unreadable: starting from the global head", self.personal_head_path)
        trainer.set_head(start)
        fit(trainer, feats, y, msg.local_epochs, msg.lr, np.random.default_rng([self.config.seed, msg.round, 7]),
            prox=Prox(global_head, self.config.ditto_mu), stop=stop)
        return {k: np.asarray(v, dtype=np.float32) for k, v in trainer.get_head().items()}

    def _outbox(self, round_id: int) -> Path:
        return self.config.state_dir / "outbox" / f"round-{round_id}.bin"

    def _publish_update(self, round_id: int, payload: bytes, dp: DpParams | None,
                        trained: dict[str, NDArray[np.float32]] | None) -> bool:
        """Record (DP ledger, outbox), publish, then mark the round completed; False if it already was."""
        with self._cond:
            if round_id <= self.state.last_completed_round:
                log.info("round %d already completed; not publishing again", round_id)
                return False
            if self._transport is None:
                raise FedgeError("no transport: the agent was not started")
            outbox = self._outbox(round_id)
            if dp is not None:  # recorded before it leaves the device: a crash over-counts, never under-counts
                self.ledger.record(round_id, dp)
            write_atomic(outbox, payload)  # a crash from here on re-sends these bytes (kept until acked or closed)
            self._unacked[round_id] = (self._nonce_of(payload), payload)
            self._transport.publish(self.topics.update(self.device), payload, qos=1)
            if trained is not None:
                _save_npz(self.personal_head_path, dict(trained))
            self.state.last_completed_round = round_id
            self.state.save()
            self._cond.notify_all()
        return True

    @staticmethod
    def _nonce_of(payload: bytes) -> str:
        msg = decode(payload)
        if not isinstance(msg, ModelUpdate):
            raise FedgeError(f"the outbox holds a {msg.type}, not an update")
        return msg.nonce

    def _mark_done(self, round_id: int) -> None:
        with self._cond:
            self.state.last_completed_round = max(self.state.last_completed_round, round_id)
            self.state.save()
            self._cond.notify_all()

    def _dp_decision(self, msg: RoundAnnounce) -> DpParams | Literal[False] | None:
        """The round's DP parameters (None: not private), or False after declining it."""
        try:
            dp = announced_dp(msg)
        except ValueError as exc:
            self._decline(msg, DeclineReason.MODE_NOT_ALLOWED, f"invalid DP parameters: {exc}")
            return False
        why = decline_reason(self.config.privacy, dp, self.ledger, secure=is_secagg(msg))
        if why is not None:
            self._decline(msg, *why)
            return False
        return dp

    def _secagg_session(self, msg: RoundAnnounce, dp: DpParams | None) -> DeviceSession | Literal[False] | None:
        """A secure-aggregation round's session, its advertise frame published (None: a plain round; False after
        declining an unusable setup, or skipping a round this device joined before a restart)."""
        if not is_secagg(msg):
            return None
        joined = self.config.state_dir / "secagg" / f"joined-{msg.round}"
        if joined.exists():  # its keys and seed died with the process: joining again would break its neighbours
            self._decline(msg, DeclineReason.NOT_ELIGIBLE, "restarted after joining this secure-aggregation round: "
                          "its keys are gone")  # the hub stops waiting for it
            return False
        try:
            why = distributed_problem(dp, len(msg.selected), msg.secagg_clip, msg.secagg_scale)
            if why is not None:
                raise FedgeError(why)
            session = DeviceSession(msg, self.device)
        except (FedgeError, ImportError) as exc:
            self._decline(msg, DeclineReason.MODE_NOT_ALLOWED, f"unusable secure-aggregation setup: {exc}")
            return False
        for old in joined.parent.glob("joined-*") if joined.parent.is_dir() else ():
            old.unlink(missing_ok=True)
        write_atomic(joined, b"")  # before the keys leave the device
        with self._cond:
            self._secagg[msg.round] = session
        self._send_secagg(session.start())
        return session

    def _send_secagg(self, frames: list[bytes]) -> None:
        if self._transport is None:
            return
        for frame in frames:
            self._transport.publish(self.topics.secagg(self.device), frame, qos=1)

    def _secagg_input(self, msg: RoundAnnounce, session: DeviceSession, delta: dict[str, NDArray[np.generic]],
                      dp: DpParams | None, personal: dict[str, NDArray[np.float32]]) -> None:
        """Quantise (under distributed DP: clip and add this device's share of the noise first) and hand the
        update to the session; the round counts as completed here (the personal head is kept)."""
        q = private_input(delta, sorted(delta), session.setup, dp, np.random.default_rng())  # OS entropy
        with self._cond:
            if msg.round <= self.state.last_completed_round:
                return
            if dp is not None:  # recorded before anything derived from the update leaves the device
                self.ledger.record(msg.round, dp)
            if self.config.keep_secagg_inputs:
                _save_npz(self.config.state_dir / "secagg" / f"round-{msg.round}.npz",
                          {"q": q.astype(np.uint64), "ring_bits": np.asarray(session.setup.config.ring_bits)})
            _save_npz(self.personal_head_path, dict(personal))
            self.state.last_completed_round = msg.round
            self.state.save()
            self._cond.notify_all()
        self._send_secagg(session.set_input(q))

    def _decline(self, msg: RoundAnnounce, reason: DeclineReason, detail: str) -> None:
        log.warning("declining round %d: %s (%s)", msg.round, reason, detail)
        if self._transport is None:
            return
        out = Decline(self.config.fleet, msg.round, self.device, reason, detail)
        self._transport.publish(self.topics.decline(self.device), encode(out), qos=1)
        self._mark_done(msg.round)

    def _skip_reason_late(self, msg: RoundAnnounce) -> str | None:
        if msg.round <= self.state.last_completed_round:
            return "already completed"
        if msg.deadline <= time.time():
            return "deadline passed while queued"
        return None


__all__ = ["Agent", "agent_version"]
