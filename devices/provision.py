"""Provisioning: one bundle per device (config, credentials, service unit, installer).

A bundle folder (mode 0700: it holds the device's broker password) has ``agent.toml`` (with the device's MQTT
credentials), ``install.sh``, the service file for the profile (systemd unit or Termux:Boot script),
``bundle.json`` (what ``fedge devices flash`` needs: install folder, user, service, the pinned fedge), the
fedge wheel when one is bundled, ``selftest/`` (the fleet's exported model, checked against its manifest: the
installer runs ``fedge-agent selftest --probe`` on it before it starts the agent) when one is given and, for the
broker operator, ``broker-acl.conf`` (what this device may
publish) and ``credentials.txt``. Provisioned into a fleet folder (``fedge fleet init``), it also has the fleet's
``ca.crt`` (``ca_file`` of agent.toml) and the hub's public key ``hub-signing.pub``, and the device gets an
account in the fleet's password file. Flashing is in ``fedge.devices.flash``.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from fedge.devices.fleet import FleetDir, add_device
from fedge.devices.installer import bundle_wheel, index_pin, install_script, systemd_unit, termux_boot
from fedge.devices.profiles import DeviceProfile
from fedge.protocol.errors import ConfigError
from fedge.protocol.tomlfile import dumps_toml
from fedge.protocol.topics import RESERVED_IDS, Topics, valid_id

# one path component: no whitespace, quotes or shell metacharacters, not starting with "-"
_COMPONENT = re.compile(r"[A-Za-z0-9_.+][A-Za-z0-9_.+-]*")
# the shadow-utils default NAME_REGEX (useradd), at most 32 characters
_USER = re.compile(r"[a-z_][a-z0-9_-]{0,31}")


def check_install_dir(value: str, field: str = "install_dir") -> str:
    """``value`` if it is an absolute, normalised path of plain components (``[A-Za-z0-9_.+-]``, not
    starting with ``-``, no ``.`` or ``..``), else ``ConfigError`` naming ``field``."""
    parts = value.split("/")
    if not value.startswith("/") or len(value) > 255:
        raise ConfigError(field, f"{value!r} must be an absolute path (at most 255 characters)")
    bad = [p for p in parts[1:] if p in ("", ".", "..") or not _COMPONENT.fullmatch(p)]
    if bad:
        raise ConfigError(field, f"{value!r}: component {bad[0]!r} is empty, '.' or '..', starts with '-' or "
                                 "has characters outside [A-Za-z0-9_.+-]")
    return value


def check_user(value: str) -> str:
    """``value`` if it is a valid user name for ``useradd``, else ``ConfigError`` naming ``user``."""
    if not _USER.fullmatch(value):
        raise ConfigError("user", f"{value!r} must be a user name of 1-32 characters of [a-z0-9_-], starting "
                                  "with a letter or '_'")
    return value


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
        check_install_dir(self.install_dir)
        check_user(self.user)


def agent_toml(p: Provisioning, profile: DeviceProfile, password: str, ca_file: str | None = None,
               hub_public_key: str | None = None) -> str:
    """The device's ``agent.toml`` (credentials included; ``ca_file`` and ``hub_public_key`` relative to it)."""
    return dumps_toml({
        "device_id": p.device_id, "fleet": p.fleet, "data": p.data_path, "state_dir": p.install_dir + "/state",
        "backend": profile.backend, "seed": 0, "hub_public_key": hub_public_key,
        "max_epochs": profile.max_epochs, "max_round_s": profile.max_round_s,  # the profile's limits (None: left out)
        "broker": {"url": p.broker_url, "username": p.device_id, "password": password, "ca_file": ca_file},
        "eligibility": dict(profile.eligibility) or None,  # the profile's conditions (none: the table is left out)
    }, header=f"fedge agent for {p.device_id} ({profile.name})")


def broker_acl(p: Provisioning) -> str:
    """mosquitto ACL lines: a device publishes only as itself and reads its fleet's hub topics."""
    t = Topics(p.fleet)
    return (
        f"user {p.device_id}\n"
        f"topic write {t.update(p.device_id)}\ntopic write {t.decline(p.device_id)}\n"
        f"topic write {t.select_report(p.device_id)}\ntopic write {t.secagg(p.device_id)}\n"
        f"topic readwrite {t.presence(p.device_id)}\n"
        f"topic read {t.announce}\ntopic read {t.model_head}\ntopic read {t.model_full}\n"
        f"topic read {t.result}\ntopic read {t.hub_status}\ntopic read {t.device_inbox(p.device_id)}\n"
        f"topic read {t.select_announce}\ntopic read {t.candidate_all}\ntopic read {t.base}/hub/key/+\n"
    )


SELFTEST = "selftest"
"""The bundle's folder holding the fleet's model for the installer's self-test."""


def bundle_artifacts(source: Path, dest: Path) -> None:
    """Copy an exported model (the manifest and every file it lists, each checked against its sha256) to ``dest``."""
    from fedge.protocol.manifest import verify_artifacts

    manifest = verify_artifacts(source)
    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    for name in ["manifest.json", *manifest.files]:
        (dest / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source / name, dest / name)
    verify_artifacts(dest)


def write_private(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` readable by its owner only (never briefly world-readable)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        os.fchmod(fd, 0o600)
        fh.write(text)


def provision(p: Provisioning, profile: DeviceProfile, out_dir: Path, *, password: str | None = None,
              wheel: Path | None = None, fleet_dir: Path | None = None, artifacts: Path | None = None) -> Path:
    """Write the device's bundle into ``out_dir/<device_id>/`` and return that folder. ``wheel``: a fedge wheel,
    or a source folder to build one from, bundled and pinned by its sha256; without it the installer pins the
    provisioning fedge's version from the package index. ``fleet_dir`` (``fedge fleet init``): the device gets an
    account in its password file, and the bundle the fleet's CA certificate and the hub's public key. ``artifacts``:
    an exported model (``fedge export``) the installer self-tests the device with (``ArtifactError`` when a file
    does not match its manifest)."""
    fleet = None if fleet_dir is None else FleetDir.at(fleet_dir)
    if fleet is not None:
        name = fleet.read()["fleet"]
        if name != p.fleet:
            raise ConfigError("fleet", f"{fleet.root} is the folder of fleet {name!r}, not {p.fleet!r}")
    if p.device_id in RESERVED_IDS:  # with or without a fleet folder: the hub never takes it for a device
        raise ConfigError("device_id", f"{p.device_id!r} is reserved: the fleet's hub or operator account, or the "
                          "hub's name in secure aggregation")
    bundle = out_dir / p.device_id
    bundle.mkdir(parents=True, exist_ok=True)
    bundle.chmod(0o700)
    pin = index_pin() if wheel is None else bundle_wheel(wheel, bundle)
    if artifacts is not None:
        bundle_artifacts(artifacts, bundle / SELFTEST)
    pw = password or secrets.token_urlsafe(24)
    if profile.service == "systemd":
        service_name = "fedge-agent.service"
        service = systemd_unit(p.install_dir, p.user, p.device_id, p.fleet, profile.max_agent_rss_mb * 2)
    else:
        service_name = "termux-boot.sh"
        service = termux_boot(p.install_dir)
    (bundle / service_name).write_text(service, encoding="utf-8")
    (bundle / "install.sh").write_text(
        install_script(p.install_dir, p.user, profile.extras, profile.service, pin, backend=profile.backend,
                       wheels_only=profile.wheels_only), encoding="utf-8")
    (bundle / "install.sh").chmod(0o755)
    if fleet is not None:
        for src in (fleet.ca_cert, fleet.signing_pub):
            shutil.copyfile(src, bundle / src.name)
    write_private(bundle / "agent.toml", agent_toml(p, profile, pw, None if fleet is None else fleet.ca_cert.name,
                                                    None if fleet is None else fleet.signing_pub.name))
    (bundle / "broker-acl.conf").write_text(broker_acl(p), encoding="utf-8")
    write_private(bundle / "credentials.txt", f"{p.device_id}:{pw}\n")
    meta: dict[str, Any] = {"device_id": p.device_id, "install_dir": p.install_dir, "user": p.user,
                            "service": profile.service, "service_file": service_name, **asdict(pin),
                            "selftest": artifacts is not None}
    (bundle / "bundle.json").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    if fleet is not None:  # last: no account without a complete bundle
        add_device(fleet.root, p.device_id, pw)
    return bundle


__all__ = ["SELFTEST", "Provisioning", "agent_toml", "broker_acl", "bundle_artifacts", "check_install_dir",
           "check_user", "provision", "write_private"]
