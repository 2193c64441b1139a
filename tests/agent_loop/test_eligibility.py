"""Eligibility (issue 11, item 5): the platform's power, battery, link and load read from a fake sysfs tree and
fake command outputs, the ``[eligibility]`` config, and the device profiles' defaults in provisioned agent.toml."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import pytest

from fedge.devices.profiles import ELIGIBILITY, builtin_profiles, profile_from_mapping
from fedge.devices.provision import Provisioning, agent_toml
from fedge.edge_agent.config import config_from_mapping, load_config
from fedge.edge_agent.eligibility import (
    KEYS,
    SYSFS_ENV,
    Conditions,
    EligibilityPolicy,
    Runner,
    not_eligible,
    policy_from_mapping,
    read_conditions,
)
from fedge.protocol.errors import ConfigError

PHONE = EligibilityPolicy(require_power=True, min_battery_pct=50)


def supply(root: Path, name: str, **files: str) -> None:
    folder = root / "class" / "power_supply" / name
    folder.mkdir(parents=True)
    for key, value in files.items():
        (folder / key).write_text(value + "\n")


def no_commands(argv: Sequence[str]) -> str | None:
    return None


def commands(**outputs: str) -> Runner:
    def run(argv: Sequence[str]) -> str | None:
        return outputs.get(argv[0])

    return run


def test_a_discharging_laptop_battery_blocks_with_its_level(tmp_path: Path) -> None:
    supply(tmp_path, "AC", type="Mains", online="0")
    supply(tmp_path, "BAT0", type="Battery", capacity="23", status="Discharging")
    supply(tmp_path, "hidpp_battery_0", type="Battery", scope="Device", capacity="90", status="Discharging")
    now = read_conditions(PHONE, sysfs_root=tmp_path, run=no_commands)
    assert now == Conditions(on_power=False, battery_pct=23.0)
    assert not_eligible(PHONE, sysfs_root=tmp_path, run=no_commands) == "not on external power (battery 23%)"
    assert not_eligible(EligibilityPolicy(min_battery_pct=50), sysfs_root=tmp_path,
                        run=no_commands) == "battery 23% < 50%"
    assert not_eligible(EligibilityPolicy(min_battery_pct=20), sysfs_root=tmp_path, run=no_commands) is None


def test_mains_online_or_a_charging_battery_is_external_power(tmp_path: Path) -> None:
    supply(tmp_path, "AC", type="Mains", online="1")
    supply(tmp_path, "BAT0", type="Battery", capacity="80", status="Discharging")
    assert read_conditions(PHONE, sysfs_root=tmp_path, run=no_commands).on_power is True
    assert not_eligible(PHONE, sysfs_root=tmp_path, run=no_commands) is None
    usb = tmp_path / "usb"
    supply(usb, "battery", type="Battery", capacity="60", status="Charging")  # a phone-like tree: no Mains entry
    assert not_eligible(PHONE, sysfs_root=usb, run=no_commands) is None


def test_unknown_conditions_never_block(tmp_path: Path) -> None:
    # a Raspberry Pi: no power_supply entries, no Termux, no NetworkManager, no load average
    policy = EligibilityPolicy(require_power=True, min_battery_pct=90, allow_metered=False, max_load=0.1)
    now = read_conditions(policy, sysfs_root=tmp_path / "empty", run=no_commands, loadavg=lambda: None)
    assert now == Conditions()
    assert not_eligible(policy, sysfs_root=tmp_path / "empty", run=no_commands, loadavg=lambda: None) is None
    garbage = commands(**{"termux-battery-status": "not json", "nmcli": "nothing useful"})
    assert not_eligible(policy, sysfs_root=tmp_path, run=garbage, loadavg=lambda: None) is None


def test_termux_battery_status_is_read_when_sysfs_says_nothing(tmp_path: Path) -> None:
    unplugged = json.dumps({"health": "GOOD", "percentage": 41, "plugged": "UNPLUGGED", "status": "DISCHARGING"})
    run = commands(**{"termux-battery-status": unplugged})
    assert read_conditions(PHONE, sysfs_root=tmp_path, run=run) == Conditions(on_power=False, battery_pct=41.0)
    assert not_eligible(EligibilityPolicy(min_battery_pct=50), sysfs_root=tmp_path, run=run) == "battery 41% < 50%"
    charging = json.dumps({"percentage": 77, "plugged": "PLUGGED_AC", "status": "CHARGING"})
    assert not_eligible(PHONE, sysfs_root=tmp_path, run=commands(**{"termux-battery-status": charging})) is None


def test_metered_link_and_load(tmp_path: Path) -> None:
    policy = EligibilityPolicy(allow_metered=False, max_load=0.5)
    wifi = "GENERAL.METERED:no (guessed)\nGENERAL.METERED:unknown\n"
    lte = wifi + "GENERAL.METERED:yes\n"
    assert not_eligible(policy, run=commands(nmcli=wifi), loadavg=lambda: 0.2) is None
    assert not_eligible(policy, run=commands(nmcli=lte), loadavg=lambda: 0.2) == "on a metered network link"
    assert not_eligible(policy, run=commands(nmcli=wifi), loadavg=lambda: 1.5) == "load 1.50 per CPU > 0.5"


def test_no_conditions_read_nothing(tmp_path: Path) -> None:
    def refuse(argv: Sequence[str]) -> str | None:
        raise AssertionError(f"{argv} run without a condition to check")

    supply(tmp_path, "BAT0", type="Battery", capacity="1", status="Discharging")
    assert not EligibilityPolicy().active
    assert not_eligible(EligibilityPolicy(), sysfs_root=tmp_path, run=refuse) is None


def test_the_sysfs_root_comes_from_the_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    supply(tmp_path, "BAT0", type="Battery", capacity="10", status="Discharging")
    monkeypatch.setenv(SYSFS_ENV, str(tmp_path))
    assert not_eligible(EligibilityPolicy(min_battery_pct=50), run=no_commands) == "battery 10% < 50%"


def test_config_validates_eligibility_naming_the_field(tmp_path: Path) -> None:
    base = {"device_id": "d", "fleet": "f", "data": "x.npz", "broker": {"url": "mqtt://127.0.0.1:1883"}}
    assert config_from_mapping(base, tmp_path).eligibility == EligibilityPolicy()
    cfg = config_from_mapping({**base, "eligibility": {"require_power": True, "min_battery_pct": 50,
                                                       "allow_metered": False, "max_load": 0.8}}, tmp_path)
    assert cfg.eligibility == EligibilityPolicy(True, 50.0, False, 0.8)
    for bad, name in (({"require_power": 1}, "eligibility.require_power"),
                      ({"min_battery_pct": 101}, "eligibility.min_battery_pct"),
                      ({"min_battery_pct": -1}, "eligibility.min_battery_pct"),
                      ({"max_load": float("nan")}, "eligibility.max_load"),
                      ({"allow_metered": "no"}, "eligibility.allow_metered"),
                      ({"on_wifi": True}, "eligibility.on_wifi")):
        with pytest.raises(ConfigError) as err:
            config_from_mapping({**base, "eligibility": bad}, tmp_path)
        assert err.value.field == name, bad
    with pytest.raises(ConfigError) as err:
        policy_from_mapping([1])
    assert err.value.field == "eligibility"


def test_profile_defaults_flow_into_the_provisioned_agent_toml(tmp_path: Path) -> None:
    assert set(ELIGIBILITY) == KEYS  # the profile knows the agent's keys
    profiles = builtin_profiles()
    p = Provisioning("phone-01", "demo", "mqtts://broker:8883", "/data/x.npz")
    want = {"android-termux": EligibilityPolicy(require_power=True, min_battery_pct=50),
            "rpi4": EligibilityPolicy(), "rpi5": EligibilityPolicy()}
    for name, policy in want.items():
        path = tmp_path / f"{name}.toml"
        path.write_text(agent_toml(p, profiles[name], "pw"))
        assert load_config(path).eligibility == policy, name
    raw = {k: v for k, v in profiles["rpi5"].__dict__.items() if k != "eligibility"}
    with pytest.raises(ConfigError) as err:
        profile_from_mapping({**raw, "extras": list(raw["extras"]), "eligibility": {"max_load": "high"}}, "x.toml")
    assert err.value.field == "eligibility.max_load"
