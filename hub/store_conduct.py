"""Tables of the hub database about the devices' conduct: alerts for the operator, each device's standing (strikes
and exclusions) and how often it answered when selected (a mixin of :class:`~fedge.hub.store.Store`)."""

from __future__ import annotations

import time
from typing import Any

from fedge.core.conduct import Record, Standing
from fedge.hub.store_db import Database

__all__ = ["ConductTables"]


class ConductTables(Database):
    """Alerts, device standing, participation."""

    # alerts: what the operator must look at (the dashboard shows them)
    def add_alert(self, rid: int | None, kind: str, device: str | None, detail: str) -> None:
        self._write("INSERT INTO alerts(round, kind, device, detail, ts) VALUES (?, ?, ?, ?, ?)",
                    (rid, kind, device, detail, time.time()))

    def alerts(self, limit: int = 100) -> list[dict[str, Any]]:
        """The latest alerts, newest first."""
        rows = self._all("SELECT round, kind, device, detail, ts FROM alerts ORDER BY id DESC LIMIT ?", (limit,))
        return [{"round": r, "kind": k, "device": d, "detail": t, "ts": ts} for r, k, d, t, ts in rows]

    # standing
    def standing(self, device: str) -> Standing:
        row = self._one("SELECT strikes, exclusions, until, permanent, reason, last FROM conduct WHERE device = ?",
                        (device,))
        return Standing() if row is None else Standing(int(row[0]), int(row[1]), int(row[2]), bool(row[3]),
                                                       str(row[4]), int(row[5]))

    def standings(self) -> dict[str, Standing]:
        rows = self._all("SELECT device, strikes, exclusions, until, permanent, reason, last FROM conduct "
                         "ORDER BY device")
        return {str(d): Standing(int(s), int(e), int(u), bool(p), str(r), int(la)) for d, s, e, u, p, r, la in rows}

    def set_standing(self, device: str, s: Standing) -> None:
        self._write("INSERT INTO conduct VALUES (?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT(device) DO UPDATE SET "
                    "strikes = excluded.strikes, exclusions = excluded.exclusions, until = excluded.until, "
                    "permanent = excluded.permanent, reason = excluded.reason, last = excluded.last, "
                    "updated = excluded.updated",
                    (device, s.strikes, s.exclusions, s.until, int(s.permanent), s.reason, s.last, time.time()))

    # participation
    def records(self) -> dict[str, Record]:
        rows = self._all("SELECT device, selected, answered FROM participation")
        return {str(d): Record(int(s), int(a)) for d, s, a in rows}

    def count_participation(self, selected: tuple[str, ...], answered: set[str]) -> None:
        """One round: every selected device counted, those that answered counted as such (one transaction)."""
        with self.transaction() as db:
            for d in selected:
                db.execute("INSERT INTO participation VALUES (?, 1, ?) ON CONFLICT(device) DO UPDATE SET "
                           "selected = selected + 1, answered = answered + excluded.answered",
                           (d, int(d in answered)))
