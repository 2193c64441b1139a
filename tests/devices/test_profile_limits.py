"""Device profiles carry the agent's round limits (max_epochs, max_round_s) into the provisioned agent.toml."""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path

import pytest

from fedge.devices.profiles import builtin_profiles, get_profile, load_profile_file
from fedge.devices.provision import Provisioning, provision
from fedge.edge_agent.config import AgentConfig, load_config
from fedge.protocol.errors import ConfigError

PROFILES = Path(__file__).parents[2] / "devices" / "profiles"
_DEFAULTS = {f.name: f.default for f in fields(AgentConfig)}
AGENT_DEFAULTS = (_DEFAULTS["max_epochs"], _DEFAULTS["max_round_s"])


def test_every_builtin_profile_bounds_a_round() -> None:
    profiles = builtin_profiles()
    for p in profiles.values():
        assert p.max_epochs is not None and p.max_epochs >= 1, p.name
        assert p.max_round_s is not None and p.max_round_s > 0, p.name
    phone, pi4, jetson = profiles["android-termux"], profiles["rpi4"], profiles["jetson-orin-nano"]
    assert (phone.max_epochs, phone.max_round_s) == (10, 120.0)
    assert pi4.max_round_s == 300.0 and jetson.max_round_s == 600.0
    assert phone.max_round_s < pi4.max_round_s < jetson.max_round_s
    dev = profiles["x86-dev"]
    assert (dev.max_epochs, dev.max_round_s) == AGENT_DEFAULTS


def test_provisioned_phone_gets_the_profile_limits(tmp_path: Path) -> None:
    p = Provisioning("phone-1", "farm", "mqtts://hub.example:8883", "/sdcard/data.npz")
    bundle = provision(p, get_profile("android-termux"), tmp_path)
    cfg = load_config(bundle / "agent.toml")  # the agent's own loader accepts what provisioning wrote
    assert cfg.max_epochs == 10 and cfg.max_round_s == 120.0
    pi = load_config(provision(Provisioning("pi-1", "farm", "mqtts://h:8883", "/d.npz"), get_profile("rpi4"),
                               tmp_path) / "agent.toml")
    assert pi.max_round_s == 300.0


def test_a_profile_without_limits_leaves_the_agent_defaults(tmp_path: Path) -> None:
    text = (PROFILES / "rpi4.toml").read_text()
    lines = [ln for ln in text.splitlines() if not ln.startswith(("max_epochs", "max_round_s"))]
    plain = tmp_path / "plain.toml"
    plain.write_text("\n".join(lines) + "\n")
    profile = load_profile_file(plain)
    assert profile.max_epochs is None and profile.max_round_s is None
    bundle = provision(Provisioning("pi-2", "farm", "mqtts://h:8883", "/d.npz"), profile, tmp_path / "out")
    text = (bundle / "agent.toml").read_text()
    assert "max_epochs" not in text and "max_round_s" not in text
    cfg = load_config(bundle / "agent.toml")
    assert (cfg.max_epochs, cfg.max_round_s) == AGENT_DEFAULTS


@pytest.mark.parametrize(("line", "bad", "field"), [
    ("max_epochs = 10", "max_epochs = 0", "max_epochs"),
    ("max_epochs = 10", "max_epochs = 2.5", "max_epochs"),
    ("max_epochs = 10", "max_epochs = true", "max_epochs"),
    ("max_round_s = 120", "max_round_s = -1", "max_round_s"),
    ("max_round_s = 120", 'max_round_s = "2m"', "max_round_s"),
    ("max_round_s = 120", "max_round_s = inf", "max_round_s"),
])
def test_a_bad_limit_is_an_error_naming_the_field(tmp_path: Path, line: str, bad: str, field: str) -> None:
    text = (PROFILES / "android-termux.toml").read_text()
    assert line in text
    path = tmp_path / "bad-phone.toml"
    path.write_text(text.replace(line, bad))
    with pytest.raises(ConfigError) as err:
        load_profile_file(path)
    assert err.value.field == field and "bad-phone.toml" in str(err.value)
