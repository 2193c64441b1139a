"""The agent and its back-ends: probed in child processes before training, a crashing or wrong one is marked
unusable in the device's state with its reason, said in the presence, and ``auto`` trains with the next one; a
configured back-end that does not work makes the device decline with the reason. The crash is a real SIGSEGV in
the probe's or the round's worker (``FEDGE_WORKER_FAULT``); the hub's side is the in-memory stand-in of
test_agent_loop."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import pytest

from fedge.edge_agent.agent import Agent
from fedge.edge_agent.backends import BackendHealth, probe_key
from fedge.edge_agent.config import AgentConfig
from fedge.protocol.errors import TrainerCrash
from fedge.protocol.manifest import Manifest
from fedge.protocol.messages import Decline, DeclineReason
from fedge.protocol.transport import InMemoryTransport
from fedge.runtime.trainers import available_backends
from fedge.runtime.trainers.probe import Verdict
from tests.agent_loop.test_agent_loop import DEV, Hub, T, announce, config, data_file, hub, model_full, model_head
from tests.helpers import wait_until

__all__ = ["config", "data_file", "hub"]  # fixtures shared with test_agent_loop

FIRST = available_backends()[0]  # what auto would train with
NEXT = available_backends()[1]


def _start(config: AgentConfig, hub: Hub, artifacts_dir: Path, manifest: Manifest) -> Agent:
    hub.broker.subscribe(T.decline(DEV), hub._record)  # the stand-in records declines too
    hub.send(T.model_full, model_full(artifacts_dir, manifest), retain=True)
    hub.send(T.model_head, model_head(artifacts_dir, manifest), retain=True)
    agent = Agent(config, transport=InMemoryTransport(hub.broker))
    agent.start()
    return agent


def test_a_back_end_crashing_in_the_probe_is_unusable_and_auto_trains_with_the_next(
        config: AgentConfig, hub: Hub, artifacts_dir: Path, manifest: Manifest,
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FEDGE_WORKER_FAULT", f"{FIRST}:segv:train_step")
    agent = _start(config, hub, artifacts_dir, manifest)
    try:
        reason = "crashed with SIGSEGV in train_step"
        assert wait_until(lambda: any(p.backend_faults == {FIRST: reason} for p in hub.presences()), 60)
        hub.send(T.announce, announce(manifest, 1))
        assert agent.wait_round_done(1, 60)
    finally:
        agent.stop()
    (upd,) = hub.updates()
    assert upd.metrics[f"backend_{NEXT}"] == 1.0 and f"backend_{FIRST}" not in upd.metrics
    saved = json.loads((config.state_dir / "backends.json").read_text())
    assert saved["verdicts"][FIRST]["ok"] is False and saved["verdicts"][FIRST]["reason"] == reason
    assert all(saved["verdicts"][b]["ok"] for b in available_backends() if b != FIRST)


def test_a_configured_back_end_that_crashes_declines_the_round_with_the_reason(
        config: AgentConfig, hub: Hub, artifacts_dir: Path, manifest: Manifest,
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FEDGE_WORKER_FAULT", f"{FIRST}:skew:train_step")  # trains, but not what NumPy computes
    agent = _start(replace(config, backend=FIRST), hub, artifacts_dir, manifest)
    try:
        hub.send(T.announce, announce(manifest, 1))
        assert agent.wait_round_done(1, 60)
    finally:
        agent.stop()
    assert hub.updates() == []
    declines = [m for m in hub.got if isinstance(m, Decline)]
    assert [(d.round, d.device, d.reason) for d in declines] == [(1, DEV, DeclineReason.TRAINER_ERROR)]
    assert declines[0].detail.startswith(f"{FIRST} back-end unusable: the training loss differs from the NumPy")


def test_a_crash_during_a_round_marks_the_back_end_and_the_next_round_uses_another(
        config: AgentConfig, hub: Hub, artifacts_dir: Path, manifest: Manifest,
        monkeypatch: pytest.MonkeyPatch) -> None:
    # the probe's 5 steps pass (its own worker); the round's worker dies at its 7th step of 10 (10 epochs of 32 rows)
    monkeypatch.setenv("FEDGE_WORKER_FAULT", f"{FIRST}:segv:train_step:7")
    agent = _start(config, hub, artifacts_dir, manifest)
    try:
        hub.send(T.announce, replace(announce(manifest, 1), local_epochs=10))
        assert agent.wait_round_done(1, 90)
        hub.send(T.announce, announce(manifest, 2))
        assert agent.wait_round_done(2, 90)
        faults = agent.health.faults()
    finally:
        agent.stop()
    (decline,) = [m for m in hub.got if isinstance(m, Decline)]
    assert decline.round == 1 and decline.detail == f"{FIRST} back-end unusable: crashed with SIGSEGV in train_step"
    (upd,) = hub.updates()
    assert upd.round == 2 and upd.metrics[f"backend_{NEXT}"] == 1.0
    assert faults == {FIRST: "crashed with SIGSEGV in train_step"}


def test_probes_run_once_per_artifacts_and_runtimes(tmp_path: Path, artifacts_dir: Path) -> None:
    calls: list[str] = []

    def probe(folder: Path, backend: str) -> Verdict:
        calls.append(backend)
        return Verdict(backend, backend != FIRST, None if backend != FIRST else "crashed with SIGSEGV in features")

    state = tmp_path / "backends.json"
    health = BackendHealth(state, "auto", probe=probe)
    assert health.choose(artifacts_dir) == NEXT and sorted(calls) == sorted(available_backends())
    assert health.choose(artifacts_dir) == NEXT and len(calls) == len(available_backends()), "probed once"
    again = BackendHealth(state, "auto", probe=probe)  # a restarted agent: the same artifacts and runtimes
    assert again.choose(artifacts_dir) == NEXT and len(calls) == len(available_backends())
    assert again.faults() == {FIRST: "crashed with SIGSEGV in features"}
    with pytest.raises(TrainerCrash, match="crashed with SIGSEGV in features"):
        BackendHealth(state, FIRST, probe=probe).choose(artifacts_dir)
    changed = tmp_path / "other"
    shutil.copytree(artifacts_dir, changed)
    text = (changed / "manifest.json").read_text()
    (changed / "manifest.json").write_text(text.replace('"created"', '"created_"', 1) if '"created"' in text
                                           else text + " ")
    assert probe_key(changed) != probe_key(artifacts_dir)
    again.choose(changed)
    assert len(calls) == 2 * len(available_backends()), "new artifacts: probed again"
    again.mark(NEXT, "crashed with SIGSEGV in train_step")
    remaining = [b for b in available_backends() if b not in (FIRST, NEXT)]
    if remaining:
        assert again.choose(changed) == remaining[0]
    else:
        with pytest.raises(TrainerCrash, match="no back-end works"):
            again.choose(changed)
