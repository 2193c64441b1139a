"""Provisioning: one bundle per device (config, credentials, service unit, installer) and flashing it.

A bundle folder holds ``agent.toml`` (with the device's MQTT credentials), ``install.sh``, the
service file for the profile (systemd unit or Termux:Boot script) and, for the broker operator,
``broker-acl.conf`` (what this device may publish) and ``credentials.txt``.
"""

from __future__ import annotations

import secrets
import shlex
import shutil
import subprocess
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from fedge.devices.profiles import DeviceProfile
from fedge.protocol.errors import ConfigError
from fedge.protocol.tomlfile import dumps_toml
from fedge.protocol.topics import Topics, valid_id


@dataclass(frozen=True)
class Provisioning:
    """What one device needs to join a fleet: its id, the fleet, the broker URL, its data path, where and as
    whom the agent is installed. Invalid values raise ``ConfigError`` naming the field."""

    device_id: str
    fleet: str
    broker_url: str
    data_path: str
    install_dir: str = "/opt/fedge"
    user: str = "fedge"

    def __post_init__(self) -> None:
        if not valid_id(self.device_id):
            raise ConfigError("device_id", f"{self.device_id!r} must be 1-64 characters of [A-Za-z0-9_-]")
        if not valid_id(self.fleet):
            raise ConfigError("fleet", f"{self.fleet!r} must be 1-64 characters of [A-Za-z0-9_-]")
        if not self.broker_url.startswith(("mqtt://", "mqtts://")):
            raise ConfigError("broker_url", f"{self.broker_url!r} must start with mqtt:// or mqtts://")


def _template(name: str) -> str:
    return resources.files("fedge.devices").joinpath("templates", name).read_text(encoding="utf-8")


def agent_toml(p: Provisioning, profile: DeviceProfile, password: str) -> str:
    """The device's ``agent.toml`` (credentials included)."""
    return dumps_toml({
        "device_id": p.device_id, "fleet": p.fleet, "data": p.data_path, "state_dir": p.install_dir + "/state",
        "backend": profile.backend, "seed": 0,
        "broker": {"url": p.broker_url, "username": p.device_id, "password": password},
    }, header=f"fedge agent for {p.device_id} ({profile.name})")


def broker_acl(p: Provisioning) -> str:
    """mosquitto ACL lines: a device publishes only as itself and reads its fleet's hub topics."""
    t = Topics(p.fleet)
    return (
        f"user {p.device_id}\n"
        f"topic write {t.update(p.device_id)}\ntopic write {t.decline(p.device_id)}\n"
        f"topic readwrite {t.presence(p.device_id)}\n"
        f"topic read {t.announce}\ntopic read {t.model_head}\ntopic read {t.model_full}\n"
        f"topic read {t.result}\ntopic read {t.hub_status}\ntopic read {t.device_inbox(p.device_id)}\n"
    )


def provision(p: Provisioning, profile: DeviceProfile, out_dir: Path, *, password: str | None = None) -> Path:
    """Write the device's bundle into ``out_dir/<device_id>/`` and return that folder."""
    bundle = out_dir / p.device_id
    bundle.mkdir(parents=True, exist_ok=True)
    pw = password or secrets.token_urlsafe(24)
    values = {
        "device_id": p.device_id, "fleet": p.fleet, "install_dir": p.install_dir, "user": p.user,
        "extras": ",".join(profile.extras), "memory_max_mb": str(profile.max_agent_rss_mb * 2),
    }
    if profile.service == "systemd":
        service_name = "fedge-agent.service"
        service_install = (
            f'install -m 644 "$here/{service_name}" /etc/systemd/system/{service_name}\n'
            f"id -u {p.user} >/dev/null 2>&1 || useradd --system --home {p.install_dir} {p.user}\n"
            f"chown -R {p.user} {p.install_dir}\n"
            f"systemctl daemon-reload && systemctl enable --now {service_name}"
        )
        template = "fedge-agent.service"
    else:
        service_name = "termux-boot.sh"
        service_install = f'mkdir -p ~/.termux/boot && install -m 755 "$here/{service_name}" ~/.termux/boot/fedge-agent'
        template = "termux-boot.sh"
    (bundle / service_name).write_text(_template(template).format(**values))
    (bundle / "install.sh").write_text(_template("install.sh").format(**values, service_install=service_install))
    (bundle / "install.sh").chmod(0o755)
    config = bundle / "agent.toml"
    config.write_text(agent_toml(p, profile, pw))
    config.chmod(0o600)
    (bundle / "broker-acl.conf").write_text(broker_acl(p))
    creds = bundle / "credentials.txt"
    creds.write_text(f"{p.device_id}:{pw}\n")
    creds.chmod(0o600)
    return bundle


Runner = Callable[[Sequence[str]], int]


def _run(cmd: Sequence[str]) -> int:
    return subprocess.run(list(cmd), check=False).returncode


def flash_commands(bundle: Path, target: str, remote_dir: str = "/tmp/fedge-bundle") -> list[list[str]]:
    """The commands that put a bundle on ``user@host`` and run its installer there."""
    if "@" not in target or target.startswith("@") or target.endswith("@"):
        raise ConfigError("target", f"{target!r} must look like user@host")
    return [
        ["ssh", target, f"rm -rf {shlex.quote(remote_dir)} && mkdir -p {shlex.quote(remote_dir)}"],
        ["scp", "-q", "-r", *(str(f) for f in sorted(bundle.iterdir()) if f.name != "credentials.txt"),
         f"{target}:{remote_dir}/"],
        ["ssh", target, f"sudo sh {shlex.quote(remote_dir)}/install.sh"],
    ]


def flash(bundle: Path, target: str, *, dry_run: bool = False, run: Runner = _run) -> list[list[str]]:
    """Flash over SSH (``user@host``) or copy into a mounted root file system (a local folder)."""
    if not (bundle / "agent.toml").is_file():
        raise ConfigError("bundle", f"{str(bundle)!r} is not a provisioned bundle (no agent.toml)")
    local = Path(target)
    if "@" not in target and local.is_dir():
        dest = local / "opt" / "fedge-bundle"
        if not dry_run:
            shutil.copytree(bundle, dest, dirs_exist_ok=True, ignore=shutil.ignore_patterns("credentials.txt"))
        return [["copy", str(bundle), str(dest)]]
    cmds = flash_commands(bundle, target)
    if not dry_run:
        for cmd in cmds:
            code = run(cmd)
            if code != 0:
                raise ConfigError("target", f"{shlex.join(cmd)} failed with exit code {code}")
    return cmds


__all__ = ["Provisioning", "agent_toml", "broker_acl", "flash", "flash_commands", "provision"]
