"""docs/CONFIG.md is generated from the config definitions and documents every key the loaders accept;
the starter files of ``init`` load; ``--check`` names a bad key."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import fields
from pathlib import Path

import numpy as np

from fedge.configref import DOC, render
from fedge.edge_agent import config as agent_config
from fedge.edge_agent import eligibility
from fedge.hub import config as hub_config
from fedge.protocol.configdoc import Section
from fedge.protocol.mqtt_config import BrokerConfig

ROOT = Path(__file__).resolve().parents[2]


def _keys(sections: list[Section]) -> dict[str | None, set[str]]:
    return {s.name: {k.name for k in s.keys} for s in sections}


def test_the_reference_is_up_to_date() -> None:
    assert DOC.read_text(encoding="utf-8") == render(), "docs/CONFIG.md is stale: run python -m fedge.configref"


def test_every_hub_key_the_loader_accepts_is_documented() -> None:
    doc = _keys(hub_config.reference_sections())
    tables = {"broker", "rounds", "limits", "aggregation", "schedule", "privacy", "http", "store", "secagg", "conduct"}
    assert doc[None] == set(hub_config._TOP) - tables
    assert doc["broker"] == {f.name for f in fields(BrokerConfig)} | {"embedded_host", "embedded_port", "retain_on"}
    for name, cls in (("rounds", hub_config.RoundsConfig), ("limits", hub_config.LimitsConfig),
                      ("aggregation", hub_config.AggregationConfig),
                      ("schedule", hub_config.ScheduleConfig), ("privacy", hub_config.PrivacyConfig),
                      ("http", hub_config.HttpConfig), ("store", hub_config.StoreConfig),
                      ("conduct", hub_config.ConductConfig)):
        assert doc[name] == {f.name for f in fields(cls)}, name
    assert set(doc) == {None} | tables


def test_every_agent_key_the_loader_accepts_is_documented() -> None:
    doc = _keys(agent_config.reference_sections())
    assert doc[None] == set(agent_config._KNOWN) - {"broker", "privacy", "eligibility"}
    assert doc["broker"] == {f.name for f in fields(BrokerConfig)}
    assert doc["privacy"] == set(agent_config._PRIVACY_KNOWN)
    assert doc["eligibility"] == set(eligibility.KEYS)


def test_every_key_has_a_meaning_and_the_reference_shows_it() -> None:
    text = DOC.read_text(encoding="utf-8")
    for sections in (hub_config.reference_sections(), agent_config.reference_sections()):
        for sec in sections:
            for k in sec.keys:
                assert len(k.help) > 10, (sec.name, k.name)
                assert f"| `{k.name}` |" in text and k.help in text


def test_starter_files_load_with_the_defaults(tmp_path: Path) -> None:
    (tmp_path / "hub.toml").write_text(hub_config.starter_config("f9"))
    cfg = hub_config.load_config(tmp_path / "hub.toml")
    assert cfg.fleet == "f9" and cfg.rounds == hub_config.RoundsConfig() and cfg.privacy.mode == "off"
    assert cfg.state_dir == tmp_path / "hub-state" and cfg.artifacts == tmp_path / "artifacts"
    (tmp_path / "agent.toml").write_text(agent_config.starter_config("pi-01", "f9"))
    acfg = agent_config.load_config(tmp_path / "agent.toml")
    assert (acfg.device_id, acfg.fleet, acfg.backend, acfg.privacy) == ("pi-01", "f9", "auto", None)
    assert acfg.data == tmp_path / "data.npz"


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True, cwd=cwd, timeout=60)


def test_init_and_check_from_the_command_line(tmp_path: Path) -> None:
    out = _cli("fedge.cli", "hub", "init", "--out", "hub.toml", "--fleet", "farm", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert _cli("fedge.cli", "hub", "init", "--out", "hub.toml", cwd=tmp_path).returncode == 2  # no overwrite
    missing = _cli("fedge.cli", "hub", "serve", "--config", "hub.toml", "--check", cwd=tmp_path)
    assert missing.returncode == 2 and "'artifacts'" in missing.stderr  # nothing exported there yet
    text = (tmp_path / "hub.toml").read_text().replace("# deadline_s = 60.0", "deadline_s = -5")
    (tmp_path / "hub.toml").write_text(text)
    bad = _cli("fedge.cli", "hub", "serve", "--config", "hub.toml", "--check", cwd=tmp_path)
    assert bad.returncode == 2 and "rounds.deadline_s" in bad.stderr and "Traceback" not in bad.stderr

    assert _cli("fedge.edge_agent", "init", "--out", "agent.toml", cwd=tmp_path).returncode == 0
    np.savez(tmp_path / "data.npz", x=np.zeros((4, 3), np.float32), y=np.array([0, 1, 0, 1]))
    ok = _cli("fedge.edge_agent", "run", "--config", "agent.toml", "--check", cwd=tmp_path)
    assert ok.returncode == 0 and "4 local samples" in ok.stdout, ok.stderr
    text = (tmp_path / "agent.toml").read_text().replace('# backend = "auto"', 'backend = "gpu"')
    (tmp_path / "agent.toml").write_text(text)
    bad = _cli("fedge.edge_agent", "run", "--config", "agent.toml", "--check", cwd=tmp_path)
    assert bad.returncode == 2 and "'backend'" in bad.stderr


def test_check_names_a_missing_eval_set_and_unusable_keys(tmp_path: Path) -> None:
    from fedge.protocol.tomlfile import write_toml

    (tmp_path / "artifacts").mkdir()
    (tmp_path / "artifacts" / "manifest.json").write_text("{}")
    (tmp_path / "garbage.pem").write_text("not a key")
    broker = {"url": "mqtt://127.0.0.1:1883"}
    hub = {"fleet": "farm", "artifacts": "artifacts", "eval_data": "nope.npz", "broker": broker}
    write_toml(tmp_path / "hub.toml", hub)
    out = _cli("fedge.cli", "hub", "serve", "--config", "hub.toml", "--check", cwd=tmp_path)
    assert out.returncode == 2 and "'eval_data'" in out.stderr and "nope.npz" in out.stderr, out.stderr
    write_toml(tmp_path / "hub.toml", {"fleet": "farm", "artifacts": "artifacts", "signing_key": "garbage.pem",
                                       "broker": broker})
    out = _cli("fedge.cli", "hub", "serve", "--config", "hub.toml", "--check", cwd=tmp_path)
    assert out.returncode == 2 and "'signing_key'" in out.stderr and "Traceback" not in out.stderr, out.stderr

    np.savez(tmp_path / "data.npz", x=np.zeros((4, 3), np.float32), y=np.array([0, 1, 0, 1]))
    write_toml(tmp_path / "agent.toml", {"device_id": "pi-01", "fleet": "farm", "data": "data.npz",
                                         "hub_public_key": "garbage.pem", "broker": broker})
    out = _cli("fedge.edge_agent", "run", "--config", "agent.toml", "--check", cwd=tmp_path)
    assert out.returncode == 2 and "'hub_public_key'" in out.stderr and "Traceback" not in out.stderr, out.stderr
