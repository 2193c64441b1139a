"""Flashing a provisioned bundle: over SSH onto ``user@host``, or into a device's root file system mounted here.

Over SSH: ``mktemp -d`` on the target makes a private folder, the bundle is copied into it (``scp``), the
installer runs there, and the folder (which holds the device's password) is removed whatever happened. Every
``ssh``/``scp`` has ``--`` before its first operand, and targets that are not a plain ``user@host`` (an option
such as ``-oProxyCommand=...``, spaces, shell characters, a path) are refused before anything runs.

Into a mounted root: ``agent.toml`` goes straight to its place (``<install_dir>/agent.toml``, mode 0600), the
rest of the bundle (no password in it) is staged in ``/var/lib/fedge-bundle`` (0700), and a first-boot unit
runs the installer on the device and removes the staged folder once installed.
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Final, Protocol

from fedge.devices.installer import render_firstboot
from fedge.devices.profiles import SERVICES
from fedge.devices.provision import SELFTEST, check_install_dir, check_user, write_private
from fedge.protocol.errors import ConfigError

STAGE: Final = "/var/lib/fedge-bundle"
FIRSTBOOT: Final = "fedge-firstboot.service"
_TARGET = re.compile(r"[A-Za-z_][A-Za-z0-9._-]{0,31}@[A-Za-z0-9][A-Za-z0-9.-]{0,252}")
_WHEEL = re.compile(r"(fedge-[0-9][0-9A-Za-z.+!_]*-py3-none-any\.whl)?")
_SERVICE_FILES = {"systemd": "fedge-agent.service", "termux": "termux-boot.sh"}


class Runner(Protocol):
    """Runs one command; ``capture``: return its standard output too."""

    def __call__(self, cmd: Sequence[str], capture: bool) -> tuple[int, str]: ...


def _run(cmd: Sequence[str], capture: bool) -> tuple[int, str]:
    done = subprocess.run(list(cmd), check=False, text=True, stdout=subprocess.PIPE if capture else None)
    return done.returncode, done.stdout or ""


def read_bundle(bundle: Path) -> dict[str, Any]:
    """The bundle's ``bundle.json``, its values checked again (a bundle may have been edited by hand)."""
    if not (bundle / "agent.toml").is_file() or not (bundle / "bundle.json").is_file():
        raise ConfigError("bundle", f"{str(bundle)!r} is not a provisioned bundle (no agent.toml or bundle.json)")
    try:
        meta = json.loads((bundle / "bundle.json").read_text(encoding="utf-8"))
        service, wheel = meta["service"], meta["wheel"]
        check_install_dir(meta["install_dir"])
        check_user(meta["user"])
    except (ValueError, KeyError, TypeError) as exc:
        raise ConfigError("bundle", f"{bundle / 'bundle.json'}: unreadable: {exc}") from exc
    if service not in SERVICES or not isinstance(wheel, str) or not _WHEEL.fullmatch(wheel):
        raise ConfigError("bundle", f"{bundle / 'bundle.json'}: bad service {service!r} or wheel {wheel!r}")
    return dict(meta)


def check_target(target: str) -> str:
    """``target`` if it is a plain ``user@host`` (no option, whitespace, path or shell character)."""
    if not _TARGET.fullmatch(target):
        raise ConfigError("target", f"{target!r} must be user@host (letters, digits, '.', '_', '-'; not starting "
                                    "with '-') or an existing folder where the device's root is mounted")
    return target


TRUST_FILES = ("ca.crt", "hub-signing.pub")  # public files agent.toml names relative to itself


def _payload(bundle: Path, meta: dict[str, Any]) -> list[Path]:
    """The bundle files the device needs (not the operator's credentials.txt and broker-acl.conf), and the
    ``selftest`` folder (the model the installer self-tests with) when there is one."""
    names = ["agent.toml", "install.sh", "bundle.json", _SERVICE_FILES[meta["service"]]]
    names += [n for n in TRUST_FILES if (bundle / n).is_file()]  # a --fleet-dir bundle: the fleet CA, the hub key
    if meta.get("selftest") and (bundle / SELFTEST / "manifest.json").is_file():
        names.append(SELFTEST)
    return [bundle / n for n in names + ([meta["wheel"]] if meta["wheel"] else [])]


def ssh_commands(bundle: Path, meta: dict[str, Any], target: str, remote: str) -> tuple[list[str], ...]:
    """``(copy, install, cleanup)`` for a bundle going to ``remote`` (a ``mktemp -d`` folder) on ``target``."""
    q = shlex.quote(remote)
    sudo = "sudo " if meta["service"] == "systemd" else ""
    return (
        ["scp", "-q", "-r", "--", *map(str, _payload(bundle, meta)), f"{target}:{remote}/"],
        ["ssh", "--", target, f"{sudo}sh {shlex.quote(remote + '/install.sh')}; rc=$?; rm -rf -- {q}; exit $rc"],
        ["ssh", "--", target, f"rm -rf -- {q}"],
    )


def _flash_ssh(bundle: Path, meta: dict[str, Any], target: str, dry_run: bool, run: Runner) -> list[list[str]]:
    mktemp = ["ssh", "--", check_target(target), "mktemp -d"]
    if dry_run:
        return [mktemp, *ssh_commands(bundle, meta, target, "/tmp/tmp.XXXXXXXXXX")[:2]]
    code, out = run(mktemp, True)
    remote = out.strip()
    if code != 0 or not remote.startswith("/") or check_install_dir(remote, "target") != remote:
        raise ConfigError("target", f"{shlex.join(mktemp)} failed (exit code {code}, output {out[:200]!r})")
    copy, install, cleanup = ssh_commands(bundle, meta, target, remote)
    done = [mktemp]
    for cmd in (copy, install):
        done.append(cmd)
        code, _ = run(cmd, False)
        if code != 0:
            run(cleanup, False)
            raise ConfigError("target", f"{shlex.join(cmd)} failed with exit code {code}")
    return done


def _inside(root: Path, path: Path) -> Path:
    """``path`` if it stays inside ``root`` once symbolic links are followed (a mounted root's absolute links
    point at this machine's files)."""
    if not path.resolve().is_relative_to(root.resolve()):
        raise ConfigError("target", f"{path} leads out of the mounted root {root} (a symbolic link)")
    return path


def _flash_root(bundle: Path, meta: dict[str, Any], root: Path, dry_run: bool) -> list[list[str]]:
    if meta["service"] != "systemd":
        raise ConfigError("target", f"a {meta['service']} bundle is flashed over SSH (user@host) only")
    units = root / "etc" / "systemd" / "system"
    config = _inside(root, root / meta["install_dir"].lstrip("/") / "agent.toml")
    stage = _inside(root, root / STAGE.lstrip("/"))
    unit = _inside(root, units / FIRSTBOOT)
    wants = _inside(root, units / "multi-user.target.wants") / FIRSTBOOT
    staged = [f for f in _payload(bundle, meta) if f.name != "agent.toml"]
    steps = [["install", "-D", "-m", "600", str(bundle / "agent.toml"), str(config)],
             ["install", "-D", "-m", "700", "-t", str(stage), *map(str, staged)],
             ["install", "-D", "-m", "644", f"<{FIRSTBOOT}>", str(unit)],
             ["ln", "-sf", f"/etc/systemd/system/{FIRSTBOOT}", str(wants)]]
    if dry_run:
        return steps
    config.parent.mkdir(parents=True, exist_ok=True)
    write_private(config, (bundle / "agent.toml").read_text(encoding="utf-8"))
    if stage.exists():
        shutil.rmtree(stage)
    stage.mkdir(mode=0o700, parents=True)
    stage.chmod(0o700)
    for f in staged:
        if f.is_dir():
            shutil.copytree(f, stage / f.name)
        else:
            shutil.copy2(f, stage / f.name)
    wants.parent.mkdir(parents=True, exist_ok=True)
    unit.write_text(render_firstboot(STAGE), encoding="utf-8")
    if wants.is_symlink() or wants.exists():
        wants.unlink()
    wants.symlink_to(f"/etc/systemd/system/{FIRSTBOOT}")
    return steps


def flash(bundle: Path, target: str, *, dry_run: bool = False, run: Runner = _run) -> list[list[str]]:
    """Flash over SSH (``user@host``) or into a mounted root file system (an existing local folder); returns
    the commands (``dry_run``: only returns them)."""
    meta = read_bundle(bundle)
    if "@" in target or not Path(target).is_dir():
        return _flash_ssh(bundle, meta, target, dry_run, run)
    return _flash_root(bundle, meta, Path(target), dry_run)


__all__ = ["FIRSTBOOT", "STAGE", "Runner", "check_target", "flash", "read_bundle", "ssh_commands"]
