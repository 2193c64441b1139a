"""The hub's SQLite connection: schema, migrations, the one lock, and the one transaction helper.

:class:`Database` is the base of :class:`~fedge.hub.store.Store`; the tables are grouped in mixins over it
(:class:`~fedge.hub.store_fleet.FleetTables`: selection, secure sums, rejects, control, devices).
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from fedge.hub.store_rows import VersionRow
from fedge.hub.store_schema import BUFFERED_UPDATES, SCHEMA
from fedge.protocol.fsio import PRIVATE_FILE, private_dir

__all__ = ["Database"]


class Database:
    """One SQLite connection (WAL, ``synchronous=FULL``), guarded by a lock shared by the daemon's threads."""

    def __init__(self, path: Path, *, keep_update_payloads: bool = False) -> None:
        private_dir(path.parent)
        os.close(os.open(path, os.O_RDWR | os.O_CREAT, PRIVATE_FILE))  # SQLite gives -wal/-shm the file's mode
        for suffix in ("", "-wal", "-shm", "-journal"):
            if os.path.exists(f"{path}{suffix}"):
                os.chmod(f"{path}{suffix}", PRIVATE_FILE)
        self.path = path
        self.keep_update_payloads = keep_update_payloads
        self._lock = threading.RLock()
        self._depth = 0  # 0: no transaction; 1: inside batch(); more: nested savepoints
        self._before_commit: list[Callable[[], None]] = []
        self._after_commit: list[Callable[[], None]] = []
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
        have = {row[1] for row in self._db.execute("PRAGMA table_info(updates)")}
        for column in ("payload_at", "payload_len"):  # a frame in updates/round-<id>.bin (store_payloads.py)
            if column not in have:
                self._db.execute(f"ALTER TABLE updates ADD COLUMN {column} INTEGER")
        have = {row[1] for row in self._db.execute("PRAGMA table_info(buffered_updates)")}
        if "attempt" not in have:
            self._add_buffer_attempt()

    def _add_buffer_attempt(self) -> None:
        """``buffered_updates`` of a hub from before ``buffer_attempt``: UNIQUE(round, device, model_version) becomes
        UNIQUE(round, device, model_version, attempt), every row attempt 0. SQLite changes a constraint only by
        copying the table: one transaction, the rows in the order they were accepted (a resumed round folds them in
        that order)."""
        columns = ("round, device, model_version, nonce, n_samples, metrics, payload, received_at, payload_at, "
                   "payload_len")
        with self.transaction():
            self._db.execute(BUFFERED_UPDATES.format(name="buffered_updates_attempt"))
            self._db.execute(f"INSERT INTO buffered_updates_attempt({columns}) SELECT {columns} FROM "
                             "buffered_updates ORDER BY rowid")
            self._db.execute("DROP TABLE buffered_updates")
            self._db.execute("ALTER TABLE buffered_updates_attempt RENAME TO buffered_updates")

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def _one(self, sql: str, args: tuple[Any, ...] = ()) -> Any:
        with self._lock:
            return self._db.execute(sql, args).fetchone()

    def _all(self, sql: str, args: tuple[Any, ...] = ()) -> list[Any]:
        with self._lock:
            return self._db.execute(sql, args).fetchall()

    @contextlib.contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """One write transaction (BEGIN IMMEDIATE ... COMMIT; ROLLBACK on any exception), under the store's lock:
        every statement in the block is committed together or not at all. Inside another transaction (a
        :meth:`batch`) it is a savepoint: rolled back alone on an exception, committed with the outer one."""
        with self._lock:
            if self._depth:
                name = f"fedge_sp{self._depth}"
                self._db.execute(f"SAVEPOINT {name}")
                self._depth += 1
                try:
                    yield self._db
                    self._db.execute(f"RELEASE {name}")
                except BaseException:
                    self._db.execute(f"ROLLBACK TO {name}")
                    self._db.execute(f"RELEASE {name}")
                    raise
                finally:
                    self._depth -= 1
                return
            self._db.execute("BEGIN IMMEDIATE")
            self._depth = 1
            try:
                yield self._db
                for fn in self._before_commit:
                    fn()
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                self._after_commit.clear()
                raise
            finally:
                self._depth = 0
                self._before_commit.clear()
        self._run_after_commit()

    @contextlib.contextmanager
    def batch(self) -> Iterator[None]:
        """Group commit: every write in the block (each :meth:`transaction` a savepoint) is committed by ONE
        COMMIT at the end, so one fsync makes a whole batch of messages durable. Nothing the block wrote may be
        announced before it returns (the hub holds its publishes and broker acknowledgements until then). An
        exception out of the block rolls the whole batch back."""
        with self.transaction():
            yield

    def before_commit(self, fn: Callable[[], None]) -> None:
        """Run ``fn`` (once) right before the current transaction commits (now, outside one): making files durable
        that the transaction's rows name. If it raises, the transaction is rolled back."""
        with self._lock:
            if self._depth:
                if fn not in self._before_commit:
                    self._before_commit.append(fn)
                return
        fn()

    def after_commit(self, fn: Callable[[], None]) -> None:
        """Run ``fn`` once the current batch is committed (now, outside a batch): work that cannot run inside a
        transaction, such as a WAL checkpoint."""
        with self._lock:
            if self._depth:
                self._after_commit.append(fn)
                return
        fn()

    def _run_after_commit(self) -> None:
        with self._lock:
            if self._depth:
                return
            todo, self._after_commit = self._after_commit, []
        for fn in todo:
            fn()

    def _write(self, sql: str, args: tuple[Any, ...] = ()) -> None:
        """One statement in its own transaction; inside a batch, part of it (one statement is atomic alone: no
        savepoint)."""
        with self._lock:
            if self._depth:
                self._db.execute(sql, args)
                return
        with self.transaction() as db:
            db.execute(sql, args)

    def get_meta(self, key: str) -> str | None:
        row = self._one("SELECT value FROM meta WHERE key = ?", (key,))
        return None if row is None else str(row[0])

    def set_meta(self, key: str, value: str) -> None:
        self._write("INSERT INTO meta(key, value) VALUES (?, ?) ON CONFLICT(key) DO UPDATE SET value = excluded.value",
                    (key, value))

    def _insert_version(self, row: VersionRow) -> None:
        """INSERT one version row (inside the caller's transaction)."""
        self._db.execute("INSERT INTO versions VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                         (row.version, row.idx, row.sha256, row.parent, row.round, row.backbone_sha256,
                          row.accuracy, row.loss, row.created_at))
