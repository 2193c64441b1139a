"""Tables of the hub database about the fleet rather than the model: source-model selection, secure sums,
rejects, control outcomes and devices (a mixin of :class:`~fedge.hub.store.Store`)."""

from __future__ import annotations

import json
import sqlite3
import time
from typing import Any

from fedge.hub.store_db import Database
from fedge.hub.store_rows import SelectionRow, VersionRow

__all__ = ["FleetTables"]


class FleetTables(Database):
    """Selection rounds and their reports, SecAgg sums, rejects, control outcomes, devices."""

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
        with self.transaction():
            if version is not None:
                self._insert_version(version)
                self._db.execute("INSERT INTO meta(key, value) VALUES ('current_version', ?) "
                                 "ON CONFLICT(key) DO UPDATE SET value = excluded.value", (version.version,))
            self._db.execute(
                "UPDATE selections SET status = ?, closed_at = ?, ranking = ?, winner = ?, new_version = ?, "
                "detail = ? WHERE round = ?",
                (status, closed_at, json.dumps(ranking), winner, None if version is None else version.version,
                 detail, rid))

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

    def registered_sample(self, device: str) -> int | None:
        """The sample count of ``device``'s latest presence that had one (what its updates may claim at most)."""
        row = self._one("SELECT n_samples FROM devices WHERE device = ?", (device,))
        return None if row is None or row[0] is None else int(row[0])

    def devices(self) -> list[dict[str, Any]]:
        rows = self._all("SELECT device, online, n_samples, backends, last_seen FROM devices ORDER BY device")
        return [{"device": d, "online": bool(o), "n_samples": n, "backends": json.loads(b), "last_seen": s}
                for d, o, n, b, s in rows]
