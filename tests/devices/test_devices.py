"""Device profiles and provisioning: bundles the agent can actually load."""

from __future__ import annotations

import stat
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import pytest

from fedge.devices.flash import flash
from fedge.devices.profiles import builtin_profiles, get_profile, load_profile_file
from fedge.devices.provision import Provisioning, provision
from fedge.edge_agent.config import load_config
from fedge.protocol.errors import ConfigError


def test_builtin_profiles_load_and_cover_the_targets() -> None:
    profiles = builtin_profiles()
    assert {"rpi4", "rpi5", "jetson-orin-nano", "android-termux", "x86-dev"} <= set(profiles)
    for p in profiles.values():
        if p.arch == "aarch64":
            assert "agent-ort" not in p.extras  # no onnxruntime-training wheels there


def test_bad_profile_names_the_field(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    text = (Path(__file__).parents[2] / "devices" / "profiles" / "rpi5.toml").read_text()
    bad.write_text(text.replace('backend = "litert"', 'backend = "cuda"'))
    with pytest.raises(ConfigError) as err:
        load_profile_file(bad)
    assert err.value.field == "backend" and "bad.toml" in str(err.value)
    bad.write_text(text.replace('extras = ["agent"]', 'extras = ["agent", "agent-ort"]'))
    with pytest.raises(ConfigError) as err:
        load_profile_file(bad)
    assert err.value.field == "extras"
    with pytest.raises(ConfigError, match="unknown profile"):
        get_profile("toaster")


def test_provisioned_bundle_is_a_valid_agent_config(tmp_path: Path) -> None:
    p = Provisioning("pi-07", "farm", "mqtts://hub.example:8883", "/var/lib/fedge/data.npz")
    bundle = provision(p, get_profile("rpi5"), tmp_path)
    cfg = load_config(bundle / "agent.toml")
    assert cfg.device_id == "pi-07" and cfg.fleet == "farm" and cfg.backend == "litert"
    assert cfg.broker.username == "pi-07" and cfg.broker.password
    assert stat.S_IMODE((bundle / "agent.toml").stat().st_mode) == 0o600
    unit = (bundle / "fedge-agent.service").read_text()
    assert "ExecStart=/opt/fedge/venv/bin/fedge-agent run --config /opt/fedge/agent.toml" in unit
    acl = (bundle / "broker-acl.conf").read_text()
    assert "topic write fedge/farm/update/pi-07" in acl and "update/+" not in acl
    assert subprocess.run(["sh", "-n", str(bundle / "install.sh")], check=False).returncode == 0
    other = provision(Provisioning("pi-08", "farm", "mqtt://h:1883", "/d.npz"), get_profile("rpi5"), tmp_path)
    assert load_config(other / "agent.toml").broker.password != cfg.broker.password


def test_termux_profile_gets_a_boot_script(tmp_path: Path) -> None:
    p = Provisioning("phone-1", "f", "mqtt://h:1883", "/sdcard/d.npz")
    bundle = provision(p, get_profile("android-termux"), tmp_path)
    assert (bundle / "termux-boot.sh").read_text().count("fedge-agent run") == 1
    assert not (bundle / "fedge-agent.service").exists()


def test_provisioning_rejects_bad_ids(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as err:
        Provisioning("pi 7", "farm", "mqtt://h:1883", "/d")
    assert err.value.field == "device_id"
    with pytest.raises(ConfigError) as err:
        Provisioning("pi7", "farm", "http://h", "/d")
    assert err.value.field == "broker_url"


def test_flash_into_a_mounted_root_and_over_ssh_dry_run(tmp_path: Path) -> None:
    bundle = provision(Provisioning("pi-09", "f", "mqtt://h:1883", "/d.npz"), get_profile("rpi4"), tmp_path / "b")
    root = tmp_path / "rootfs"
    root.mkdir()
    flash(bundle, str(root))
    assert (root / "opt" / "fedge" / "agent.toml").is_file()
    assert not list(root.rglob("credentials.txt"))
    calls: list[list[str]] = []

    def ssh(cmd: Sequence[str], capture: bool) -> tuple[int, str]:
        calls.append(list(cmd))
        return 0, "/tmp/tmp.a1\n" if capture else ""

    cmds = flash(bundle, "pi@10.0.0.9", run=ssh)
    assert calls == cmds and cmds[-1][:3] == ["ssh", "--", "pi@10.0.0.9"] and "install.sh" in cmds[-1][-1]
    with pytest.raises(ConfigError) as err:
        flash(bundle, "pi@10.0.0.9", run=lambda c, capture: (255, ""))
    assert err.value.field == "target"


def test_cli_lists_profiles() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "fedge.cli", "devices", "list"], capture_output=True, text=True, check=True
    ).stdout
    assert '"rpi5"' in out


def test_the_broker_acl_lets_the_agent_publish_on_every_topic_it_uses(tmp_path: Path) -> None:
    """Every ``self._transport.publish(self.topics.<t>(self.device), ...)`` in the agent (and its selection worker)
    is writable in the ACL
    (a topic missing there is silently dropped by mosquitto: a decline would never reach the hub)."""
    import ast

    from fedge.protocol.topics import Topics

    root = Path(__file__).resolve().parents[2] / "edge_agent"
    used = set()
    nodes = [n for f in ("agent.py", "worker.py", "selection.py") for n in ast.walk(ast.parse((root / f).read_text()))]
    forwarders = 0
    for node in nodes:
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in ("publish",
                                                                                                    "_publish"):
            target = node.args[0]
            if isinstance(target, ast.Name) and target.id == "topic":  # the agent's one forwarding helper
                forwarders += 1
                continue
            assert isinstance(target, ast.Call) and isinstance(target.func, ast.Attribute), ast.unparse(node)
            used.add(target.func.attr)
    assert forwarders == 1
    assert used == {"presence", "update", "decline", "secagg", "select_report"}
    bundle = provision(Provisioning("pi-09", "farm", "mqtt://h:1883", "/d.npz"), get_profile("rpi5"), tmp_path)
    acl = (bundle / "broker-acl.conf").read_text().splitlines()
    writable = {line.split()[-1] for line in acl if line.startswith(("topic write ", "topic readwrite "))}
    t = Topics("farm")
    assert {getattr(t, name)("pi-09") for name in used} <= writable
