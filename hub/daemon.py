"""The hub daemon: wires transport, store, registry, validation, aggregation and evaluation.

Threading: transport handlers (paho's network thread, or the publisher's thread in memory) only
enqueue an event and wait until the worker thread has processed it, so the state machine is
single-threaded and, with ``manual_ack``, a message is acknowledged to the broker only after its
effect is committed to SQLite. The worker also ticks every ``tick_s`` (deadlines, schedule).
"""

from __future__ import annotations

import json
import logging
import math
import os
import queue
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import replace
from typing import Any

import numpy as np

from fedge.core.privacy import DpEvent, DpParams, distributed_min_cohort, epsilon, event_for
from fedge.core.secagg_session import auto_clip, distributed_problem
from fedge.core.strategies import Aggregator, Bounds, DpAggregator, SecureSumAggregator, Strategy, make_strategy
from fedge.hub import secagg_daemon
from fedge.hub.config import HubConfig
from fedge.hub.evaluate import EvalFn, Evaluator
from fedge.hub.registry import Registry
from fedge.hub.rounds import OpenRound, RoundParams, over_limits, poisson_select, select_devices
from fedge.hub.secagg_round import SecAggCoordinator, SecAggPlan
from fedge.hub.selection import Selector
from fedge.hub.store import LedgerRow, Store, VersionRow
from fedge.hub.validate import Accept, Rejection, UpdateContext, validate_update
from fedge.hub.watchdog import hub_watchdog
from fedge.protocol.codec import (
    MAGIC,
    MAX_CONTROL_BYTES,
    decode,
    decode_control,
    encode,
    encode_control,
    encode_control_reply,
    loads_strict,
)
from fedge.protocol.control import decode_cancel
from fedge.protocol.errors import ConfigError, DecodeError, FedgeError
from fedge.protocol.messages import (
    Ack,
    Decline,
    HubStatus,
    ModelUpdate,
    Presence,
    Reject,
    RejectReason,
    RoundOverrides,
    RoundResult,
    RoundStatus,
)
from fedge.protocol.signing import HubSigner, load_private_key, rotation_files, rotation_topic, rotations_up_to
from fedge.protocol.topics import Topics, valid_id
from fedge.protocol.transport import Transport

log = logging.getLogger("fedge.hub")

_Event = tuple[Callable[[], None], threading.Event | None]


def ledger_epsilon(rows: Iterable[LedgerRow], delta: float, extra: DpParams | None = None, *,
                   amplification: bool = False) -> float:
    """Epsilon at ``delta`` of every ledger row (each with the amplification it was recorded with) plus ``extra``
    (with the configured ``amplification``), by the RDP accountant."""
    events = [DpEvent(*_effective(r)) for r in rows]
    if extra is not None:
        events.append(event_for(extra, trust_sampling=amplification))
    return epsilon(events, delta)


def _effective(row: LedgerRow) -> tuple[float, float, bool]:
    e = event_for(DpParams(row.mode, row.noise_multiplier, row.clip, row.sample_rate), trust_sampling=row.amplified)
    return e.noise_multiplier, e.sample_rate, e.amplified


def federated_scores(metrics: Iterable[dict[str, float]]) -> dict[str, float]:
    """Validation-size-weighted means of the devices' ``val_acc_*`` / ``val_loss_*`` (and the total ``val_n``)."""
    rows = [m for m in metrics if m.get("val_n", 0) > 0]
    total = sum(m["val_n"] for m in rows)
    if not total:
        return {}
    keys = sorted({k for m in rows for k in m if k.startswith(("val_acc_", "val_loss_"))})
    out = {"val_n": float(total)}
    for k in keys:
        have = [m for m in rows if k in m]
        weight = sum(m["val_n"] for m in have)
        out[k] = round(sum(m[k] * m["val_n"] for m in have) / weight, 6)
    return out


def _request_id_of(payload: bytes) -> str | None:
    """The request_id of a control payload that failed validation, when one can be read (for the reply)."""
    if len(payload) > MAX_CONTROL_BYTES:  # refused unread: no parsing of whatever size the broker allows
        return None
    try:
        obj = loads_strict(payload.decode("utf-8"))
    except (ValueError, RecursionError):
        return None
    rid = obj.get("request_id") if isinstance(obj, dict) else None
    return rid if isinstance(rid, str) and valid_id(rid) else None


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


def _finite(value: float | None) -> float | None:
    """``value`` if it is a finite number, else None (a result message carries no NaN or infinity)."""
    return value if value is not None and math.isfinite(value) else None


class HubStateError(FedgeError):
    """The hub's own state broke an invariant (an empty registry, a corrupt stored update); never caused by
    a message's content."""


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
                 rng: np.random.Generator | None = None) -> None:
        self.cfg = cfg
        self.transport = transport
        self.topics = Topics(cfg.fleet)
        self.clock = clock
        self.tick_s = tick_s
        agg = cfg.aggregation
        self.bounds = Bounds(agg.max_weight_ratio, agg.fixed_update_norm, agg.norm_multiplier, agg.norm_ceiling)
        self.strategy: Strategy = make_strategy(agg.strategy, agg.proximal_lambda, self.bounds, agg.trim_fraction)
        self.evaluator: EvalFn = evaluator if evaluator is not None else Evaluator(cfg.eval_data)
        self.store = Store(cfg.state_dir / "hub.sqlite", keep_update_payloads=cfg.store.keep_update_payloads)
        self.registry = Registry(self.store, cfg.state_dir)
        # DP cohorts and central noise: seeded by the operating system unless a test passes a generator
        self._rng = rng if rng is not None else np.random.default_rng()
        self._dp_capable: set[str] = self.store.dp_capable()
        self._secagg_capable: set[str] = set()  # from the devices' presence (retained: back after a restart)
        self._budget_exhausted = False
        self.round: OpenRound | None = None
        self.selector = Selector(self)  # source-model selection rounds (hub/selection.py)
        self.signer = _signer(cfg)
        # key rotations up to the key this hub signs with, read once (a rotation written later waits for a restart)
        self._rotations = ([] if self.signer is None or cfg.signing_key is None else
                           rotations_up_to(rotation_files(cfg.signing_key.parent), self.signer.key_id))
        self.watchdog = hub_watchdog(self.topics, cfg.signing_key)  # frames on the hub's topics it did not publish
        self.known: set[str] = set(cfg.devices or ())
        self._online: set[str] = set()
        self._specs: dict[str, dict[str, tuple[tuple[int, ...], str]]] = {}
        self._published: tuple[str | None, str | None] = (None, None)  # (version, backbone)
        self._chain_left = int(self.store.get_meta("chain_left") or 0)
        self._chain_overrides = decode_control((self.store.get_meta("chain_overrides") or "").encode())
        if self._chain_left and over_limits(self._chain_overrides, cfg.limits):  # limits lowered since: chain ends
            self._chain_left = 0
        self._connects = 0
        self._queue: queue.Queue[_Event] = queue.Queue()
        self._stop = threading.Event()
        self._dead = threading.Event()
        self._worker: threading.Thread | None = None

    # -- lifecycle -------------------------------------------------------------------------------
    def start(self, connect: Callable[[], None] | None = None) -> None:
        """Bootstrap the registry, resume an open round, start the worker, subscribe, ``connect()``, publish."""
        if self.registry.current() is None:
            row = self.registry.import_artifacts(self.cfg.artifacts)
            log.info("imported %s as %s (backbone %s)", self.cfg.artifacts, row.version, row.backbone_sha256[:16])
            self._score_version(row)  # the source model's held-out score: the first bar for the deploy gate
        for dev in self.store.devices():
            if self.cfg.devices is None:
                self.known.add(dev["device"])
            if dev["online"]:
                self._online.add(dev["device"])
        self._resume()
        self.selector.resume()
        self._worker = threading.Thread(target=self._run, name=f"fedge-hub-{self.cfg.fleet}", daemon=True)
        self._worker.start()
        # handlers wait for the worker, so it must run before the first (retained) message arrives; and
        # subscribing before connecting means no message of the persistent session arrives unhandled
        self.transport.subscribe(self.topics.presence_all, self._on_presence)
        self.transport.subscribe(self.topics.control_round_start, self._on_control)
        self.transport.subscribe(self.topics.control_round_cancel, self._on_cancel)
        self.transport.subscribe(self.topics.update_all, self._on_update)
        self.transport.subscribe(self.topics.decline_all, self._on_decline)
        self.transport.subscribe(self.topics.secagg_all,
                                 lambda t, p: self.call(lambda: secagg_daemon.handle_frame(self, t, p)))
        self.transport.subscribe(self.topics.control_round_select,
                                 lambda _t, p: self.call(lambda: self.selector.handle_control(p)))
        self.transport.subscribe(self.topics.select_report_all,
                                 lambda t, p: self.call(lambda: self.selector.handle_report(t, p)))
        for filter_ in self.watchdog.filters:
            self.transport.subscribe(filter_, lambda t, p: self.call(lambda: self.watchdog.observe(t, p, self.store)))
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
        while True:  # release anyone still waiting
            try:
                _fn, done = self._queue.get_nowait()
            except queue.Empty:
                break
            if done is not None:
                done.set()

    def call(self, fn: Callable[[], None]) -> None:
        """Run ``fn`` on the worker and wait for it (from the worker itself: queue it and return)."""
        if self._dead.is_set():
            return
        if threading.current_thread() is self._worker:
            self._queue.put((fn, None))
            return
        done = threading.Event()
        self._queue.put((fn, done))
        while not done.wait(0.5):
            if self._dead.is_set():
                return

    def post(self, fn: Callable[[], None]) -> None:
        """Queue ``fn`` without waiting (e.g. from an on-connect callback)."""
        if not self._dead.is_set():
            self._queue.put((fn, None))

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
            try:
                fn, done = self._queue.get(timeout=self.tick_s)
            except queue.Empty:
                fn, done = None, None
            try:
                if fn is not None:
                    fn()
                if time.monotonic() - last_tick >= self.tick_s:
                    last_tick = time.monotonic()
                    self._tick()
            except Exception:
                log.exception("hub event failed (ignored)")
            finally:
                if done is not None:
                    done.set()

    # -- transport handlers (any thread) ----------------------------------------------------------
    def _on_update(self, topic: str, payload: bytes) -> None:
        self.call(lambda: self._handle_update(topic, payload))

    def _on_presence(self, topic: str, payload: bytes) -> None:
        self.call(lambda: self._handle_presence(topic, payload))

    def _on_control(self, topic: str, payload: bytes) -> None:
        self.call(lambda: self._handle_control(payload))

    def _on_cancel(self, topic: str, payload: bytes) -> None:
        self.call(lambda: self._handle_cancel(payload))

    def _on_decline(self, topic: str, payload: bytes) -> None:
        self.call(lambda: self._handle_decline(topic, payload))

    # -- state machine (worker thread) ------------------------------------------------------------
    def _publish(self, topic: str, payload: bytes, retain: bool = False) -> None:
        if self.signer is not None and payload[:3] == MAGIC:  # frames only: not control replies, not empty clears
            payload = self.signer.sign(payload, topic)
        self.watchdog.sent(topic, payload)
        self.transport.publish(topic, payload, qos=1, retain=retain)

    def _status(self, online: bool) -> None:
        cur = self.registry.current()
        msg = HubStatus(fleet=self.cfg.fleet, online=online, round=self.round.id if self.round else None,
                        model_version=None if cur is None else cur.version)
        self._publish(self.topics.hub_status, encode(msg), retain=True)

    def _publish_model(self, row: VersionRow, *, force: bool = False) -> None:
        """Retained model/head; model/full too when the backbone differs from the one last published (or
        ``force``)."""
        if force or row.backbone_sha256 != self._published[1]:
            full = self.registry.model_full(self.cfg.fleet, row.backbone_sha256)
            self._publish(self.topics.model_full, encode(full), retain=True)
            log.info("published model/full for backbone %s", row.backbone_sha256[:16])
        self._publish(self.topics.model_head, encode(self.registry.model_head(self.cfg.fleet, row)), retain=True)
        self._published = (row.version, row.backbone_sha256)
        log.info("published model/head %s", row.version)

    def _score_version(self, row: VersionRow) -> None:
        try:
            score = self.evaluator(self.registry.backbone_dir(row.backbone_sha256), row.backbone_sha256,
                                   self.registry.load_head(row.version))
        except Exception:
            log.exception("%s: evaluation failed", row.version)
            return
        if score is not None:
            self.store.set_version_score(row.version, score.accuracy, score.loss)
            log.info("%s scores accuracy %.4f on the hub's held-out data", row.version, score.accuracy)

    def _current(self) -> VersionRow:
        cur = self.registry.current()
        if cur is None:
            raise HubStateError(f"the model registry in {self.cfg.state_dir} holds no version")
        return cur

    def _publish_state(self, force: bool = False) -> None:
        for seq, payload in self._rotations:  # key rotations first (retained)
            self._publish(rotation_topic(self.cfg.fleet, seq), payload, retain=True)
        self._status(online=True)
        self._publish_model(self._current(), force=force)
        self.selector.republish()  # a resumed or open selection round (a broker may have lost it, or never had it)
        if self.round is not None:
            self._publish(self.topics.announce, encode(self.round.announce(self.cfg.fleet)), retain=True)
        else:
            self._publish(self.topics.announce, b"", retain=True)
            last = self.store.last_round()
            if last is not None and last.closed_at is not None:
                self._publish(self.topics.result, encode(self._result_of(last.id)), retain=True)

    def _spec(self, backbone: str) -> dict[str, tuple[tuple[int, ...], str]]:
        if backbone not in self._specs:
            self._specs[backbone] = {p.name: (p.shape, p.dtype) for p in self.registry.manifest(backbone).head}
        return self._specs[backbone]

    def _resume(self) -> None:
        rows = self.store.open_rounds()
        if not rows:
            return
        row = rows[-1]
        params = RoundParams.from_dict(row.params)
        agg = self._aggregator(params, row.backbone_sha256)
        # a round opened before [limits] were lowered still ends within them
        deadline = min(row.deadline, row.opened_at + self.cfg.limits.max_deadline_s)
        rnd = OpenRound(row.id, row.model_version, row.backbone_sha256, params,
                        row.selected, row.opened_at, deadline, agg, offline_grace_s=self.cfg.rounds.offline_grace_s)
        rnd.declined.update(self.store.declines(row.id))
        # a SecAgg round's stage state (and the devices' secrets) was in memory: rnd.secagg stays None and the
        # first tick closes it as failed
        for stored in self.store.iter_updates(row.id):
            msg = decode(stored.payload, max_bytes=max(len(stored.payload), 1))
            if not isinstance(msg, ModelUpdate):
                raise HubStateError(f"round {row.id}: the stored update of {stored.device} is a {msg.type}")
            agg.add(msg.delta, msg.n_samples)
            rnd.accepted[stored.device] = stored.nonce
            rnd.n_samples += stored.n_samples
        self.round = rnd
        log.info("round %d resumed: %d updates, deadline in %.1f s", rnd.id, len(rnd.accepted),
                 rnd.deadline - self.clock())

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
        rnd = self.round
        if rnd is None:
            return
        if msg.online:
            rnd.offline.pop(device, None)  # back before the round closed: its update is awaited again
        elif was_online and rnd.went_offline(device, self.clock()):
            log.warning("round %d: selected device %s went offline without answering: counted as failed unless "
                        "back within %g s", rnd.id, device, rnd.offline_grace_s)
            self.maybe_close(rnd)

    def _handle_control(self, payload: bytes) -> None:
        try:
            overrides = decode_control(payload)
        except DecodeError as exc:
            self.store.add_control(str(exc.reason), exc.detail)
            log.warning("control message ignored (%s): %s", exc.reason, exc.detail)
            self._reply(_request_id_of(payload), None, str(exc.reason), exc.detail)
            return
        if self.round is not None:
            detail = f"round {self.round.id} is open"
            self.store.add_control("round_open", detail)
            log.warning("control message ignored: round %d is open", self.round.id)
            self._reply(overrides.request_id, None, "round_open", detail)
            return
        if self.selector.open is not None:
            detail = f"selection round {self.selector.open.id} is open"
            self.store.add_control("round_open", detail)
            self._reply(overrides.request_id, None, "round_open", detail)
            return
        excess = over_limits(overrides, self.cfg.limits)
        if excess is not None:
            self.store.add_control("over_limits", excess)
            log.warning("control message refused: %s", excess)
            self._reply(overrides.request_id, None, "over_limits", excess)
            return
        self._set_chain(max(self.cfg.schedule.chain_rounds - 1, 0), overrides)
        rid, reason, detail = self._start_round(overrides)
        if rid is None and reason == "no_devices":
            self.store.add_control(reason, detail)
        self._reply(overrides.request_id, rid, reason, detail)

    def _reply(self, request_id: str | None, rid: int | None, reason: str, detail: str) -> None:
        """Answer a control message on control/round/reply (JSON; see PROTOCOL.md §5)."""
        body = encode_control_reply(request_id, rid is not None, rid, reason, detail)
        self._publish(self.topics.control_round_reply, body)

    def _handle_cancel(self, payload: bytes) -> None:
        try:
            req = decode_cancel(payload)
        except DecodeError as exc:
            self.store.add_control(str(exc.reason), f"cancel: {exc.detail}")
            log.warning("cancel ignored (%s): %s", exc.reason, exc.detail)
            self._reply(_request_id_of(payload), None, str(exc.reason), exc.detail)
            return
        rnd = self.round
        sel = self.selector.open
        if rnd is None and sel is not None and req.round in (None, sel.id):  # a selection or evaluation round
            detail = self.selector.cancel(sel, req.reason)
            self.store.add_control("cancelled", f"selection round {sel.id}")
            self._reply(req.request_id, sel.id, "cancelled", detail)
            return
        if rnd is None or (req.round is not None and req.round != rnd.id):
            detail = "no round is open" if rnd is None else f"round {req.round} is not open (round {rnd.id} is)"
            self.store.add_control("no_open_round", f"cancel: {detail}")
            self._reply(req.request_id, None, "no_open_round", detail)
            return
        self._cancel_round(rnd, req.reason)
        self.store.add_control("cancelled", f"round {rnd.id}")
        self._reply(req.request_id, rnd.id, "cancelled", self.store.round_detail(rnd.id) or "")

    def _cancel_round(self, r: OpenRound, reason: str) -> None:
        """Close ``r`` as ``cancelled``: nothing aggregated, no version, a chain ends. A DP round keeps its ledger
        entry: it was announced, so devices may already have trained and sent (noised) updates."""
        detail = f"cancelled by the operator: {reason or 'no reason given'}"
        if r.params.dp is not None:
            detail += ("; its privacy charge stays in the ledger (the round was announced: devices may have trained "
                       "and sent updates)")
        self.end_round(r, RoundStatus.CANCELLED, detail)

    def end_round(self, r: OpenRound, status: RoundStatus, detail: str) -> None:
        """Close ``r`` without aggregating (no version) with ``detail``; publish its result; a chain ends."""
        now = self.clock()
        self.store.set_round_detail(r.id, detail)
        rejected = sum(self.store.reject_counts(r.id).values())
        devices = tuple(sorted(r.accepted))
        self.store.close_round(r.id, str(status), now, None, None, devices, r.n_samples, rejected, None)
        self.round = None
        self._set_chain(0, RoundOverrides())
        self.rounds_jsonl({"round": r.id, "status": str(status), "devices": len(devices),
                           "n_samples": r.n_samples, "seconds": round(now - r.opened_at, 3), "detail": detail})
        log.warning("round %d %s: %s", r.id, status, detail)
        self._publish(self.topics.result, encode(self._result_of(r.id)), retain=True)
        self._publish(self.topics.announce, b"", retain=True)
        self._status(online=True)

    def _set_chain(self, left: int, overrides: RoundOverrides) -> None:
        overrides = replace(overrides, request_id=None)  # a reply goes to the request's own round only
        self._chain_left, self._chain_overrides = left, overrides
        self.store.set_meta("chain_left", str(left))
        self.store.set_meta("chain_overrides", encode_control(overrides).decode())

    def _candidates(self) -> set[str]:
        return set(self.cfg.devices) if self.cfg.devices is not None else set(self._online)

    def _start_round(self, overrides: RoundOverrides) -> tuple[int | None, str, str]:
        """Open a round: ``(round id, "started", "")``, or ``(None, reason, detail)`` when none was opened
        (``no_devices``, or ``refused_budget`` with the refused round's id)."""
        candidates = self._candidates()
        if not candidates:
            log.warning("no round started: no known online device")
            return None, "no_devices", "no known online device to select"
        if self.cfg.secagg.enabled:
            candidates &= self._secagg_capable
            if not candidates:
                return None, "no_devices", "no online device can take part in secure aggregation (install the " \
                    "agent's secagg extra)"
        cur = self._current()
        if (cur.version, cur.backbone_sha256) != self._published:  # e.g. after `fedge hub rollback`
            self._publish_model(cur)
        rid = self.store.next_round_id()
        params = RoundParams.make(self.cfg.rounds, overrides)
        now = self.clock()
        privacy = self.cfg.privacy
        eps_after: float | None = None
        ledger: LedgerRow | None = None
        if privacy.enabled:
            # only agents that say they apply announced DP: an older agent would send its raw update
            eligible = candidates & self._dp_capable
            if not eligible:
                return None, "no_devices", "no online device applies DP (update the agents)"
            dp = DpParams(privacy.mode, privacy.noise_multiplier, privacy.clip, privacy.sample_rate,
                          min_cohort=params.min_devices)
            params = replace(params, dp=dp, expected_cohort=privacy.sample_rate * len(eligible))
            selected = poisson_select(eligible, privacy.sample_rate, self._rng)  # unpredictable cohort
            if len(selected) < params.min_devices:  # decided by the sampling alone: nothing released, no cost
                detail = (f"Poisson cohort of {len(selected)} is below min_devices {params.min_devices}: "
                          "skipped, nothing announced, no privacy spent")
                self._unannounced(rid, RoundStatus.FAILED_QUORUM, cur, params, now, detail)
                return None, "cohort_too_small", detail
            if dp.mode == "distributed":  # the noise is split over (nearly) the whole cohort, not only the minimum
                dp = replace(dp, min_cohort=distributed_min_cohort(len(selected), params.min_devices,
                                                                   privacy.dropout_allowance))
                params = replace(params, dp=dp)
            eps_after = self.epsilon_spent(extra=dp)
            if privacy.epsilon_budget > 0 and eps_after > privacy.epsilon_budget:
                detail = (f"privacy budget: epsilon would reach {eps_after:.3f} > budget {privacy.epsilon_budget:g} "
                          f"(delta {privacy.delta:g}; {self.epsilon_spent():.3f} spent)")
                self._budget_exhausted = True
                self._unannounced(rid, RoundStatus.REFUSED_BUDGET, cur, params, now, detail)
                return None, "refused_budget", f"round {rid} refused: {detail}"
            event = event_for(dp, trust_sampling=privacy.amplification)
            ledger = LedgerRow(rid, dp.mode, dp.noise_multiplier, dp.clip, dp.sample_rate, event.amplified,
                               len(selected), params.expected_cohort, eps_after, privacy.delta, now)
        else:
            selected = select_devices(candidates, params.fraction, params.min_devices, self.cfg.rounds.seed, rid)
        if self.cfg.secagg.enabled:
            try:
                cfg = replace(self.cfg.secagg.params(), clip=auto_clip(params.dp, self.cfg.secagg.clip))
                plan = SecAggPlan.make(self.cfg.fleet, rid, selected, os.urandom(32), cfg,
                                       self.cfg.secagg.stage_timeout_s)
                why = distributed_problem(params.dp, len(selected), plan.clip, plan.scale)
                if why is not None:  # every device would decline it: refuse it here, before it costs privacy
                    raise ConfigError("secagg.scale", why)
            except ConfigError as exc:  # nothing announced: no privacy spent
                detail = f"secure aggregation is impossible for this cohort of {len(selected)}: {exc}"
                self._unannounced(rid, RoundStatus.FAILED_QUORUM, cur, params, now, detail)
                return None, "secagg_impossible", detail
            params = replace(params, secagg=plan)
        agg = self._aggregator(params, cur.backbone_sha256)
        rnd = OpenRound(rid, cur.version, cur.backbone_sha256, params, selected, now, now + params.deadline_s, agg,
                        offline_grace_s=self.cfg.rounds.offline_grace_s)
        if params.secagg is not None:
            rnd.secagg = SecAggCoordinator(
                self.cfg.fleet, rid, params.secagg, selected, sum(math.prod(s) for s in agg.shapes.values()), now,
                rnd.deadline, lambda device, frame: self._publish(self.topics.secagg_inbox(device), frame),
                min_inputs=secagg_daemon.min_inputs(params))
        # the ledger entry and the round are one transaction: a crash leaves both or neither
        self.store.open_round(rid, cur.version, cur.backbone_sha256, params.to_dict(), selected, now, rnd.deadline,
                              ledger)
        self.round = rnd
        self._publish(self.topics.announce, encode(rnd.announce(self.cfg.fleet)), retain=True)
        self._status(online=True)
        log.info("round %d open: model %s, %d selected %s, quorum %d, deadline %.0f s%s", rid, cur.version,
                 len(selected), list(selected), params.min_devices, params.deadline_s,
                 "" if eps_after is None else f", {privacy.mode} DP, epsilon after it {eps_after:.3f}")
        return rid, "started", ""

    def _aggregator(self, params: RoundParams, backbone: str) -> Aggregator:
        shapes = {k: s for k, (s, _) in self._spec(backbone).items()}
        if params.secagg is not None:
            return SecureSumAggregator(shapes, self.cfg.aggregation.proximal_lambda, self.bounds,
                                       None if params.dp is None else max(params.expected_cohort, 1.0))
        if params.dp is None:
            # the norm history is read when the round opens (or resumes): fixed for the round
            return self.strategy.aggregator(shapes, self.store.recent_update_norms(self.cfg.aggregation.norm_window))
        return DpAggregator(shapes, self.cfg.aggregation.proximal_lambda, params.dp, max(params.expected_cohort, 1.0),
                            rng=self._rng)

    def epsilon_spent(self, extra: DpParams | None = None) -> float:
        """The fleet's epsilon at the configured delta over every DP round in the ledger (plus ``extra``)."""
        return ledger_epsilon(self.store.ledger(), self.cfg.privacy.delta, extra,
                              amplification=self.cfg.privacy.amplification)

    def _unannounced(self, rid: int, status: RoundStatus, cur: VersionRow, params: RoundParams, now: float,
                     detail: str) -> None:
        """Record (one transaction) and publish a round decided before it was announced; stops a chain."""
        self.store.record_unopened_round(rid, str(status), cur.version, cur.backbone_sha256, params.to_dict(), now,
                                         detail)
        self._set_chain(0, RoundOverrides())
        self.rounds_jsonl({"round": rid, "status": str(status), "detail": detail, "devices": 0})
        self._publish(self.topics.result, encode(self._result_of(rid)), retain=True)
        log.warning("round %d %s: %s", rid, status, detail)

    def _handle_decline(self, topic: str, payload: bytes) -> None:
        device = self.topics.device_of(topic)
        rnd = self.round
        rid = rnd.id if rnd else None
        try:
            msg = decode(payload, max_bytes=1 << 16)
        except DecodeError as exc:
            self.store.add_reject(rid, device or topic, str(exc.reason), f"decline: {exc.detail}")
            return
        def ignore(reason: RejectReason, detail: str) -> None:
            self.store.add_reject(rid, device or topic, str(reason), f"decline: {detail}")
            log.warning("decline on %s ignored: %s (%s)", topic, reason, detail)

        if not isinstance(msg, Decline):
            return ignore(RejectReason.WRONG_TYPE, f"expected a decline on {topic}, got {msg.type}")
        if msg.device != device or msg.fleet != self.cfg.fleet:
            return ignore(RejectReason.DEVICE_MISMATCH, f"decline for {msg.device!r} in {msg.fleet!r} on {topic}")
        if self.selector.handle_decline(msg):
            return
        if rnd is None or msg.round != rnd.id:
            return ignore(RejectReason.STALE_ROUND, f"decline of round {msg.round}; open round: {rid}")
        if msg.device not in rnd.selected:
            return ignore(RejectReason.NOT_SELECTED, f"{msg.device} was not selected for round {rnd.id}")
        if msg.device in rnd.accepted or msg.device in rnd.declined:
            return  # redelivery, or a decline after its update: the update stands
        self.store.add_decline(rnd.id, msg.device, str(msg.reason), msg.detail)
        rnd.declined[msg.device] = str(msg.reason)
        log.info("round %d: %s declined (%s: %s)", rnd.id, msg.device, msg.reason, msg.detail)
        self.maybe_close(rnd)

    def _context(self, r: OpenRound | None) -> UpdateContext:
        spec = self._spec(r.backbone_sha256) if r else {}
        return UpdateContext(
            fleet=self.cfg.fleet, known_devices=frozenset(self.known), round_id=r.id if r else None,
            model_version=r.model_version if r else None, selected=frozenset(r.selected if r else ()),
            accepted=dict(r.accepted) if r else {}, head_spec=spec, max_update_bytes=self.cfg.rounds.max_update_bytes,
            private=r is not None and r.params.dp is not None, declined=frozenset(r.declined if r else ()),
        )

    def maybe_close(self, rnd: OpenRound) -> None:
        """Close ``rnd`` if it is due (a SecAgg round: move its stages on, and close it once the sum is there)."""
        if rnd.params.secagg is not None:
            secagg_daemon.step(self, rnd)
        elif rnd.should_close(self.clock()):
            self.close_round(rnd)

    def _handle_update(self, topic: str, payload: bytes) -> None:
        device = self.topics.device_of(topic)
        rnd = self.round
        if rnd is not None and rnd.params.secagg is not None:
            self._reject(secagg_daemon.plain_update_rejection(self, device, rnd), topic)
            return
        verdict = validate_update(device, payload, self._context(rnd))
        if isinstance(verdict, Rejection):
            self._reject(verdict, topic)
            return
        if rnd is None:  # validate_update accepts only for the open round it was given
            raise HubStateError(f"update on {topic} passed validation with no open round")
        msg = verdict.update
        if isinstance(verdict, Accept):
            self.store.add_update(msg.round, msg.device, msg.nonce, msg.n_samples, msg.metrics, payload)
            rnd.aggregator.add(msg.delta, msg.n_samples)
            rnd.accepted[msg.device] = msg.nonce
            rnd.n_samples += msg.n_samples
            log.info("round %d: update from %s accepted (%d samples, %d/%d)", msg.round, msg.device, msg.n_samples,
                     len(rnd.accepted), len(rnd.selected))
        else:
            log.info("round %d: redelivered update from %s re-acked", msg.round, msg.device)
        ack = Ack(fleet=self.cfg.fleet, round=msg.round, device=msg.device, ref_nonce=msg.nonce)
        self._publish(self.topics.ack(msg.device), encode(ack))
        if rnd.should_close(self.clock()):
            self.close_round(rnd)

    def _reject(self, v: Rejection, topic: str) -> None:
        rid = self.round.id if self.round else None
        self.store.add_reject(rid, v.device or topic, str(v.reason), v.detail)
        log.warning("update on %s rejected: %s (%s)", topic, v.reason, v.detail)
        if v.device is not None and valid_id(v.device):
            ref = v.update.nonce if v.update is not None else None
            rej = Reject(fleet=self.cfg.fleet, round=v.round, device=v.device, reason=v.reason, detail=v.detail,
                         ref_nonce=ref)
            self._publish(self.topics.reject(v.device), encode(rej))

    def _tick(self) -> None:
        now = self.clock()
        rnd = self.round
        if rnd is not None and rnd.params.secagg is not None:
            secagg_daemon.step(self, rnd)
        elif rnd is not None and rnd.should_close(now):
            try:
                self.close_round(rnd)
            except Exception as exc:  # a round whose deadline passed always closes: as failed, if not otherwise
                log.exception("round %d: closing failed", rnd.id)
                if self.round is rnd:
                    self.end_round(rnd, RoundStatus.FAILED_QUORUM, f"closing the round failed: {exc}")
        self.selector.tick(now)
        every = self.cfg.schedule.every_s
        idle = self.round is None and self.selector.open is None
        if idle and every > 0 and self._candidates() and not self._budget_exhausted:
            last = self.store.last_round()
            if last is None or now - last.opened_at >= every:
                self._set_chain(0, RoundOverrides())  # a scheduled round uses the defaults and starts no chain
                self._start_round(RoundOverrides())

    def close_round(self, r: OpenRound) -> None:
        now = self.clock()
        row: VersionRow | None = None
        acc = loss = None
        detail: str | None = None
        head = None
        if r.quorum():
            head = r.aggregator.result(self.registry.load_head(r.model_version), self.registry.w0(r.backbone_sha256))
            bounds = r.aggregator.summary
            if bounds is not None:
                log.info("round %d: %s, norm bound %.4g (%d of %d updates clipped), weight cap %s (%d capped)", r.id,
                         r.aggregator.name, bounds.norm_bound, bounds.clipped, r.aggregator.count,
                         "-" if bounds.weight_cap is None else f"{bounds.weight_cap:g}", bounds.capped)
            if not all(np.isfinite(a).all() for a in head.values()):
                detail, head = "the aggregate is not finite: no version registered", None
                log.error("round %d: %s", r.id, detail)
        if head is not None:
            try:
                score = self.evaluator(self.registry.backbone_dir(r.backbone_sha256), r.backbone_sha256, head)
            except Exception:
                log.exception("round %d: evaluation failed (version registered without a score)", r.id)
                score = None
            if score is not None:  # without hub eval data a version has no score (devices' own losses are on
                acc, loss = _finite(score.accuracy), _finite(score.loss)  # their training data: not comparable)
            row = self.registry.write_head(head, parent=r.model_version, round_id=r.id,
                                           backbone_sha256=r.backbone_sha256, accuracy=acc, loss=loss)
            deployed = self.store.version(r.model_version)
            agg = self.cfg.aggregation
            if (agg.deploy_gate and acc is not None and deployed is not None and deployed.accuracy is not None
                    and acc < deployed.accuracy - agg.deploy_tolerance):
                detail = (f"{row.version} kept as a candidate, not deployed: held-out accuracy {acc:.4f} is below "
                          f"the deployed {deployed.version}'s {deployed.accuracy:.4f} by more than "
                          f"{agg.deploy_tolerance:g} (fedge hub rollback --to {row.version} deploys it anyway)")
                log.warning("round %d: %s", r.id, detail)
        status = RoundStatus.COMPLETED if row is not None else RoundStatus.FAILED_QUORUM
        rejected = sum(self.store.reject_counts(r.id).values())
        devices = tuple(sorted(r.accepted))
        if detail is not None:
            self.store.set_round_detail(r.id, detail)
        federated = federated_scores(self.store.update_metrics(r.id)) if r.params.dp is None else {}
        if federated:
            self.store.set_round_metrics(r.id, federated)
        held_back = detail is not None and row is not None
        gate = None if held_back or row is None else self.selector.gate_detail(r, row, federated)
        if gate is not None:  # [aggregation] federated_gate: the round's devices validate the new version first
            detail, held_back = gate, True
            self.store.set_round_detail(r.id, detail)
        self.store.close_round(r.id, str(status), now, acc, loss, devices, r.n_samples, rejected, row,
                               make_current=not held_back)
        self.round = None
        if r.params.dp is None and r.aggregator.norms:  # the "auto" norm bound's history (never of DP rounds)
            self.store.add_update_norms(r.id, r.aggregator.norms, self.cfg.aggregation.norm_window)
        summary = r.aggregator.summary
        self.rounds_jsonl({
            "round": r.id, "status": str(status), "devices": len(devices), "n_samples": r.n_samples,
            "accuracy": acc, "loss": loss, "seconds": round(now - r.opened_at, 3),
            "model_version": None if row is None else row.version, "rejected": rejected,
            "federated": federated,
            **({} if summary is None else {"norm_bound": summary.norm_bound, "clipped": summary.clipped,
                                           "weight_cap": summary.weight_cap, "capped": summary.capped}),
        })
        log.info("round %d %s: %d/%d devices, %d samples, %d rejected, accuracy %s, model %s, %.2f s", r.id, status,
                 len(devices), len(r.selected), r.n_samples, rejected, "-" if acc is None else f"{acc:.4f}",
                 "-" if row is None else row.version, now - r.opened_at)
        result = encode(self._result_of(r.id))  # before anything goes out: if it cannot encode, nothing is published
        if row is not None and not held_back:
            self._publish_model(row)
        self._publish(self.topics.result, result, retain=True)
        self._publish(self.topics.announce, b"", retain=True)
        self._status(online=True)
        if gate is not None and row is not None:
            self.selector.start_gate(r, row, federated)  # the chain goes on once it closes
            return
        self.continue_chain()

    def end_chain(self) -> None:
        """No more rounds of the current ``chain_rounds`` chain."""
        self._set_chain(0, RoundOverrides())

    def continue_chain(self) -> None:
        """Start the next round of a ``chain_rounds`` chain, if one is left."""
        if self._chain_left > 0:
            self._set_chain(self._chain_left - 1, self._chain_overrides)
            if self._start_round(self._chain_overrides)[0] is None:  # nobody to ask: the chain ends here
                self._set_chain(0, RoundOverrides())

    def _result_of(self, rid: int) -> RoundResult:
        row = self.store.round(rid)
        if row is None or row.closed_at is None:
            raise HubStateError(f"round {rid} is not a closed round of this hub")
        ledger = self.store.ledger_row(rid)
        private = ledger is not None or RoundParams.from_dict(row.params).dp is not None
        # a DP round's result names nobody and counts no samples (the store keeps them for the operator)
        return RoundResult(
            fleet=self.cfg.fleet, round=rid, status=RoundStatus(row.status), model_version=row.new_version,
            accuracy=_finite(row.accuracy), loss=_finite(row.loss), devices=() if private else row.devices,
            n_samples=0 if private else row.n_samples or 0, rejected=row.rejected or 0,
            seconds=_finite(row.closed_at - row.opened_at) or 0.0, detail=self.store.round_detail(rid),
            declined=() if private else tuple(sorted(self.store.declines(rid))),
            epsilon=None if ledger is None else _finite(ledger.epsilon),
            federated={k: v for k, v in self.store.round_metrics(rid).items() if math.isfinite(v)},
        )

    def rounds_jsonl(self, record: dict[str, Any]) -> None:
        fd = os.open(self.cfg.state_dir / "rounds.jsonl", os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        with open(fd, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(record, sort_keys=True) + "\n")


__all__ = ["HubDaemon", "HubStateError", "check_signing_key"]
