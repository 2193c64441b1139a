"""A training back-end that crashes the process it runs in (a native SIGSEGV) must not take its device down:
the device declines the round with the reason, the round completes with the other devices, and the next round
the device trains with the next back-end that works (``backend = "auto"``); the hub's dashboard shows the unusable
back-end and the decline with their reasons. Real hub and agent processes over mosquitto, the page in Chromium;
the crash is a real SIGSEGV in the agent's trainer worker (``FEDGE_WORKER_FAULT``)."""

from __future__ import annotations

import json
import urllib.request
from collections.abc import Callable
from pathlib import Path

import pytest

from fedge.protocol.messages import Presence, RoundStatus
from fedge.runtime.trainers import available_backends
from tests.dashboard.test_browser import Dom, run_chromium
from tests.e2e.fleet import Fleet
from tests.helpers import Mosquitto, free_port

pytestmark = pytest.mark.e2e

CRASHER = "device-00"
# the probe at start takes 5 steps and passes; the round's worker dies at its 6th train_step (mid-epoch)
FAULT = "litert:segv:train_step:6"


def test_trainer_crash_declines(make_fleet: Callable[..., Fleet], mosquitto: Mosquitto, tmp_path: Path) -> None:
    fleet = make_fleet(mosquitto.url, n_agents=3)
    fleet.agents[CRASHER].env["FEDGE_WORKER_FAULT"] = FAULT
    fleet.write_hub_toml(rounds={"min_devices": 2, "deadline_s": 90.0, "local_epochs": 2})
    port = free_port()
    fleet.hub.args += ["--http", f"127.0.0.1:{port}"]  # the dashboard
    fleet.start_hub()
    fleet.start_agents(ready=True)
    fleet.start_round()
    (r1,) = fleet.wait_results([1], timeout_s=120)

    assert r1.status is RoundStatus.COMPLETED, r1
    assert sorted(r1.devices) == ["device-01", "device-02"] and r1.declined == (CRASHER,)
    ((reason, detail),) = fleet.hub_sql("SELECT reason, detail FROM declines WHERE round = 1 AND device = ?",
                                        (CRASHER,))
    assert reason == "trainer_error" and detail == "litert back-end unusable: crashed with SIGSEGV in train_step"
    assert fleet.agents[CRASHER].alive, "the crash took the agent process down"
    presence = fleet.retained(fleet.topics.presence(CRASHER))
    assert isinstance(presence, Presence) and presence.online
    assert presence.backend_faults == {"litert": "crashed with SIGSEGV in train_step"}
    # the operator sees both on the dashboard: the unusable back-end with its reason, the decline with its detail
    url = f"http://127.0.0.1:{port}/"
    with urllib.request.urlopen(url + "api/state", timeout=10) as res:
        device = next(d for d in json.load(res)["devices"] if d["device"] == CRASHER)
    assert device["backend_faults"] == {"litert": "crashed with SIGSEGV in train_step"}
    assert device["last_decline"] == {"round": 1, "reason": "trainer_error", "detail": detail}
    dom = Dom()
    dom.feed(run_chromium(tmp_path, url, "--dump-dom").stdout)
    cells = dom.rows_with("data-device")[CRASHER]
    assert "litert (unusable: crashed with SIGSEGV in train_step)" in cells[5][1], cells
    assert cells[9][0].get("title") == f"last: round 1, trainer_error ({detail})", cells

    fleet.start_round()  # the device now trains with the next back-end that works
    (r2,) = fleet.wait_results([2], timeout_s=120)
    assert r2.status is RoundStatus.COMPLETED and sorted(r2.devices) == ["device-00", "device-01", "device-02"]
    ((metrics,),) = fleet.hub_sql("SELECT metrics FROM updates WHERE round = 2 AND device = ?", (CRASHER,))
    fallback = next(b for b in available_backends() if b != "litert")  # ort where installed, else numpy
    assert f'"backend_{fallback}"' in metrics and '"backend_litert"' not in metrics
