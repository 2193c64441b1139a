"""Eligibility: whether this device may train now (``[eligibility]`` of agent.toml, defaults from its profile).

A device trains only while the conditions of its policy hold, *where the platform can tell*:

- on external power: Linux sysfs ``/sys/class/power_supply/*/``, a ``Mains``/``USB``/... supply with ``online``
  1, or a battery whose ``status`` is ``Charging``, ``Full`` or ``Not charging``; else Termux's
  ``termux-battery-status`` (``plugged``);
- battery level: sysfs, the ``capacity`` of the system batteries (the lowest; peripheral batteries, ``scope``
  ``Device``, are ignored); else ``termux-battery-status`` (``percentage``);
- metered link: NetworkManager, ``nmcli -t -f GENERAL.METERED dev show`` (metered when any device says ``yes``);
- load: the 1-minute ``os.getloadavg()`` divided by the CPU count.

A condition the platform cannot tell (no power supply in sysfs and no Termux, no NetworkManager, no load
average) is **unknown, and an unknown condition never blocks**: a Raspberry Pi on a bench supply has no
``power_supply`` entries, and declining there forever would be worse than training. Commands run with a
bounded timeout (:data:`COMMAND_TIMEOUT_S`); one that is missing, fails, times out or prints garbage is unknown.

``FEDGE_SYSFS_ROOT`` (for tests and containers) replaces ``/sys``: the power supplies are then read from
``$FEDGE_SYSFS_ROOT/class/power_supply``.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import subprocess
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from fedge.protocol.configdoc import doc
from fedge.protocol.errors import ConfigError

log = logging.getLogger("fedge.agent")

SYSFS_ENV: Final = "FEDGE_SYSFS_ROOT"
COMMAND_TIMEOUT_S: Final = 5.0
KEYS: Final = frozenset({"require_power", "min_battery_pct", "allow_metered", "max_load"})
_ON_POWER_STATUS: Final = frozenset({"charging", "full", "not charging"})
Runner = Callable[[Sequence[str]], str | None]
"""Runs a command (argv) and returns its standard output, or None when it is missing, fails or times out."""


@dataclass(frozen=True)
class EligibilityPolicy:
    """``[eligibility]`` of agent.toml: the conditions under which this device trains. A round announced while
    one of them is known not to hold is declined (``not_eligible``); a condition the platform cannot tell does
    not block."""

    require_power: bool = field(
        default=False,
        metadata=doc("train only on external power (mains, USB, or a charging/full battery)", example=True),
    )
    min_battery_pct: float = field(
        default=0.0,
        metadata=doc("train only when the battery holds at least this many percent (0 = any level)", example=50),
    )
    allow_metered: bool = field(
        default=True,
        metadata=doc("train also on a metered network link (as NetworkManager reports it)", example=False),
    )
    max_load: float = field(
        default=0.0,
        metadata=doc("train only when the 1-minute load average per CPU is at most this (0 = any load)",
                     example=0.8),
    )

    @property
    def active(self) -> bool:
        """Whether any condition is set (else nothing is read: a device with no conditions never blocks)."""
        return self.require_power or self.min_battery_pct > 0 or not self.allow_metered or self.max_load > 0


@dataclass(frozen=True)
class Conditions:
    """What the platform says now; None = cannot tell."""

    on_power: bool | None = None
    battery_pct: float | None = None
    metered: bool | None = None
    load: float | None = None


def policy_from_mapping(table: Any) -> EligibilityPolicy:
    """Validate ``[eligibility]`` (absent: no conditions); errors name the field (``eligibility.<key>``)."""
    if table is None:
        return EligibilityPolicy()
    if not isinstance(table, Mapping):
        raise ConfigError("eligibility", "must be a table")
    unknown = sorted(set(table) - KEYS)
    if unknown:
        raise ConfigError(f"eligibility.{unknown[0]}", f"unknown field; allowed: {', '.join(sorted(KEYS))}")

    def flag(key: str, default: bool) -> bool:
        value = table.get(key, default)
        if not isinstance(value, bool):
            raise ConfigError(f"eligibility.{key}", f"must be true or false, got {value!r}")
        return value

    def number(key: str, upper: float | None) -> float:
        value = table.get(key, 0.0)
        if (isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value < 0
                or (upper is not None and value > upper)):
            bound = "a finite number >= 0" if upper is None else f"a number in [0, {upper:g}]"
            raise ConfigError(f"eligibility.{key}", f"must be {bound}, got {value!r}")
        return float(value)

    return EligibilityPolicy(flag("require_power", False), number("min_battery_pct", 100.0),
                             flag("allow_metered", True), number("max_load", None))


# -- reading the platform ---------------------------------------------------------------------------------------
def run_command(argv: Sequence[str]) -> str | None:
    """The default :data:`Runner`: stdout of ``argv`` if the command exists and exits 0 within the timeout."""
    if shutil.which(argv[0]) is None:
        return None
    try:
        done = subprocess.run(list(argv), capture_output=True, text=True, timeout=COMMAND_TIMEOUT_S, check=False,
                              stdin=subprocess.DEVNULL)
    except (OSError, subprocess.SubprocessError) as exc:
        log.debug("eligibility: %s failed: %s", argv[0], exc)
        return None
    return done.stdout if done.returncode == 0 else None


def _read(path: Path) -> str | None:
    try:
        return path.read_text(encoding="utf-8", errors="replace").strip()
    except OSError:
        return None


def _sysfs_power(sysfs_root: Path) -> tuple[bool | None, float | None]:
    """(on external power, lowest system battery %) from ``<sysfs_root>/class/power_supply``."""
    folder = sysfs_root / "class" / "power_supply"
    try:
        supplies = sorted(p for p in folder.iterdir() if p.is_dir())
    except OSError:
        return None, None
    external: list[bool] = []
    batteries: list[float] = []
    charging = False
    for supply in supplies:
        kind = (_read(supply / "type") or "").lower()
        if kind == "battery":
            if (_read(supply / "scope") or "").lower() == "device":
                continue  # a mouse's or a headset's battery, not the one powering this device
            capacity = _read(supply / "capacity")
            if capacity is not None and capacity.isdigit():
                batteries.append(float(capacity))
            charging |= (_read(supply / "status") or "").lower() in _ON_POWER_STATUS
        elif kind:
            online = _read(supply / "online")
            if online in ("0", "1"):
                external.append(online == "1")
    if any(external) or charging:
        on_power: bool | None = True
    elif external or batteries:
        on_power = False  # supplies we can read, none of them feeding us
    else:
        on_power = None
    return on_power, (min(batteries) if batteries else None)


def _termux_power(run: Runner) -> tuple[bool | None, float | None]:
    """(on external power, battery %) from ``termux-battery-status`` (JSON), or unknowns."""
    out = run(["termux-battery-status"])
    if out is None:
        return None, None
    try:
        status = json.loads(out)
    except ValueError:
        return None, None
    if not isinstance(status, dict):
        return None, None
    plugged = status.get("plugged")
    on_power = None if not isinstance(plugged, str) else plugged.upper() != "UNPLUGGED"
    pct = status.get("percentage")
    if isinstance(pct, bool) or not isinstance(pct, int | float) or not math.isfinite(pct):
        return on_power, None
    return on_power, float(pct)


def _metered(run: Runner) -> bool | None:
    """NetworkManager's view: True if any device's link is metered, False if one says not, None if unknown."""
    out = run(["nmcli", "-t", "-f", "GENERAL.METERED", "dev", "show"])
    if out is None:
        return None
    values = [line.split(":", 1)[1].strip().lower() for line in out.splitlines() if ":" in line]
    if any(v.startswith("yes") for v in values):
        return True
    return False if any(v.startswith("no") for v in values) else None


def _load() -> float | None:
    try:
        return os.getloadavg()[0] / (os.cpu_count() or 1)
    except (OSError, AttributeError):  # no load average (Android's SELinux, Windows)
        return None


def read_conditions(policy: EligibilityPolicy, *, sysfs_root: Path | None = None, run: Runner = run_command,
                    loadavg: Callable[[], float | None] = _load) -> Conditions:
    """What the platform says about the conditions ``policy`` sets (the others are not read)."""
    on_power = battery = metered = load = None
    if policy.require_power or policy.min_battery_pct > 0:
        root = sysfs_root if sysfs_root is not None else Path(os.environ.get(SYSFS_ENV) or "/sys")
        on_power, battery = _sysfs_power(root)
        if on_power is None or battery is None:  # Android: sysfs is closed to apps, Termux's API is not
            t_power, t_battery = _termux_power(run)
            on_power = on_power if on_power is not None else t_power
            battery = battery if battery is not None else t_battery
    if not policy.allow_metered:
        metered = _metered(run)
    if policy.max_load > 0:
        load = loadavg()
    return Conditions(on_power, battery, metered, load)


def unmet(policy: EligibilityPolicy, now: Conditions) -> str | None:
    """The first condition of ``policy`` known not to hold in ``now``, described (e.g. ``battery 23% < 50%``)."""
    if policy.require_power and now.on_power is False:
        return "not on external power" + (f" (battery {now.battery_pct:g}%)" if now.battery_pct is not None else "")
    if policy.min_battery_pct > 0 and now.battery_pct is not None and now.battery_pct < policy.min_battery_pct:
        return f"battery {now.battery_pct:g}% < {policy.min_battery_pct:g}%"
    if not policy.allow_metered and now.metered:
        return "on a metered network link"
    if policy.max_load > 0 and now.load is not None and now.load > policy.max_load:
        return f"load {now.load:.2f} per CPU > {policy.max_load:g}"
    return None


def not_eligible(policy: EligibilityPolicy, **platform: Any) -> str | None:
    """Why this device may not train now (None: it may); ``platform``: :func:`read_conditions`'s injections."""
    if not policy.active:
        return None
    now = read_conditions(policy, **platform)
    log.debug("eligibility: %s", now)
    return unmet(policy, now)


__all__ = ["COMMAND_TIMEOUT_S", "KEYS", "SYSFS_ENV", "Conditions", "EligibilityPolicy", "Runner", "not_eligible",
           "policy_from_mapping", "read_conditions", "run_command", "unmet"]
