"""The dashboard in a real browser: mosquitto, a ``fedge hub serve --http`` process and agent processes run two
rounds, then Debian's headless Chromium loads the page, runs its script (which polls ``api/state``) and we read
the DOM it rendered and save a screenshot. Also ``fedge demo --http --hold`` serves the page until SIGINT."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from html.parser import HTMLParser
from pathlib import Path

import pytest

from tests.e2e.fleet import Fleet
from tests.helpers import Mosquitto, free_port

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]
# What Chromium needs as root in a container, and nothing that reaches beyond the page: no updates, no sync.
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--disable-dev-shm-usage", "--disable-extensions", "--disable-default-apps", "--mute-audio",
                  "--no-default-browser-check", "--hide-scrollbars", "--window-size=1280,1700"]


def chromium() -> str:
    """The system's Chromium (Debian's ``chromium`` package, installed by ``make system-deps``)."""
    for name in ("chromium", "chromium-browser"):
        path = shutil.which(name)
        if path:
            return path
    if os.environ.get("CI"):
        pytest.fail("chromium is not installed: make system-deps installs Debian's chromium")
    pytest.skip("chromium is not installed (make system-deps)")


def run_chromium(tmp_path: Path, url: str, *extra: str, budget_ms: int = 6000) -> subprocess.CompletedProcess[str]:
    profile = tmp_path / f"chromium-profile-{time.monotonic_ns()}"  # a fresh profile every run
    args = [chromium(), *CHROMIUM_FLAGS, f"--user-data-dir={profile}", f"--virtual-time-budget={budget_ms}",
            *extra, url]
    proc = subprocess.run(args, capture_output=True, text=True, timeout=120, cwd=tmp_path,
                          env={**os.environ, "HOME": str(tmp_path)})
    assert proc.returncode == 0, f"chromium failed ({proc.returncode}): {proc.stderr[-3000:]}"
    return proc


VOID = frozenset({"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source", "track",
                  "wbr"})


class Dom(HTMLParser):
    """The parts of the rendered DOM the test reads: table rows (attributes and cell texts), the text of every
    element with an id, and SVG elements with their attributes (in document order)."""

    def __init__(self) -> None:
        super().__init__()
        self.rows: list[tuple[dict[str, str | None], list[tuple[dict[str, str | None], str]]]] = []
        self.ids: dict[str, str] = {}
        self.svg: list[tuple[str, dict[str, str | None]]] = []
        self._open: list[tuple[str, dict[str, str | None], list[str]]] = []  # every open element and its text

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        if tag == "tr":
            self.rows.append((a, []))
        if tag in ("svg", "g", "circle", "polyline", "line"):
            self.svg.append((tag, a))
        if tag not in VOID:
            self._open.append((tag, a, []))

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.handle_starttag(tag, attrs)
        if tag not in VOID:
            self.handle_endtag(tag)

    def handle_endtag(self, tag: str) -> None:
        while self._open:
            open_tag, attrs, text = self._open.pop()
            joined = " ".join("".join(text).split())
            if open_tag == "td" and self.rows:
                self.rows[-1][1].append((attrs, joined))
            if attrs.get("id"):
                self.ids[str(attrs["id"])] = joined
            if open_tag == tag:
                break

    def handle_data(self, data: str) -> None:
        for _tag, _attrs, text in self._open:
            text.append(data)

    def rows_with(self, attr: str) -> dict[str, list[tuple[dict[str, str | None], str]]]:
        return {str(a[attr]): cells for a, cells in self.rows if a.get(attr) is not None}


def test_dashboard_renders_the_fleet_in_chromium(make_fleet: Callable[..., Fleet], mosquitto: Mosquitto,
                                                 tmp_path: Path) -> None:
    fleet = make_fleet(mosquitto.url, n_agents=3)
    port = free_port()
    fleet.write_hub_toml(schedule={"chain_rounds": 2})
    fleet.hub.args += ["--http", f"127.0.0.1:{port}"]  # the CLI flag (no [http] table in hub.toml)
    fleet.start_hub()
    fleet.start_agents(ready=True)
    fleet.start_round(b"{}")
    results = fleet.wait_results([1, 2], timeout_s=180)
    assert all(str(r.status) == "completed" and r.accuracy is not None for r in results), results
    final = results[-1].model_version
    # each agent republishes its presence once it holds the new model: the dashboard shows it
    fleet.wait_for(lambda s: all(s.models.get(d) == final for d in fleet.devices), 60, f"agents holding {final}")
    url = f"http://127.0.0.1:{port}/"
    with urllib.request.urlopen(url + "api/state", timeout=10) as res:
        assert [r["id"] for r in json.load(res)["rounds"]] == [1, 2]

    dom_text = run_chromium(tmp_path, url, "--dump-dom").stdout
    (tmp_path / "dashboard.html").write_text(dom_text)
    screenshot = tmp_path / "dashboard.png"
    run_chromium(tmp_path, url, f"--screenshot={screenshot}")
    shot = f"screenshot: {screenshot}, DOM: {tmp_path / 'dashboard.html'}"
    assert screenshot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", shot
    assert screenshot.stat().st_size > 20_000, shot  # a rendered page, not a blank one

    dom = Dom()
    dom.feed(dom_text)
    assert dom.ids.get("fleet") == "e2e", shot
    assert dom.ids.get("status", "").startswith("live"), (dom.ids.get("status"), shot)  # the script's poll worked
    # devices: every agent, online, holding the final model, with the trainer it used
    devices = dom.rows_with("data-device")
    assert sorted(devices) == fleet.devices, (sorted(devices), shot)
    for dev, cells in devices.items():
        texts = [t for _a, t in cells]
        assert texts[0] == dev and texts[1] == "online", (texts, shot)
        assert texts[3] == final, (dev, texts, shot)
        assert texts[4] in ("litert", "ort", "numpy"), (texts, shot)
        assert texts[7] == "2", (texts, shot)  # took part in both rounds
    # rounds: both, completed, with the hub's held-out accuracy
    rounds = dom.rows_with("data-round")
    assert sorted(rounds) == ["1", "2"], (sorted(rounds), shot)
    for res in results:
        cells = rounds[str(res.round)]
        texts = [t for _a, t in cells]
        assert texts[0] == str(res.round) and texts[1] == "completed", (texts, shot)
        assert texts[3] == res.model_version and texts[5] == "3", (texts, shot)
        acc_attrs, acc_text = cells[9]
        assert acc_text == f"{res.accuracy:.4f}", (acc_text, res.accuracy, shot)
        assert float(acc_attrs["data-value"] or "nan") == pytest.approx(res.accuracy), shot
    # the chart: an inline SVG with the hub's accuracy line through both rounds (and the devices' lines)
    tags = [t for t, _a in dom.svg]
    assert "svg" in tags and "polyline" in tags, shot
    series = {a.get("data-series") for t, a in dom.svg if t == "g"}
    assert "hub" in series, (series, shot)
    assert "val_acc_global" in series, (series, shot)  # the agents' federated validation
    points = {a["data-round"]: float(a["data-value"] or "nan") for t, a in dom.svg
              if t == "circle" and a.get("data-round") and (a.get("data-value") is not None)}
    assert points, shot
    hub_points = [(a["data-round"], a["data-value"]) for i, (t, a) in enumerate(dom.svg) if t == "circle"
                  and _series_of(dom.svg, i) == "hub"]
    assert [(r, pytest.approx(float(v or "nan"))) for r, v in hub_points] == [
        (str(r.round), r.accuracy) for r in results], (hub_points, shot)
    assert re.search(r"2\s*/\s*2", dom.ids.get("card-rounds", "")), (dom.ids.get("card-rounds"), shot)
    assert "3 / 3" in dom.ids.get("card-online", ""), shot


def _series_of(svg: list[tuple[str, dict[str, str | None]]], index: int) -> str | None:
    """The data-series of the nearest <g> before element ``index`` (circles sit inside their series' group)."""
    for tag, attrs in reversed(svg[:index]):
        if tag == "g":
            return attrs.get("data-series")
    return None


def test_demo_serves_the_dashboard_and_holds_until_sigint(tmp_path: Path) -> None:
    port = free_port()
    out = tmp_path / "demo"
    demo = subprocess.Popen(
        [sys.executable, "-m", "fedge.cli", "demo", "--devices", "2", "--rounds", "1", "--out", str(out),
         "--http", f"127.0.0.1:{port}", "--hold"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT,
        env={**os.environ, "PYTHONUNBUFFERED": "1", "TF_CPP_MIN_LOG_LEVEL": "3"})
    lines: list[str] = []
    try:
        assert demo.stdout is not None
        deadline = time.monotonic() + 900
        while time.monotonic() < deadline:
            line = demo.stdout.readline()
            if not line:
                break
            lines.append(line)
            if line.startswith("holding:"):
                break
        log = "".join(lines)
        assert f"dashboard: http://127.0.0.1:{port}/" in log, log
        assert lines and lines[-1].startswith("holding:"), log
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/state", timeout=10) as res:
            state = json.load(res)
        assert [r["status"] for r in state["rounds"]] == ["completed"], state["rounds"]
        assert sum(d["online"] for d in state["devices"]) == 2, state["devices"]
        time.sleep(1)  # still there after the last round
        assert demo.poll() is None
        demo.send_signal(signal.SIGINT)
        rest, _ = demo.communicate(timeout=60)
    finally:
        if demo.poll() is None:
            demo.kill()
            demo.wait()
    assert demo.returncode == 0, log + rest
    assert "stopping the fleet" in rest, rest
    hub_log = (out / "logs" / "hub.log").read_text()
    assert "hub stopping" in hub_log, hub_log[-3000:]
    with pytest.raises(OSError):  # the dashboard went away with the hub
        urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2)
