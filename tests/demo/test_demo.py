"""`fedge demo`: the README's main job, as a real command (pre-training, export, embedded broker, hub and agent
processes), and its pass check."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from fedge.demo import CHANCE_MARGIN, DemoPaths, build_report
from fedge.protocol.messages import RoundResult, RoundStatus

ROOT = Path(__file__).resolve().parents[2]


def _result(rnd: int, acc: float | None) -> RoundResult:
    return RoundResult(fleet="demo", round=rnd, status=RoundStatus.COMPLETED, model_version=f"v{rnd}", accuracy=acc,
                       loss=1.0, devices=("device-00", "device-01"), n_samples=100, rejected=0, seconds=0.1)


INFO = {"dataset": "fashion-mnist", "model": "cnn28", "num_classes": 10, "device_files": []}


@pytest.mark.parametrize(
    ("src", "final", "passed"),
    [
        (0.05, 0.53, True),    # the README run
        (0.05, 0.15, False),   # beats a below-chance source model but not chance + margin
        (0.60, 0.55, False),   # above chance, below the source model
        (0.05, None, False),   # the last round failed
    ],
)
def test_pass_check_needs_both_source_and_chance(tmp_path: Path, src: float, final: float | None,
                                                 passed: bool) -> None:
    report = build_report(INFO, 2, src, [_result(1, 0.1), _result(2, final)], DemoPaths(tmp_path))
    assert report["passed"] is passed
    assert report["chance_accuracy"] == pytest.approx(0.1)
    assert report["beats_chance"] is (final is not None and final >= 0.1 + CHANCE_MARGIN)


@pytest.mark.e2e
def test_fedge_demo_runs_end_to_end(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    proc = subprocess.run(
        [sys.executable, "-m", "fedge.cli", "demo", "--devices", "2", "--rounds", "2", "--json", "--out", str(out)],
        capture_output=True, text=True, timeout=900, cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])  # --json: one JSON object, nothing else on stdout
    assert len(proc.stdout.strip().splitlines()) == 1
    assert [r["round"] for r in report["rounds"]] == [1, 2]
    assert all(r["status"] == "completed" and r["devices"] >= 1 for r in report["rounds"])
    assert report["passed"] and report["final_accuracy"] > report["source_accuracy"]
    assert report["final_accuracy"] >= report["chance_accuracy"] + CHANCE_MARGIN
    assert json.loads((out / "report.json").read_text()) == report
    assert (out / "accuracy.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for name in ("hub.log", "agent-00.log", "agent-01.log"):
        assert (out / "logs" / name).is_file()
