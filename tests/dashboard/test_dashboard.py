"""The dashboard and /metrics against a store written by the real hub daemon (in-memory broker): the JSON
snapshot, the Prometheus exposition, the token rules, the [http] config and the CLI flag."""

from __future__ import annotations

import json
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from email.message import Message
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from fedge.core.losses import Score
from fedge.hub.config import HttpConfig, HubConfig, config_from_mapping
from fedge.hub.dashboard.listen import is_loopback, parse_listen
from fedge.hub.dashboard.metrics import DURATION_BUCKETS
from fedge.hub.dashboard.server import COOKIE, DashboardServer, start_for_hub
from fedge.hub.dashboard.snapshot import FleetReader, PresenceBook
from fedge.protocol.codec import encode
from fedge.protocol.errors import ConfigError
from fedge.protocol.messages import Decline, DeclineReason, Presence
from fedge.protocol.transport import InMemoryBroker, InMemoryTransport
from tests.hub.fleet import FLEET, SHAPES, TOPICS, hub_config, iter_hub, run_hub, zero_delta

ROOT = Path(__file__).resolve().parents[2]
TOKEN = "s3cret-token-0123456789"


def _populate(cfg: HubConfig) -> None:
    """Round 1 completes (a, b update with validation metrics, c declines; hub accuracy 0.5), one malformed
    message is rejected, round 2 fails its quorum after the deadline (31 s), then c goes offline."""
    for fleet in run_hub(cfg, evaluator=lambda _d, _s, _h: Score(loss=1.25, accuracy=0.5)):
        a, b, c = fleet.device("a"), fleet.device("b"), fleet.device("c")
        for d in (a, b, c):
            d.hello()
        rnd = fleet.start_round()
        assert rnd.selected == ("a", "b", "c")
        a.update(rnd, zero_delta(SHAPES, 0.1), n=10, metrics={
            "backend_litert": 1.0, "val_n": 10.0, "val_acc_global": 0.2, "val_acc_personal": 0.6})
        b.update(rnd, zero_delta(SHAPES, 0.1), n=30, metrics={
            "backend_numpy": 1.0, "val_n": 30.0, "val_acc_global": 0.4, "val_acc_personal": 0.8})
        c.transport.publish(TOPICS.decline("c"), encode(Decline(fleet=FLEET, round=1, device="c",
                                                                reason=DeclineReason.DATA_ERROR)))
        assert [r.round for r in fleet.results] == [1]
        b.send(b"not a fedge frame")
        rnd2 = fleet.start_round()
        a.update(rnd2, zero_delta(SHAPES, 0.1), n=10, metrics={"backend_litert": 1.0, "val_n": 10.0,
                                                                "val_acc_global": 0.3})
        fleet.advance(31)
        assert [str(r.status) for r in fleet.results] == ["completed", "failed_quorum"]
        c.hello(online=False)


@pytest.fixture
def cfg(tmp_path: Path, artifacts: Path) -> HubConfig:
    cfg = hub_config(tmp_path / "state", artifacts, aggregation={"proximal_lambda": 0.0})
    _populate(cfg)
    return cfg


@pytest.fixture
def reader(cfg: HubConfig) -> FleetReader:
    return FleetReader(cfg.state_dir / "hub.sqlite", fleet=cfg.fleet, privacy=cfg.privacy)


def _get(url: str, headers: dict[str, str] | None = None, method: str = "GET") -> tuple[int, Message, bytes]:
    req = urllib.request.Request(url, headers=headers or {}, method=method)
    try:
        with urllib.request.urlopen(req, timeout=10) as res:
            return res.status, res.headers, res.read()
    except urllib.error.HTTPError as err:
        with err:
            return err.code, err.headers, err.read()


@pytest.fixture
def server(reader: FleetReader) -> Iterator[DashboardServer]:
    with DashboardServer(reader) as srv:  # the defaults: loopback, a free port, no token
        yield srv


def test_snapshot_shows_devices_rounds_chart_rejects_and_declines(reader: FleetReader) -> None:
    s = reader.snapshot()
    assert s["fleet"] == FLEET and s["store"] is True and s["current_version"] == "v1" and s["open_round"] is None
    devices = {d["device"]: d for d in s["devices"]}
    assert sorted(devices) == ["a", "b", "c"]
    assert devices["a"]["online"] and devices["b"]["online"] and not devices["c"]["online"]
    assert devices["a"]["trainer"] == "litert" and devices["b"]["trainer"] == "numpy"
    assert devices["c"]["trainer"] is None and devices["a"]["backends"] == ["numpy"]
    assert (devices["a"]["rounds"], devices["a"]["last_round"]) == (2, 2)
    assert (devices["b"]["rounds"], devices["b"]["rejects"], devices["b"]["declines"]) == (1, 1, 0)
    assert (devices["c"]["rounds"], devices["c"]["declines"]) == (0, 1)
    assert devices["a"]["model_version"] is None  # no presence book: the store does not keep it
    r1, r2 = s["rounds"]
    assert (r1["id"], r1["status"], r1["new_version"], r1["cohort"], r1["devices"], r1["declined"]) == (
        1, "completed", "v1", 3, 2, 1)
    assert (r1["accuracy"], r1["loss"], r1["n_samples"]) == (0.5, 1.25, 40)
    assert (r2["id"], r2["status"], r2["new_version"], r2["devices"], r2["seconds"]) == (
        2, "failed_quorum", None, 1, 31.0)
    series = {x["key"]: x["points"] for x in s["chart"]["series"]}
    assert series["hub"] == [[1, 0.5]]
    assert series["val_acc_global"] == [[1, pytest.approx(0.35)], [2, pytest.approx(0.3)]]  # val_n-weighted
    assert series["val_acc_personal"] == [[1, pytest.approx(0.75)]]
    assert "val_acc_local_only" not in series
    assert s["rejects"] == {"malformed": 1} and s["declines"] == {"data_error": 1}
    assert s["privacy"] is None
    json.dumps(s, allow_nan=False)  # plain JSON


def test_snapshot_before_the_hub_made_its_store(tmp_path: Path) -> None:
    s = FleetReader(tmp_path / "nothing" / "hub.sqlite", fleet="f9").snapshot()
    assert s["store"] is False and s["devices"] == [] and s["rounds"] == []
    assert not (tmp_path / "nothing").exists()  # reading creates nothing


def test_the_reader_cannot_write(reader: FleetReader) -> None:
    import sqlite3

    from fedge.hub.dashboard.snapshot import connect_ro

    conn = connect_ro(reader.db)
    try:
        with pytest.raises(sqlite3.OperationalError):
            conn.execute("DELETE FROM rounds")
    finally:
        conn.close()


def _families(text: str) -> dict[str, Any]:
    return {f.name: f for f in text_string_to_metric_families(text)}


def _value(fams: dict[str, Any], family: str, sample: str, **labels: str) -> float:
    for s in fams[family].samples:
        if s.name == sample and s.labels == labels:
            return float(s.value)
    raise AssertionError(f"no {sample}{labels} in {[(s.name, s.labels) for s in fams[family].samples]}")


def test_metrics_parse_and_count_the_store(server: DashboardServer) -> None:
    status, headers, body = _get(server.url + "metrics")
    assert status == 200 and headers["Content-Type"].startswith("text/plain; version=")
    fams = _families(body.decode())
    assert fams["fedge_rounds"].type == "counter"
    assert _value(fams, "fedge_rounds", "fedge_rounds_total", status="completed") == 1
    assert _value(fams, "fedge_rounds", "fedge_rounds_total", status="failed_quorum") == 1
    assert _value(fams, "fedge_rounds", "fedge_rounds_total", status="refused_budget") == 0
    assert _value(fams, "fedge_round_open", "fedge_round_open") == 0
    assert _value(fams, "fedge_updates", "fedge_updates_total", outcome="accepted", reason="") == 3
    assert _value(fams, "fedge_updates", "fedge_updates_total", outcome="rejected", reason="malformed") == 1
    assert _value(fams, "fedge_declines", "fedge_declines_total", reason="data_error") == 1
    assert _value(fams, "fedge_devices_online", "fedge_devices_online") == 2
    assert _value(fams, "fedge_devices_known", "fedge_devices_known") == 3
    assert _value(fams, "fedge_model_accuracy", "fedge_model_accuracy") == 0.5
    hist = "fedge_round_duration_seconds"
    assert fams[hist].type == "histogram"
    assert _value(fams, hist, hist + "_count") == 2 and _value(fams, hist, hist + "_sum") == 31
    assert _value(fams, hist, hist + "_bucket", le="0.5") == 1  # round 1 closed at once
    assert _value(fams, hist, hist + "_bucket", le="30.0") == 1
    assert _value(fams, hist, hist + "_bucket", le="60.0") == 2  # round 2 waited for its 30 s deadline
    assert _value(fams, hist, hist + "_bucket", le="+Inf") == 2
    assert len([s for s in fams[hist].samples if s.name.endswith("_bucket")]) == len(DURATION_BUCKETS) + 1
    assert "fedge_privacy_epsilon_spent" not in fams  # no ledger rows: no privacy metrics


def test_metrics_with_a_privacy_ledger(tmp_path: Path, artifacts: Path) -> None:
    devices = [f"d{i:02d}" for i in range(8)]
    cfg = hub_config(tmp_path / "state", artifacts, rounds={"min_devices": 1}, aggregation={"proximal_lambda": 0.0},
                     privacy={"mode": "central", "noise_multiplier": 1.0, "clip": 1.0, "sample_rate": 0.5,
                              "delta": 1e-5, "epsilon_budget": 50.0})
    gen = iter_hub(cfg)
    fleet = next(gen)
    try:
        for d in devices:
            fleet.device(d).hello()
        for _ in range(2):
            rnd = fleet.start_round()
            for d in rnd.selected:
                fleet.device(d).update(rnd, zero_delta(SHAPES, 0.1), n=1, metrics={})
        ledger = fleet.hub.store.ledger()
        spent = fleet.hub.epsilon_spent()
    finally:
        gen.close()
    assert len(ledger) == 2
    reader = FleetReader(cfg.state_dir / "hub.sqlite", fleet=cfg.fleet, privacy=cfg.privacy)
    s = reader.snapshot()
    p = s["privacy"]
    assert p["mode"] == "central" and p["epsilon_budget"] == 50.0 and p["delta"] == 1e-5
    assert p["epsilon_spent"] == pytest.approx(spent)
    assert [r["round"] for r in p["rounds"]] == [1, 2] and p["rounds"][1]["epsilon"] == pytest.approx(spent)
    assert [r["epsilon"] for r in s["rounds"]] == [pytest.approx(ledger[0].epsilon), pytest.approx(spent)]
    from fedge.hub.dashboard.metrics import render

    fams = _families(render(reader)[0].decode())
    assert _value(fams, "fedge_privacy_epsilon_spent", "fedge_privacy_epsilon_spent") == pytest.approx(spent)
    assert _value(fams, "fedge_privacy_epsilon_budget", "fedge_privacy_epsilon_budget") == 50.0


def test_loopback_by_default_serves_page_assets_json_and_nothing_else(server: DashboardServer) -> None:
    assert server.host == "127.0.0.1" and server.port > 0 and server.url == f"http://127.0.0.1:{server.port}/"
    status, headers, body = _get(server.url)
    assert status == 200 and headers["Content-Type"].startswith("text/html")
    html = body.decode()
    assert 'src="static/app.js"' in html and 'href="static/style.css"' in html
    assert "http://" not in html.replace('"http://www.w3.org', "") and "https://" not in html  # no CDN
    assert "script-src 'self'" in headers["Content-Security-Policy"]
    assert headers["Referrer-Policy"] == "no-referrer" and headers["Cache-Control"] == "no-store"
    for name, kind in (("app.js", "text/javascript"), ("style.css", "text/css")):
        status, headers, body = _get(server.url + "static/" + name)
        assert status == 200 and headers["Content-Type"].startswith(kind) and len(body) > 500
        assert b"https://" not in body
    status, headers, body = _get(server.url + "api/state")
    assert status == 200 and headers["Content-Type"] == "application/json"
    state = json.loads(body)
    assert [r["id"] for r in state["rounds"]] == [1, 2] and len(state["devices"]) == 3
    assert _get(server.url + "healthz")[0] == 200
    assert _get(server.url + "static/../../hub.sqlite")[0] == 404
    assert _get(server.url + "nope")[0] == 404
    status, headers, _ = _get(server.url + "api/state", method="POST")
    assert status == 405 and headers["Allow"] == "GET, HEAD"
    status, headers, body = _get(server.url + "api/state", method="HEAD")
    assert status == 200 and body == b"" and int(headers["Content-Length"]) > 0


def test_off_loopback_every_request_needs_the_token(reader: FleetReader) -> None:
    with pytest.raises(ConfigError) as info:
        DashboardServer(reader, "0.0.0.0", 0)
    assert info.value.field == "http.token"
    with pytest.raises(ConfigError):
        DashboardServer(reader, "0.0.0.0", 0, token="short")
    with DashboardServer(reader, "0.0.0.0", 0, token=TOKEN) as srv:
        base = f"http://127.0.0.1:{srv.port}/"
        for path in ("", "api/state", "metrics", "static/app.js", "healthz"):
            status, headers, _ = _get(base + path)
            assert status == 401, path
            assert headers["WWW-Authenticate"].startswith("Bearer")
            assert _get(base + path, {"Authorization": "Bearer wrong-token-0123456789"})[0] == 401
            assert _get(base + path + "?token=wrong-token-0123456789")[0] == 401
            assert _get(base + path, {"Authorization": f"Bearer {TOKEN}"})[0] == 200, path
        status, headers, body = _get(base + f"?token={TOKEN}")
        assert status == 200 and b"static/app.js" in body
        cookie = headers["Set-Cookie"]
        assert cookie.startswith(f"{COOKIE}={TOKEN};") and "HttpOnly" in cookie and "SameSite=Strict" in cookie
        # the page's own requests (script, style, polls) carry the cookie
        assert _get(base + "api/state", {"Cookie": f"{COOKIE}={TOKEN}"})[0] == 200
        assert _get(base + "static/app.js", {"Cookie": f"{COOKIE}=nope"})[0] == 401


def test_a_token_is_enforced_on_loopback_too(reader: FleetReader) -> None:
    with DashboardServer(reader, token=TOKEN) as srv:
        assert _get(srv.url + "api/state")[0] == 401
        assert _get(srv.url + f"api/state?token={TOKEN}")[0] == 200


def test_presence_adds_each_devices_model_version(cfg: HubConfig) -> None:
    """``start_for_hub`` watches presences on the hub's transport: the model and agent version of each device."""
    broker = InMemoryBroker()
    device = InMemoryTransport(broker)
    msg = Presence(fleet=FLEET, device="a", online=True, backends=("litert",), model_version="v1",
                   agent_version="0.1.0")
    device.publish(TOPICS.presence("a"), encode(msg), retain=True)
    device.publish(TOPICS.presence("b"), encode(Presence(fleet=FLEET, device="a", online=True,
                                                         model_version="v9")), retain=True)  # wrong topic
    device.publish(TOPICS.presence("c"), b"garbage", retain=True)
    live = HubConfig(**{**cfg.__dict__, "http": HttpConfig(listen="127.0.0.1:0")})
    srv = start_for_hub(live, InMemoryTransport(broker))
    try:
        devices = {d["device"]: d for d in json.loads(_get(srv.url + "api/state")[2])["devices"]}
    finally:
        srv.stop()
    assert (devices["a"]["model_version"], devices["a"]["agent_version"]) == ("v1", "0.1.0")
    assert devices["b"]["model_version"] is None and devices["c"]["model_version"] is None
    book = PresenceBook(FLEET)
    book.on_presence(TOPICS.presence("a"), b"")
    assert book.get("a") == {}


def test_a_devices_unusable_back_ends_and_its_last_decline_are_shown(cfg: HubConfig) -> None:
    """The reason a device gave for an unusable back-end (its presence) and for its last decline (the store)."""
    book = PresenceBook(FLEET)
    why = "crashed with SIGSEGV in train_step"
    book.on_presence(TOPICS.presence("c"), encode(Presence(fleet=FLEET, device="c", online=True,
                                                           backends=("litert", "numpy"),
                                                           backend_faults={"litert": why})))
    devices = {d["device"]: d for d in FleetReader(cfg.state_dir / "hub.sqlite", fleet=FLEET,
                                                   presence=book).snapshot()["devices"]}
    assert devices["c"]["backend_faults"] == {"litert": why} and devices["a"]["backend_faults"] == {}
    assert devices["c"]["last_decline"] == {"round": 1, "reason": "data_error", "detail": ""}
    assert devices["a"]["last_decline"] is None


def test_stop_releases_the_port(reader: FleetReader) -> None:
    srv = DashboardServer(reader)
    srv.start()
    port = srv.port
    srv.stop()
    srv.stop()  # idempotent
    with DashboardServer(reader, port=port) as again:
        assert again.port == port and _get(again.url + "healthz")[0] == 200


@pytest.mark.parametrize(("text", "host", "port"), [
    ("127.0.0.1:8080", "127.0.0.1", 8080), ("localhost:0", "localhost", 0), ("[::1]:9100", "::1", 9100),
    ("0.0.0.0:80", "0.0.0.0", 80), ("hub.example:8080", "hub.example", 8080),
])
def test_parse_listen(text: str, host: str, port: int) -> None:
    assert parse_listen(text) == (host, port)


@pytest.mark.parametrize("text", ["8080", ":8080", "127.0.0.1:", "127.0.0.1:99999", "::1:80", "h:x"])
def test_parse_listen_refuses(text: str) -> None:
    with pytest.raises(ValueError):
        parse_listen(text)


def test_loopback() -> None:
    assert all(map(is_loopback, ["127.0.0.1", "127.9.9.9", "::1", "localhost", "LOCALHOST"]))
    assert not any(map(is_loopback, ["0.0.0.0", "::", "192.168.1.5", "hub.example", ""]))


def _table(tmp_path: Path, artifacts: Path, http: dict[str, Any] | None) -> HubConfig:
    table: dict[str, Any] = {"fleet": "f1", "artifacts": str(artifacts), "broker": {"url": "mqtt://127.0.0.1:1883"}}
    if http is not None:
        table["http"] = http
    return config_from_mapping(table, tmp_path)


def test_http_config(tmp_path: Path, artifacts: Path) -> None:
    off = _table(tmp_path, artifacts, None).http
    assert off == HttpConfig() and not off.enabled and off.listen == "" and off.token == ""
    on = _table(tmp_path, artifacts, {"listen": "127.0.0.1:8080"}).http
    assert on.enabled and on.token == ""
    remote = _table(tmp_path, artifacts, {"listen": "0.0.0.0:8080", "token": TOKEN}).http
    assert remote.token == TOKEN
    for http, field, words in [
        ({"listen": "0.0.0.0:8080"}, "http.token", "loopback"),
        ({"listen": "192.168.1.5:8080", "token": "short"}, "http.token", "16"),
        ({"listen": "127.0.0.1:8080", "token": "has spaces in it, far too"}, "http.token", "16"),
        ({"listen": "127.0.0.1"}, "http.listen", "HOST:PORT"),
        ({"listen": 8080}, "http.listen", "string"),
        ({"listen": "127.0.0.1:8080", "port": 1}, "http.port", "unknown"),
    ]:
        with pytest.raises(ConfigError) as info:
            _table(tmp_path, artifacts, http)
        assert info.value.field == field and words in str(info.value), (http, info.value)


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "fedge.cli", *args], capture_output=True, text=True, cwd=ROOT,
                          timeout=60)


def test_serve_check_validates_the_http_flag(hub_toml_path: Path) -> None:
    ok = _cli("hub", "serve", "--config", str(hub_toml_path), "--check", "--http", "127.0.0.1:8080")
    assert ok.returncode == 0 and "dashboard on 127.0.0.1:8080" in ok.stdout, ok.stderr
    bad = _cli("hub", "serve", "--config", str(hub_toml_path), "--check", "--http", "0.0.0.0:8080")
    assert bad.returncode == 2 and "http.token" in bad.stderr and "Traceback" not in bad.stderr
    bad = _cli("hub", "serve", "--config", str(hub_toml_path), "--check", "--http", "8080")
    assert bad.returncode == 2 and "http.listen" in bad.stderr


@pytest.fixture
def hub_toml_path(tmp_path: Path, artifacts: Path) -> Path:
    path = tmp_path / "hub.toml"
    path.write_text(f'fleet = "f1"\nartifacts = "{artifacts}"\n[broker]\nurl = "mqtt://127.0.0.1:1883"\n')
    return path
