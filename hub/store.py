"""The hub's durable state: one SQLite file (``state_dir/hub.sqlite``, WAL).

Tables: ``meta`` (current version pointer, schedule chain), ``backbones``, ``versions``,
``rounds`` (params, selection, deadline, outcome), ``updates`` (accepted updates, UNIQUE(round, device):
nonce, samples, metrics; the raw frame in ``updates/round-<id>.bin`` until the round closes
(``hub/store_payloads.py``), or in the row and kept with ``keep_update_payloads``),
``buffered_updates`` (a buffered round's accepted updates, UNIQUE(round, device, model_version, attempt), the
frames as ``updates``'), ``rejects`` (reason per refused message), ``control`` (ignored control messages),
``devices`` (presence), ``candidates``, ``selections`` and ``selection_reports`` (source-model selection),
``alerts``, ``conduct`` and ``participation`` (devices' standing: :mod:`fedge.hub.store_conduct`). Every write is
its own transaction. One connection, guarded by a lock, shared by the daemon's threads. The file, its -wal and -shm
are 0600 in a 0700 folder.
"""

from __future__ import annotations

import json
import logging
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from fedge.core.aggregators import recent_norms, record_norms
from fedge.hub.store_conduct import ConductTables
from fedge.hub.store_fleet import FleetTables
from fedge.hub.store_payloads import PayloadFiles
from fedge.hub.store_rows import LedgerRow, RoundRow, SelectionRow, StoredUpdate, VersionRow

log = logging.getLogger("fedge.hub")


class Store(FleetTables, ConductTables):
    """The hub's SQLite database (WAL, ``synchronous=FULL``): model versions, rounds, accepted updates (raw
    payloads), rejects, control outcomes, devices and metadata.

    Every write is one committed transaction before the call returns, so what was acknowledged on the wire
    survives a crash (an update is stored before it is acked). Safe to call from several threads.
    """

    def __init__(self, path: Path, *, keep_update_payloads: bool = False) -> None:
        super().__init__(path, keep_update_payloads=keep_update_payloads)
        self.payloads = PayloadFiles(path.parent / "updates")
        if not keep_update_payloads:
            self.drop_closed_payload_files()  # a crash between a close and its files' deletion

    def close(self) -> None:
        with self._lock:
            self.payloads.close()
        super().close()

    # meta
    def recent_update_norms(self, rounds: int) -> list[float]:
        """The accepted updates' L2 norms (before clipping) of the last ``rounds`` non-DP rounds that recorded some."""
        return recent_norms(json.loads(self.get_meta("update_norms") or "[]"), rounds)

    def add_update_norms(self, rid: int, norms: list[float], keep: int) -> None:
        """Record round ``rid``'s accepted norms, keeping the last ``keep`` rounds'."""
        recorded = record_norms(json.loads(self.get_meta("update_norms") or "[]"), rid, norms, keep)
        self.set_meta("update_norms", json.dumps(recorded))

    # backbones and versions
    def add_backbone(self, sha256: str, path: str) -> None:
        self._write("INSERT OR IGNORE INTO backbones(sha256, path, created_at) VALUES (?, ?, ?)",
                    (sha256, path, time.time()))

    def backbone_path(self, sha256: str) -> str | None:
        row = self._one("SELECT path FROM backbones WHERE sha256 = ?", (sha256,))
        return None if row is None else str(row[0])

    def add_version(self, row: VersionRow, *, make_current: bool = True) -> None:
        with self.transaction():
            self._insert_version(row)
            if make_current:
                self._db.execute("INSERT INTO meta(key, value) VALUES ('current_version', ?) "
                                 "ON CONFLICT(key) DO UPDATE SET value = excluded.value", (row.version,))

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
        with self.transaction():
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

    def record_unopened_round(self, rid: int, status: str, model_version: str, backbone: str,
                              params: dict[str, Any], at: float, detail: str) -> None:
        """A round that was decided without being announced (refused, or a cohort below quorum): one transaction."""
        with self.transaction():
            self._db.execute(
                "INSERT INTO rounds(id, status, model_version, backbone_sha256, params, selected, opened_at, "
                "deadline, closed_at, devices, n_samples, rejected) VALUES (?, ?, ?, ?, ?, '[]', ?, ?, ?, '[]', "
                "0, 0)", (rid, status, model_version, backbone, json.dumps(params), at, at, at))
            self._db.execute("INSERT INTO round_details(round, detail) VALUES (?, ?)", (rid, detail))

    def close_round(self, rid: int, status: str, closed_at: float, accuracy: float | None, loss: float | None,
                    devices: tuple[str, ...], n_samples: int, rejected: int, version: VersionRow | None,
                    make_current: bool = True, gate_round: int | None = None, recorded: bool = False) -> None:
        """Close a round and (if it produced one) record its new version, as current unless ``make_current`` is
        False (a candidate a deploy gate held back; ``gate_round``: the evaluation round that decides it), in ONE
        transaction. ``recorded``: the version is in the store already (a buffered round's last version)."""
        with self.transaction():
            if version is not None:
                self._db.execute("INSERT OR REPLACE INTO round_outcomes VALUES (?, ?, ?)",
                                 (rid, int(make_current), gate_round))
                if not recorded:
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
        if not self.keep_update_payloads:  # the old pages out of the WAL too (best effort: a reader may hold it)
            self.after_commit(self._checkpoint)

    def _checkpoint(self) -> None:
        with self._lock:
            self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")

    def round_outcome(self, rid: int) -> tuple[bool, int | None] | None:
        """``(deployed when it closed, the evaluation round deciding it)`` of a round that registered a version."""
        row = self._one("SELECT deployed, gate_round FROM round_outcomes WHERE round = ?", (rid,))
        return None if row is None else (bool(row[0]), None if row[1] is None else int(row[1]))

    def set_round_deployed(self, rid: int, deployed: bool) -> None:
        """Record that an evaluation round decided round ``rid``'s version (``deployed`` or kept)."""
        self._write("UPDATE round_outcomes SET deployed = ? WHERE round = ?", (int(deployed), rid))

    def _drop_closed_payloads(self) -> None:
        """Empty the raw frames of every update of a closed round (nonces, sample counts and metrics stay: the
        redelivery check and the dashboard need those, never the frame): frames in hub.sqlite (written by an older
        hub) now, the rounds' frame files once the close is committed."""
        self._db.execute("UPDATE updates SET payload = x'' WHERE length(payload) > 0 AND round IN "
                         "(SELECT id FROM rounds WHERE status != 'open')")
        self._db.execute("UPDATE buffered_updates SET payload = x'' WHERE length(payload) > 0 AND round IN "
                         "(SELECT id FROM rounds WHERE status != 'open')")
        self.after_commit(self.drop_closed_payload_files)

    def drop_closed_payload_files(self) -> None:
        """Delete the frame files of rounds that are not open (also those a crash left behind)."""
        with self._lock:
            have = self.payloads.rounds()
            if have:
                marks = ",".join("?" * len(have))
                open_ = {int(r) for (r,) in self._db.execute(
                    f"SELECT id FROM rounds WHERE status = 'open' AND id IN ({marks})", tuple(have))}
                self.payloads.drop(have - open_)

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
        """Store one accepted update; raises sqlite3.IntegrityError if (round, device) is already stored. The frame
        goes to the round's frame file (fsynced before the row commits), or into hub.sqlite with
        ``keep_update_payloads`` (kept after the round)."""
        with self._lock:
            at: int | None = None
            size: int | None = None
            if not self.keep_update_payloads:
                at, size = self.payloads.append(rid, payload)
                payload = b""
                self.before_commit(self.payloads.sync)
            self._write("INSERT INTO updates(round, device, nonce, n_samples, metrics, payload, received_at, "
                        "payload_at, payload_len) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                        (rid, device, nonce, n_samples, json.dumps(metrics), payload, time.time(), at, size))

    def accepted_nonces(self, rid: int) -> dict[str, str]:
        return {str(d): str(n) for d, n in self._all("SELECT device, nonce FROM updates WHERE round = ?", (rid,))}

    def iter_updates(self, rid: int) -> Iterator[StoredUpdate]:
        """Stream the stored updates of a round, one row at a time."""
        with self._lock:
            rowids = [r[0] for r in self._db.execute("SELECT rowid FROM updates WHERE round = ? ORDER BY rowid",
                                                     (rid,))]
        for rowid in rowids:
            row = self._one("SELECT device, nonce, n_samples, payload, payload_at, payload_len FROM updates "
                            "WHERE rowid = ?", (rowid,))
            if row is None:
                continue
            payload: bytes | None = bytes(row[3])
            if not payload and row[4] is not None:
                with self._lock:
                    payload = self.payloads.read(rid, int(row[4]), int(row[5]))
                if payload is None:
                    log.error("round %d: the frame of %s's accepted update is missing from %s", rid, row[0],
                              self.payloads.path(rid))
                    continue
            yield StoredUpdate(str(row[0]), str(row[1]), int(row[2]), payload or b"")

    def add_buffered_update(self, rid: int, device: str, model_version: str, nonce: str, n_samples: int,
                            metrics: dict[str, float], payload: bytes, attempt: int = 0) -> None:
        """Store one accepted update of a buffered round (one per device, model version and ``attempt``, the round's
        ``buffer_attempt`` when it was accepted; sqlite3.IntegrityError if that one is already stored); the frame as
        :meth:`add_update` keeps it."""
        with self._lock:
            at: int | None = None
            size: int | None = None
            if not self.keep_update_payloads:
                at, size = self.payloads.append(rid, payload)
                payload = b""
                self.before_commit(self.payloads.sync)
            self._write("INSERT INTO buffered_updates(round, device, model_version, nonce, n_samples, metrics, "
                        "payload, received_at, payload_at, payload_len, attempt) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, "
                        "?)", (rid, device, model_version, nonce, n_samples, json.dumps(metrics), payload, time.time(),
                               at, size, attempt))

    def iter_buffered_updates(self, rid: int) -> Iterator[StoredUpdate]:
        """A buffered round's stored updates in the order they were accepted."""
        with self._lock:
            rows = self._db.execute("SELECT device, nonce, n_samples, payload, payload_at, payload_len FROM "
                                    "buffered_updates WHERE round = ? ORDER BY rowid", (rid,)).fetchall()
        for device, nonce, n, payload, at, size in rows:
            frame: bytes | None = bytes(payload)
            if not frame and at is not None:
                with self._lock:
                    frame = self.payloads.read(rid, int(at), int(size))
                if frame is None:
                    log.error("round %d: the frame of %s's accepted update is missing", rid, device)
                    continue
            yield StoredUpdate(str(device), str(nonce), int(n), frame or b"")

    def buffered_update_count(self, rid: int) -> int:
        row = self._one("SELECT COUNT(*) FROM buffered_updates WHERE round = ?", (rid,))
        return int(row[0])

    def update_metrics(self, rid: int) -> list[dict[str, float]]:
        return [json.loads(m) for (m,) in self._all("SELECT metrics FROM updates WHERE round = ?", (rid,))]

    def device_update_metrics(self, rid: int, device: str) -> dict[str, float] | None:
        """The metrics of ``device``'s accepted update in round ``rid`` (None: it has none)."""
        row = self._one("SELECT metrics FROM updates WHERE round = ? AND device = ?", (rid, device))
        return None if row is None else dict(json.loads(row[0]))




__all__ = ["LedgerRow", "RoundRow", "SelectionRow", "Store", "StoredUpdate", "VersionRow"]
