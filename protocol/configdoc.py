"""Configuration reference and starter files, generated from the config dataclasses themselves.

Every field of a config dataclass carries its documentation in ``dataclasses.field(metadata=doc(...))``;
:func:`markdown` renders the reference (``docs/CONFIG.md``) and :func:`starter_toml` a commented starter file
(``fedge hub init``, ``fedge-agent init``) from the same definitions, so neither can drift from the code.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import MISSING, dataclass, fields
from typing import Any

import tomli_w

REQUIRED = MISSING


def doc(help: str, *, example: Any = None, toml: bool = True) -> dict[str, Any]:
    """Field metadata: ``help`` (one sentence), an ``example`` value, ``toml=False`` for fields that are not
    keys of the file (computed or nested tables)."""
    return {"help": help, "example": example, "toml": toml}


@dataclass(frozen=True)
class Key:
    """One documented key of a config file."""

    name: str
    type: str
    default: Any  # REQUIRED when the key must be given
    help: str
    example: Any = None

    @property
    def required(self) -> bool:
        return self.default is REQUIRED


@dataclass(frozen=True)
class Section:
    """A TOML table (``name`` None for the top level) and its keys."""

    name: str | None
    keys: tuple[Key, ...]
    help: str = ""


def _type_name(annotation: Any) -> str:
    text = str(annotation).replace("typing.", "").replace("pathlib.", "")
    return {"str": "string", "int": "integer", "float": "number", "bool": "boolean", "Path": "path",
            "Path | None": "path (optional)", "str | None": "string (optional)",
            "tuple[str, ...]": "list of strings", "tuple[str, ...] | None": "list of strings (optional)",
            "float | None": "number (optional)", "int | None": "integer (optional)"}.get(text, text)


def keys_of(cls: type[Any], *, only: Iterable[str] | None = None, types: Mapping[str, str] | None = None,
            required: Iterable[str] = (), defaults: Mapping[str, Any] | None = None) -> tuple[Key, ...]:
    """The documented TOML keys of a config dataclass, in definition order (fields with ``toml=False``
    skipped; ``only`` restricts and orders nothing). ``required`` marks keys the file must give, ``defaults``
    overrides the default shown (where the loader, not the dataclass, supplies it). Raises ``TypeError`` for a
    key without documentation: every key must have help."""
    wanted = None if only is None else set(only)
    must = set(required)
    out = []
    for f in fields(cls):
        meta = f.metadata
        if (wanted is not None and f.name not in wanted) or not meta.get("toml", True):
            continue
        if not meta.get("help"):
            raise TypeError(f"{cls.__name__}.{f.name} has no documentation (field(metadata=doc(...)))")
        if f.name in (defaults or {}):
            default: Any = (defaults or {})[f.name]
        elif f.name in must or (f.default is MISSING and f.default_factory is MISSING):
            default = REQUIRED
        else:
            default = f.default if f.default is not MISSING else f.default_factory()  # type: ignore[operator]
        out.append(Key(f.name, (types or {}).get(f.name) or _type_name(f.type), default, meta["help"],
                       meta.get("example")))
    return tuple(out)


def _value(value: Any) -> str:
    """A TOML value as it appears after ``key = ``."""
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_value(v) for v in value) + "]"
    return tomli_w.dumps({"x": value}).split("=", 1)[1].strip()


def _default_text(key: Key) -> str:
    if key.required:
        return "required"
    if key.default is None:
        return "(none)"
    return f"`{_value(key.default)}`"


def markdown(title: str, intro: str, sections: Sequence[Section]) -> str:
    """The reference of one config file as Markdown: a table per section."""
    lines = [f"## {title}", "", intro, ""]
    for sec in sections:
        lines += [f"### `[{sec.name}]`" if sec.name else "### Top level", ""]
        if sec.help:
            lines += [sec.help, ""]
        lines += ["| key | type | default | meaning | example |", "|---|---|---|---|---|"]
        for k in sec.keys:
            example = "" if k.example is None else f"`{_value(k.example)}`"
            lines.append(f"| `{k.name}` | {k.type} | {_default_text(k)} | {k.help} | {example} |")
        lines.append("")
    return "\n".join(lines)


def starter_toml(header: str, sections: Sequence[Section], values: Mapping[str, Any] | None = None) -> str:
    """A commented starter file: required keys set (from ``values`` or their example), optional keys shown
    commented out with their default, each with its help as a comment."""
    given = dict(values or {})
    out = [f"# {line}" if line else "#" for line in header.splitlines()]
    for sec in sections:
        out.append("")
        if sec.name:
            out.append(f"[{sec.name}]")
        if sec.help:
            out.append(f"# {sec.help}")
        for k in sec.keys:
            path = f"{sec.name}.{k.name}" if sec.name else k.name
            out.append(f"# {k.help}")
            if path in given:
                out.append(f"{k.name} = {_value(given[path])}")
            elif k.required:
                out.append(f"{k.name} = {_value(k.example)}")
            elif k.default is None:
                out.append(f"# {k.name} = {_value(k.example)}" if k.example is not None else f"# {k.name} =")
            else:
                out.append(f"# {k.name} = {_value(k.default)}")
    return "\n".join(out) + "\n"


__all__ = ["REQUIRED", "Key", "Section", "doc", "keys_of", "markdown", "starter_toml"]
