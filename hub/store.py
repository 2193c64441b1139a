"""The hub's durable state: one SQLite file (``state_dir/hub.sqlite``, WAL).

Tables: ``meta`` (current version pointer, schedule chain), ``backbones``, ``versions``,
``rounds`` (params, selection, deadline, outcome), ``updates`` (accepted updates, UNIQUE(round, device):
nonce, samples, metrics, and the raw frame until the round closes unless ``keep_update_payloads``),
``rejects`` (reason per refused message), ``control`` (ignored control messages), ``devices`` (presence),
``candidates``, ``selections`` and ``selection_reports`` (source-model selection). Every write is its own
transaction. One connection, guarded by a lock, shared by the daemon's threads. The file, its -wal and -shm
are 0600 in a 0700 folder.
"""

from __future__ import annotations

import json
import os
import sqlite3
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedge.protocol.fsio import PRIVATE_FILE, private_dir

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS backbones (
    sha256 TEXT PRIMARY KEY, path TEXT NOT NULL, created_at REAL NOT NULL);
CREATE TABLE IF NOT EXISTS versions (
    version TEXT PRIMARY KEY, idx INTEGER UNIQUE NOT NULL, sha256 TEXT NOT NULL, parent TEXT,
    round INTEGER, backbone_sha256 TEXT NOT NULL, accuracy REAL, loss REAL, created_at REAL NOT NULL);
CREATE TABLE IF NOT EXISTS rounds (
    id INTEGER PRIMARY KEY, status TEXT NOT NULL, model_version TEXT NOT NULL, backbone_sha256 TEXT NOT NULL,
    params TEXT NOT NULL, selected TEXT NOT NULL, opened_at REAL NOT NULL, deadline REAL NOT NULL,
    closed_at REAL, new_version TEXT, accuracy REAL, loss REAL, devices TEXT, n_samples INTEGER,
    rejected INTEGER);
CREATE TABLE IF NOT EXISTS updates (
    round INTEGER NOT NULL, device TEXT NOT NULL, nonce TEXT NOT NULL, n_samples INTEGER NOT NULL,
    metrics TEXT NOT NULL, payload BLOB NOT NULL, received_at REAL NOT NULL, UNIQUE(round, device));
CREATE TABLE IF NOT EXISTS rejects (
    id INTEGER PRIMARY KEY AUTOINCREMENT, round INTEGER, device TEXT, reason TEXT NOT NULL,
    detail TEXT NOT NULL, ts REAL NOT NULL);
CREATE TABLE IF NOT EXISTS control (
    id INTEGER PRIMARY KEY AUTOINCREMENT, outcome TEXT NOT NULL, detail TEXT NOT NULL, ts REAL NOT NULL);
CREATE TABLE IF NOT EXISTS devices (
    device TEXT PRIMARY KEY, online INTEGER NOT NULL, n_samples INTEGER, backends TEXT NOT NULL,
    last_seen REAL NOT NULL);
CREATE TABLE IF NOT EXISTS privacy_ledger (
    round INTEGER PRIMARY KEY, mode TEXT NOT NULL, noise_multiplier REAL NOT NULL, clip REAL NOT NULL,
    sample_rate REAL NOT NULL, amplified INTEGER NOT NULL, cohort INTEGER NOT NULL, expected_cohort REAL NOT NULL,
    epsilon REAL NOT NULL, delta REAL NOT NULL, ts REAL NOT NULL);
CREATE TABLE IF NOT EXISTS device_caps (device TEXT PRIMARY KEY, dp INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS declines (
    round INTEGER NOT NULL, device TEXT NOT NULL, reason TEXT NOT NULL, detail TEXT NOT NULL, ts REAL NOT NULL,
    UNIQUE(round, device));
CREATE TABLE IF NOT EXISTS round_details (round INTEGER PRIMARY KEY, detail TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS round_metrics (round INTEGER PRIMARY KEY, metrics TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS candidates (
    name TEXT PRIMARY KEY, backbone_sha256 TEXT NOT NULL, added_at REAL NOT NULL);
CREATE TABLE IF NOT EXISTS selections (
    round INTEGER PRIMARY KEY, status TEXT NOT NULL, model_version TEXT NOT NULL, candidates TEXT NOT NULL,
    selected TEXT NOT NULL, params TEXT NOT NULL, opened_at REAL NOT NULL, deadline REAL NOT NULL, closed_at REAL,
    ranking TEXT, winner TEXT, new_version TEXT, detail TEXT);
CREATE TABLE IF NOT EXISTS selection_reports (
    round INTEGER NOT NULL, device TEXT NOT NULL, nonce TEXT NOT NULL, metrics TEXT NOT NULL, received_at REAL NOT NULL,
    UNIQUE(round, device));
CREATE TABLE IF NOT EXISTS secagg_sums (
    round INTEGER PRIMARY KEY, included TEXT NOT NULL, dropped TEXT NOT NULL, ring_bits INTEGER NOT NULL,
    scale REAL NOT NULL, total BLOB NOT NULL, ts REAL NOT NULL, silent TEXT NOT NULL DEFAULT '[]');
"""


@dataclass(frozen=True)
class RoundRow:
    id: int
    status: str
    model_version: str
    backbone_sha256: str
    params: dict[str, Any]
    selected: tuple[str, ...]
    opened_at: float
    deadline: float
    closed_at: float | None
    new_version: str | None
    accuracy: float | None
    loss: float | None
    devices: tuple[str, ...]
    n_samples: int | None
    rejected: int | None


@dataclass(frozen=True)
class VersionRow:
    version: str
    idx: int
    sha256: str
    parent: str | None
    round: int | None
    backbone_sha256: str
    accuracy: float | None
    loss: float | None
    created_at: float


@dataclass(frozen=True)
class LedgerRow:
    """One DP round in the privacy ledger: its parameters, the cohort, and the fleet's epsilon after it."""

    round: int
    mode: str
    noise_multiplier: float
    clip: float
    sample_rate: float
    amplified: bool  # counted as Poisson-subsampled (central mode with [privacy] amplification = true)
    cohort: int
    expected_cohort: float
    epsilon: float
    delta: float
    ts: float


@dataclass(frozen=True)
class SelectionRow:
    """A source-model selection round: its candidates (name -> backbone sha256) and, once closed, the ranking
    (best first: name, accuracy, loss, val_n) and the version that deployed the winner."""

    round: int
    status: str
    model_version: str
    candidates: dict[str, str]
    selected: tuple[str, ...]
    params: dict[str, Any]
    opened_at: float
    deadline: float
    closed_at: float | None
    ranking: list[dict[str, Any]]
    winner: str | None
    new_version: str | None
    detail: str | None


@dataclass(frozen=True)
class StoredUpdate:
    device: str
    nonce: str
    n_samples: int
    payload: bytes


class Store:
    """The hub's SQLite database (WAL, ``synchronous=FULL``): model versions, rounds, accepted updates (raw
    payloads), rejects, control outcomes, devices and metadata.

    Every write is one committed transaction before the call returns, so what was acknowledged on the wire
    survives a crash (an update is stored before it is acked). Safe to call from several threads.
    """

    def __init__(self, path: Path, *, keep_update_payloads: bool = False) -> None:
        private_dir(path.parent)
        os.close(os.open(path, os.O_RDWR | os.O_CREAT, PRIVATE_FILE))  # SQLite gives -wal/-shm the file's mode
        for suffix in ("", "-wal", "-shm", "-journal"):
            if os.path.exists(f"{path}{suffix}"):
                os.chmod(f"{path}{suffix}", PRIVATE_FILE)
        self.path = path
        self.keep_update_payloads = keep_update_payloads
        self._lock = threading.RLock()
        self._db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None, timeout=30)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute("PRAGMA secure_delete=ON")  # a dropped payload is overwritten, not just unlinked
        self._db.executescript(SCHEMA)
        self._migrate()

    def _migrate(self) -> None:
        """Columns added to tables that an older hub.sqlite already has (CREATE TABLE IF NOT EXISTS keeps them)."""
        have = {row[1] for row in self._db.execute("PRAGMA table_info(secagg_sums)")}
        if "silent" not in have:
            self._db.execute("ALTER TABLE secagg_sums ADD COLUMN silent TEXT NOT NULL DEFAULT '[]'")

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def _one(self, sql: str, args: tuple[Any, ...] = ()) -> Any:
        with self._lock:
            return self._db.execute(sql, args).fetchone()

    def _all(self, sql: str, args: tuple[Any, ...] = ()) -> list[Any]:
        with self._lock:
            return self._db.execute(sql, args).fetchall()

    def _write(self, sql: str, args: tuple[Any, ...] = ()) -> None:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                self._db.execute(sql, args)
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise

    # meta
    def get_meta(self, key: str) -> str | None:
        row = self._one("SELECT value FROM meta WHERE key = ?", (key,))
        return None if row is None else str(row[0])

    def set_meta(self, key: str, value: str) -> None:
        self._write("INSERT INTO meta(key, value) VALUES (?, ?) ON CONFLICT(key) DO UPDATE SET value = excluded.value",
                    (key, value))

    def recent_update_norms(self, rounds: int) -> list[float]:
        """The accepted updates' L2 norms (before clipping) of the last ``rounds`` non-DP rounds that recorded some."""
        recorded = json.loads(self.get_meta("update_norms") or "[]")
        return [float(n) for _rid, norms in recorded[-rounds:] if rounds > 0 for n in norms]

    def add_update_norms(self, rid: int, norms: list[float], keep: int) -> None:
        """Record round ``rid``'s accepted norms, keeping the last ``keep`` rounds'."""
        recorded = json.loads(self.get_meta("update_norms") or "[]")
        recorded = [r for r in recorded if r[0] != rid] + [[rid, [round(n, 9) for n in norms]]]
        self.set_meta("update_norms", json.dumps(recorded[-keep:] if keep > 0 else []))

    # backbones and versions
    def add_backbone(self, sha256: str, path: str) -> None:
        self._write("INSERT OR IGNORE INTO backbones(sha256, path, created_at) VALUES (?, ?, ?)",
                    (sha256, path, time.time()))

    def backbone_path(self, sha256: str) -> str | None:
        row = self._one("SELECT path FROM backbones WHERE sha256 = ?", (sha256,))
        return None if row is None else str(row[0])

    def _insert_version(self, row: VersionRow) -> None:
        """INSERT one version row (inside the caller's transaction)."""
        self._db.execute("INSERT INTO versions VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                         (row.version, row.idx, row.sha256, row.parent, row.round, row.backbone_sha256,
                          row.accuracy, row.loss, row.created_at))

    def add_version(self, row: VersionRow, *, make_current: bool = True) -> None:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                self._insert_version(row)
                if make_current:
                    self._db.execute("INSERT INTO meta(key, value) VALUES ('current_version', ?) "
                                     "ON CONFLICT(key) DO UPDATE SET value = excluded.value", (row.version,))
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise

    def next_version_idx(self) -> int:
        row = self._one("SELECT MAX(idx) FROM versions")
        return 0 if row[0] is None else int(row[0]) + 1

    def version(self, version: str) -> VersionRow | None:
        row = self._one("SELECT * FROM versions WHERE version = ?", (version,))
        return None if row is None else VersionRow(*row)

    def versions(self) -> list[VersionRow]:
        return [VersionRow(*r) for r in self._all("SELECT * FROM versions ORDER BY idx")]

    def first_version_of(self, backbone_sha256: str) -> VersionRow | None:
        row = self._one("SELECT * FROM versions WHERE backbone_sha256 = ? ORDER BY idx LIMIT 1", (backbone_sha256,))
        return None if row is None else VersionRow(*row)

    # rounds
    def next_round_id(self) -> int:
        """One more than any round id used by a round or a ledger entry."""
        row = self._one("SELECT MAX(m) FROM (SELECT MAX(id) AS m FROM rounds UNION ALL "
                        "SELECT MAX(round) FROM privacy_ledger UNION ALL SELECT MAX(round) FROM selections)")
        return int(row[0] or 0) + 1

    def open_round(self, rid: int, model_version: str, backbone: str, params: dict[str, Any],
                   selected: tuple[str, ...], opened_at: float, deadline: float,
                   ledger: LedgerRow | None = None) -> None:
        """Open a round and, for a DP round, append its ledger entry: both or neither (one transaction)."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                if ledger is not None:
                    self._db.execute("INSERT INTO privacy_ledger VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                                     (ledger.round, ledger.mode, ledger.noise_multiplier, ledger.clip,
                                      ledger.sample_rate, int(ledger.amplified), ledger.cohort,
                                      ledger.expected_cohort, ledger.epsilon, ledger.delta, ledger.ts))
                self._db.execute(
                    "INSERT INTO rounds(id, status, model_version, backbone_sha256, params, selected, opened_at, "
                    "deadline) VALUES (?, 'open', ?, ?, ?, ?, ?, ?)",
                    (rid, model_version, backbone, json.dumps(params), json.dumps(list(selected)), opened_at,
                     deadline),
                )
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise

    def record_unopened_round(self, rid: int, status: str, model_version: str, backbone: str,
                              params: dict[str, Any], at: float, detail: str) -> None:
        """A round that was decided without being announced (refused, or a cohort below quorum): one transaction."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                self._db.execute(
                    "INSERT INTO rounds(id, status, model_version, backbone_sha256, params, selected, opened_at, "
                    "deadline, closed_at, devices, n_samples, rejected) VALUES (?, ?, ?, ?, ?, '[]', ?, ?, ?, '[]', "
                    "0, 0)", (rid, status, model_version, backbone, json.dumps(params), at, at, at))
                self._db.execute("INSERT INTO round_details(round, detail) VALUES (?, ?)", (rid, detail))
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise

    def close_round(self, rid: int, status: str, closed_at: float, accuracy: float | None, loss: float | None,
                    devices: tuple[str, ...], n_samples: int, rejected: int, version: VersionRow | None,
                    make_current: bool = True) -> None:
        """Close a round and (if it produced one) record its new version, as current unless ``make_current`` is
        False (a candidate the deploy gate held back), in ONE transaction."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                if version is not None:
                    self._insert_version(version)
                    if make_current:
                        self._db.execute("INSERT INTO meta(key, value) VALUES ('current_version', ?) "
                                         "ON CONFLICT(key) DO UPDATE SET value = excluded.value", (version.version,))
                self._db.execute(
                    "UPDATE rounds SET status = ?, closed_at = ?, new_version = ?, accuracy = ?, loss = ?, "
                    "devices = ?, n_samples = ?, rejected = ? WHERE id = ?",
                    (status, closed_at, None if version is None else version.version, accuracy, loss,
                     json.dumps(list(devices)), n_samples, rejected, rid),
                )
                if not self.keep_update_payloads:
                    self._drop_closed_payloads()
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            if not self.keep_update_payloads:  # the old pages out of the WAL too (best effort: a reader may hold it)
                self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")

    def _drop_closed_payloads(self) -> None:
        """Empty the raw frames of every update of a closed round (nonces, sample counts and metrics stay: the
        redelivery check and the dashboard need those, never the frame)."""
        self._db.execute("UPDATE updates SET payload = x'' WHERE length(payload) > 0 AND round IN "
                         "(SELECT id FROM rounds WHERE status != 'open')")

    @staticmethod
    def _round(row: Any) -> RoundRow:
        (rid, status, mv, bb, params, selected, opened, deadline, closed, newv, acc, loss, devices, n, rej) = row
        return RoundRow(rid, status, mv, bb, json.loads(params), tuple(json.loads(selected)), opened, deadline,
                        closed, newv, acc, loss, tuple(json.loads(devices or "[]")), n, rej)

    def round(self, rid: int) -> RoundRow | None:
        row = self._one("SELECT * FROM rounds WHERE id = ?", (rid,))
        return None if row is None else self._round(row)

    def rounds(self) -> list[RoundRow]:
        return [self._round(r) for r in self._all("SELECT * FROM rounds ORDER BY id")]

    def open_rounds(self) -> list[RoundRow]:
        return [self._round(r) for r in self._all("SELECT * FROM rounds WHERE status = 'open' ORDER BY id")]

    def last_round(self) -> RoundRow | None:
        row = self._one("SELECT * FROM rounds ORDER BY id DESC LIMIT 1")
        return None if row is None else self._round(row)

    def set_round_detail(self, rid: int, detail: str) -> None:
        self._write("INSERT INTO round_details(round, detail) VALUES (?, ?) "
                    "ON CONFLICT(round) DO UPDATE SET detail = excluded.detail", (rid, detail))

    def set_round_metrics(self, rid: int, metrics: dict[str, float]) -> None:
        self._write("INSERT INTO round_metrics(round, metrics) VALUES (?, ?) "
                    "ON CONFLICT(round) DO UPDATE SET metrics = excluded.metrics", (rid, json.dumps(metrics)))

    def round_metrics(self, rid: int) -> dict[str, float]:
        """The federated evaluation of round ``rid`` (empty when the devices reported none)."""
        row = self._one("SELECT metrics FROM round_metrics WHERE round = ?", (rid,))
        return {} if row is None else {str(k): float(v) for k, v in json.loads(row[0]).items()}

    def set_version_score(self, version: str, accuracy: float, loss: float) -> None:
        self._write("UPDATE versions SET accuracy = ?, loss = ? WHERE version = ?", (accuracy, loss, version))

    def round_detail(self, rid: int) -> str | None:
        row = self._one("SELECT detail FROM round_details WHERE round = ?", (rid,))
        return None if row is None else str(row[0])

    # privacy ledger and declines
    @staticmethod
    def _ledger(row: Any) -> LedgerRow:
        rid, mode, z, clip, q, amplified, *rest = row
        return LedgerRow(rid, mode, z, clip, q, bool(amplified), *rest)

    def ledger(self) -> list[LedgerRow]:
        return [self._ledger(r) for r in self._all("SELECT * FROM privacy_ledger ORDER BY round")]

    def ledger_row(self, rid: int) -> LedgerRow | None:
        row = self._one("SELECT * FROM privacy_ledger WHERE round = ?", (rid,))
        return None if row is None else self._ledger(row)

    def set_dp_capable(self, device: str, dp: bool) -> None:
        self._write("INSERT INTO device_caps(device, dp) VALUES (?, ?) ON CONFLICT(device) DO UPDATE SET dp = "
                    "excluded.dp", (device, int(dp)))

    def dp_capable(self) -> set[str]:
        """Devices whose last presence said they apply announced DP (clip + noise, no data in the clear)."""
        return {str(d) for (d,) in self._all("SELECT device FROM device_caps WHERE dp = 1")}

    def add_decline(self, rid: int, device: str, reason: str, detail: str) -> bool:
        """Record a device's decline of a round; False when it had already declined it."""
        try:
            self._write("INSERT INTO declines VALUES (?, ?, ?, ?, ?)", (rid, device, reason, detail, time.time()))
        except sqlite3.IntegrityError:
            return False
        return True

    def declines(self, rid: int) -> dict[str, str]:
        """device -> reason of every decline of round ``rid``."""
        return {str(d): str(r) for d, r in self._all("SELECT device, reason FROM declines WHERE round = ?", (rid,))}

    def decline_counts(self) -> dict[str, int]:
        return {str(r): int(n) for r, n in self._all("SELECT reason, COUNT(*) FROM declines GROUP BY reason")}

    # updates
    def add_update(self, rid: int, device: str, nonce: str, n_samples: int, metrics: dict[str, float],
                   payload: bytes) -> None:
        """Store one accepted update; raises sqlite3.IntegrityError if (round, device) is already stored."""
        self._write("INSERT INTO updates VALUES (?, ?, ?, ?, ?, ?, ?)",
                    (rid, device, nonce, n_samples, json.dumps(metrics), payload, time.time()))

    def accepted_nonces(self, rid: int) -> dict[str, str]:
        return {str(d): str(n) for d, n in self._all("SELECT device, nonce FROM updates WHERE round = ?", (rid,))}

    def iter_updates(self, rid: int) -> Iterator[StoredUpdate]:
        """Stream the stored updates of a round, one row at a time."""
        with self._lock:
            rowids = [r[0] for r in self._db.execute("SELECT rowid FROM updates WHERE round = ? ORDER BY rowid",
                                                     (rid,))]
        for rowid in rowids:
            row = self._one("SELECT device, nonce, n_samples, payload FROM updates WHERE rowid = ?", (rowid,))
            if row is not None:
                yield StoredUpdate(str(row[0]), str(row[1]), int(row[2]), bytes(row[3]))

    def update_metrics(self, rid: int) -> list[dict[str, float]]:
        return [json.loads(m) for (m,) in self._all("SELECT metrics FROM updates WHERE round = ?", (rid,))]

    # source-model selection
    def add_candidate(self, name: str, backbone_sha256: str) -> None:
        """Register (or re-point) a candidate source model by name."""
        self._write("INSERT INTO candidates VALUES (?, ?, ?) ON CONFLICT(name) DO UPDATE SET "
                    "backbone_sha256 = excluded.backbone_sha256, added_at = excluded.added_at",
                    (name, backbone_sha256, time.time()))

    def candidates(self) -> dict[str, str]:
        """name -> backbone sha256 of every registered candidate, by name."""
        return {str(n): str(b) for n, b in self._all("SELECT name, backbone_sha256 FROM candidates ORDER BY name")}

    def open_selection(self, rid: int, model_version: str, candidates: dict[str, str], selected: tuple[str, ...],
                       params: dict[str, Any], opened_at: float, deadline: float) -> None:
        self._write("INSERT INTO selections(round, status, model_version, candidates, selected, params, opened_at, "
                    "deadline) VALUES (?, 'open', ?, ?, ?, ?, ?, ?)",
                    (rid, model_version, json.dumps(candidates), json.dumps(list(selected)), json.dumps(params),
                     opened_at, deadline))

    def add_selection_report(self, rid: int, device: str, nonce: str, metrics: dict[str, float]) -> bool:
        """Store a device's selection report; False when it already reported this round."""
        try:
            self._write("INSERT INTO selection_reports VALUES (?, ?, ?, ?, ?)",
                        (rid, device, nonce, json.dumps(metrics), time.time()))
        except sqlite3.IntegrityError:
            return False
        return True

    def selection_reports(self, rid: int) -> dict[str, tuple[str, dict[str, float]]]:
        """device -> (nonce, metrics) of every report of selection round ``rid``."""
        rows = self._all("SELECT device, nonce, metrics FROM selection_reports WHERE round = ? ORDER BY rowid", (rid,))
        return {str(d): (str(n), json.loads(m)) for d, n, m in rows}

    def close_selection(self, rid: int, status: str, closed_at: float, ranking: list[dict[str, Any]],
                        winner: str | None, detail: str, version: VersionRow | None) -> None:
        """Close a selection round and record the version deploying its winner (made current): one transaction."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                if version is not None:
                    self._insert_version(version)
                    self._db.execute("INSERT INTO meta(key, value) VALUES ('current_version', ?) "
                                     "ON CONFLICT(key) DO UPDATE SET value = excluded.value", (version.version,))
                self._db.execute(
                    "UPDATE selections SET status = ?, closed_at = ?, ranking = ?, winner = ?, new_version = ?, "
                    "detail = ? WHERE round = ?",
                    (status, closed_at, json.dumps(ranking), winner, None if version is None else version.version,
                     detail, rid))
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise

    @staticmethod
    def _selection(row: Any) -> SelectionRow:
        rid, status, mv, cands, selected, params, opened, deadline, closed, ranking, winner, newv, detail = row
        return SelectionRow(rid, status, mv, json.loads(cands), tuple(json.loads(selected)), json.loads(params),
                            opened, deadline, closed, json.loads(ranking or "[]"), winner, newv, detail)

    def selections(self) -> list[SelectionRow]:
        return [self._selection(r) for r in self._all("SELECT * FROM selections ORDER BY round")]

    def selection(self, rid: int) -> SelectionRow | None:
        row = self._one("SELECT * FROM selections WHERE round = ?", (rid,))
        return None if row is None else self._selection(row)

    # rejects and control
    def add_secagg_sum(self, rid: int, included: tuple[str, ...], dropped: tuple[str, ...], ring_bits: int,
                       scale: float, total: bytes, silent: tuple[str, ...] = ()) -> None:
        """What the hub learnt in a SecAgg round: the unmasked ring sum (little-endian uint64), who is in it, who
        dropped before sending a masked input, and who is in it but did not answer the unmask request."""
        self._write("INSERT OR REPLACE INTO secagg_sums(round, included, dropped, ring_bits, scale, total, ts, silent) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                    (rid, json.dumps(list(included)), json.dumps(list(dropped)), ring_bits, scale, total, time.time(),
                     json.dumps(list(silent))))

    def secagg_silent(self, rid: int) -> list[str]:
        """Devices in a SecAgg round's sum that dropped after their masked input (their self-mask was rebuilt)."""
        row = self._one("SELECT silent FROM secagg_sums WHERE round = ?", (rid,))
        return [] if row is None else list(json.loads(row[0]))

    def secagg_sum(self, rid: int) -> tuple[list[str], list[str], int, float, bytes] | None:
        """``(included, dropped before input, ring_bits, scale, ring sum bytes)`` of a SecAgg round."""
        row = self._one("SELECT included, dropped, ring_bits, scale, total FROM secagg_sums WHERE round = ?", (rid,))
        if row is None:
            return None
        return json.loads(row[0]), json.loads(row[1]), int(row[2]), float(row[3]), bytes(row[4])

    def add_reject(self, rid: int | None, device: str | None, reason: str, detail: str) -> None:
        self._write("INSERT INTO rejects(round, device, reason, detail, ts) VALUES (?, ?, ?, ?, ?)",
                    (rid, device, reason, detail[:500], time.time()))

    def reject_counts(self, rid: int | None = None) -> dict[str, int]:
        if rid is None:
            rows = self._all("SELECT reason, COUNT(*) FROM rejects GROUP BY reason ORDER BY reason")
        else:
            rows = self._all("SELECT reason, COUNT(*) FROM rejects WHERE round = ? GROUP BY reason ORDER BY reason",
                             (rid,))
        return {str(r): int(n) for r, n in rows}

    def add_control(self, outcome: str, detail: str) -> None:
        self._write("INSERT INTO control(outcome, detail, ts) VALUES (?, ?, ?)", (outcome, detail[:500], time.time()))

    def control_counts(self) -> dict[str, int]:
        rows = self._all("SELECT outcome, COUNT(*) FROM control GROUP BY outcome ORDER BY outcome")
        return {str(r): int(n) for r, n in rows}

    # devices
    def upsert_device(self, device: str, online: bool, n_samples: int | None, backends: tuple[str, ...],
                      last_seen: float) -> None:
        self._write(
            "INSERT INTO devices VALUES (?, ?, ?, ?, ?) ON CONFLICT(device) DO UPDATE SET online = excluded.online, "
            "n_samples = COALESCE(excluded.n_samples, devices.n_samples), backends = excluded.backends, "
            "last_seen = excluded.last_seen",
            (device, int(online), n_samples, json.dumps(list(backends)), last_seen),
        )

    def devices(self) -> list[dict[str, Any]]:
        rows = self._all("SELECT device, online, n_samples, backends, last_seen FROM devices ORDER BY device")
        return [{"device": d, "online": bool(o), "n_samples": n, "backends": json.loads(b), "last_seen": s}
                for d, o, n, b, s in rows]


__all__ = ["LedgerRow", "RoundRow", "SelectionRow", "Store", "StoredUpdate", "VersionRow"]
