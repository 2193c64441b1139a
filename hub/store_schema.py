"""The hub database's tables (``CREATE TABLE IF NOT EXISTS``: an older file keeps its data)."""

BUFFERED_UPDATES = """CREATE TABLE IF NOT EXISTS {name} (
    round INTEGER NOT NULL, device TEXT NOT NULL, model_version TEXT NOT NULL, nonce TEXT NOT NULL,
    n_samples INTEGER NOT NULL, metrics TEXT NOT NULL, payload BLOB NOT NULL, received_at REAL NOT NULL,
    payload_at INTEGER, payload_len INTEGER, attempt INTEGER NOT NULL DEFAULT 0,
    UNIQUE(round, device, model_version, attempt));"""
"""A buffered round's accepted updates: one per device, model version and attempt (the round's ``buffer_attempt``
when it was accepted). ``{name}``: the table's name (a migration copies an older table into a new one)."""

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
    metrics TEXT NOT NULL, payload BLOB NOT NULL, received_at REAL NOT NULL, payload_at INTEGER,
    payload_len INTEGER, UNIQUE(round, device));
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
CREATE TABLE IF NOT EXISTS round_outcomes (round INTEGER PRIMARY KEY, deployed INTEGER NOT NULL, gate_round INTEGER);
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
CREATE TABLE IF NOT EXISTS alerts (
    id INTEGER PRIMARY KEY AUTOINCREMENT, round INTEGER, kind TEXT NOT NULL, device TEXT, detail TEXT NOT NULL,
    ts REAL NOT NULL);
CREATE TABLE IF NOT EXISTS conduct (
    device TEXT PRIMARY KEY, strikes INTEGER NOT NULL, exclusions INTEGER NOT NULL, until INTEGER NOT NULL,
    permanent INTEGER NOT NULL, reason TEXT NOT NULL, last INTEGER NOT NULL, updated REAL NOT NULL);
CREATE TABLE IF NOT EXISTS participation (
    device TEXT PRIMARY KEY, selected INTEGER NOT NULL, answered INTEGER NOT NULL);
""" + BUFFERED_UPDATES.format(name="buffered_updates") + "\n"

__all__ = ["BUFFERED_UPDATES", "SCHEMA"]
