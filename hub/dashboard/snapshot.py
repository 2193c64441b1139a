"""Read-only views of the hub's store (``state_dir/hub.sqlite``) for the dashboard and ``/metrics``.

Every read opens its own connection with ``mode=ro`` and ``PRAGMA query_only``: WAL mode lets it read while
the daemon writes, and nothing here can write. Update payloads are never read (only their metrics).

``FleetReader.snapshot()`` is the JSON of ``/api/state``::

    {"fleet", "generated_at", "store": true,       # false until the hub has created its store
     "current_version", "open_round",
     "devices": [{"device", "online", "last_seen", "n_samples", "backends", "backend_faults", "trainer",
                  "model_version", "agent_version", "rounds", "last_round", "declines", "last_decline", "rejects"}],
     "rounds": [{"id", "status", "model_version", "new_version", "cohort", "devices", "declined", "rejected",
                 "n_samples", "accuracy", "loss", "seconds", "opened_at", "closed_at", "detail", "epsilon"}],
     "chart": {"source_accuracy", "series": [{"key", "name", "points": [[round, accuracy], ...]}]},
     "rejects": {reason: count}, "declines": {reason: count},
     "alerts": [{"round", "kind", "device", "detail", "ts"}],         # newest first: refused sums, blamed devices
     "excluded": [{"device", "until", "permanent", "exclusions", "reason"}],  # devices no round may select
     "privacy": null | {"mode", "delta", "epsilon_budget", "epsilon_spent", "rounds": [ledger rows]}}
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import closing, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedge.hub.config import PrivacyConfig
from fedge.hub.store import LedgerRow
from fedge.protocol.codec import decode
from fedge.protocol.errors import FedgeError
from fedge.protocol.messages import Presence
from fedge.protocol.topics import Topics

# Lines of the accuracy chart besides the hub's held-out accuracy: the devices' validation scores
# (``val_acc_<head>`` in their update metrics, weighted by ``val_n``), where devices report them (never under DP).
DEVICE_SERIES: tuple[tuple[str, str], ...] = (
    ("val_acc_global", "devices' validation: global model at round start"),
    ("val_acc_personal", "devices' validation: after local training"),
    ("val_acc_local_only", "devices' validation: local-only model"),
)
HUB_SERIES = ("hub", "hub: held-out accuracy")
_ACCEPTED = "(SELECT round, device FROM updates UNION ALL SELECT round, device FROM buffered_updates)"
"""Every accepted update: a synchronous round's (``updates``) and a buffered round's, one per model version."""


def connect_ro(db: Path) -> sqlite3.Connection:
    """A read-only connection to the store (raises ``sqlite3.OperationalError`` when it does not exist)."""
    conn = sqlite3.connect(f"{db.resolve().as_uri()}?mode=ro", uri=True, timeout=5, check_same_thread=False)
    conn.execute("PRAGMA query_only = 1")
    return conn


@dataclass
class PresenceBook:
    """What the devices' retained presences say that the store does not keep (model version, agent version, the
    back-ends a device found unusable and why).

    Fed by a subscription on the hub's own transport (``on_presence``); thread-safe; read-only on the wire.
    """

    fleet: str
    _seen: dict[str, dict[str, Any]] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def on_presence(self, topic: str, payload: bytes) -> None:
        if not payload:
            return
        try:
            msg = decode(payload, max_bytes=1 << 16)
        except FedgeError:
            return
        if not isinstance(msg, Presence) or msg.fleet != self.fleet:
            return
        if Topics(self.fleet).device_of(topic) != msg.device:
            return
        with self._lock:
            self._seen[msg.device] = {"model_version": msg.model_version, "agent_version": msg.agent_version or None,
                                      "backend_faults": dict(msg.backend_faults)}

    def get(self, device: str) -> dict[str, Any]:
        with self._lock:
            return dict(self._seen.get(device, {}))


@dataclass(frozen=True)
class MetricFacts:
    """Everything ``/metrics`` reports, read in one go."""

    rounds_by_status: dict[str, int]
    open_round: int | None
    accepted_updates: int
    rejects: dict[str, int]
    declines: dict[str, int]
    devices_online: int
    devices_known: int
    durations: list[float]
    last_accuracy: float | None
    epsilon_spent: float | None
    epsilon_budget: float | None


class FleetReader:
    """Read-only queries of one hub store; every call opens (and closes) its own read-only connection."""

    def __init__(self, db: Path, *, fleet: str, privacy: PrivacyConfig | None = None,
                 presence: PresenceBook | None = None, clock: Callable[[], float] = time.time) -> None:
        self.db = db
        self.fleet = fleet
        self.privacy = privacy or PrivacyConfig()
        self.presence = presence
        self.clock = clock
        self._eps_cache: tuple[Any, float] | None = None
        self._eps_lock = threading.Lock()

    @contextmanager
    def _conn(self) -> Iterator[sqlite3.Connection | None]:
        if not self.db.exists():
            yield None
            return
        with closing(connect_ro(self.db)) as conn:
            conn.execute("BEGIN")  # one consistent view of the whole snapshot
            try:
                yield conn
            finally:
                conn.rollback()

    # -- pieces ---------------------------------------------------------------------------------
    @staticmethod
    def _tables(conn: sqlite3.Connection) -> set[str]:
        return {str(r[0]) for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}

    @staticmethod
    def _counts(conn: sqlite3.Connection, sql: str) -> dict[str, int]:
        return {str(k): int(n) for k, n in conn.execute(sql)}

    def _ledger(self, conn: sqlite3.Connection) -> list[LedgerRow]:
        rows = conn.execute("SELECT round, mode, noise_multiplier, clip, sample_rate, amplified, cohort, "
                            "expected_cohort, epsilon, delta, ts FROM privacy_ledger ORDER BY round").fetchall()
        return [LedgerRow(r[0], r[1], r[2], r[3], r[4], bool(r[5]), *r[6:]) for r in rows]

    def _epsilon_spent(self, ledger: list[LedgerRow]) -> float | None:
        """The fleet's epsilon at the configured delta, recomputed from the whole ledger (cached per ledger)."""
        if not ledger:
            return None
        key = (tuple(ledger), self.privacy.delta)
        with self._eps_lock:
            if self._eps_cache is not None and self._eps_cache[0] == key:
                return self._eps_cache[1]
        try:
            from fedge.core.privacy import ledger_epsilon

            eps = float(ledger_epsilon(ledger, self.privacy.delta))
        except Exception:  # no accountant installed: each row keeps the fleet's epsilon after it
            eps = float(ledger[-1].epsilon)
        with self._eps_lock:
            self._eps_cache = (key, eps)
        return eps

    @staticmethod
    def _device_scores(conn: sqlite3.Connection) -> dict[int, dict[str, float]]:
        from fedge.core.hub_round import federated_scores

        per_round: dict[int, list[dict[str, float]]] = defaultdict(list)
        for rid, metrics in conn.execute("SELECT round, metrics FROM updates WHERE metrics LIKE '%val_acc_%'"):
            try:
                per_round[int(rid)].append(json.loads(metrics))
            except ValueError:
                continue
        return {rid: federated_scores(ms) for rid, ms in per_round.items()}

    # -- the dashboard's JSON ---------------------------------------------------------------------
    def snapshot(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "fleet": self.fleet, "generated_at": self.clock(), "store": False, "current_version": None,
            "open_round": None, "devices": [], "rounds": [], "chart": {"source_accuracy": None, "series": []},
            "rejects": {}, "declines": {}, "alerts": [], "excluded": [], "privacy": None, "alert": None,
        }
        with self._conn() as conn:
            if conn is None or "rounds" not in self._tables(conn):
                return out
            out["store"] = True
            row = conn.execute("SELECT value FROM meta WHERE key = 'current_version'").fetchone()
            out["current_version"] = None if row is None else str(row[0])
            alert = conn.execute("SELECT value FROM meta WHERE key = 'alert'").fetchone()
            out["alert"] = str(alert[0]) if alert is not None and alert[0] else None
            out["devices"] = self._devices(conn)
            ledger = self._ledger(conn)
            out["rounds"] = self._rounds(conn, ledger)
            out["open_round"] = next((r["id"] for r in reversed(out["rounds"]) if r["status"] == "open"), None)
            out["chart"] = self._chart(conn, out["rounds"])
            out["rejects"] = self._counts(conn, "SELECT reason, COUNT(*) FROM rejects GROUP BY reason ORDER BY reason")
            out["declines"] = self._counts(conn, "SELECT reason, COUNT(*) FROM declines GROUP BY reason "
                                                 "ORDER BY reason")
            tables = self._tables(conn)
            if "alerts" in tables:
                out["alerts"] = [{"round": r, "kind": k, "device": d, "detail": t, "ts": ts} for r, k, d, t, ts in
                                 conn.execute("SELECT round, kind, device, detail, ts FROM alerts ORDER BY id DESC "
                                              "LIMIT 50")]
            if "conduct" in tables:
                last = conn.execute("SELECT MAX(id) FROM rounds").fetchone()[0] or 0
                out["excluded"] = [{"device": d, "until": u, "permanent": bool(p), "exclusions": e, "reason": why}
                                   for d, u, p, e, why in conn.execute(
                                       "SELECT device, until, permanent, exclusions, reason FROM conduct "
                                       "WHERE permanent = 1 OR until > ? ORDER BY device", (last + 1,))]
            if ledger:
                p = self.privacy
                out["privacy"] = {
                    "mode": p.mode, "delta": p.delta, "epsilon_budget": p.epsilon_budget or None,
                    "epsilon_spent": self._epsilon_spent(ledger),
                    "rounds": [{"round": r.round, "mode": r.mode, "noise_multiplier": r.noise_multiplier,
                                "clip": r.clip, "sample_rate": r.sample_rate, "amplified": r.amplified,
                                "cohort": r.cohort, "expected_cohort": r.expected_cohort, "epsilon": r.epsilon}
                               for r in ledger],
                }
        return out

    def _devices(self, conn: sqlite3.Connection) -> list[dict[str, Any]]:
        contributed = {str(d): (int(n), int(last)) for d, n, last in
                       conn.execute("SELECT device, COUNT(*), MAX(round) FROM updates GROUP BY device")}
        trainer: dict[str, str] = {}
        # the latest update of each device (SQLite: the bare column comes from the MAX(rowid) row)
        for dev, metrics, _rowid in conn.execute("SELECT device, metrics, MAX(rowid) FROM updates GROUP BY device"):
            try:
                keys = json.loads(metrics)
            except ValueError:
                continue
            used = [k.removeprefix("backend_") for k in keys if k.startswith("backend_")]
            if used:
                trainer[str(dev)] = used[0]
        declines = self._counts(conn, "SELECT device, COUNT(*) FROM declines GROUP BY device")
        last_decline = {str(d): {"round": int(r), "reason": str(why), "detail": str(detail)} for d, r, why, detail, _ts
                        in conn.execute("SELECT device, round, reason, detail, MAX(ts) FROM declines GROUP BY device")}
        rejects = self._counts(conn, "SELECT device, COUNT(*) FROM rejects WHERE device IS NOT NULL GROUP BY device")
        out = []
        for dev, online, n, backends, last_seen in conn.execute(
                "SELECT device, online, n_samples, backends, last_seen FROM devices ORDER BY device"):
            seen = self.presence.get(dev) if self.presence is not None else {}
            n_rounds, last_round = contributed.get(dev, (0, None))
            out.append({
                "device": dev, "online": bool(online), "last_seen": last_seen, "n_samples": n,
                "backends": json.loads(backends), "backend_faults": seen.get("backend_faults", {}),
                "trainer": trainer.get(dev),
                "model_version": seen.get("model_version"), "agent_version": seen.get("agent_version"),
                "rounds": n_rounds, "last_round": last_round,
                "declines": declines.get(dev, 0), "last_decline": last_decline.get(dev),
                "rejects": rejects.get(dev, 0),
            })
        return out

    def _rounds(self, conn: sqlite3.Connection, ledger: list[LedgerRow]) -> list[dict[str, Any]]:
        declined = {int(r): int(n) for r, n in conn.execute("SELECT round, COUNT(*) FROM declines GROUP BY round")}
        details = {int(r): str(d) for r, d in conn.execute("SELECT round, detail FROM round_details")}
        updates = _ACCEPTED if "buffered_updates" in self._tables(conn) else "updates"  # buffered: every version's
        accepted_open = {int(r): int(n) for r, n in conn.execute(
            f"SELECT round, COUNT(DISTINCT device) FROM {updates} WHERE round IN "
            "(SELECT id FROM rounds WHERE status = 'open') GROUP BY round")}
        eps = {r.round: r.epsilon for r in ledger}
        out = []
        for (rid, status, mv, selected, opened, closed, newv, acc, loss, devices, n, rej) in conn.execute(
                "SELECT id, status, model_version, selected, opened_at, closed_at, new_version, accuracy, loss, "
                "devices, n_samples, rejected FROM rounds ORDER BY id"):
            contributors = json.loads(devices) if devices else []
            out.append({
                "id": rid, "status": status, "model_version": mv, "new_version": newv,
                "cohort": len(json.loads(selected)),
                "devices": accepted_open.get(rid, 0) if status == "open" else len(contributors),
                "declined": declined.get(rid, 0), "rejected": rej, "n_samples": n, "accuracy": acc, "loss": loss,
                "seconds": None if closed is None else round(closed - opened, 3), "opened_at": opened,
                "closed_at": closed, "detail": details.get(rid), "epsilon": eps.get(rid),
            })
        return out

    def _chart(self, conn: sqlite3.Connection, rounds: list[dict[str, Any]]) -> dict[str, Any]:
        hub = [[r["id"], r["accuracy"]] for r in rounds if r["accuracy"] is not None]
        series = [{"key": HUB_SERIES[0], "name": HUB_SERIES[1], "points": hub}]
        scores = self._device_scores(conn)
        for key, name in DEVICE_SERIES:
            points = [[rid, s[key]] for rid, s in sorted(scores.items()) if key in s]
            if points:
                series.append({"key": key, "name": name, "points": points})
        row = conn.execute("SELECT accuracy FROM versions ORDER BY idx LIMIT 1").fetchone()
        return {"source_accuracy": None if row is None else row[0], "series": series}

    # -- /metrics ----------------------------------------------------------------------------------
    def metric_facts(self) -> MetricFacts | None:
        """The figures of ``/metrics``; None before the hub has created its store."""
        with self._conn() as conn:
            if conn is None or "rounds" not in self._tables(conn):
                return None
            by_status = self._counts(conn, "SELECT status, COUNT(*) FROM rounds WHERE status != 'open' "
                                           "GROUP BY status")
            row = conn.execute("SELECT MAX(id) FROM rounds WHERE status = 'open'").fetchone()
            # announced rounds only: one decided without an announce (refused, cohort below quorum) selected nobody
            durations = [float(c - o) for o, c in conn.execute(
                "SELECT opened_at, closed_at FROM rounds WHERE closed_at IS NOT NULL AND selected != '[]' ORDER BY id")]
            # the deployed (current) version's held-out accuracy, not a candidate the deploy gate held back
            acc = conn.execute("SELECT v.accuracy FROM versions v JOIN meta m ON m.key = 'current_version' "
                               "AND m.value = v.version WHERE v.accuracy IS NOT NULL").fetchone()
            online, known = conn.execute("SELECT COALESCE(SUM(online), 0), COUNT(*) FROM devices").fetchone()
            ledger = self._ledger(conn)
            return MetricFacts(
                rounds_by_status=by_status, open_round=None if row[0] is None else int(row[0]),
                accepted_updates=int(conn.execute(
                    f"SELECT COUNT(*) FROM {_ACCEPTED if 'buffered_updates' in self._tables(conn) else 'updates'}"
                ).fetchone()[0]),
                rejects=self._counts(conn, "SELECT reason, COUNT(*) FROM rejects GROUP BY reason"),
                declines=self._counts(conn, "SELECT reason, COUNT(*) FROM declines GROUP BY reason"),
                devices_online=int(online), devices_known=int(known), durations=durations,
                last_accuracy=None if acc is None else float(acc[0]),
                epsilon_spent=self._epsilon_spent(ledger),
                epsilon_budget=self.privacy.epsilon_budget or None,
            )


__all__ = ["DEVICE_SERIES", "FleetReader", "MetricFacts", "PresenceBook", "connect_ro"]
