"""The hub daemon: the event loop, the wiring (transport, store, registry, drivers) and what the hub publishes.

Threading: transport handlers (paho's network thread, or the publisher's thread in memory) only enqueue an event,
so the state machine is single-threaded. The worker takes the events in arrival order in batches (group commit):
one SQLite transaction per batch (``Store.batch``: each store write a savepoint), then, once it is committed, what
the batch published goes out and its messages are acknowledged to the broker (``manual_ack``). So a message is
acknowledged, and an update acked to its device, only after its effect is durable, and one fsync serves a whole
batch: the hub keeps up with thousands of updates a second. Over MQTT (``DeferredAcks``) the network thread does
not wait for the worker (at most ``MAX_IN_FLIGHT`` messages and
``MAX_IN_FLIGHT_BYTES`` wait unacknowledged: :class:`~fedge.hub.inflight.InFlight`); over the in-memory transport a
handler waits until its event is processed. The worker also ticks every ``tick_s`` (deadlines, schedule).

Round decisions live in the round core (:mod:`fedge.core`); the drivers put them on the wire:
:class:`~fedge.hub.round_runner.RoundRunner` (federated rounds), :mod:`fedge.hub.secagg_daemon` (SecAgg stages),
:class:`~fedge.hub.selection.Selector` (selection and evaluation rounds) and :mod:`fedge.hub.control` (operator
requests). They see the daemon through :class:`~fedge.hub.port.HubPort`.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Final

import numpy as np
from numpy.typing import NDArray

from fedge.core.aggregators import Bounds
from fedge.core.conduct import excluded, reliability
from fedge.core.losses import Score
from fedge.core.privacy import DpParams
from fedge.core.rounds import OpenRound
from fedge.core.strategy import FleetView, GateSettings, PrivacySettings, Robust, Strategy, build_strategy
from fedge.hub import control, secagg_daemon
from fedge.hub.config import HubConfig
from fedge.hub.inflight import InFlight
from fedge.hub.registry import Registry
from fedge.hub.round_result import publish_result
from fedge.hub.round_runner import RoundRunner
from fedge.hub.selection import Selector
from fedge.hub.store import Store, VersionRow
from fedge.hub.watchdog import hub_watchdog
from fedge.protocol.codec import MAGIC, decode, encode, encode_control_reply
from fedge.protocol.errors import ConfigError, DecodeError, FedgeError, HubStateError, TransportError
from fedge.protocol.messages import Decline, HubStatus, Presence, RejectReason, RoundOverrides
from fedge.protocol.signing import HubSigner, load_private_key, rotation_files, rotation_topic, rotations_up_to
from fedge.protocol.topics import Topics
from fedge.protocol.transport import AckFn, DeferredAcks, Transport
from fedge.runtime.evaluate import EvalFn, Evaluator

log = logging.getLogger("fedge.hub")

_Event = tuple[Callable[[], None], Callable[[], None] | None, Callable[[], None] | None]
"""An event for the worker: what to run, what to do once its effect is committed, and what to do if the hub stops
before running it (None: nothing)."""

MAX_BATCH: Final = 512
"""Events handled in one transaction (one fsync) at most."""
MAX_IN_FLIGHT: Final = 2048
"""Messages received over MQTT and not yet acknowledged at most (the network thread waits beyond that)."""
MAX_IN_FLIGHT_BYTES: Final = 4 * 1024 * 1024
"""Their bytes at most (a flood of large frames must not grow the hub by the flood's size)."""

__all__ = ["HubDaemon", "HubStateError", "check_signing_key", "gate_warnings", "strategy_for"]


def strategy_for(cfg: HubConfig) -> Strategy:
    """The hub's strategy: ``[aggregation]``'s robust base, wrapped for ``[privacy]`` and ``[secagg]``."""
    agg, p = cfg.aggregation, cfg.privacy
    bounds = Bounds(agg.max_weight_ratio, agg.fixed_update_norm, agg.norm_multiplier, agg.norm_ceiling,
                    agg.max_weight_share)
    base = Robust(agg.strategy, agg.proximal_lambda, bounds, agg.trim_fraction, cfg.rounds.seed,
                  GateSettings(agg.deploy_gate, agg.deploy_tolerance, cfg.federated_gate), cfg.rounds.over_select)
    privacy = None if not p.enabled else PrivacySettings(
        p.mode, p.noise_multiplier, p.clip, p.sample_rate, p.epsilon_budget, p.delta, p.dropout_allowance,
        p.amplification)
    secagg = cfg.secagg.params() if cfg.secagg.enabled else None
    return build_strategy(base, privacy, secagg, cfg.secagg.stage_timeout_s, cfg.secagg.adaptive_l2)


def gate_warnings(cfg: HubConfig) -> list[str]:
    """What ``fedge hub serve --check`` warns about the deploy gates: configurations that deploy versions nobody
    scored."""
    agg = cfg.aggregation
    federated = cfg.federated_gate
    out = []
    if cfg.eval_data is None and cfg.privacy.enabled:
        out.append("no eval_data under [privacy]: devices send no scores in DP rounds, so every new version is "
                   "deployed unscored (set eval_data to a held-out file of the devices' domain)")
    elif cfg.eval_data is None and not federated:
        out.append("no eval_data and federated_gate = false: every new version is deployed unscored (set eval_data, "
                   "or federated_gate = \"auto\")")
    elif cfg.eval_data is not None and not agg.deploy_gate and not federated:
        out.append("deploy_gate = false and no federated gate: every new version is deployed whatever its score")
    if cfg.eval_data is None and cfg.secagg.enabled and not cfg.privacy.enabled:
        out.append("no eval_data with [secagg]: the hub sees only sums, so devices send no scores and every new "
                   "version is deployed unscored (set eval_data)")
    if cfg.eval_data is None and cfg.rounds.mode == "buffered":
        out.append("no eval_data with [rounds] mode = \"buffered\": a buffered round's versions have no federated gate "
                   "(the round goes on), so every version is deployed unscored (set eval_data)")
    if cfg.rounds.mode == "buffered" and agg.federated_gate is True:
        out.append("federated_gate = true has no effect on [rounds] mode = \"buffered\": a buffered round's versions "
                   "skip the federated gate (the round goes on; only eval_data's held-out gate scores them)")
    if cfg.privacy.enabled and agg.federated_gate is True:
        out.append("federated_gate = true has no effect under [privacy] (devices send no scores in DP rounds)")
    return out


def _signer(cfg: HubConfig) -> HubSigner | None:
    """The hub's frame signer from ``signing_key`` (None without one); ConfigError if the key is unusable."""
    if cfg.signing_key is None:
        return None
    try:
        return HubSigner(load_private_key(cfg.signing_key), cfg.fleet)
    except FedgeError as exc:
        raise ConfigError("signing_key", str(exc)) from exc


def check_signing_key(cfg: HubConfig) -> None:
    """ConfigError naming ``signing_key`` if it is set and unusable (``fedge hub serve --check``)."""
    _signer(cfg)


class HubDaemon:
    """One fleet's hub: runs rounds over a :class:`Transport` and keeps every outcome in its SQLite store.

    Guarantees: every MQTT message is handled on one worker thread, in arrival order; an accepted update is
    committed to the store before it is acked, so a crash loses no acked update and :meth:`start` resumes an
    open round with its updates; a malformed or hostile update is rejected with a reason, counted, answered
    with a Reject, and never reaches the aggregate; every closed round registers at most one new model
    version and publishes its result (retained).
    """

    def __init__(self, cfg: HubConfig, transport: Transport, *, clock: Callable[[], float] = time.time,
                 evaluator: EvalFn | None = None, tick_s: float = 0.1,
                 rng: np.random.Generator | None = None, retain_on: Sequence[Transport] = ()) -> None:
        self.cfg = cfg
        self.transport = transport
        self.retain_on = tuple(retain_on)  # other nodes of a cluster that keeps retained messages per node
        self.topics = Topics(cfg.fleet)
        self.clock = clock
        self.tick_s = tick_s
        self.evaluator: EvalFn = evaluator if evaluator is not None else Evaluator(cfg.eval_data)
        self.store = Store(cfg.state_dir / "hub.sqlite", keep_update_payloads=cfg.store.keep_update_payloads)
        self.registry = Registry(self.store, cfg.state_dir)
        # DP cohorts and central noise: seeded by the operating system unless a test passes a generator
        self.selector = Selector(self)  # source-model selection and evaluation rounds (hub/selection.py)
        self.rounds = RoundRunner(self, strategy_for(cfg), rng if rng is not None else np.random.default_rng(),
                                  open_gate=self.selector.start_gate)
        self._dp_capable: set[str] = self.store.dp_capable()
        self._secagg_capable: set[str] = set()  # from the devices' presence (retained: back after a restart)
        self.signer = _signer(cfg)
        # key rotations up to the key this hub signs with, read once (a rotation written later waits for a restart)
        self._rotations = ([] if self.signer is None or cfg.signing_key is None else
                           rotations_up_to(rotation_files(cfg.signing_key.parent), self.signer.key_id))
        self.watchdog = hub_watchdog(self.topics, cfg.signing_key)  # frames on the hub's topics it did not publish
        self.known: set[str] = set(cfg.devices or ())
        self._online: set[str] = set()
        self._specs: dict[str, dict[str, tuple[tuple[int, ...], str]]] = {}
        self._published: tuple[str | None, str | None] = (None, None)  # (version, backbone)
        self._connects = 0
        self._queue: queue.Queue[_Event] = queue.Queue()
        self._in_flight = InFlight(MAX_IN_FLIGHT, MAX_IN_FLIGHT_BYTES)
        self._held: list[tuple[str, bytes, bool]] | None = None  # publishes waiting for the batch's commit
        self._stop = threading.Event()
        self._dead = threading.Event()
        self._worker: threading.Thread | None = None

    @property
    def round(self) -> OpenRound | None:
        """The open federated round, or None."""
        return self.rounds.round

    def epsilon_spent(self, extra: DpParams | None = None) -> float:
        return self.rounds.epsilon_spent(extra)

    # -- lifecycle ------------------------------------------------------------------------------------------
    def start(self, connect: Callable[[], None] | None = None) -> None:
        """Bootstrap the registry, resume an open round, start the worker, subscribe, ``connect()``, publish."""
        if self.registry.current() is None:
            row = self.registry.import_artifacts(self.cfg.artifacts)
            log.info("imported %s as %s (backbone %s)", self.cfg.artifacts, row.version, row.backbone_sha256[:16])
            self.score_version(row)  # the source model's held-out score: the first bar for the deploy gate
        for dev in self.store.devices():
            if self.cfg.devices is None:
                self.known.add(dev["device"])
            if dev["online"]:
                self._online.add(dev["device"])
        self.rounds.resume()
        self.selector.resume()
        self._worker = threading.Thread(target=self._run, name=f"fedge-hub-{self.cfg.fleet}", daemon=True)
        self._worker.start()
        # handlers hand their messages to the worker, so it must run before the first (retained) message arrives;
        # and subscribing before connecting means no message of the persistent session arrives unhandled
        t, sub = self.topics, self._subscribe
        sub(t.presence_all, self._handle_presence)
        sub(t.control_round_start, lambda _t, p: control.handle_start(self, p))
        sub(t.control_round_cancel, lambda _t, p: control.handle_cancel(self, p))
        sub(t.update_all, lambda tp, p: self.rounds.handle_update(t.device_of(tp), tp, p, self.known))
        sub(t.decline_all, self._handle_decline)
        sub(t.secagg_all, lambda tp, p: secagg_daemon.handle_frame(self, self.rounds, tp, p))
        sub(t.control_round_select, lambda _t, p: self.selector.handle_control(p))
        sub(t.select_report_all, self.selector.handle_report)
        for filter_ in self.watchdog.filters:
            sub(filter_, lambda tp, p: self.watchdog.observe(tp, p, self.store))
        if connect is not None:
            connect()
        self.call(self._publish_state)

    def stop(self) -> None:
        """Graceful stop: publish HubStatus offline (retained); an open round stays open in the store."""
        if self._worker is not None and self._worker.is_alive():
            self.call(lambda: self._status(online=False))
        self._halt()
        self.store.close()

    def halt(self) -> None:
        """Stop dead, as a crash would: nothing published, nothing closed (for tests of resumption)."""
        self._halt()
        self.store.close()

    def _halt(self) -> None:
        self._dead.set()
        self._stop.set()
        if self._worker is not None:
            self._worker.join(10)
        while True:  # release anyone still waiting (an unacknowledged message is redelivered to the next hub)
            try:
                _fn, _done, dropped = self._queue.get_nowait()
            except queue.Empty:
                break
            if dropped is not None:
                dropped()

    def _subscribe(self, topic_filter: str, handle: Callable[[str, bytes], None]) -> None:
        """Handle messages on ``topic_filter`` on the worker: without waiting for it when the transport lets the
        hub acknowledge them after the batch's commit (MQTT), else waiting (the in-memory transport)."""
        if isinstance(self.transport, DeferredAcks):
            def deferred(topic: str, payload: bytes, ack: AckFn) -> None:
                size = len(payload)
                while not self._in_flight.acquire(size, timeout=0.5):  # back-pressure: the broker keeps the rest
                    if self._dead.is_set():
                        return

                def release() -> None:
                    self._in_flight.release(size)

                def done() -> None:
                    release()
                    ack()

                if self._dead.is_set():
                    release()
                    return
                # dropped at a stop: never acknowledged, so the broker gives it to the next hub
                self._queue.put((lambda: handle(topic, payload), done, release))

            self.transport.subscribe_deferred(topic_filter, deferred)
        else:
            self.transport.subscribe(topic_filter, lambda topic, payload: self.call(lambda: handle(topic, payload)))

    def call(self, fn: Callable[[], None]) -> None:
        """Run ``fn`` on the worker and wait until its effect is committed (from the worker itself: queue it and
        return)."""
        if self._dead.is_set():
            return
        if threading.current_thread() is self._worker:
            self._queue.put((fn, None, None))
            return
        done = threading.Event()
        self._queue.put((fn, done.set, done.set))
        while not done.wait(0.5):
            if self._dead.is_set():
                return

    def post(self, fn: Callable[[], None]) -> None:
        """Queue ``fn`` without waiting (e.g. from an on-connect callback)."""
        if not self._dead.is_set():
            self._queue.put((fn, None, None))

    def tick(self) -> None:
        self.call(self._tick)

    def on_connect(self) -> None:
        """The transport's on-connect callback: the first call is the connection :meth:`start` publishes the state
        on; every later one is a reconnect (see :meth:`on_reconnect`)."""
        self._connects += 1
        if self._connects > 1:
            self.on_reconnect()

    def on_reconnect(self) -> None:
        """After a reconnect: publish every retained message again (a broker restarted without persistence lost
        them all): status, model/full, model/head, the open round's announce (or its clearing), the last result."""
        self.post(lambda: self._publish_state(force=True))

    def _run(self) -> None:
        last_tick = 0.0
        while not self._stop.is_set():
            batch: list[_Event] = []
            try:
                batch.append(self._queue.get(timeout=self.tick_s))
                while len(batch) < MAX_BATCH:
                    batch.append(self._queue.get_nowait())
            except queue.Empty:
                pass
            tick = time.monotonic() - last_tick >= self.tick_s
            if tick:
                last_tick = time.monotonic()
            self._run_batch(batch, tick)

    def _run_batch(self, batch: list[_Event], tick: bool) -> None:
        """Run a batch of events (and a tick) in one store transaction; once it is committed, publish what they
        published, then complete them (acknowledge their messages, wake their callers)."""
        self._held = []
        committed = False
        try:
            with self.store.batch():
                for fn, _done, _dropped in batch:
                    try:
                        fn()
                    except Exception:
                        log.exception("hub event failed (ignored)")
                if tick:
                    try:
                        self._tick()
                    except Exception:
                        log.exception("hub tick failed (ignored)")
            committed = True
        except Exception:  # the commit itself failed: nothing of the batch is durable, so nothing is announced
            log.exception("hub store commit failed: %d events lost (their messages are acknowledged)", len(batch))
        finally:
            held, self._held = self._held, None
            if committed:
                for topic, payload, retain in held:
                    self._send(topic, payload, retain)
            for _fn, done, _dropped in batch:
                if done is not None:
                    done()

    def _tick(self) -> None:
        now = self.clock()
        self.rounds.tick(now)
        self.selector.tick(now)
        every = self.cfg.schedule.every_s
        if self.busy_round() is None and every > 0 and self.candidates() and not self.rounds.budget_exhausted:
            last = self.store.last_round()
            if last is None or now - last.opened_at >= every:
                self.rounds.end_chain()  # a scheduled round uses the defaults and starts no chain
                self.rounds.start(RoundOverrides())

    # -- HubPort: what the drivers may ask (worker thread) ---------------------------------------------------
    def publish(self, topic: str, payload: bytes, retain: bool = False) -> None:
        """Sign and publish (QoS 1); on the worker, once the batch that published it is committed."""
        if self.signer is not None and payload[:3] == MAGIC:  # frames only: not control replies, not empty clears
            payload = self.signer.sign(payload, topic)
        self.watchdog.sent(topic, payload)
        if self._held is not None and threading.current_thread() is self._worker:
            self._held.append((topic, payload, retain))
        else:
            self._send(topic, payload, retain)

    def _send(self, topic: str, payload: bytes, retain: bool) -> None:
        self.transport.publish(topic, payload, qos=1, retain=retain)
        if retain:  # a retained message must be on every node of a cluster that keeps them per node
            for node in self.retain_on:
                try:
                    node.publish(topic, payload, qos=1, retain=True)
                except TransportError as exc:  # not connected yet: its on-connect republishes the state
                    log.debug("retained %s not sent to another node: %s", topic, exc)

    def publish_status(self) -> None:
        self._status(online=True)

    def _status(self, online: bool) -> None:
        cur = self.registry.current()
        rnd = self.rounds.round
        msg = HubStatus(fleet=self.cfg.fleet, online=online, round=rnd.id if rnd else None,
                        model_version=None if cur is None else cur.version)
        self.publish(self.topics.hub_status, encode(msg), retain=True)

    def publish_model(self, row: VersionRow, *, force: bool = False) -> None:
        """Retained model/head; model/full too when the backbone differs from the one last published (or
        ``force``). Nothing when ``row`` is what was last published (unless ``force``)."""
        if not force and (row.version, row.backbone_sha256) == self._published:
            return
        if force or row.backbone_sha256 != self._published[1]:
            full = self.registry.model_full(self.cfg.fleet, row.backbone_sha256)
            self.publish(self.topics.model_full, encode(full), retain=True)
            log.info("published model/full for backbone %s", row.backbone_sha256[:16])
        self.publish(self.topics.model_head, encode(self.registry.model_head(self.cfg.fleet, row)), retain=True)
        self._published = (row.version, row.backbone_sha256)
        log.info("published model/head %s", row.version)

    def reply(self, request_id: str | None, rid: int | None, reason: str, detail: str) -> None:
        """Answer a control message on control/round/reply (JSON; see PROTOCOL.md §5)."""
        self.publish(self.topics.control_round_reply, encode_control_reply(request_id, rid is not None, rid,
                                                                            str(reason), detail))

    def candidates(self) -> set[str]:
        return set(self.cfg.devices) if self.cfg.devices is not None else set(self._online)

    def fleet_view(self) -> FleetView:
        """The candidates less the excluded devices (:mod:`fedge.core.conduct`), weighted by how often they answer."""
        candidates = self.candidates()
        rid = self.store.next_round_id()
        out = {d for d, s in self.store.standings().items() if d in candidates and excluded(s, rid)}
        if out:
            log.info("not selectable in round %d (excluded): %s", rid, sorted(out))
        pool = frozenset(candidates - out)
        return FleetView(pool, frozenset(self._dp_capable), frozenset(self._secagg_capable),
                         reliability(self.store.records(), pool))

    def online(self) -> set[str]:
        return set(self._online)

    def current(self) -> VersionRow:
        cur = self.registry.current()
        if cur is None:
            raise HubStateError(f"the model registry in {self.cfg.state_dir} holds no version")
        return cur

    def head_spec(self, backbone: str) -> dict[str, tuple[tuple[int, ...], str]]:
        if backbone not in self._specs:
            self._specs[backbone] = {p.name: (p.shape, p.dtype) for p in self.registry.manifest(backbone).head}
        return self._specs[backbone]

    def evaluate(self, backbone: str, head: Mapping[str, NDArray[np.float32]]) -> Score | None:
        try:
            return self.evaluator(self.registry.backbone_dir(backbone), backbone, head)
        except Exception:
            log.exception("evaluation on backbone %s failed (no score)", backbone[:16])
            return None

    def score_version(self, row: VersionRow) -> None:
        score = self.evaluate(row.backbone_sha256, self.registry.load_head(row.version))
        if score is not None:
            self.store.set_version_score(row.version, score.accuracy, score.loss)
            log.info("%s scores accuracy %.4f on the hub's held-out data", row.version, score.accuracy)

    def busy_round(self) -> int | None:
        rnd, sel = self.rounds.round, self.selector.open
        return rnd.id if rnd is not None else sel.id if sel is not None else None

    def continue_chain(self) -> None:
        self.rounds.continue_chain()

    def end_chain(self) -> None:
        self.rounds.end_chain()

    def rounds_jsonl(self, record: dict[str, object]) -> None:
        fd = os.open(self.cfg.state_dir / "rounds.jsonl", os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        with open(fd, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(record, sort_keys=True) + "\n")

    # -- state published, presence, declines ---------------------------------------------------------------
    def _publish_state(self, force: bool = False) -> None:
        for seq, payload in self._rotations:  # key rotations first (retained)
            self.publish(rotation_topic(self.cfg.fleet, seq), payload, retain=True)
        self._status(online=True)
        self.publish_model(self.current(), force=force)
        self.selector.republish()  # a resumed or open selection round (a broker may have lost it, or never had it)
        rnd = self.rounds.round
        if rnd is not None:
            self.publish(self.topics.announce, encode(rnd.announce(self.cfg.fleet)), retain=True)
        else:
            self.publish(self.topics.announce, b"", retain=True)
            last = self.store.last_round()
            if last is not None and last.closed_at is not None:
                publish_result(self, last.id)

    def _handle_presence(self, topic: str, payload: bytes) -> None:
        if not payload:
            return
        device = self.topics.device_of(topic)
        try:
            msg = decode(payload, max_bytes=1 << 16)
        except DecodeError as exc:
            log.warning("presence on %s ignored: %s", topic, exc)
            return
        if not isinstance(msg, Presence) or msg.device != device or msg.fleet != self.cfg.fleet:
            log.warning("presence on %s ignored: not a presence of that device in this fleet", topic)
            return
        if self.cfg.devices is not None and device not in self.cfg.devices:
            log.warning("presence of %s ignored: not in the devices allow-list", device)
            return
        self.store.upsert_device(device, msg.online, msg.n_samples, msg.backends, self.clock())
        if (device in self._dp_capable) != msg.dp:
            self.store.set_dp_capable(device, msg.dp)
            (self._dp_capable.add if msg.dp else self._dp_capable.discard)(device)
        (self._secagg_capable.add if msg.secagg else self._secagg_capable.discard)(device)
        self.known.add(device)
        was_online = device in self._online
        (self._online.add if msg.online else self._online.discard)(device)
        log.info("device %s %s (%s samples)", device, "online" if msg.online else "offline", msg.n_samples)
        self.rounds.device_offline(device, msg.online, was_online)

    def _handle_decline(self, topic: str, payload: bytes) -> None:
        device = self.topics.device_of(topic)
        rnd = self.rounds.round
        rid = rnd.id if rnd else None

        def ignore(reason: RejectReason | str, detail: str) -> None:
            self.store.add_reject(rid, device or topic, str(reason), f"decline: {detail}")
            log.warning("decline on %s ignored: %s (%s)", topic, reason, detail)

        try:
            msg = decode(payload, max_bytes=1 << 16)
        except DecodeError as exc:
            self.store.add_reject(rid, device or topic, str(exc.reason), f"decline: {exc.detail}")
            return
        if not isinstance(msg, Decline):
            return ignore(RejectReason.WRONG_TYPE, f"expected a decline on {topic}, got {msg.type}")
        if msg.device != device or msg.fleet != self.cfg.fleet:
            return ignore(RejectReason.DEVICE_MISMATCH, f"decline for {msg.device!r} in {msg.fleet!r} on {topic}")
        if self.selector.handle_decline(msg):
            return
        self.rounds.handle_decline(msg, ignore)
