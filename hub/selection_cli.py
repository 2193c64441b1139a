"""CLI of source-model selection: ``fedge hub models add|list`` and ``fedge round select``."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from fedge.protocol.errors import ConfigError


def add_subcommands(hub: argparse._SubParsersAction[argparse.ArgumentParser],
                    rnd: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """``hub models ...`` under ``hub``'s sub-commands, ``round select`` under ``round``'s."""
    from fedge.hub.operator import add_broker_args
    from fedge.hub.round_cli import run_round_start

    models = hub.add_parser("models", help="candidate source models for selection rounds")
    msub = models.add_subparsers(dest="models_command", required=True)
    p = msub.add_parser("add", help="register an exported artifacts folder as a candidate source model")
    p.add_argument("name", help="candidate name (1-64 characters of [A-Za-z0-9_-])")
    p.add_argument("artifacts", help="folder written by fedge export (manifest.json, head.npz, ...)")
    p.add_argument("--config", required=True, help="hub.toml")
    p.set_defaults(handler=run_models_add)
    p = msub.add_parser("list", help="print the registered candidates")
    p.add_argument("--config", required=True, help="hub.toml")
    p.add_argument("--json", action="store_true", help="one JSON object")
    p.set_defaults(handler=run_models_list)

    p = rnd.add_parser("select", help="ask the hub for a selection round: devices score every candidate, the hub "
                                      "deploys the best as the new source model")
    p.add_argument("--fleet", required=True)
    add_broker_args(p)
    p.add_argument("--candidates", help="comma-separated candidate names (default: every registered candidate)")
    p.add_argument("--min-devices", type=int)
    p.add_argument("--deadline-s", type=float)
    p.add_argument("--fraction", type=float)
    p.add_argument("--local-epochs", type=int, help="fine-tune epochs per candidate on each device")
    p.add_argument("--lr", type=float)
    p.add_argument("--wait", action="store_true", help="wait for the result; exit 1 unless a candidate was chosen")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds to wait for the result (with --wait)")
    p.add_argument("--reply-timeout", type=float, default=15.0, help="seconds to wait for the hub's reply")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(handler=run_round_start, select=True)


def run_models_add(args: argparse.Namespace) -> int:
    from fedge.hub.config import load_config
    from fedge.hub.registry import Registry
    from fedge.hub.store import Store
    from fedge.protocol.topics import valid_id

    if not valid_id(args.name):
        raise ConfigError("name", f"candidate name {args.name!r} must be 1-64 characters of [A-Za-z0-9_-]")
    cfg = load_config(args.config)
    store = Store(cfg.state_dir / "hub.sqlite")
    try:
        sha, _head = Registry(store, cfg.state_dir).add_backbone(Path(args.artifacts))
        store.add_candidate(args.name, sha)
    finally:
        store.close()
    print(f"candidate {args.name}: backbone {sha[:16]} (fedge round select --fleet {cfg.fleet} ... scores it)")
    return 0


def run_models_list(args: argparse.Namespace) -> int:
    from fedge.hub.config import load_config
    from fedge.hub.selection import selection_status
    from fedge.hub.store import Store

    cfg = load_config(args.config)
    store = Store(cfg.state_dir / "hub.sqlite")
    try:
        info = selection_status(store)
    finally:
        store.close()
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    for c in info["candidates"]:
        print(f"{c['name']:<24} backbone {c['backbone_sha256'][:16]}")
    if not info["candidates"]:
        print("no candidates (fedge hub models add NAME ARTIFACTS_DIR)")
    return 0


__all__ = ["add_subcommands"]
