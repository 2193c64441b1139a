"""Read a TOML config file; every failure is a ConfigError (shared by hub, agent and device profiles)."""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

from protocol.errors import ConfigError


def read_toml(path: str | Path, field: str = "config") -> dict[str, Any]:
    file = Path(path)
    try:
        return tomllib.loads(file.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise ConfigError(field, f"file {str(file)!r} not found") from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(field, f"cannot read {str(file)!r}: {exc}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(field, f"{str(file)!r} is not valid TOML: {exc}") from exc


__all__ = ["read_toml"]
