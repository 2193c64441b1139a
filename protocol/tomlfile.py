"""Read and write TOML config files (hub, agent, device profiles, demo and provisioning).

Reading uses the standard library's ``tomllib``: every failure is a ConfigError. Writing uses ``tomli_w``
(strings escaped properly); :func:`dumps_toml` also accepts paths and drops ``None`` values.
"""

from __future__ import annotations

import tomllib
from collections.abc import Mapping
from pathlib import Path, PurePath
from typing import Any

import tomli_w

from fedge.protocol.errors import ConfigError


def read_toml(path: str | Path, field: str = "config") -> dict[str, Any]:
    """The TOML document in ``path``; a missing, unreadable or invalid file is a ``ConfigError`` on ``field``."""
    file = Path(path)
    try:
        return tomllib.loads(file.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise ConfigError(field, f"file {str(file)!r} not found") from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(field, f"cannot read {str(file)!r}: {exc}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(field, f"{str(file)!r} is not valid TOML: {exc}") from exc


def _plain(value: Any) -> Any:
    if isinstance(value, PurePath):
        return str(value)
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items() if v is not None}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


def dumps_toml(data: Mapping[str, Any], header: str = "") -> str:
    """``data`` as a TOML document (nested mappings become tables; paths become strings; ``None`` is left out).

    ``header`` lines are written first as ``#`` comments.
    """
    comment = "".join(f"# {line}\n" if line else "#\n" for line in header.splitlines())
    return comment + tomli_w.dumps(_plain(data))


def write_toml(path: str | Path, data: Mapping[str, Any], header: str = "") -> Path:
    """Write :func:`dumps_toml` of ``data`` to ``path`` (UTF-8) and return the path."""
    file = Path(path)
    file.write_text(dumps_toml(data, header), encoding="utf-8")
    return file


__all__ = ["dumps_toml", "read_toml", "write_toml"]
