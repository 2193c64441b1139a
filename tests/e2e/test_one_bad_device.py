"""One bad device on a real fleet (issue 21): ``bench/attacks.py`` (a ``fedge fleet init`` fleet, mosquitto over TLS,
the hub and four agent processes, one provisioned hostile device) with the deploy gates, one round per attack.
Checked here: what does not depend on a few points of accuracy (the bench's own targets check those)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_each_attack_meets_its_defence_on_a_real_fleet() -> None:
    proc = subprocess.run([sys.executable, "bench/attacks.py", "--json", "--gate-only", "--repeats", "1",
                           "--warmup", "1"], capture_output=True, text=True, cwd=ROOT, timeout=1200,
                          env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
    lines = proc.stdout.strip().splitlines()
    assert lines, proc.stderr[-4000:]
    out = json.loads(lines[-1])
    a = out["attacks"]
    # silent devices and withheld inputs cost nothing; garbage shares drop their sender, not the round
    for name in ("silent", "garbage_shares", "withheld_input"):
        assert a[name]["within_limit"] and not a[name]["attacker_in"], (name, a[name])
        assert a[name]["status"] == ["completed"], (name, a[name])
    assert a["garbage_unmask"]["status"] == ["completed"] and a["garbage_unmask"]["attacker_in"]
    # an unbounded SecAgg input: the round is refused, nothing deployed
    assert a["secagg_huge"]["status"] == ["refused_input"] and not a["secagg_huge"]["deployed"]
    # every attack was made by a device that took part (else it would test nothing)
    for name in ("sign_flip", "scaled_noise", "huge_samples", "lying_gate", "secagg_in_range"):
        assert a[name]["attacker_in"], (name, a[name])
    assert out["stalls_within_limit"] == 1
