"""The edge agent: hold the model, answer round announces with one head update each.

Message handlers run on the transport's thread and only record state, install artifacts and queue work; rounds
run on the :class:`~fedge.edge_agent.worker.RoundWorker`'s thread, through the round core. See ARCHITECTURE.md
and PROTOCOL.md.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import numpy as np

from fedge.edge_agent.artifacts import artifacts_dir, install_model_full, is_installed, prune_backbones
from fedge.edge_agent.backends import BackendHealth
from fedge.edge_agent.config import AgentConfig
from fedge.edge_agent.ledger import DeviceLedger
from fedge.edge_agent.outbox import FRESH_S, Outbox
from fedge.edge_agent.selection import SelectionWorker
from fedge.edge_agent.state import AgentState
from fedge.edge_agent.trust import HubTrust
from fedge.edge_agent.worker import RoundWorker, save_npz
from fedge.protocol.codec import ANNOUNCE_FRAME_BYTES, SMALL_FRAME_BYTES, decode, encode
from fedge.protocol.errors import ArtifactError, DecodeError, FedgeError
from fedge.protocol.fsio import secure_tree
from fedge.protocol.messages import (
    Ack,
    HubStatus,
    ModelFull,
    ModelHead,
    Presence,
    Reject,
    RejectReason,
    RoundAnnounce,
    RoundResult,
    SecAggStage,
)
from fedge.protocol.signing import rotation_filter, rotation_topic
from fedge.protocol.topics import Topics, valid_id
from fedge.protocol.transport import Transport
from fedge.runtime.data import LocalData, load_local
from fedge.runtime.features import FeatureCache

log = logging.getLogger("fedge.agent")
_VERSION = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$")
INBOX_FRAME_BYTES = ANNOUNCE_FRAME_BYTES
"""Largest frame decoded from ``device/<id>/+`` (ack, reject, SecAgg stage messages)."""

__all__ = ["Agent", "agent_version"]

_CLOSED = (RejectReason.NO_OPEN_ROUND, RejectReason.STALE_ROUND)
"""Reject reasons that mean "that round is closed": after an ack of the same update, a resent copy was late."""


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


class Agent:
    """``Agent(config).start()`` connects and serves until ``stop()``; inject a transport for tests."""

    def __init__(self, config: AgentConfig, transport: Transport | None = None) -> None:
        self.config = config
        self.topics = Topics(config.fleet)
        self.device = config.device_id
        root = config.state_dir
        self.artifacts_root = root / "artifacts"
        self.heads_dir = root / "heads"
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
        self.outbox = Outbox(root / "outbox")
        self.worker = RoundWorker(config, self.state, self._cond, self.outbox, self._publish, lambda: self.data,
                                  lambda: self._republish_unacked("no ack yet", FRESH_S), self._run_selection,
                                  self.health)
        self._selection = SelectionWorker(self.worker, self._cond)  # source-model selection rounds
        self._subscribed = False
        self._stopped = False
        self._hub_online = False  # the last hub status said online
        self._exact: set[str] = set()  # exact topics subscribed after start (next rotation, candidates)
        self._on_candidate = self._guard(self._selection.on_candidate, config.max_model_bytes)  # one handler object:
        # one call per message however many of its filters match (protocol/transport_mqtt.py)

    def _run_selection(self, msg: RoundAnnounce) -> None:
        self._selection.run(msg)

    # ----------------------------------------------------------------- lifecycle
    @property
    def data(self) -> LocalData:
        if self._data is None:
            raise RuntimeError("agent not started")
        return self._data

    @property
    def feature_cache(self) -> FeatureCache:
        return self.worker.feature_cache

    @property
    def ledger(self) -> DeviceLedger:
        return self.worker.ledger

    def start(self, connect_timeout_s: float = 10.0) -> None:
        """Load local data (DataError if bad), connect, subscribe and announce presence."""
        from fedge.runtime.trainers import available_backends

        self._data = load_local(self.config.data)
        self._backends = tuple(available_backends())
        self.config.state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        self._state_lock = lock_state_dir(self.config.state_dir)
        secure_tree(self.config.state_dir)  # private: folders 0700, files 0600 (also what older agents left)
        for d in (self.artifacts_root, self.heads_dir, self.config.state_dir / "features"):
            d.mkdir(mode=0o700, exist_ok=True)
        self.outbox.load()
        self.worker.installed = self._backends
        self.worker.start()
        self._probe_held_model()
        transport = self._transport
        mqtt = None
        if transport is None:
            from fedge.protocol.transport_mqtt import MqttTransport

            offline = encode(Presence(self.config.fleet, self.device, online=False, agent_version=agent_version()))
            will = (self.topics.presence(self.device), offline, True)
            mqtt = MqttTransport(self.config.broker, self.device, will=will,
                                 session_expiry_s=self.config.session_expiry_s)
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
        log.info("agent %s up: fleet %s, %d samples, backends %s, model %s, last round %d", self.device,
                 self.config.fleet, len(self.data.y), ",".join(self._backends), self.state.model_version,
                 self.state.last_completed_round)

    def _publish(self, topic: str, payload: bytes) -> None:
        if self._transport is None:
            raise FedgeError("no transport: the agent was not started")
        self._transport.publish(topic, payload, qos=1)

    def _subscribe(self, t: Transport) -> None:
        # Retained messages are read through exact-topic subscriptions (PROTOCOL.md, "What fedge needs from a
        # broker": RabbitMQ sends none through + or #): the next key rotation, a selection round's candidates and
        # everything below by name; the wildcards only catch live messages and brokers that do send retained ones.
        if self.trust.signing_required:  # the hub's key rotations first (PROTOCOL.md, "Signatures")
            t.subscribe(rotation_filter(self.config.fleet), self._on_rotation, qos=1)
            self._subscribe_next_rotation(t)
        # per-topic size limits: only model/full is big
        t.subscribe(self.topics.model_full, self._guard(self._on_model_full, self.config.max_model_bytes), qos=1)
        t.subscribe(self.topics.model_head, self._guard(self._on_model_head, self.config.max_head_bytes), qos=1)
        t.subscribe(self.topics.announce, self._guard(self._on_announce, ANNOUNCE_FRAME_BYTES), qos=1)
        # the inbox carries SecAgg stage frames too: a complete graph of a few hundred devices is tens of KB
        t.subscribe(self.topics.device_inbox(self.device), self._guard(self._on_inbox, INBOX_FRAME_BYTES), qos=1)
        t.subscribe(self.topics.result, self._guard(self._on_result, ANNOUNCE_FRAME_BYTES), qos=1)
        t.subscribe(self.topics.hub_status, self._guard(self._on_hub_status, SMALL_FRAME_BYTES), qos=1)
        t.subscribe(self.topics.candidate_all, self._on_candidate, qos=1)
        t.subscribe(self.topics.select_announce, self._guard(self._on_select_announce, ANNOUNCE_FRAME_BYTES), qos=1)

    def _subscribe_next_rotation(self, t: Transport) -> None:
        """The exact topic of the rotation after the last one applied (retained there)."""
        topic = rotation_topic(self.config.fleet, self.trust.rotation_seq + 1)
        if topic not in self._exact:
            self._exact.add(topic)
            t.subscribe(topic, self._on_rotation, qos=1)

    def _on_select_announce(self, msg: Any) -> None:
        """A selection round names its candidates: their retained artifacts are read by exact topic."""
        transport = self._transport
        if isinstance(msg, RoundAnnounce) and transport is not None:
            for name in msg.candidates:
                if not valid_id(name):
                    continue
                topic = self.topics.candidate(name)
                if topic not in self._exact:
                    self._exact.add(topic)
                    transport.subscribe(topic, self._on_candidate, qos=1)
        self._selection.on_announce(msg)

    def _on_rotation(self, topic: str, payload: bytes) -> None:
        """Apply a key rotation, then re-check the frames refused for an unknown key (a retained model signed by
        the new key can arrive before the rotation that vouches for it)."""
        before = self.trust.rotation_seq
        self.trust.on_rotation(topic, payload)
        if self.trust.rotation_seq != before:
            if self._transport is not None:
                self._subscribe_next_rotation(self._transport)
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
            self.config.fleet, self.device, online=online,
            # a DP device does not say how much data it holds
            n_samples=len(self._data.y) if self._data is not None and self.config.privacy is None else None,
            backends=self._backends, model_version=self.state.model_version, agent_version=agent_version(),
            backend_faults={name: why[:200] for name, why in self.health.faults().items()},
            dp=True, secagg=_SECAGG,
        )
        self._transport.publish(self.topics.presence(self.device), encode(msg), qos=1, retain=True)

    def stop(self, timeout_s: float = 60.0) -> None:
        """Finish the running round (up to ``timeout_s``), say offline (retained), close the transport."""
        if self._stopped:
            return
        self._stopped = True
        self.worker.stop(timeout_s)
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
        """Block until ``round_`` is answered (its update, report or decline published) or ``timeout`` seconds
        pass."""
        with self._cond:
            return self._cond.wait_for(lambda: self.worker.done_round >= round_, timeout)

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
            save_npz(path, dict(msg.head))
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
        in_use = self.worker.trainer_backbone()
        if in_use is not None:
            keep.add(in_use)
        prune_backbones(self.config.state_dir, keep)

    def _on_announce(self, msg: Any) -> None:
        if not isinstance(msg, RoundAnnounce):
            log.warning("ignoring %s on the round/announce topic", msg.type)
            return
        with self._cond:
            if msg.buffer_k is not None:  # the version (and attempt) the hub is on now: an update sent now goes
                self.worker.announced = (msg.round, msg.model_version, msg.buffer_attempt)  # into its buffer
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
                log.info("round %d pending: waiting for model %s / backbone %s", msg.round, msg.model_version,
                         msg.backbone_sha256[:16])

    def _on_inbox(self, msg: Any) -> None:
        if isinstance(msg, SecAggStage):
            self.worker.on_secagg(msg)
        elif isinstance(msg, Ack):
            if self.outbox.settle(msg.round, msg.ref_nonce):
                log.info("hub acknowledged round %d (update %s)", msg.round, msg.ref_nonce[:8])
            else:
                log.warning("ignoring an ack of round %d for update %s: not an update of ours awaiting an ack",
                            msg.round, msg.ref_nonce[:8])
        elif isinstance(msg, Reject):
            if (msg.round is not None and msg.ref_nonce is not None and msg.reason in _CLOSED
                    and self.outbox.was_acked(msg.round, msg.ref_nonce)):
                log.info("hub refused a copy of our acknowledged update of round %d: %s (the round is closed)",
                         msg.round, msg.reason)
                return
            log.warning("hub rejected round %s: %s (%s)", msg.round, msg.reason, msg.detail)
            if msg.round is not None and msg.ref_nonce is not None:
                self.outbox.settle(msg.round, msg.ref_nonce)  # refused: the same bytes again would be refused again
            with self._cond:
                self.state.last_reject = {"round": msg.round, "reason": str(msg.reason), "detail": msg.detail,
                                          "ref_nonce": msg.ref_nonce, "ts": msg.ts}
                self.state.save()
        else:
            log.warning("ignoring %s in the device inbox", msg.type)

    def _on_result(self, msg: Any) -> None:
        if not isinstance(msg, RoundResult):
            log.warning("ignoring %s on the round/result topic", msg.type)
            return
        with self._cond:
            self.worker.closed_round = max(self.worker.closed_round, msg.round)  # its training stops at the next batch
            for rnd in [r for r in self.worker.secagg if r <= msg.round]:
                del self.worker.secagg[rnd]  # its secrets go with it
        for rnd in self.outbox.settle_up_to(msg.round):
            log.info("round %d closed (%s) before our update was acknowledged: not sent again", rnd, msg.status)

    def _probe_held_model(self) -> None:
        """At start: probe the back-ends over the held model's artifacts in the background (when installed)."""
        sha = self.state.versions.get(self.state.model_version or "")
        if sha is None or not is_installed(self.artifacts_root, sha):
            return
        self.health.ensure_async(artifacts_dir(self.artifacts_root, sha))

    def _backends_changed(self) -> None:
        if self._subscribed and not self._stopped:
            self.publish_presence(online=True)  # the hub and the dashboard see which back-ends are unusable

    def _on_hub_status(self, msg: Any) -> None:
        online = isinstance(msg, HubStatus) and msg.online
        if online and not self._hub_online:  # a hub that came up may not have this device's presence: a broker need
            log.info("hub online: publishing presence")  # not send retained ones through its presence/+ filter
            self.publish_presence(online=True)
        self._hub_online = online
        if online:  # the hub (re)subscribed before it said so
            self._republish_unacked("hub online", FRESH_S)

    def _republish_unacked(self, why: str, min_age_s: float = 0.0) -> None:
        connected = getattr(self._transport, "connected", None)
        if self._transport is None or self._stopped or (isinstance(connected, threading.Event)
                                                         and not connected.is_set()):
            return
        self.outbox.resend(lambda payload: self._publish(self.topics.update(self.device), payload), why, min_age_s)

    # ----------------------------------------------------------------- pending rounds
    def _skip_reason(self, msg: RoundAnnounce) -> str | None:
        try:
            artifacts_dir(self.artifacts_root, msg.backbone_sha256)
        except ArtifactError as exc:
            return str(exc)
        if self.worker.answered_already(msg):
            return f"stale (last completed round is {self.state.last_completed_round})"
        if self.device not in msg.selected:
            return "this device is not selected"
        if msg.deadline <= time.time():
            return f"deadline passed {time.time() - msg.deadline:.1f} s ago"
        if msg.buffer_k is not None and (msg.round, msg.model_version,
                                         msg.buffer_attempt) in self.worker.versions_started:
            return "duplicate (already started on this model version and attempt)"
        if msg.buffer_k is None and msg.round in self.worker.started:
            return "duplicate (already started)"
        return None

    def _ready(self, msg: RoundAnnounce) -> bool:
        return (self.state.versions.get(msg.model_version) is not None
                and (self.heads_dir / f"{msg.model_version}.npz").exists()
                and is_installed(self.artifacts_root, msg.backbone_sha256))

    def _enqueue(self, msg: RoundAnnounce) -> None:
        held = self.state.versions.get(msg.model_version)
        if held != msg.backbone_sha256:
            log.error("ignoring round %d: model %s is over backbone %s, the announce says %s", msg.round,
                      msg.model_version, (held or "?")[:16], msg.backbone_sha256[:16])
            return
        self._pending.pop(msg.round, None)
        log.info("round %d announced: queued", msg.round)
        self.worker.enqueue(msg)

    def _check_pending(self) -> None:
        with self._cond:
            for rnd, msg in sorted(self._pending.items()):
                reason = self._skip_reason(msg)
                if reason:
                    log.info("dropping pending round %d: %s", rnd, reason)
                    del self._pending[rnd]
                elif self._ready(msg):
                    self._enqueue(msg)


def lock_state_dir(state_dir: Path) -> IO[str]:
    """One agent per state_dir (two agents sharing one would mix rounds, heads and privacy ledgers): an exclusive
    lock on ``state_dir/.lock``, held as long as the returned file stays open."""
    import fcntl

    fh = open(state_dir / ".lock", "a+")  # noqa: SIM115 - held for the agent's lifetime
    try:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        fh.close()
        raise FedgeError(f"state_dir {state_dir} is in use by another agent process "
                         "(give each agent its own state_dir)") from None
    return fh
