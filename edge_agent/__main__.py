"""``fedge-agent`` / ``python -m edge_agent``: ``run --config agent.toml``, ``selftest ...``, ``version``."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
from collections.abc import Sequence
from types import FrameType

from fedge.protocol.errors import FedgeError


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fedge-agent", description="fedge edge agent: federated fine-tuning on a device")
    sub = p.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="serve rounds from the hub until SIGTERM/SIGINT")
    run.add_argument("--config", required=True, help="path to agent.toml")
    run.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    run.add_argument("--connect-timeout", type=float, default=30.0, help="seconds to wait for the broker at start")
    run.add_argument("--check", action="store_true",
                     help="validate the config and the local data (naming any bad key or file) and exit")
    init = sub.add_parser("init", help="write a commented starter agent.toml (every key: docs/CONFIG.md)")
    init.add_argument("--out", default="agent.toml")
    init.add_argument("--device-id", default="device-00")
    init.add_argument("--fleet", default="demo")
    init.add_argument("--force", action="store_true", help="overwrite an existing file")
    pr = sub.add_parser("predict", help="predict with the best of this device's personal, global and source heads on "
                        "its validation data (CSV: row,class,probability; the head and its scores on stderr)")
    pr.add_argument("--config", required=True, help="path to agent.toml")
    pr.add_argument("--data", required=True, help="what the agent trains on (.npz with x, .csv with a header and the "
                    "label last, images), with or without labels")
    pr.add_argument("--out", help="CSV file (default: stdout)")
    st = sub.add_parser("selftest", help="check this device: runtimes, artifacts, a few training steps", add_help=False)
    st.add_argument("args", nargs=argparse.REMAINDER)
    sub.add_parser("version", help="print the agent and protocol versions")
    return p


def _init(out: str, device_id: str, fleet: str, force: bool) -> int:
    from pathlib import Path

    from fedge.edge_agent.config import starter_config

    path = Path(out)
    if path.exists() and not force:
        raise FedgeError(f"{path} exists (use --force to overwrite)")
    path.write_text(starter_config(device_id, fleet), encoding="utf-8")
    print(f"wrote {path}: set data and [broker] url, then: fedge-agent run --config {path} --check")
    return 0


def _predict(config_path: str, data: str, out: str | None) -> int:
    from pathlib import Path

    from fedge.edge_agent.config import load_config
    from fedge.edge_agent.predict import predict, write_csv

    result = predict(load_config(config_path), Path(data))
    write_csv(result.classes, result.probability, None if out is None else Path(out))
    print(f"{len(result.classes)} predictions with {result.choice.describe()}" + ("" if out is None else f" -> {out}"),
          file=sys.stderr)
    return 0


def _check(config_path: str) -> int:
    from fedge.edge_agent.config import load_config
    from fedge.runtime.data import load_local

    cfg = load_config(config_path)
    if cfg.hub_public_key is not None:
        from fedge.protocol.errors import ConfigError, FedgeError
        from fedge.protocol.signing import load_public_key

        try:
            load_public_key(cfg.hub_public_key)
        except FedgeError as exc:
            raise ConfigError("hub_public_key", str(exc)) from exc
    data = load_local(cfg.data)
    print(f"{config_path}: ok (device {cfg.device_id!r} in fleet {cfg.fleet!r}, broker {cfg.broker.url}, "
          f"{len(data.y)} local samples, backend {cfg.backend}, privacy {'on' if cfg.privacy else 'off'})")
    return 0


def _run(config_path: str, log_level: str, connect_timeout: float) -> int:
    from fedge.edge_agent.agent import Agent
    from fedge.edge_agent.config import load_config
    from fedge.protocol.logs import configure_logging

    configure_logging(log_level)
    config = load_config(config_path)
    os.umask(0o077)  # everything the agent writes is private to its user (state, features, heads, ledger)
    agent = Agent(config)
    stop = threading.Event()

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        logging.getLogger("fedge.agent").info("signal %d: shutting down", signum)
        stop.set()

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        agent.start(connect_timeout_s=connect_timeout)
        while not stop.wait(1.0):
            pass
    finally:
        agent.stop()
        for s, h in previous.items():
            signal.signal(s, h)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args_in = list(sys.argv[1:] if argv is None else argv)
    if args_in[:1] == ["selftest"]:  # pass everything through, including --help
        from fedge.edge_agent.selftest import selftest_main

        return int(selftest_main(args_in[1:]))
    args = _parser().parse_args(args_in)
    if args.command == "version":
        from fedge.edge_agent.agent import agent_version
        from fedge.protocol.messages import PROTOCOL_VERSION

        print(f"fedge-agent {agent_version()} (protocol {PROTOCOL_VERSION})")
        return 0
    try:
        if args.command == "init":
            return _init(args.out, args.device_id, args.fleet, args.force)
        if args.command == "predict":
            return _predict(args.config, args.data, args.out)
        if args.check:
            return _check(args.config)
        return _run(args.config, args.log_level, args.connect_timeout)
    except FedgeError as exc:
        print(f"fedge-agent: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
