"""Device-class profiles: what a class of device runs and how the agent is installed on it."""

from __future__ import annotations

import math
import tomllib
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Final

from fedge.protocol.errors import ConfigError
from fedge.protocol.tomlfile import read_toml

BACKENDS: Final = ("auto", "litert", "ort", "numpy")
SERVICES: Final = ("systemd", "termux")
EXTRAS: Final = ("agent", "agent-ort")
# the profile's [eligibility]: defaults of the agent's [eligibility] (edge_agent/eligibility.py validates them again)
ELIGIBILITY: Final = {"require_power": bool, "min_battery_pct": float, "allow_metered": bool, "max_load": float}


@dataclass(frozen=True)
class DeviceProfile:
    """A device class (Raspberry Pi 4/5, Jetson, Android/Termux, x86): which agent extras and backend to
    install, the service manager, the agent's memory budget, and when it trains (``eligibility``: the
    ``[eligibility]`` written into its agent.toml; empty = no conditions) and how much of a round it takes
    (``max_epochs``, ``max_round_s``: the agent's limits written into its agent.toml; None = the agent's default)."""

    name: str
    description: str
    arch: str
    python: str
    extras: tuple[str, ...]
    backend: str
    memory_mb: int
    max_agent_rss_mb: int
    service: str
    eligibility: dict[str, bool | float] = field(default_factory=dict)
    max_epochs: int | None = None
    max_round_s: float | None = None

    @property
    def wheels_only(self) -> bool:
        """Install from wheels only (no compiler on the device): Linux devices with a systemd service, whose
        dependencies all have manylinux wheels for x86_64 and aarch64 (Termux on Android has none and builds)."""
        return self.service == "systemd"

    def __post_init__(self) -> None:
        if self.arch not in ("aarch64", "x86_64", "armv7l"):
            raise ConfigError("arch", f"{self.arch!r} is not one of aarch64, x86_64, armv7l")
        if self.backend not in BACKENDS:
            raise ConfigError("backend", f"{self.backend!r} is not one of {', '.join(BACKENDS)}")
        if self.service not in SERVICES:
            raise ConfigError("service", f"{self.service!r} is not one of {', '.join(SERVICES)}")
        bad = [e for e in self.extras if e not in EXTRAS]
        if bad or "agent" not in self.extras:
            raise ConfigError("extras", f"must include 'agent' and only {', '.join(EXTRAS)}; got {list(self.extras)}")
        if "agent-ort" in self.extras and self.arch != "x86_64":
            raise ConfigError("extras", "onnxruntime-training-cpu has no wheels for " + self.arch)
        if self.backend == "ort" and "agent-ort" not in self.extras:
            raise ConfigError("backend", "'ort' needs the agent-ort extra")
        if not 0 < self.max_agent_rss_mb <= self.memory_mb:
            raise ConfigError("max_agent_rss_mb", f"must be in (0, memory_mb={self.memory_mb}]")
        for key, value in self.eligibility.items():
            kind = ELIGIBILITY.get(key)
            if kind is None:
                raise ConfigError(f"eligibility.{key}", f"unknown field; allowed: {', '.join(ELIGIBILITY)}")
            ok = isinstance(value, bool) if kind is bool else (
                isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value) and value >= 0)
            if not ok:
                want = "true or false" if kind is bool else "a number >= 0"
                raise ConfigError(f"eligibility.{key}", f"must be {want}, got {value!r}")
        if self.max_epochs is not None and (
                isinstance(self.max_epochs, bool) or not isinstance(self.max_epochs, int) or self.max_epochs < 1):
            raise ConfigError("max_epochs", f"must be an integer >= 1, got {self.max_epochs!r}")
        if self.max_round_s is not None and (
                isinstance(self.max_round_s, bool) or not isinstance(self.max_round_s, int | float)
                or not math.isfinite(self.max_round_s) or self.max_round_s <= 0):
            raise ConfigError("max_round_s", f"must be a finite number of seconds > 0, got {self.max_round_s!r}")


def profile_from_mapping(table: dict[str, Any], source: str) -> DeviceProfile:
    """Validate one parsed profile; errors name the file and the field."""
    fields = {
        "name": str, "description": str, "arch": str, "python": str, "extras": list,
        "backend": str, "memory_mb": int, "max_agent_rss_mb": int, "service": str,
    }
    for key, kind in fields.items():
        if key not in table:
            raise ConfigError(key, f"missing in profile {source}")
        if not isinstance(table[key], kind) or isinstance(table[key], bool):
            raise ConfigError(key, f"in profile {source} must be a {kind.__name__}, got {table[key]!r}")
    unknown = sorted(set(table) - set(fields) - {"eligibility", "max_epochs", "max_round_s"})
    if unknown:
        raise ConfigError(unknown[0], f"unknown field in profile {source}")
    eligibility = table.get("eligibility", {})
    if not isinstance(eligibility, dict):
        raise ConfigError("eligibility", f"in profile {source} must be a table, got {eligibility!r}")
    seconds = table.get("max_round_s")
    if isinstance(seconds, int) and not isinstance(seconds, bool):
        seconds = float(seconds)  # TOML writes whole seconds as integers
    try:
        return DeviceProfile(**{**table, "extras": tuple(table["extras"]), "eligibility": dict(eligibility),
                                "max_round_s": seconds})
    except ConfigError as exc:
        raise ConfigError(exc.field, f"{exc.problem} (profile {source})") from exc


def load_profile_file(path: Path) -> DeviceProfile:
    return profile_from_mapping(read_toml(path, "profile"), str(path))


def builtin_profiles() -> dict[str, DeviceProfile]:
    """The profiles shipped in ``devices/profiles/``, by name."""
    out: dict[str, DeviceProfile] = {}
    for entry in sorted(resources.files("fedge.devices").joinpath("profiles").iterdir(), key=lambda e: e.name):
        if entry.name.endswith(".toml"):
            profile = profile_from_mapping(tomllib.loads(entry.read_text(encoding="utf-8")), entry.name)
            out[profile.name] = profile
    return out


def get_profile(name_or_path: str) -> DeviceProfile:
    """A built-in profile by name, or a profile TOML file by path."""
    profiles = builtin_profiles()
    if name_or_path in profiles:
        return profiles[name_or_path]
    path = Path(name_or_path)
    if path.suffix == ".toml":
        return load_profile_file(path)
    raise ConfigError("profile", f"unknown profile {name_or_path!r}; built-in: {', '.join(profiles)}")


__all__ = ["DeviceProfile", "builtin_profiles", "get_profile", "load_profile_file", "profile_from_mapping"]
