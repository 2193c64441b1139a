"""A legitimately provisioned device that misbehaves: the hostile party of ``bench/attacks.py``.

It logs in with its own broker account (provisioned like any device: TLS, its password, the fleet's ACLs), publishes
its presence, trains honestly with the round core (:func:`fedge.core.device.train`) on its own shard, and then
does what :attr:`Attacker.mode` says instead of (or besides) what an agent would:

======================  ===================================================================================
``honest``              what an agent does (plain update with metrics; SecAgg stages; evaluation reports)
``sign_flip``           its update negated and scaled to L2 norm 10
``scaled_noise``        Gaussian noise of L2 norm 10 as its update
``huge_samples``        its update negated, claiming 10^9 samples (in its presence too)
``lying_gate``          ``sign_flip``, reporting ``val_n`` 10^9 and ``val_acc_global`` 0 in the round, and
                        ``val_n`` 10^9 with accuracy 1.0 for the candidate in the deploy gate's evaluation round
``silent``              online, selected, and never answers
``secagg_huge``         2^30 in every coordinate of its masked input
``secagg_in_range``     its update negated and stretched to the announced bounds (the L2 clip when one is announced,
                        else every coordinate at the per-coordinate clip)
``garbage_shares``      random bytes in every sealed share bundle (stage 1), well-formed otherwise
``garbage_unmask``      random field elements in place of every share it reveals (stage 3)
``withheld_input``      advertises and shares its keys, never sends its masked input
======================  ===================================================================================
"""

from __future__ import annotations

import logging
import os
import queue
import secrets
import threading
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger("bench.attacker")

PLAIN_MODES = ("honest", "sign_flip", "scaled_noise", "huge_samples", "lying_gate", "silent")
SECAGG_MODES = ("secagg_huge", "secagg_in_range", "garbage_shares", "garbage_unmask", "withheld_input")
HUGE = 10**9
ATTACK_ROWS = 300


def _scaled(delta: dict[str, Any], norm: float) -> dict[str, Any]:
    from fedge.core.privacy import l2_norm

    have = l2_norm(delta) or 1.0
    return {k: (np.asarray(v, dtype=np.float64) * (norm / have)).astype(np.float32) for k, v in delta.items()}


class Attacker:
    """One hostile device over MQTT (see the module docstring). ``mode`` may change between rounds."""

    def __init__(self, device: str, fleet: str, broker: Any, data: Path, artifacts: Path, seed: int = 4) -> None:
        from fedge.protocol.topics import Topics
        from fedge.protocol.transport_mqtt import MqttTransport
        from fedge.runtime.data import load_local
        from fedge.runtime.trainers import open_trainer

        self.device, self.fleet, self.seed = device, fleet, seed
        self.topics = Topics(fleet)
        self.mode = "honest"
        self.trainer = open_trainer(artifacts, backend="auto")
        local = load_local(data, (28, 28, 1))
        self.data_key = local.sha256
        self.y = np.asarray(local.y, dtype=np.int64)
        self.feats = self.trainer.features(np.asarray(local.x, dtype=np.float32))
        self.heads: dict[str, dict[str, Any]] = {}
        self.candidates: dict[str, dict[str, Any]] = {}
        self.sessions: dict[int, Any] = {}
        self.done: set[int] = set()
        self.jobs: queue.Queue[Any] = queue.Queue()
        self.lock = threading.Lock()
        self.cond = threading.Condition(self.lock)
        self.log: list[str] = []
        will = (self.topics.presence(device), self._presence(False), True)
        self.transport = MqttTransport(broker, device, will=will)
        self._thread = threading.Thread(target=self._work, name=f"attacker-{device}", daemon=True)

    # -- wire -------------------------------------------------------------------------------------------------
    def _presence(self, online: bool) -> bytes:
        from fedge.protocol.codec import encode
        from fedge.protocol.messages import Presence

        n = HUGE if self.mode == "huge_samples" else len(self.y)
        return encode(Presence(fleet=self.fleet, device=self.device, online=online, n_samples=n,
                               backends=(self.trainer.name,), agent_version="bench-attacker", secagg=True))

    def publish_presence(self) -> None:
        self.transport.publish(self.topics.presence(self.device), self._presence(True), qos=1, retain=True)

    def start(self) -> None:
        t = self.topics
        self._thread.start()
        self.transport.subscribe(t.model_head, self._on_head)
        self.transport.subscribe(t.candidate_all, self._on_candidate)
        self.transport.subscribe(t.announce, self._on_announce)
        self.transport.subscribe(t.select_announce, self._on_announce)
        self.transport.subscribe(t.secagg_inbox(self.device), self._on_secagg)
        self.transport.connect(timeout_s=20)
        self.publish_presence()

    def close(self) -> None:
        self.jobs.put(None)
        self.transport.publish(self.topics.presence(self.device), self._presence(False), qos=1, retain=True)
        self.transport.close(flush_timeout_s=2)

    def set_mode(self, mode: str) -> None:
        if mode not in PLAIN_MODES + SECAGG_MODES:
            raise ValueError(f"unknown attack {mode!r}")
        self.mode = mode
        self.publish_presence()  # huge_samples claims its 10^9 in the presence too

    def note(self, text: str) -> None:
        with self.lock:
            self.log.append(f"{time.strftime('%H:%M:%S')} {text}")

    def _decode(self, payload: bytes) -> Any:
        from fedge.protocol.codec import decode

        return decode(payload) if payload else None

    def _on_head(self, _topic: str, payload: bytes) -> None:
        msg = self._decode(payload)
        if msg is not None:
            with self.cond:
                self.heads[msg.version] = {k: np.asarray(v, dtype=np.float32) for k, v in msg.head.items()}
                self.cond.notify_all()

    def _on_candidate(self, topic: str, payload: bytes) -> None:
        from fedge.protocol.messages import ModelHead

        msg = self._decode(payload)
        if isinstance(msg, ModelHead):
            with self.cond:
                self.candidates[topic.rsplit("/", 1)[-1]] = {k: np.asarray(v, np.float32) for k, v in msg.head.items()}
                self.cond.notify_all()

    def _on_announce(self, _topic: str, payload: bytes) -> None:
        msg = self._decode(payload)
        if msg is None or self.device not in msg.selected or msg.round in self.done:
            return
        self.done.add(msg.round)
        if self.mode == "silent":
            self.note(f"round {msg.round}: selected, staying silent")
            return
        self.jobs.put(msg)

    def _on_secagg(self, _topic: str, payload: bytes) -> None:
        msg = self._decode(payload)
        session = self.sessions.get(msg.round) if msg is not None else None
        if session is None:
            return
        self._send_secagg(msg.round, session.on_frame(msg))

    # -- the round --------------------------------------------------------------------------------------------
    def _work(self) -> None:
        while True:
            msg = self.jobs.get()
            if msg is None:
                return
            try:
                (self._evaluate if msg.candidates else self._round)(msg)
            except Exception as exc:  # the bench reads the log; the attacker goes on with the next round
                log.exception("attacker round %d failed", msg.round)
                self.note(f"round {msg.round}: failed: {exc!r}")

    def _wait(self, table: dict[str, Any], key: str, timeout_s: float = 30.0) -> dict[str, Any]:
        with self.cond:
            if not self.cond.wait_for(lambda: key in table, timeout_s):
                raise TimeoutError(f"no head {key}")
            return dict(table[key])

    def _train(self, msg: Any) -> Any:
        """Its honest round (an attack needs only the direction of its update: it trains on its first
        ``ATTACK_ROWS`` rows, so that it answers among the first and the round does not close without it)."""
        from fedge.core import device as core

        head = self._wait(self.heads, msg.model_version)
        policy = core.DevicePolicy(self.seed, 50, 0.2, 20, core.Personalization.FINETUNE, 0.1)
        rows = len(self.y) if self.mode == "honest" else min(len(self.y), ATTACK_ROWS)
        data = core.DeviceData(self.feats[:rows], self.y[:rows], self.data_key)
        out = core.train(msg, self.trainer, data, core.RoundHeads(head, head, None, None), policy, private=False)
        if not isinstance(out, core.Trained):
            raise RuntimeError(f"training gave {out!r}")
        return out

    def _round(self, msg: Any) -> None:
        from fedge.core.secagg_session import DeviceSession, is_secagg

        mode = self.mode
        if is_secagg(msg):
            session = DeviceSession(msg, self.device)
            self.sessions[msg.round] = session
            self._send_secagg(msg.round, session.start())
            out = self._train(msg)
            if mode == "withheld_input":
                self.note(f"round {msg.round}: keys shared, masked input withheld")
                return
            q = self._secagg_input(msg, session, out.delta, mode)
            self._send_secagg(msg.round, session.set_input(q))
            self.note(f"round {msg.round}: secagg input ({mode}) handed over")
            return
        out = self._train(msg)
        delta, n, metrics = out.delta, out.n_samples, dict(out.metrics)
        if mode in ("sign_flip", "lying_gate"):
            delta = _scaled({k: -v for k, v in delta.items()}, 10.0)
        elif mode == "scaled_noise":
            rng = np.random.default_rng()
            delta = _scaled({k: rng.normal(size=v.shape) for k, v in delta.items()}, 10.0)
        elif mode == "huge_samples":
            delta, n = {k: -v for k, v in delta.items()}, HUGE
        if mode == "lying_gate":
            metrics.update({"val_n": float(HUGE), "val_acc_global": 0.0, "val_loss_global": 50.0})
        self._publish_update(msg, delta, n, metrics)
        self.note(f"round {msg.round}: update ({mode}) sent, {n} samples")

    def _publish_update(self, msg: Any, delta: dict[str, Any], n: int, metrics: dict[str, float]) -> None:
        from fedge.protocol.codec import encode
        from fedge.protocol.messages import ModelUpdate

        up = ModelUpdate(self.fleet, msg.round, self.device, msg.model_version, n,
                         {k: np.asarray(v, dtype=np.float32) for k, v in delta.items()}, metrics)
        self.transport.publish(self.topics.update(self.device), encode(up), qos=1)

    def _secagg_input(self, msg: Any, session: Any, delta: dict[str, Any], mode: str) -> Any:
        from fedge.core.secagg import bounded_input, quantise
        from fedge.core.secagg_session import private_input

        cfg = session.setup.config
        names = sorted(delta)
        if mode == "secagg_huge":  # every coordinate, the norm bit included
            dim = sum(int(np.prod(np.shape(delta[k]))) for k in names) + (1 if cfg.norm_bit else 0)
            return np.full(dim, 2**30, dtype=np.uint64) & session.setup.mask
        if mode == "secagg_in_range":
            flat = -np.concatenate([np.asarray(delta[k], dtype=np.float64).ravel() for k in names])
            l2 = getattr(cfg, "l2_clip", None)
            # the largest step the announced L2 bound allows, in the direction that undoes the round; without one,
            # every coordinate at the per-coordinate clip (an L2 norm of sqrt(d) * clip)
            bad = flat * (float(l2) / (np.linalg.norm(flat) or 1.0)) if l2 else np.sign(flat) * cfg.clip
            return quantise(bounded_input(bad, cfg), cfg, np.random.default_rng())
        return private_input(delta, names, session.setup, None, np.random.default_rng())

    def _send_secagg(self, rnd: int, frames: list[bytes]) -> None:
        for frame in frames:
            frame = self._tamper(rnd, frame)
            self.transport.publish(self.topics.secagg(self.device), frame, qos=1)

    def _tamper(self, rnd: int, frame: bytes) -> bytes:
        from fedge.core.secagg import SHAMIR_PRIME, SHARE_BYTES
        from fedge.core.secagg_session import stage_frame, stage_of
        from fedge.protocol.codec import decode
        from fedge.protocol.secagg_wire import RevealedShare, Sealed, ShareKeys, UnmaskResponse

        mode = self.mode
        if mode not in ("garbage_shares", "garbage_unmask"):
            return frame
        inner = stage_of(decode(frame))
        if mode == "garbage_shares" and isinstance(inner, ShareKeys):
            bad = tuple(Sealed(s.peer, os.urandom(len(s.ciphertext))) for s in inner.shares)
            self.note(f"round {rnd}: {len(bad)} garbage share bundles sealed")
            return stage_frame(self.fleet, rnd, self.device, replace(inner, shares=bad))
        if mode == "garbage_unmask" and isinstance(inner, UnmaskResponse):
            def junk(s: RevealedShare) -> RevealedShare:
                return RevealedShare(s.peer, s.index, secrets.randbelow(SHAMIR_PRIME).to_bytes(SHARE_BYTES, "big"))

            self.note(f"round {rnd}: garbage unmask shares")
            return stage_frame(self.fleet, rnd, self.device, replace(
                inner, seed_shares=tuple(junk(s) for s in inner.seed_shares),
                key_shares=tuple(junk(s) for s in inner.key_shares)))
        return frame

    # -- the deploy gate's evaluation round ---------------------------------------------------------------------
    def _evaluate(self, msg: Any) -> None:
        from fedge.core import device as core
        from fedge.core.selection import report_metrics, score_candidate
        from fedge.protocol.codec import encode
        from fedge.protocol.messages import ModelUpdate
        from fedge.protocol.selection import acc_key, loss_key

        if msg.local_epochs != 0:
            self.note(f"round {msg.round}: a selection round: not answered")
            return
        _train, val = core.DeviceData(self.feats, self.y, self.data_key).split(0.2)
        if self.mode == "lying_gate":
            metrics = {"val_n": float(HUGE)}
            for name in msg.candidates:
                metrics[acc_key(name)], metrics[loss_key(name)] = 1.0, 0.0
        else:
            scores = {}
            for name in msg.candidates:
                head = self._wait(self.candidates, name)
                s = score_candidate(self.trainer, head, self.feats[:0], self.y[:0], self.feats[val], self.y[val], 0,
                                    0.0, np.random.default_rng(0))
                if s is not None:
                    scores[name] = s
            metrics = report_metrics(scores, len(val))
        report = ModelUpdate(self.fleet, msg.round, self.device, msg.model_version, int(metrics["val_n"]), {},
                             metrics)
        self.transport.publish(self.topics.select_report(self.device), encode(report), qos=1)
        self.note(f"round {msg.round}: evaluation report ({self.mode}) sent")


__all__ = ["HUGE", "PLAIN_MODES", "SECAGG_MODES", "Attacker"]
