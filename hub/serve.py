"""CLI: ``fedge hub serve|status|rollback`` and ``fedge round start|cancel``."""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import threading
from collections.abc import Callable
from dataclasses import asdict
from typing import Any

from fedge.hub.operator import add_broker_args
from fedge.hub.round_cli import run_round_cancel, run_round_start
from fedge.protocol.errors import ConfigError, FedgeError

log = logging.getLogger("fedge.hub")

HUB_SESSION_EXPIRY_S = 7 * 86400  # the broker keeps the hub's session (queued updates) a week


def add_subcommands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    hub = sub.add_parser("hub", help="the hub daemon and its state")
    hsub = hub.add_subparsers(dest="hub_command", required=True)
    p = hsub.add_parser("serve", help="run the hub daemon (Ctrl-C / SIGTERM to stop)")
    p.add_argument("--config", required=True, help="hub.toml")
    p.add_argument("--check", action="store_true", help="validate the config (naming any bad key) and exit")
    p.add_argument("--http", metavar="HOST:PORT",
                   help="serve the read-only fleet dashboard and /metrics here (overrides [http] listen; a "
                        "non-loopback address needs [http] token)")
    p.set_defaults(handler=run_serve)
    p = hsub.add_parser("init", help="write a commented starter hub.toml (every key: docs/CONFIG.md)")
    p.add_argument("--out", default="hub.toml")
    p.add_argument("--fleet", default="demo")
    p.add_argument("--force", action="store_true", help="overwrite an existing file")
    p.set_defaults(handler=run_init)
    p = hsub.add_parser("status", help="print the hub's state as JSON (reads the store; works offline)")
    p.add_argument("--config", required=True)
    p.set_defaults(handler=run_status)
    p = hsub.add_parser("privacy", help="print the privacy ledger: every DP round and the epsilon spent")
    p.add_argument("--config", required=True, help="hub.toml")
    p.add_argument("--fleet", help="check that the config serves this fleet")
    p.add_argument("--json", action="store_true", help="one JSON object instead of a table")
    p.set_defaults(handler=run_privacy)
    p = hsub.add_parser("rollback", help="deploy an earlier model version again, as a new version (the daemon "
                                         "publishes it)")
    p.add_argument("--config", required=True)
    p.add_argument("--to", required=True, metavar="VERSION", help="e.g. v3")
    p.set_defaults(handler=run_rollback)
    dev = hsub.add_parser("devices", help="devices' conduct: standing, exclusions, readmission")
    dsub = dev.add_subparsers(dest="devices_command", required=True)
    p = dsub.add_parser("list", help="every device's strikes, exclusion and participation (JSON)")
    p.add_argument("--config", required=True, help="hub.toml")
    p.set_defaults(handler=run_devices_list)
    p = dsub.add_parser("readmit", help="let an excluded device be selected again (from the next round on)")
    p.add_argument("device")
    p.add_argument("--config", required=True, help="hub.toml")
    p.set_defaults(handler=run_devices_readmit)

    rnd = sub.add_parser("round", help="control rounds of a running hub")
    rsub = rnd.add_subparsers(dest="round_command", required=True)
    p = rsub.add_parser("start", help="ask the hub to start a round (ignored while one is open)")
    p.add_argument("--fleet", required=True)
    add_broker_args(p)
    p.add_argument("--min-devices", type=int)
    p.add_argument("--deadline-s", type=float)
    p.add_argument("--fraction", type=float)
    p.add_argument("--local-epochs", type=int)
    p.add_argument("--lr", type=float)
    p.add_argument("--wait", action="store_true", help="wait for the round's result; exit 1 unless it completed")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds to wait for the result (with --wait)")
    p.add_argument("--reply-timeout", type=float, default=15.0, help="seconds to wait for the hub's reply")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(handler=run_round_start)
    p = rsub.add_parser("cancel", help="close the open round now, as cancelled (no new model from it)")
    p.add_argument("--fleet", required=True)
    add_broker_args(p)
    p.add_argument("--reason", default="", help="why (kept in the round's result detail)")
    p.add_argument("--round", type=int, help="cancel only if this round is the open one")
    p.add_argument("--reply-timeout", type=float, default=15.0, help="seconds to wait for the hub's reply")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(handler=run_round_cancel)
    from fedge.hub.selection_cli import add_subcommands as add_selection_subcommands

    add_selection_subcommands(hsub, rsub)  # hub models add|list, round select


def run_init(args: argparse.Namespace) -> int:
    from pathlib import Path

    from fedge.hub.config import starter_config

    out = Path(args.out)
    if out.exists() and not args.force:
        raise FedgeError(f"{out} exists (use --force to overwrite)")
    out.write_text(starter_config(args.fleet), encoding="utf-8")
    print(f"wrote {out}: set artifacts and [broker] url, then: fedge hub serve --config {out} --check")
    return 0


def _connect_node(node: Any, republish: Callable[[], None], stop: threading.Event) -> None:
    """Connect to another node of the broker cluster (retrying until it answers), then republish the hub's
    retained state there after every (re)connect."""
    from fedge.protocol.errors import TransportError

    while not stop.is_set():
        try:
            node.connect(timeout_s=10)
        except TransportError as exc:
            log.warning("broker node %s: %s (retrying)", node.cfg.url, exc)
            stop.wait(5.0)
            continue
        node.add_on_connect(republish)  # now too: the node has had none of the retained messages
        log.info("publishing retained messages on broker node %s too", node.cfg.url)
        return


def run_serve(args: argparse.Namespace) -> int:
    from fedge.hub.config import load_config
    from fedge.hub.daemon import HubDaemon
    from fedge.protocol.codec import encode
    from fedge.protocol.messages import HubStatus
    from fedge.protocol.topics import Topics
    from fedge.protocol.transport_mqtt import MqttTransport

    cfg = load_config(args.config)
    if getattr(args, "http", None) is not None:  # --http overrides [http] listen (validated the same way)
        from dataclasses import replace

        cfg = replace(cfg, http=replace(cfg.http, listen=args.http))
    if args.check:
        if not (cfg.state_dir / "hub.sqlite").exists() and not (cfg.artifacts / "manifest.json").is_file():
            raise ConfigError("artifacts", f"{cfg.artifacts} holds no exported model (manifest.json): "
                              "run fedge export first")
        if cfg.eval_data is not None and not cfg.eval_data.is_file():
            raise ConfigError("eval_data", f"{cfg.eval_data}: file not found")
        from fedge.hub.daemon import check_signing_key, gate_warnings

        check_signing_key(cfg)
        for warning in gate_warnings(cfg):
            print(f"{args.config}: warning: {warning}")
        print(f"{args.config}: ok (fleet {cfg.fleet!r}, broker {cfg.broker.config.url}"
              f"{' embedded' if cfg.broker.embedded else ''}, privacy {cfg.privacy.mode}, secure aggregation "
              f"{'on' if cfg.secagg.enabled else 'off'}, state in {cfg.state_dir}"
              f"{', dashboard on ' + cfg.http.listen if cfg.http.enabled else ''})")
        return 0
    os.umask(0o077)  # everything the hub writes is private to its user (hub.sqlite, models, rounds.jsonl)
    broker: Any = None
    dashboard: Any = None
    if cfg.broker.embedded:
        from fedge.hub.broker import EmbeddedBroker

        broker = EmbeddedBroker(cfg.broker.embedded_host, cfg.broker.embedded_port)
        broker.start()
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    try:
        topics = Topics(cfg.fleet)
        will = (topics.hub_status, encode(HubStatus(fleet=cfg.fleet, online=False)), True)
        transport = MqttTransport(cfg.broker.config, f"fedge-hub-{cfg.fleet}", will=will, manual_ack=True,
                                  session_expiry_s=HUB_SESSION_EXPIRY_S)
        # the other nodes of a cluster that keeps retained messages per node: publish-only connections
        nodes = [MqttTransport(node, f"fedge-hub-{cfg.fleet}-retain-{i}", session_expiry_s=0)
                 for i, node in enumerate(cfg.broker.node_configs(), 1)]
        daemon = HubDaemon(cfg, transport, retain_on=nodes)
        if cfg.http.enabled:  # the read-only dashboard: its own read-only store connection, presence watched
            from fedge.hub.dashboard.server import start_for_hub

            dashboard = start_for_hub(cfg, transport)
            print(f"dashboard: {dashboard.url}", flush=True)
        daemon.start(connect=transport.connect)
        transport.add_on_connect(daemon.on_connect)  # after a reconnect: every retained message again
        for node in nodes:  # once a node is reached (now or later), and after each of its reconnects: the state
            threading.Thread(target=_connect_node, args=(node, daemon.on_reconnect, stop), daemon=True).start()
        log.info("hub for fleet %r serving on %s (state in %s)", cfg.fleet, cfg.broker.config.url, cfg.state_dir)
        try:
            while not stop.wait(0.5):
                pass
        finally:
            log.info("hub stopping")
            daemon.stop()
            transport.close()
            for node in nodes:
                if node.connected.is_set():
                    node.close(flush_timeout_s=2)
    finally:
        if dashboard is not None:
            dashboard.stop()
        if broker is not None:
            broker.stop()
    return 0


def _secagg_status(store: Any, rid: int) -> dict[str, Any]:
    """A SecAgg round's entry: who is in the sum and who dropped before sending a masked input."""
    row = store.secagg_sum(rid)
    if row is None:
        return {}
    included, dropped, ring_bits, scale, _ = row
    return {"secagg": {"included": included, "dropped_before_input": dropped,
                       "dropped_after_input": store.secagg_silent(rid), "ring_bits": ring_bits, "scale": scale}}


def status_dict(config_path: str) -> dict[str, Any]:
    from fedge.hub.config import load_config
    from fedge.hub.registry import Registry
    from fedge.hub.selection import selection_status
    from fedge.hub.store import Store

    cfg = load_config(config_path)
    db = cfg.state_dir / "hub.sqlite"
    if not db.exists():
        raise FedgeError(f"no hub state at {db} (has the hub run yet?)")
    store = Store(db)
    try:
        cur = Registry(store, cfg.state_dir).current()
        gated = {str(s.params["gate"]["version"]): s for s in store.selections() if "gate" in s.params}

        def federated_accuracy(version: str) -> float | None:  # its devices' validation score in its gate round
            s = gated.get(version)
            scores = {c.get("name"): c.get("accuracy") for c in (s.ranking or [])} if s is not None else {}
            acc = scores.get(version)
            return float(acc) if isinstance(acc, int | float) else None

        return {
            "fleet": cfg.fleet,
            "current_version": None if cur is None else cur.version,
            "alert": store.get_meta("alert") or None,
            "versions": [{"version": v.version, "parent": v.parent, "round": v.round, "accuracy": v.accuracy,
                          "federated_accuracy": federated_accuracy(v.version),
                          "backbone_sha256": v.backbone_sha256} for v in store.versions()],
            "rounds": [{"id": r.id, "status": r.status, "model_version": r.model_version,
                        "new_version": r.new_version, "selected": list(r.selected), "devices": list(r.devices),
                        "n_samples": r.n_samples, "accuracy": r.accuracy, "loss": r.loss,
                        "seconds": None if r.closed_at is None else round(r.closed_at - r.opened_at, 3),
                        "detail": store.round_detail(r.id), "declined": sorted(store.declines(r.id)),
                        "federated": store.round_metrics(r.id), **_secagg_status(store, r.id)}
                       for r in store.rounds()],
            "declines": store.decline_counts(),
            "rejects": store.reject_counts(),
            "control": store.control_counts(),
            "devices": store.devices(),
            **selection_status(store),  # candidate source models and selection rounds
        }
    finally:
        store.close()


def run_status(args: argparse.Namespace) -> int:
    print(json.dumps(status_dict(args.config), indent=2))
    return 0


def privacy_dict(config_path: str, fleet: str | None = None) -> dict[str, Any]:
    """The privacy ledger of a hub's store, with its budget (reads the store; works while the hub runs)."""
    from fedge.core.privacy import ledger_epsilon
    from fedge.hub.config import load_config
    from fedge.hub.store import Store

    cfg = load_config(config_path)
    if fleet is not None and fleet != cfg.fleet:
        raise FedgeError(f"{config_path} serves fleet {cfg.fleet!r}, not {fleet!r}")
    db = cfg.state_dir / "hub.sqlite"
    if not db.exists():
        raise FedgeError(f"no hub state at {db} (has the hub run yet?)")
    store = Store(db)
    try:
        ledger = store.ledger()
        refused = [{"round": r.id, "detail": store.round_detail(r.id)} for r in store.rounds()
                   if r.status == "refused_budget"]
    finally:
        store.close()
    p = cfg.privacy
    return {
        "fleet": cfg.fleet, "mode": p.mode, "delta": p.delta,
        "epsilon_budget": p.epsilon_budget or None,
        # recomputed from the whole ledger at the delta configured now (each row keeps the epsilon it had)
        "epsilon_spent": ledger_epsilon(ledger, p.delta),
        "rounds": [asdict(r) for r in ledger],
        "refused": refused,
    }


def run_privacy(args: argparse.Namespace) -> int:
    info = privacy_dict(args.config, args.fleet)
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    budget = "none" if info["epsilon_budget"] is None else f"{info['epsilon_budget']:g}"
    print(f"fleet {info['fleet']}: {info['mode']} DP, epsilon spent {info['epsilon_spent']:.3f} of budget {budget} "
          f"(delta {info['delta']:g})")
    print(f"{'round':>5}  {'mode':<8} {'z':>6} {'C':>7} {'q':>6} {'cohort':>6} {'expected':>8} {'epsilon':>8}")
    for r in info["rounds"]:
        print(f"{r['round']:>5}  {r['mode']:<8} {r['noise_multiplier']:>6.3g} {r['clip']:>7.3g} "
              f"{r['sample_rate']:>6.3g} {r['cohort']:>6} {r['expected_cohort']:>8.1f} {r['epsilon']:>8.3f}")
    for r in info["refused"]:
        print(f"round {r['round']} refused: {r['detail']}")
    return 0


def _store(config_path: str) -> Any:
    from fedge.hub.config import load_config
    from fedge.hub.store import Store

    cfg = load_config(config_path)
    db = cfg.state_dir / "hub.sqlite"
    if not db.exists():
        raise FedgeError(f"no hub state at {db} (has the hub run yet?)")
    return Store(db)


def devices_dict(config_path: str) -> dict[str, Any]:
    """Every known device's standing (strikes, exclusion) and participation, and the latest alerts."""
    from dataclasses import asdict

    from fedge.core.conduct import Record, Standing, excluded

    store = _store(config_path)
    try:
        rid = store.next_round_id()
        standings, records = store.standings(), store.records()
        names = sorted({d["device"] for d in store.devices()} | set(standings) | set(records))
        rows = []
        for d in names:
            s = standings.get(d, Standing())
            rows.append({"device": d, "excluded": excluded(s, rid), **asdict(s), **asdict(records.get(d, Record()))})
        return {"next_round": rid, "devices": rows, "alerts": store.alerts(20)}
    finally:
        store.close()


def run_devices_list(args: argparse.Namespace) -> int:
    print(json.dumps(devices_dict(args.config), indent=2))
    return 0


def run_devices_readmit(args: argparse.Namespace) -> int:
    from fedge.hub.conduct import readmit

    store = _store(args.config)
    try:
        was = readmit(store, args.device)
    finally:
        store.close()
    print(f"{args.device} readmitted (was: {was or 'strikes'}); a running hub may select it from its next round on")
    return 0


def run_rollback(args: argparse.Namespace) -> int:
    from fedge.hub.config import load_config
    from fedge.hub.registry import Registry
    from fedge.hub.store import Store

    cfg = load_config(args.config)
    store = Store(cfg.state_dir / "hub.sqlite")
    try:
        row = Registry(store, cfg.state_dir).rollback(args.to)
    finally:
        store.close()
    print(f"current model version is now {row.version}, a copy of {args.to} (a running hub publishes it when its "
          "next round starts)")
    return 0


